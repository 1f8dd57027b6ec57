"""The actuator against moto's Route 53 server, through a proxy that injects the faults moto lacks."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
import uuid

import pytest
import pytest_asyncio
import structlog
import structlog.testing
from botocore.stub import Stubber

from controller.acting.errors import DriftError, RetryableError, TerminalError
from controller.acting.reconciler import Reconciler, checked_apply
from controller.acting.route53 import Actuator, make_client
from controller.demo.world import seed_weighted_group
from controller.planning.guardrails import GuardrailError
from controller.settings.schema import Config, Member, RecordSet, Region
from controller.state.store import Store
from tests.faults import FaultProxy

CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
REGIONS = {r.name: r for r in [Region(name="us-east-1"), Region(name="eu-west-1")]}
HEALTHY = dict.fromkeys(REGIONS, "healthy")


@pytest.fixture
def record_set(route53) -> RecordSet:
    """A fresh zone holding api.example.com: use1 weight 99, euw1 weight 1."""
    client = make_client(route53.url, **CREDENTIALS)
    zone = client.create_hosted_zone(Name=f"z{uuid.uuid4().hex[:8]}.example.com", CallerReference=uuid.uuid4().hex)
    zone_id = zone["HostedZone"]["Id"].split("/")[-1]
    name = "api." + zone["HostedZone"]["Name"].rstrip(".")
    rs = RecordSet(
        zone_id=zone_id,
        name=name,
        ttl=60,
        members=[
            Member(set_identifier="use1", region="us-east-1", value="192.0.2.10"),
            Member(set_identifier="euw1", region="eu-west-1", value="192.0.2.20"),
        ],
    )
    seed_weighted_group(client, zone_id, name, [("use1", 99, "192.0.2.10"), ("euw1", 1, "192.0.2.20")])
    # A neighbour under another name, which reads must not pick up.
    seed_weighted_group(client, zone_id, "www." + name, [("x", 5, "192.0.2.99")])
    return rs


@pytest_asyncio.fixture
async def proxy(route53):
    async with FaultProxy(route53.url) as p:
        yield p


class Sleeps:
    """A sleep that records its delays and returns at once: backoff is checked, never waited."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
def sleeps():
    return Sleeps()


@pytest.fixture
def actuator(proxy, sleeps):
    return Actuator(make_client(proxy.url, **CREDENTIALS), sleep=sleeps, poll_interval=0.5)


async def step(actuator, rs, weights, expected=None, kind="forward", verdicts=HEALTHY, max_step=10.0):
    return await checked_apply(
        actuator,
        rs,
        weights,
        expected=expected,
        kind=kind,
        regions=REGIONS,
        verdicts=verdicts,
        max_step=max_step,
        reason="test",
        now=time.time(),
    )


async def test_reads_the_weighted_group_by_name_and_type(actuator, record_set):
    group = await actuator.read_group(record_set)
    assert sorted(group) == ["euw1", "use1"]
    assert await actuator.observed_weights(record_set) == {"use1": 99, "euw1": 1}


async def test_writes_every_member_in_one_upsert_batch_and_keeps_their_values(actuator, record_set, proxy):
    result = await step(actuator, record_set, {"use1": 19, "euw1": 1}, expected={"use1": 99, "euw1": 1})
    assert result.change_id is not None
    assert result.insync_at is not None
    assert proxy.count("ChangeResourceRecordSets") == 1
    sent = next(s.body for s in proxy.seen if s.operation == "ChangeResourceRecordSets")
    assert sent.count("<Action>UPSERT</Action>") == 2
    assert "<Comment>regionshift forward: test</Comment>" in sent
    group = await actuator.read_group(record_set)
    assert {k: (v["Weight"], v["ResourceRecords"][0]["Value"], v["TTL"]) for k, v in group.items()} == {
        "use1": (19, "192.0.2.10", 60),
        "euw1": (1, "192.0.2.20", 60),
    }


