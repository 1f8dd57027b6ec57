"""Configuration: valid files load, broken ones exit 2 naming the file, line, field and fix."""

from __future__ import annotations

import math
import subprocess
import textwrap

import pytest

from controller.cli import main
from controller.settings.loading import load_config
from probes.spec import parse_duration
from tests.conftest import REGIONSHIFT, REPO

EXAMPLE = REPO / "deploy" / "regionshift.example.yaml"

ONE_REGION = "regions:\n  - name: eu-west-1\n"


def record_set(member: str, extra: str = "") -> str:
    return (
        "regions:\n  - name: eu-west-1\n    residency: EU\n  - name: us-east-1\n    residency: US\n"
        "  - name: us-west-2\n    type: read-only\n    residency: US\n"
        "record_sets:\n  - zone_id: Z1ABC\n    name: api.example.com\n" + extra + "    members:\n" + member
    )


def probe(body: str) -> str:
    return "regions:\n  - name: eu-west-1\n    probes:\n      - " + textwrap.indent(body, "        ").lstrip()


# name, file content, (substrings the message must contain: the line, the field path, the fix)
BROKEN = [
    ("empty file", "", ("is empty",)),
    ("only a comment", "# nothing here\n", ("is empty",)),
    ("broken YAML", "regions: [\n", (":2:1:", "not valid YAML")),
    ("bad indentation", "regions:\n  - name: a\n   type: full\n", ("not valid YAML",)),
    ("a list at the top", "- eu-west-1\n", ("must be a mapping", "not a list")),
    ("no regions", "controller: {}\n", (":1:", "regions", "required but missing")),
    (
        "unknown top-level key",
        ONE_REGION + "regoins: []\n",
        (":3:", "regoins", "unknown key", "allowed here: controller"),
    ),
    (
        "unknown region key",
        "regions:\n  - name: a\n    colour: red\n",
        (":3:", "regions[0].colour", "allowed here: name"),
    ),
    (
        "wrong type",
        "regions:\n  - name: a\n    type: huge\n",
        (":3:", "regions[0].type", "'full', 'lightweight' or 'read-only'", "huge"),
    ),
    (
        "max_share not a number",
        "regions:\n  - name: a\n    max_share: lots\n",
        ("regions[0].max_share", "valid number"),
    ),
    (
        "max_share over 100",
        "regions:\n  - name: a\n    max_share: 150\n",
        ("regions[0].max_share", "less than or equal to 100"),
    ),
    ("bad region name", "regions:\n  - name: EU West\n", ("regions[0].name", "should match pattern")),
    (
        "duplicate region",
        "regions:\n  - name: a\n  - name: b\n  - name: a\n",
        (":4:", "regions[2].name", "duplicate region name 'a'"),
    ),
    (
        "duplicate key",
        "regions:\n  - name: a\nregions:\n  - name: b\n",
        (":3:", "key 'regions' twice", "first on line 1"),
    ),
    (
        "member of an unknown region",
        record_set("      - {set_identifier: x, region: mars-1, value: 192.0.2.1}\n"),
        (":13:", "record_sets[0].members[0].region", "unknown region 'mars-1'", "known: eu-west-1"),
    ),
    (
        "weight over 255",
        record_set("      - {set_identifier: x, region: eu-west-1, value: 192.0.2.1, weight: 300}\n"),
        ("record_sets[0].members[0].weight", "less than or equal to 255", "300"),
    ),
    (
        "negative weight",
        record_set("      - {set_identifier: x, region: eu-west-1, value: 192.0.2.1, weight: -1}\n"),
        ("record_sets[0].members[0].weight", "greater than or equal to 0"),
    ),
    (
        "all weights zero",
        record_set(
            "      - {set_identifier: x, region: eu-west-1, value: 192.0.2.1, weight: 0}\n"
            "      - {set_identifier: y, region: us-east-1, value: 192.0.2.2, weight: 0}\n"
        ),
        ("record_sets[0].members", "all-zero group", "at least one member"),
    ),
    (
        "TTL out of range",
        record_set("      - {set_identifier: x, region: eu-west-1, value: 192.0.2.1}\n", "    ttl: 3000000000\n"),
        (":12:", "record_sets[0].ttl", "less than or equal to 2147483647"),
    ),
    (
        "set identifier too long",
        record_set("      - {set_identifier: " + "x" * 129 + ", region: eu-west-1, value: 192.0.2.1}\n"),
        ("record_sets[0].members[0].set_identifier", "at most 128 characters"),
    ),
    (
        "duplicate set identifier",
        record_set(
            "      - {set_identifier: x, region: eu-west-1, value: 192.0.2.1}\n"
            "      - {set_identifier: x, region: us-east-1, value: 192.0.2.2}\n"
        ),
        ("record_sets[0].members[1].set_identifier", "duplicate set_identifier 'x'"),
    ),
    (
        "region outside the record set's residency",
        record_set("      - {set_identifier: x, region: us-east-1, value: 192.0.2.1}\n", "    residency: EU\n"),
        ("record_sets[0].members[0].region", "residency 'US'", "keeps residency 'EU'"),
    ),
    (
        "read-only region in a record set that takes writes",
        record_set("      - {set_identifier: x, region: us-west-2, value: 192.0.2.1}\n"),
        ("record_sets[0].members[0].region", "read-only", "takes_writes: false"),
    ),
    (
        "configured weights over a lightweight region's max_share",
        (
            "regions:\n  - name: us-east-1\n  - name: ap-1\n    type: lightweight\n    max_share: 20\n"
            "record_sets:\n  - zone_id: Z1ABC\n    name: api.example.com\n    members:\n"
            "      - {set_identifier: a, region: us-east-1, value: 192.0.2.1, weight: 100}\n"
            "      - {set_identifier: b, region: ap-1, value: 192.0.2.2, weight: 200}\n"
        ),
        (":11:", "record_sets[0].members[1].weight", "gives 'ap-1' 66.7%", "over its max_share of 20%"),
    ),
    (
        "bad duration",
        probe("kind: http\nname: h\ntarget: http://a/\ninterval: 5 parsecs\n"),
        (":7:", "regions[0].probes[0].interval", "'5 parsecs' is not a duration", "e.g. '500ms'"),
    ),
    (
        "timeout longer than interval",
        probe("kind: http\nname: h\ntarget: http://a/\ninterval: 1s\ntimeout: 2s\n"),
        ("regions[0].probes[0]", "timeout (2s) is longer than interval (1s)", "shorten the timeout"),
    ),
    (
        "a probe whose results come further apart than stale_after",
        probe("kind: http\nname: h\ntarget: http://a/\ninterval: 25s\ntimeout: 5s\n"),
        (
            ":7:",
            "regions[0].probes[0].interval",
            "probe 'h' of eu-west-1 every 25s (up to 30s apart, moved by up to 0.1 of it either way)",
            "and its timeout 5s",
            "up to 35s between its results, longer than verdicts.stale_after 30s",
            "eu-west-1 would be unknown between runs",
        ),
    ),
    (
        "unknown probe kind",
        probe("kind: icmp\nname: h\n"),
        (":4:", "regions[0].probes[0]", "unknown probe kind 'icmp'", "http, tcp"),
    ),
    ("probe without kind", probe("name: h\ntarget: http://a/\n"), ("regions[0].probes[0]", "needs `kind:`")),
    (
        "a typo inside a replication-lag probe, on its own line and path",
        probe("kind: replication-lag\nname: db\nprimary: {env: P}\nreplica: {env: R}\ntabel: x\n"),
        (":8:", "regions[0].probes[0].tabel: unknown key 'tabel'", "table"),
    ),
    (
        "an unknown kind is told every kind the probe union has",
        probe("kind: udp\nname: u\n"),
        (":4:", "use one of: http, tcp, replication-lag (source: postgres or cloudwatch)"),
    ),
    (
        "an unknown source of a known kind",
        probe("kind: replication-lag\nsource: mysql\nname: m\n"),
        (":4:", "unknown source 'mysql' for kind 'replication-lag'; use postgres or cloudwatch"),
    ),
    (
        "misspelt probe key",
        probe("kind: http\nname: h\ntarget: http://a/\ntiemout: 2s\n"),
        (":7:", "regions[0].probes[0].tiemout", "unknown key", "allowed here:", "timeout"),
    ),
    (
        "not a URL",
        probe("kind: http\nname: h\ntarget: ftp://a/\n"),
        ("regions[0].probes[0].target", "not an http:// or https:// URL"),
    ),
    (
        "tcp target without port",
        probe("kind: tcp\nname: db\ntarget: db.internal\n"),
        ("regions[0].probes[0].target", "not host:port"),
    ),
    (
        "bad status code",
        probe("kind: http\nname: h\ntarget: http://a/\nexpect_status: [200, 999]\n"),
        ("regions[0].probes[0].expect_status[1]", "less than or equal to 599"),
    ),
    (
        "bad regex",
        probe("kind: http\nname: h\ntarget: http://a/\nbody_regex: '(unclosed'\n"),
        ("regions[0].probes[0].body_regex", "not a valid regular expression"),
    ),
    (
        "missing policy file",
        ONE_REGION + "policies: [nope.yaml]\n",
        (":3:", "policies[0]", "policy file 'nope.yaml' not found"),
    ),
    (
        "a policy file that is a directory",
        ONE_REGION + "policies: ['.']\n",
        (":3:", "policies[0]", "policy file '.' is a directory, not a file"),
    ),
    ("policy written inline", ONE_REGION + "policy: {}\n", (":3:", "list policy files under `policies:`")),
    (
        "bad listen address",
        "controller: {listen: 'nowhere'}\n" + ONE_REGION,
        (":1:", "controller.listen", "not host:port"),
    ),
    (
        "a zero tick would spin a core",
        "controller: {tick: 0s}\n" + ONE_REGION,
        (":1:", "controller.tick: 0s is out of range: allowed 10ms to 1d"),
    ),
    (
        "a NaN interval",
        probe("kind: http\nname: h\ntarget: http://a/\ninterval: .nan\n"),
        (":7:", "probes[0].interval: nan is not a number of seconds"),
    ),
    (
        "an infinite timeout",
        probe("kind: http\nname: h\ntarget: http://a/\ntimeout: .inf\n"),
        (":7:", "probes[0].timeout: inf is longer than any setting takes: at most 366d"),
    ),
    (
        "an absurd duration",
        "controller: {route53: {insync_timeout: 99999999999999999999999d}}\n" + ONE_REGION,
        (":1:", "controller.route53.insync_timeout", "at most 366d"),
    ),
    (
        "a zero timeout",
        probe("kind: http\nname: h\ntarget: http://a/\ntimeout: 0s\n"),
        ("probes[0].timeout: 0s is out of range: allowed more than 0s, at most 366d",),
    ),
    (
        "a boolean weight",
        record_set("      - {set_identifier: a, region: eu-west-1, value: 192.0.2.1, weight: true}\n"),
        (":13:", "members[0].weight: a boolean (true/false) is not a value this field takes"),
    ),
    (
        "a boolean in a list of numbers",
        probe("kind: http\nname: h\ntarget: http://a/\nexpect_status: [200, true]\n"),
        ("probes[0].expect_status", "a boolean"),
    ),
    (
        "a 5,000-digit number",
        "controller: {max_concurrency: " + "9" * 5000 + "}\n" + ONE_REGION,
        (":1:", "a number with 5000 digits"),
    ),
]


