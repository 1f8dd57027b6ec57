"""The actuator: the only code that reads and writes Route 53 weighted records.

It reads a weighted group by name and type, and writes every member of the group in one UPSERT
batch (Route 53 validates and applies a batch whole), then follows the change with GetChange
until INSYNC. Before writing it compares what Route 53 holds with what was last written (a hand
edit pauses shifting instead of being overwritten). The guardrails are checked in front of it,
by the reconciler. AWS errors become `RetryableError` (throttling, a prior change still
applying, 5xx, network) or `TerminalError` (invalid batch, access denied); retryable ones are
retried with exponential backoff and full jitter. boto3 is blocking, so every call runs in a
thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import random
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import boto3
import structlog
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    PartialCredentialsError,
    ProfileNotFound,
    SSOError,
    SSOTokenLoadError,
    TokenRetrievalError,
    UnauthorizedSSOTokenError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import NoCredentialsError as BotoNoCredentialsError

from controller.acting.errors import (
    DriftError,
    NoCredentialsError,
    RetryableError,
    Route53Error,
    TerminalError,
    retry_cause,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from mypy_boto3_route53 import Route53Client

    from controller.settings.schema import RecordSet

log = structlog.get_logger("regionshift.route53")

RETRYABLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "PriorRequestNotComplete",
        "ServiceUnavailable",
        "InternalFailure",
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)


@dataclass(frozen=True, slots=True)
class ChangeResult:
    change_id: str | None  # None in dry-run
    submitted_at: float
    insync_at: float | None  # None in dry-run, or when INSYNC was not seen within the wait
    batch: list[dict[str, Any]] = field(default_factory=list)
    dry_run: bool = False


# Seconds a Route 53 request may wait for its answer (and 5 to connect): the longest a request
# whose task was cancelled can still be running.
READ_TIMEOUT = 15.0


def make_client(
    endpoint_url: str | None = None,
    region: str = "us-east-1",
    read_timeout: float = READ_TIMEOUT,
    aws_access_key_id: str | None = None,
    aws_secret_access_key: str | None = None,
) -> Route53Client:
    """A Route 53 client whose retries are ours (botocore's are off), with short timeouts.

    Credentials come from the usual boto3 chain unless given (the local world passes dummies).
    """
    config = BotoConfig(retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=read_timeout)
    # A session of its own: credentials are looked up for this client, not cached process-wide.
    try:
        session = boto3.session.Session()
    except ProfileNotFound as exc:
        raise classify(exc) from exc
    return session.client(
        "route53",
        endpoint_url=endpoint_url,
        region_name=region,
        config=config,
        aws_access_key_id=aws_access_key_id,
        aws_secret_access_key=aws_secret_access_key,
    )


# No credentials, or none that could be loaded (a missing profile, an expired SSO token).
_CREDENTIAL_ERRORS = (
    BotoNoCredentialsError,
    PartialCredentialsError,
    CredentialRetrievalError,
    ProfileNotFound,
    SSOError,
    SSOTokenLoadError,
    TokenRetrievalError,
    UnauthorizedSSOTokenError,
)


def classify(exc: Exception) -> Route53Error:
    """Map an SDK exception to the project's retryable or terminal error."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = f"{code or status}: {error.get('Message', '')}".rstrip(": ")
        if code in RETRYABLE_CODES or status >= 500 or status == 429:  # noqa: PLR2004 - HTTP classes
            return RetryableError(message)
        return TerminalError(message)
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return RetryableError(f"network: {exc}")
    if isinstance(exc, _CREDENTIAL_ERRORS):
        return NoCredentialsError(
            f"no AWS credentials ({exc}): set AWS_PROFILE or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or run with an instance or task role"
        )
    return TerminalError(f"{type(exc).__name__}: {exc}")


def _name(name: str) -> str:
    # Route 53 answers with a trailing dot and escapes '*' as \052.
    return name.rstrip(".").replace("\\052", "*").lower()


def _weights(record_set: RecordSet, group: Mapping[str, Mapping[str, Any]]) -> dict[str, int | None]:
    return {
        m.set_identifier: (int(group[m.set_identifier]["Weight"]) if m.set_identifier in group else None)
        for m in record_set.members
    }


def _heard(sending: asyncio.Future[dict[str, Any]]) -> None:
    """A batch's send is done: its error was raised to the writer, or (its writer cancelled
    meanwhile, by a stop) is logged here, not left to "never retrieved"."""
    if not sending.cancelled() and sending.exception() is not None:
        log.debug("a batch sent before a stop failed", error=str(sending.exception()))


class Actuator:
    """Reads and writes one account's weighted groups; one instance per Route 53 client."""

    def __init__(
        self,
        client: Route53Client,
        *,
        dry_run: bool = False,
        max_attempts: int = 8,
        base_delay: float = 0.2,
        max_delay: float = 10.0,
        poll_interval: float = 2.0,
        insync_timeout: float = 300.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        threads: int = 4,
        max_rate: float | None = None,
    ) -> None:
        self.client = client
        self.dry_run = dry_run
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.poll_interval = poll_interval
        self.insync_timeout = insync_timeout
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - backoff jitter
        self._clock = clock
        self.calls = 0  # API requests sent, retries included
        # Requests tried again, by (operation, cause): only what failed after every try shows as
        # an error, and a throttling storm of 51 answers counted 7.
        self.retries: Counter[tuple[str, str]] = Counter()
        # At most `max_rate` requests a second, every operation and retry counted: Route 53 allows
        # 5 a second per account, and 15 record sets read every second sent 14 a second, 48 in a
        # burst, each over the limit answered `Throttling` and retried, holding every other
        # record set's evacuation behind its backoff. Requests keep their order; a request waits
        # for its slot (on the monotonic clock: `clock` may be a test's).
        self.max_rate = max_rate
        self._next_slot = 0.0
        self.paced = 0.0  # seconds requests waited for their slot, in all
        self.last_success_at: float | None = None  # when Route 53 last answered any request
        # Requests sent and not yet done: cancelling the task that awaits one stops nobody
        # waiting, not the request. `quiesce` waits for them before the lease is given up. A
        # request counts from the moment it is handed to a thread until it has returned, failed,
        # or (still queued when its task was cancelled) been dropped unsent. The threads are the
        # actuator's own: a Route 53 write never waits behind other blocking work.
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="regionshift-route53")
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        self._submitting: set[asyncio.Future[dict[str, Any]]] = set()  # batches sent, answer not heard yet

    async def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        """One API operation off the event loop, retried with full jitter while retryable."""
        method = getattr(self.client, operation)
        for attempt in range(1, self.max_attempts + 1):
            await self._pace()
            self.calls += 1
            try:
                response: dict[str, Any] = await self._in_thread(method, params)
            except Exception as exc:
                error = classify(exc)
                if isinstance(error, TerminalError) or attempt == self.max_attempts:
                    raise error from exc
                self.retries[operation, retry_cause(error)] += 1
                delay = self._rng.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
                log.info("route53 retry", operation=operation, attempt=attempt, error=str(error), delay=round(delay, 3))
                await self._sleep(delay)
            else:
                self.last_success_at = self._clock()
                return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def _pace(self) -> None:
        """Wait for this request's slot under `max_rate`."""
        if self.max_rate is None:
            return
        now = time.monotonic()
        slot = max(now, self._next_slot)
        self._next_slot = slot + 1.0 / self.max_rate
        if slot > now:
            self.paced += slot - now
            await self._sleep(slot - now)

    async def _in_thread(self, method: Callable[..., dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        if self._idle is None:
            self._idle = asyncio.Event()

        def finished() -> None:
            self._in_flight -= 1
            if self._in_flight == 0 and self._idle is not None:
                self._idle.set()

        def done(_: Future[dict[str, Any]]) -> None:
            # Runs once however the request ends: returned or raised on its thread, or cancelled
            # while queued (then `method` never runs, and this is the only word of it).
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(finished)

        request = self._threads.submit(contextvars.copy_context().run, functools.partial(method, **params))
        self._in_flight += 1
        self._idle.clear()
        request.add_done_callback(done)  # at once if it is done already: counted down after this
        return await asyncio.wrap_future(request, loop=loop)

    async def quiesce(self, within: float) -> bool:
        """Wait until no request is in flight (a batch sent by a cancelled task has landed or
        failed, and its change id was told); False when one still runs after `within` seconds."""
        try:
            async with asyncio.timeout(within):
                if self._submitting:
                    await asyncio.wait(set(self._submitting))
                if self._in_flight and self._idle is not None:
                    await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Let the request threads go once their work is done (nothing new is sent after this)."""
        self._threads.shutdown(wait=False)

    @staticmethod
    def weights_of(record_set: RecordSet, group: Mapping[str, Mapping[str, Any]]) -> dict[str, int | None]:
        """Weight per configured member of a group read; None for a member Route 53 does not hold."""
        return _weights(record_set, group)

    async def read_group(self, record_set: RecordSet) -> dict[str, dict[str, Any]]:
        """Set identifier -> the ResourceRecordSet Route 53 holds, for the group's name and type."""
        name, rtype = record_set.name, record_set.type
        params: dict[str, Any] = {"HostedZoneId": record_set.zone_id, "StartRecordName": name, "StartRecordType": rtype}
        found: dict[str, dict[str, Any]] = {}
        while True:
            page = await self._call("list_resource_record_sets", **params)
            for rrset in page.get("ResourceRecordSets", []):
                if _name(rrset["Name"]) != name or rrset["Type"] != rtype:
                    return found  # listing is ordered: past our group
                if "SetIdentifier" in rrset and "Weight" in rrset:
                    found[rrset["SetIdentifier"]] = rrset
            if (
                not page.get("IsTruncated")
                or _name(page.get("NextRecordName", "")) != name
                or page.get("NextRecordType") != rtype
            ):
                return found
            params["StartRecordName"] = page["NextRecordName"]
            params["StartRecordType"] = page["NextRecordType"]
            if "NextRecordIdentifier" in page:
                params["StartRecordIdentifier"] = page["NextRecordIdentifier"]

    async def observed_weights(self, record_set: RecordSet) -> dict[str, int | None]:
        """Weight per configured member; None for a member Route 53 does not hold."""
        return _weights(record_set, await self.read_group(record_set))

    async def apply(
        self,
        record_set: RecordSet,
        weights: Mapping[str, int],
        *,
        expected: Mapping[str, int] | None,
        comment: str = "regionshift",
        group: Mapping[str, Mapping[str, Any]] | None = None,
        on_submitted: Callable[[str, float], Awaitable[None]] | None = None,
    ) -> ChangeResult:
        """Compare, write every member in one UPSERT batch, and wait for INSYNC. The batch has
        passed the guardrails already (the reconciler checks them, in front of this call).

        `expected` is what was last written (None before the first write): when Route 53 holds
        anything else, `DriftError` is raised and nothing is written. `group` is a read made
        just before (the reconciler's, this tick); without it the group is read here.
        `on_submitted` hears the change id as soon as Route 53 accepts the batch, before the
        INSYNC wait, so a crash during the wait loses neither.
        """
        if group is None:
            group = await self.read_group(record_set)
        observed = _weights(record_set, group)
        if expected is not None and observed != dict(expected):
            raise DriftError(record_set.key, expected, observed)
        batch = [
            self._upsert(record_set, member.set_identifier, weights[member.set_identifier], group)
            for member in record_set.members
        ]
        submitted = self._clock()
        if self.dry_run:
            log.info("dry run: batch not sent", record=record_set.key, comment=comment, weights=dict(weights))
            return ChangeResult(None, submitted, None, batch, dry_run=True)
        # Sent and heard out whatever comes meanwhile: a stop (SIGTERM) cancelled the wait for
        # Route 53's answer while the batch was on its way, so the change it applied never had
        # its id recorded. The stop waits for it (`quiesce`) before the store closes.
        sending = asyncio.ensure_future(self._submit(record_set, batch, comment, submitted, on_submitted))
        self._submitting.add(sending)
        sending.add_done_callback(self._submitting.discard)
        sending.add_done_callback(_heard)
        response = await asyncio.shield(sending)
        change_id = str(response["ChangeInfo"]["Id"])
        insync_at = None if response["ChangeInfo"]["Status"] != "INSYNC" else self._clock()
        if insync_at is None:
            insync_at = await self.wait_insync(change_id)
        return ChangeResult(change_id, submitted, insync_at, batch)

    async def _submit(
        self,
        record_set: RecordSet,
        batch: list[dict[str, Any]],
        comment: str,
        submitted: float,
        on_submitted: Callable[[str, float], Awaitable[None]] | None,
    ) -> dict[str, Any]:
        """Send the batch, and tell `on_submitted` the change id Route 53 gave it."""
        response = await self._call(
            "change_resource_record_sets",
            HostedZoneId=record_set.zone_id,
            ChangeBatch={"Comment": comment[:256], "Changes": batch},
        )
        if on_submitted is not None:
            await on_submitted(str(response["ChangeInfo"]["Id"]), submitted)
        return response

    async def wait_insync(self, change_id: str) -> float | None:
        """Poll GetChange until INSYNC; the time it was seen, or None after `insync_timeout`."""
        deadline = time.monotonic() + self.insync_timeout
        while time.monotonic() < deadline:
            await self._sleep(self.poll_interval)
            if await self.is_insync(change_id):
                return self._clock()
        log.warning("change not INSYNC in time", change_id=change_id, waited=self.insync_timeout)
        return None

    async def is_insync(self, change_id: str) -> bool:
        """Whether Route 53 reports the change INSYNC (every authoritative server has it)."""
        info = (await self._call("get_change", Id=change_id))["ChangeInfo"]
        return bool(info["Status"] == "INSYNC")

    @staticmethod
    def _upsert(record_set: RecordSet, sid: str, weight: int, group: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """An UPSERT that changes the weight only: anything else the record holds is kept."""
        current = group.get(sid)
        if current is not None:
            rrset = dict(current)
            rrset["Weight"] = weight
        else:
            member = next(m for m in record_set.members if m.set_identifier == sid)
            rrset = {
                "Name": record_set.name,
                "Type": record_set.type,
                "SetIdentifier": sid,
                "Weight": weight,
                "TTL": record_set.ttl,
                "ResourceRecords": [{"Value": member.value}],
            }
        return {"Action": "UPSERT", "ResourceRecordSet": rrset}
