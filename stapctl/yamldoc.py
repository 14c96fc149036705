"""YAML files read with the position of every key and value, so that each problem found
later is reported at its file:line:column. Hostile input (huge files, deep nesting, alias
bombs, several documents) is refused before it costs anything.

Shared by the manifest and inventory readers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stapctl.errors import Issue, ManifestError

MAX_FILE_BYTES = 1 << 20  # manifests, inventories and scripts are small; refuse the rest
MAX_DEPTH = 64  # nesting levels of YAML collections
MAX_VALUES = 50_000  # YAML nodes in one file

KeyPath = tuple[str | int, ...]
Position = tuple[int, int]  # 1-based line and column


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
