"""Views: the JSON shapes the API serves, built in one place from what the daemon holds, so the
state API, the live page and the status command show the same thing."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from controller.planning.weights import shares
from probes.spec import redact

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from controller.acting.reconciler import Reconciler
    from controller.events.bus import Bus
    from controller.events.kinds import VerdictChanged
    from controller.judging.verdicts import Verdict
    from controller.judging.windows import Window, WindowStore
    from controller.settings.policy import VerdictPolicy
    from controller.settings.schema import Config, RecordSet

RECENT_EVENTS = 100
HISTORY = 3600.0  # seconds of verdict changes the state carries, for the live page's chart


class Observed(Protocol):
    """What the views read: the daemon, or anything holding the same."""

    config: Config
    bus: Bus
    reconciler: Reconciler | None
    windows: WindowStore
    started_at: float  # when the daemon began

    @property
    def verdict_log(self) -> Sequence[VerdictChanged]:
        """The verdict changes, oldest first: the newest hour's at least."""
        ...

    @property
    def vantage(self) -> str: ...

    @property
    def verdicts(self) -> Mapping[str, Verdict]: ...

    @property
    def set_aside(self) -> Mapping[str, str]:
        """Vantages the judge set aside (their results not held against any region), and why."""
        ...

    def probe_stats(self) -> tuple[int, int]:
        """Probe runs so far, and scheduled runs missed because the previous one overran."""
        ...

    def clock(self) -> float: ...

    def actuation(self) -> dict[str, str]:
        """Record sets whose actuation is impaired, and how (what `/healthz` reports)."""
        ...

    def api_token(self) -> str | None: ...

    def agents(self) -> dict[str, Any] | None:
        """The probe agents: the broker link and each agent's presence, lag and drops (None
        without agents)."""
        ...


def state(source: Observed, *, history: bool = True) -> dict[str, Any]:
    """`GET /api/v1/state`: every region with its verdict, every record set, ramp and the events;
    with `history`, the verdict changes of the last hour (the live page's chart; its snapshot
    carries them and its events extend them, so its refreshes leave them out)."""
    verdicts = source.verdicts
    reconciler = source.reconciler
    runs, missed = source.probe_stats()
    now = source.clock()
    no_actions = why_no_actions(source)
    agents = source.agents()
    actuation = source.actuation()
    vantages = seen_vantages(source, agents)
    policy = source.config.policy.verdicts
    out = {
        "generated_at": now,
        "started_at": source.started_at,
        "vantage": source.vantage,
        "vantages": vantages,
        "stale_after": policy.stale_after,
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
                "vantages": {
                    v: cell(source.windows.by_probe(r.name), v, source.set_aside.get(v), now, policy) for v in vantages
                },
            }
            for r in source.config.regions
        ],
        "record_sets": [record_set(rs, reconciler, actuation.get(rs.key)) for rs in source.config.record_sets],
        "ramps": ramps(source.config, reconciler),
        "frozen": reconciler.frozen if reconciler is not None else None,
        # Which controller writes (guardrail 9): this one, or which other one while this stands by.
        "writer": _writer(reconciler),
        "read_only": source.config.controller.read_only,  # no operator actions: the page shows none
        # Whether operators may act here (the page offers actions), and if not, why.
        "actions": no_actions is None,
        "no_actions": no_actions,
        "events": [e.to_json() for e in source.bus.recent(RECENT_EVENTS)],
        "probe_runs": runs,
        "missed_ticks": missed,
        "agents": agents,
    }
    if history:
        # What the chart draws: when each region's verdict changed, from what to what (the reasons
        # are in the events and the logs: an hour of them would outweigh the page).
        out["verdict_history"] = [
            {"region": e.region, "at": e.at, "from": e.previous, "to": e.status}
            for e in source.verdict_log
            if e.at >= now - HISTORY
        ]
    return out


def why_no_actions(source: Observed) -> str | None:
    """Why operators cannot act on this daemon (None: they can, with the token)."""
    if source.config.controller.read_only:
        return "read-only: no actions"
    if source.reconciler is None:
        return "no record sets: no actions"
    if source.api_token() is None:
        return f"no API token (${source.config.controller.api_token_env}): no actions"
    return None


