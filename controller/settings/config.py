"""The configuration file: regions, Route 53 record sets, probes per region, and policy files.

One YAML file, validated whole by pydantic before anything runs. Every mistake becomes a
`ConfigError` whose message names the file, the line, the field path and what to do about it,
so `regionshift validate` can print it and exit 2 without a traceback.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from probes.spec import Duration, HttpProbe, ProbeSpec, TcpProbe

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from pydantic_core import ErrorDetails

RegionType = Literal["full", "lightweight", "read-only"]
MAX_WEIGHT = 255
MAX_TTL = 2_147_483_647  # Route 53's limit, seconds
MAX_WEIGHTED_RECORDS = 100  # per name and type


class ConfigError(Exception):
    """A user's mistake in a configuration or policy file; the message is meant for them."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- policy ---------------------------------------------------------------------------------


class LatencyObjective(_Model):
    quantile: float = Field(default=0.9, gt=0, lt=1)
    threshold: Duration = 1.0


class SequentialTest(_Model):
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
        ErrorTest(unacceptable=0.03, false_alarm_rate=1e-6, horizon=600.0),
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


class PeerPolicy(_Model):
    """How a region is compared with the other regions running the same probe."""

    significance: float = Field(default=0.003, gt=0, lt=0.5)
    min_error_ratio: float = Field(default=2.0, ge=1)


class VantagePolicy(_Model):
    quorum: int = Field(default=2, ge=1)
    # A finding holds when, leaving out the quorum - 1 vantages that saw the most of it, the
    # other vantages' bad outcomes in its run would be this unlikely from a healthy target.
    agree_level: float = Field(default=0.001, gt=0, lt=0.5)


class LagPolicy(_Model):
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


