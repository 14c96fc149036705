"""Fan-out: connect to every host, then run each host's modules under the rollout policy.

Every host's fate is a HostOutcome; nothing a host does escapes as an exception. Work is
done by a bounded thread pool (paramiko's transport is already a thread per host), and
everything that happens is reported as an Event through one callback, which the CLI
hands to a single consumer.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from stapctl.agent import AgentHost, Frame
from stapctl.connection import Connection, ConnectOptions, connect
from stapctl.errors import AgentError, ConnectError, StapctlError
from stapctl.models import (
    BatchSize,
    Event,
    EventKind,
    Host,
    HostFacts,
    HostOutcome,
    Manifest,
    OutcomeStatus,
    Percent,
    Strategy,
)
from stapctl.plan import ModuleJob, Plan

Emit = Callable[[Event], None]


@dataclass(frozen=True)
class RunOptions:
    duration: float | None = None  # overrides every probe's duration
    check: bool = False  # connect, upload and preflight, but load nothing
    accept_new_host_keys: bool = False
    bufsize_mb: int = 0


def batches(hosts: Sequence[str], serial: Sequence[BatchSize]) -> Iterator[list[str]]:
    """Ansible's `serial`: batch sizes in order, the last one repeated until done."""
    remaining = list(hosts)
    sizes = list(serial) or [Percent(100)]
    index = 0
    while remaining:
        size = sizes[min(index, len(sizes) - 1)]
        count = max(1, size.of(len(hosts)) if isinstance(size, Percent) else size)
        yield remaining[:count]
        remaining = remaining[count:]
        index += 1


@dataclass
class _Session:
    host: Host
    connection: Connection
    agent: AgentHost
    facts: HostFacts


