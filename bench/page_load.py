"""The live page's weight and first render, in Debian's headless Chromium on loopback.

Run:  .venv/bin/python bench/page_load.py [--loads 5] [--regions 3]    (needs Debian's chromium: make debs-test)

A local world as in the tests: moto's Route 53, three simulated regions (or `--regions`) probed
60 times a second in all by a real daemon in this process, a ramp of eu-west-1 started and
baking (so the page has record sets, a ramp, a chart and an audit trail to draw). Each load is a
fresh browser context (nothing cached) opening `GET /`. Measured:

- first render: from navigation start to the end of the page's first drawing of the daemon's
  state (the `regionshift:first-render` mark): the HTML, script and style, the event stream's
  snapshot, and the drawing (the audit trail follows from its own read);
- transfer: bytes on the wire (headers and bodies, compressed as served) for the page's files,
  and for everything in the load's first 2 s (the files, the stream's snapshot, the first reads
  of the state and the audit);
- anchor, same browser, same run: `DOMContentLoaded` of an empty HTML page from a bare aiohttp
  server on loopback, the least any page served this way costs.

Targets (issue 14): transfer under 200 KB, first render under 1 s on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web
from playwright.async_api import Browser, async_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller import logs
from controller.acting.route53 import make_client
from controller.daemon import Daemon
from controller.demo.world import LocalRoute53, SimulatedRegion, seed_weighted_group
from controller.settings.policy import Policy, RampPolicy
from controller.settings.schema import Config, ControllerSettings, Member, RecordSet, Region, Route53Settings
from probes.spec import HttpProbe
from tests.browser import launch

KEY = "bench"
TOKEN = "bench-token"  # noqa: S105 - a local daemon's operator token
PAGE_FILES = ("/", "/page/page.js", "/page/page.css")
WINDOW = 2.0  # seconds of each load whose bytes are counted


def config(
    regions: dict[str, SimulatedRegion], endpoint: str, zone_id: str, name: str, state: Path, every: float
) -> Config:
    members = [
        Member(set_identifier="use1", region="us-east-1", value="192.0.2.10"),
        Member(set_identifier="euw1", region="eu-west-1", value="192.0.2.20"),
    ]
    ps = (("healthz", "/healthz"), ("orders", "/api/orders"))
    return Config(
        controller=ControllerSettings(
            listen="127.0.0.1:0",
            tick=0.1,
            state_path=str(state),
            route53=Route53Settings(endpoint_url=endpoint, reconcile_every=0.1, poll_interval=0.05),
        ),
        regions=[
            Region(name=n, probes=[HttpProbe(name=p, target=r.url + at, interval=every, timeout=0.1) for p, at in ps])
            for n, r in regions.items()
        ],
        record_sets=[RecordSet(zone_id=zone_id, name=name, ttl=3, members=members)],
        policy=Policy(
            ramps={
                "launch": RampPolicy(record_set=name, waves=[["eu-west-1"]], bake=600.0, start_gate=0.5, wave_bake=1)
            }
        ),
    )


async def load(browser: Browser, url: str, mark: str | None) -> dict[str, Any]:
    """One load in a fresh context: ms to `mark` (or to DOMContentLoaded), and the bytes."""
    context = await browser.new_context()
    page = await context.new_page()
    cdp = await context.new_cdp_session(page)
    await cdp.send("Network.enable")
    wire: dict[str, int] = {}
    urls: dict[str, str] = {}
    cdp.on("Network.requestWillBeSent", lambda e: urls.__setitem__(e["requestId"], e["request"]["url"]))

    def received(e: dict[str, Any]) -> None:
        wire[e["requestId"]] = wire.get(e["requestId"], 0) + e["encodedDataLength"]

    def finished(e: dict[str, Any]) -> None:  # the total, headers included, once it is known
        wire[e["requestId"]] = max(wire.get(e["requestId"], 0), e["encodedDataLength"])

    cdp.on("Network.dataReceived", received)
    cdp.on("Network.loadingFinished", finished)
    await page.goto(url, wait_until="domcontentloaded")
    if mark is None:
        took = await page.evaluate("performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd")
    else:
        await page.wait_for_function(f"performance.getEntriesByName({mark!r}).length > 0", timeout=10_000)
        took = await page.evaluate(f"performance.getEntriesByName({mark!r})[0].startTime")
    # The bytes of the load's first WINDOW seconds (the browser reports them as they arrive).
    await asyncio.sleep(max(0.0, WINDOW - took / 1000))
    by_url: dict[str, int] = {}
    for request, size in wire.items():
        path = "/" + urls.get(request, "").split("/", 3)[-1]
        by_url[path.split("?")[0]] = by_url.get(path.split("?")[0], 0) + size
    await context.close()
    return {"ms": took, "bytes": by_url}


async def main(loads: int, count: int) -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", KEY)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", KEY)
    os.environ["REGIONSHIFT_API_TOKEN"] = TOKEN
    logs.configure("warning")
    route53 = LocalRoute53()
    await asyncio.to_thread(route53.start)
    try:
        client = make_client(route53.url, aws_access_key_id=KEY, aws_secret_access_key=KEY)
        zone = client.create_hosted_zone(Name="bench.example.com", CallerReference=uuid.uuid4().hex)
        zone_id = zone["HostedZone"]["Id"].split("/")[-1]
        name = "api.bench.example.com"
        seed_weighted_group(client, zone_id, name, [("use1", 1, "192.0.2.10"), ("euw1", 0, "192.0.2.20")], ttl=3)
        names = ["us-east-1", "eu-west-1", "ap-southeast-2"] + [f"region-{i:02}" for i in range(3, count)]
        async with contextlib.AsyncExitStack() as stack:
            regions = {n: await stack.enter_async_context(SimulatedRegion(n, seed=i)) for i, n in enumerate(names)}
            every = 0.1 * len(regions) / 3  # 60 probes a second in all, whatever the count
            with tempfile.TemporaryDirectory() as tmp:
                daemon = Daemon(config(regions, route53.url, zone_id, name, Path(tmp) / "state.sqlite", every))
                stop = asyncio.Event()
                task = asyncio.create_task(daemon.run(stop))
                await asyncio.wait_for(daemon.started.wait(), 10)
                await ramp_to_baking(daemon)
                await measure(daemon.url, loads)
                stop.set()
                await task
    finally:
        route53.stop()


async def ramp_to_baking(daemon: Daemon) -> None:
    await asyncio.sleep(2)  # verdicts first: a ramp starts only onto a healthy region
    if daemon.reconciler is None:
        raise SystemExit("page_load: the daemon has no record sets")
    error = await daemon.reconciler.act("launch", "start", daemon.clock(), "bench")
    if error:
        raise SystemExit(f"page_load: the ramp did not start: {error}")
    for _ in range(200):
        if daemon.reconciler.ramps["launch"].status == "baking":
            return
        await asyncio.sleep(0.05)
    raise SystemExit("page_load: the ramp did not reach its first bake in 10 s")


async def measure(url: str, loads: int) -> None:
    async def empty(_: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>anchor</title>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/", empty)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    anchor_url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
    async with async_playwright() as playwright:
        browser = await launch(playwright)
        pages, anchors = [], []
        for _ in range(loads):  # alternating: a noisy moment hurts both
            anchors.append(await load(browser, anchor_url, None))
            pages.append(await load(browser, url + "/", "regionshift:first-render"))
        await browser.close()
    await runner.cleanup()
    report(pages, anchors)


def report(pages: list[dict[str, Any]], anchors: list[dict[str, Any]]) -> None:
    files = [sum(p["bytes"].get(f, 0) for f in PAGE_FILES) for p in pages]
    everything = [sum(p["bytes"].values()) for p in pages]
    first = [p["ms"] for p in pages]
    anchor = [a["ms"] for a in anchors]
    print(f"{'':34} {'median':>9} {'max':>9}")
    for label, values, scale in (
        ("first render (ms)", first, 1),
        ("anchor: empty page loaded (ms)", anchor, 1),
        ("page files on the wire (KB)", files, 1000),
        ("all in the first 2 s (KB)", everything, 1000),
    ):
        print(f"{label:34} {statistics.median(values) / scale:9.1f} {max(values) / scale:9.1f}")
    print("by request (last load):", ", ".join(f"{k} {v / 1000:.1f} KB" for k, v in sorted(pages[-1]["bytes"].items())))
    ratio = statistics.median(first) / statistics.median(anchor)
    print(f"first render / anchor: {ratio:.1f}x (targets: first render under 1000 ms, transfer under 200 KB)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", type=int, default=5, help="page loads (each beside an anchor load)")
    parser.add_argument("--regions", type=int, default=3, help="simulated regions (at least 3), two probes each")
    args = parser.parse_args()
    asyncio.run(main(args.loads, args.regions))
