"""The policy files' schema: verdict thresholds and tests, guardrails, evacuation and ramps."""

from __future__ import annotations

import itertools
import math
from typing import Annotated, Any, Literal, Self

from pydantic import Field, field_validator, model_validator

from controller.settings.model import SettingsModel
from probes.spec import Duration, Interval, Wait

# How many verdict windows of raw results the latency baselines read: a slice is complete one
# window after it ends and is summarised at the next refresh (a quarter window later); a margin
# for a refresh that comes late.
BASELINE_READS = 4

OnFailure = Literal["rollback", "step-back", "pause"]


class LatencyObjective(SettingsModel):
    quantile: float = Field(default=0.9, gt=0, lt=1)
    threshold: Duration = 1.0


class SequentialTest(SettingsModel):
    """A sequential probability ratio test on a stream of yes/no outcomes (Page's CUSUM form):
    is the bad-outcome ratio `acceptable` or `unacceptable`? It decides as soon as the evidence
    crosses ln((1 - miss_rate) / false_alarm_rate)."""

    acceptable: float = Field(gt=0, lt=1)
    unacceptable: float = Field(gt=0, lt=1)
    false_alarm_rate: float = Field(default=1e-4, gt=0, lt=0.5)
    miss_rate: float = Field(default=0.01, gt=0, lt=0.5)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.unacceptable <= self.acceptable:
            raise ValueError(f"unacceptable ({self.unacceptable}) must be above acceptable ({self.acceptable})")
        return self


class ErrorTest(SequentialTest):
    """The sequential test on failures, over the last `horizon` seconds of results (default:
    the verdict window). A test against a large `unacceptable` ratio decides within seconds on
    a big fault; one against a small ratio over a long horizon sees a small one sooner than any
    window ratio can."""

    acceptable: float = Field(default=0.001, gt=0, lt=1)
    unacceptable: float = Field(default=0.05, gt=0, lt=1)
    horizon: Duration | None = None


def _default_error_tests() -> list[ErrorTest]:
    """A quick test for big faults and a patient one for small faults (see policies/verdicts.yaml)."""
    return [
        ErrorTest(unacceptable=0.1, false_alarm_rate=1e-7),
        ErrorTest(unacceptable=0.03, false_alarm_rate=1e-8, horizon=600.0),
    ]


class SlowdownTest(SequentialTest):
    """Latency against the region's own recent past: a sample is slow when it exceeds the
    `quantile` of its (region, probe, vantage) baseline, so healthy samples are slow with
    probability 1 - quantile (the test's acceptable ratio)."""

    acceptable: float = Field(default=0.1, gt=0, lt=1)
    unacceptable: float = Field(default=0.5, gt=0, lt=1)
    false_alarm_rate: float = Field(default=1e-6, gt=0, lt=0.5)
    baseline: Duration = 1800.0
    min_baseline_samples: int = Field(default=20, ge=5)
    min_effect: float = Field(default=0.25, gt=0)

    @property
    def quantile(self) -> float:
        return 1.0 - self.acceptable


class PeerPolicy(SettingsModel):
    """How a region is compared with the other regions running the same probe."""

    significance: float = Field(default=0.003, gt=0, lt=0.5)
    min_error_ratio: float = Field(default=2.0, ge=1)


class VantagePolicy(SettingsModel):
    quorum: int = Field(default=2, ge=1)
    # A finding holds when, leaving out the quorum - 1 vantages that saw the most of it, the
    # other vantages' bad outcomes in its run would be this unlikely from a healthy target.
    agree_level: float = Field(default=0.001, gt=0, lt=0.5)


class LagPolicy(SettingsModel):
    """Replication lag limits: per source (`postgres`, `cloudwatch`...), overridden per region,
    and a trend check that breaks the limit early when lag grows fast enough to cross it soon."""

    threshold: Duration = 30.0
    sources: dict[str, Duration] = Field(default_factory=dict)  # source -> threshold
    regions: dict[str, dict[str, Duration]] = Field(default_factory=dict)  # region -> source -> threshold
    trend_over: Duration = 60.0  # the newest results the growth is fitted on
    crosses_within: Duration = 60.0  # growing to cross the threshold within this breaks it now
    min_trend_samples: int = Field(default=5, ge=3)

    def limit(self, region: str, source: str) -> float:
        return self.regions.get(region, {}).get(source, self.sources.get(source, self.threshold))


class SuspicionPolicy(SettingsModel):
    """Probe suspects harder: a failure makes its (region, probe, vantage) a suspect while the most
    patient error test's CUSUM there over `after_failure` stays above what `clear_after` passes
    leave of one lone failure, and no verdict has decided it yet; it is probed every `every` (at
    most `budget` extra runs a minute, `parallel` at once), for the runs that would clear it. Once
    it leans bad (evidence above two failures with `lean_within` passes, or its latency test at
    `slow_fraction` of its threshold and slower by the effect size) the probe at its other
    vantages and in its peers is too, for as long as it leans. While any target is a suspect the
    judge runs every `judge_every` instead of every controller tick."""

    enabled: bool = True
    after_failure: Duration = Field(default=30.0, description="a failure this recent makes a target a suspect")
    clear_after: int = Field(default=30, ge=1, le=1000, description="this many passes after one lone failure clear it")
    lean_within: int = Field(default=20, ge=0, le=1000, description="two failures with this many passes lean bad")
    every: Interval = Field(default=0.05, description="extra runs at most this often (20 per second)")
    budget: int = Field(default=300, ge=1, le=6000, description="extra runs per target per minute, at most")
    parallel: int = Field(default=4, ge=1, le=16, description="extra runs of one suspect in flight at once, at most")
    slow_fraction: float = Field(default=0.5, gt=0, le=1, description="the slowdown test this far to its threshold")
    far_slower: float = Field(default=2.0, gt=1, description="a result this many times its baseline's median")
    far_slower_runs: int = Field(default=1, ge=0, le=1000, description="extra runs each such result earns")
    judge_every: Interval = Field(default=0.25, description="the judge's tick while a suspect is probed")


