"""Detached runs after `apply --detach`: their live state, their output, their end.

A detached probe runs on its host as a process of its own (docs/agent-protocol.md,
"Detached runs"); the run folder's detached.json says where. Each command here opens a
fresh connection per host, ships the agent if it is missing, and asks it: `status`,
`tail` (attach), `collect` (only the bytes the run folder does not have yet), `stop`
(then a last collect, which removes the run's files from the host). A host that cannot be
reached is reported as such; nothing here ever loads a module.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from stapctl.agent import AgentHost, AgentRequest, Frame, Timing, detached_state
from stapctl.connection import Connection, ConnectOptions, connect
from stapctl.errors import StapctlError
from stapctl.execute import Connector, LineSplitter
from stapctl.models import DetachedProbe, Host
from stapctl.store import CollectedOutput

STOP_TIMEOUT = 60.0  # seconds a stopped run has to end (EXIT, drain, unload) on its host
MAX_FETCH = 1 << 34  # bytes one collect or attach takes from one probe at most
MAX_LINE = 64 << 10
T = TypeVar("T")
OnLine = Callable[[str, str, str], None]  # host, probe, line


@dataclass(frozen=True)
class ProbeState:
    """A detached probe's state on its host: `detached_state()` of what the agent said, or
    ``unreachable`` with why."""

    host: str
    probe: str
    state: dict[str, Any]

    @property
    def word(self) -> str:
        return str(self.state["state"])


@dataclass(frozen=True)
class Fetched:
    """What one collect brought of one probe: new bytes, bytes that rotation had removed
    on the host before they were fetched, and the state after."""

    host: str
    probe: str
    new_bytes: int
    skipped: int
    state: dict[str, Any]


def unreachable(message: str) -> dict[str, Any]:
    return {**detached_state({}), "state": "unreachable", "message": message}


def host_state(states: Iterable[str]) -> str:
    """One word for a host's probes: running while any runs, else lost if any is, else
    finished (or unreachable)."""
    words = set(states)
    for word in ("running", "starting", "unreachable", "lost", "unknown"):
        if word in words:
            return word
    return "finished"


class DetachedRun:
    """The detached probes of one past apply, on hosts as the inventory has them now."""

    def __init__(self, run_id: str, folder: Path, probes: Sequence[DetachedProbe], *,
                 accept_new_host_keys: bool = False, connector: Connector = connect,
                 timing: Timing | None = None) -> None:
        self.id = run_id
        self.folder = folder
        self.probes = list(probes)
        self.accept_new_host_keys = accept_new_host_keys
        self.connector = connector
        self.timing = timing or Timing()
        self.stop_event = threading.Event()
        self._lock = threading.Lock()

    def interrupt(self, _signum: int = 0) -> None:
        """Stop attaching (the probes run on); safe from a signal handler."""
        self.stop_event.set()

    # -- the commands --------------------------------------------------------------------
    def status(self) -> list[ProbeState]:
        """Each probe's state: asked of its host, or as it ended for a probe whose files
        a final collect removed from its host."""
        collected = CollectedOutput(self.folder)
        ended = [ProbeState(p.host.name, p.probe, state) for p in self.probes
                 if (state := collected.final_state(p.host.name, p.probe)) is not None]
        done = {(e.host, e.probe) for e in ended}

        def work(agent: AgentHost, probes: list[DetachedProbe]) -> list[ProbeState]:
            result = agent.call(AgentRequest(action="status", workdir=probes[0].workdir,
                                             names=tuple(p.name for p in probes)),
                                timing=self.timing)
            if not result.ok:
                return [ProbeState(p.host.name, p.probe, unreachable(result.message))
                        for p in probes]
            return [ProbeState(p.host.name, p.probe, detached_state(result.detached.get(p.name)))
                    for p in probes]
        return ended + self._on_each_host(work, _state_failed,
                                          lambda p: (p.host.name, p.probe) not in done)

    def collect(self, remove: bool = False) -> list[Fetched]:
        """Fetch each probe's output past what the run folder has; with ``remove``, the
        files of a run that has ended are removed from its host once all is here."""
        collected = CollectedOutput(self.folder)

        ended = [Fetched(p.host.name, p.probe, 0, 0, state) for p in self.probes
                 if (state := collected.final_state(p.host.name, p.probe)) is not None]
        done = {(e.host, e.probe) for e in ended}

        def work(agent: AgentHost, probes: list[DetachedProbe]) -> list[Fetched]:
            return [self._collect_one(agent, probe, collected, remove) for probe in probes]
        return ended + self._on_each_host(work, _fetch_failed,
                                          lambda p: (p.host.name, p.probe) not in done)

    def stop(self) -> list[Fetched]:
        """Stop each probe (EXIT, drain, unload), then collect what is left and remove
        its files from the host."""
        def work(agent: AgentHost, probes: list[DetachedProbe]) -> list[ProbeState]:
            states = []
            for probe in probes:
                result = agent.call(AgentRequest(action="stop", workdir=probe.workdir,
                                                 name=probe.name, timeout=STOP_TIMEOUT),
                                    timing=self.timing)
                state = detached_state(result.detached) if result.detached else \
                    unreachable(result.message)
                states.append(ProbeState(probe.host.name, probe.probe, state))
            return states
        collected = CollectedOutput(self.folder)
        self._on_each_host(work, _state_failed, lambda p: collected.final_state(
            p.host.name, p.probe) is None)
        return self.collect(remove=True)

    def attach(self, on_line: OnLine, from_start: bool = False) -> list[ProbeState]:
        """Stream each probe's output from where it stands (or from its start) until every
        probe has ended or ``interrupt()`` is called."""
        def work(agent: AgentHost, probes: list[DetachedProbe]) -> list[ProbeState]:
            threads, states = [], []
            for probe in probes:
                thread = threading.Thread(target=lambda p=probe: states.append(
                    self._tail_one(agent, p, on_line, from_start)), daemon=True)
                thread.start()
                threads.append(thread)
            for thread in threads:
                thread.join()
            return states
        return self._on_each_host(work, _state_failed)

    # -- one probe -----------------------------------------------------------------------
    def _collect_one(self, agent: AgentHost, probe: DetachedProbe,
                     collected: CollectedOutput, remove: bool) -> Fetched:
        host = probe.host.name
        offset = collected.offset(host, probe.probe)
        new_bytes = 0

        def on_frame(frame: Frame) -> None:
            nonlocal new_bytes
            if frame.kind == "output":
                collected.append(host, probe.probe, frame.data)
                new_bytes += len(frame.data)

        result = agent.call(AgentRequest(action="collect", workdir=probe.workdir,
                                         name=probe.name, offset=offset, remove=remove),
                            on_frame, timing=self.timing, max_output=MAX_FETCH)
        if not result.ok:
            return Fetched(host, probe.probe, new_bytes, 0, unreachable(result.message))
        skipped = max(0, result.first - offset) if new_bytes else 0
        state = detached_state(result.detached)
        with self._lock:
            collected.done(host, probe.probe, max(offset, result.end),
                           state if result.removed else None)
        return Fetched(host, probe.probe, new_bytes, skipped, state)

    def _tail_one(self, agent: AgentHost, probe: DetachedProbe, on_line: OnLine,
                  from_start: bool) -> ProbeState:
        host = probe.host.name
        lines = LineSplitter(lambda line: on_line(host, probe.probe, line), MAX_LINE)

        def on_frame(frame: Frame) -> None:
            if frame.kind == "output":
                lines.feed(frame.data)

        result = agent.call(AgentRequest(action="tail", workdir=probe.workdir,
                                         name=probe.name, offset=0 if from_start else None),
                            on_frame, stop=self.stop_event, timing=self.timing,
                            max_output=MAX_FETCH)
        lines.flush()
        state = detached_state(result.detached) if result.ok else unreachable(result.message)
        return ProbeState(host, probe.probe, state)

    # -- fan-out -------------------------------------------------------------------------
    def _on_each_host(self, work: Callable[[AgentHost, list[DetachedProbe]], list[T]],
                      failed: Callable[[DetachedProbe, str], T],
                      wanted: Callable[[DetachedProbe], bool] = lambda _: True) -> list[T]:
        """``work`` once per host with its ``wanted`` probes, all hosts at once, each over
        a fresh connection; a host that cannot be reached gets ``failed`` for its probes."""
        by_host: dict[str, list[DetachedProbe]] = {}
        for probe in self.probes:
            if wanted(probe):
                by_host.setdefault(probe.host.name, []).append(probe)

        def one(probes: list[DetachedProbe]) -> list[T]:
            host = probes[0].host
            connection: Connection | None = None
            try:
                connection = self._connect(host)
                agent = AgentHost(connection, host.python)
                agent.prepare()
                return list(work(agent, probes))
            except StapctlError as exc:
                return [failed(probe, str(exc)) for probe in probes]
            finally:
                if connection is not None:
                    with contextlib.suppress(Exception):
                        connection.close()

        if not by_host:
            return []
        with ThreadPoolExecutor(max_workers=min(50, len(by_host))) as pool:
            results = list(pool.map(one, by_host.values()))
        return [item for items in results for item in items]

    def _connect(self, host: Host) -> Connection:
        return self.connector(host, ConnectOptions(
            become=bool(host.become), accept_new_host_keys=self.accept_new_host_keys))


def _state_failed(probe: DetachedProbe, message: str) -> ProbeState:
    return ProbeState(probe.host.name, probe.probe, unreachable(message))


def _fetch_failed(probe: DetachedProbe, message: str) -> Fetched:
    return Fetched(probe.host.name, probe.probe, 0, 0, unreachable(message))
