"""Load and check a stapctl/v1 manifest.

Every problem is reported at once, each with file:line:column, the key path and what was
expected in plain words, so an operator fixes a manifest in one round trip. Hostile input
(huge files, deep nesting, YAML alias bombs) is refused before it costs anything.

Shared with inventory.py: the YAML reader that keeps positions (`read_yaml`) and the
JSON Schema check that speaks plain words (`schema_issues`).
"""

from __future__ import annotations

import difflib
import functools
import importlib.resources
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource

from stapctl.errors import Issue, ManifestError
from stapctl.models import Manifest, OutputSpec, Probe, Strategy
from stapctl.render import check_template

SUPPORTED_API_VERSION = "stapctl/v1"
MAX_FILE_BYTES = 1 << 20  # manifests, inventories and scripts are small; refuse the rest
MAX_DEPTH = 64  # nesting levels of YAML collections
MAX_VALUES = 50_000  # YAML nodes in one file

KeyPath = tuple[str | int, ...]
Position = tuple[int, int]  # 1-based line and column

_SCHEMA_BASE = "https://stapctl.invalid/schemas/v1/"
_DURATION = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)(?P<unit>ms|s|m|h)?")
_PERCENTAGE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)%")
_SECONDS_PER_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


# --- reading YAML with positions -------------------------------------------------------


@dataclass(frozen=True)
class Document:
    """A YAML file's data and where each key and value is written in it."""

    file: str
    data: Any
    values: Mapping[KeyPath, Position] = field(default_factory=dict)
    keys: Mapping[KeyPath, Position] = field(default_factory=dict)
    block_starts: Mapping[KeyPath, int] = field(default_factory=dict)  # first text line of `|`
    issues: tuple[Issue, ...] = ()  # found while reading (duplicate keys); not fatal

    def position(self, path: KeyPath, *, of_key: bool = False) -> Position | None:
        """Where ``path`` is written (its key if ``of_key``), or its nearest written parent."""
        if of_key and path in self.keys:
            return self.keys[path]
        for length in range(len(path), -1, -1):
            if path[:length] in self.values:
                return self.values[path[:length]]
        return None

    def issue(self, path: KeyPath, message: str, *, of_key: bool = False) -> Issue:
        line, column = self.position(path, of_key=of_key) or (None, None)
        return Issue(self.file, line, column, format_path(path), message)


def format_path(path: KeyPath) -> str:
    """``("probes", 0, "duration")`` → ``probes[0].duration``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


class UnreadableFile(ValueError):
    """A file that is not small UTF-8 text; the message says why in plain words."""

    def __init__(self, reason: str, line: int | None = None) -> None:
        super().__init__(reason)
        self.line = line


def read_text(path: Path) -> str:
    """A small UTF-8 file's text; UnreadableFile for anything else."""
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise UnreadableFile("file not found") from None
    except IsADirectoryError:
        raise UnreadableFile("is a directory, not a file") from None
    except OSError as error:
        raise UnreadableFile(f"cannot read it: {error.strerror}") from None
    except ValueError:  # a NUL byte in the name
        raise UnreadableFile("not a valid file name") from None
    if len(data) > MAX_FILE_BYTES:
        raise UnreadableFile(f"larger than {MAX_FILE_BYTES // 1024} KiB: refusing to read it")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise UnreadableFile(f"not UTF-8 text (line {line})", line) from None


def read_yaml(path: Path) -> Document:
    """Parse one small YAML document, keeping positions; ManifestError if it can't be read."""
    try:
        text = read_text(path)
    except UnreadableFile as error:
        raise ManifestError(Issue(str(path), error.line, None, "", str(error))) from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, file: str) -> Document:
    """Parse YAML text, refusing aliases, more than MAX_DEPTH levels or MAX_VALUES values,
    several documents, and (as issues) duplicate keys."""
    try:
        return _DocumentBuilder(text, file).build()
    except _Refused as refused:
        raise ManifestError(
            Issue(file, refused.line, refused.column, "", refused.message)) from None
    except yaml.MarkedYAMLError as error:
        raise ManifestError(_yaml_error_issue(error, file, text)) from None
    except yaml.YAMLError as error:  # the reader's errors (e.g. a control character)
        raise ManifestError(Issue(file, None, None, "", f"not valid YAML: {error}")) from None