def seen_vantages(source: Observed, agents: Mapping[str, Any] | None) -> list[str]:
    """Every vantage: this controller's, each agent's (`agents`: what `Observed.agents` says),
    and any other that sent a result."""
    found = {source.vantage}
    if agents:
        found.update(agents.get("vantages") or {})
    for region in source.config.regions:
        for by_vantage in source.windows.by_probe(region.name).values():
            found.update(by_vantage)
    return [source.vantage, *sorted(found - {source.vantage})]


RECENT = 60.0  # seconds of results a vantage's cell counts


def cell(
    by_probe: Mapping[str, Mapping[str, Window]], vantage: str, set_aside: str | None, now: float, policy: VerdictPolicy
) -> dict[str, Any]:
    """What one vantage sees of one region: its newest result's age, the results and failures of
    the last minute by probe, and a word for it (`ok`, `failing`: a probe's share of successes
    below the policy's `degraded_below`, `stale`, `set aside`, `no data`). The region's verdict is
    the judge's; this is the evidence from one place."""
    windows = {probe: w for probe, w in by_probe.items() if vantage in w}
    ages = [a for w in windows.values() if (a := w[vantage].age(now)) is not None]
    newest = min(ages) if ages else None
    failing = {}
    results = 0.0
    low = False  # a probe whose share of successes is below what the policy calls degraded
    for probe, by_vantage in windows.items():
        window = by_vantage[vantage]
        count = window.count_after(now - RECENT, now)
        results += count * RECENT / min(RECENT, window.span)  # per minute, from a shorter history too
        if failures := window.failures(now, RECENT):
            failing[probe] = failures
            low = low or (count > 0 and 1 - failures / count < policy.degraded_below)
    if set_aside is not None:
        status = "set aside"
    elif newest is None:
        status = "no data"
    elif newest > policy.stale_after:
        status = "stale"
    else:
        status = "failing" if low else "ok"
    return {
        "status": status,
        "newest_age": None if newest is None else round(newest, 3),
        "results": round(results),  # in the last minute
        "failing": failing,
        "why": set_aside,
    }


def record_set(rs: RecordSet, reconciler: Reconciler | None, actuation: str | None = None) -> dict[str, Any]:
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
        # Whether its weights can move, as `/healthz` says: the last request's error, or how long
        # Route 53 has not been read (a request that hangs raises no error while it hangs).
        "actuation": actuation,
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
                "plan": policy.steps,  # the share of each step, in percent
                "step": state.step + 1,
                "steps": len(policy.steps),
                "share": policy.steps[state.step] if state.step >= 0 else 0.0,
                "bake_until": state.bake_until,
                "reason": state.reason,
                "pending": state.pending is not None,
                "gates": {
                    "start_gate": policy.start_gate,
                    "bake": policy.bake,
                    "wave_bake": policy.wave_bake,
                    "on_failure": policy.on_failure,
                },
            }
        )
    return out


def _writer(reconciler: Reconciler | None) -> dict[str, Any] | None:
    """This controller's part in the writer lease; None with no record set (nothing to write)."""
    if reconciler is None:
        return None
    holder, token = reconciler.writer if reconciler.writer is not None else (None, None)
    return {"this": reconciler.lease_token is not None, "holder": holder, "token": token, "me": reconciler.holder}


# --- the same state as text, for `regionshift status` ------------------------------------------


SYMBOLS = {"healthy": "✓", "degraded": "▲", "unhealthy": "✗", "unknown": "?"}  # never colour alone
CELL_SYMBOLS = {"ok": "✓", "failing": "✗", "stale": "?", "set aside": "⊘", "no data": "-"}


