"""The HTTP API's edges: what it refuses, and how, before anything reaches the reconciler."""

from __future__ import annotations

import contextlib
import json
import logging

import aiohttp
import pytest
import structlog
from prometheus_client import CollectorRegistry

from controller import logs
from controller.events.bus import Bus
from controller.judging.windows import WindowStore
from controller.settings.schema import Config, ControllerSettings, Member, RecordSet, Region
from controller.sinks.prometheus import Metrics
from controller.state.store import Store
from controller.web.api import ApiServer, make_app
from controller.web.views import text
from probes.spec import HttpProbe, redact

TOKEN = "s3cret-token"


class FakeReconciler:
    def __init__(self) -> None:
        self.frozen = None
        self.ramps: dict = {}
        self.calls: list[tuple] = []
        self.holder, self.lease_token, self.writer = "here:1", 1, ("here:1", 1)  # the writer

    async def freeze(self, frozen, now, who, reason) -> None:
        self.calls.append((frozen, who, reason))
        self.frozen = {"by": who, "reason": reason, "at": now} if frozen else None


class Source:
    def __init__(self, token: str | None = TOKEN) -> None:
        self.config = Config(regions=[Region(name="eu-west-1")])
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.bus = Bus()
        self.reconciler = FakeReconciler()
        self.vantage = "controller"
        self.verdicts: dict = {}
        self.windows = WindowStore(60.0)
        self.verdict_log: list = []
        self.set_aside: dict = {}
        self.started_at = 900.0
        self._token = token

    def probe_stats(self):
        return 0, 0

    def agents(self):
        return None

    def clock(self) -> float:
        return 1000.0

    def problems(self):
        return []

    def actuation(self):
        return {}

    def api_token(self):
        return self._token


@contextlib.asynccontextmanager
async def serving(source: Source):
    async with ApiServer(make_app(source), "127.0.0.1", 0) as server, aiohttp.ClientSession(server.url) as http:
        yield http


async def post(http, path, *, data=None, headers=None, auth=f"Bearer {TOKEN}"):
    headers = {"Authorization": auth, "Content-Type": "application/json", **(headers or {})}
    async with http.post(path, data=data, headers=headers) as response:
        return response.status, await response.json()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("[1]", "the body must be a JSON object"),
        ("null", "the body must be a JSON object"),
        ('"x"', "the body must be a JSON object"),
        ("{not json", "the body must be a JSON object"),
        ('{"frozen": "false"}', "frozen: Input should be a valid boolean"),
        ('{"frozen": 1}', "frozen: Input should be a valid boolean"),
        ('{"frozen": true, "reason": ""}', "reason: String should have at least 1 character"),
        ('{"frozen": true, "reason": "' + "x" * 501 + '"}', "reason: String should have at most 500 characters"),
        ('{"frozen": true, "why": "typo"}', "why: Extra inputs are not permitted"),
    ],
)
async def test_a_freeze_body_that_is_not_what_it_should_be_is_refused_with_what_is_wrong(body, expected):
    source = Source()
    async with serving(source) as http:
        status, answer = await post(http, "/api/v1/freeze", data=body)
    assert status == 400
    assert expected in answer["error"]
    assert source.reconciler.calls == []  # nothing froze, nothing unfroze


async def test_a_valid_freeze_and_an_empty_body_freeze_with_the_operator_named():
    source = Source()
    async with serving(source) as http:
        assert await post(
            http,
            "/api/v1/freeze",
            data='{"frozen": true, "reason": "incident 42"}',
            headers={"X-Regionshift-Operator": "alice"},
        ) == (200, {"frozen": {"by": "alice", "reason": "incident 42", "at": 1000.0}})
        assert (await post(http, "/api/v1/freeze", data='{"frozen": false}'))[0] == 200
        assert (await post(http, "/api/v1/freeze"))[0] == 200
    assert source.reconciler.calls == [
        (True, "alice", "incident 42"),
        (False, "api:127.0.0.1", "no reason given"),
        (True, "api:127.0.0.1", "no reason given"),
    ]


