"""The `probe` and `demo` commands, run as a user runs them."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import re
import signal
import subprocess

import pytest

from controller.cli import main
from tests.conftest import REGIONSHIFT


def config_for(write, world, extra_probe: str = "") -> str:
    regions = "".join(
        f"  - name: {name}\n    probes:\n"
        f"      - {{kind: http, name: healthz, target: '{r.url}/healthz', timeout: 2s}}\n"
        f"      - {{kind: tcp, name: port, target: '127.0.0.1:{r.port}'}}\n"
        for name, r in world.items()
    )
    return str(write("regionshift.yaml", "regions:\n" + regions + extra_probe))


async def run_cli(*args, env, within: float = 120.0):
    """Exit code, stdout and stderr of the command; a command still running after `within`
    seconds is killed (its pipes closed with it) and the test fails saying so."""
    proc = await asyncio.create_subprocess_exec(
        REGIONSHIFT, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        pytest.fail(f"regionshift {' '.join(args)} still ran after {within:g}s")
    return proc.returncode, out.decode(), err.decode()


async def test_probe_once_prints_a_table_and_exits_0_when_all_pass(world, write, cli_env):
    code, out, err = await run_cli("probe", "-c", config_for(write, world), "--once", env=cli_env)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["REGION", "PROBE", "OK", "STATUS"]
    rows = [line.split()[:4] for line in lines[1:-1]]
    assert rows == [
        [region, probe, "yes", status] for region in world for probe, status in (("healthz", "200"), ("port", "-"))
    ]
    assert lines[-1] == "6 probes passed, 0 failed"


async def test_probe_once_exits_1_and_says_why_when_a_probe_fails(world, write, cli_env):
    world["eu-west-1"].set(healthz_ok=False)
    code, out, _ = await run_cli(
        "probe", "-c", config_for(write, world), "--once", "--region", "eu-west-1", env=cli_env
    )
    assert code == 1
    assert re.search(r"eu-west-1\s+healthz\s+NO\s+503 .*status 503, expected 2xx", out), out
    assert out.splitlines()[-1] == "1 probes passed, 1 failed"


async def test_probe_rejects_an_unknown_region_with_exit_2(world, write, cli_env):
    code, _, err = await run_cli("probe", "-c", config_for(write, world), "--once", "--region", "mars-1", env=cli_env)
    assert code == 2
    assert "--region 'mars-1': not in the configuration" in err


@pytest.mark.parametrize("command", [["probe", "--once"], ["run"]])
def test_a_probe_s_missing_ca_file_is_exit_2_naming_it_before_anything_runs(command, write, capsys):
    # It passed and each run printed a FileNotFoundError traceback.
    path = write(
        "regionshift.yaml",
        "regions:\n  - name: eu-west-1\n    probes:\n"
        "      - {kind: http, name: api, target: 'https://127.0.0.1:1/', tls: {ca_file: /nonexistent/ca.pem}}\n",
    )
    assert main([command[0], "-c", str(path), *command[1:]]) == 2
    assert capsys.readouterr().err.strip() == (
        f"regionshift: {path}: regions[0].probes[0].tls.ca_file /nonexistent/ca.pem: No such file or directory "
        "(probe eu-west-1/api)"
    )


async def test_demo_prints_its_api_and_stops_on_ctrl_c_saying_the_script_was_not_checked(cli_env):
    proc = await asyncio.create_subprocess_exec(
        REGIONSHIFT, "demo", "--scenario", "verdicts", stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env
    )
    seen = b""
    async with asyncio.timeout(30):
        while b"us-east-1: unknown -> HEALTHY" not in seen:
            line = await proc.stdout.readline()
            assert line, "the demo ended before its first verdict"
            seen += line
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    out = seen.decode() + out.decode()
    assert proc.returncode == 0, err.decode()
    assert re.search(r"^regionshift demo: live page at http://127\.0\.0\.1:\d+/ ", out, re.MULTILINE), out
    assert "the script needs" in out  # stopped before the script played out, and it says so
    assert "Traceback" not in err.decode()


async def test_a_ctrl_c_at_the_terminal_stops_the_launch_demo_in_order(cli_env):
    # A terminal's Ctrl-C goes to the whole foreground process group: moto and mosquitto died
    # under the daemon, which retried Route 53 and ended "unexpected RetryableError (a bug)", exit 1.
    proc = await asyncio.create_subprocess_exec(
        REGIONSHIFT,
        "demo",
        "--scenario",
        "launch",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env,
        start_new_session=True,  # a group of its own, as a shell's foreground job
    )
    seen = b""
    try:
        async with asyncio.timeout(60):
            while b"clients:" not in seen:
                line = await proc.stdout.readline()
                assert line, "the demo ended before it started its world"
                seen += line
        await asyncio.sleep(3)  # the daemon is reading Route 53 and the agents are connected
        os.killpg(proc.pid, signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    out = seen.decode() + out.decode()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "demo stopped; the story needs about 150s to play out, so it was not checked" in out
    assert "FAILED" not in out
    assert "a bug" not in err.decode()
    assert "Traceback" not in err.decode()


@pytest.mark.parametrize(("scenario", "needs"), [("launch", "150s"), ("verdicts", "45s")])
async def test_a_demo_duration_too_short_for_its_story_is_refused_up_front(scenario, needs, cli_env):
    code, out, err = await run_cli("demo", "--scenario", scenario, "--duration", "30", env=cli_env)
    assert (code, out) == (2, "")
    assert f"--duration 30: the {scenario} story needs {needs} to play out" in err


async def test_the_version_is_the_installed_one(cli_env):
    code, out, _ = await run_cli("--version", env=cli_env)
    assert (code, out) == (0, f"regionshift {importlib.metadata.version('regionshift')}\n")


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_demo_plays_its_script_and_checks_the_verdicts(cli_env):
    # 60 s, not the 45 s minimum: the story ends with ap-southeast-2 back to healthy after its
    # recover_after, and one clean-clone run at 46 s saw it still degraded at the end.
    code, out, err = await run_cli("demo", "--scenario", "verdicts", "--duration", "60", env=cli_env)
    assert code == 0, out + err
    # Degraded from healthy: at once, or through unknown while its peers have too few results to
    # tell it apart (it is probed ten times a second once it fails; they are not, yet).
    assert re.search(r"eu-west-1: (healthy|unknown) -> DEGRADED", out), out
    changes = re.findall(r"eu-west-1: (\w+) -> (\w+)", out)
    degraded = changes.index(next(c for c in changes if c[1] == "DEGRADED"))
    assert [c[1] for c in changes[:degraded]] in (["UNKNOWN", "HEALTHY"], ["UNKNOWN", "HEALTHY", "UNKNOWN"]), changes
    # Unhealthy for refused connections, whichever detector says it first ("the last 3 results
    # all failed (refused x3)", "59% of 17 probes succeeded ... (refused x7)").
    assert re.search(r"ap-southeast-2: \w+ -> UNHEALTHY .*\(refused x\d+", out), out
    assert out.rstrip().endswith("both recovered")


@pytest.mark.slow
@pytest.mark.timeout(200)
async def test_the_launch_demo_sets_a_cut_agent_aside_holds_for_lag_ramps_rolls_back_resumes_and_completes(cli_env):
    # The demo stops by itself at --duration (150 s) if the story has not played out by then
    # (it takes about 100 s): wait for that, not less.
    code, out, err = await run_cli("demo", "--duration", "150", env=cli_env, within=170)
    assert code == 0, out + err[-3000:]
    lines = out.splitlines()
    agents = "agent-us-east-1, agent-eu-west-1, agent-ap-southeast-2"
    assert re.search(rf"^  agents: {agents}, each its own process", out, re.MULTILINE)
    actions = [line.split("** ", 1)[1] for line in lines if "** " in line]
    kinds = [a.split(" (")[0] for a in actions]
    # Three agent processes report beside the controller; one loses its network: set aside, no blame.
    assert kinds[0] == f"agents: {agents} report on every region, beside the controller"
    assert kinds[1] == "network: agent-ap-southeast-2 loses its path to every region"
    cut = "vantage agent-ap-southeast-2 sees all 3 regions failing"
    assert re.fullmatch(rf"verdicts: agent-ap-southeast-2 set aside \({cut}.*\); no region blamed for it", actions[2])
    assert kinds[3] == "network: agent-ap-southeast-2 reaches the regions again; its vantage counts again"
    assert any(line.endswith("set aside: agent-ap-southeast-2") for line in lines)
    # Then the lag spike: the started ramp holds until the replica has caught up.
    assert kinds[4] == "lag spike: eu-west-1's replica falls 30s behind"
    assert actions[5] == "verdict: eu-west-1 degraded: replica-lag (cloudwatch lag): 30.0s, over its 5s limit"
    assert kinds[6] == "operator: start ramp launch-eu-west-1"
    assert kinds[7] == "lag recovered: eu-west-1's replica caught up"
    assert kinds[8] == "route53 forward"
    fault = kinds.index("fault: eu-west-1 fails 40% of API requests, /healthz stays 200")
    rollback = kinds.index("route53 rollback")
    assert fault < rollback < kinds.index("fault cleared on eu-west-1")
    # Resumed from the first step, to the end (on failure, every action says why it was taken).
    assert kinds[rollback + 2 :].count("route53 forward") == 5, "\n".join(actions)
    assert "rollback: eu-west-1 is degraded: orders:" in actions[rollback]
    # The clients really moved: eu-west-1's share of their requests over every timeline line once
    # the ramp was done (each line is ~100 requests: one alone is too few on a loaded machine).
    done = [line for line in lines if " ramp done " in line]
    shares = [int(re.search(r"eu-west-1 (\d+)%", line.split("traffic")[1]).group(1)) for line in done]
    assert abs(sum(shares) / len(shares) - 50) <= 12, done
    assert lines[-1].startswith("demo: the launch played out")


def test_without_mosquitto_the_launch_demo_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr("controller.demo.broker.MOSQUITTO", "/nonexistent/mosquitto")
    assert main(["demo", "--duration", "150"]) == 1
    assert capsys.readouterr().err == (
        "regionshift: the launch demo's agents need an MQTT broker: apt-get install mosquitto (make demo installs it)\n"
    )


def test_without_moto_the_launch_demo_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr("controller.demo.world.moto_server", lambda: None)  # as after `pip install .`
    assert main(["demo", "--duration", "150"]) == 1
    err = capsys.readouterr().err
    assert (
        err
        == "regionshift: the launch demo needs moto's server as its local Route 53: pip install 'regionshift[demo]'\n"
    )


def test_the_probe_table_says_a_certificate_s_expiry_once():
    # "... 14.0 days required; cert expires in 3d": the error says it already.
    from controller.cli import _cells  # noqa: PLC0415 - the table's own cells
    from probes.results import Result  # noqa: PLC0415

    extra = {"cert_expires_in_seconds": 3 * 86400.0}
    error = "certificate expires 2026-12-07T00:00:00+00:00, in 3.0 days; at least 14.0 days required"
    expiring = Result("eu-west-1", "api", "controller", 0.0, ok=False, latency=0.01, error_class="cert_expiry",
                      error=error, extra=extra)  # fmt: skip
    fine = Result("eu-west-1", "api", "controller", 0.0, ok=True, latency=0.01, extra=extra)
    assert _cells(expiring)[-1] == error
    assert _cells(fine)[-1] == "cert expires in 3d"
