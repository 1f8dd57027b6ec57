"""HTTP(S) and TCP probes against real servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import shutil

import pytest
import pytest_asyncio
from aiohttp import web

from controller.demo.world import free_port as free_port_closed
from probes.kinds.http import HttpProber
from probes.kinds.tcp import TcpProber
from probes.spec import HttpProbe, TcpProbe, TlsSettings


def http(target: str, **kw) -> HttpProber:
    return HttpProber(HttpProbe(name=kw.pop("name", "p"), target=target, **kw), "eu-west-1", "controller")


def tcp(target: str, **kw) -> TcpProber:
    return TcpProber(TcpProbe(name="t", target=target, **kw), "eu-west-1", "controller")


@pytest_asyncio.fixture
async def echo():
    """An app that answers with the request line and headers it received."""

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        return web.json_response(
            {"method": request.method, "path": request.path_qs, "headers": headers, "body": body.decode()}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_http_probe_succeeds_and_times_each_phase(region):
    result = await http(region.url + "/healthz")()
    assert result.ok
    assert (result.region, result.probe, result.vantage) == ("eu-west-1", "p", "controller")
    assert result.status == 200
    assert result.outcome == "success"
    assert result.error_class is None
    assert set(result.phases) == {"dns", "connect", "first_byte", "total"}  # no TLS on http://
    assert all(v >= 0 for v in result.phases.values())
    assert result.phases["total"] == result.latency
    assert result.phases["total"] >= result.phases["connect"] + result.phases["first_byte"]
    assert region.served["/healthz"] == 1


async def test_each_probe_run_uses_a_fresh_connection(echo):
    prober = http(echo + "/x")
    for _ in range(3):
        assert (await prober()).ok
    # A new connection per request: the probe asks the server to close after each answer.
    result = await http(echo + "/x", body_regex='"connection": "close"')()
    assert result.ok, result.error


async def test_http_probe_fails_on_an_unexpected_status(region):
    region.set(error_ratio=1.0)
    result = await http(region.url + "/api/orders")()
    assert not result.ok
    assert result.outcome == "failure"
    assert (result.status, result.error_class) == (503, "status")
    assert result.error == "status 503, expected 2xx"


async def test_expected_status_list_replaces_the_2xx_default(region):
    region.set(error_ratio=1.0)
    assert (await http(region.url + "/api/orders", expect_status=[503])()).ok
    region.heal()
    result = await http(region.url + "/api/orders", expect_status=[503])()
    assert (result.ok, result.error) == (False, "status 200, expected 503")


async def test_body_regex_must_match(region):
    assert (await http(region.url + "/api/orders", body_regex=r'"ok":\s*true')()).ok
    result = await http(region.url + "/api/orders", body_regex="never-there")()
    assert (result.ok, result.status, result.error_class) == (False, 200, "body")
    assert "never-there" in (result.error or "")


async def test_custom_headers_host_method_and_body_are_sent(echo):
    result = await http(
        echo + "/submit?x=1",
        method="POST",
        headers={"Authorization": "Bearer synthetic", "X-Probe": "regionshift"},
        host="api.example.com",
        body='{"hello": 1}',
        body_regex=r'"authorization": "Bearer synthetic".*"x-probe": "regionshift"',
    )()
    assert result.ok, result.error
    check = await http(
        echo + "/submit?x=1",
        method="POST",
        host="api.example.com",
        body="abc",
        body_regex=r'"method": "POST", "path": "/submit\?x=1".*"host": "api.example.com".*"body": "abc"',
    )()
    assert check.ok, check.error


async def test_timeout_against_a_port_that_never_answers(silent_port):
    result = await http(f"http://127.0.0.1:{silent_port}/", timeout=0.3, interval=1)()
    assert not result.ok
    assert result.outcome == "timeout"
    assert result.error_class == "timeout"
    assert result.error == "no answer within 0.3s (waiting for first byte)"
    assert 0.3 <= result.latency < 1.0
    assert "connect" in result.phases  # it got that far


async def test_refused_connection_is_named():
    port = free_port_closed()
    result = await http(f"http://127.0.0.1:{port}/")()
    assert (result.ok, result.error_class) == (False, "refused")
    assert result.error == f"connection to 127.0.0.1:{port} refused"


async def test_region_that_refuses_connections_fails_then_recovers(region):
    prober = http(region.url + "/healthz")
    await region.refuse()
    assert (await prober()).error_class == "refused"
    await region.accept()
    assert (await prober()).ok


async def test_https_probe_times_tls_and_reports_certificate_expiry(tls_server):
    result = await http(tls_server.url + "/", tls=TlsSettings(ca_file=tls_server.ca_file), body_regex="secure hello")()
    assert result.ok, result.error
    assert set(result.phases) == {"dns", "connect", "tls", "first_byte", "total"}
    assert result.phases["tls"] > 0
    assert result.extra["cert_not_after"] == tls_server.not_after.isoformat()
    remaining = (tls_server.not_after - dt.datetime.now(dt.UTC)).total_seconds()
    assert abs(result.extra["cert_expires_in_seconds"] - remaining) < 5


async def test_https_probe_fails_when_the_certificate_expires_too_soon(expiring_tls_server):
    tls = TlsSettings(ca_file=expiring_tls_server.ca_file, min_validity=30 * 86400)
    result = await http(expiring_tls_server.url + "/", tls=tls)()
    assert (result.ok, result.error_class) == (False, "cert_expiry")
    assert "in 5.0 days; at least 30.0 days required" in (result.error or "")
    assert result.status is None  # no request was sent on a connection we would not trust


async def test_https_probe_rejects_an_untrusted_certificate(tls_server):
    result = await http(tls_server.url + "/")()
    assert (result.ok, result.error_class) == (False, "tls")
    assert "certificate not trusted" in (result.error or "")
    ok = await http(tls_server.url + "/", tls=TlsSettings(insecure_skip_verify=True))()
    assert ok.ok, ok.error
    assert ok.extra["cert_not_after"] == tls_server.not_after.isoformat()  # still read, unverified


async def test_a_ca_file_that_cannot_be_loaded_fails_the_run_naming_it(tls_server, tmp_path):
    # A missing CA file raised FileNotFoundError out of the probe: a traceback at every run.
    missing = await http(tls_server.url + "/", tls=TlsSettings(ca_file=str(tmp_path / "nope.pem")))()
    assert (missing.ok, missing.error_class) == (False, "config")
    assert missing.error == f"tls.ca_file {tmp_path / 'nope.pem'}: cannot load it: No such file or directory"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    bad = await http(tls_server.url + "/", tls=TlsSettings(ca_file=str(garbage)))()
    assert (bad.ok, bad.error_class) == (False, "config")
    assert (bad.error or "").startswith(f"tls.ca_file {garbage}: cannot load it: ")
    shutil.copyfile(tls_server.ca_file, garbage)  # put right: read again at the next run
    assert (await http(tls_server.url + "/", tls=TlsSettings(ca_file=str(garbage)))()).ok


async def test_https_probe_checks_the_name_it_was_given(tls_server):
    wrong = await http(
        f"https://127.0.0.1:{tls_server.port}/", host="elsewhere.example", tls=TlsSettings(ca_file=tls_server.ca_file)
    )()
    assert (wrong.ok, wrong.error_class) == (False, "tls")
    right = await http(
        f"https://127.0.0.1:{tls_server.port}/", tls=TlsSettings(ca_file=tls_server.ca_file, server_name="localhost")
    )()
    assert right.ok, right.error


async def test_unresolvable_host_is_a_dns_failure():
    result = await http("http://no-such-host.invalid/")()
    assert (result.ok, result.error_class) == (False, "dns")


async def test_tcp_probe_connects_and_fails_when_refused(region):
    ok = await tcp(f"127.0.0.1:{region.port}")()
    assert ok.ok
    assert set(ok.phases) == {"dns", "connect", "total"}
    port = free_port_closed()
    refused = await tcp(f"127.0.0.1:{port}")()
    assert (refused.ok, refused.error_class) == (False, "refused")


async def test_tcp_probe_with_tls_handshake_reads_the_certificate(tls_server):
    result = await tcp(
        f"localhost:{tls_server.port}", tls_handshake=True, tls=TlsSettings(ca_file=tls_server.ca_file)
    )()
    assert result.ok, result.error
    assert "tls" in result.phases
    assert result.extra["cert_not_after"] == tls_server.not_after.isoformat()


async def test_tcp_probe_times_out_on_a_silent_tls_peer(silent_port):
    result = await tcp(f"127.0.0.1:{silent_port}", tls_handshake=True, timeout=0.3, interval=1)()
    assert (result.ok, result.error_class) == (False, "timeout")
    assert result.error == "no answer within 0.3s (waiting for tls)"


@pytest.mark.parametrize("target", ["[::1]:443", "db.internal:5432"])
def test_tcp_targets_accept_host_port_forms(target):
    assert TcpProbe(name="t", target=target).target == target


async def test_failed_and_cancelled_probes_leave_no_unretrieved_exceptions(tls_server, silent_port):
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    loop.set_exception_handler(lambda _, context: reported.append(context["message"]))
    assert (await http(tls_server.url + "/")()).error_class == "tls"  # handshake refused
    task = asyncio.create_task(http(f"http://127.0.0.1:{silent_port}/", timeout=5, interval=10)())
    await asyncio.sleep(0.1)
    task.cancel()  # as when the daemon stops mid-probe
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    gc.collect()
    loop.set_exception_handler(None)
    assert reported == []


async def test_credentials_in_the_url_go_as_basic_auth_and_never_show_in_an_error(echo):
    target = echo.replace("http://", "http://probe:hunter2@") + "/who"
    result = await http(target, body_regex=r'"authorization": "Basic cHJvYmU6aHVudGVyMg=="')()
    assert result.ok, result.error  # base64("probe:hunter2")
    failed = await http(target.replace("/who", "/nothing"), expect_status=[418])()
    assert not failed.ok
    assert "hunter2" not in (failed.error or "")


async def test_a_secret_header_is_read_from_the_environment_on_each_run(echo, monkeypatch):
    prober = http(
        echo + "/secret",
        headers={"X-Api-Key": {"env": "PROBE_KEY"}, "X-Plain": "visible"},
        body_regex=r'"x-api-key": "k-2"',
    )
    monkeypatch.delenv("PROBE_KEY", raising=False)
    missing = await prober()
    assert (missing.ok, missing.error_class) == (False, "config")
    assert missing.error == "header X-Api-Key: $PROBE_KEY is empty or not set"
    monkeypatch.setenv("PROBE_KEY", "k-1\n")
    first = await prober()
    assert (first.ok, first.error_class) == (False, "body")  # k-1 was sent, not k-2
    monkeypatch.setenv("PROBE_KEY", "k-2")  # rotated: the next run sends the new one
    second = await prober()
    assert second.ok, second.error