@pytest.mark.parametrize(("name", "text", "expected"), BROKEN, ids=[b[0] for b in BROKEN])
def test_validate_rejects_broken_configuration_with_exit_2_and_names_the_field(name, text, expected, write, capsys):
    path = write("regionshift.yaml", text)
    assert main(["validate", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    for part in expected:
        assert part in err, f"{name}: {part!r} not in {err!r}"
    assert "Traceback" not in err


def test_policy_errors_name_the_policy_file_and_field(write, capsys):
    write("verdicts.yaml", "verdicts:\n  window: forever\n")
    path = write("regionshift.yaml", ONE_REGION + "policies: [verdicts.yaml]\n")
    assert main(["validate", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "verdicts.yaml:2: verdicts.window: 'forever' is not a duration" in err


def test_policy_thresholds_out_of_order_are_rejected(write, capsys):
    write("verdicts.yaml", "verdicts:\n  degraded_below: 0.5\n  unhealthy_below: 0.9\n")
    path = write("regionshift.yaml", ONE_REGION + "policies: [verdicts.yaml]\n")
    assert main(["validate", "-c", str(path)]) == 2
    assert "must pass through degraded before unhealthy" in capsys.readouterr().err


def test_a_policy_section_defined_in_two_files_is_rejected(write, capsys):
    write("a.yaml", "verdicts: {window: 30s}\n")
    write("b.yaml", "verdicts: {window: 60s}\n")
    path = write("regionshift.yaml", ONE_REGION + "policies: [a.yaml, b.yaml]\n")
    assert main(["validate", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "b.yaml: section 'verdicts' is also defined in" in err
    assert "a.yaml" in err


def test_missing_configuration_file_exits_2(tmp_path, capsys):
    assert main(["validate", "-c", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml: configuration file not found" in capsys.readouterr().err


def test_a_directory_is_not_a_configuration(tmp_path, capsys):
    assert main(["validate", "-c", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_shipped_example_configuration_is_valid_and_loads_its_policy(capsys):
    assert main(["validate", "-c", str(EXAMPLE)]) == 0
    assert "ok: 3 regions, 5 probes, 2 record sets, 3 policy files" in capsys.readouterr().out
    config = load_config(EXAMPLE)
    assert config.policy.verdicts.window == 60.0
    assert config.policy.verdicts.down_after == 3
    assert config.policy.guardrails.max_step == 25
    assert config.policy.evacuation.restore_after == 600
    ramp = config.policy.ramps["launch-eu-west-1"]
    assert (ramp.record_key, ramp.steps, ramp.bake) == ("api.example.com/A", [1, 5, 10, 25, 50], 600)
    orders = config.region("us-east-1").probes[1]
    assert orders.tls.min_validity == 14 * 86400


def test_defaults_fill_what_the_file_leaves_out(write):
    config = load_config(write("regionshift.yaml", ONE_REGION))
    region = config.regions[0]
    assert (region.type, region.max_share, region.residency) == ("full", 100.0, None)
    assert config.controller.listen == "127.0.0.1:9181"
    assert config.policy.verdicts.degraded_below == 0.95


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("30s", 30.0), ("2m", 120.0), ("1h30m", 5400.0), ("1d", 86400.0), (5, 5.0), ("1.5s", 1.5)],
)
def test_durations_parse_to_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5 parsecs", "", "10", "s", "1x", "-5s", "1s2", True, math.nan, math.inf, 10**400])
def test_bad_durations_are_refused_with_the_accepted_forms(text):
    with pytest.raises(ValueError, match=r"duration|negative|number of seconds|longer than any setting"):
        parse_duration(text)


def test_waits_may_be_zero_where_zero_means_none(write):
    path = write("p.yaml", "evacuation: {step_bake: 0s, confirm_after: 0s}\n")
    config = load_config(write("regionshift.yaml", ONE_REGION + "policies: [p.yaml]\n"))
    assert path.exists()
    assert (config.policy.evacuation.step_bake, config.policy.evacuation.confirm_after) == (0.0, 0.0)


def test_a_configuration_file_larger_than_any_configuration_is_refused_before_it_is_read(write, capsys):
    path = write("regionshift.yaml", ONE_REGION + "# padding\n" * 300_000)  # 3 MB
    assert main(["validate", "-c", str(path)]) == 2
    assert "larger than 2 MiB" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["validate"], "the following arguments are required: -c/--config"),
        (["launch"], "invalid choice: 'launch'"),
        (["demo", "--duration", "soon"], "'soon' is not a number of seconds"),
        (["demo", "--duration", "nan"], "'nan': must be a finite number of seconds above zero"),
        (["demo", "--duration", "inf"], "'inf': must be a finite number of seconds above zero"),
        (["run", "-c", "any.yaml", "--listen", "garbage"], "argument --listen: 'garbage' is not host:port"),
        (["run", "-c", "any.yaml", "--listen", "127.0.0.1:99999"], "with a port from 0 to 65535"),
        (["demo", "--listen", "127.0.0.1:99999"], "argument --listen: '127.0.0.1:99999' is not host:port"),
    ],
)
def test_bad_usage_exits_2_with_usage(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_console_script_reports_a_broken_configuration_without_traceback(write, cli_env):
    path = write("regionshift.yaml", "regions:\n  - name: a\n    type: huge\n")
    proc = subprocess.run(
        [REGIONSHIFT, "validate", "-c", str(path)], capture_output=True, text=True, env=cli_env, check=False
    )
    assert proc.returncode == 2
    assert f"{path}:3: regions[0].type:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("state_path", "expected"),
    [
        ("missing/state.sqlite", "the state file's directory {dir}/missing does not exist"),
        (".", "the state file {dir} is a directory"),
        ("notes.txt", "{dir}/notes.txt is not a regionshift state file"),
    ],
    ids=["missing directory", "a directory", "not a state file"],
)
def test_run_refuses_a_state_path_it_cannot_use_in_one_sentence_with_exit_1(state_path, expected, write, cli_env):
    notes = write("notes.txt", "keep me\n")
    path = write(
        "regionshift.yaml",
        f"controller: {{listen: '127.0.0.1:0', state_path: '{state_path}'}}\n"
        "regions:\n  - name: a\n"
        "record_sets:\n  - zone_id: Z1\n    name: api.example.com\n    members:\n"
        "      - {set_identifier: a, region: a, value: 192.0.2.1, weight: 1}\n",
    )
    proc = subprocess.run(
        [REGIONSHIFT, "run", "-c", str(path)], capture_output=True, text=True, env=cli_env, check=False, timeout=60
    )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("regionshift: ")
    assert expected.format(dir=path.parent) in last
    assert "Traceback" not in proc.stderr
    assert notes.read_text() == "keep me\n"


RAMP_CONFIG = (
    "policies: [ramp.yaml]\nregions:\n  - name: us-east-1\n  - name: eu-west-1\n"
    "  - name: ap-1\n    type: lightweight\n    max_share: 10\n"
    "record_sets:\n  - zone_id: Z1\n    name: api.example.com\n    members:\n"
    "      - {set_identifier: a, region: us-east-1, value: 192.0.2.1}\n"
    "      - {set_identifier: b, region: eu-west-1, value: 192.0.2.2}\n"
    "      - {set_identifier: c, region: ap-1, value: 192.0.2.3}\n"
)


@pytest.mark.parametrize(
    ("ramp", "expected"),
    [
        (
            "record_set: www.example.com\n    waves: [[eu-west-1]]\n",
            ("ramp.yaml:4: ramps.launch.record_set:", "no record set 'www.example.com/A'", "known: api.example.com/A"),
        ),
        (
            "record_set: api.example.com\n    waves: [[eu-central-1]]\n",
            ("ramps.launch.waves[0][0]:", "'eu-central-1' is not a member of api.example.com/A"),
        ),
        (
            "record_set: api.example.com\n    waves: [[eu-west-1]]\n    steps: [10, 50]\n",
            (
                "ramps.launch.steps[1]:",
                "moves 40% of traffic at once",
                "more than guardrails.max_step 25%",
                "add a step",
            ),
        ),
        (
            "record_set: api.example.com\n    waves: [[ap-1]]\n    steps: [5, 20]\n",
            ("ramps.launch.steps:", "the last step (20%) exceeds the max_share of ap-1 (10%)"),
        ),
        (
            "record_set: api.example.com\n    waves: [[eu-west-1]]\n    steps: [5, 5]\n",
            ("ramps.launch.steps:", "steps must increase"),
        ),
        (
            "record_set: api.example.com\n    waves: [[eu-west-1], [eu-west-1]]\n",
            ("ramps.launch.waves:", "'eu-west-1' is in more than one wave"),
        ),
        (
            "record_set: api.example.com\n    waves: [[eu-west-1]]\n    on_failure: panic\n",
            ("ramps.launch.on_failure:", "'rollback', 'step-back' or 'pause'"),
        ),
    ],
)
def test_ramp_policies_must_fit_the_configuration_and_the_guardrails(ramp, expected, write, capsys):
    write("ramp.yaml", "guardrails: {max_step: 25}\nramps:\n  launch:\n    " + ramp)
    path = write("regionshift.yaml", RAMP_CONFIG)
    assert main(["validate", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    for part in expected:
        assert part in err, (part, err)


@pytest.mark.parametrize("command", [["validate"], ["plan", "--ramp", "launch"], ["run"]])
def test_a_ramp_whose_steps_from_the_configured_weights_move_too_much_is_refused(command, write, capsys):
    # Its steps from 0% are fine; but eu-west-1 is configured at 50%, so the first step (to 1%)
    # moves 49% onto us-east-1 at once. validate and plan said ok and the daemon refused every step.
    write(
        "ramp.yaml",
        "guardrails: {max_step: 25}\nramps:\n  launch:\n    record_set: api.example.com\n    waves: [[eu-west-1]]\n",
    )
    weighted = RAMP_CONFIG.replace("192.0.2.1}", "192.0.2.1, weight: 100}").replace(
        "192.0.2.2}", "192.0.2.2, weight: 100}"
    )
    path = write("regionshift.yaml", weighted.replace("192.0.2.3}", "192.0.2.3, weight: 0}"))
    assert main([command[0], "-c", str(path), *command[1:]]) == 2
    out, err = capsys.readouterr()
    if command[0] == "plan":  # the plan first, with the step that moves too much in it to see
        assert "49.0%" in out
    assert (
        "ramps.launch: step 1.1 (to 1%) moves 49.0% of traffic at once from the configured weights of "
        "api.example.com/A (a=100 b=100 c=0), more than guardrails.max_step 25%"
    ) in err


def test_a_configuration_error_never_echoes_a_password_in_a_url(write, capsys):
    path = write("regionshift.yaml", probe("kind: http\nname: h\ntarget: 'https://u:hunter2@a.example:99999/'\n"))
    assert main(["validate", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'https://***@a.example:99999/' has an invalid port" in err
    assert "hunter2" not in err


@pytest.mark.parametrize(
    ("agents", "expected"),
    [
        (
            "password: {env: RS_TEST_UNSET_PASSWORD}",
            "regionshift: {path}: agents.password: $RS_TEST_UNSET_PASSWORD is empty or not set",
        ),
        (
            "tls: {ca_file: /nonexistent/ca.pem}",
            "regionshift: {path}: agents.tls.ca_file /nonexistent/ca.pem: No such file or directory",
        ),
        (
            "tls: {ca_file: /etc/passwd}",
            (
                "regionshift: {path}: agents.tls.ca_file /etc/passwd: no CA certificate in it (PEM) "
                "(NO_CERTIFICATE_OR_CRL_FOUND)"
            ),
        ),
    ],
)
def test_run_refuses_agents_it_could_never_reach_before_it_starts(agents, expected, write, capsys, monkeypatch):
    # It started, served its API, then stopped with "unexpected LookupError (a bug)", or retried
    # a missing CA file for ever as "broker unreachable".
    monkeypatch.delenv("RS_TEST_UNSET_PASSWORD", raising=False)
    text = (
        "controller: {listen: '127.0.0.1:0'}\n"
        "regions:\n  - name: us-east-1\n    probes: [{kind: tcp, name: port, target: '127.0.0.1:9'}]\n"
        f"agents:\n  broker: 127.0.0.1:1\n  vantages: [agent-a]\n  {agents}\n"
    )
    path = write("regionshift.yaml", text)
    assert main(["validate", "-c", str(path)]) == 0  # the file is fine; what it names is missing
    capsys.readouterr()
    assert main(["run", "-c", str(path)]) == 2
    out = capsys.readouterr()
    assert out.err.strip() == expected.format(path=path)
    assert "started" not in out.out + out.err
