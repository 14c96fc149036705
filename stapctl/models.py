"""The core types, shared by every stage: frozen, typed, plain data."""

from __future__ import annotations

import hashlib
import json
import math
import re
import signal
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # the reader imports the errors, which import these models
    from stapctl.yamldoc import Document

OutputFormat = Literal["prefix", "merged", "json"]


@dataclass(frozen=True)
class Target:
    """The process a probe's target() names on each host, resolved there by the agent:
    one of a PID (stap -x), a comm, a command-line pattern, or a command the agent starts
    held until the module has started (stap -c)."""

    pid: int | None = None
    process: str | None = None  # matches /proc/PID/comm exactly
    cmdline: str | None = None  # a regular expression searched in the command line
    command: str | None = None  # run by /bin/sh -c; the run ends when it exits
    each: bool = False  # process or cmdline: one run per matching process, not the oldest

    def wire(self) -> dict[str, str | int]:
        """The agent request's ``target`` (docs/agent-protocol.md)."""
        return {key: value for key, value in asdict(self).items()
                if value is not None and key != "each"}

    def __str__(self) -> str:
        text = ", ".join(f"{key} {value}" for key, value in self.wire().items())
        return f"{text}, each" if self.each else text

    def manifest_entry(self) -> dict[str, str | int | bool]:
        """The manifest's ``target`` mapping."""
        return {**self.wire(), "each": True} if self.each else {**self.wire()}


def each_run_name(probe: str, pid: int) -> str:
    """The name of a probe's run aimed at one of its matching processes: `p[pid 1234]`."""
    return f"{probe}[pid {pid}]"


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
    args: tuple[str, ...] = ()  # the script's $1, @1, ...: given to stap after the script
    target: Target | None = None  # the process target() names on each host


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
class JsonLinesSink:
    """Each run appended to a file as one JSON line; the file is rotated by size."""

    path: Path
    max_bytes: int = 10 << 20  # rotate before a line would make the file bigger
    keep: int = 3  # rotated files kept: path.1 (newest) … path.KEEP


SyslogFacility = Literal["user", "daemon", "auth", "authpriv", "local0", "local1", "local2",
                         "local3", "local4", "local5", "local6", "local7"]


@dataclass(frozen=True)
class SyslogSink:
    """RFC 5424 messages to the local syslog socket: one per outcome, one for the run."""

    socket: Path = Path("/dev/log")
    facility: SyslogFacility = "user"
    app_name: str = "stapctl"


@dataclass(frozen=True)
class HttpSink:
    """The run's summary and its difference POSTed as JSON."""

    url: str
    timeout: float = 10.0
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TextfileSink:
    """A node_exporter textfile (Prometheus text format), replaced after each run."""

    path: Path


Sink = JsonLinesSink | SyslogSink | HttpSink | TextfileSink


@dataclass(frozen=True)
class OutputSpec:
    format: OutputFormat = "prefix"
    dir: Path | None = None
    sinks: tuple[Sink, ...] = ()


@dataclass(frozen=True)
class DiffSpec:
    """What of each output line two runs' comparison ignores (the manifest's ``diff:``):
    fields dropped first (counted from 1), then each pattern's matches replaced by '*'."""

    ignore_fields: tuple[int, ...] = ()
    ignore_patterns: tuple[str, ...] = ()  # checked to compile when the manifest is loaded

    def normalise(self, line: str) -> str:
        if self.ignore_fields:
            dropped = set(self.ignore_fields)
            line = " ".join(field for number, field in enumerate(line.split(), 1)
                            if number not in dropped)
        for pattern in self.ignore_patterns:
            line = re.sub(pattern, "*", line)
        return line


@dataclass(frozen=True)
class DetachSpec:
    """A detached run's lifetime bound and output rotation, per host and probe: nothing
    runs longer than ``max_duration`` seconds or writes more than ``max_disk`` bytes."""

    max_duration: float = 24 * 3600.0
    max_disk: int = 1 << 30
    file_size: int = 64 << 20  # output files on the target are cut at this size
    file_count: int = 16  # and the newest this many are kept

    def describe(self) -> str:
        return (f"detached: each probe stops after {format_duration(self.max_duration)} or "
                f"{format_size(self.max_disk)} of output per host, whichever comes first; "
                f"output files of {format_size(self.file_size)}, the newest "
                f"{self.file_count} kept")


