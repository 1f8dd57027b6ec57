"""Loading: one YAML file, validated whole by pydantic before anything runs, with its policy files
merged in. Every mistake becomes a `ConfigError` whose message names the file, the line, the
field path and what to do about it, so `regionshift validate` can print it and exit 2 without a
traceback.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ValidationError

from controller.settings.limits import SHARE_EPSILON
from controller.settings.model import LocatedError
from controller.settings.policy import Policy
from controller.settings.schema import Config
from probes.scheduler import JITTER as AGENT_JITTER
from probes.spec import PROBE_KINDS, PROBE_TAGS, redact

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from pydantic_core import ErrorDetails


class ConfigError(Exception):
    """A user's mistake in a configuration or policy file; the message is meant for them."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; in a config that hides a mistake."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:  # noqa: FBT001, FBT002
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"found the key {key!r} twice (first on line {seen[key].start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


# A configuration for a hundred regions with ten probes each is about 300 KB; a file many times
# that is a mistake (a log, a dump), and validating it would take minutes and gigabytes.
MAX_FILE_BYTES = 2 * 1024 * 1024
# No setting takes a number with more digits than this (Python refuses to read one of 4,300).
MAX_DIGITS = 30


def _read_yaml(path: Path, what: str) -> tuple[Any, yaml.Node | None]:
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise ConfigError(
                f"{path}: the {what} file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB; no {what} needs "
                "that much: is it the right file?"
            )
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a {what} file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the {what} file: {exc}") from None
    loader = _UniqueKeyLoader(text)
    try:
        # One parse: the node tree locates errors by line, the data is built from the same tree.
        node = loader.get_single_node()
        _refuse_long_numbers(path, node)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = " ".join(filter(None, [exc.context, exc.problem]))
        raise ConfigError(f"{path}{line}: not valid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except (ValueError, OverflowError) as exc:  # a scalar PyYAML cannot turn into a value
        raise ConfigError(f"{path}: a value cannot be read: {exc}") from None
    finally:
        loader.dispose()
    return data, node


def _refuse_long_numbers(path: Path, node: yaml.Node | None) -> None:
    """A number with more digits than any setting takes, by its line (before PyYAML converts it)."""
    stack = [node] if node is not None else []
    while stack:
        current = stack.pop()
        if isinstance(current, yaml.ScalarNode):
            digits = sum(c.isdigit() for c in current.value)
            if current.tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") and digits > MAX_DIGITS:
                line = current.start_mark.line + 1
                raise ConfigError(f"{path}:{line}: a number with {digits} digits; no setting takes one that long")
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)
        elif isinstance(current, yaml.MappingNode):
            stack.extend(v for pair in current.value for v in pair)


