"""The configuration file's schema: the controller, its regions with their probes, and the Route 53
record sets it moves traffic on.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from controller.settings.limits import MAX_TTL, MAX_WEIGHT, MAX_WEIGHTED_RECORDS, SHARE_EPSILON
from controller.settings.model import LocatedError, SettingsModel, no_duplicates
from controller.settings.policy import Policy
from probes.scheduler import JITTER
from probes.spec import Duration, Interval, ProbeSpec, Secret, split_host_port

if TYPE_CHECKING:
    from collections.abc import Mapping

RegionType = Literal["full", "lightweight", "read-only"]


REGION_NAME = r"^[a-z0-9][a-z0-9-]{0,62}$"


class Region(SettingsModel):
    name: str = Field(pattern=REGION_NAME)
    type: RegionType = "full"
    residency: str | None = Field(default=None, min_length=1, max_length=32)
    max_share: float = Field(default=100.0, gt=0, le=100, description="percent of a record set, at most")
    probes: list[ProbeSpec] = Field(default_factory=list)

    @field_validator("probes")
    @classmethod
    def _unique_probe_names(cls, probes: list[ProbeSpec]) -> list[ProbeSpec]:
        no_duplicates([p.name for p in probes], "probe name")
        return probes


class Member(SettingsModel):
    set_identifier: str = Field(min_length=1, max_length=128)
    region: str
    value: str = Field(min_length=1)
    weight: int | None = Field(default=None, ge=0, le=MAX_WEIGHT, description="initial weight 0..255")


class RecordSet(SettingsModel):
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
        no_duplicates([m.set_identifier for m in members], "set_identifier", "set_identifier")
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

    @property
    def configured_weights(self) -> dict[str, int] | None:
        """Every member's configured weight, by set identifier; None unless every member has one
        (and not all 0: `_members` refuses that)."""
        if any(m.weight is None for m in self.members):
            return None
        return {m.set_identifier: m.weight or 0 for m in self.members}


class Route53Settings(SettingsModel):
    """How the actuator reaches Route 53."""

    endpoint_url: str | None = Field(default=None, description="only for a local Route 53 (moto_server)")
    dry_run: bool = Field(default=False, description="log each batch, send nothing")
    reconcile_every: Interval = Field(default=10.0, description="how often observed and desired weights are compared")
    poll_interval: Interval = 2.0
    insync_timeout: Duration = 300.0
    max_attempts: int = Field(default=8, ge=1, le=50, description="tries per Route 53 request while retryable")
    max_requests_per_second: float = Field(
        default=4.0,
        gt=0,
        le=1000,
        description="Route 53 requests this controller sends at most, every kind and retry counted (Route 53 "
        "allows 5 a second per account, shared with every other tool in it)",
    )
    lease_ttl: Duration = Field(default=30.0, description="writer lease lifetime; a standby takes over after it")


def split_listen(value: str) -> tuple[str, int]:
    """('127.0.0.1', 9181) from '127.0.0.1:9181' ('[::1]:0' picks a free port on ::1); a ValueError
    that says what is wrong otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or len(port) > 5 or int(port) > 65535:  # noqa: PLR2004 - port range
        raise ValueError(f"{value!r} is not host:port with a port from 0 to 65535, e.g. '127.0.0.1:9181'")
    return host.strip("[]"), int(port)


