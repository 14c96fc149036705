"""Fan-out: each host connected and run in one go under the rollout policy (Fleet.stream,
apply's way); or every host connected first, then each host's modules run (Fleet.connect,
then Fleet.run: the library's stages; then run_hosts: an engine's workers).

Every host's fate is a HostOutcome; nothing a host does escapes as an exception, and no
worker thread ever ends in a traceback. Work is done by a bounded thread pool
(paramiko's transport is already a thread per host), and everything that happens is
reported as an Event through one callback. Connections are made by an injected
connector, so the policy can be tested against fake connections.
"""

from __future__ import annotations

import contextlib
import resource
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from stapctl.agent import (
    AgentHost,
    AgentRequest,
    Frame,
    RunResult,
    Timing,
    detached_state,
    module_to_send,
    text_field,
)
from stapctl.connection import Connection, ConnectOptions, connect
from stapctl.errors import AgentError, ConnectError, StapctlError
from stapctl.models import (
    ENDING_EVENT,
    BatchSize,
    DetachedProbe,
    Event,
    EventKind,
    FailureKind,
    Host,
    HostFacts,
    HostOutcome,
    Manifest,
    OutcomeStatus,
    Percent,
    Strategy,
    Target,
    each_run_name,
)
from stapctl.plan import ModuleJob, Plan
from stapctl.store import file_name

Emit = Callable[[Event], None]
Connector = Callable[[Host, ConnectOptions], Connection]

# without strategy.timeout, a probe with a duration is given up on this long after it
# should have ended: loading, EXIT, draining and unloading fit in it many times over
DEADLINE_GRACE = 60.0
# a probe run once per matching process runs at most this many at once on a host (the
# oldest): each is a module instance and an SSH channel
MAX_RUNS_PER_MATCH = 32
# descriptors left for what is not a host's connection: run records, logs, pipes, terminal
RESERVED_DESCRIPTORS = 128


def connection_budget() -> int:
    """How many host connections (one socket each) fit in the descriptor limit at once."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(1, soft - RESERVED_DESCRIPTORS)


@dataclass(frozen=True)
class RunOptions:
    duration: float | None = None  # overrides every probe's duration
    check: bool = False  # connect, upload and preflight, but load nothing
    accept_new_host_keys: bool = False
    bufsize_mb: int = 0
    timing: Timing = Timing()
    max_output: int = 1 << 30  # bytes of probe output per host and probe
    max_line: int = 64 << 10  # longer lines are split, with a warning


def remote_uri(host: Host) -> str:
    """What the host's scripts see as remote_uri(), as stap --remote names its targets."""
    if host.address == "local":
        return "local://"
    address = f"[{host.address}]" if ":" in host.address else host.address
    user = f"{host.user}@" if host.user else ""
    return f"ssh://{user}{address}:{host.port}"


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
    # closed after its facts, to spare a descriptor on a fleet larger than the descriptor
    # limit allows; opened again when the host's turn to run comes
    parked: bool = False

    def module(self, job: ModuleJob, again: bool = False) -> tuple[str, bytes]:
        """The job's module's path on the host, and its bytes to send with the request
        (none when the host holds it, unless ``again``): AgentHost.module."""
        assert job.artifact is not None
        return self.agent.module(job.artifact.path, job.artifact.sha256, again)


