"""The event bus: published once, delivered to every subscriber, a slow one loses (and counts)
what its queue cannot hold without slowing anybody."""

import asyncio

from controller.events.bus import Bus
from controller.events.kinds import ActionTaken, VerdictChanged


def verdict(at: float, status: str = "degraded") -> VerdictChanged:
    return VerdictChanged(
        at=at, region="eu-west-1", previous="healthy", status=status, reasons=("api: 3 of 10 failed",)
    )


async def test_every_subscriber_gets_each_event_once_in_order_with_increasing_ids():
    bus = Bus()
    a, b = bus.subscribe(), bus.subscribe()
    published = [bus.publish(verdict(float(i))) for i in range(3)]
    assert [e.id for e in published] == [1, 2, 3]
    for sub in (a, b):
        got = [await asyncio.wait_for(anext(sub), 1) for _ in range(3)]
        assert got == published
        assert sub.pending() == 0
        assert sub.dropped == 0


async def test_a_slow_subscriber_drops_and_counts_without_holding_back_the_others():
    bus = Bus()
    slow, fast = bus.subscribe(maxsize=2), bus.subscribe(maxsize=100)
    for i in range(5):
        bus.publish(verdict(float(i)))
    assert slow.dropped == 3
    assert slow.pending() == 2
    assert [(await anext(slow)).at for _ in range(2)] == [0.0, 1.0]  # the oldest kept, the rest counted
    assert fast.dropped == 0
    assert fast.pending() == 5


async def test_a_closed_subscription_receives_nothing_and_history_keeps_the_newest():
    bus = Bus(history=3)
    async with bus.subscribe() as sub:
        assert bus.subscribers == 1
    assert bus.subscribers == 0
    for i in range(5):
        bus.publish(verdict(float(i)))
    assert sub.pending() == 0
    assert [e.at for e in bus.recent()] == [2.0, 3.0, 4.0]
    assert [e.at for e in bus.recent(2)] == [3.0, 4.0]


def test_events_serialise_as_the_state_api_has_always_shown_them():
    bus = Bus()
    v = bus.publish(verdict(10.0))
    a = bus.publish(
        ActionTaken(
            at=11.0,
            record="api.example.com/A",
            action="rollback",
            actor="ramp:launch",
            outcome="applied",
            reason="eu-west-1 degraded",
            weights={"use1": 1, "euw1": 0},
            regions=("eu-west-1",),
        )
    )
    assert v.to_json() == {
        "id": 1,
        "kind": "verdict",
        "at": 10.0,
        "region": "eu-west-1",
        "from": "healthy",
        "to": "degraded",
        "reasons": ["api: 3 of 10 failed"],
    }
    assert a.to_json()["kind"] == "action"
    assert a.to_json()["regions"] == ["eu-west-1"]
    assert a.to_json()["weights"] == {"use1": 1, "euw1": 0}
