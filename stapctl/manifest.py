"""Load and check a stapctl/v1 manifest into typed values, once.

Every problem is reported at once, each with file:line:column, the key path and what was
expected in plain words, so an operator fixes a manifest in one round trip. The YAML
reader (yamldoc) refuses hostile input; the schema wording is in schema.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from stapctl.errors import Issue, ManifestError
from stapctl.inventory import read_inline_inventory
from stapctl.models import (
    BatchSize,
    DetachSpec,
    DiffSpec,
    HttpSink,
    InlineInventory,
    JsonLinesSink,
    Manifest,
    OutputSpec,
    Percent,
    Probe,
    Sink,
    Strategy,
    SyslogSink,
    Target,
    TextfileSink,
)
from stapctl.render import check_template
from stapctl.schema import (
    SCHEMA_BASE,
    describe,
    load_schema,
    object_view,
    registry,
    resolved,
    schema_issues,
    unknown_key_message,
)
from stapctl.yamldoc import Document, KeyPath, UnreadableFile, read_text, read_yaml

SUPPORTED_API_VERSION = "stapctl/v1"
_DURATION = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)(?P<unit>ms|s|m|h)?")
_PERCENTAGE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)%")
_SECONDS_PER_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DAYS = re.compile(r"(?P<days>[0-9]+)d")
_SIZE = re.compile(r"(?P<number>[0-9]+)\s*(?P<unit>[KMG]i?B|B)?")
_BYTES_PER_UNIT = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KiB": 1 << 10,
                   "MiB": 1 << 20, "GiB": 1 << 30}


# --- durations, percentages, stap options ----------------------------------------------


def parse_duration(value: object) -> float:
    """Seconds in ``30s``, ``500ms``, ``5m``, ``1h`` or a plain number of seconds;
    ValueError (saying what is expected) for anything else, zero included."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        seconds = float(match["number"]) * _SECONDS_PER_UNIT[match["unit"] or "s"]
    else:
        raise ValueError(f"expected a duration such as 500ms, 30s, 5m, 1h, or a number of "
                         f"seconds, got {describe(value)}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a duration must be more than zero, got {describe(value)}")
    return seconds


def parse_period(value: str) -> float:
    """Seconds in a duration (parse_duration) or a number of days, ``30d``: how often a
    schedule runs, how old a run is."""
    if (match := _DAYS.fullmatch(value.strip())) and int(match["days"]) > 0:
        return int(match["days"]) * 86400.0
    try:
        return parse_duration(value)
    except ValueError:
        raise ValueError(f"expected a period such as 30s, 15m, 1h, 30d, got {describe(value)}")\
            from None


