"""The core types, shared by every stage: frozen, typed, plain data."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stapctl.yamldoc import Document

OutputFormat = Literal["prefix", "merged", "json"]


@dataclass(frozen=True)
class Probe:
    """One probe of a manifest, before rendering."""

    name: str
    template: str  # the script's jinja2 source
    origin: str  # file the script text came from (manifest or `file:` path), for messages
    first_line: int  # line in `origin` where the script text starts (1-based)
    duration: float | None = None  # seconds
    params: Mapping[str, str | int] = field(default_factory=dict)
    stap_options: tuple[str, ...] = ()
    guru: bool = False


@dataclass(frozen=True)
class Percent:
    """A share of the hosts, as in ``serial: '25%'``: more than 0, at most 100."""

    value: float

    def of(self, count: int) -> int:
        """How many of ``count`` hosts, rounded down as Ansible rounds a batch."""
        return math.floor(count * self.value / 100)

    def __str__(self) -> str:
        return f"{self.value:g}%"


BatchSize = int | Percent  # a number of hosts, or a share of them


@dataclass(frozen=True)
class Strategy:
    forks: int = 50
    serial: tuple[BatchSize, ...] = (Percent(100),)
    max_fail_percentage: float = 100.0
    connect_timeout: float = 10.0
    timeout: float | None = None  # per host, seconds


@dataclass(frozen=True)
class OutputSpec:
    format: OutputFormat = "prefix"
    dir: Path | None = None


@dataclass(frozen=True)
class InlineGroup:
    """A group of a manifest's inline inventory."""

    hosts: tuple[str, ...] = ()
    children: tuple[str, ...] = ()
    vars: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InlineInventory:
    """A manifest's ``inventory:`` mapping, checked when the manifest is loaded. Host
    settings are already Ansible variables (``address`` → ``ansible_host``…), and the
    groups are as Ansible sees them: ``all`` holds the inventory's own ``vars`` and the
    top groups, ``ungrouped`` the hosts in no group."""

    hosts: Mapping[str, Mapping[str, Any]]  # host name → its own variables
    groups: Mapping[str, InlineGroup]


@dataclass(frozen=True)
class Manifest:
    path: Path
    name: str
    probes: tuple[Probe, ...]
    description: str = ""
    inventory: Path | InlineInventory | None = None  # a file, an inline inventory, or none
    hosts: str = "all"
    vars: Mapping[str, Any] = field(default_factory=dict)
    strategy: Strategy = Strategy()
    become: bool = False
    output: OutputSpec = OutputSpec()
    # The file as read, to locate problems found later (a host pattern that selects
    # nothing) without reading it again; None for a manifest built in code.
    document: Document | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Host:
    """A target as the inventory describes it, with its merged variables."""

    name: str
    address: str
    port: int = 22
    user: str | None = None
    key_file: str | None = None
    become: bool | None = None  # None: the manifest decides
    python: str = "python3"
    known_hosts: str | None = None  # a known_hosts file to trust for this host (the lab sets it)
    vars: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HostFacts:
    """What the agent reported about a target before anything was loaded."""

    release: str
    arch: str
    python: str
    raw: Mapping[str, Any] = field(default_factory=dict)
    symbol_map: str = ""  # sha256 of the System.map made from the host's /proc/kallsyms


@dataclass(frozen=True)
class ModuleSpec:
    """Everything that changes a compiled module; ``key`` names it in the cache."""

    script: str
    release: str
    arch: str
    options: tuple[str, ...] = ()
    stap_version: str = ""
    runtime_fix: str = ""  # the name of a runtime fix applied, or ""
    symbol_map: str = ""  # sha256 of a System.map to build against (kprobe.function)
    source: str = ""  # "file.yaml:LINE" where the script starts: named in runtime errors

    @property
    def key(self) -> str:
        blob = json.dumps(
            [self.script, self.release, self.arch, list(self.options), self.stap_version,
             self.runtime_fix, self.symbol_map, self.source],
            separators=(",", ":"),
        )
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class ModuleArtifact:
    key: str
    path: Path
    sha256: str
    module_name: str  # the name embedded in the .ko (before any per-run rename)


EventKind = Literal[
    "connected", "unreachable", "facts", "uploaded", "loaded", "started", "output",
    "warning", "error", "stopping", "finished", "failed", "skipped",
]
OutcomeStatus = Literal["ok", "failed", "unreachable", "skipped"]


@dataclass(frozen=True)
class Event:
    """Something that happened on one host, as it happened."""

    host: str
    kind: EventKind
    probe: str = ""
    text: str = ""
    time: float = 0.0


@dataclass(frozen=True)
class HostOutcome:
    """How one probe ended on one host: data, never an exception."""

    host: str
    probe: str
    status: OutcomeStatus
    kind: str | None = None  # the failure taxonomy of docs/agent-protocol.md, or "unreachable"
    message: str = ""
    stats: Mapping[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class Run:
    id: str
    outcomes: tuple[HostOutcome, ...]
    interrupted: bool = False

    @property
    def succeeded(self) -> tuple[HostOutcome, ...]:
        return tuple(o for o in self.outcomes if o.ok)

    @property
    def failed(self) -> tuple[HostOutcome, ...]:
        return tuple(o for o in self.outcomes if not o.ok)

    @property
    def exit_code(self) -> int:
        """manifest-v1.md: 0 all ok, 1 all failed, 2 nothing compiled, 3 partial,
        130 interrupted."""
        if self.interrupted:
            return 130
        if not self.failed:
            return 0
        if not self.succeeded and all(o.kind == "compile-failed" for o in self.failed):
            return 2  # nothing could be built: the input is wrong, not the hosts
        return 1 if not self.succeeded else 3
