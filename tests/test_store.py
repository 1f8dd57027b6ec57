"""The state store: an append-only audit log, open intents after a crash, ramp state and flags."""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from controller.state.database import StateError
from controller.state.holder import Holder, provably_gone, start_time, this_process
from controller.state.store import Store


async def test_intent_then_result_is_the_last_applied_write(tmp_path):
    async with Store(tmp_path / "state.sqlite") as store:
        assert await store.audit.last_applied("api.example.com/A") is None
        first = await store.audit.intent(
            "api.example.com/A",
            "ramp:launch",
            "forward",
            "step 1 of 5",
            {"use1": 99, "euw1": 1},
            {"use1": 19, "euw1": 1},
            at=10.0,
        )
        assert (await store.audit.open_intent("api.example.com/A")).id == first
        await store.audit.result(first, "applied", 11.0, change_id="/change/C1", insync_at=12.0)
        assert await store.audit.open_intent("api.example.com/A") is None
        assert await store.audit.last_applied("api.example.com/A") == {"use1": 19, "euw1": 1}
        failed = await store.audit.intent(
            "api.example.com/A",
            "ramp:launch",
            "forward",
            "step 2 of 5",
            {"use1": 19, "euw1": 1},
            {"use1": 9, "euw1": 1},
            at=20.0,
        )
        await store.audit.result(failed, "failed", 21.0, error="Throttling: Rate exceeded")
        assert await store.audit.last_applied("api.example.com/A") == {"use1": 19, "euw1": 1}
        events = await store.audit.events()
    assert [(e["phase"], e["outcome"], e["reason"]) for e in events] == [
        ("intent", None, "step 1 of 5"),
        ("result", "applied", "step 1 of 5"),
        ("intent", None, "step 2 of 5"),
        ("result", "failed", "step 2 of 5"),
    ]
    assert events[1]["change_id"] == "/change/C1"
    assert events[3]["error"] == "Throttling: Rate exceeded"
    assert events[0]["from_weights"] == {"use1": 99, "euw1": 1}


async def test_an_intent_without_result_survives_a_restart(tmp_path):
    path = tmp_path / "state.sqlite"
    async with Store(path) as store:
        await store.audit.intent("api.example.com/A", "ramp:launch", "forward", "step 1", {"a": 1}, {"a": 2}, at=1.0)
    async with Store(path) as store:
        intent = await store.audit.open_intent("api.example.com/A")
    assert intent is not None
    assert (intent.actor, intent.from_weights, intent.to_weights) == ("ramp:launch", {"a": 1}, {"a": 2})