def _line_of(node: yaml.Node | None, loc: Sequence[int | str]) -> int | None:
    """The line (1-based) of the deepest YAML node along `loc` that exists."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            node = match[1]
            line = match[0].start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _dotted(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _kind_list() -> str:
    return ", ".join(
        f"{kind} (source: {' or '.join(sources)})" if sources else kind for kind, sources in PROBE_KINDS.items()
    )


def _explain(error: ErrorDetails, model: type[BaseModel], loc: list[int | str]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        hint = f"; allowed here: {', '.join(allowed)}" if allowed else ""
        return f"unknown key {loc[-1]!r}{hint}"
    if kind == "missing":
        return "required but missing"
    if kind == "union_tag_invalid":
        given = error["input"] if isinstance(error["input"], dict) else {"kind": error["input"]}
        if given.get("kind") in PROBE_KINDS:
            sources = " or ".join(PROBE_KINDS[given["kind"]])
            return f"unknown source {given.get('source')!r} for kind {given['kind']!r}; use {sources}"
        return f"unknown probe kind {given.get('kind')!r}; use one of: {_kind_list()}"
    if kind == "union_tag_not_found":
        return f"a probe needs `kind:` (one of: {_kind_list()})"
    message = error["msg"].removeprefix("Value error, ")
    if error.get("ctx", {}).get("class_name") == "Secret":  # what was written may be the secret: never shown
        return "a secret is named, not written: {env: VARIABLE} or {file: PATH}"
    shown = error.get("input")
    if kind not in ("value_error", "assertion_error") and not isinstance(shown, dict | list):
        message += f" (got {redact(repr(shown))})"
    return message


def _allowed_keys(model: type[BaseModel], loc: Sequence[int | str]) -> list[str]:
    """Field names of the model found by walking `loc` through `model`'s fields."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if part in PROBE_TAGS:
            current = PROBE_TAGS[part]
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        current = _inner_model(fields[part].annotation)
    fields = getattr(current, "model_fields", None)
    return [name for name, f in (fields or {}).items() if not f.exclude] if fields else []


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _validate(model: type[BaseModel], data: Any, path: Path, node: yaml.Node | None, what: str) -> Any:
    if data is None:
        raise ConfigError(f"{path}: the {what} file is empty; see deploy/regionshift.example.yaml for a start")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the {what} file must be a mapping of keys to values, not a {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False):
            loc = [p for p in error["loc"] if p not in PROBE_TAGS]
            ctx_error = (error.get("ctx") or {}).get("error")
            if isinstance(ctx_error, LocatedError):  # a path relative to where the validator ran
                loc = loc + _parse_dotted(ctx_error.path)
            line = _line_of(node, loc)
            where = f"{path}:{line}" if line else str(path)
            lines.append(f"{where}: {_dotted(loc)}: {_explain(error, model, list(error['loc']))}")
        raise ConfigError("\n".join(lines)) from None


