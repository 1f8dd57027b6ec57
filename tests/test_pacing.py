"""Guardrail 2 at the shipped defaults (TTL 60 s, bake 10 m, max_step 25%) on virtual time: the
reconciler and the actuator against moto's Route 53, a clock the test moves, restarts (a new
process over the same state file), data gaps and answers lost between intent and result. The
pacing is checked from the audit log by `tests.pacing`, which does not share the code it checks."""

from __future__ import annotations

import contextlib
import itertools
import uuid
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from controller.acting.reconciler import Reconciler
from controller.acting.route53 import Actuator, make_client
from controller.demo.world import seed_weighted_group
from controller.judging.verdicts import Verdict
from controller.planning.weights import shares
from controller.settings.loading import load_policy
from controller.settings.schema import Config, ControllerSettings, Member, RecordSet, Region, Route53Settings
from controller.state.holder import this_process
from controller.state.store import Store
from tests import pacing
from tests.test_shifting import CREDENTIALS, direct_client, read_weights, set_weight

POLICIES = Path(__file__).resolve().parent.parent / "policies"
T0 = 1_800_000_000.0
TTL = 60
INSYNC_TIMEOUT = 300.0  # the shipped route53.insync_timeout


def shipped_config(route53, tmp_path, home: dict[str, int], regions=("us-east-1", "eu-west-1", "ap-south-1")):
    """The shipped policies (verdicts, guardrails, the eu-west-1 launch ramp) on a fresh zone."""
    client = direct_client(route53.url)
    zone = client.create_hosted_zone(Name=f"z{uuid.uuid4().hex[:8]}.example.com", CallerReference=uuid.uuid4().hex)
    zone_id = zone["HostedZone"]["Id"].split("/")[-1]
    name = "api." + zone["HostedZone"]["Name"].rstrip(".")
    sids = {r: r.replace("-", "")[:6] for r in regions}
    seed_weighted_group(
        client, zone_id, name, [(sids[r], home[r], f"192.0.2.{i + 1}") for i, r in enumerate(regions)], ttl=TTL
    )
    policy, _ = load_policy(
        [POLICIES / "verdicts.yaml", POLICIES / "guardrails.yaml", POLICIES / "ramp-eu-west-1.yaml"]
    )
    ramp = policy.ramps["launch-eu-west-1"].model_copy(update={"record_set": name})
    policy = policy.model_copy(update={"ramps": {"launch": ramp}})
    config = Config(
        controller=ControllerSettings(
            state_path=str(tmp_path / "state.sqlite"),
            route53=Route53Settings(endpoint_url=route53.url, poll_interval=0.01),
        ),
        regions=[Region(name=r) for r in regions],
        record_sets=[
            RecordSet(
                zone_id=zone_id,
                name=name,
                ttl=TTL,
                members=[
                    Member(set_identifier=sids[r], region=r, value=f"192.0.2.{i + 1}") for i, r in enumerate(regions)
                ],
            )
        ],
        policy=policy,
    )
    return config, zone_id, name, sids