@dataclass
class Fleet:
    """The connected hosts of one apply, and the policy to run them under."""

    manifest: Manifest
    options: RunOptions
    emit: Emit
    connector: Connector = connect
    stop: threading.Event = field(default_factory=threading.Event)
    sessions: dict[str, _Session] = field(default_factory=dict)
    outcomes: list[HostOutcome] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)  # every host given to connect()
    run_name: str = ""  # the run's id: detached runs are named after it on the targets
    detached: list[DetachedProbe] = field(default_factory=list)  # started detached
    _ended: set[tuple[str, str]] = field(default_factory=set)
    _ended_hosts: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: int = 1  # hosts worked on at once: forks, within the connection budget
    _kept: int = 0  # connections held open from facts to run
    _keep_limit: int = 0  # beyond it a host's connection is parked
    _first: set[str] = field(default_factory=set)  # the hosts given a spare agent

    @property
    def strategy(self) -> Strategy:
        return self.manifest.strategy

    def _event(self, host: str, kind: EventKind, text: str = "", probe: str = "") -> None:
        self.emit(Event(host=host, kind=kind, probe=probe, text=text, time=time.time()))

    def record(self, outcome: HostOutcome) -> None:
        """Keep a (host, probe)'s first outcome: after a forced stop, a job cut off later
        must not replace the one already reported."""
        with self._lock:
            if (outcome.host, outcome.probe) in self._ended:
                return
            self._ended.add((outcome.host, outcome.probe))
            self._ended_hosts.add(outcome.host)
            self.outcomes.append(outcome)
        self.report(outcome)

    def report(self, outcome: HostOutcome) -> None:
        """Tell the run a (host, probe) ended, by its ending event; a fleet serving a
        slice for an engine's controller sends the outcome itself instead."""
        text = outcome.message if not outcome.kind else f"{outcome.kind}: {outcome.message}"
        self._event(outcome.host, ENDING_EVENT[outcome.status], text, outcome.probe)

    def _fail(self, host: str, probe: str, status: OutcomeStatus, kind: FailureKind,
              message: str) -> None:
        self.record(HostOutcome(host=host, probe=probe, status=status, kind=kind,
                                 message=message))

    def fail_all(self, host: str, status: OutcomeStatus, kind: FailureKind,
                  message: str) -> None:
        for probe in self.manifest.probes:
            self._fail(host, probe.name, status, kind, message)

    # -- connect -------------------------------------------------------------------------
    @property
    def at_once(self) -> int:
        """Hosts worked on at once: forks, within the connection budget."""
        return max(1, min(self.strategy.forks, connection_budget()))

    def connect(self, hosts: Sequence[Host],
                spares: bool = False) -> dict[str, tuple[Host, HostFacts]]:
        """Connect, ship the agent and gather facts on every host; the unreachable are
        recorded as outcomes and left out of the result. ``spares``: a run follows, so the
        hosts of its first batch get a spare agent (AgentHost.prepare), when every host
        is connected at once (no more hosts than forks): otherwise the connects of the
        others would keep the run waiting, and the spares with it."""
        self.hosts += [host.name for host in hosts]
        self._workers = self.at_once
        # the workers must always find descriptors free to open a parked host's connection
        self._keep_limit = connection_budget() - self._workers
        names = [host.name for host in hosts] if spares and len(hosts) <= self._workers \
            else []
        self._first = set(next(batches(names, self.strategy.serial), [])[:self._workers])
        with ThreadPoolExecutor(max_workers=self._workers) as pool:
            list(pool.map(self._connect_one, hosts))
        return {name: (s.host, s.facts) for name, s in self.sessions.items()}

    def _connect_one(self, host: Host) -> None:
        session = self._open(host, spare=host.name in self._first
                             and self._kept < self._keep_limit)
        if session is None:
            return
        with self._lock:
            keep = self._kept < self._keep_limit
            self._kept += keep
        if not keep:
            with contextlib.suppress(Exception):
                session.connection.close()
            session.parked = True
        self._add(session)

    def _open(self, host: Host, spare: bool) -> _Session | None:
        """Connect to the host, ship its agent and read its facts (AgentHost.prepare;
        ``spare``: with the agent its run will use, started now); None, with the host's
        outcome recorded, when it cannot be."""
        if self.stop.is_set():
            self.fail_all(host.name, "skipped", FailureKind.SKIPPED,
                           "interrupted before connecting")
            return None
        try:
            connection = self.connector(host, self._connect_options(host))
        except StapctlError as exc:
            self.fail_all(host.name, "unreachable", FailureKind.UNREACHABLE, str(exc))
            return None
        except Exception as exc:  # noqa: BLE001 - a controller fault stays this host's
            self.fail_all(host.name, "failed", FailureKind.CONTROLLER_ERROR, _fault(exc))
            return None
        try:
            agent = AgentHost(connection, host.python)
            facts = agent.prepare(spare=spare, loads=not self.options.check,
                                  startup=self.options.timing.startup)
        except Exception as exc:  # noqa: BLE001 - every failure is this host's outcome
            with contextlib.suppress(Exception):
                connection.close()
            status, kind, message = _classify(exc)
            self.fail_all(host.name, status, kind, message)
            return None
        return _Session(host, connection, agent, facts)

    def _add(self, session: _Session) -> None:
        with self._lock:
            self.sessions[session.host.name] = session
        self._event(session.host.name, "connected",
                    f"{session.facts.release} {session.facts.arch}")

    def _connect_options(self, host: Host) -> ConnectOptions:
        become = self.manifest.become if host.become is None else host.become
        return ConnectOptions(connect_timeout=self.strategy.connect_timeout,
                              accept_new_host_keys=self.options.accept_new_host_keys,
                              become=become)

    def _unpark(self, session: _Session) -> bool:
        """Open a parked host's connection again (its agent is installed); False, with the
        host's outcome recorded, when it cannot be."""
        try:
            connection = self.connector(session.host, self._connect_options(session.host))
        except StapctlError as exc:
            self.fail_all(session.host.name, "unreachable", FailureKind.UNREACHABLE, str(exc))
            return False
        except Exception as exc:  # noqa: BLE001 - a controller fault stays this host's
            self.fail_all(session.host.name, "failed", FailureKind.CONTROLLER_ERROR,
                           _fault(exc))
            return False
        session.connection = session.agent.connection = connection
        session.parked = False
        return True

    def read_file(self, name: str, path: str, limit: int) -> bytes:
        """A file of a connected host's, over its connection (a parked one's opened for it)."""
        session = self.sessions[name]
        if not session.parked:
            return session.connection.read_file(path, limit)
        connection = self.connector(session.host, self._connect_options(session.host))
        try:
            return connection.read_file(path, limit)
        finally:
            connection.close()

    # -- connect and run in one go -------------------------------------------------------
    def stream(self, hosts: Sequence[Host],
               plan_for: Callable[[Host, HostFacts], Plan]) -> list[HostOutcome]:
        """Connect and run each host in one go, ``at_once`` hosts at a time, batch by
        batch under the rollout policy: for a fleet larger than that, where connecting
        every host first would hold (or park and open again) a connection per host
        until its turn. Each host's agent is started at its connect and runs the host's
        plan, ``plan_for(host, facts)``; then its connection is closed, so at most
        ``at_once`` are open. An exception from ``plan_for`` (bad input, as a template
        that fails on the host's facts) lets no other host start, and is raised once the
        hosts running have ended."""
        self.hosts += [host.name for host in hosts]
        self._workers = self.at_once
        by_name = {host.name: host for host in hosts}
        halted: list[BaseException] = []

        def one(name: str) -> None:
            if halted:
                return  # left to settle(): not run
            session = self._open(by_name[name], spare=True)
            if session is None:
                return
            self._add(session)
            try:
                plan = plan_for(session.host, session.facts)
            except Exception as exc:  # noqa: BLE001 - raised in the caller's thread
                halted.append(exc)
            else:
                self._run_host(name, plan)
            finally:
                with contextlib.suppress(Exception):
                    session.connection.close()
                with self._lock:
                    del self.sessions[name]

        def run_batch(batch: list[str]) -> None:
            with ThreadPoolExecutor(max_workers=self._workers) as pool:
                list(pool.map(one, batch))

        self.roll_out(list(by_name), run_batch)
        if halted:
            raise halted[0]
        return self.outcomes

    # -- run -----------------------------------------------------------------------------
    def run(self, plan: Plan) -> list[HostOutcome]:
        """Run the plan on the connected hosts under the rollout policy."""
        self.roll_out([name for name in self.hosts if name in self.sessions],
                      lambda batch: self.run_hosts(plan, batch))
        return self.outcomes

    def roll_out(self, names: Sequence[str], run_batch: Callable[[list[str]], None]) -> None:
        """Hand ``names`` to ``run_batch`` batch by batch, in inventory order as Ansible
        does (the canary of `serial: [1, ...]` is the first host); past
        max_fail_percentage, or once stopped, the batches left are skipped. An engine's
        controller rolls out its whole run here too, its batches run by the workers."""
        total = len(names) or 1
        for batch in batches(names, self.strategy.serial):
            if self.stop.is_set() or self._failed_percentage(names, total) > \
                    self.strategy.max_fail_percentage:
                reason = ("interrupted" if self.stop.is_set()
                          else f"max_fail_percentage ({self.strategy.max_fail_percentage:g}%)"
                          " exceeded")
                for name in batch:
                    self.fail_all(name, "skipped", FailureKind.SKIPPED, reason)
                continue
            run_batch(batch)

    def run_hosts(self, plan: Plan, names: Sequence[str]) -> None:
        """Run the plan on these connected hosts, ``forks`` at once."""
        with ThreadPoolExecutor(max_workers=self._workers) as pool:
            list(pool.map(lambda name: self._run_host(name, plan), names))

    def _failed_percentage(self, names: Sequence[str], total: int) -> float:
        with self._lock:
            hosts = {o.host for o in self.outcomes if o.status in ("failed", "unreachable")}
        return 100.0 * len(hosts.intersection(names)) / total

    def has_ended(self, host: str) -> bool:
        """Whether some outcome of the host's is in (it failed to connect, or ran)."""
        return host in self._ended_hosts

    def _run_host(self, name: str, plan: Plan) -> None:
        session = self.sessions[name]
        unparked = session.parked
        if unparked and not self._unpark(session):
            return
        deadline = (time.monotonic() + self.strategy.timeout) if self.strategy.timeout else None
        # the jobs side by side, the first in this worker's own thread
        jobs = plan.jobs_for(name)
        threads = [threading.Thread(target=self._run_job, args=(session, job, deadline))
                   for job in jobs[1:]]
        for thread in threads:
            thread.start()
        if jobs:
            self._run_job(session, jobs[0], deadline)
        for thread in threads:
            thread.join()
        if unparked:  # its descriptor goes to the next parked host
            with contextlib.suppress(Exception):
                session.connection.close()
            session.parked = True

    def _run_job(self, session: _Session, job: ModuleJob, deadline: float | None) -> None:
        host, probe = session.host.name, job.probe.name
        if self.stop.is_set():
            self._fail(host, probe, "skipped", FailureKind.SKIPPED,
                       "interrupted before it started")
            return
        if job.error or job.artifact is None:
            self._fail(host, probe, "failed", FailureKind.COMPILE_FAILED, job.error)
            return
        target = job.probe.target
        if target is not None and target.each and not self.options.check:
            self._run_each(session, job, target, deadline)
            return
        lines = LineSplitter(lambda line: self._event(host, "output", line, probe),
                             self.options.max_line)
        command_lines = LineSplitter(
            lambda line: self._event(host, "command-output", line, probe), self.options.max_line)
        try:
            outcome = self._call_agent(session, job, deadline, lines, command_lines)
        except Exception as exc:  # noqa: BLE001 - every failure is this host's outcome
            status, kind, message = _classify(exc)
            outcome = HostOutcome(host=host, probe=probe, status=status, kind=kind,
                                  message=message)
        finally:
            with contextlib.suppress(Exception):
                lines.flush()
                command_lines.flush()
        if lines.split_lines:
            self._event(host, "warning", f"{lines.split_lines} line(s) longer than "
                        f"{self.options.max_line} bytes were split", probe)
        self.record(outcome)

    def _run_each(self, session: _Session, job: ModuleJob, target: Target,
                  deadline: float | None) -> None:
        """One run per process the probe's target matches on the host, side by side, each
        aimed at its PID and with its own outcome (`probe[pid N]`)."""
        host, probe = session.host.name, job.probe.name
        assert job.artifact is not None
        try:  # the module goes with this request, for the runs that follow to find it
            remote, data = session.module(job)
            request = AgentRequest(action="targets", target=target.wire(), module=remote,
                                   sha256=job.artifact.sha256, module_data=data)
            result = session.agent.call(request, lambda _: None, self.stop, deadline,
                                        self.options.timing, self.options.max_output)
        except Exception as exc:  # noqa: BLE001 - every failure is this host's outcome
            status, kind, message = _classify(exc)
            self._fail(host, probe, status, kind, message)
            return
        if not result.ok or not result.pids:
            self._fail(host, probe, "failed", result.kind or FailureKind.AGENT_ERROR,
                       result.message or "the agent named no matching process")
            return
        pids = result.pids[:MAX_RUNS_PER_MATCH]
        if len(result.pids) > len(pids):
            self._event(host, "warning", f"{len(result.pids)} processes match {target}: "
                        f"one run for each of the oldest {len(pids)}", probe)
        with self._lock:  # its runs' outcomes stand for the probe's on this host
            self._ended.add((host, probe))
        runs = [replace(job, probe=replace(job.probe, name=each_run_name(probe, pid),
                                           target=Target(pid=pid)))
                for pid in pids]
        threads = [threading.Thread(target=self._run_job, args=(session, run, deadline))
                   for run in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _call_agent(self, session: _Session, job: ModuleJob, deadline: float | None,
                    lines: LineSplitter, command_lines: LineSplitter) -> HostOutcome:
        host, probe = session.host.name, job.probe.name
        artifact = job.artifact
        assert artifact is not None
        remote, data = session.module(job)
        self._event(host, "uploaded", remote, probe)  # there, or sent with the request
        timing = self.options.timing
        duration = self.options.duration if self.options.duration is not None \
            else job.probe.duration
        if self.manifest.detach is not None and not self.options.check:
            return self._detach(session, job, remote, data, duration)
        if deadline is None and duration is not None:
            deadline = time.monotonic() + duration + timing.exit_timeout + DEADLINE_GRACE
        request = AgentRequest(
            action="preflight" if self.options.check else "run", module=remote,
            sha256=artifact.sha256, module_name=artifact.module_name,
            params=job.probe.params, duration=duration, exit_timeout=timing.exit_timeout,
            bufsize_mb=self.options.bufsize_mb, deadman=timing.deadman,
            remote_id=self.hosts.index(host), remote_uri=remote_uri(session.host),
            target=job.probe.target.wire() if job.probe.target else None, module_data=data)

        def on_frame(frame: Frame) -> None:
            if frame.kind == "output":
                lines.feed(frame.data)
            elif frame.kind == "event":
                event = frame.json()
                if event.get("event") == "command-output":  # bounded by the frame's size
                    text = event.get("text")
                    command_lines.feed(text.encode() if isinstance(text, str) else b"")
                else:
                    self._agent_event(host, probe, event)

        result = session.agent.call(request, on_frame, self.stop, deadline, timing,
                                    self.options.max_output)
        if again := self._send_again(session, job, result):
            result = session.agent.call(replace(request, module_data=again), on_frame,
                                        self.stop, deadline, timing, self.options.max_output)
        return HostOutcome(host=host, probe=probe, status="ok" if result.ok else "failed",
                           kind=result.kind, message=result.message, stats=result.stats)

    def _detach(self, session: _Session, job: ModuleJob, remote: str, data: bytes,
                duration: float | None) -> HostOutcome:
        """Start the probe detached on the host; the call returns once it runs. A probe's
        duration, when shorter than the bound's, is its maximum duration."""
        spec, artifact = self.manifest.detach, job.artifact
        assert spec is not None and artifact is not None
        host, probe = session.host.name, job.probe.name
        name = detached_name(self.run_name, probe)
        request = AgentRequest(
            action="detach", module=remote, sha256=artifact.sha256,
            module_name=artifact.module_name, params=job.probe.params,
            exit_timeout=self.options.timing.exit_timeout, bufsize_mb=self.options.bufsize_mb,
            workdir=session.agent.workdir, name=name,
            max_duration=min(spec.max_duration, duration or spec.max_duration),
            max_disk=spec.max_disk, file_size=spec.file_size, file_count=spec.file_count,
            remote_id=self.hosts.index(host), remote_uri=remote_uri(session.host),
            module_data=data)
        result = session.agent.call(request, timing=self.options.timing)
        if again := self._send_again(session, job, result):
            result = session.agent.call(replace(request, module_data=again),
                                        timing=self.options.timing)
        if not result.ok:
            return HostOutcome(host=host, probe=probe, status="failed", kind=result.kind,
                               message=result.message, stats=result.stats)
        state = detached_state(result.detached)
        become = self.manifest.become if session.host.become is None else session.host.become
        with self._lock:
            self.detached.append(DetachedProbe(replace(session.host, become=become), probe,
                                               name, session.agent.workdir))
        self._event(host, "started", f"detached as {name}", probe)
        return HostOutcome(host=host, probe=probe, status="ok", message=(
            f"detached: {state['state']}, module {state['module']}, pid {state['pid']}"))

    def _send_again(self, session: _Session, job: ModuleJob, result: RunResult) -> bytes:
        """The module's bytes, to repeat the request with, when the agent found no module
        or a corrupt copy (which it removed); none (b"") otherwise."""
        reason = module_to_send(result)
        if reason is None:
            return b""
        if reason == "corrupt":
            self._event(session.host.name, "warning",
                        "the module on the host was corrupt: sent again", job.probe.name)
        return session.module(job, again=True)[1]

    def _agent_event(self, host: str, probe: str, event: Mapping[str, Any]) -> None:
        name = event.get("event")
        text = text_field(event.get("text") or event.get("reason") or event.get("module"))
        known: dict[object, EventKind] = {"loaded": "loaded", "started": "started",
                                          "warning": "warning", "error": "error",
                                          "stopping": "stopping"}
        if name in known:
            self._event(host, known[name], text, probe)

    def settle(self) -> None:
        """Give every (host, probe) not yet ended an outcome, so that an interrupted run
        still accounts for each host it was given."""
        reason = "interrupted" if self.stop.is_set() else "not run"
        for host in self.hosts:
            self.fail_all(host, "skipped", FailureKind.SKIPPED, reason)

    def close(self) -> None:
        for session in list(self.sessions.values()):
            with contextlib.suppress(Exception):
                session.connection.close()


def detached_name(run_id: str, probe: str) -> str:
    """The name of a probe's detached run on its hosts (its folder there)."""
    return f"{run_id}.{file_name(probe)}"


def _classify(exc: BaseException) -> tuple[OutcomeStatus, FailureKind, str]:
    """A host's failure as its outcome: status, kind and message."""
    if isinstance(exc, AgentError):
        status: OutcomeStatus = "unreachable" if exc.kind is FailureKind.UNRESPONSIVE \
            else "failed"
        return status, exc.kind, str(exc)
    if isinstance(exc, ConnectError):
        return "failed", FailureKind.TRANSPORT_LOST, str(exc)
    if isinstance(exc, StapctlError):
        return "failed", FailureKind.AGENT_ERROR, str(exc)
    return "failed", FailureKind.CONTROLLER_ERROR, _fault(exc)


def _fault(exc: BaseException) -> str:
    return f"stapctl failed on this host ({type(exc).__name__}: {text_field(str(exc))})"


class LineSplitter:
    """Turns a byte stream into whole lines; a final partial line is flushed at the end.

    A line longer than ``max_line`` bytes is cut into pieces of that size (counted in
    ``split_lines``), so a target that never sends a newline costs bounded memory, and
    each byte is scanned once.
    """

    def __init__(self, emit_line: Callable[[str], None], max_line: int) -> None:
        self._emit = emit_line
        self._max = max_line
        self._partial = bytearray()
        self.split_lines = 0
        self._splitting = False

    def feed(self, data: bytes) -> None:
        start = self._whole_lines(data)
        while start < len(data):
            newline = data.find(b"\n", start, start + self._max - len(self._partial) + 1)
            if newline >= 0:
                self._partial += data[start:newline]
                if self._partial or not self._splitting:  # not the end of a split line
                    self._line()
                self._splitting = False
                start = newline + 1
                continue
            take = min(len(data) - start, self._max - len(self._partial))
            self._partial += data[start:start + take]
            start += take
            if len(self._partial) >= self._max:
                if not self._splitting:
                    self.split_lines += 1
                    self._splitting = True
                self._line()

    def _whole_lines(self, data: bytes) -> int:
        """Emits the complete lines ``data`` starts with, when there is no partial line
        before them and none is too long: the whole run of them split and decoded at
        once. Returns where the bytes left for the line-by-line path start."""
        end = data.rfind(b"\n") + 1
        if self._partial or self._splitting or not end:
            return 0
        block = data[:end - 1]
        if max(map(len, block.split(b"\n"))) > self._max:
            return 0
        for line in block.decode(errors="replace").split("\n"):
            self._emit(line)
        return end

    def flush(self) -> None:
        if self._partial:
            self._line()

    def _line(self) -> None:
        text = self._partial.decode(errors="replace")
        self._partial = bytearray()
        self._emit(text)