def format_duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("GB", 10**9), ("MiB", 1 << 20), ("MB", 10**6),
                        ("KiB", 1 << 10), ("KB", 1000)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


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
    diff: DiffSpec = DiffSpec()
    detach: DetachSpec | None = None  # run detached on the targets (apply --detach)
    # The file as read, to locate problems found later (a host pattern that selects
    # nothing) without reading it again; None for a manifest built in code.
    document: Document | None = field(default=None, compare=False, repr=False)

    @property
    def labels_output(self) -> bool:
        """Output lines carry their probe's name: several probes, or one run per match."""
        return len(self.probes) > 1 or any(probe.target is not None and probe.target.each
                                           for probe in self.probes)


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
class DetachedProbe:
    """A probe started detached on a host: what later commands need to reach it."""

    host: Host  # with ``become`` decided
    probe: str
    name: str  # its folder on the host: <workdir>/detached/<name>
    workdir: str


@dataclass(frozen=True)
class HostFacts:
    """What a target reported about itself before anything was loaded.

    AgentHost.facts() checks ``release`` and ``arch`` against stapctl.facts' rule, as
    they become paths and arguments here.
    """

    release: str
    arch: str
    symbol_map: str = ""  # sha256 of the System.map made from the host's /proc/kallsyms
    symbol_map_error: str = ""  # why the host's symbols could not be read, if they were not


