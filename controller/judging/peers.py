"""Peers: how one region compares with the other regions running the same probe. A fault every
region shares is not held against one of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from scipy.stats import binom

from controller.judging.findings import (
    LEANING,
    samples_since,
)
from controller.judging.sequential import Llr, cusum, fails_more, failure_cusum_bound, failures_of
from controller.judging.windows import LATENCY, OK, any_failed_within, failures_in

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from controller.judging.verdicts import RegionView
    from controller.judging.windows import Sample
    from controller.settings.policy import VerdictPolicy


# A peer with fewer results than this over the compared span is not compared.
MIN_PEER_SAMPLES = 5


@dataclass(frozen=True, slots=True)
class PeerCheck:
    """How one region compares with the other regions running the same probe."""

    compared: tuple[str, ...] = ()
    worse_than: tuple[str, ...] = ()  # significantly worse, by at least the effect size
    alike: tuple[str, ...] = ()  # elevated themselves: failing or slow more than a healthy peer
    detail: dict[str, Any] = field(default_factory=dict)
    # Significantly worse (by the effect size) than the compared peers' results pooled (in the
    # threshold's down check, those of the peers not alike); None when no peer reports the
    # probe (nothing to compare with: the finding stands), or when every one compared is alike.
    apart: bool | None = None
    # The peers report the probe but have fewer than `MIN_PEER_SAMPLES` results between them
    # over the span compared, none maybe (a run of extra runs a second old): too few to tell
    # anything yet (`apart` is False meanwhile).
    waiting: bool = False
    # Peers not compared: their trouble is wider than this region's (`wider_trouble`).
    left_out: tuple[str, ...] = ()
    # A shared cause needs every compared peer alike, not half of them: for a region down as a
    # whole (every probe's last results failed; see `ThresholdDetector._down_as_a_whole`).
    every: bool = False
    # Peers alike over the whole span whose own failures stopped while this region's went on: the
    # check is of the span since their newest failure (`errors_vs_peers`).
    recovered: tuple[str, ...] = ()

    @property
    def shared(self) -> bool:
        """At least half of the peers show the same trouble: a shared cause (or the prober) is
        likelier than several regions failing apart, and evacuating one region would not help."""
        if self.every:
            return bool(self.compared) and len(self.alike) == len(self.compared)
        return bool(self.compared) and len(self.alike) * 2 >= len(self.compared)

    @property
    def regional(self) -> bool:
        """Fewer than half of the peers show the same trouble, and the region is significantly
        worse than the peers taken together (or there is none to compare with): the finding
        stands against this region. Pooled, because in the first seconds of a fault that every
        region shares, each peer has too few results of its own to look alike; pooled peers
        still tell a region failing 40% of probes apart within a few probe rounds."""
        return not self.shared and self.apart is not False

    @property
    def set_apart(self) -> bool:
        """Significantly worse than at least half of the peers (or no peers to compare): what
        a raw limit, which carries no test of its own, needs before it blames a region."""
        return self.regional and len(self.worse_than) * 2 >= len(self.compared)

    def text(self) -> str:
        said = self._text()
        if self.recovered:
            said += f" since {', '.join(self.recovered)} stopped failing"
        if self.left_out:
            said += f" (leaving out {', '.join(self.left_out)}: down, or failing where this region answers)"
        return said

    def limit_text(self) -> str:
        """`text` for a raw limit's finding, which needs `set_apart`: says why one worse than
        the peers together is not held yet."""
        if self.regional and self.apart and not self.set_apart:
            fewer = ", ".join(sorted(set(self.compared) - set(self.worse_than)))
            return f"{self.text()}, but not yet significantly worse than {fewer} one by one"
        return self.text()

    def _text(self) -> str:
        if self.shared:
            return f"like {', '.join(self.alike)}: a shared cause"
        if not self.compared:
            return "no peer result yet to compare with" if self.apart is False else "no peer region to compare with"
        if self.waiting:
            return f"too few results yet from {', '.join(self.compared)} to compare with"
        together = " together" if len(self.compared) > 1 else ""
        if self.apart is False:
            return f"not yet significantly worse than {', '.join(self.compared)}{together}"
        if self.worse_than:
            return f"worse than {', '.join(self.worse_than)}"
        if self.apart is None:
            return f"no result yet from {', '.join(self.compared)} to compare with"
        return f"worse than {', '.join(self.compared)}{together}"

    def evidence(self) -> dict[str, Any]:
        return {
            "worse_than": list(self.worse_than),
            "alike": list(self.alike),
            "apart": self.apart,
            "waiting": self.waiting,
            "left_out": list(self.left_out),
            "recovered": list(self.recovered),
            "peers": self.detail,
        }


def beyond_noise(samples: int, failures: int, acceptable: float, significance: float) -> bool:
    """Whether `failures` of `samples` are more than a healthy target (failing at `acceptable`)
    would show by chance, at `significance`."""
    return failures > 0 and float(binom.sf(failures - 1, samples, acceptable)) < significance


def pooled_apart(samples: int, test: Callable[[], bool], *, reporting: bool = False) -> bool | None:
    """The pooled comparison: None without any peer result when no peer is `reporting` (none
    has a fresh result: nothing to compare with, the finding stands), False while there are too
    few to tell (a run a second old waits a moment for its peers' results over the same span)."""
    if samples == 0 and not reporting:
        return None
    return samples >= MIN_PEER_SAMPLES and test()


def errors_vs_peers(
    view: RegionView, probe: str, since: float, now: float, policy: VerdictPolicy, llr: Llr, span: float
) -> PeerCheck:
    """Fisher's exact test (one-sided) of this region's failures against each peer's since
    `since` (within `span`), with an effect size: worse means significant and `min_error_ratio`
    times theirs. A peer is alike when its own failures lean bad on the test `llr` steps and are
    more than a healthy target's noise (binomial tail at the acceptable ratio under
    `peers.significance`), since `since`; or when its failures over the verdict window or the
    longest error horizon are more than noise, or its own test over `span` leans bad (`LEANING`
    of the threshold, its run begun at most a verdict window before this region's), unless this
    region fails significantly more there (from the earlier of the two runs' starts, for a
    leaning test): one noise failure among a hastened peer's few dozen results is not a shared
    cause; a peer sharing a fault is alike, even where this region's run starts at a burst of
    its own. Unless the peers that are alike
    have come back while this region has not (`_recovered`)."""
    significance = policy.peers.significance

    def failing(samples: int, bad: int) -> bool:
        return llr.of_counts(samples, bad) > 0 and beyond_noise(samples, bad, llr.acceptable, significance)

    look = max(policy.horizon(test) for test in policy.errors)

    def alike(peer: str, samples: int, bad: int) -> bool:
        # The span since `since` is where this region's run is worst (where its test found
        # it): under a fault every region shares, a burst of this region's failures there beside
        # two peers that happened to fail less was "worse than ap-southeast-2, eu-west-1
        # together" (a 5% fault on every region, one vantage: 2 of 4 streams blamed a region
        # within 20 minutes). Over the verdict window and the longest error test's horizon, chosen
        # by no one's failures, a peer failing beyond noise is alike too, unless this region fails
        # significantly more there as well (a peer's own mild trouble is no shared cause).
        if failing(samples, bad):
            return True
        for wide in (policy.window, look):  # the window early in a fault, the horizon later
            theirs = tally(view.peers[peer], probe, wide, now, policy)
            if failing(*theirs):
                mine = tally(view, probe, wide, now, policy)
                if not fails_more(mine, theirs, significance, policy.peers.min_error_ratio)[0]:
                    return True
        return leaning(peer)

    def leaning(peer: str) -> bool:
        # The peer's own test leaning bad (its newest run, over the test's horizon, at least
        # `LEANING` of the threshold: it shows the trouble too) from at most a verdict window
        # before this region's run, unless this region fails significantly more from the
        # earlier of the two runs' starts. A 5% fault every region shared, three vantages at
        # 1 s: ap-southeast-2 failed 4 of 29 in half a second, then eu-west-1 8 of 28 in the
        # next, and eu-west-1 was "worse than" both over its own run (where the peer had 0 of
        # 25) and not alike over the window (diluted by the minute before the onset). From the
        # earlier start, a region failing 40% for seconds is still worse than a peer with two
        # noise failures close together; and a peer's run from minutes before (a burst of its
        # own, leaning for minutes after) does not excuse a small fault that came later.
        leans = LEANING * llr.threshold
        windows = view.peers[peer].fresh_of(probe, now, policy.stale_after)
        # Walked only where its failures come close enough together to lean (most peers: none).
        if failure_cusum_bound(windows.values(), now, span, llr, leans) < leans:
            return False
        run = cusum(failures_of(windows, now, span), llr)
        if run.statistic < leans or run.since is None or run.since < since - policy.window:
            return False
        both = now - math.nextafter(min(run.since, since), -math.inf)
        mine, theirs = tally(view, probe, both, now, policy), tally(view.peers[peer], probe, both, now, policy)
        return not fails_more(mine, theirs, significance, policy.peers.min_error_ratio)[0]

    def compare(start: float, alike: Callable[[str, int, int], bool]) -> PeerCheck:
        return outcomes_vs_peers(
            view, probe, start, now, policy, span, ("error_ratio", failed), alike, wider_than=llr.acceptable
        )

    check = compare(since, alike)
    if not check.shared:
        return check
    start = _recovered(view, probe, check.alike, now, policy)
    if start is None:
        return check
    # The peers that came back are not alike there (their failing tail is in the span); the others
    # as ever.
    lately = compare(start, lambda peer, samples, bad: peer not in check.alike and failing(samples, bad))
    if not lately.set_apart or lately.apart is not True:
        return check
    return replace(lately, recovered=check.alike)


def _recovered(view: RegionView, probe: str, alike: Iterable[str], now: float, policy: VerdictPolicy) -> float | None:
    """When the peers' trouble was last seen (the earliest of their newest failures), if every
    peer in `alike` has come back while this region has not; else None.

    A fault every region shared, then one region that did not come back: its run and its window
    still held the shared failures, so it was "a shared cause" for a whole window (57 s at three
    vantages, against 3 s for the same fault alone). A peer has come back when its results since
    its newest failure, all successes, would be that many less than the error tests'
    `false_alarm_rate` (the least) if it still failed as often as this region over the verdict window,
    or as the peer did there until its newest failure, whichever is less (ratios no one's
    failures chose: this region's worst run, a burst under a fault they share, made peers look
    recovered). The span from the earliest of their newest failures holds
    a failure of every one of them: from after the newest, the peers were clean by that choice."""
    mine, my_bad = tally(view, probe, policy.window, now, policy)
    if not my_bad:
        return None
    # As rare as the error tests ask of a finding: the check runs every pass, and a peer under a
    # fault every region shares, probed 20 times a second, has thousands of failures each
    # followed by a chance of a long clean run. At `peers.significance` (0.003) a 10% fault on
    # every region, 1x10s, took both peers' runs of 55 for a recovery, and a region's burst (8
    # of 33 in 3 s) was "worse than us-east-1 since ap-southeast-2, us-east-1 stopped failing"
    # (closed loop, every region degrading, seed 2, 1,237 s in).
    rare = min(test.false_alarm_rate for test in policy.errors)
    horizon = now - policy.window
    start = math.inf
    for name in alike:
        windows = view.peers[name].fresh_of(probe, now, policy.stale_after).values()
        last = max((at for w in windows if (at := w.last_failure()) is not None), default=None)
        if last is None:
            return None
        # As often as the peer itself failed over the window up to its newest failure, if that
        # is less: a 5% fault every region shared, at 1x10s, had a region whose own burst
        # made 8.5% "worse than us-east-1 since eu-west-1, us-east-1 stopped failing", its
        # peers' clean runs of 67 (a chance of 3% each at 5%) taken for a recovery.
        theirs = sum(w.count_after(horizon, last) for w in windows)
        their_bad = failures_in(windows, last, last - horizon)
        ratio = min(my_bad / mine, their_bad / theirs if theirs else 1.0)
        clean = sum(w.count_after(last, now) for w in windows)
        if (1 - ratio) ** clean >= rare:
            return None
        start = min(start, last)
    return start if start < math.inf else None


def tally(view: RegionView, probe: str, span: float, now: float, policy: VerdictPolicy) -> tuple[int, int]:
    """(results, failures) of one probe of a region within (now - span, now], at its fresh
    vantages: `counts` of failures over a whole span, from each window's failure times and its
    count (no sample made: a finding asks it of every peer, over up to the longest horizon)."""
    windows = view.fresh_of(probe, now, policy.stale_after).values()
    return sum(w.count_after(now - span, now) for w in windows), failures_in(windows, now, span)


def failed(sample: Sample) -> bool:
    return not sample[OK]


def counts(
    view: RegionView,
    probe: str,
    since: float,
    now: float,
    policy: VerdictPolicy,
    span: float,
    is_bad: Callable[[Sample], bool],
) -> tuple[int, int]:
    """(results, bad ones) of one probe of a region since `since` (within `span`), at its fresh vantages."""
    samples = [s for w in view.fresh_of(probe, now, policy.stale_after).values() for s in w.samples(now, span)]
    recent = samples_since(samples, since)
    return len(recent), sum(1 for s in recent if is_bad(s))


def wider_trouble(
    view: RegionView,
    peer: RegionView,
    probe: str,
    since: float,
    now: float,
    policy: VerdictPolicy,
    span: float,
    acceptable: float,
) -> str | None:
    """Why `peer`'s trouble is wider than this region's, or None. Wider: it fails a probe besides
    `probe` beyond a healthy target's noise (at `acceptable`) since `since`, and significantly
    more often than this region, which answers it (Fisher's test at `peers.significance`, with
    `min_error_ratio`: under a fault every region shares, one region's few failures more are
    not a wider trouble); or it is down on `probe` itself and fails it significantly more often.
    A region down as a whole, or coming back from it, shows nothing of a cause the two share:
    counted as alike, one made another failing 40% of a path `healthy` ("a shared cause") for
    as long as its outage lasted and the window after. None for a peer failing the same probes
    as this region, or everything as this region does: it may well share its cause."""
    significance, ratio = policy.peers.significance, policy.peers.min_error_ratio
    # The samples `counts` reads are those from `since` (inclusive) within `span`: a peer whose
    # windows kept no failure there is passed over from their failure times alone, with no
    # sample made. A finding asks this of every peer and every other probe each pass (50
    # probes in 40 regions: 100,000 counts a pass during a fault, nearly all of peers with none).
    after = max(math.nextafter(since, -math.inf), now - span)
    for other in peer.probes:
        if other == probe or other not in view.probes:
            continue
        if not any_failed_within(peer.fresh_of(other, now, policy.stale_after).values(), after, now):
            continue
        theirs = counts(peer, other, since, now, policy, span, failed)
        if not beyond_noise(*theirs, acceptable, significance):
            continue
        mine = counts(view, other, since, now, policy, span, failed)
        if mine[0] and fails_more(theirs, mine, significance, ratio)[0]:
            return f"fails {other} too, which {view.region} answers"
    # The same probe, down there (its last results all failed, at every vantage) and failing
    # significantly more than here: a region down with one probe (a single-path service) made
    # another failing half of it "a shared cause" for as long as it was down.
    fresh = peer.fresh_of(probe, now, policy.stale_after)
    if fresh and all(w.last_failed(policy.down_after, now, span) for w in fresh.values()):
        theirs = counts(peer, probe, since, now, policy, span, failed)
        mine = counts(view, probe, since, now, policy, span, failed)
        if mine[0] and fails_more(theirs, mine, significance, ratio)[0]:
            return f"down: fails {probe} far more often than {view.region}"
    return None


def slower_vs_peers(
    view: RegionView, probe: str, now: float, policy: VerdictPolicy, alike: Callable[[str], bool]
) -> PeerCheck:
    """The latency objective's finding against the peers over the verdict window: the same
    test as for failures, on the results slower than the objective's threshold (a failure is
    not counted: it has no latency). One slow result among a handful (a spike at a 10 s
    interval) is not significant; the objective's quantile alone would blame a region for it.
    A peer is alike when it breaks the objective too (`alike(peer)`)."""
    limit = policy.latency.threshold

    def peer_alike(name: str, _samples: int, _bad: int) -> bool:
        return alike(name)

    slower = ("slow_ratio", lambda s: s[OK] and s[LATENCY] > limit)
    return outcomes_vs_peers(view, probe, now - policy.window, now, policy, policy.window, slower, peer_alike)


def outcomes_vs_peers(
    view: RegionView,
    probe: str,
    since: float,
    now: float,
    policy: VerdictPolicy,
    span: float,
    bad_outcome: tuple[str, Callable[[Sample], bool]],
    alike: Callable[[str, int, int], bool],
    wider_than: float | None = None,
) -> PeerCheck:
    """Fisher's exact test (one-sided) of this region's bad outcomes (`bad_outcome`: the name
    of their ratio in the evidence, and which results are bad) against each peer's since
    `since` (within `span`), with an effect size: worse means significant and
    `min_error_ratio` times theirs; and against the peers pooled (`apart`). `alike(peer,
    samples, bad)` says whether a peer shows the same trouble. With `wider_than` (a healthy
    target's error ratio), a peer whose trouble is wider than this region's is left out
    (`wider_trouble`)."""
    ratio_name, is_bad = bad_outcome
    n, bad = counts(view, probe, since, now, policy, span, is_bad)
    if n == 0:
        return PeerCheck()

    def worse(theirs: int, their_bad: int) -> tuple[bool, float]:
        return fails_more((n, bad), (theirs, their_bad), policy.peers.significance, policy.peers.min_error_ratio)

    compared, worse_than, alike_peers, left_out = [], [], [], []
    detail: dict[str, Any] = {}
    total, total_bad = 0, 0
    reporting = False  # a peer has fresh results, though maybe none since `since` yet
    for name, peer in sorted(view.peers.items()):
        if probe not in peer.probes:
            continue
        if wider_than is not None and (other := wider_trouble(view, peer, probe, since, now, policy, span, wider_than)):
            left_out.append(name)
            detail[name] = {"left_out": other}
            continue
        pn, pbad = counts(peer, probe, since, now, policy, span, is_bad)
        compared.append(name)
        total, total_bad = total + pn, total_bad + pbad
        reporting = reporting or bool(pn or peer.fresh_of(probe, now, policy.stale_after))
        if pn < MIN_PEER_SAMPLES:
            continue
        if alike(name, pn, pbad):
            alike_peers.append(name)
        is_worse, p_value = worse(pn, pbad)
        detail[name] = {ratio_name: round(pbad / pn, 4), "samples": pn, "p_value": round(p_value, 6)}
        if is_worse:
            worse_than.append(name)
    # A run of this region's that began a moment ago, its extra runs close together, may hold
    # no peer result yet: it waits for them (the peers of a suspect leaning bad are probed
    # harder too), as a peer that has not failed yet may be about to. Held at once, a shared
    # 40% fault had the first region to fail three times in a row blamed 0.7 s after its onset.
    apart = pooled_apart(total, lambda: worse(total, total_bad)[0], reporting=reporting)
    waiting = total < MIN_PEER_SAMPLES and reporting
    return PeerCheck(tuple(compared), tuple(worse_than), tuple(alike_peers), detail, apart, waiting, tuple(left_out))