class VerdictPolicy(SettingsModel):
    """Thresholds and tests that turn windows of results into a region's verdict."""

    window: Duration = 60.0
    stale_after: Duration = 30.0
    min_samples: int = Field(default=5, ge=1)
    degraded_below: float = Field(default=0.95, ge=0, le=1)
    unhealthy_below: float = Field(default=0.5, ge=0, le=1)
    down_after: int = Field(default=3, ge=1, le=100)
    latency: LatencyObjective = Field(default_factory=LatencyObjective)
    errors: list[ErrorTest] = Field(default_factory=_default_error_tests, min_length=1)
    slowdown: SlowdownTest = Field(default_factory=SlowdownTest)
    peers: PeerPolicy = Field(default_factory=PeerPolicy)
    vantages: VantagePolicy = Field(default_factory=VantagePolicy)
    recover_after: Wait = 60.0
    lag: LagPolicy = Field(default_factory=LagPolicy)
    suspicion: SuspicionPolicy = Field(default_factory=SuspicionPolicy)

    @field_validator("errors", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    def horizon(self, test: ErrorTest) -> float:
        return self.window if test.horizon is None else test.horizon

    @property
    def history(self) -> float:
        """How long windows keep results: the longest error test's horizon, or the
        `BASELINE_READS` verdict windows the latency baselines read (they summarise each slice of
        one window once it is complete, two windows back at most, and keep the summaries for
        `slowdown.baseline`: raw results are not kept that long)."""
        return max(BASELINE_READS * self.window, *(self.horizon(t) for t in self.errors))

    @model_validator(mode="after")
    def _ordered(self) -> VerdictPolicy:
        if self.unhealthy_below > self.degraded_below:
            raise ValueError(
                f"unhealthy_below ({self.unhealthy_below}) is above degraded_below ({self.degraded_below}); "
                "a region must pass through degraded before unhealthy"
            )
        if self.window <= 0 or self.stale_after <= 0:
            raise ValueError("window and stale_after must be more than zero")
        # One failure's evidence on the most patient error test fades in this many passes: a
        # suspicion's knobs past it would never clear (clear_after) or lean bad on one failure.
        patient = min(self.errors, key=lambda t: t.unacceptable)
        fades = math.log(patient.unacceptable / patient.acceptable) / -math.log(
            (1 - patient.unacceptable) / (1 - patient.acceptable)
        )
        for knob in ("clear_after", "lean_within"):
            if getattr(self.suspicion, knob) >= fades:
                raise ValueError(
                    f"suspicion.{knob} ({getattr(self.suspicion, knob)}) must be at most {math.floor(fades)}: one "
                    f"failure's evidence on the most patient error test fades in {fades:.0f} passes"
                )
        return self


class GuardrailPolicy(SettingsModel):
    """Limits that hold for every change, whoever asks for it."""

    max_step: float = Field(default=25.0, gt=0, le=100, description="percent of traffic one forward step may move")


class RampPolicy(SettingsModel):
    """Moving a record set's traffic toward new regions, wave by wave, step by step."""

    record_set: str = Field(description="name (type A) or name/TYPE of a configured record set")
    waves: list[list[str]] = Field(min_length=1, description="regions ramped together, wave after wave")
    steps: list[Annotated[float, Field(gt=0, le=100)]] = Field(
        default_factory=lambda: [1.0, 5.0, 10.0, 25.0, 50.0],
        min_length=1,
        description="percent of the record set's traffic for each target region, step by step",
    )
    bake: Wait = 600.0
    start_gate: Wait = 300.0
    wave_bake: Wait = 600.0
    on_failure: OnFailure = "rollback"
    resume_after_rollback: bool = False

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: list[float]) -> list[float]:
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError(f"steps must increase: {steps}")
        return steps

    @field_validator("waves")
    @classmethod
    def _waves(cls, waves: list[list[str]]) -> list[list[str]]:
        if not all(waves):
            raise ValueError("a wave names at least one region")
        seen: set[str] = set()
        for region in (r for wave in waves for r in wave):
            if region in seen:
                raise ValueError(f"region {region!r} is in more than one wave")
            seen.add(region)
        return waves

    @property
    def record_key(self) -> str:
        return record_key(self.record_set)


def record_key(name: str) -> str:
    """A record set's key (`NAME/TYPE`) from how a ramp or a command may name it: the key, or the
    bare name of an `A` record."""
    return name if "/" in name else f"{name.rstrip('.').lower()}/A"


class EvacuationPolicy(SettingsModel):
    """Moving share away from a degraded region, and back once it has recovered."""

    enabled: bool = True
    restore_after: Wait = Field(default=600.0, description="healthy this long before share comes back")
    step_bake: Wait = Field(
        default=0.0, description="after each step's INSYNC + TTL, wait this long before the next evacuation step"
    )
    blind_fraction: float = Field(
        default=0.5, ge=0, le=1, description="more than this share of regions unknown: blind, hold"
    )
    confirm_after: Wait = Field(
        default=30.0, description="a region degraded or unhealthy this long before its share starts to move"
    )


class Policy(SettingsModel):
    """Everything the policy files under `policies/` define, merged."""

    verdicts: VerdictPolicy = Field(default_factory=VerdictPolicy)
    guardrails: GuardrailPolicy = Field(default_factory=GuardrailPolicy)
    evacuation: EvacuationPolicy = Field(default_factory=EvacuationPolicy)
    ramps: dict[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")], RampPolicy] = Field(default_factory=dict)
