"""Suspects: the targets whose evidence leans toward a finding that no verdict has decided yet.

A rare failure needs samples to show: at a fixed rate, a 15% fault takes half a minute to build
evidence at one probe a second. Probing a suspect harder spends samples where the evidence is.
This module only says which targets are suspects and why (pure, like every detector); the
scheduler runs the extra probes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from controller.judging.verdicts import Verdict
    from controller.judging.windows import WindowStore
    from controller.settings.policy import SuspicionPolicy

# A region in one of these holds its troubled probes: decided, no extra samples needed.
_DECIDED = frozenset({"degraded", "unhealthy"})


def suspects(
    windows: WindowStore,
    probes: Mapping[str, Sequence[str]],
    verdicts: Mapping[str, Verdict],
    now: float,
    policy: SuspicionPolicy,
) -> dict[tuple[str, str], str]:
    """(region, probe) -> why, for each probe with a failure in the last `after_failure` followed by
    fewer than `clear_after` passes, that the region's verdict does not already hold against it;
    and for the same probe in its peers."""
    if not policy.enabled:
        return {}
    newest: dict[tuple[str, str], tuple[float, str]] = {}
    for region, names in probes.items():
        verdict = verdicts.get(region)
        held = verdict.troubles if verdict is not None and verdict.status in _DECIDED else frozenset()
        for (probe, vantage), window in windows.region(region).items():
            last = window.last_failure()
            if probe in held or probe not in names or last is None or not 0 <= now - last <= policy.after_failure:
                continue
            if window.passes_since_failure(policy.clear_after) >= policy.clear_after:
                continue  # the evidence decided healthy: one failure among many passes is noise
            if (region, probe) not in newest or last > newest[region, probe][0]:
                newest[region, probe] = (last, vantage)
    found = {key: f"failed {now - at:.1f}s ago at {vantage}" for key, (at, vantage) in newest.items()}
    # The peers running the same probe are probed harder too: a suspect is judged against them over
    # the same span, and a cause they share shows only in samples taken at the same time.
    for region, probe in list(found):
        for peer, names in probes.items():
            if peer != region and probe in names and (peer, probe) not in found:
                found[peer, probe] = f"peer of {region}, a suspect"
    return found