async def test_requests_are_paced_to_the_rate_allowed_retries_included(proxy, record_set):
    # Nothing limited the request rate: 15 record sets read every second sent 14 requests a
    # second, 48 in a burst, against Route 53's 5 a second per account.
    actuator = Actuator(make_client(proxy.url, **CREDENTIALS), max_rate=20.0, base_delay=0.0)
    proxy.fail("ListResourceRecordSets", "Throttling", times=2)  # two retries, paced as well
    reads = [asyncio.create_task(actuator.read_group(record_set)) for _ in range(4)]
    await asyncio.gather(*reads)
    arrived = sorted(s.at for s in proxy.seen if s.operation == "ListResourceRecordSets")
    assert len(arrived) == 6
    gaps = [b - a for a, b in itertools.pairwise(arrived)]
    assert min(gaps) >= 1 / 20.0 - 0.01, gaps  # never closer than the rate allows (a lower bound only)
    assert actuator.paced > 0


@pytest.mark.parametrize(
    ("code", "status"), [("Throttling", 400), ("PriorRequestNotComplete", 400), (None, 500), (None, 503)]
)
async def test_retryable_errors_are_retried_with_jittered_backoff(actuator, record_set, proxy, sleeps, code, status):
    if code:
        proxy.fail("ChangeResourceRecordSets", code, times=3, status=status)
    else:
        proxy.http_error("ChangeResourceRecordSets", status, times=3)
    await step(actuator, record_set, {"use1": 19, "euw1": 1})
    assert proxy.count("ChangeResourceRecordSets") == 4
    assert await actuator.observed_weights(record_set) == {"use1": 19, "euw1": 1}
    assert len(sleeps.delays) == 3
    for attempt, delay in enumerate(sleeps.delays, start=1):
        assert 0 <= delay <= min(actuator.max_delay, actuator.base_delay * 2 ** (attempt - 1))
    # Counted by cause (regionshift_route53_retries_total): only a request that fails after
    # every try was counted as an error, and a throttling storm hardly showed.
    cause = {"Throttling": "throttling", "PriorRequestNotComplete": "prior_request", None: "server"}[code]
    assert actuator.retries == {("change_resource_record_sets", cause): 3}


async def test_giving_up_after_max_attempts_raises_retryable(proxy, record_set, sleeps):
    actuator = Actuator(make_client(proxy.url, **CREDENTIALS), sleep=sleeps, max_attempts=3)
    proxy.fail("ListResourceRecordSets", "Throttling", times=10)
    with pytest.raises(RetryableError, match="Throttling"):
        await actuator.read_group(record_set)
    assert proxy.count("ListResourceRecordSets") == 3


async def test_a_terminal_error_is_not_retried(actuator, record_set, proxy):
    proxy.fail("ChangeResourceRecordSets", "InvalidChangeBatch", times=1)
    with pytest.raises(TerminalError, match="InvalidChangeBatch"):
        await step(actuator, record_set, {"use1": 19, "euw1": 1})
    assert proxy.count("ChangeResourceRecordSets") == 1


async def test_a_slow_answer_past_the_read_timeout_is_retried(proxy, record_set, sleeps):
    actuator = Actuator(make_client(proxy.url, read_timeout=0.3, **CREDENTIALS), sleep=sleeps)
    proxy.slow("ListResourceRecordSets", 0.6, times=1)
    assert await actuator.observed_weights(record_set) == {"use1": 99, "euw1": 1}
    assert len(sleeps.delays) == 1


async def test_follows_a_pending_change_until_insync(actuator, record_set, proxy, sleeps):
    proxy.pending_polls = 3
    result = await step(actuator, record_set, {"use1": 19, "euw1": 1})
    assert proxy.count("GetChange") == 4  # three PENDING answers, then INSYNC
    assert result.insync_at is not None
    assert sleeps.delays == [0.5] * 4  # the poll interval, never a busy loop