class _Refused(Exception):
    def __init__(self, message: str, mark: Any) -> None:
        super().__init__(message)
        self.message, self.line, self.column = message, mark.line + 1, mark.column + 1


def _yaml_error_issue(error: yaml.MarkedYAMLError, file: str, text: str) -> Issue:
    mark = error.problem_mark or error.context_mark
    message = f"not valid YAML: {error.problem or error.context}"
    if error.context and error.problem and error.context_mark is not None:
        message += f" ({error.context} at line {error.context_mark.line + 1})"
    if mark is None:
        return Issue(file, None, None, "", message)
    lines = text.splitlines()
    if mark.line < len(lines) and "\t" in lines[mark.line]:
        message += "; YAML indents with spaces, not tabs"
    return Issue(file, mark.line + 1, mark.column + 1, "", message)


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser: much faster
_PLAIN_TAGS = {None, "!", "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}


@dataclass
class _Frame:
    """A mapping or list being filled while reading events."""

    path: KeyPath
    container: dict[str, Any] | list[Any]
    key: str | None = None  # mapping: the key whose value comes next
    drop: bool = False  # mapping: that key is a duplicate, its value is dropped


class _DocumentBuilder:
    """Builds plain data from parser events with an explicit stack: no recursion, no
    aliases, and a note of where every key and value is written."""

    def __init__(self, text: str, file: str) -> None:
        self.loader = _Loader(text)
        self.file = file
        self.values: dict[KeyPath, Position] = {}
        self.keys: dict[KeyPath, Position] = {}
        self.block_starts: dict[KeyPath, int] = {}
        self.issues: list[Issue] = []
        self.root: list[Any] = []  # receives the document
        self.stack = [_Frame((), self.root)]

    def build(self) -> Document:
        documents = count = 0
        try:
            while self.loader.check_event():
                event = self.loader.get_event()
                count += 1
                if count > MAX_VALUES:
                    raise _Refused(f"more than {MAX_VALUES} YAML values: refusing to read it",
                                   event.start_mark)
                if isinstance(event, yaml.DocumentStartEvent):
                    documents += 1
                    if documents > 1:
                        raise _Refused("holds more than one YAML document ('---'); "
                                       "keep one per file", event.start_mark)
                elif isinstance(event, yaml.AliasEvent):
                    raise _Refused("YAML aliases (*name) are not supported: write the value "
                                   "out in full", event.start_mark)
                elif isinstance(event, yaml.ScalarEvent):
                    self._scalar(event)
                elif isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
                    self._start(event)
                elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
                    frame = self.stack.pop()
                    self._store(frame.container)
        finally:
            self.loader.dispose()
        data = self.root[0] if self.root else None
        return Document(self.file, data, self.values, self.keys, self.block_starts,
                        tuple(self.issues))

    def _start(self, event: yaml.MappingStartEvent | yaml.SequenceStartEvent) -> None:
        parent = self.stack[-1]
        if isinstance(parent.container, dict) and parent.key is None:
            raise _Refused("a mapping key must be plain text, not a list or mapping",
                           event.start_mark)
        if len(self.stack) > MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels: refusing to read it",
                           event.start_mark)
        path = self._next_path(parent)
        self._check_tag(event, path)
        self.values.setdefault(path, _position(event.start_mark))
        container: dict[str, Any] | list[Any] = (
            {} if isinstance(event, yaml.MappingStartEvent) else [])
        self.stack.append(_Frame(path, container))

    def _scalar(self, event: yaml.ScalarEvent) -> None:
        frame = self.stack[-1]
        if isinstance(frame.container, dict) and frame.key is None:
            self._key(frame, event)
            return
        path = self._next_path(frame)
        if path not in self.values:  # the first of duplicate keys is the one kept
            self.values[path] = _position(event.start_mark)
            if event.style in ("|", ">"):
                self.block_starts[path] = self.values[path][0] + 1  # the text follows `|`
        self._store(self._construct(event, path))

    def _key(self, frame: _Frame, event: yaml.ScalarEvent) -> None:
        key = event.value  # keys are text as written: `on:` stays "on", `1:` stays "1"
        path = frame.path + (key,)
        if key in frame.container:
            first = self.keys[path]
            self.issues.append(self._issue_at(
                event, path, f"duplicate key '{key}' (first given at line {first[0]})"))
            frame.drop = True
        else:
            self.keys.setdefault(path, _position(event.start_mark))
        frame.key = key

    def _store(self, value: Any) -> None:
        frame = self.stack[-1]
        if isinstance(frame.container, list):
            frame.container.append(value)
            return
        assert frame.key is not None
        if not frame.drop:
            frame.container[frame.key] = value
        frame.key, frame.drop = None, False

    def _next_path(self, frame: _Frame) -> KeyPath:
        if frame.container is self.root:
            return ()
        if isinstance(frame.container, list):
            return frame.path + (len(frame.container),)
        assert frame.key is not None
        return frame.path + (frame.key,)

    def _check_tag(self, event: yaml.NodeEvent, path: KeyPath) -> None:
        tag = getattr(event, "tag", None)
        if tag not in _PLAIN_TAGS:
            self.issues.append(self._issue_at(event, path, f"YAML tag {tag} is not supported"))

    def _construct(self, event: yaml.ScalarEvent, path: KeyPath) -> Any:
        tag = event.tag if event.tag not in (None, "!") else self.loader.resolve(
            yaml.ScalarNode, event.value, event.implicit)
        if tag not in self.loader.yaml_constructors:
            self.issues.append(self._issue_at(event, path, f"YAML tag {tag} is not supported"))
            return event.value
        node = yaml.ScalarNode(tag, event.value, style=event.style)
        try:
            return self.loader.construct_object(node)
        except (yaml.YAMLError, ValueError, OverflowError) as error:
            reason = getattr(error, "problem", None) or str(error)
            self.issues.append(self._issue_at(event, path, f"cannot read this value: {reason}"))
            return event.value

    def _issue_at(self, event: yaml.Event, path: KeyPath, message: str) -> Issue:
        line, column = _position(event.start_mark)
        return Issue(self.file, line, column, format_path(path), message)