def _parse_dotted(text: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", text)]


def load_policy(paths: Sequence[Path]) -> tuple[Policy, dict[str, tuple[Path, yaml.Node | None]]]:
    """Merge policy files; a section defined in two files is an error naming both.

    Returns the policy and, per section, the file (and its YAML tree) that defined it.
    """
    merged: dict[str, Any] = {}
    sources: dict[str, tuple[Path, yaml.Node | None]] = {}
    for path in paths:
        data, node = _read_yaml(path, "policy")
        if data is None:
            continue
        policy = _validate(Policy, data, path, node, "policy")
        for section in data:
            if section in sources:
                raise ConfigError(
                    f"{path}: section {section!r} is also defined in {sources[section][0]}; define it once"
                )
            sources[section] = (path, node)
            merged[section] = getattr(policy, section)
    return Policy(**merged), sources


def _check_freshness(config: Config, policy: Policy, path: Path, node: yaml.Node | None) -> None:
    """Every probe's results must come closer together than `verdicts.stale_after`: each run is
    moved by up to `controller.jitter` of the interval either way, so one starts up to `interval` x
    (1 + 2 x `jitter`) after the last (agents move theirs by 0.1), and its result comes up to its
    `timeout` later; a probe whose newest result is older than `stale_after` is not judged.
    Further apart, its region went `unknown` between runs while it answered (a replication lag
    probe read every 60 s under the shipped 30 s), and a ramp step or a restore due then was refused."""
    stale_after = policy.verdicts.stale_after
    stretch = 1 + 2 * max(config.controller.jitter, AGENT_JITTER if config.agents is not None else 0.0)
    for i, region in enumerate(config.regions):
        for j, probe in enumerate(region.probes):
            gap = probe.interval * stretch + probe.timeout
            if gap > stale_after:
                loc: list[int | str] = ["regions", i, "probes", j, "interval"]
                raise ConfigError(
                    f"{path}:{_line_of(node, loc)}: {_dotted(loc)}: probe {probe.name!r} of {region.name} "
                    f"every {probe.interval:g}s (up to {probe.interval * stretch:g}s apart, moved by up to "
                    f"{(stretch - 1) / 2:g} of it either way) and its timeout {probe.timeout:g}s "
                    f"leave up to {gap:g}s between its results, longer than verdicts.stale_after "
                    f"{stale_after:g}s: {region.name} would be unknown between runs; probe more often, "
                    "shorten the timeout or raise stale_after"
                )


def _check_ramps(config: Config, policy: Policy, sources: Mapping[str, tuple[Path, yaml.Node | None]]) -> None:
    """Ramps must fit the configuration they move and the guardrails they run under."""
    if not policy.ramps:
        return
    path, node = sources["ramps"]
    record_sets = {rs.key: rs for rs in config.record_sets}
    max_step = policy.guardrails.max_step

    def fail(name: str, field: str, message: str) -> ConfigError:
        loc: list[int | str] = ["ramps", name, *_parse_dotted(field)]
        line = _line_of(node, loc)
        return ConfigError(f"{path}:{line}: {_dotted(loc)}: {message}")

    for name, ramp in policy.ramps.items():
        rs = record_sets.get(ramp.record_key)
        if rs is None:
            known = ", ".join(record_sets) or "none"
            raise fail(name, "record_set", f"no record set {ramp.record_key!r} in the configuration; known: {known}")
        members = {m.region for m in rs.members}
        for w, wave in enumerate(ramp.waves):
            for r, region_name in enumerate(wave):
                if region_name not in members:
                    raise fail(
                        name,
                        f"waves[{w}][{r}]",
                        f"{region_name!r} is not a member of {rs.key}; members: {', '.join(sorted(members))}",
                    )
                region = config.region(region_name)
                if region.type == "lightweight" and ramp.steps[-1] > region.max_share:
                    raise fail(
                        name,
                        "steps",
                        f"the last step ({ramp.steps[-1]:g}%) exceeds the max_share of {region_name} "
                        f"({region.max_share:g}%)",
                    )
            if len(wave) * ramp.steps[-1] > 100:  # noqa: PLR2004 - percent
                raise fail(name, f"waves[{w}]", f"{len(wave)} regions at {ramp.steps[-1]:g}% each exceed 100%")
            previous = 0.0
            for i, share in enumerate(ramp.steps):
                moved = len(wave) * (share - previous)
                if moved > max_step + SHARE_EPSILON:
                    raise fail(
                        name,
                        f"steps[{i}]",
                        f"step to {share:g}% moves {moved:g}% of traffic at once (wave {w + 1} has "
                        f"{len(wave)} region{'s' if len(wave) != 1 else ''}), more than guardrails.max_step "
                        f"{max_step:g}%: add a step in between",
                    )
                previous = share


def load_config(path: str | Path) -> Config:
    """Read, validate and return the configuration with its policy files merged in."""
    path = Path(path)
    data, node = _read_yaml(path, "configuration")
    if isinstance(data, dict) and "policy" in data:
        line = _line_of(node, ["policy"])
        raise ConfigError(f"{path}:{line}: policy: unknown key; list policy files under `policies:` instead")
    if isinstance(data, dict) and "base_dir" in data:
        line = _line_of(node, ["base_dir"])
        raise ConfigError(f"{path}:{line}: base_dir: unknown key; paths are relative to this file")
    config: Config = _validate(Config, data, path, node, "configuration")
    policy_paths = []
    for i, name in enumerate(config.policies):
        policy_path = (path.parent / name).resolve()
        if not policy_path.is_file():
            line = _line_of(node, ["policies", i])
            what = "is a directory, not a file" if policy_path.is_dir() else "not found"
            raise ConfigError(f"{path}:{line}: policies[{i}]: policy file {name!r} {what} (looked at {policy_path})")
        policy_paths.append(policy_path)
    policy, sources = load_policy(policy_paths)
    _check_freshness(config, policy, path, node)
    _check_ramps(config, policy, sources)
    return config.model_copy(update={"policy": policy, "base_dir": str(path.parent)})