def parse_size(value: object) -> int:
    """Bytes in ``500MB``, ``64MiB``, ``1GiB``, ``4096`` (bytes); ValueError for anything
    else, zero included."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        size = int(match["number"]) * _BYTES_PER_UNIT[match["unit"] or "B"]
    else:
        raise ValueError(f"expected a size such as 4096, 500MB or 1GiB, got {describe(value)}")
    if size <= 0:
        raise ValueError(f"a size must be more than zero, got {describe(value)}")
    return size


def parse_percentage(value: str) -> Percent:
    """The share in ``"25%"``, from 0 (excluded) to 100; ValueError otherwise."""
    match = _PERCENTAGE.fullmatch(value.strip())
    if not match:
        raise ValueError(f"expected a percentage such as '25%', got {describe(value)}")
    percent = float(match["number"])
    if not 0 < percent <= 100:
        raise ValueError(f"a percentage must be more than 0% and at most 100%, got {value!r}")
    return Percent(percent)


_STAP_FLAGS = {"-b", "-t", "-u", "-w", "--skip-badvars", "--suppress-handler-errors",
               "--suppress-time-limits"}
_STAP_DEFINE = re.compile(r"-D ?(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:=(?P<value>[A-Za-z0-9_.+-]+))?")
_STAP_REFUSED = {  # options stapctl sets itself, or that reach outside the module build
    "-o": "stapctl collects the output itself",
    "-e": "the script comes from 'script' or 'file'",
    "-r": "stapctl builds for each host's kernel release itself",
    "-R": "stapctl chooses the runtime itself",
    "-p": "stapctl chooses the passes itself",
    "-m": "stapctl names modules itself",
    "-c": "running a command on the target is not supported",
    "-x": "attaching to a process is not supported",
    "--remote": "stapctl does the remote part itself",
    "-B": "kernel build options are not allowed",
    "-I": "tapset directories on the controller are not allowed",
    "-S": "stapctl collects the output itself",
}
_STAP_DANGEROUS_DEFINES = {
    "STAP_TRANS_DEBUGFS": "the debugfs transport oopses recent kernels; stapctl uses procfs",
}


def check_stap_option(option: str, guru: bool) -> str:
    """The option as one argv item (``-D NAME=V`` → ``-DNAME=V``) if allow-listed;
    ValueError saying why not otherwise."""
    if option in _STAP_FLAGS or (option == "-g" and guru):
        return option
    if option == "-g":
        raise ValueError("'-g' (guru mode) needs 'guru: true' on the probe")
    if option == "-D":
        raise ValueError("give -D and its definition as one item, e.g. '-DMAXACTION=20000'")
    define = _STAP_DEFINE.fullmatch(option)
    if define:
        if define["name"] in _STAP_DANGEROUS_DEFINES:
            raise ValueError(f"'-D{define['name']}' is refused: "
                             f"{_STAP_DANGEROUS_DEFINES[define['name']]}")
        return option.replace(" ", "", 1)
    if option.startswith("-D"):
        raise ValueError(f"'{option}' is not a safe definition: use -DNAME or -DNAME=VALUE, "
                         f"NAME of letters, digits and '_', VALUE of letters, digits, '_.+-'")
    if re.search(r"\s|[;&|`$<>\\'\"]", option):
        raise ValueError(f"'{option}' contains a space or shell character: give each option "
                         f"as its own list item")
    flag = option if option.startswith("--") else option[:2]
    reason = _STAP_REFUSED.get(flag.split("=", 1)[0])
    if reason:
        raise ValueError(f"'{option}' is not allowed: {reason}")
    allowed = ", ".join(sorted(_STAP_FLAGS | {"-DNAME=VALUE", "-g (with guru: true)"}))
    raise ValueError(f"'{option}' is not an allowed stap option; allowed: {allowed}")


MAX_SCRIPT_ARGS = 32
MAX_SCRIPT_ARG_LENGTH = 1024


def check_script_args(args: Sequence[object]) -> tuple[str, ...]:
    """A script's arguments ($1, @1, ...) as stap is given them: text or whole numbers,
    at most MAX_SCRIPT_ARGS of at most MAX_SCRIPT_ARG_LENGTH characters, without NUL or
    line breaks (they are compiled into the module and its cache key); ValueError naming
    the first bad one."""
    if len(args) > MAX_SCRIPT_ARGS:
        raise ValueError(f"{len(args)} script arguments: at most {MAX_SCRIPT_ARGS} are allowed")
    checked: list[str] = []
    for number, arg in enumerate(args, 1):
        if isinstance(arg, bool) or not isinstance(arg, str | int):
            raise ValueError(f"script argument {number} must be text or a whole number, "
                             f"got {describe(arg)}")
        text = str(arg)
        if len(text) > MAX_SCRIPT_ARG_LENGTH:
            raise ValueError(f"script argument {number} is {len(text)} characters long: at "
                             f"most {MAX_SCRIPT_ARG_LENGTH} are allowed")
        if re.search(r"[\x00\r\n]", text):
            raise ValueError(f"script argument {number} contains a NUL or a line break: "
                             "give each argument on one line")
        checked.append(text)
    return tuple(checked)


# --- the manifest ----------------------------------------------------------------------


def load_manifest(path: Path) -> Manifest:
    """Read, validate and build a manifest; ManifestError listing every problem found."""
    doc = read_yaml(path)
    data = doc.data
    if not isinstance(data, dict):
        got = "the file is empty" if data is None else f"got {describe(data)}"
        message = f"a manifest is a mapping with apiVersion, kind, name and probes; {got}"
        raise ManifestError([*doc.issues, Issue(doc.file, 1, 1, "", message)])
    version = data.get("apiVersion", SUPPORTED_API_VERSION)
    if version != SUPPORTED_API_VERSION:
        raise ManifestError(doc.issue(("apiVersion",), f"unsupported apiVersion "
                                      f"{describe(version)}: this stapctl reads "
                                      f"'{SUPPORTED_API_VERSION}' manifests"))
    found = schema_issues(doc, data, "manifest.schema.json")
    builder = _ManifestBuilder(doc, {bad for bad, _ in found})
    manifest = builder.build(data)
    issues = [*doc.issues, *(issue for _, issue in found), *builder.issues]
    if issues or manifest is None:
        raise ManifestError(sorted(issues, key=lambda i: (i.line or 0, i.column or 0)))
    return manifest


class _ManifestBuilder:
    """Checks the schema cannot express, run on every part the schema found well formed;
    builds the Manifest when there is nothing to report."""

    def __init__(self, doc: Document, schema_failures: set[KeyPath]) -> None:
        self.doc = doc
        self.base = Path(doc.file).parent
        self.schema_failures = schema_failures
        self.issues: list[Issue] = []

    def build(self, data: dict[str, Any]) -> Manifest | None:
        probes = self._probes(data.get("probes"))
        strategy = self._strategy(data.get("strategy", {}))
        inventory = self._inventory(data.get("inventory"))
        output = self._output(data.get("output", {}))
        diff = self._diff(data.get("diff", {}))
        detach = self._detach(data.get("detach", False))
        if detach is not None:
            for index, entry in enumerate(data.get("probes") or []):
                if isinstance(entry, dict) and "target" in entry:
                    self._report(("probes", index, "target"), "a probe with a target cannot "
                                 "run detached: remove 'target' or 'detach'")
        if self.issues or self.schema_failures or not probes or not strategy or not output \
                or not diff:
            return None
        return Manifest(
            path=Path(self.doc.file), name=data["name"], probes=probes,
            description=data.get("description", ""), inventory=inventory,
            hosts=data.get("hosts", "all"), vars=data.get("vars") or {}, strategy=strategy,
            become=data.get("become", False), output=output, diff=diff, detach=detach,
            document=self.doc,
        )

    def _checked(self, path: KeyPath) -> bool:
        """The schema found nothing wrong at or under ``path``: its value can be trusted."""
        return not any(bad[: len(path)] == path for bad in self.schema_failures)

    def _report(self, path: KeyPath, message: str) -> None:
        self.issues.append(self.doc.issue(path, message))

    def _probes(self, raw: Any) -> tuple[Probe, ...] | None:
        if not isinstance(raw, list):
            return None
        probes: list[Probe] = []
        first_use: dict[str, KeyPath] = {}
        for index, entry in enumerate(raw):
            path: KeyPath = ("probes", index)
            if not isinstance(entry, dict):
                continue
            name = entry.get("name")
            if isinstance(name, str) and self._checked(path + ("name",)):
                if name in first_use:
                    first = self.doc.position(first_use[name] + ("name",))
                    self._report(path + ("name",), f"probe name '{name}' is used twice"
                                 + (f" (first at line {first[0]})" if first else ""))
                first_use.setdefault(name, path)
            probe = self._probe(path, entry)
            if probe is not None:
                probes.append(probe)
        return tuple(probes)

    def _probe(self, path: KeyPath, entry: dict[str, Any]) -> Probe | None:
        source = self._script_source(path, entry)
        duration = self._duration(path + ("duration",), entry.get("duration"))
        guru = entry.get("guru") is True
        options: list[str] = []
        if self._checked(path + ("stap_options",)):
            for index, option in enumerate(entry.get("stap_options", [])):
                try:
                    options.append(check_stap_option(option, guru))
                except ValueError as error:
                    self._report(path + ("stap_options", index), str(error))
        args: tuple[str, ...] = ()
        if self._checked(path + ("args",)):
            try:
                args = check_script_args(entry.get("args", []))
            except ValueError as error:
                self._report(path + ("args",), str(error))
        target = self._target(path + ("target",), entry.get("target"))
        if source is None:
            return None
        template, origin, first_line = source
        probe = Probe(name=str(entry.get("name")), template=template, origin=origin,
                      first_line=first_line, duration=duration,
                      params=entry.get("params") or {}, stap_options=tuple(options), guru=guru,
                      args=args, target=target)
        try:
            check_template(probe)
        except ManifestError as error:
            self.issues.extend(error.issues)
        return probe if self._checked(path) else None

    def _target(self, path: KeyPath, raw: Any) -> Target | None:
        if raw is None or not self._checked(path):
            return None
        pattern = raw.get("cmdline")
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as error:
                self._report(path + ("cmdline",), f"not a regular expression: {error}")
                return None
        if raw.get("each") and "process" not in raw and "cmdline" not in raw:
            self._report(path + ("each",), "one run per match needs 'process' or 'cmdline' "
                         "to match: remove 'each', or aim by name or command line")
            return None
        return Target(**raw)

    def _script_source(self, path: KeyPath, entry: dict[str, Any]) -> tuple[str, str, int] | None:
        """(template text, file it comes from, line where it starts in that file)."""
        if "script" in entry and "file" in entry:
            self._report(path + ("file",), "give either 'script' (inline) or 'file' (a path), "
                                           "not both")
            return None
        script_path, file_path = path + ("script",), path + ("file",)
        if "script" in entry:
            if not self._checked(script_path):
                return None
            line = self.doc.block_starts.get(script_path) or (
                self.doc.position(script_path) or (1, 1))[0]
            return entry["script"], self.doc.file, line
        if "file" in entry:
            if not self._checked(file_path):
                return None
            script_file = self.base / entry["file"]
            try:
                return read_text(script_file), str(script_file), 1
            except UnreadableFile as error:
                self._report(file_path, f"script file '{script_file}': {error}")
                return None
        self._report(path, "a probe needs its script: give 'script' (inline text) or 'file' "
                           "(a path relative to the manifest)")
        return None

    def _duration(self, path: KeyPath, raw: Any) -> float | None:
        if raw is None or not self._checked(path):
            return None
        try:
            return parse_duration(raw)
        except ValueError as error:
            self._report(path, str(error))
            return None

    def _strategy(self, raw: Any) -> Strategy | None:
        if not isinstance(raw, dict):
            return None
        defaults = Strategy()
        serial = defaults.serial if "serial" not in raw else self._serial(raw["serial"])
        connect_timeout = self._duration(("strategy", "connect_timeout"),
                                         raw.get("connect_timeout"))
        return Strategy(
            forks=raw.get("forks", defaults.forks),
            serial=serial,
            max_fail_percentage=raw.get("max_fail_percentage", defaults.max_fail_percentage),
            connect_timeout=connect_timeout or defaults.connect_timeout,
            timeout=self._duration(("strategy", "timeout"), raw.get("timeout")),
        )

    def _serial(self, raw: Any) -> tuple[BatchSize, ...]:
        """Batch sizes as numbers of hosts or Percents; a bad one is reported."""
        sizes: list[BatchSize] = []
        for index, batch in enumerate(raw if isinstance(raw, list) else [raw]):
            where = ("strategy", "serial", *((index,) if isinstance(raw, list) else ()))
            if isinstance(batch, int) and not isinstance(batch, bool):
                sizes.append(batch)
            elif isinstance(batch, str) and self._checked(where):
                try:
                    sizes.append(parse_percentage(batch))
                except ValueError as error:
                    self._report(where, str(error))
        return tuple(sizes)

    def _inventory(self, raw: Any) -> Path | InlineInventory | None:
        if not self._checked(("inventory",)):
            return None
        if isinstance(raw, dict):
            try:
                return read_inline_inventory(self.doc, raw)
            except ManifestError as error:
                self.issues.extend(error.issues)
                return None
        if not isinstance(raw, str):
            return None
        inventory = self.base / raw
        if not inventory.is_file():
            reason = "is not a file" if inventory.exists() else "not found"
            self._report(("inventory",), f"inventory file '{inventory}' {reason}")
        return inventory

    def _output(self, raw: Any) -> OutputSpec | None:
        if not isinstance(raw, dict) or not self._checked(("output",)):
            return None
        directory = raw.get("dir")
        sinks = [self._sink(("output", "sinks", index), entry)
                 for index, entry in enumerate(raw.get("sinks", []))]
        return OutputSpec(format=raw.get("format", "prefix"),
                          dir=None if directory is None else self.base / directory,
                          sinks=tuple(sink for sink in sinks if sink is not None))

    _SINK_KEYS = {"jsonl": {"path", "max_bytes", "keep"},
                  "syslog": {"socket", "facility", "app_name"},
                  "http": {"url", "timeout", "headers"}, "textfile": {"path"}}
    _SINK_REQUIRED = {"jsonl": "path", "http": "url", "textfile": "path"}

    def _sink(self, path: KeyPath, raw: dict[str, Any]) -> Sink | None:
        """A sink whose keys belong to its type; each stray or missing key reported."""
        kind = raw["type"]
        for key in raw:
            if key != "type" and key not in self._SINK_KEYS[kind]:
                allowed = ", ".join(sorted(self._SINK_KEYS[kind]))
                self._report(path + (key,), f"'{key}' is not a key of a sink of type "
                                            f"'{kind}' (its keys: type, {allowed})")
        needed = self._SINK_REQUIRED.get(kind)
        if needed is not None and needed not in raw:
            self._report(path, f"a sink of type '{kind}' needs '{needed}'")
            return None
        if kind == "jsonl":
            return JsonLinesSink(self.base / raw["path"], raw.get("max_bytes", 10 << 20),
                                 raw.get("keep", 3))
        if kind == "syslog":
            return SyslogSink(self.base / raw.get("socket", "/dev/log"),
                              raw.get("facility", "user"), raw.get("app_name", "stapctl"))
        if kind == "http":
            timeout = self._duration(path + ("timeout",), raw.get("timeout"))
            return HttpSink(raw["url"], timeout or 10.0, raw.get("headers") or {})
        return TextfileSink(self.base / raw["path"])

    def _diff(self, raw: Any) -> DiffSpec | None:
        if not isinstance(raw, dict):
            return None
        patterns = raw.get("ignore_patterns", [])
        if self._checked(("diff", "ignore_patterns")):
            for index, pattern in enumerate(patterns):
                try:
                    re.compile(pattern)
                except re.error as error:
                    self._report(("diff", "ignore_patterns", index),
                                 f"'{pattern}' is not a regular expression: {error}")
        if not self._checked(("diff",)):
            return None
        return DiffSpec(ignore_fields=tuple(raw.get("ignore_fields", [])),
                        ignore_patterns=tuple(patterns))

    def _detach(self, raw: Any) -> DetachSpec | None:
        """``detach: true`` (the default bound) or a mapping of the bound's keys."""
        if raw is False or not self._checked(("detach",)):
            return None
        spec = DetachSpec()
        if not isinstance(raw, dict):
            return spec
        if "max_duration" in raw:
            spec = replace(spec, max_duration=self._duration(("detach", "max_duration"),
                                                             raw["max_duration"]) or 0.0)
        for key in ("max_disk", "file_size"):
            if key in raw:
                try:
                    spec = replace(spec, **{key: parse_size(raw[key])})
                except ValueError as exc:
                    self._report(("detach", key), str(exc))
        if "file_count" in raw:
            spec = replace(spec, file_count=int(raw["file_count"]))
        return spec