async def test_the_audit_log_refuses_updates_and_deletes(tmp_path):
    path = tmp_path / "state.sqlite"
    async with Store(path) as store:
        await store.audit.intent("r", "operator", "rollback", "because", {}, {"a": 1}, at=1.0)
    db = sqlite3.connect(path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE audit SET reason = 'rewritten'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM audit")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


async def test_operators_actions_are_kept_append_only_and_found_by_target_and_time(tmp_path):
    path = tmp_path / "state.sqlite"
    async with Store(path) as store:
        await store.audit.operator(10.0, "alice", "start", "ramp:launch", "started by an operator (alice)")
        await store.audit.operator(20.0, "bob", "freeze", "shifting", "incident 42")
        await store.audit.operator(30.0, "alice", "adopt", "api.example.com/A", "console edit kept")
        await store.audit.operator(40.0, "carol", "start", "ramp:other", "started by an operator (carol)")
    async with Store(path) as store:  # kept across a restart
        every = await store.audit.operator_actions()
        mine = await store.audit.operator_actions(targets=["api.example.com/A", "shifting", "ramp:launch"], since=15.0)
        capped = await store.audit.operator_actions(limit=1)
    assert [(o["who"], o["action"]) for o in every] == [
        ("carol", "start"),
        ("alice", "adopt"),
        ("bob", "freeze"),
        ("alice", "start"),
    ]
    assert [(o["at"], o["target"]) for o in mine] == [(30.0, "api.example.com/A"), (20.0, "shifting")]
    assert [o["who"] for o in capped] == ["carol"]
    db = sqlite3.connect(path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE operator_actions SET who = 'mallory'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM operator_actions")
    db.close()


async def test_ramp_state_and_flags_round_trip(tmp_path):
    path = tmp_path / "state.sqlite"
    async with Store(path) as store:
        await store.ramps.save("launch", {"status": "baking", "step": 2}, at=1.0)
        await store.ramps.save("launch", {"status": "baking", "step": 3}, at=2.0)
        await store.flags.set_frozen({"by": "alice", "reason": "incident", "at": 3.0}, at=3.0)
    async with Store(path) as store:
        assert await store.ramps.load() == {"launch": {"status": "baking", "step": 3}}
        assert await store.flags.frozen() == {"by": "alice", "reason": "incident", "at": 3.0}
        assert await store.flags.home("missing/A") is None


async def test_the_writer_lease_has_one_holder_and_a_fencing_token_that_grows_on_takeover(tmp_path):
    async with Store(tmp_path / "state.sqlite") as a, Store(tmp_path / "state.sqlite") as b:
        assert await a.lease("a", 10).acquire(100.0) == 1
        assert await b.lease("b", 10).acquire(105.0) is None  # a holds it
        assert await a.lease("a", 10).acquire(108.0) == 1  # renewed, same token
        assert await b.lease("b", 10).acquire(117.0) is None  # renewal moved expiry to 118
        assert await b.lease("b", 10).acquire(118.5) == 2  # expired: b takes over
        assert await a.lease("a", 10).holds(1, 118.6) is False  # a's old token is fenced off
        assert await b.lease("b", 10).holds(2, 118.6) is True
        assert await a.lease("a", 10).acquire(119.0) is None


async def test_a_predecessor_on_this_host_whose_process_is_gone_hands_over_the_lease_at_once(tmp_path):
    # A live process on this host stands for the predecessor daemon.
    sleeper = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(30)")
    try:
        me = this_process()
        live = str(replace(me, pid=sleeper.pid, start=start_time(sleeper.pid)))
        async with Store(tmp_path / "state.sqlite") as store:
            assert await store.lease(live, 30).acquire(100.0) == 1
            # Alive: the lease is kept until it expires, whoever asks.
            assert await store.lease(str(me), 30, gone=provably_gone).acquire(101.0) is None
            sleeper.kill()
            await sleeper.wait()
            # Gone (a SIGKILL): taken at once, 29 s before it would expire, with a higher token.
            assert await store.lease(str(me), 30, gone=provably_gone).acquire(101.0) == 2
    finally:
        if sleeper.returncode is None:
            sleeper.kill()
            await sleeper.wait()


def test_a_predecessor_that_exited_unreaped_is_gone():
    # A daemon SIGKILLed under a parent that does not reap it stays a zombie: it holds nothing.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        stat = Path(f"/proc/{child.pid}/stat")
        deadline = time.monotonic() + 10
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        start = stat.read_text().rsplit(")", 1)[1].split()[19]
        assert provably_gone(str(replace(this_process(), pid=child.pid, start=start)))
    finally:
        child.wait()


def test_only_a_holder_provably_gone_from_this_host_counts_as_gone():
    me = this_process()
    assert not provably_gone(str(me))  # this very process
    assert not provably_gone(str(replace(me, nonce="other")))  # another controller in this process
    assert provably_gone(str(replace(me, start=str(int(me.start) + 1))))  # our pid, an earlier process
    assert not provably_gone(str(replace(me, host="elsewhere", pid=999_999)))  # another host: cannot tell
    assert not provably_gone(str(replace(me, boot="0" * 12, pid=999_999)))  # before a reboot? cannot tell
    assert not provably_gone(str(replace(me, namespace="1", pid=999_999)))  # another container: cannot tell
    assert not provably_gone("vm:4242:1a2b3c4d")  # an older holder name carries no proof
    assert provably_gone(str(replace(me, pid=999_999_999)))  # no such process
    assert Holder.parse(str(replace(me, host="host:with:colons"))) == replace(me, host="host:with:colons")


def test_a_holder_this_process_may_not_look_at_is_taken_for_alive(monkeypatch):
    def hidden(pid: int) -> str:
        raise PermissionError(f"/proc/{pid}/stat")  # /proc mounted with hidepid=2

    me = this_process()
    monkeypatch.setattr("controller.state.holder.start_time", hidden)
    assert not provably_gone(str(replace(me, pid=4242)))


async def test_the_sqlite_lease_renews_only_with_its_token_and_a_release_hands_over_at_once(tmp_path):
    async with Store(tmp_path / "state.sqlite") as store:
        a, b = store.lease("a", 10), store.lease("b", 10)
        token = await a.acquire(100.0)
        assert token == 1
        assert await a.renew(token, 109.0) is True  # expiry moves to 119
        assert await b.acquire(115.0) is None
        assert await a.renew(token + 1, 116.0) is False  # a token it was never given
        await b.release(token)  # not b's lease: nothing happens
        assert await a.holds(token, 116.0) is True
        await a.release(token)  # an orderly stop
        assert await a.holds(token, 116.0) is False
        assert await b.acquire(116.0) == 2  # taken at once, fenced with a new token
        assert await a.renew(token, 117.0) is False


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_a_state_file_regionshift_did_not_write_is_refused_and_left_untouched(tmp_path):
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"a log file, not a database\n" * 100)
    foreign = tmp_path / "foreign.sqlite"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE customers (id INTEGER)")
    db.commit()
    db.close()
    for path, expected in (
        (garbage, "is not a regionshift state file"),
        (foreign, "did not create (tables: customers)"),
    ):
        before = _digest(path)
        with pytest.raises(StateError, match=re.escape(expected)) as refused:
            async with Store(path):
                pass
        assert str(path) in str(refused.value)
        assert "left untouched" in str(refused.value)
        assert _digest(path) == before
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(path.name)) == [path.name]