class ControllerSettings(SettingsModel):
    vantage: str = Field(default="controller", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    listen: str = Field(default="127.0.0.1:9181", description="host:port of the HTTP API; port 0 picks one")
    tick: Interval = Field(default=1.0, description="how often verdicts are recomputed")
    max_concurrency: int = Field(default=64, ge=1, le=10_000)
    jitter: float = Field(default=JITTER, ge=0, lt=0.5, description="fraction of the interval")
    state_path: str = Field(default="regionshift.sqlite", description="SQLite state, relative to this file")
    api_token_env: str = Field(
        default="REGIONSHIFT_API_TOKEN", description="environment variable holding the operators' bearer token"
    )
    route53: Route53Settings = Field(default_factory=Route53Settings)
    read_only: bool = Field(
        default=False, description="serve the API and the live page without operator actions: each is refused (403)"
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        split_listen(value)
        return value

    @property
    def host_port(self) -> tuple[str, int]:
        return split_listen(self.listen)


class BrokerTls(SettingsModel):
    ca_file: str | None = Field(default=None, description="PEM CA bundle to trust (TLS)")
    cert_file: str | None = Field(default=None, description="PEM client certificate")
    key_file: str | None = Field(default=None, description="PEM key of the client certificate")

    @model_validator(mode="after")
    def _pair(self) -> BrokerTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class AgentsSettings(SettingsModel):
    """Probe agents in the regions, reached through an MQTT broker (see `probes.wire`)."""

    broker: str = Field(description="host:port of the MQTT broker, e.g. 'mqtt.internal:8883'")
    username: str | None = Field(default=None, min_length=1, max_length=128)
    password: Secret | None = Field(default=None, description="{env: VAR} or {file: PATH}, never the password")
    tls: BrokerTls | None = None
    vantages: list[str] = Field(min_length=1, max_length=256, description="the agents' vantage names")
    client_id: str = Field(
        default="regionshift-controller",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        description="the controller's MQTT client id; its session (and queued results) outlive a restart",
    )
    max_skew: Duration = Field(default=30.0, description="a result stamped further ahead (or late) is dropped")
    max_result_age: Duration = Field(default=120.0, description="how long after its start a result may arrive")
    max_age: Duration = Field(default=600.0, description="the same for a result replayed after an outage")

    @field_validator("broker")
    @classmethod
    def _broker(cls, value: str) -> str:
        split_host_port(value)
        return value

    @field_validator("vantages")
    @classmethod
    def _vantages(cls, vantages: list[str]) -> list[str]:
        for v in vantages:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", v):
                raise ValueError(f"vantage {v!r}: letters, digits, '.', '_' or '-', at most 63")
        no_duplicates(vantages, "vantage", None)  # plain names: agents.vantages[1], no `.name`
        return vantages

    @property
    def host_port(self) -> tuple[str, int]:
        return split_host_port(self.broker)


class Config(SettingsModel):
    controller: ControllerSettings = Field(default_factory=ControllerSettings)
    agents: AgentsSettings | None = None
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
        no_duplicates([r.name for r in regions], "region name")
        return regions

    @field_validator("record_sets")
    @classmethod
    def _unique_record_sets(cls, record_sets: list[RecordSet]) -> list[RecordSet]:
        no_duplicates([rs.key for rs in record_sets], "record set (name/type)")
        return record_sets

    @model_validator(mode="after")
    def _agents_are_not_the_controller(self) -> Config:
        if self.agents is not None and self.controller.vantage in self.agents.vantages:
            raise LocatedError(
                "agents.vantages", f"{self.controller.vantage!r} is the controller's own vantage; name agents apart"
            )
        return self

    @model_validator(mode="after")
    def _record_sets_fit_regions(self) -> Config:
        regions = {r.name: r for r in self.regions}
        for i, rs in enumerate(self.record_sets):
            for j, member in enumerate(rs.members):
                where = f"record_sets[{i}].members[{j}].region"
                region = regions.get(member.region)
                if region is None:
                    raise LocatedError(where, f"unknown region {member.region!r}; known: {', '.join(regions)}")
                if rs.residency is not None and region.residency != rs.residency:
                    raise LocatedError(
                        where,
                        f"region {region.name!r} has residency {region.residency!r} but the record set "
                        f"{rs.name!r} keeps residency {rs.residency!r}: only regions of that residency may serve it",
                    )
                if rs.takes_writes and region.type == "read-only":
                    raise LocatedError(
                        where,
                        f"region {region.name!r} is read-only and {rs.name!r} takes writes; "
                        "set takes_writes: false or use another region",
                    )
            self._configured_shares_fit(i, rs, regions)
        return self

    @staticmethod
    def _configured_shares_fit(i: int, rs: RecordSet, regions: Mapping[str, Region]) -> None:
        """A lightweight region's configured weight keeps it within its `max_share` (guardrail 5:
        the planners never write more, and a configuration asking for more is a mistake)."""
        weights = rs.configured_weights
        if weights is None:
            return
        total = sum(weights.values())
        by_region: dict[str, float] = {}
        for member in rs.members:
            by_region[member.region] = (
                by_region.get(member.region, 0.0) + 100.0 * weights[member.set_identifier] / total
            )
        for j, member in enumerate(rs.members):
            region = regions[member.region]
            share = by_region[member.region]
            if region.type == "lightweight" and share > region.max_share + SHARE_EPSILON:
                raise LocatedError(
                    f"record_sets[{i}].members[{j}].weight",
                    f"gives {region.name!r} {share:.1f}% of {rs.name!r}, over its max_share of "
                    f"{region.max_share:g}% (a lightweight region)",
                )

    def region(self, name: str) -> Region:
        return next(r for r in self.regions if r.name == name)
