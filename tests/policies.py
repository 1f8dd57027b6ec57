"""Policies the tests share, defined once."""

from controller.settings.policy import SlowdownTest, VerdictPolicy

# A verdict policy for worlds on loopback that run for seconds: 3 s windows, one stale second.
# Loopback answers in about a millisecond, so a busy CI machine makes any of them "slower than
# usual" by a large factor: tests on it are about failures, not latency, and only count
# slowdowns of ten times the baseline.
FAST = VerdictPolicy(
    window=3,
    stale_after=1,
    min_samples=5,
    degraded_below=0.9,
    unhealthy_below=0.5,
    down_after=3,
    recover_after=1,
    slowdown=SlowdownTest(min_effect=9.0),
)
