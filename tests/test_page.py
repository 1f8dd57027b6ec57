"""The live page (`GET /`) in real headless Chromium (Debian's, driven by Playwright) against a
real daemon probing three simulated regions and ramping in moto's Route 53: it shows every
region, follows verdict changes and ramp steps without a reload, says so when the daemon is
gone, lets operators act with the token (and typed confirmations) and nobody without it, offers
nothing when read-only, and talks to nobody but the daemon."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Self

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, Route, async_playwright, expect

from controller.daemon import Daemon
from controller.settings.schema import AgentsSettings
from controller.web.listening import stop_accepting
from tests.browser import CHROMIUM, launch
from tests.faults import FaultProxy
from tests.test_shifting import TOKEN, Running, config, make_zone, set_weight

if TYPE_CHECKING:
    from controller.settings.schema import Config

# Where the screenshot mid-ramp goes (a test artifact, not in git).
ARTIFACTS = Path(os.environ.get("REGIONSHIFT_ARTIFACTS", Path(__file__).parent / "artifacts"))
REGIONS = ("us-east-1", "eu-west-1", "ap-southeast-2")
LIVE = 2000  # ms: what the daemon decides is on the page within this, without a reload


@pytest.fixture(autouse=True)
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("REGIONSHIFT_API_TOKEN", TOKEN)


@pytest_asyncio.fixture
async def browser():
    if not await asyncio.to_thread(Path(CHROMIUM).exists):
        pytest.fail(f"{CHROMIUM} is missing: `make debs-test` installs Debian's chromium")
    async with async_playwright() as playwright:
        launched = await launch(playwright)
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Seen:
    """What the page did: its console errors, uncaught errors, and every URL it asked for."""

    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


async def open_page(browser: Browser, url: str) -> tuple[Page, Seen]:
    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
    seen = Seen()
    page.on("console", lambda m: seen.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen.page_errors.append(str(e)))
    page.on("request", lambda r: seen.requests.append(r.url))
    await page.goto(url + "/")
    await page.evaluate("window.sameDocument = true")  # gone if the page ever reloads
    return page, seen


def page_config(world, route53, zone_id: str, name: str, tmp_path: Path, **settings) -> Config:
    """Three regions probed at 10/s, the record set of use1 and euw1, a ramp of eu-west-1."""
    return config(world, route53, zone_id, name, tmp_path, regions=REGIONS, **{"bake": 2.0, **settings})


async def held(route: Route) -> None:
    await asyncio.sleep(3.0)
    await route.continue_()


def all_healthy(daemon: Daemon) -> bool:
    return len(daemon.verdicts) == 3 and all(v.status == "healthy" for v in daemon.verdicts.values())


async def test_the_page_follows_the_daemon_live_and_says_at_once_when_it_is_gone(world, route53, tmp_path, browser):
    zone_id, name = make_zone(route53)
    daemon = Daemon(page_config(world, route53, zone_id, name, tmp_path))
    async with Running(daemon) as running:
        await running.until(lambda: all_healthy(daemon), what="three healthy regions")
        page, seen = await open_page(browser, daemon.url)
        rows = page.locator("#region-table tbody tr")
        await expect(rows).to_have_count(3)
        assert await rows.evaluate_all("rows => rows.map(r => r.dataset.region)") == [
            "us-east-1",
            "eu-west-1",
            "ap-southeast-2",
        ]
        verdict = page.locator('tr[data-region="eu-west-1"] td.verdict')
        await expect(verdict).to_contain_text("✓ healthy")
        await expect(page.locator('tr[data-region="eu-west-1"] td.cell').first).to_contain_text("✓ ok")

        # The page's reads of the state are held 3 s from here: what shows within 2 s came by the stream.
        await page.route("**/api/v1/state*", held)
        world["eu-west-1"].set(error_ratio=1.0)
        await running.until(lambda: daemon.verdicts["eu-west-1"].status != "healthy", what="a verdict change")
        await expect(verdict).to_contain_text(re.compile(r"[▲✗] (degraded|unhealthy)"), timeout=LIVE)
        await expect(page.locator("#summary")).to_contain_text("eu-west-1", timeout=LIVE)
        await page.unroute_all(behavior="wait")  # the held reads finish first
        world["eu-west-1"].heal()
        await running.until(lambda: all_healthy(daemon), what="recovery")

        assert (await running.post("/api/v1/ramps/launch/start"))[0] == 200
        step = page.locator('tr[data-ramp="launch"] .ramp-step')
        share = page.locator('tr[data-ramp="launch"] .ramp-share')
        for wanted, percent in ((1, "1%"), (2, "5%")):
            await running.until(
                lambda w=wanted: running.ramp().status == "baking" and running.ramp().step + 1 == w,
                what=f"step {wanted} baking",
            )
            await expect(step).to_have_text(f"{wanted}/5", timeout=LIVE)
            await expect(share).to_have_text(percent, timeout=LIVE)
        # Route 53's weights as the daemon last read them (19:1 after step 2), beside the step.
        euw1 = page.locator("[data-record] tr", has_text="euw1").locator("td.observed")
        await expect(euw1).to_have_text("1 (5%)", timeout=LIVE)
        await expect(page.locator('tr[data-ramp="launch"] .countdown')).to_be_visible(timeout=LIVE)
        await expect(page.locator("svg.chart .mark")).to_have_count(2, timeout=LIVE)  # the two steps, marked
        await expect(page.locator("#audit-table tbody tr:not(.operator-row)")).to_have_count(2, timeout=LIVE)
        await expect(page.locator("#audit-table .operator-row")).to_contain_text("start", timeout=LIVE)
        await page.screenshot(path=ARTIFACTS / "page-mid-ramp.png", full_page=True)  # makes the folder
        assert await page.evaluate("window.sameDocument") is True  # all of it without a reload
        assert seen.console_errors == []
        await expect(page.locator("#banner")).to_be_hidden()

    # The daemon is stopped: the page says so at once instead of looking healthy.
    banner = page.locator("#banner")
    await expect(banner).to_be_visible(timeout=LIVE)
    await expect(banner).to_contain_text("Live updates lost")
    assert await page.title() == "⚠ regionshift (stale)"
    assert seen.page_errors == []
    origin = daemon.url + "/"
    assert seen.requests, "the page made no request"
    assert [u for u in seen.requests if not u.startswith(origin)] == []  # nobody but the daemon


async def sign_in(page: Page, token: str, operator: str = "alice") -> None:
    dialog = page.locator("#token-dialog")
    await expect(dialog).to_be_visible()
    await dialog.locator("input[name=operator]").fill(operator)
    await dialog.locator("input[name=token]").fill(token)
    await dialog.get_by_role("button", name="Sign in").click()


async def confirm(page: Page, word: str, reason: str | None = None) -> None:
    dialog = page.locator("#confirm-dialog")
    await expect(dialog).to_be_visible()
    ok = page.locator("#confirm-ok")
    await expect(ok).to_be_disabled()
    await dialog.locator("input[name=typed]").fill(word[:-1])  # not quite: still refused
    await expect(ok).to_be_disabled()
    if reason:
        await dialog.locator("input[name=reason]").fill(reason)
    await dialog.locator("input[name=typed]").fill(word)
    await ok.click()


async def freeze_and_unfreeze(page: Page, running: Running) -> None:
    reconciler = running.daemon.reconciler
    await page.locator("#freeze").click()
    await confirm(page, "FREEZE", reason="drill 7")
    await running.until(lambda: reconciler.frozen is not None, what="freeze")
    await expect(page.locator("#frozen")).to_contain_text("FROZEN by alice: drill 7", timeout=LIVE)
    marks = page.locator("svg.chart .operator-mark")  # each operator action on the chart, with who and why
    await expect(marks.filter(has_text="freeze shifting by alice: drill 7")).to_have_count(1, timeout=LIVE)
    await page.locator("#unfreeze").click()  # no confirmation needed to undo a freeze
    await running.until(lambda: reconciler.frozen is None, what="unfreeze")
    await expect(page.locator("#frozen")).to_be_hidden(timeout=LIVE)


async def test_the_top_line_warns_while_route53_refuses_and_clears_when_it_answers(world, route53, tmp_path, browser):
    # A new user saw "✓ all 3 regions healthy" on top while the record set could not move: the
    # error was only in its card, further down (and, for a hung request, nowhere on the page).
    zone_id, name = make_zone(route53)
    record = f"{name}/A"
    async with FaultProxy(route53.url) as proxy:
        base = page_config(world, route53, zone_id, name, tmp_path)
        r53 = base.controller.route53.model_copy(update={"endpoint_url": proxy.url, "max_attempts": 1})
        daemon = Daemon(base.model_copy(update={"controller": base.controller.model_copy(update={"route53": r53})}))
        async with Running(daemon) as running:
            await running.until(lambda: all_healthy(daemon), what="three healthy regions")
            page, seen = await open_page(browser, daemon.url)
            summary = page.locator("#summary")
            await expect(summary).to_contain_text("✓ all 3 regions healthy", timeout=LIVE)
            proxy.fail("ListResourceRecordSets", "AccessDenied", times=10_000, status=403)
            await expect(summary).to_contain_text(f"⚠ {record}: Route 53: AccessDenied", timeout=10_000)
            await expect(page.locator(f'[data-record="{record}"] .error-line')).to_contain_text("AccessDenied")
            proxy.faults.clear()
            await expect(summary).not_to_contain_text("⚠", timeout=10_000)
            await expect(page.locator(f'[data-record="{record}"] .error-line')).to_be_hidden()
    assert seen.page_errors == []


async def test_the_top_line_says_when_the_agents_broker_is_not_connected(world, route53, tmp_path, browser):
    # A broker outage left "✓ all 3 regions healthy" alone on top: the verdicts stood on the
    # controller's vantage only, and the page said nothing of the agents.
    zone_id, name = make_zone(route53)
    base = page_config(world, route53, zone_id, name, tmp_path)
    agents = AgentsSettings(broker="127.0.0.1:1", vantages=["agent-a"])  # nothing listens there
    daemon = Daemon(base.model_copy(update={"agents": agents}))
    async with Running(daemon) as running:
        await running.until(lambda: all_healthy(daemon), what="three healthy regions")
        page, seen = await open_page(browser, daemon.url)
        summary = page.locator("#summary")
        await expect(summary).to_contain_text("✓ all 3 regions healthy", timeout=LIVE)
        await expect(summary).to_contain_text("⚠ agents' broker 127.0.0.1:1 not connected", timeout=LIVE)
    assert seen.page_errors == []


async def test_operators_act_from_the_page_with_the_token_and_typed_confirmations(world, route53, tmp_path, browser):
    zone_id, name = make_zone(route53)
    record = f"{name}/A"
    daemon = Daemon(page_config(world, route53, zone_id, name, tmp_path, bake=60.0))
    async with Running(daemon) as running:
        await running.until(lambda: all_healthy(daemon), what="three healthy regions")
        page, seen = await open_page(browser, daemon.url)
        ramp = page.locator('tr[data-ramp="launch"]')
        notice = page.locator("#notice")

        await ramp.locator('button[data-action="start"]').click()
        await page.locator("#token-dialog").get_by_role("button", name="Cancel").click()
        await expect(notice).to_contain_text("cancelled, no token given")
        await ramp.locator('button[data-action="start"]').click()
        await sign_in(page, "not-the-token")
        await expect(notice).to_contain_text("start refused: missing or wrong bearer token")
        assert running.ramp().status == "pending"  # refused without the token

        await ramp.locator('button[data-action="start"]').click()
        await sign_in(page, TOKEN)  # asked again: the wrong one was forgotten
        await expect(notice).to_contain_text("start launch: done by alice")
        await running.until(lambda: running.ramp().status == "baking", what="first step")
        await expect(ramp.locator(".ramp-status")).to_contain_text("baking", timeout=LIVE)

        await ramp.locator('button[data-action="pause"]').click()  # the token is kept for the tab
        await expect(ramp.locator(".ramp-status")).to_contain_text("paused", timeout=LIVE)
        await ramp.locator('button[data-action="resume"]').click()
        await expect(ramp.locator(".ramp-status")).to_contain_text("baking", timeout=LIVE)

        await ramp.locator('button[data-action="abort"]').click()
        await confirm(page, "launch")
        await running.until(lambda: running.ramp().status == "aborted", what="abort")
        await expect(ramp.locator(".ramp-status")).to_contain_text("aborted", timeout=LIVE)

        await freeze_and_unfreeze(page, running)

        # Back at the weights before the ramp, and the reconciler has looked again (nobody owns it now).
        await running.until(lambda: daemon.reconciler.views[record].reason == "at home weights", what="weights settled")
        await asyncio.to_thread(set_weight, route53, zone_id, name, "euw1", 7, "192.0.2.20")  # a hand edit
        card = page.locator(f'[data-record="{record}"]')
        await expect(card.locator(".drift")).to_contain_text("DRIFT", timeout=10_000)
        await card.locator("button.adopt").click()
        await confirm(page, record, reason="console edit kept")
        await running.until(lambda: daemon.reconciler.views[record].drift is None, what="adopted")
        await expect(card.locator(".drift")).to_be_hidden(timeout=LIVE)
        await expect(page.locator("#audit-table")).to_contain_text("console edit kept", timeout=LIVE)

        events = daemon.bus.recent(500)
        by_alice = [(e.action, e.target) for e in events if e.kind == "operator" and e.who == "alice"]
        audit = await (await running.http.get(f"/api/v1/audit?record={record}")).json()
        # Seven operator rows in the page's audit trail, each with alice's name.
        await expect(page.locator("#audit-table .operator-row").filter(has_text="alice")).to_have_count(7)
        # The only console errors are Chromium's lines for the refused request (the wrong token).
        assert [e for e in seen.console_errors if "status of 401" not in e] == []
    logged = [(o["who"], o["action"], o["target"]) for o in reversed(audit["operator_actions"])]
    assert logged == [("alice", action, target) for action, target in by_alice]  # the audit log holds each
    assert by_alice == [
        ("start", "ramp:launch"),
        ("pause", "ramp:launch"),
        ("resume", "ramp:launch"),
        ("abort", "ramp:launch"),
        ("freeze", "shifting"),
        ("unfreeze", "shifting"),
        ("adopt", record),
    ]
    assert seen.page_errors == []


async def test_a_read_only_daemon_serves_the_page_with_no_actions_and_refuses_them(world, route53, tmp_path, browser):
    zone_id, name = make_zone(route53)
    daemon = Daemon(page_config(world, route53, zone_id, name, tmp_path, read_only=True))
    async with Running(daemon) as running:
        await running.until(lambda: all_healthy(daemon), what="three healthy regions")
        page, seen = await open_page(browser, daemon.url)
        await expect(page.locator("#mode")).to_have_text("read-only: no actions")
        await expect(page.locator("#region-table tbody tr")).to_have_count(3)
        await expect(page.locator('tr[data-ramp="launch"]')).to_contain_text("pending")
        assert await page.locator("header button, main button").count() == 0
        status, body = await running.post("/api/v1/ramps/launch/start")
        assert status == 403
        assert "read-only" in body["error"]
        assert running.ramp().status == "pending"
        assert seen.console_errors == []


class Cutter:
    """A TCP proxy in front of the daemon whose connections can all be cut at once: a network blip
    (or a proxy's idle timeout) while the daemon runs on."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.links: set[asyncio.StreamWriter] = set()
        self.closing = False  # a connection accepted as it closes is closed, not relayed

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *_: object) -> None:
        self.closing = True
        await stop_accepting(self.server)
        self.server.close()
        self.cut()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.closing:
            writer.close()
            return
        upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target)
        if self.closing:  # closed while it connected upstream
            writer.close()
            upstream.close()
            return
        self.links |= {writer, upstream}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, upstream), pipe(upstream_reader, writer))
        self.links -= {writer, upstream}

    def cut(self) -> None:
        for link in self.links:
            link.transport.abort()
        self.links.clear()