class Virtual:
    """One controller process after another over the same state file, on a clock the test moves."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.now = T0
        self.statuses: dict[str, tuple[str, float, frozenset[str]]] = {
            r.name: ("healthy", T0 - 3600, frozenset()) for r in config.regions
        }
        self.client = make_client(config.controller.route53.endpoint_url, **CREDENTIALS)
        self.stack = contextlib.AsyncExitStack()
        self.reconciler: Reconciler

    @property
    def key(self) -> str:
        return self.config.record_sets[0].key

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc):
        await self.stack.aclose()

    async def start(self) -> None:
        """A new process: the state file is all it keeps. Its dead predecessor's lease is taken at
        once (the test's processes are one, so the takeover is told that the holder is gone)."""
        await self.stack.aclose()
        store = await self.stack.enter_async_context(Store(self.config.state_file))

        async def no_wait(_: float) -> None:
            return None

        actuator = Actuator(self.client, clock=lambda: self.now, sleep=no_wait, poll_interval=0.0)
        lease = store.lease(str(this_process()), 30, gone=lambda _: True)
        self.reconciler = Reconciler(self.config, actuator, store, lease, clock=lambda: self.now)
        await self.reconciler.load()
        self.reconciler.lease_token = await lease.acquire(self.now)
        assert self.reconciler.lease_token is not None

    def set(self, region: str, status: str, troubles: frozenset[str] = frozenset()) -> None:
        if self.statuses[region][0] != status or self.statuses[region][2] != troubles:
            since = self.now if self.statuses[region][0] != status else self.statuses[region][1]
            self.statuses[region] = (status, since, troubles)

    def verdicts(self) -> dict[str, Verdict]:
        return {r: Verdict(r, s, (), {}, since, self.now, t) for r, (s, since, t) in self.statuses.items()}

    async def run(self, seconds: float, every: float = 1.0) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += every
            await self.renew()
            await self.reconciler.tick(self.verdicts(), self.now)

    async def renew(self) -> None:
        """What the lease loop does, on the virtual clock."""
        reconciler = self.reconciler
        reconciler.lease_token = await reconciler.lease.acquire(self.now)
        assert reconciler.lease_token is not None

    def steps(self) -> list[pacing.Step]:
        bake = {"forward": self.config.policy.ramps["launch"].bake}

        def bake_of(action: str) -> float:
            return bake.get(action, self.config.policy.evacuation.step_bake)

        return pacing.from_audit(self.config.state_file, self.key, TTL, bake_of, INSYNC_TIMEOUT)


def assert_paced(steps: list[pacing.Step], max_step: float = 25.0) -> None:
    text = pacing.report(steps)
    assert [s.early for s in steps] == [0.0] * len(steps), f"sent before due:\n{text}"
    assert all(s.moved <= max_step + 1e-9 for s in steps), f"moved more than max_step:\n{text}"


async def test_evacuation_and_restore_wait_insync_plus_ttl_between_steps(route53, tmp_path):
    home = {"us-east-1": 100, "eu-west-1": 100, "ap-south-1": 100}
    config, zone_id, name, sids = shipped_config(route53, tmp_path, home)
    async with Virtual(config) as world:
        await world.run(5)
        world.set("eu-west-1", "degraded", frozenset({"orders"}))
        await world.run(200)
        assert shares(read_weights(route53, zone_id, name))[sids["eu-west-1"]] == 0.0, world.reconciler.views[world.key]
        world.set("eu-west-1", "healthy")
        await world.run(900, every=5)
        steps = world.steps()
    assert_paced(steps)
    t0 = T0 + 5
    # Each evacuation step 60 s (the TTL; step_bake 0) after the previous one's INSYNC; the
    # restore waits 10 minutes of health, then steps as slowly.
    assert [(s.action, round(s.sent_at - t0)) for s in steps] == [
        ("evacuation", 30),  # once degraded for confirm_after (30 s)
        ("evacuation", 90),
        ("restore", 800),
        ("restore", 860),
    ]
    assert shares(read_weights(route53, zone_id, name)) == pytest.approx(
        shares(dict.fromkeys(sids.values(), 100)), abs=0.5
    )


async def test_a_shipped_ramp_keeps_its_pace_through_restarts_data_gaps_and_lost_answers(route53, tmp_path):
    home = {"us-east-1": 100, "eu-west-1": 0, "ap-south-1": 100}
    config, _zone_id, _name, _sids = shipped_config(route53, tmp_path, home)
    async with Virtual(config) as world:
        await world.run(301, every=5)  # the start gate (5 m) is over: the ramp starts at once
        refused = await world.reconciler.act("launch", "start", world.now, "test")
        assert refused is None
        await world.run(1)  # step 1 is sent and INSYNC
        for step in range(2, 6):  # steps 2 to 5, with something unkind in each bake
            await world.run(8)
            await world.start()  # a restart 8 s after the step's INSYNC
            world.set("eu-west-1", "unknown")  # then a data gap: no fresh results for 30 s
            await world.run(30)
            world.set("eu-west-1", "healthy")
            while len(world.steps()) < step:
                await world.run(7, every=7)
        await world.run(700, every=7)
        ramp = world.reconciler.ramps["launch"]
        steps = world.steps()
    assert ramp.status == "done", ramp
    assert_paced(steps)
    assert len(steps) == 5
    # From each step's INSYNC: 60 s TTL + 600 s bake; the tick after that (every 7 s from the
    # end of the gap, 38 s after the step) sends the next one.
    gaps = [round(b.sent_at - a.sent_at) for a, b in itertools.pairwise(steps)]
    assert gaps == [661, 661, 661, 661]


async def test_a_step_whose_answer_was_lost_counts_its_insync_from_when_it_was_found_plus_the_insync_wait(
    route53, tmp_path
):
    home = {"us-east-1": 100, "eu-west-1": 100, "ap-south-1": 100}
    config, zone_id, name, sids = shipped_config(route53, tmp_path, home)
    async with Virtual(config) as world:
        store = world.reconciler.store
        before = read_weights(route53, zone_id, name)
        after = {**before, sids["eu-west-1"]: 40, sids["us-east-1"]: 130, sids["ap-south-1"]: 130}
        # A process wrote its intent and sent the batch, and died before the answer came.
        await store.audit.intent(
            world.key, "regionshift (lease 1)", "evacuation", "evacuating eu-west-1", before, after, T0
        )
        for i, (sid, weight) in enumerate(after.items()):
            set_weight(route53, zone_id, name, sid, weight, f"192.0.2.{i + 1}", ttl=TTL)
        await world.start()
        world.set("eu-west-1", "degraded", frozenset({"orders"}))
        await world.run(500, every=2)
        steps = world.steps()
    assert_paced(steps)
    # Found applied at the first tick (T0 + 2): INSYNC unknown, so 300 s for it, + TTL 60 s.
    assert [(s.action, round(s.sent_at - T0)) for s in steps] == [("evacuation", 0), ("evacuation", 362)]


async def test_an_evacuation_step_keeps_its_change_id_and_insync_time_in_the_state_file(route53, tmp_path):
    home = {"us-east-1": 100, "eu-west-1": 100, "ap-south-1": 100}
    config, _zone_id, _name, _sids = shipped_config(route53, tmp_path, home)
    async with Virtual(config) as world:
        world.set("eu-west-1", "degraded", frozenset({"orders"}))
        await world.run(30)  # the first evacuation step once confirmed (30 s), INSYNC at once
        store = world.reconciler.store
        first = await store.audit.last_forward(world.key, ("evacuation",))
        assert first is not None
        assert first.insync_at == T0 + 30
        assert first.change_id is not None  # recorded when Route 53 accepted the batch
    async with Store(config.state_file) as store:
        assert (await store.audit.last_forward(world.key, ("evacuation",))) == first


@pytest.mark.parametrize("everyone", ["degraded", "healthy but troubled"])
async def test_nothing_moves_when_every_region_shares_the_trouble(route53, tmp_path, everyone):
    home = {"us-east-1": 100, "eu-west-1": 100, "ap-south-1": 100}
    config, zone_id, name, sids = shipped_config(route53, tmp_path, home)
    async with Virtual(config) as world:
        world.set("eu-west-1", "degraded", frozenset({"orders"}))
        for region in ("us-east-1", "ap-south-1"):
            world.set(region, "degraded" if everyone == "degraded" else "healthy", frozenset({"orders"}))
        await world.run(120)
        reason = world.reconciler.views[world.key].reason
    assert read_weights(route53, zone_id, name) == {sids[r]: w for r, w in home.items()}
    assert world.steps() == []
    if everyone == "degraded":
        assert reason == "every region that could take traffic looks bad; holding the weights"
    else:
        assert reason.startswith("holding the weights: a shared cause: ")
        assert "shows the trouble of eu-west-1 (orders)" in reason


async def test_a_rollback_is_not_paced_it_goes_back_at_once(route53, tmp_path):
    home = {"us-east-1": 100, "eu-west-1": 0, "ap-south-1": 100}
    config, zone_id, name, sids = shipped_config(route53, tmp_path, home)
    async with Virtual(config) as world:
        await world.run(301, every=5)
        assert await world.reconciler.act("launch", "start", world.now, "test") is None
        await world.run(1)  # step 1: eu-west-1 at 1%, INSYNC now
        stepped = world.now
        await world.run(5)
        world.set("eu-west-1", "degraded", frozenset({"orders"}))
        await world.run(1)  # the next tick: back to the weights before the ramp, 6 s after the step
        weights = read_weights(route53, zone_id, name)
        events = await world.reconciler.store.audit.events()
    rollback = next(e for e in events if e["phase"] == "intent" and e["action"] == "rollback")
    assert rollback["at"] - stepped == 6.0
    assert weights == {sids[r]: w for r, w in home.items()}


async def test_a_ramp_does_not_start_while_an_evacuation_or_its_restore_is_under_way(route53, tmp_path):
    # Started during a restore, a ramp stepped from the half-restored weights and made its last
    # step the new home: ap-south-1 stayed at 22.5% of the 50% it came back to, and nothing said so.
    home = {"us-east-1": 100, "eu-west-1": 0, "ap-south-1": 100}
    config, zone_id, name, sids = shipped_config(route53, tmp_path, home)
    async with Virtual(config) as world:
        await world.run(5)
        world.set("ap-south-1", "degraded", frozenset({"orders"}))
        await world.run(200)
        refused = await world.reconciler.act("launch", "start", world.now, "test")
        assert refused == (
            f"{world.key} is away from its home weights (us-east-1 100.0% of its 50.0%, ap-south-1 0.0% of its"
            " 50.0%): an evacuation or its restore is under way; start the ramp once the record set is back home"
        )
        world.set("ap-south-1", "healthy")
        await world.run(620, every=5)  # the first restore step is sent 800 s in, the second 860 s in
        assert shares(read_weights(route53, zone_id, name))[sids["ap-south-1"]] == pytest.approx(25.0, abs=0.5)
        refused = await world.reconciler.act("launch", "start", world.now, "test")
        assert refused is not None
        assert "ap-south-1 25.0% of its 50.0%" in refused
        assert world.reconciler.ramps["launch"].status == "pending"
        await world.run(120, every=5)  # the last restore step: home again
        assert await world.reconciler.act("launch", "start", world.now, "test") is None
        assert world.reconciler.ramps["launch"].status == "running"


async def test_a_write_that_lands_after_a_restart_settled_it_not_applied_is_regionshift_s_own_not_drift(
    route53, tmp_path
):
    # A step's request still in flight when the daemon was SIGKILLed landed 12 s later, after the
    # restart had settled its intent "not applied": it was taken for a hand edit, the audit blamed
    # an operator, and the failing region kept the share that step gave it.
    home = {"us-east-1": 100, "eu-west-1": 100, "ap-south-1": 100}
    config, zone_id, name, sids = shipped_config(route53, tmp_path, home)
    async with Virtual(config) as world:
        await world.run(5)
        audit = world.reconciler.store.audit
        before = {sids[r]: w for r, w in home.items()}
        sent = {**before, sids["ap-south-1"]: 50}
        intent = await audit.intent(world.key, "regionshift", "evacuation", "a step", before, sent, world.now)
        await world.start()  # the restart: Route 53 still holds what was there, so not applied
        audit = world.reconciler.store.audit
        await world.run(1)
        assert await audit.open_intent(world.key) is None
        set_weight(route53, zone_id, name, sids["ap-south-1"], 50, "192.0.2.3", ttl=TTL)  # it lands
        await world.run(1)
        view = world.reconciler.views[world.key]
        assert view.drift is None, view.drift
        assert await audit.last_applied(world.key) == sent
        (change,) = [c for c in await audit.changes(record=world.key) if c["id"] == intent]
        assert (change["outcome"], change["error"]) == (
            "applied",
            "landed after a restart settled it as not applied: sent before the stop",
        )
        # The record set is regionshift's again: with every region healthy, back home it goes.
        await world.run(900, every=5)
        assert shares(read_weights(route53, zone_id, name)) == pytest.approx(shares(before), abs=0.5)


async def test_configured_weights_other_than_route53_s_are_said_never_restored_to(route53, tmp_path):
    # Home was the configured weights: a daemon whose configuration said 1:1:1 over a record set
    # holding 1:0:1 "restored" eu-west-1 to a third of the traffic on its own, nothing evacuated.
    held = {"us-east-1": 100, "eu-west-1": 0, "ap-south-1": 100}
    config, zone_id, name, sids = shipped_config(route53, tmp_path, held)
    rs = config.record_sets[0]
    configured = [m.model_copy(update={"weight": 100}) for m in rs.members]
    config = config.model_copy(update={"record_sets": [rs.model_copy(update={"members": configured})]})
    with capture_logs() as logs:
        async with Virtual(config) as world:
            await world.run(1800, every=10)  # far past restore_after (10 m), every region healthy
            reason = world.reconciler.views[world.key].reason
            steps = world.steps()
    assert steps == []
    assert read_weights(route53, zone_id, name) == {sids[r]: w for r, w in held.items()}
    assert reason == "at home weights", reason
    told = [e for e in logs if e["event"].startswith("Route 53 holds other weights than the configuration")]
    assert [(e["log_level"], e["route53"], e["configured"]) for e in told] == [
        ("warning", {sids[r]: w for r, w in held.items()}, dict.fromkeys(sids.values(), 100))
    ]


async def test_a_ramp_does_not_start_while_another_ramp_holds_its_record_set(route53, tmp_path):
    # It was refused as "an evacuation or its restore is under way": none was.
    home = {"us-east-1": 100, "eu-west-1": 0, "ap-south-1": 100}
    config, _zone_id, _name, _sids = shipped_config(route53, tmp_path, home)
    ramps = config.policy.ramps
    policy = config.policy.model_copy(update={"ramps": {**ramps, "again": ramps["launch"]}})
    config = config.model_copy(update={"policy": policy})
    async with Virtual(config) as world:
        await world.run(5)
        assert await world.reconciler.act("launch", "start", world.now, "test") is None
        await world.run(400, every=5)  # past the start gate: the first step is out, baking
        refused = await world.reconciler.act("again", "start", world.now, "test")
        assert refused == (f"ramp launch holds {world.key} (baking): abort it or let it finish before starting again")
        assert world.reconciler.ramps["again"].status == "pending"


async def test_an_all_zero_group_is_no_home_to_remember(route53, tmp_path):
    # Remembered at first sight, an all-zero group (Route 53 answers it as equal shares) would stay
    # the record set's home for good: "no home weights", and no evacuation would ever move it.
    zeros = {"us-east-1": 0, "eu-west-1": 0, "ap-south-1": 0}
    config, _zone_id, _name, _sids = shipped_config(route53, tmp_path, zeros)
    async with Virtual(config) as world:
        await world.run(3)
        assert await world.reconciler.store.flags.home(world.key) is None
        assert world.reconciler.views[world.key].reason == "no ramp; evacuation off or no home weights"


async def test_a_standby_looks_at_the_writer_lease_every_second_the_writer_every_third_of_its_ttl(
    route53, tmp_path, monkeypatch
):
    # At a third of a 30 s lease, a standby beside a SIGKILLed writer took over 7 s after the kill.
    config, _zone_id, _name, _sids = shipped_config(
        route53, tmp_path, {"us-east-1": 1, "eu-west-1": 0, "ap-south-1": 1}
    )

    class Held:
        holder = "standby"

        def __init__(self, token: int | None) -> None:
            self.token = token

        async def acquire(self, _now: float) -> int | None:
            return self.token

        async def renew(self, token: int, _now: float) -> bool:
            return token == self.token

        async def held_by(self, _now: float) -> tuple[str, int]:
            return ("writer", 1)

    class SleptError(Exception):
        pass

    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        raise SleptError

    async with Virtual(config) as world:
        reconciler = world.reconciler
        monkeypatch.setattr("controller.acting.reconciler.asyncio.sleep", sleep)
        for token in (None, 7):
            reconciler.lease, reconciler.lease_token = Held(token), None
            with pytest.raises(SleptError):
                await reconciler.keep_lease(10.0, lambda: world.now)
    assert waits == [1.0, 10.0]