class VerdictPolicy(_Model):
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
    recover_after: Duration = 60.0
    lag: LagPolicy = Field(default_factory=LagPolicy)

    @field_validator("errors", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    def horizon(self, test: ErrorTest) -> float:
        return self.window if test.horizon is None else test.horizon

    @property
    def history(self) -> float:
        """How long windows keep results: the latency baseline, which ends up to two verdict
        windows back (see `detectors.Baselines`), or the longest error test's horizon."""
        return max(self.slowdown.baseline + 2 * self.window, *(self.horizon(t) for t in self.errors))

    @model_validator(mode="after")
    def _ordered(self) -> VerdictPolicy:
        if self.unhealthy_below > self.degraded_below:
            raise ValueError(
                f"unhealthy_below ({self.unhealthy_below}) is above degraded_below ({self.degraded_below}); "
                "a region must pass through degraded before unhealthy"
            )
        if self.window <= 0 or self.stale_after <= 0:
            raise ValueError("window and stale_after must be more than zero")
        return self


class GuardrailPolicy(_Model):
    """Limits that hold for every change, whoever asks for it."""

    max_step: float = Field(default=25.0, gt=0, le=100, description="percent of traffic one forward step may move")


OnFailure = Literal["rollback", "step-back", "pause"]


class RampPolicy(_Model):
    """Moving a record set's traffic toward new regions, wave by wave, step by step."""

    record_set: str = Field(description="name (type A) or name/TYPE of a configured record set")
    waves: list[list[str]] = Field(min_length=1, description="regions ramped together, wave after wave")
    steps: list[Annotated[float, Field(gt=0, le=100)]] = Field(
        default_factory=lambda: [1.0, 5.0, 10.0, 25.0, 50.0],
        min_length=1,
        description="percent of the record set's traffic for each target region, step by step",
    )
    bake: Duration = 600.0
    start_gate: Duration = 300.0
    wave_bake: Duration = 600.0
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
        return self.record_set if "/" in self.record_set else f"{self.record_set.rstrip('.').lower()}/A"


class EvacuationPolicy(_Model):
    """Moving share away from a degraded region, and back once it has recovered."""

    enabled: bool = True
    restore_after: Duration = Field(default=600.0, description="healthy this long before share comes back")
    step_bake: Duration = Field(
        default=0.0, description="after each step's INSYNC + TTL, wait this long before the next evacuation step"
    )
    blind_fraction: float = Field(
        default=0.5, ge=0, le=1, description="more than this share of regions unknown: blind, hold"
    )
    confirm_after: Duration = Field(
        default=30.0, description="a region degraded or unhealthy this long before its share starts to move"
    )


class Policy(_Model):
    """Everything the policy files under `policies/` define, merged."""

    verdicts: VerdictPolicy = Field(default_factory=VerdictPolicy)
    guardrails: GuardrailPolicy = Field(default_factory=GuardrailPolicy)
    evacuation: EvacuationPolicy = Field(default_factory=EvacuationPolicy)
    ramps: dict[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")], RampPolicy] = Field(default_factory=dict)


# --- configuration --------------------------------------------------------------------------

REGION_NAME = r"^[a-z0-9][a-z0-9-]{0,62}$"


class Region(_Model):
    name: str = Field(pattern=REGION_NAME)
    type: RegionType = "full"
    residency: str | None = Field(default=None, min_length=1, max_length=32)
    max_share: float = Field(default=100.0, gt=0, le=100, description="percent of a record set, at most")
    probes: list[ProbeSpec] = Field(default_factory=list)

    @field_validator("probes")
    @classmethod
    def _unique_probe_names(cls, probes: list[ProbeSpec]) -> list[ProbeSpec]:
        _no_duplicates([p.name for p in probes], "probe name")
        return probes


class Member(_Model):
    set_identifier: str = Field(min_length=1, max_length=128)
    region: str
    value: str = Field(min_length=1)
    weight: int | None = Field(default=None, ge=0, le=MAX_WEIGHT, description="initial weight 0..255")


class RecordSet(_Model):
    zone_id: str = Field(pattern=r"^[A-Z0-9]{1,32}$")
    name: str = Field(min_length=1, max_length=255)
    type: Literal["A", "AAAA", "CNAME", "TXT", "MX", "SRV", "CAA", "NS", "PTR", "SPF", "NAPTR", "DS"] = "A"
    ttl: int = Field(default=60, ge=0, le=MAX_TTL)
    residency: str | None = None
    takes_writes: bool = True
    members: list[Member] = Field(min_length=1, max_length=MAX_WEIGHTED_RECORDS)

    @field_validator("name")
    @classmethod
    def _fqdn(cls, name: str) -> str:
        if not re.fullmatch(r"(\*\.)?([A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.?", name):
            raise ValueError(f"{name!r} is not a DNS name like 'api.example.com'")
        return name.rstrip(".").lower()

    @field_validator("members")
    @classmethod
    def _members(cls, members: list[Member]) -> list[Member]:
        _no_duplicates([m.set_identifier for m in members], "set_identifier", "set_identifier")
        weights = [m.weight for m in members if m.weight is not None]
        if weights and len(weights) == len(members) and not any(weights):
            raise ValueError(
                "every member has weight 0; Route 53 answers an all-zero group as if all weights were "
                "equal: give at least one member a weight above 0"
            )
        return members

    @property
    def key(self) -> str:
        return f"{self.name}/{self.type}"


class Route53Settings(_Model):
    """How the actuator reaches Route 53."""

    endpoint_url: str | None = Field(default=None, description="only for a local Route 53 (moto_server)")
    dry_run: bool = Field(default=False, description="log each batch, send nothing")
    reconcile_every: Duration = Field(default=10.0, description="how often observed and desired weights are compared")
    poll_interval: Duration = 2.0
    insync_timeout: Duration = 300.0
    max_attempts: int = Field(default=8, ge=1, le=50, description="tries per Route 53 request while retryable")
    lease_ttl: Duration = Field(default=30.0, description="writer lease lifetime; a standby takes over after it")


class ControllerSettings(_Model):
    vantage: str = Field(default="controller", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    listen: str = Field(default="127.0.0.1:9181", description="host:port of the HTTP API; port 0 picks one")
    tick: Duration = Field(default=1.0, description="how often verdicts are recomputed")
    max_concurrency: int = Field(default=64, ge=1, le=10_000)
    jitter: float = Field(default=0.1, ge=0, lt=0.5, description="fraction of the interval")
    state_path: str = Field(default="regionshift.sqlite", description="SQLite state, relative to this file")
    api_token_env: str = Field(
        default="REGIONSHIFT_API_TOKEN", description="environment variable holding the operators' bearer token"
    )
    route53: Route53Settings = Field(default_factory=Route53Settings)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:  # noqa: PLR2004 - port range
            raise ValueError(f"{value!r} is not host:port, e.g. '127.0.0.1:9181'")
        return value

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class Config(_Model):
    controller: ControllerSettings = Field(default_factory=ControllerSettings)
    regions: list[Region] = Field(min_length=1)
    record_sets: list[RecordSet] = Field(default_factory=list)
    policies: list[str] = Field(default_factory=list, description="policy files, relative to this file")
    # Filled by the loader from `policies`, never written in the file itself.
    policy: Policy = Field(default_factory=Policy, exclude=True)
    base_dir: str = Field(default=".", exclude=True)

    @property
    def state_file(self) -> Path:
        return Path(self.base_dir) / self.controller.state_path

    @field_validator("regions")
    @classmethod
    def _unique_regions(cls, regions: list[Region]) -> list[Region]:
        _no_duplicates([r.name for r in regions], "region name")
        return regions

    @field_validator("record_sets")
    @classmethod
    def _unique_record_sets(cls, record_sets: list[RecordSet]) -> list[RecordSet]:
        _no_duplicates([rs.key for rs in record_sets], "record set (name/type)")
        return record_sets

    @model_validator(mode="after")
    def _record_sets_fit_regions(self) -> Config:
        regions = {r.name: r for r in self.regions}
        for i, rs in enumerate(self.record_sets):
            for j, member in enumerate(rs.members):
                where = f"record_sets[{i}].members[{j}].region"
                region = regions.get(member.region)
                if region is None:
                    raise _LocatedError(where, f"unknown region {member.region!r}; known: {', '.join(regions)}")
                if rs.residency is not None and region.residency != rs.residency:
                    raise _LocatedError(
                        where,
                        f"region {region.name!r} has residency {region.residency!r} but the record set "
                        f"{rs.name!r} keeps residency {rs.residency!r}: only regions of that residency may serve it",
                    )
                if rs.takes_writes and region.type == "read-only":
                    raise _LocatedError(
                        where,
                        f"region {region.name!r} is read-only and {rs.name!r} takes writes; "
                        "set takes_writes: false or use another region",
                    )
        return self

    def region(self, name: str) -> Region:
        return next(r for r in self.regions if r.name == name)


class _LocatedError(ValueError):
    """A cross-field error that knows which field it belongs to."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


def _no_duplicates(names: Sequence[str], what: str, field: str = "name") -> None:
    """Raise at the second occurrence, located relative to the list (e.g. `[2].name`)."""
    first: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in first:
            raise _LocatedError(
                f"[{index}].{field}", f"duplicate {what} {name!r} (also at [{first[name]}]): each must appear once"
            )
        first[name] = index


# --- loading --------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; in a config that hides a mistake."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:  # noqa: FBT001, FBT002
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"found the key {key!r} twice (first on line {seen[key].start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, what: str) -> tuple[Any, yaml.Node | None]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a {what} file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the {what} file: {exc}") from None
    loader = _UniqueKeyLoader(text)
    try:
        # One parse: the node tree locates errors by line, the data is built from the same tree.
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = " ".join(filter(None, [exc.context, exc.problem]))
        raise ConfigError(f"{path}{line}: not valid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    return data, node


def _line_of(node: yaml.Node | None, loc: Sequence[int | str]) -> int | None:
    """The line (1-based) of the deepest YAML node along `loc` that exists."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            node = match[1]
            line = match[0].start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _dotted(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


# Probe kinds by their `kind:` tag; pydantic puts the tag in error locations, not a field name.
_PROBE_KINDS: dict[str, type[BaseModel]] = {"http": HttpProbe, "tcp": TcpProbe}
_KIND_LIST = ", ".join(_PROBE_KINDS)


def _explain(error: ErrorDetails, model: type[BaseModel], loc: list[int | str]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        hint = f"; allowed here: {', '.join(allowed)}" if allowed else ""
        return f"unknown key {loc[-1]!r}{hint}"
    if kind == "missing":
        return "required but missing"
    if kind == "union_tag_invalid":
        given = error["input"].get("kind") if isinstance(error["input"], dict) else error["input"]
        return f"unknown probe kind {given!r}; use one of: {_KIND_LIST}"
    if kind == "union_tag_not_found":
        return f"a probe needs `kind:` (one of: {_KIND_LIST})"
    message = error["msg"].removeprefix("Value error, ")
    shown = error.get("input")
    if kind not in ("value_error", "assertion_error") and not isinstance(shown, dict | list):
        message += f" (got {shown!r})"
    return message


def _allowed_keys(model: type[BaseModel], loc: Sequence[int | str]) -> list[str]:
    """Field names of the model found by walking `loc` through `model`'s fields."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if part in _PROBE_KINDS:
            current = _PROBE_KINDS[part]
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        current = _inner_model(fields[part].annotation)
    fields = getattr(current, "model_fields", None)
    return [name for name, f in (fields or {}).items() if not f.exclude] if fields else []


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _validate(model: type[BaseModel], data: Any, path: Path, node: yaml.Node | None, what: str) -> Any:
    if data is None:
        raise ConfigError(f"{path}: the {what} file is empty; see deploy/regionshift.example.yaml for a start")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the {what} file must be a mapping of keys to values, not a {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False):
            loc = [p for p in error["loc"] if p not in _PROBE_KINDS]
            ctx_error = (error.get("ctx") or {}).get("error")
            if isinstance(ctx_error, _LocatedError):  # a path relative to where the validator ran
                loc = loc + _parse_dotted(ctx_error.path)
            line = _line_of(node, loc)
            where = f"{path}:{line}" if line else str(path)
            lines.append(f"{where}: {_dotted(loc)}: {_explain(error, model, list(error['loc']))}")
        raise ConfigError("\n".join(lines)) from None


def _parse_dotted(text: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", text)]


def load_policy(paths: Sequence[Path]) -> tuple[Policy, dict[str, tuple[Path, yaml.Node | None]]]:
    """Merge policy files; a section defined in two files is an error naming both.

    Returns the policy and, per section, the file (and its YAML tree) that defined it.
    """
    merged: dict[str, Any] = {}
    sources: dict[str, tuple[Path, yaml.Node | None]] = {}
    for path in paths:
        data, node = _read_yaml(path, "policy")
        if data is None:
            continue
        policy = _validate(Policy, data, path, node, "policy")
        for section in data:
            if section in sources:
                raise ConfigError(
                    f"{path}: section {section!r} is also defined in {sources[section][0]}; define it once"
                )
            sources[section] = (path, node)
            merged[section] = getattr(policy, section)
    return Policy(**merged), sources


def _check_ramps(config: Config, policy: Policy, sources: Mapping[str, tuple[Path, yaml.Node | None]]) -> None:
    """Ramps must fit the configuration they move and the guardrails they run under."""
    if not policy.ramps:
        return
    path, node = sources["ramps"]
    record_sets = {rs.key: rs for rs in config.record_sets}
    max_step = policy.guardrails.max_step

    def fail(name: str, field: str, message: str) -> ConfigError:
        loc: list[int | str] = ["ramps", name, *_parse_dotted(field)]
        line = _line_of(node, loc)
        return ConfigError(f"{path}:{line}: {_dotted(loc)}: {message}")

    for name, ramp in policy.ramps.items():
        rs = record_sets.get(ramp.record_key)
        if rs is None:
            known = ", ".join(record_sets) or "none"
            raise fail(name, "record_set", f"no record set {ramp.record_key!r} in the configuration; known: {known}")
        members = {m.region for m in rs.members}
        for w, wave in enumerate(ramp.waves):
            for r, region_name in enumerate(wave):
                if region_name not in members:
                    raise fail(
                        name,
                        f"waves[{w}][{r}]",
                        f"{region_name!r} is not a member of {rs.key}; members: {', '.join(sorted(members))}",
                    )
                region = config.region(region_name)
                if region.type == "lightweight" and ramp.steps[-1] > region.max_share:
                    raise fail(
                        name,
                        "steps",
                        f"the last step ({ramp.steps[-1]:g}%) exceeds the max_share of {region_name} "
                        f"({region.max_share:g}%)",
                    )
            if len(wave) * ramp.steps[-1] > 100:  # noqa: PLR2004 - percent
                raise fail(name, f"waves[{w}]", f"{len(wave)} regions at {ramp.steps[-1]:g}% each exceed 100%")
            previous = 0.0
            for i, share in enumerate(ramp.steps):
                moved = len(wave) * (share - previous)
                if moved > max_step + 1e-9:
                    raise fail(
                        name,
                        f"steps[{i}]",
                        f"step to {share:g}% moves {moved:g}% of traffic at once (wave {w + 1} has "
                        f"{len(wave)} regions), more than guardrails.max_step {max_step:g}%: add a step in between",
                    )
                previous = share


def load_config(path: str | Path) -> Config:
    """Read, validate and return the configuration with its policy files merged in."""
    path = Path(path)
    data, node = _read_yaml(path, "configuration")
    if isinstance(data, dict) and "policy" in data:
        line = _line_of(node, ["policy"])
        raise ConfigError(f"{path}:{line}: policy: unknown key; list policy files under `policies:` instead")
    if isinstance(data, dict) and "base_dir" in data:
        line = _line_of(node, ["base_dir"])
        raise ConfigError(f"{path}:{line}: base_dir: unknown key; paths are relative to this file")
    config: Config = _validate(Config, data, path, node, "configuration")
    policy_paths = []
    for i, name in enumerate(config.policies):
        policy_path = (path.parent / name).resolve()
        if not policy_path.is_file():
            line = _line_of(node, ["policies", i])
            raise ConfigError(f"{path}:{line}: policies[{i}]: policy file {name!r} not found (looked at {policy_path})")
        policy_paths.append(policy_path)
    policy, sources = load_policy(policy_paths)
    _check_ramps(config, policy, sources)
    return config.model_copy(update={"policy": policy, "base_dir": str(path.parent)})