def _position(mark: Any) -> Position:
    return mark.line + 1, mark.column + 1


# --- JSON Schema, in plain words -------------------------------------------------------


@functools.cache
def load_schema(name: str) -> dict[str, Any]:
    """A schema shipped in the package, e.g. ``manifest.schema.json``."""
    text = importlib.resources.files("stapctl.schemas").joinpath(name).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@functools.cache
def _registry() -> Registry[Any]:
    return Registry().with_resources(
        (_SCHEMA_BASE + name, Resource.from_contents(load_schema(name)))
        for name in ("manifest.schema.json", "inventory.schema.json")
    )


@functools.cache
def schema_validator(name: str, definition: str | None = None) -> jsonschema.Draft202012Validator:
    """A validator for a shipped schema, or for one of its ``$defs``."""
    schema: dict[str, Any] = load_schema(name)
    if definition is not None:
        schema = {"$ref": f"{_SCHEMA_BASE}{name}#/$defs/{definition}"}
    return jsonschema.Draft202012Validator(schema, registry=_registry())


def schema_issues(doc: Document, data: Any, validator: jsonschema.Draft202012Validator,
                  root: KeyPath = ()) -> list[tuple[KeyPath, Issue]]:
    """Every schema violation of ``data`` (found at ``root`` in ``doc``), in plain words."""
    found: list[tuple[KeyPath, Issue]] = []
    for error in validator.iter_errors(data):
        for path, message, of_key in _plain_errors(validator, error):
            found.append((root + path, doc.issue(root + path, message, of_key=of_key)))
    return found