async def test_a_hand_edit_is_reported_and_never_overwritten(actuator, record_set, proxy, route53):
    direct = make_client(route53.url, **CREDENTIALS)
    group = await actuator.read_group(record_set)
    direct.change_resource_record_sets(
        HostedZoneId=record_set.zone_id,
        ChangeBatch={"Changes": [{"Action": "UPSERT", "ResourceRecordSet": {**group["euw1"], "Weight": 50}}]},
    )
    with pytest.raises(DriftError) as drift:
        await step(actuator, record_set, {"use1": 19, "euw1": 1}, expected={"use1": 99, "euw1": 1})
    assert (
        str(drift.value)
        == f"{record_set.key}: Route 53 holds weights other than the ones last written (euw1: wrote 1, found 50)"
    )
    assert proxy.count("ChangeResourceRecordSets") == 0
    assert await actuator.observed_weights(record_set) == {"use1": 99, "euw1": 50}


async def test_a_batch_breaking_a_guardrail_is_never_sent(actuator, record_set, proxy):
    with pytest.raises(GuardrailError) as refused:
        await step(actuator, record_set, {"use1": 1, "euw1": 1})  # 1% -> 50% in one forward step
    assert [v.rule for v in refused.value.violations] == ["max_step"]
    with pytest.raises(GuardrailError) as refused:
        await step(actuator, record_set, {"use1": 19, "euw1": 1}, verdicts={**HEALTHY, "eu-west-1": "degraded"})
    assert [v.rule for v in refused.value.violations] == ["unhealthy_target"]
    assert proxy.count("ChangeResourceRecordSets") == 0


async def test_dry_run_logs_the_batch_and_sends_nothing(proxy, record_set, sleeps):
    actuator = Actuator(make_client(proxy.url, **CREDENTIALS), sleep=sleeps, dry_run=True)
    result = await step(actuator, record_set, {"use1": 19, "euw1": 1})
    assert result.dry_run
    assert result.change_id is None
    assert [c["ResourceRecordSet"]["Weight"] for c in result.batch] == [19, 1]
    assert proxy.count("ChangeResourceRecordSets") == 0
    assert await actuator.observed_weights(record_set) == {"use1": 99, "euw1": 1}


async def test_reads_follow_pages_within_a_weighted_group(sleeps):
    # moto does not page within a group (StartRecordIdentifier): botocore's Stubber plays Route 53.
    client = make_client("http://127.0.0.1:9", **CREDENTIALS)
    rs = RecordSet(
        zone_id="Z1",
        name="api.example.com",
        members=[Member(set_identifier=s, region="us-east-1", value="192.0.2.1") for s in ("a", "b", "c")],
    )

    def rrset(sid, weight, name="api.example.com."):
        return {
            "Name": name,
            "Type": "A",
            "SetIdentifier": sid,
            "Weight": weight,
            "TTL": 60,
            "ResourceRecords": [{"Value": "192.0.2.1"}],
        }

    with Stubber(client) as stub:
        stub.add_response(
            "list_resource_record_sets",
            {
                "ResourceRecordSets": [rrset("a", 1), rrset("b", 2)],
                "IsTruncated": True,
                "MaxItems": "2",
                "NextRecordName": "api.example.com.",
                "NextRecordType": "A",
                "NextRecordIdentifier": "c",
            },
            {"HostedZoneId": "Z1", "StartRecordName": "api.example.com", "StartRecordType": "A"},
        )
        stub.add_response(
            "list_resource_record_sets",
            {
                "ResourceRecordSets": [rrset("c", 3), rrset("z", 9, "www.example.com.")],
                "IsTruncated": False,
                "MaxItems": "2",
            },
            {
                "HostedZoneId": "Z1",
                "StartRecordName": "api.example.com.",
                "StartRecordType": "A",
                "StartRecordIdentifier": "c",
            },
        )
        weights = await Actuator(client, sleep=sleeps).observed_weights(rs)
    assert weights == {"a": 1, "b": 2, "c": 3}