@pytest.mark.parametrize("auth", [f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer  {TOKEN} "])
async def test_the_bearer_scheme_is_case_insensitive(auth):
    source = Source()
    async with serving(source) as http:
        assert (await post(http, "/api/v1/freeze", data="{}", auth=auth))[0] == 200


@pytest.mark.parametrize("auth", ["", f"Basic {TOKEN}", "Bearer wrong", f"Bearer {TOKEN}x", TOKEN])
async def test_a_missing_or_wrong_token_is_refused(auth):
    source = Source()
    async with serving(source) as http:
        status, answer = await post(http, "/api/v1/freeze", data="{}", auth=auth)
    assert (status, answer) == (401, {"error": "missing or wrong bearer token"})
    assert source.reconciler.calls == []


async def test_without_a_configured_token_every_mutation_is_refused():
    source = Source(token=None)
    async with serving(source) as http:
        status, answer = await post(http, "/api/v1/freeze", data="{}")
        ramp_status, _ = await post(http, "/api/v1/ramps/launch/start")
    assert (status, ramp_status) == (403, 403)
    assert "no API token configured" in answer["error"]


async def test_an_operator_name_that_is_not_a_name_is_refused():
    source = Source()
    async with serving(source) as http:
        long_name = await post(http, "/api/v1/freeze", data="{}", headers={"X-Regionshift-Operator": "a" * 101})
        control = await post(http, "/api/v1/freeze", data="{}", headers={"X-Regionshift-Operator": "bob\u200b"})
    assert long_name[0] == control[0] == 400
    assert "at most 100 characters" in long_name[1]["error"]
    assert source.reconciler.calls == []


async def test_the_state_never_shows_a_password_in_a_probe_url():
    source = Source()
    probe = HttpProbe(name="orders", target="https://probe:hunter2@api.example.com/orders", headers={"K": {"env": "X"}})
    source.config = Config(regions=[Region(name="eu-west-1", probes=[probe])])
    async with serving(source) as http, http.get("/api/v1/state") as response:
        text = await response.text()
    assert "hunter2" not in text
    assert '"target": "https://***@api.example.com/orders"' in text


def test_no_log_line_carries_a_password_in_a_url(capsys):
    logs.configure("info", "json")
    structlog.get_logger("test").warning("cannot reach", url="postgres://app:hunter2@db/x", error="at https://u:p@h/")
    err = capsys.readouterr().err
    assert "hunter2" not in err
    assert "u:p@" not in err
    assert "postgres://***@db/x" in err


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_a_library_s_log_line_comes_in_the_same_format_with_its_logger(capsys, fmt):
    # Trial G: paho's "failed to receive on socket" came bare (no time, no level) at every broker
    # loss, and broke `--log-format json` readers.
    logs.configure("info", fmt)
    logging.getLogger("mqtt").error("failed to receive on socket: %s", "[Errno 104] Connection reset by https://u:p@h/")
    logging.getLogger("mqtt").debug("below the level: not shown")
    logs.configure("debug", fmt)
    assert logging.getLogger("botocore").getEffectiveLevel() == logging.INFO  # its debug signs requests
    logs.configure("info", fmt)
    (line,) = capsys.readouterr().err.splitlines()
    if fmt == "json":
        event = json.loads(line)
        assert (event["level"], event["logger"]) == ("error", "mqtt")
        assert event["event"] == "failed to receive on socket: [Errno 104] Connection reset by https://***@h/"
        assert event["timestamp"].endswith("Z")
    else:
        assert "[error    ] failed to receive on socket: [Errno 104] Connection reset by https://***@h/" in line
        assert line.endswith(" [mqtt]")  # the console renderer names the logger so
        assert line[:4].isdigit()  # the time first, as every line


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("https://user:p@ss@host/x", "https://***@host/x"),  # an @ in the password hides nothing
        ("a https://u:p@h/ and postgres://x:y@db:5432/z", "a https://***@h/ and postgres://***@db:5432/z"),
        ("https://host/path and user@example.com", "https://host/path and user@example.com"),
        ("http://host:80/a@b?c=d@e", "http://host:80/a@b?c=d@e"),  # an @ after the host is not a credential
    ],
)
def test_redaction_hides_every_credential_of_every_url_and_nothing_else(text, shown):
    assert redact(text) == shown