def load_diff_spec(path: Path) -> DiffSpec:
    """The ``diff:`` of a manifest (a run record's copy, whose relative files may be
    gone): only that key is read and checked."""
    doc = read_yaml(path)
    data = doc.data if isinstance(doc.data, dict) else {}
    found = [(bad, issue) for bad, issue in
             schema_issues(doc, data, "manifest.schema.json")
             if bad[:1] == ("diff",)]
    builder = _ManifestBuilder(doc, {bad for bad, _ in found})
    spec = builder._diff(data.get("diff", {}))
    issues = [issue for _, issue in found] + builder.issues
    if issues or spec is None:
        raise ManifestError(issues or [Issue(doc.file, None, None, "diff", "unreadable")])
    return spec

# --- explain ---------------------------------------------------------------------------


def explain(key_path: str = "") -> str:
    """What a manifest key means, from the schema: ``strategy.serial``, ``probes.duration``
    (list indexes may be given or left out), ``inventory.groups``; with no path, the
    manifest itself. The keys under the key are listed with theirs."""
    resolver = registry().resolver(base_uri=SCHEMA_BASE + "manifest.schema.json")
    node: Mapping[str, Any] = load_schema("manifest.schema.json")
    description = node["description"]
    walked: list[str] = []
    for part in [part for part in key_path.split(".") if part and not part.isdigit()]:
        node, resolver = object_view(node, resolver)
        children = node.get("properties", {})
        if part in children:
            child = children[part]
        elif isinstance(node.get("additionalProperties"), Mapping):
            child = node["additionalProperties"]  # a mapping of free names, e.g. vars.x
        else:
            where = ".".join(walked) or "the top level"
            message = (unknown_key_message(part, sorted(children)) if children
                       else f"'{where}' has no keys under it")
            raise ManifestError(Issue("manifest schema", None, None, key_path, message))
        description = child.get("description") or description
        node = child
        walked.append(part)
    node, resolver = object_view(node, resolver)
    lines = [f"{'.'.join(walked) or 'manifest'}: {description}"]
    for name, child in node.get("properties", {}).items():
        child_description = child.get("description") or resolved(child, resolver).get(
            "description", "")
        lines.append(f"  {name}: {child_description}")
    return "\n".join(lines)