def _plain_errors(validator: jsonschema.Draft202012Validator,
                  error: jsonschema.ValidationError) -> Iterator[tuple[KeyPath, str, bool]]:
    path: KeyPath = tuple(error.absolute_path)
    schema: Mapping[str, Any] = error.schema if isinstance(error.schema, Mapping) else {}
    kind = error.validator
    expected: Any = error.validator_value
    instance: Any = error.instance
    if kind in ("anyOf", "oneOf"):
        branch = _branch_for(validator, expected, instance)
        if branch is not None:  # the value has the type of one choice: its errors say more
            for sub in error.context or ():
                if sub.relative_schema_path[0] == branch:
                    yield from _plain_errors(validator, sub)
            return
    if "propertyNames" in error.absolute_schema_path:
        yield (path + (instance,), f"'{instance}' is not a valid name here: expected "
               f"{schema.get('x-expected', 'a different name')}", True)
    elif kind == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        for key in instance:
            if key not in allowed:
                yield path + (key,), unknown_key_message(key, allowed), True
    elif kind == "required":
        for key in expected:
            if key not in instance:
                yield path, f"missing required key '{key}'", False
    elif kind == "type" and "x-expected" not in schema:
        types = [expected] if isinstance(expected, str) else expected
        words = " or ".join(_TYPE_WORDS.get(t, t) for t in types)
        yield path, f"expected {words}, got {describe(instance)}", False
    elif kind == "enum":
        choices = ", ".join(repr(choice) for choice in expected)
        yield path, f"expected one of {choices}, got {describe(instance)}" + (
            did_you_mean(instance, [str(c) for c in expected]) if isinstance(instance, str)
            else ""), False
    elif kind in _BOUND_WORDS:
        yield path, f"must be {_BOUND_WORDS[kind]} {expected}, got {describe(instance)}", False
    elif kind == "minItems":
        yield path, f"needs at least {expected} item{'s' if expected != 1 else ''}", False
    elif kind == "minLength":
        yield path, "must not be empty", False
    elif "x-expected" in schema:
        yield path, f"expected {schema['x-expected']}, got {describe(instance)}", False
    elif kind == "const":
        yield path, f"expected {expected!r}, got {describe(instance)}", False
    else:
        yield path, error.message, False


_TYPE_WORDS = {"object": "a mapping", "array": "a list", "string": "text",
               "integer": "a whole number", "number": "a number", "boolean": "true or false",
               "null": "nothing"}
_BOUND_WORDS = {"minimum": "at least", "maximum": "at most",
                "exclusiveMinimum": "more than", "exclusiveMaximum": "less than"}


def _branch_for(validator: jsonschema.Draft202012Validator, branches: list[Any],
                instance: Any) -> int | None:
    """The one anyOf/oneOf choice whose declared type the value has, if exactly one."""
    matching = [
        index for index, branch in enumerate(branches)
        if isinstance(branch, Mapping) and "type" in branch
        and any(validator.is_type(instance, t) for t in
                ([branch["type"]] if isinstance(branch["type"], str) else branch["type"]))
    ]
    return matching[0] if len(matching) == 1 else None