def text(state: Mapping[str, Any], url: str, now: float) -> str:
    """`GET /api/v1/state` as a terminal page: regions, record sets, ramps, agents."""
    when = datetime.fromtimestamp(state["generated_at"], UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    head = [f"regionshift at {url}", when, f"vantage {state['vantage']}"]
    if state.get("frozen"):
        frozen = state["frozen"]
        head.append(f"FROZEN by {frozen.get('by')}: {frozen.get('reason')}")
    writer = state.get("writer")
    if writer and not writer.get("this"):  # before its first look at the lease, it says only that
        holder = writer.get("holder")
        head.append(f"STANDBY: the writer is {holder} (token {writer['token']})" if holder else "writer lease not held")
    if state.get("read_only"):
        head.append("read-only")
    broker = state.get("agents") or {}
    if broker and not broker.get("connected"):  # the agents' vantages drop out of every quorum
        head.append(f"AGENTS' BROKER NOT CONNECTED ({broker.get('broker')})")
    lines = [" · ".join(head), ""]
    rows = [("REGION", "VERDICT", "FOR", "VANTAGES", "REASON")]
    for region in state["regions"]:
        verdict = region.get("verdict") or {}
        status = verdict.get("status", "unknown")
        since = verdict.get("since")
        reason = (verdict.get("reasons") or [""])[0]
        age = _age(now - since if since else None)
        seen = " ".join(f"{v} {CELL_SYMBOLS.get(c['status'], '?')}" for v, c in (region.get("vantages") or {}).items())
        rows.append((region["name"], f"{SYMBOLS.get(status, '?')} {status}", age, seen, reason))
    lines += table(rows)
    for rs in state["record_sets"]:
        why = f" ({rs['reason']})" if rs["reason"] else ""
        lines += ["", f"RECORD SET {rs['key']}  owner: {rs['owner'] or 'nobody'}{why}"]
        members = [("MEMBER", "REGION", "ROUTE 53", "DESIRED")]
        members += [
            (m["set_identifier"], m["region"], _weight(m, "observed"), _weight(m, "desired")) for m in rs["members"]
        ]
        lines += ["  " + row for row in table(members)]
        if rs.get("drift"):
            lines.append(f"  DRIFT: {rs['drift']}")
        trouble = rs.get("actuation") or (f"Route 53: {rs['error']}" if rs.get("error") else None)
        if trouble:
            lines.append(f"  ROUTE 53: {trouble.removeprefix('Route 53: ').removeprefix('Route 53 ')}")
    if state["ramps"]:
        ramps_rows = [("RAMP", "STATUS", "WAVE", "STEP", "SHARE", "BAKE LEFT", "WHY")]
        for r in state["ramps"]:
            left = r["bake_until"] - now if r.get("bake_until") else None
            ramps_rows.append(
                (
                    r["name"],
                    r["status"],
                    f"{r['wave']}/{r['waves']}",
                    f"{max(r['step'], 0)}/{r['steps']}",
                    f"{r['share']:g}%",
                    _age(left) if left is not None and left > 0 else "-",
                    r["reason"],
                )
            )
        lines += ["", *table(ramps_rows)]
    agents = (state.get("agents") or {}).get("vantages") or {}
    if agents:
        agent_rows = [("AGENT", "STATE", "NEWEST RESULT", "LAG")]
        for vantage, agent in agents.items():
            lag, newest = agent.get("lag_seconds"), _age(agent.get("last_result_age"))
            agent_rows.append((vantage, str(agent.get("state", "?")), newest, "-" if lag is None else f"{lag:.1f}s"))
        lines += ["", *table(agent_rows)]
    return "\n".join(lines)


def _weight(member: Mapping[str, Any], which: str) -> str:
    weight, share = member.get(f"{which}_weight"), member.get(f"{which}_share")
    if weight is None:
        return "-"
    return f"{weight} ({round(share, 1):g}%)" if share is not None else str(weight)  # 96.2%, 50%


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 60:  # noqa: PLR2004 - a minute
        return f"{seconds}s"
    if seconds < 3600:  # noqa: PLR2004 - an hour
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def line(cells: Sequence[str], widths: Sequence[int]) -> str:
    """One row of a text table, its cells padded to `widths`."""
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows (the first a header) as lines, each column as wide as its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [line(row, widths) for row in rows]