async def test_the_audit_pages_changes_newest_first_filtered_by_record_and_time(tmp_path):
    async with Store(tmp_path / "state.db") as store:
        ids = []
        for i in range(5):
            record = "a.example.com." if i % 2 == 0 else "b.example.com."
            intent = await store.audit.intent(
                record, "ramp:canary", "forward", f"step {i}", {"eu": 100 - i}, {"eu": 99 - i}, at=1000.0 + i
            )
            ids.append(intent)
            await store.audit.submitted(intent, f"C{i}", at=1000.5 + i)
            await store.audit.result(intent, "applied", at=1001.0 + i, change_id=f"C{i}")
        await store.audit.insync(ids[4], "C4", at=1009.0)
        open_intent = await store.audit.intent("a.example.com.", "evacuation", "evacuation", "eu down", {}, {}, 1010.0)
        source = Source()
        source.reconciler.store = store

        async def get(query: str):
            async with serving(source) as http, http.get("/api/v1/audit" + query) as response:
                return response.status, await response.json()

        status, page = await get("?limit=2")
        assert status == 200
        assert [c["id"] for c in page["changes"]] == [open_intent, ids[4]]
        assert page["changes"][0]["outcome"] is None  # sent or not, nobody knows yet
        newest = page["changes"][1]
        assert (newest["actor"], newest["reason"], newest["from"], newest["to"]) == (
            "ramp:canary",
            "step 4",
            {"eu": 96},
            {"eu": 95},
        )
        assert (newest["outcome"], newest["change_id"], newest["settled_at"], newest["insync_at"]) == (
            "applied",
            "C4",
            1005.0,
            1009.0,
        )
        _, second = await get(page["next"].removeprefix("/api/v1/audit"))
        assert [c["id"] for c in second["changes"]] == [ids[3], ids[2]]
        _, last = await get(f"?limit=2&before={ids[1]}")
        assert ([c["id"] for c in last["changes"]], last["next"]) == ([ids[0]], None)
        _, by_record = await get("?record=b.example.com.")
        assert [c["id"] for c in by_record["changes"]] == [ids[3], ids[1]]
        _, by_time = await get("?since=1001&until=1003")
        assert [c["id"] for c in by_time["changes"]] == [ids[2], ids[1]]
        _, iso = await get("?since=1970-01-01T00:16:41Z&until=1970-01-01T00:16:43%2B00:00")
        assert [c["id"] for c in iso["changes"]] == [ids[2], ids[1]]
        for bad in ("?limit=0", "?limit=501", "?since=yesterday", "?since=nan", "?before=x", "?before=" + "9" * 20):
            status, body = await get(bad)
            assert status == 400, bad
            assert "since and until take epoch seconds or an ISO 8601 time" in body["error"]


async def test_a_read_only_daemon_refuses_every_operator_action_and_says_so_in_its_state():
    source = Source()
    source.config = Config(regions=[Region(name="eu-west-1")], controller=ControllerSettings(read_only=True))
    async with serving(source) as http:
        for path in ("/api/v1/freeze", "/api/v1/ramps/launch/start", "/api/v1/records/api.example.com./A/adopt"):
            status, body = await post(http, path, data="{}")
            assert (status, body) == (
                403,
                {"error": "this daemon is read-only: operator actions are refused (controller.read_only)"},
            ), path
        async with http.get("/api/v1/state") as response:
            assert (await response.json())["read_only"] is True
    assert source.reconciler.calls == []  # nothing reached the reconciler