class BlockingClient:
    """A Route 53 client whose list call blocks its thread until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def list_resource_record_sets(self, **_):
        self.entered.set()
        self.release.wait(10)
        return {"ResourceRecordSets": [], "IsTruncated": False}


async def test_quiesce_waits_for_a_request_whose_task_was_cancelled(record_set):
    client = BlockingClient()
    actuator = Actuator(client)
    assert await actuator.quiesce(within=0.1)  # nothing in flight
    task = asyncio.create_task(actuator.read_group(record_set))
    await asyncio.to_thread(client.entered.wait, 5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    # The task is gone, its request is not: a batch could still land.
    assert not await actuator.quiesce(within=0.2)
    client.release.set()
    assert await actuator.quiesce(within=5)


class SlowChanges:
    """A Route 53 that takes its time to accept a batch (then holds it PENDING)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def change_resource_record_sets(self, **_):
        self.entered.set()
        self.release.wait(10)
        return {"ChangeInfo": {"Id": "/change/C42", "Status": "PENDING"}}


async def test_a_stop_during_a_batch_s_send_still_hears_its_change_id():
    # SIGTERM while Route 53 was taking a batch: the stop waited for the request, which was
    # applied, but the writer had been cancelled, so its change id was never recorded.
    rs = RecordSet(
        zone_id="Z1", name="a.example.com", members=[Member(set_identifier="a", region="us-east-1", value="192.0.2.1")]
    )
    client = SlowChanges()
    actuator = Actuator(client)
    heard: list[tuple[str, float]] = []

    async def submitted(change_id: str, at: float) -> None:
        heard.append((change_id, at))

    writing = asyncio.create_task(actuator.apply(rs, {"a": 5}, expected=None, group={}, on_submitted=submitted))
    await asyncio.to_thread(client.entered.wait, 5)
    writing.cancel()  # the stop
    with contextlib.suppress(asyncio.CancelledError):
        await writing
    assert not await actuator.quiesce(within=0.2)  # still on its way
    client.release.set()
    assert await actuator.quiesce(within=5)
    assert [change_id for change_id, _ in heard] == ["/change/C42"]
    actuator.close()


async def test_a_request_cancelled_before_its_thread_took_it_is_not_waited_for(record_set):
    # CI, stop 26: a daemon stopped just as a read was handed to a thread; the read was dropped
    # unsent, but still counted as in flight, and the stop waited 25 s for it.
    client = BlockingClient()
    actuator = Actuator(client, threads=1)
    running = asyncio.create_task(actuator.read_group(record_set))
    await asyncio.to_thread(client.entered.wait, 5)
    queued = asyncio.create_task(actuator.read_group(record_set))  # no thread free: it waits its turn
    await asyncio.sleep(0.05)
    queued.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await queued
    client.entered.clear()
    client.release.set()
    assert await running == {}
    assert await actuator.quiesce(within=5)
    assert not client.entered.is_set()  # the cancelled read was never sent
    actuator.close()


def test_a_record_set_waiting_its_turn_is_in_contact_one_whose_reads_fail_is_not():
    rs = RecordSet(
        zone_id="Z1", name="a.example.com", members=[Member(set_identifier="a", region="us-east-1", value="192.0.2.1")]
    )
    other = rs.model_copy(update={"name": "b.example.com"})
    config = Config(regions=[Region(name="us-east-1")], record_sets=[rs, other])
    now = [1000.0]
    actuator = Actuator(BlockingClient(), clock=lambda: now[0])

    class Lease:
        holder = "test"

    reconciler = Reconciler(config, actuator, store=None, lease=Lease(), clock=lambda: now[0])
    now[0] = 1300.0
    assert reconciler.actuation(now[0], stale_after=60) == {
        rs.key: "Route 53 not read for 300s",
        other.key: "Route 53 not read for 300s",
    }
    actuator.last_success_at = 1290.0  # GetChange answers while another record set's change goes INSYNC
    reconciler.views[other.key].error = "AccessDenied: not allowed"
    assert reconciler.actuation(now[0], stale_after=60) == {other.key: "Route 53: AccessDenied: not allowed"}
    assert reconciler.last_contact(rs.key) == 1290.0
    assert reconciler.last_contact(other.key) == 1000.0  # its own reads fail: only they count