def describe(value: Any) -> str:
    """A value in words, for "expected X, got Y"."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def unknown_key_message(key: str, allowed: list[str]) -> str:
    """``unknown key 'nmae' (did you mean 'name'?); expected one of: ...``"""
    return (f"unknown key '{key}'{did_you_mean(key, allowed)}; "
            f"expected one of: {', '.join(allowed)}")


def did_you_mean(word: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not close:
        close = [choice for choice in choices if choice.lower() == word.lower()]
    return f" (did you mean '{close[0]}'?)" if close else ""


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


def parse_percentage(value: str) -> float:
    """The number in ``"25%"``, from 0 (excluded) to 100; ValueError otherwise."""
    match = _PERCENTAGE.fullmatch(value.strip())
    if not match:
        raise ValueError(f"expected a percentage such as '25%', got {describe(value)}")
    percent = float(match["number"])
    if not 0 < percent <= 100:
        raise ValueError(f"a percentage must be more than 0% and at most 100%, got {value!r}")
    return percent


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
    found = schema_issues(doc, data, schema_validator("manifest.schema.json"))
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
        if self.issues or self.schema_failures or not probes or not strategy or not output:
            return None
        return Manifest(
            path=Path(self.doc.file), name=data["name"], probes=probes,
            description=data.get("description", ""), inventory=inventory,
            hosts=data.get("hosts", "all"), vars=data.get("vars") or {}, strategy=strategy,
            become=data.get("become", False), output=output,
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
        if source is None:
            return None
        template, origin, first_line = source
        probe = Probe(name=str(entry.get("name")), template=template, origin=origin,
                      first_line=first_line, duration=duration,
                      params=entry.get("params") or {}, stap_options=tuple(options), guru=guru)
        try:
            check_template(probe)
        except ManifestError as error:
            self.issues.extend(error.issues)
        return probe if self._checked(path) else None

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
        serial_raw = raw.get("serial", list(defaults.serial))
        serial = serial_raw if isinstance(serial_raw, list) else [serial_raw]
        for index, batch in enumerate(serial):
            where = ("strategy", "serial", *((index,) if isinstance(serial_raw, list) else ()))
            if isinstance(batch, str) and self._checked(where):
                try:
                    parse_percentage(batch)
                except ValueError as error:
                    self._report(where, str(error))
        connect_timeout = self._duration(("strategy", "connect_timeout"),
                                         raw.get("connect_timeout"))
        return Strategy(
            forks=raw.get("forks", defaults.forks),
            serial=tuple(serial),
            max_fail_percentage=raw.get("max_fail_percentage", defaults.max_fail_percentage),
            connect_timeout=connect_timeout or defaults.connect_timeout,
            timeout=self._duration(("strategy", "timeout"), raw.get("timeout")),
        )

    def _inventory(self, raw: Any) -> Path | Mapping[str, Any] | None:
        if isinstance(raw, dict):
            return raw
        if not isinstance(raw, str) or not self._checked(("inventory",)):
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
        return OutputSpec(format=raw.get("format", "prefix"),
                          dir=None if directory is None else self.base / directory)


# --- explain ---------------------------------------------------------------------------


def explain(key_path: str = "") -> str:
    """What a manifest key means, from the schema: ``strategy.serial``, ``probes.duration``
    (list indexes may be given or left out), ``inventory.groups``; with no path, the
    manifest itself. The keys under the key are listed with theirs."""
    resolver = _registry().resolver(base_uri=_SCHEMA_BASE + "manifest.schema.json")
    node: Mapping[str, Any] = load_schema("manifest.schema.json")
    description = node["description"]
    walked: list[str] = []
    for part in [part for part in key_path.split(".") if part and not part.isdigit()]:
        node, resolver = _object_view(node, resolver)
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
    node, resolver = _object_view(node, resolver)
    lines = [f"{'.'.join(walked) or 'manifest'}: {description}"]
    for name, child in node.get("properties", {}).items():
        child_description = child.get("description") or _resolved(child, resolver).get(
            "description", "")
        lines.append(f"  {name}: {child_description}")
    return "\n".join(lines)


def _object_view(node: Mapping[str, Any], resolver: Any) -> tuple[Mapping[str, Any], Any]:
    """The part of a schema node that has keys: follow $ref, list items, and the
    mapping choice of an anyOf."""
    node, resolver = _follow_ref(node, resolver)
    if node.get("type") == "array" and isinstance(node.get("items"), Mapping):
        node, resolver = _follow_ref(node["items"], resolver)
    for choice in node.get("anyOf", ()):
        if "object" in choice.get("type", ()):
            return _object_view(choice, resolver)
    return node, resolver


def _follow_ref(node: Mapping[str, Any], resolver: Any) -> tuple[Mapping[str, Any], Any]:
    while "$ref" in node:
        resolved = resolver.lookup(node["$ref"])
        node, resolver = resolved.contents, resolved.resolver
    return node, resolver


def _resolved(node: Mapping[str, Any], resolver: Any) -> Mapping[str, Any]:
    return _follow_ref(node, resolver)[0]
