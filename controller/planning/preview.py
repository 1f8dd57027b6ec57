"""`regionshift plan`: every step of a ramp, as it would be written, before anything is."""

from __future__ import annotations

from typing import TYPE_CHECKING

from controller.planning.guardrails import moved_share
from controller.planning.ramps import step_weights
from controller.planning.weights import shares
from controller.settings.limits import SHARE_EPSILON
from controller.settings.loading import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from controller.settings.policy import RampPolicy
    from controller.settings.schema import Config, RecordSet


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((hours, "h"), (minutes, "m"), (secs, "s")) if v) or "0s"


def ramp_steps(
    policy: RampPolicy, rs: RecordSet, weights: Mapping[str, int]
) -> Iterator[tuple[int, int, dict[str, int], float]]:
    """Every step of a ramp from `weights`, in order: (wave, step, its weights, the share it moves)."""
    current = dict(weights)
    for w in range(len(policy.waves)):
        base = dict(current)
        for i in range(len(policy.steps)):
            new = step_weights(policy, rs, base, w, i)
            yield w, i, new, moved_share(current, new)
            current = new


def check_ramps(config: Config) -> None:
    """Each ramp, stepped from its record set's configured weights (where every member has one),
    moves at most `guardrails.max_step` a step: the load-time check counts from a target at 0%,
    and a target configured with share already (its first step takes that share away, onto the
    others) passed `validate` and `plan`, then had every step refused once started."""
    max_step = config.policy.guardrails.max_step
    for name, policy in config.policy.ramps.items():
        rs = next(r for r in config.record_sets if r.key == policy.record_key)
        weights = rs.configured_weights
        if weights is None:
            continue
        for w, i, _new, moved in ramp_steps(policy, rs, weights):
            if moved > max_step + SHARE_EPSILON:
                held = " ".join(f"{sid}={weight}" for sid, weight in weights.items())
                raise ConfigError(
                    f"ramps.{name}: step {w + 1}.{i + 1} (to {policy.steps[i]:g}%) moves {moved:.1f}% of traffic "
                    f"at once from the configured weights of {rs.key} ({held}), more than guardrails.max_step "
                    f"{max_step:g}%: a target that holds share already gives it up at its first step; "
                    "see `regionshift plan`"
                )


def format_plan(config: Config, name: str) -> str:
    policy = config.policy.ramps.get(name)
    if policy is None:
        known = ", ".join(config.policy.ramps) or "none"
        raise ConfigError(f"no ramp named {name!r} in the policy files; known: {known}")
    rs = next(r for r in config.record_sets if r.key == policy.record_key)
    configured = rs.configured_weights
    if configured is None:
        missing = ", ".join(m.set_identifier for m in rs.members if m.weight is None)
        raise ConfigError(f"{rs.key}: plan starts from the configured weights; give every member a weight ({missing})")
    weights = configured
    sids = [m.set_identifier for m in rs.members]
    region_of = {m.set_identifier: m.region for m in rs.members}
    lines = [
        (
            f"ramp {name}: {rs.key}, {len(policy.waves)} wave(s), {len(policy.steps)} steps each, "
            f"bake {_duration(policy.bake)} after INSYNC + TTL {rs.ttl}s, on failure: {policy.on_failure}"
        ),
        (
            f"max_step {config.policy.guardrails.max_step:g}%; a step's bake starts once Route 53 reports INSYNC "
            "(usually within 60s) plus the TTL"
        ),
        "",
    ]
    rows: list[tuple[str, ...]] = [
        ("STEP", "TARGETS", "WEIGHTS", "SHARE: INTENDED -> ACHIEVED", "MOVES", "EARLIEST START")
    ]

    def row(
        label: str, targets: str, w: dict[str, int], intended: dict[str, float], moves: str, when: str
    ) -> tuple[str, ...]:
        achieved = shares(w)
        ws = " ".join(f"{sid}={w[sid]}" for sid in sids)
        sh = "  ".join(
            f"{region_of[sid]} {intended[sid]:g}->{achieved[sid]:.2f}%"
            if sid in intended
            else f"{region_of[sid]} {achieved[sid]:.2f}%"
            for sid in sids
        )
        return (label, targets, ws, sh, moves, when)

    rows.append(row("baseline", "-", weights, {}, "-", "now"))
    elapsed = 0.0
    for w, i, new, moved in ramp_steps(policy, rs, weights):
        wave, share = policy.waves[w], policy.steps[i]
        elapsed += (policy.start_gate if w == 0 else policy.wave_bake) if i == 0 else 0.0
        intended = {sid: share for sid in sids if region_of[sid] in wave}
        when = f"+{_duration(elapsed)}" + (" (start gate)" if i == 0 and w == 0 else " (wave bake)" if i == 0 else "")
        rows.append(row(f"{w + 1}.{i + 1}", ", ".join(wave), new, intended, f"{moved:.1f}%", when))
        elapsed += rs.ttl + policy.bake
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(wd) for c, wd in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(
        f"\ndone at the earliest +{_duration(elapsed)} after start (plus INSYNC time per step); nothing was sent"
    )
    return "\n".join(lines)