async def test_the_page_says_when_the_stream_drops_or_results_stop_and_clears_when_they_are_back(
    world, route53, tmp_path, browser
):
    zone_id, name = make_zone(route53)
    daemon = Daemon(page_config(world, route53, zone_id, name, tmp_path))
    async with Running(daemon) as running:
        await running.until(lambda: all_healthy(daemon), what="three healthy regions")
        async with Cutter(int(daemon.url.rsplit(":", 1)[1])) as proxy:
            page, seen = await open_page(browser, proxy.url)
            banner = page.locator("#banner")
            await expect(page.locator("#region-table tbody tr")).to_have_count(3)
            await expect(banner).to_be_hidden()

            # The network drops every connection; the daemon runs on, quiet (nothing to replay).
            proxy.cut()
            await expect(banner).to_contain_text("Live updates lost", timeout=LIVE)
            await expect(banner).to_be_hidden(timeout=5000)  # reconnected: live again, no reload

            # Results stop arriving (as if every probe's result were lost): the verdicts are stale.
            record = daemon.scheduler.sink
            daemon.scheduler.sink = lambda _: None
            await expect(banner).to_contain_text("No probe result from any vantage", timeout=5000)
            assert await page.title() == "⚠ regionshift (stale)"
            daemon.scheduler.sink = record
            await expect(banner).to_be_hidden(timeout=5000)
            assert await page.evaluate("window.sameDocument") is True
    assert seen.page_errors == []
    assert [u for u in seen.requests if not u.startswith(proxy.url + "/")] == []