@dataclass
class Fleet:
    """The connected hosts of one apply, and the policy to run them under."""

    manifest: Manifest
    options: RunOptions
    emit: Emit
    stop: threading.Event = field(default_factory=threading.Event)
    sessions: dict[str, _Session] = field(default_factory=dict)
    outcomes: list[HostOutcome] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)  # every host given to connect()
    _ended: set[tuple[str, str]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def strategy(self) -> Strategy:
        return self.manifest.strategy

    def _event(self, host: str, kind: EventKind, text: str = "", probe: str = "") -> None:
        self.emit(Event(host=host, kind=kind, probe=probe, text=text, time=time.time()))

    def _record(self, outcome: HostOutcome) -> None:
        """Keep a (host, probe)'s first outcome: after a forced stop, a job cut off later
        must not replace the one already reported."""
        with self._lock:
            if (outcome.host, outcome.probe) in self._ended:
                return
            self._ended.add((outcome.host, outcome.probe))
            self.outcomes.append(outcome)
        kinds: dict[str, EventKind] = {"ok": "finished", "skipped": "skipped",
                                       "unreachable": "unreachable"}
        kind = kinds.get(outcome.status, "failed")
        text = outcome.message if not outcome.kind else f"{outcome.kind}: {outcome.message}"
        self._event(outcome.host, kind, text, outcome.probe)

    # -- connect -------------------------------------------------------------------------
    def connect(self, hosts: Sequence[Host]) -> dict[str, tuple[Host, HostFacts]]:
        """Connect, ship the agent and gather facts on every host; the unreachable are
        recorded as outcomes and left out of the result."""
        self.hosts += [host.name for host in hosts]
        with ThreadPoolExecutor(max_workers=max(1, self.strategy.forks)) as pool:
            list(pool.map(self._connect_one, hosts))
        return {name: (s.host, s.facts) for name, s in self.sessions.items()}

    def _connect_one(self, host: Host) -> None:
        if self.stop.is_set():
            self._fail_all(host.name, "skipped", "skipped", "interrupted before connecting")
            return
        become = self.manifest.become if host.become is None else host.become
        options = ConnectOptions(connect_timeout=self.strategy.connect_timeout,
                                 accept_new_host_keys=self.options.accept_new_host_keys,
                                 become=become)
        try:
            connection = connect(host, options)
        except StapctlError as exc:
            self._fail_all(host.name, "unreachable", "unreachable", str(exc))
            return
        try:
            agent = AgentHost(connection, host.python)
            agent.install()
            facts = agent.facts()
        except StapctlError as exc:
            connection.close()
            self._fail_all(host.name, "failed", "agent-error", str(exc))
            return
        with self._lock:
            self.sessions[host.name] = _Session(host, connection, agent, facts)
        self._event(host.name, "connected", f"{facts.release} {facts.arch}")

    def _fail_all(self, host: str, status: OutcomeStatus, kind: str, message: str) -> None:
        for probe in self.manifest.probes:
            self._record(HostOutcome(host=host, probe=probe.name, status=status, kind=kind,
                                     message=message))

    # -- run -----------------------------------------------------------------------------
    def run(self, plan: Plan) -> list[HostOutcome]:
        """Run the plan batch by batch, in inventory order as Ansible does (the canary of
        `serial: [1, ...]` is the first host); stop starting batches past
        max_fail_percentage."""
        names = [name for name in self.hosts if name in self.sessions]
        total = len(names) or 1
        with ThreadPoolExecutor(max_workers=max(1, self.strategy.forks)) as pool:
            for batch in batches(names, self.strategy.serial):
                if self.stop.is_set() or self._failed_percentage(total) > \
                        self.strategy.max_fail_percentage:
                    reason = ("interrupted" if self.stop.is_set()
                              else f"max_fail_percentage ({self.strategy.max_fail_percentage:g}%)"
                              " exceeded")
                    for name in batch:
                        self._fail_all(name, "skipped", "skipped", reason)
                    continue
                list(pool.map(lambda name: self._run_host(name, plan), batch))
        return self.outcomes

    def _failed_percentage(self, total: int) -> float:
        with self._lock:
            hosts = {o.host for o in self.outcomes if o.status in ("failed", "unreachable")}
        return 100.0 * len(hosts & set(self.sessions)) / total

    def _run_host(self, name: str, plan: Plan) -> None:
        session = self.sessions[name]
        deadline = (time.monotonic() + self.strategy.timeout) if self.strategy.timeout else None
        jobs = plan.jobs_for(name)
        threads = [threading.Thread(target=self._run_job, args=(session, job, deadline))
                   for job in jobs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _run_job(self, session: _Session, job: ModuleJob, deadline: float | None) -> None:
        host, probe = session.host.name, job.probe.name
        if self.stop.is_set():
            self._record(HostOutcome(host=host, probe=probe, status="skipped",
                                     kind="skipped", message="interrupted before it started"))
            return
        if job.error or job.artifact is None:
            self._record(HostOutcome(host=host, probe=probe, status="failed",
                                     kind="compile-failed", message=job.error))
            return
        artifact = job.artifact
        lines = _LineSplitter(lambda line: self._event(host, "output", line, probe))
        try:
            remote = session.agent.upload_module(artifact.path, artifact.sha256)
            self._event(host, "uploaded", remote, probe)
            duration = self.options.duration if self.options.duration is not None \
                else job.probe.duration
            request: dict[str, Any] = {
                "action": "preflight" if self.options.check else "run",
                "module": remote,
                "sha256": artifact.sha256,
                "module_name": artifact.module_name,
                "params": dict(job.probe.params),
                "bufsize_mb": self.options.bufsize_mb,
                "duration": duration,
                "exit_timeout": 10.0,
            }

            def on_frame(frame: Frame) -> None:
                if frame.kind == "output":
                    lines.feed(frame.data)
                elif frame.kind == "event":
                    self._agent_event(host, probe, frame.json())

            result = session.agent.call(request, on_frame, self.stop, deadline)
        except (AgentError, ConnectError) as exc:
            lines.flush()
            kind = "transport-lost" if isinstance(exc, ConnectError) else "agent-error"
            self._record(HostOutcome(host=host, probe=probe, status="failed", kind=kind,
                                     message=str(exc)))
            return
        lines.flush()
        ok = result.get("status") == "ok"
        self._record(HostOutcome(
            host=host, probe=probe, status="ok" if ok else "failed",
            kind=None if ok else str(result.get("kind") or "agent-error"),
            message=str(result.get("message") or ""),
            stats={k: int(v) for k, v in (result.get("stats") or {}).items()
                   if isinstance(v, int)},
        ))

    def _agent_event(self, host: str, probe: str, event: Mapping[str, Any]) -> None:
        name = str(event.get("event", ""))
        text = str(event.get("text") or event.get("reason") or event.get("module") or "")
        known: dict[str, EventKind] = {"loaded": "loaded", "started": "started",
                                       "warning": "warning", "error": "error",
                                       "stopping": "stopping"}
        if name in known:
            self._event(host, known[name], text, probe)

    def settle(self) -> None:
        """Give every (host, probe) not yet ended an outcome, so that an interrupted run
        still accounts for each host it was given."""
        reason = "interrupted" if self.stop.is_set() else "not run"
        for host in self.hosts:
            self._fail_all(host, "skipped", "skipped", reason)

    def connections(self) -> dict[str, Connection]:
        return {name: session.connection for name, session in self.sessions.items()}

    def close(self) -> None:
        for session in list(self.sessions.values()):
            with contextlib.suppress(Exception):
                session.connection.close()


class _LineSplitter:
    """Turns a byte stream into whole lines; a final partial line is flushed at the end."""

    def __init__(self, emit_line: Callable[[str], None]) -> None:
        self._emit = emit_line
        self._partial = b""

    def feed(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._emit(line.decode(errors="replace"))

    def flush(self) -> None:
        if self._partial:
            self._emit(self._partial.decode(errors="replace"))
            self._partial = b""
