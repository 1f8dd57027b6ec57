"""Which vantages to trust: a vantage that sees every region fail at once is the vantage's own
trouble (its network, its DNS, its clock), not every region's, and is set aside.

Set aside only while some other vantage still sees at least one region working: when every
vantage sees every region fail, the cause is shared (or everything is down) and no single
vantage is to blame, so none is set aside and the detectors see the failures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from controller.sequential import Llr, cusum, failures

if TYPE_CHECKING:
    from collections.abc import Mapping

    from controller.config import VerdictPolicy
    from controller.windows import Window, WindowStore


def set_aside(
    windows: WindowStore, probes: Mapping[str, tuple[str, ...]], policy: VerdictPolicy, now: float
) -> dict[str, str]:
    """Vantages to leave out of every verdict as of `now`, each with the reason."""
    llr = Llr.of(policy.errors)
    sees: dict[str, set[str]] = {}  # vantage -> regions it has fresh results for
    failing: dict[str, set[str]] = {}  # vantage -> regions whose results from it fail the test
    for region, names in probes.items():
        by_vantage: dict[str, dict[str, Window]] = {}
        for (probe, vantage), window in windows.region(region).items():
            age = window.age(now)
            if probe in names and age is not None and age <= policy.stale_after:
                by_vantage.setdefault(vantage, {})[probe] = window
        for vantage, probe_windows in by_vantage.items():
            sees.setdefault(vantage, set()).add(region)
            if any(w.failures(now, policy.window) for w in probe_windows.values()):
                samples = {p: w.samples(now, policy.window) for p, w in probe_windows.items()}
                # Every probe of this region from this vantage, as one stream of outcomes.
                events = failures({f"{vantage}/{p}": seq for p, seq in samples.items()})
                if cusum(events, llr).tripped:
                    failing.setdefault(vantage, set()).add(region)
    blind = {v for v, regions in sees.items() if len(regions) >= 2 and failing.get(v) == regions}  # noqa: PLR2004
    seeing = sorted(v for v, regions in sees.items() if failing.get(v, set()) != regions)
    if not seeing:
        return {}
    return {
        v: f"vantage {v} sees all {len(sees[v])} regions failing while {', '.join(seeing)} "
        "still sees some working: set aside as the vantage's own trouble"
        for v in sorted(blind)
    }
