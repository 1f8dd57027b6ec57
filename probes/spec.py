"""What a probe is: its kind, target, schedule and expectations, as validated data.

These models are the probe half of the configuration file. They live here, not in
`controller/`, because the probe engine (and the agents that run it inside regions) must be
usable without the controller; the controller's configuration imports them.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    from collections.abc import Callable

# The user-information part of a URL (user:password@) wherever it stands in a text.
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s]+@")  # to the last @ of the authority


def redact(text: str) -> str:
    """The text with the credentials of every URL in it replaced: 'https://***@host/path'. What a
    state API, a log line or an error message shows of a probe target."""
    return _URL_CREDENTIALS.sub(r"\1***@", text)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DURATION_HINT = "write a number with a unit: ms, s, m, h or d, e.g. '500ms', '30s', '2m' or '1h30m'"


# The longest duration any setting takes: a year and a day. Longer is a typo, not a plan.
MAX_DURATION = 366 * 86400.0


def format_duration(seconds: float) -> str:
    """'10ms', '30s', '2m', '1h30m', '366d': the shortest exact form parse_duration reads back."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    out, rest = "", seconds
    for unit in ("d", "h", "m"):
        whole = int(rest // _UNIT_SECONDS[unit])
        if whole:
            out, rest = out + f"{whole}{unit}", rest - whole * _UNIT_SECONDS[unit]
    return out + (f"{rest:g}s" if rest or not out else "")


def parse_duration(value: object) -> float:
    """Seconds from '250ms', '30s', '2m', '1h30m' (or a bare number of seconds): finite, not
    negative, at most MAX_DURATION. Each field's own range is checked after (see `Duration`)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration; {DURATION_HINT}")  # noqa: TRY004 - pydantic wants ValueError
    try:
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str):
            text = value.strip().replace(" ", "")
            parts = list(_DURATION_PART.finditer(text))
            if not text or "".join(p.group(0) for p in parts) != text:
                raise ValueError(f"{value!r} is not a duration; {DURATION_HINT}")
            seconds = sum(float(p.group(1)) * _UNIT_SECONDS[p.group(2)] for p in parts)
        else:
            raise ValueError(f"{value!r} is not a duration; {DURATION_HINT}")  # noqa: TRY004 - pydantic wants ValueError
    except OverflowError:
        seconds = math.inf
    if math.isnan(seconds):
        raise ValueError(f"{value!r} is not a number of seconds; {DURATION_HINT}")
    if seconds < 0:
        raise ValueError(f"{value!r} is negative; a duration is zero or more")
    if seconds > MAX_DURATION:
        shown = repr(value) if len(repr(value)) < 40 else "this value"  # noqa: PLR2004 - a short echo
        raise ValueError(f"{shown} is longer than any setting takes: at most {format_duration(MAX_DURATION)}")
    return seconds


def _within(low: float, high: float, *, zero: bool) -> Callable[[float], float]:
    allowed = f"{'0 or ' if zero and low > 0 else ''}{format_duration(low)} to {format_duration(high)}"
    if low == 0 and not zero:
        allowed = f"more than 0s, at most {format_duration(high)}"

    def check(seconds: float) -> float:
        if (seconds == 0 and zero) or (low <= seconds <= high and seconds > 0):
            return seconds
        raise ValueError(f"{format_duration(seconds)} is out of range: allowed {allowed}")

    return check


# A length of time above zero: timeouts, windows, limits.
Duration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_within(0.0, MAX_DURATION, zero=False))]
# A wait that may be zero (none): bakes, gates, confirmations.
Wait = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_within(0.0, MAX_DURATION, zero=True))]
# How often something runs: at least every day, at most every 10 ms (faster spins a core).
Interval = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_within(0.01, 86400.0, zero=False))]


def _mentions_bool(annotation: object) -> bool:
    return annotation is bool or any(_mentions_bool(a) for a in get_args(annotation))


class StrictModel(BaseModel):
    """Unknown keys are refused, values frozen, and a YAML boolean is never taken for a number
    (pydantic would read `weight: true` as 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, value: object, info: ValidationInfo) -> object:
        values = value if isinstance(value, list) else [value]
        name = info.field_name
        if (
            name is not None
            and any(isinstance(v, bool) for v in values)
            and not _mentions_bool(cls.model_fields[name].annotation)
        ):
            raise ValueError("a boolean (true/false) is not a value this field takes")
        return value


class Secret(StrictModel):
    """Where a secret (a connection string) is read from: an environment variable or a file,
    never the configuration itself. Errors name where it was looked for, never what it holds."""

    env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    file: str | None = None

    @model_validator(mode="after")
    def _one_place(self) -> Secret:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of env (a variable's name) or file (a path)")
        return self

    @property
    def where(self) -> str:
        return f"${self.env}" if self.env is not None else f"file {self.file}"

    def read(self) -> str:
        """The secret; raises LookupError saying where it is missing."""
        if self.env is not None:
            value = os.environ.get(self.env, "").strip()
        else:
            try:
                value = Path(self.file or "").read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise LookupError(f"cannot read {self.where}: {exc.strerror}") from exc
        if not value:
            raise LookupError(f"{self.where} is empty or not set")
        return value


def unreadable(**paths: str | None) -> str | None:
    """'NAME PATH: why' for the first of these files (by name) that cannot be read; None when
    each given one can. What a broker connection needs at its first connect is looked at before
    it: a missing CA file was retried for ever as 'broker unreachable', naming no file."""
    for name, path in paths.items():
        if path is None:
            continue
        try:
            with Path(path).open("rb"):
                pass
        except OSError as exc:
            return f"{name} {path}: {exc.strerror or exc}"
    return None


class TlsSettings(StrictModel):
    """How a probe checks the server's certificate."""

    ca_file: str | None = Field(default=None, description="PEM bundle to trust instead of the system store")
    insecure_skip_verify: bool = False
    server_name: str | None = Field(default=None, description="SNI and name to verify; defaults to the Host")
    min_validity: Duration | None = Field(
        default=None, description="fail when the certificate expires sooner than this"
    )


class _ProbeBase(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    interval: Interval = 10.0
    timeout: Duration = 5.0

    @model_validator(mode="after")
    def _timeout_fits_interval(self) -> _ProbeBase:
        if self.timeout > self.interval:
            raise ValueError(
                f"timeout ({self.timeout:g}s) is longer than interval ({self.interval:g}s); "
                "a probe never overlaps itself, so it would miss its own schedule: shorten the timeout"
            )
        return self


class HttpProbe(_ProbeBase):
    """An HTTP(S) request on a fresh connection, timed phase by phase."""

    kind: Literal["http"] = "http"
    target: str = Field(description="URL, http:// or https://")
    method: Literal["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"] = "GET"
    headers: dict[str, str | Secret] = Field(
        default_factory=dict, description="a value, or {env: NAME} / {file: PATH} for a secret (never shown)"
    )
    host: str | None = Field(default=None, description="Host header (and SNI) when it differs from the URL")
    body: str | None = None
    expect_status: list[Annotated[int, Field(ge=100, le=599)]] = Field(
        default_factory=list, description="accepted status codes; empty means any 2xx"
    )
    body_regex: str | None = None
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @field_validator("target")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{redact(value)!r} is not an http:// or https:// URL with a host")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"{redact(value)!r} has an invalid port") from exc
        return value

    @field_validator("body_regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{value!r} is not a valid regular expression: {exc}") from exc
        return value

    def accepts(self, status: int) -> bool:
        if self.expect_status:
            return status in self.expect_status
        return 200 <= status < 300  # noqa: PLR2004 - the 2xx class


class TcpProbe(_ProbeBase):
    """A TCP connection (optionally with a TLS handshake) to host:port."""

    kind: Literal["tcp"] = "tcp"
    target: str = Field(description="host:port, [v6]:port for IPv6")
    tls_handshake: bool = False
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @field_validator("target")
    @classmethod
    def _host_port(cls, value: str) -> str:
        split_host_port(value)
        return value


class PostgresLagProbe(_ProbeBase):
    """Replication lag of a PostgreSQL replica, timed by heartbeat on the prober's own clock."""

    kind: Literal["replication-lag"] = "replication-lag"
    source: Literal["postgres"] = "postgres"
    primary: Secret = Field(description="where the primary's connection string is")
    replica: Secret = Field(description="where the replica's connection string is")
    table: str = Field(default="regionshift_heartbeat", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    poll: Interval = Field(default=0.01, description="how often the replica is asked while waiting: the resolution")
    stalled_after: Duration = Field(
        default=10.0, description="a replica whose heartbeat has not advanced this long, while written, is stalled"
    )

    @property
    def target(self) -> str:
        return f"postgres {self.primary.where} -> {self.replica.where}"


class CloudWatchLagProbe(_ProbeBase):
    """Replication lag as CloudWatch reports it (GetMetricData), normalised to seconds."""

    kind: Literal["replication-lag"] = "replication-lag"
    source: Literal["cloudwatch"] = "cloudwatch"
    metric: Literal["aurora-global", "aurora-rpo", "rds-replica", "dynamodb", "s3"]
    aws_region: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d$", description="where the metric lives")
    dimensions: dict[str, str] = Field(min_length=1)
    period: Duration = 60.0
    lookback: Duration = 300.0
    endpoint_url: str | None = Field(default=None, description="only for a local CloudWatch (moto_server)")

    @property
    def target(self) -> str:
        return f"cloudwatch {self.metric} {self.aws_region} " + ",".join(f"{k}={v}" for k, v in self.dimensions.items())


def _probe_tag(value: object) -> str | None:
    """kind, or kind/source for the replication-lag kind (postgres by default)."""
    if isinstance(value, dict):
        kind, source = value.get("kind"), value.get("source", "postgres")
    else:
        kind, source = getattr(value, "kind", None), getattr(value, "source", "postgres")
    return f"{kind}/{source}" if kind == "replication-lag" else kind


ProbeSpec = Annotated[
    Annotated[HttpProbe, Tag("http")]
    | Annotated[TcpProbe, Tag("tcp")]
    | Annotated[PostgresLagProbe, Tag("replication-lag/postgres")]
    | Annotated[CloudWatchLagProbe, Tag("replication-lag/cloudwatch")],
    Discriminator(_probe_tag),
]


def _tagged() -> dict[str, type[BaseModel]]:
    union = get_args(ProbeSpec)[0]
    return {next(m.tag for m in get_args(a)[1:] if isinstance(m, Tag)): get_args(a)[0] for a in get_args(union)}


# Every probe model by its tag ("http", "replication-lag/postgres"...): read off the union above,
# so an error message never lists a stale set of kinds.
PROBE_TAGS: dict[str, type[BaseModel]] = _tagged()
# The kinds a configuration names, and each kind's sources where it has several.
PROBE_KINDS: dict[str, tuple[str, ...]] = {}
for _tag in PROBE_TAGS:
    _kind, _, _source = _tag.partition("/")
    PROBE_KINDS[_kind] = (*PROBE_KINDS.get(_kind, ()), *((_source,) if _source else ()))


def split_host_port(target: str) -> tuple[str, int]:
    """('::1', 443) from '[::1]:443'; raises ValueError naming the mistake."""
    host, sep, port_text = target.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"{target!r} is not host:port (e.g. 'db.internal:5432' or '[::1]:443')")
    port = int(port_text)
    if not 0 < port < 65536:  # noqa: PLR2004 - TCP port range
        raise ValueError(f"{target!r}: port {port} is outside 1..65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port
