"""The detectors the daemon runs, one module each: pure functions of one region's windows (and
its peers') and the clock.

- `ThresholdDetector`: fixed limits (success ratio, latency objective, consecutive failures).
- `ErrorDetector`: a sequential test on each probe's outcomes against the acceptable error
  ratio; decides as soon as the evidence suffices.
- `SlowdownDetector`: a sequential test on latency against the region's own recent baseline,
  so a region 50% slower than usual is caught even far under any fixed objective.

Every finding must also hold for a quorum of the vantages (one vantage's bad path is not the
region's fault) and against the region's peers (the same probe in the other regions: a fault
every region shares is not held against one of them; its reasons say so instead). The probes
of a region combine one way in every detector: every probe failing is `unhealthy`, some
failing while others pass is `degraded` and named, probes not judged make it `unknown`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from controller.judging.error_rate import ErrorDetector
from controller.judging.slowdown import SlowdownDetector
from controller.judging.threshold import ThresholdDetector

if TYPE_CHECKING:
    from controller.judging.baselines import Baselines
    from controller.judging.verdicts import Detector
    from controller.settings.policy import VerdictPolicy


def detectors_for(policy: VerdictPolicy, baselines: Baselines | None = None) -> list[Detector]:
    """The detectors the daemon runs, and the benchmark beside it; `baselines` the latency
    baselines the slowdown detector keeps (the daemon's, saved in its state store)."""
    return [ThresholdDetector(policy), ErrorDetector(policy), SlowdownDetector(policy, baselines)]