def test_each_vantage_cell_says_what_that_vantage_saw_of_the_region_in_words():
    from controller.settings.policy import VerdictPolicy  # noqa: PLC0415
    from controller.web.views import cell  # noqa: PLC0415
    from probes.results import Result  # noqa: PLC0415

    policy = VerdictPolicy(stale_after=30.0, degraded_below=0.95)
    store = WindowStore(600.0)
    now = 1000.0
    for i in range(50):  # every second: 2 of 50 failed at "a" (96%: ok), 5 of 50 at "b" (90%: failing)
        at = now - 50 + i
        store.add(Result("eu-west-1", "orders", "a", at, ok=i not in (3, 7), latency=0.05))
        store.add(Result("eu-west-1", "orders", "b", at, ok=i % 10 != 0, latency=0.05))
    store.add(Result("eu-west-1", "orders", "old", now - 45, ok=True, latency=0.05))
    by_probe = store.by_probe("eu-west-1")

    a = cell(by_probe, "a", None, now, policy)
    assert (a["status"], a["results"], a["failing"], a["newest_age"]) == ("ok", 50, {"orders": 2}, 1.0)
    assert cell(by_probe, "b", None, now, policy)["status"] == "failing"
    assert cell(by_probe, "old", None, now, policy)["status"] == "stale"  # 45 s since its newest
    assert cell(by_probe, "nobody", None, now, policy) == {
        "status": "no data",
        "newest_age": None,
        "results": 0,
        "failing": {},
        "why": None,
    }
    aside = cell(by_probe, "b", "sees every region failing", now, policy)
    assert (aside["status"], aside["why"]) == ("set aside", "sees every region failing")


async def test_the_page_is_served_from_the_package_with_a_policy_that_keeps_it_to_the_daemon():
    async with serving(Source()) as http:
        async with http.get("/") as response:
            body = await response.text()
            headers = response.headers
        assert response.status == 200
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert "connect-src 'self'" in headers["Content-Security-Policy"]
        assert headers["Vary"] == "Accept-Encoding"
        assert '<script src="/page/page.js" defer></script>' in body
        assert "http" not in body.replace("http-equiv", "")  # nothing fetched from elsewhere
        async with http.get("/page/page.js", headers={"Accept-Encoding": "gzip"}) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/javascript; charset=utf-8"
            assert response.headers["Content-Encoding"] == "gzip"
        for missing in ("/page/nope.js", "/page/..%2Fapi.py", "/page/"):
            async with http.get(missing) as response:
                assert response.status == 404, missing


async def test_the_state_says_why_operators_cannot_act_here():
    source = Source(token=None)
    async with serving(source) as http:
        no_token = await (await http.get("/api/v1/state?history=0")).json()
    source = Source()
    source.config = Config(regions=[Region(name="eu-west-1")], controller=ControllerSettings(read_only=True))
    async with serving(source) as http:
        read_only = await (await http.get("/api/v1/state")).json()
    assert (no_token["actions"], no_token["no_actions"]) == (False, "no API token ($REGIONSHIFT_API_TOKEN): no actions")
    assert "verdict_history" not in no_token
    assert (read_only["actions"], read_only["no_actions"]) == (False, "read-only: no actions")
    assert read_only["verdict_history"] == []


async def test_a_record_set_whose_weights_cannot_move_says_so_in_the_state_and_the_status():
    # A Route 53 request that hangs raises no error while it hangs: /healthz said "not read for
    # 65s" while the state, `regionshift status` and the live page showed nothing wrong.
    source = Source()
    record = RecordSet(
        zone_id="Z1",
        name="api.example.com",
        members=[Member(set_identifier="euw1", region="eu-west-1", value="192.0.2.1")],
    )
    source.config = Config(regions=[Region(name="eu-west-1")], record_sets=[record])
    source.reconciler.views = {}
    source.actuation = lambda: {record.key: "Route 53 not read for 65s"}
    async with serving(source) as http, http.get("/api/v1/state") as response:
        state = await response.json()
    assert state["record_sets"][0]["actuation"] == "Route 53 not read for 65s"
    assert "  ROUTE 53: not read for 65s" in text(state, "http://127.0.0.1:1", 1000.0).splitlines()
    source.actuation = dict
    async with serving(source) as http, http.get("/api/v1/state") as response:
        state = await response.json()
    assert state["record_sets"][0]["actuation"] is None
    assert "  ROUTE 53:" not in text(state, "http://127.0.0.1:1", 1000.0)