ONE_MEMBER = RecordSet(
    zone_id="Z1", name="a.example.com", members=[Member(set_identifier="a", region="us-east-1", value="192.0.2.1")]
)


def reads_only(store: Store, answers: list[BaseException | None]) -> Reconciler:
    """A reconciler of `ONE_MEMBER` over a Route 53 whose reads answer `answers` in turn (an error
    raised, or None: an empty group), the last one for ever after."""

    class Reads:
        calls = 0

        async def read_group(self, _rs):
            answer = answers[min(self.calls, len(answers) - 1)]
            self.calls += 1
            if answer is not None:
                raise answer
            return {}

        @staticmethod
        def weights_of(_rs, _group):
            return {}

    class Lease:
        holder = "test"

    config = Config(regions=[Region(name="us-east-1")], record_sets=[ONE_MEMBER])
    return Reconciler(config, Reads(), store=store, lease=Lease(), clock=lambda: 1000.0)


async def test_a_route53_error_that_lasts_is_logged_once_and_its_end_is_logged_too(tmp_path):
    # A zone gone (or Route 53 unreachable) was logged at every reconcile: 21 error lines in 20 s,
    # and nothing said when Route 53 answered again.
    answers: list[BaseException | None] = [
        *[TerminalError("NoSuchHostedZone: no hosted zone found with ID: Z1")] * 5,
        RetryableError("network: connection refused"),
        RetryableError("network: connection refused"),
        None,
    ]
    async with Store(tmp_path / "state.sqlite") as store:
        reconciler = reads_only(store, answers)
        with structlog.testing.capture_logs() as logged:
            for tick in range(len(answers)):
                await reconciler.tick({}, 1000.0 + tick)
    # The repeats go to debug (which the daemon's log level may leave out before this sees them).
    said = [
        (e["event"], e["log_level"]) for e in logged if e["event"].startswith("route53") and e["log_level"] != "debug"
    ]
    assert said == [
        ("route53 refused a read", "error"),  # once for five
        ("route53 unavailable, will retry", "warning"),  # another kind of error: said again
        ("route53 answers again", "info"),
    ]
    assert [e["failing_for"] for e in logged if e["event"] == "route53 answers again"] == [7.0]
    assert reconciler.views[ONE_MEMBER.key].errors == {"terminal": 5, "retryable": 2}


async def test_route53_answers_again_only_when_a_whole_tick_went_through(tmp_path, monkeypatch):
    # GetChange kept failing while reads answered: "route53 answers again" came after every read,
    # between two "route53 unavailable" lines, for a minute and a half.
    failing = [RetryableError("GetChange: 500"), RetryableError("GetChange: 500"), None]
    async with Store(tmp_path / "state.sqlite") as store:
        reconciler = reads_only(store, [None])

        async def later_in_the_tick(*_args):
            if (error := failing.pop(0)) is not None:
                raise error

        monkeypatch.setattr(reconciler, "_settle_open_intent", later_in_the_tick)
        with structlog.testing.capture_logs() as logged:
            for tick in range(3):
                await reconciler.tick({}, 1000.0 + tick)
    said = [e["event"] for e in logged if e["event"].startswith("route53") and e["log_level"] != "debug"]
    assert said == ["route53 unavailable, will retry", "route53 answers again"]
    assert [e["failing_for"] for e in logged if e["event"] == "route53 answers again"] == [2.0]