async def test_a_damaged_state_file_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "state.sqlite"
    async with Store(path) as store:
        for i in range(200):
            await store.audit.intent("r", "x", "forward", "why " * 50, {"a": i}, {"a": i + 1}, at=float(i))
    data = bytearray(path.read_bytes())
    data[4096:8192] = b"\xff" * 4096  # a page of the audit table overwritten
    path.write_bytes(bytes(data))
    before = _digest(path)
    with pytest.raises(StateError, match="damaged") as refused:
        async with Store(path) as store:
            await store.audit.events()
    assert str(path) in str(refused.value)
    assert _digest(path) == before


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (lambda tmp: tmp / "missing" / "state.sqlite", "directory {parent} does not exist"),
        (lambda tmp: tmp, "{path} is a directory"),
        # A directory nobody may write in, root included: sysfs refuses new files.
        (lambda tmp: Path("/sys/regionshift-test.sqlite"), "cannot open the state file {path}"),
    ],
    ids=["missing directory", "a directory", "read-only directory"],
)
async def test_a_state_path_that_cannot_hold_a_state_file_says_where_and_what_to_do(tmp_path, where, expected):
    path = where(tmp_path)
    with pytest.raises(StateError, match=re.escape(expected.format(path=path, parent=path.parent))):
        async with Store(path):
            pass


async def chattr(flag: str, path: Path) -> tuple[int, str]:
    tool = shutil.which("chattr")
    if tool is None:
        return 127, "no chattr on this machine"
    proc = await asyncio.create_subprocess_exec(tool, flag, str(path), stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    return proc.returncode or 0, err.decode().strip()


async def test_a_read_only_state_file_is_refused_with_its_path(tmp_path):
    path = tmp_path / "state.sqlite"
    async with Store(path) as store:
        await store.ramps.save("launch", {"status": "baking"}, at=1.0)
    code, why = await chattr("+i", path)
    if code != 0:
        pytest.skip(f"this filesystem cannot make a file immutable: {why}")
    try:
        with pytest.raises(StateError, match="readonly") as refused:
            async with Store(path):
                pass
        assert str(path) in str(refused.value)
    finally:
        assert (await chattr("-i", path))[0] == 0
    async with Store(path) as store:  # nothing was lost
        assert await store.ramps.load() == {"launch": {"status": "baking"}}
