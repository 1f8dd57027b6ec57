"""Which vantages to trust: a vantage that sees every region fail at once is the vantage's own
trouble (its network, its DNS, its clock), not every region's, and is set aside.

Set aside only when, for every one of those regions, it fails significantly more often than the
other vantages see it fail: when they see the regions fail too, the cause is shared (or
everything is down), no single vantage is to blame, none is set aside and the detectors see
the failures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from controller.judging.sequential import Llr, fails_more, failure_cusum_bound
from controller.judging.windows import any_failed_within, fresh_look

# What a region's view found of its probes' windows (see `RegionView.looks`): by (probe, now,
# stale_after), the fresh windows by vantage and the age of the newest result at any vantage.
Looks = dict[tuple[str, float, float], tuple[dict[str, "Window"], float | None]]

if TYPE_CHECKING:
    from collections.abc import Generator, Mapping

    from controller.judging.windows import Window, WindowStore
    from controller.settings.policy import VerdictPolicy


def set_aside_steps(
    windows: WindowStore,
    probes: Mapping[str, tuple[str, ...]],
    policy: VerdictPolicy,
    now: float,
    looks: dict[str, Looks] | None = None,
) -> Generator[None, None, dict[str, str]]:
    """Vantages to leave out of every verdict as of `now`, each with the reason; a generator that
    yields between regions and their vantages and returns them (see `Judge.steps`). What it
    found of each configured probe's windows, every vantage's (fresh ones, and the newest
    result's age), goes into `looks` by region when given, as `RegionView.looks` keeps it: the
    judge's views then need not look again (every window's age, 10,000 at 10,000 series)."""
    test = min(policy.errors, key=policy.horizon)  # the quickest: a vantage's network goes at once
    llr, span = Llr.of(test), policy.horizon(test)
    sees: dict[str, set[str]] = {}  # vantage -> regions it has fresh results for
    failing: dict[str, set[str]] = {}  # vantage -> regions whose results from it fail the test
    looked: dict[str, dict[str, list[Window]]] = {}  # region -> vantage -> its fresh windows
    horizon = now - span
    for region, names in probes.items():
        yield
        by_vantage: dict[str, list[Window]] = {}
        region_looks: Looks = {}
        by_probe = windows.by_probe(region)
        for probe in dict.fromkeys(names):
            look = region_looks[probe, now, policy.stale_after] = fresh_look(
                by_probe.get(probe, {}), now, policy.stale_after
            )
            for vantage, window in look[0].items():
                by_vantage.setdefault(vantage, []).append(window)
        if looks is not None:
            looks[region] = region_looks
        looked[region] = by_vantage
        for vantage, probe_windows in by_vantage.items():
            yield  # a region's vantages one at a time: at 10,000 series a region was 10 to 18 ms
            sees.setdefault(vantage, set()).add(region)
            # Every probe of this region from this vantage, as one stream of outcomes: its CUSUM
            # statistic from the failure times (the bound is the statistic but where results
            # share a time exactly). Walking the outcomes instead was one step of 27 ms at
            # 10,000 series (100 probes a vantage: 6,000 outcomes a minute). Most see no failure
            # over the span at all, and nothing is counted for them.
            if (
                any_failed_within(probe_windows, horizon, now)
                and failure_cusum_bound(probe_windows, now, span, llr, llr.threshold) >= llr.threshold
            ):
                failing.setdefault(vantage, set()).add(region)

    def counts(region: str, vantage: str) -> tuple[int, int]:
        """(results, failures) over the span of `region`'s probes from `vantage`: counted only for
        a vantage that fails every region it sees (almost never)."""
        found = looked[region][vantage]
        return sum(w.count_after(horizon, now) for w in found), sum(w.failures(now, span) for w in found)

    def apart(vantage: str, region: str) -> bool:
        """This vantage fails on `region` significantly more, and `min_error_ratio` times more
        often, than the other vantages pooled."""
        others = [counts(region, v) for v in looked[region] if v != vantage]
        if not others:
            return False
        pooled = (sum(c[0] for c in others), sum(c[1] for c in others))
        return fails_more(counts(region, vantage), pooled, policy.peers.significance, policy.peers.min_error_ratio)[0]

    blind = sorted(
        v
        for v, regions in sees.items()
        if len(regions) >= 2 and failing.get(v) == regions and all(apart(v, r) for r in regions)  # noqa: PLR2004
    )
    return {
        v: f"vantage {v} sees all {len(sees[v])} regions failing, far more often than the other vantages "
        "see them fail: set aside as the vantage's own trouble"
        for v in blind
    }
