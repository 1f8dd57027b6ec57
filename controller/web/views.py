"""Views: the JSON shapes the API serves, built in one place from what the daemon holds, so the
state API, the live page and the status command show the same thing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from controller.planning.weights import shares
from probes.spec import redact

if TYPE_CHECKING:
    from collections.abc import Mapping

    from controller.acting.reconciler import Reconciler
    from controller.events.bus import Bus
    from controller.judging.verdicts import Verdict
    from controller.settings.schema import Config, RecordSet

RECENT_EVENTS = 100


class Observed(Protocol):
    """What the views read: the daemon, or anything holding the same."""

    config: Config
    bus: Bus
    reconciler: Reconciler | None

    @property
    def vantage(self) -> str: ...

    @property
    def verdicts(self) -> Mapping[str, Verdict]: ...

    def probe_stats(self) -> tuple[int, int]:
        """Probe runs so far, and scheduled runs missed because the previous one overran."""
        ...

    def clock(self) -> float: ...

    def agents(self) -> dict[str, Any] | None:
        """The probe agents: the broker link and each agent's presence, lag and drops (None
        without agents)."""
        ...


def state(source: Observed) -> dict[str, Any]:
    """`GET /api/v1/state`: every region with its verdict, every record set, ramp and the events."""
    verdicts = source.verdicts
    reconciler = source.reconciler
    runs, missed = source.probe_stats()
    return {
        "generated_at": source.clock(),
        "vantage": source.vantage,
        "regions": [
            {
                "name": r.name,
                "type": r.type,
                "residency": r.residency,
                "max_share": r.max_share,
                "probes": [
                    {"name": p.name, "kind": p.kind, "target": redact(p.target), "interval": p.interval}
                    for p in r.probes
                ],
                "verdict": verdicts[r.name].to_json() if r.name in verdicts else None,
            }
            for r in source.config.regions
        ],
        "record_sets": [record_set(rs, reconciler) for rs in source.config.record_sets],
        "ramps": ramps(source.config, reconciler),
        "frozen": reconciler.frozen if reconciler is not None else None,
        "events": [e.to_json() for e in source.bus.recent(RECENT_EVENTS)],
        "probe_runs": runs,
        "missed_ticks": missed,
        "agents": source.agents(),
    }


def record_set(rs: RecordSet, reconciler: Reconciler | None) -> dict[str, Any]:
    """One record set: members with observed and desired weights and shares, its owner and why."""
    view = reconciler.views.get(rs.key) if reconciler is not None else None
    observed = dict(view.observed) if view is not None else {}
    desired = dict(view.desired) if view is not None and view.desired is not None else None
    achieved = shares(observed) if observed and any(observed.values()) else {}
    wanted = shares(desired) if desired else {}
    return {
        "key": rs.key,
        "name": rs.name,
        "type": rs.type,
        "zone_id": rs.zone_id,
        "ttl": rs.ttl,
        "residency": rs.residency,
        "takes_writes": rs.takes_writes,
        "members": [
            {
                **m.model_dump(),
                "observed_weight": observed.get(m.set_identifier),
                "observed_share": round(achieved[m.set_identifier], 3) if m.set_identifier in achieved else None,
                "desired_weight": desired.get(m.set_identifier) if desired else None,
                "desired_share": round(wanted[m.set_identifier], 3) if m.set_identifier in wanted else None,
            }
            for m in rs.members
        ],
        "owner": view.owner if view is not None else None,
        "reason": view.reason if view is not None else None,
        "drift": view.drift if view is not None else None,
        "error": view.error if view is not None else None,
    }


def ramps(config: Config, reconciler: Reconciler | None) -> list[dict[str, Any]]:
    """Every ramp: wave, step, share, bake and why it stands where it does."""
    if reconciler is None:
        return []
    out = []
    for name, state in reconciler.ramps.items():
        policy = config.policy.ramps[name]
        out.append(
            {
                "name": name,
                "record_set": policy.record_key,
                "status": state.status,
                "wave": state.wave + 1,
                "waves": len(policy.waves),
                "targets": policy.waves[state.wave],
                "step": state.step + 1,
                "steps": len(policy.steps),
                "share": policy.steps[state.step] if state.step >= 0 else 0.0,
                "bake_until": state.bake_until,
                "reason": state.reason,
                "pending": state.pending is not None,
            }
        )
    return out