@dataclass(frozen=True)
class ModuleSpec:
    """Everything that changes a compiled module; ``key`` names it in the cache."""

    script: str
    release: str
    arch: str
    options: tuple[str, ...] = ()
    stap_version: str = ""
    runtime_fix: str = ""  # the names of the runtime fixes applied, comma-separated, or ""
    symbol_map: str = ""  # sha256 of a System.map to build against (kprobe.function)
    origin: str = ""  # the user's file the script came from: named in stap's messages
    first_line: int = 1  # line in ``origin`` where the script starts
    args: tuple[str, ...] = ()  # the script's arguments ($1, @1): compiled into the module
    toolchain: str = ""  # the build root that compiles it; "" for the controller's stap

    @property
    def key(self) -> str:
        # the module records the script's file name and line numbers (run-time errors name
        # them), not the directory the file is in
        location = f"{Path(self.origin).name}:{self.first_line}"
        fields: list[object] = [self.script, self.release, self.arch, list(self.options),
                                self.stap_version, self.runtime_fix, self.symbol_map, location]
        if self.args:  # only then: the modules of scripts without arguments keep their keys
            fields.append(list(self.args))
        if self.toolchain:  # likewise: the controller's stap keeps its modules' keys
            fields.append(self.toolchain)
        blob = json.dumps(fields, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def module_name(self) -> str:
        """The name stap gives the module (before any per-run rename)."""
        return f"stapctl_{self.key[:16]}"


@dataclass(frozen=True)
class ModuleArtifact:
    """A compiled module in the cache; ``sha256`` was checked against the file's bytes."""

    key: str
    path: Path
    sha256: str
    module_name: str  # the name embedded in the .ko (before any per-run rename)


EventKind = Literal[
    "connected", "unreachable", "facts", "uploaded", "loaded", "started", "output",
    "warning", "error", "stopping", "finished", "failed", "skipped",
    "command-output",  # a line the probe's target command wrote (stdout and stderr)
]
OutcomeStatus = Literal["ok", "failed", "unreachable", "skipped"]

# An outcome is reported by its ending event, and the live table shows that event's kind
# as the host's state; progress events show the state in this table.
ENDING_EVENT: Mapping[OutcomeStatus, EventKind] = {
    "ok": "finished", "failed": "failed", "unreachable": "unreachable", "skipped": "skipped",
}
PROGRESS_STATE: Mapping[EventKind, str] = {
    "connected": "connected", "uploaded": "uploaded", "loaded": "loaded",
    "started": "running", "stopping": "stopping",
}


class FailureKind(StrEnum):
    """Why a probe did not succeed on a host: the agent's kinds (docs/agent-protocol.md)
    and the ones the controller decides. Plain strings on the wire and in records."""

    # reported by the agent
    PREFLIGHT_REFUSED = "preflight-refused"
    INSMOD_REFUSED = "insmod-refused"
    START_FAILED = "start-failed"
    RUNTIME_ERROR = "runtime-error"
    TIMED_OUT = "timed-out"
    STOPPED = "stopped"
    TRANSPORT_LOST = "transport-lost"
    AGENT_ERROR = "agent-error"
    NO_TARGET = "no-target"  # the probe's target process is not on the host
    # decided by the controller
    UNREACHABLE = "unreachable"
    UNRESPONSIVE = "unresponsive"  # connected, then silent past the heartbeat timeout
    BAD_FACTS = "bad-facts"  # the host reported facts the controller refuses to use
    PROTOCOL_ERROR = "protocol-error"  # malformed, oversized or out-of-place frames
    OUTPUT_LIMIT = "output-limit"  # more probe output than the run allows per host
    COMPILE_FAILED = "compile-failed"
    CONTROLLER_ERROR = "controller-error"  # a fault of the controller itself
    SKIPPED = "skipped"
    WORKER_LOST = "worker-lost"  # the engine's worker serving the host went away

    @classmethod
    def from_agent(cls, value: object) -> FailureKind:
        """The kind an agent reported; anything unknown is the agent's own error."""
        try:
            return cls(str(value))
        except ValueError:
            return cls.AGENT_ERROR


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
    kind: FailureKind | None = None
    message: str = ""
    stats: Mapping[str, int] = field(default_factory=dict)
    worker: str = ""  # the engine's worker that served the host; "" when run locally

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class CountTotal:
    """A count aggregate (``@agg count``) summed over the hosts that sent it."""

    probe: str
    name: str
    hosts: tuple[str, ...]  # the hosts that sent records for it
    totals: tuple[tuple[str, int], ...]  # (key, fleet total), largest first


HistogramBound = Literal["<", "", ">"]  # under the first bucket, a bucket, over the last


@dataclass(frozen=True)
class HistogramBucket:
    bound: HistogramBound
    value: int  # the bucket's low end (for "<" and ">": the edge stap labels it with)
    count: int


@dataclass(frozen=True)
class HistogramTotal:
    """A histogram (``@agg hist``) added bucket by bucket over the hosts that sent it."""

    probe: str
    name: str
    hosts: tuple[str, ...]
    kind: Literal["log", "linear"]  # as far as its buckets tell
    buckets: tuple[HistogramBucket, ...]  # in order, every bucket some host printed


@dataclass(frozen=True)
class Aggregates:
    """What the probes' ``@agg`` records add up to over the fleet (stapctl.aggregate)."""

    counts: tuple[CountTotal, ...] = ()
    histograms: tuple[HistogramTotal, ...] = ()
    rejected: int = 0  # ``@agg`` lines that were malformed or past a limit

    def __bool__(self) -> bool:
        return bool(self.counts or self.histograms or self.rejected)


@dataclass(frozen=True)
class HostDifference:
    """What one host printed in a run and not in its baseline (added), and the other way
    round (removed): normalised lines, sorted, at most MAX_DIFFERENCE_LINES each; the
    totals count them all."""

    host: str
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    added_total: int = 0
    removed_total: int = 0


@dataclass(frozen=True)
class Difference:
    """A run's output against a baseline run of the same manifest: the hosts whose
    output changed (difference.json in the run folder)."""

    run: str
    baseline: str
    hosts: tuple[HostDifference, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.hosts)


@dataclass(frozen=True)
class Run:
    id: str
    outcomes: tuple[HostOutcome, ...]
    interrupted: bool = False
    by_signal: int = int(signal.SIGINT)  # what interrupted it: the exit code is 128 + this
    fatal_exit: int | None = None  # it stopped on an error before its hosts ran
    lines: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (host, probe) → lines
    aggregates: Aggregates = Aggregates()
    warnings: tuple[str, ...] = ()  # what went wrong around the run (sinks), not on hosts
    difference: Difference | None = None  # from the baseline, with `apply --baseline`

    @property
    def succeeded(self) -> tuple[HostOutcome, ...]:
        return tuple(o for o in self.outcomes if o.ok)

    @property
    def failed(self) -> tuple[HostOutcome, ...]:
        return tuple(o for o in self.outcomes if not o.ok)

    @property
    def retry_hosts(self) -> tuple[str, ...]:
        """The hosts ``--limit @RUN:failed`` runs again: those where a probe failed or
        that were unreachable, as Ansible's retry file lists them (a skipped host never
        ran, so a retry of the failed ones leaves it out, as Ansible does)."""
        return tuple(dict.fromkeys(o.host for o in self.outcomes
                                   if o.status in ("failed", "unreachable")))

    @property
    def exit_code(self) -> int:
        """The README's exit codes: 0 all ok, 1 all failed, 2 nothing compiled, 3 partial;
        interrupted, 128 + the signal (130 SIGINT, 143 SIGTERM, 129 SIGHUP)."""
        if self.interrupted:
            return 128 + self.by_signal
        if self.fatal_exit is not None:
            return self.fatal_exit
        if not self.failed:
            return 0
        if not self.succeeded and all(o.kind == FailureKind.COMPILE_FAILED for o in self.failed):
            return 2  # nothing could be built: the input is wrong, not the hosts
        return 1 if not self.succeeded else 3
