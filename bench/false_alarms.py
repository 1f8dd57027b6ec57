"""False trips of the shipped error tests on healthy noise: how many results a CUSUM of a healthy
target's outcomes runs, on average, before it crosses a test's threshold by chance, and what
that makes a week at a given number of results.

Run:  .venv/bin/python bench/false_alarms.py [--failures 100000000] [--rate 3] [--tests 6] [--seed 1]
                                             [--policy policies/verdicts.yaml]

Each test of `policies/verdicts.yaml`'s `errors` is run on `--failures` failures of a target
failing at the test's `acceptable` ratio at random (the gaps between failures drawn at once,
geometric), its statistic carried from failure to failure (a success takes `good` off, never
below zero, a failure adds `bad`) and started over at each trip. At least threshold / -good
successes in a row leave nothing of what came before them, so only runs of failures with fewer
between them are walked one by one (exact: the statistic is never cut short). The judge's tests
look back over a horizon (the verdict window, the patient test's 10 minutes), which can only
drop trips: the figures are upper bounds.
Printed per test: its threshold, the trips, the results simulated, the average run to a trip,
and the false trips a week at `--rate` results a second per probe (3: three vantages, each
probing once a second) over `--tests` probes (6: the detection bench's 3 regions x 2 probes),
before the quorum and peer checks (which hold only part of them). Simulated: the figures do not
depend on the machine (about 2 minutes on one core with the defaults).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.judging.sequential import Llr
from controller.settings.loading import ConfigError, load_policy

POLICY_FILE = Path(__file__).resolve().parent.parent / "policies" / "verdicts.yaml"
CHUNK = 10_000_000  # failures drawn at once
WEEK = 7 * 86_400


def trips(llr: Llr, failures: int, rng: np.random.Generator) -> tuple[int, int]:
    """(trips, results) over `failures` failures of healthy noise."""
    reach = llr.threshold / -llr.good  # this many successes leave no statistic behind them
    need = math.ceil(llr.threshold / llr.bad)  # fewer failures in a run cannot trip
    found, results, drawn, carried = 0, 0, 0, 0.0
    while drawn < failures:
        gaps = rng.geometric(llr.acceptable, size=min(CHUNK, failures - drawn))  # results to the next failure
        drawn += len(gaps)
        results += int(gaps.sum())
        # Runs of failures, each from one with at least `reach` successes before it (nothing
        # behind it) to the next such; the first and last runs of a chunk are walked whatever
        # their length, the statistic carried from one chunk to the next.
        starts = np.union1d([0], np.flatnonzero(gaps - 1 >= reach))
        ends = np.append(starts[1:], len(gaps))
        walked = ends - starts >= need
        walked[0] = walked[-1] = True
        for start, end in zip(starts[walked].tolist(), ends[walked].tolist(), strict=True):
            statistic = carried if start == 0 else 0.0
            for gap in gaps[start:end].tolist():
                statistic = max(0.0, statistic + llr.good * (gap - 1)) + llr.bad
                if statistic >= llr.threshold:
                    found += 1
                    statistic = 0.0
            carried = statistic
    return found, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--failures", type=int, default=100_000_000, help="failures simulated per test")
    parser.add_argument("--rate", type=float, default=3.0, help="results a second per probe")
    parser.add_argument("--tests", type=int, default=6, help="probes tested (regions x probes)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--policy", type=Path, default=POLICY_FILE, help="a policy file (default: the shipped one)")
    args = parser.parse_args()
    if args.failures < 1 or args.tests < 1 or args.seed < 0 or not (0 < args.rate < math.inf):
        parser.error("--failures and --tests must be at least 1, --seed at least 0, --rate a number above 0")
    try:
        policy = load_policy([args.policy])[0].verdicts
    except ConfigError as error:
        parser.error(str(error))
    rng = np.random.default_rng(args.seed)
    print(f"false trips on healthy noise: the error tests of {args.policy}, {args.failures:,} failures each")
    print(f"{'test':<26} {'threshold':>9} {'trips':>6} {'results':>9} {'run to a trip':>14} {'a week':>8}")
    week = args.rate * args.tests * WEEK
    for test in policy.errors:
        llr = Llr.of(test)
        found, results = trips(llr, args.failures, rng)
        run = results / found if found else math.inf
        name = f"{test.acceptable:g} vs {test.unacceptable:g} at {test.false_alarm_rate:g}"
        shown = f"{run:.2g}" if found else f"> {results:.2g}"
        a_week = f"{week / run:.2g}" if found else f"< {week / results:.2g}"  # none: fewer than one in all
        print(f"{name:<26} {llr.threshold:>9.2f} {found:>6} {results:>9.2g} {shown:>14} {a_week:>8}")
    print(f"a week: {week:.3g} results ({args.rate:g}/s per probe x {args.tests} probes), before quorum and peers")


if __name__ == "__main__":
    main()
