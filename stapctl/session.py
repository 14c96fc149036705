"""One run of a manifest: the library entry point every caller goes through.

The stages run in this order, and only here: connect (agent shipped, facts gathered) →
plan (render per host, group into modules) → build (compile what is not cached) → run
(under the rollout policy) → finish (aggregates, sinks, record). ``apply`` goes through
them in that order for an engine's run; any other run is streamed: each host connected,
planned (its modules built once for all the hosts that share them) and run in one go
(``stream``), so no host waits for the slowest or an unreachable host's connect, and a
fleet larger than the hosts worked on at once keeps no connection open until its turn.
Each stage's work runs in a thread of its own while the calling thread hands each event
to the run record, the aggregator and a Listener, so a display never races the workers,
and an interrupt (a signal handler calling ``interrupt``) is acted on within a fraction
of a second, whatever the stage::

    from stapctl.manifest import load_manifest
    from stapctl.session import Session, select_hosts

    manifest = load_manifest(Path("trace.yaml"))
    session = Session(manifest, select_hosts(manifest, Path("hosts.ini")))
    run = session.apply()
    print(run.exit_code, [(o.host, o.status) for o in run.outcomes])

Rules kept here: connections are closed before the hosts not yet ended are settled (so a
cut run still accounts for every host); the record is finished on every path, errors
included, after the events of the settled hosts have reached it.
"""

from __future__ import annotations

import re
import secrets
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from stapctl.aggregate import Aggregator
from stapctl.build import Builder, compiles_at_once
from stapctl.connection import connect
from stapctl.detach import DetachedRun
from stapctl.difference import compare, recorded_hosts, recorded_many_probes
from stapctl.errors import HistoryError, Issue, ManifestError, StapctlError, UsageError
from stapctl.execute import Connector, Fleet, RunOptions
from stapctl.inventory import load_inventory
from stapctl.manifest import load_manifest
from stapctl.models import (
    Difference,
    Event,
    Host,
    HostFacts,
    HostOutcome,
    InlineInventory,
    Manifest,
    Run,
)
from stapctl.plan import (
    ModuleJob,
    Plan,
    build_job,
    build_plan,
    check_scripts,
    gather_symbol_maps,
    make_plan,
    merge_plans,
)
from stapctl.probes import ProbeListing, list_probes
from stapctl.store import RunRecorder, read_detached, run_folder
from stapctl.yamldoc import Document

T = TypeVar("T")
FORCE_GRACE = 3.0  # seconds to collect the outcomes of cut connections after a 2nd interrupt
EVENT_BUDGET = 16 << 20  # bytes of events waiting for the listener before workers wait
TAKE_BYTES = 1 << 20  # bytes of events the listener takes at once, at most


class Listener(Protocol):
    """What a run tells the person or program watching it; called in the caller's thread."""

    def phase(self, text: str) -> None: ...
    def event(self, event: Event) -> None: ...
    def build(self, job: ModuleJob, state: str) -> None: ...  # building, built, failed
    def note(self, text: str) -> None: ...  # one line about the run as a whole
    def interrupted(self, count: int, signum: int) -> None: ...
    def tick(self) -> None: ...  # a few times a second while a run goes, events or not


class EngineRun(Protocol):
    """One run's connect and fan-out done elsewhere (stapctl.engine): what happens on the
    hosts is fed into the Fleet's events and outcomes; it stops when the Fleet's ``stop``
    is set."""

    def connect(self, hosts: Sequence[Host]) -> dict[str, tuple[Host, HostFacts]]: ...
    def read_file(self, name: str, path: str, limit: int) -> bytes: ...
    def run(self, plan: Plan) -> None: ...
    def cut(self) -> None: ...  # the second interrupt: connections cut where they are
    def close(self) -> None: ...  # the run is over, whatever happened


class Engine(Protocol):
    """Where a run's hosts are served instead of this process (stapctl.engine)."""

    def begin(self, fleet: Fleet, note: Callable[[str], None]) -> EngineRun: ...


class Silent:
    """A listener that shows nothing (benchmarks, library use)."""

    def phase(self, text: str) -> None:
        pass

    def event(self, event: Event) -> None:
        pass

    def build(self, job: ModuleJob, state: str) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def interrupted(self, count: int, signum: int) -> None:
        pass

    def tick(self) -> None:
        pass


def detached_run(run_id: str, inventory: Path | None = None, limit: str | None = None, *,
                 accept_new_host_keys: bool = False,
                 connector: Connector = connect) -> DetachedRun:
    """The detached probes of a past `apply --detach` (a run id or a unique prefix), on
    their hosts as the inventory names them now (-i, else the manifest's, else the lab's:
    a lab guest started again has a new port); ``limit`` keeps some of the hosts."""
    from stapctl import history
    row = history.find_run(run_id)
    folder = run_folder(row)
    probes = read_detached(folder)
    if not probes:
        raise StapctlError(f"run {row['id']} started nothing detached (it was not applied "
                           "with --detach, or no host started)")
    current: dict[str, Host] = {}
    try:
        manifest = load_manifest(Path(row["manifest"]))
        current = {host.name: host for host in select_hosts(manifest, inventory, limit)}
    except StapctlError:  # the manifest moved or changed since: the inventory alone
        if inventory is not None:
            inventory_hosts = load_inventory(inventory, Document(str(inventory), None))
            current = {host.name: host for host in inventory_hosts.select("all", limit)}
        elif limit is not None:
            raise
    if limit is not None:
        probes = [p for p in probes if p.host.name in current]
    probes = [replace(p, host=replace(current[p.host.name], become=p.host.become))
              if p.host.name in current else p for p in probes]
    return DetachedRun(row["id"], folder, probes, accept_new_host_keys=accept_new_host_keys,
                       connector=connector)


RETRY_LIMIT = re.compile(r"@(?P<run>last|[A-Za-z0-9._-]+):failed")


def select_hosts(manifest: Manifest, inventory: Path | None = None,
                 limit: str | None = None) -> list[Host]:
    """The hosts to work on: -i, else the manifest's inventory, else the running lab's;
    ``limit`` is a host pattern, or ``@RUN:failed`` (``@last:failed``: the newest run of
    this manifest): the hosts that run failed on or could not reach, as Ansible's retry
    files name them."""
    source: Path | InlineInventory
    if inventory is not None:
        source = inventory
    elif manifest.inventory is not None:
        source = manifest.inventory
    else:
        from stapctl.lab import GuestState, Lab  # the lab only when it is the inventory

        status = Lab.default().status(login=False)
        if not any(guest.state is GuestState.RUNNING for guest in status.guests):
            raise ManifestError(Issue(str(manifest.path), None, None, "inventory",
                                      "no inventory: pass -i INVENTORY, set `inventory:` in "
                                      "the manifest, or start the lab with `stapctl lab up`"))
        source = status.inventory
    origin = manifest.document or Document(str(manifest.path), None)
    inventory_hosts = load_inventory(source, origin)
    retry = RETRY_LIMIT.fullmatch(limit or "")
    if retry is None:
        return inventory_hosts.select(manifest.hosts, limit)
    from stapctl import history
    run_id, names = history.failed_hosts(retry["run"], manifest.name)
    if not names:
        raise NothingToRetry(f"run {run_id} has no failed or unreachable host: nothing "
                             "to retry")
    missing = [name for name in names if name not in inventory_hosts.hosts]
    if missing:
        raise UsageError(f"--limit {limit}: {', '.join(missing)} (failed in run {run_id}) "
                         f"{'is' if len(missing) == 1 else 'are'} not in the inventory "
                         f"{inventory_hosts.source}")
    return inventory_hosts.select(manifest.hosts, ",".join(names))


class NothingToRetry(StapctlError):
    """``--limit @RUN:failed`` of a run where every host succeeded: there is nothing to
    do, which is success (exit 0), as a retry in a script expects."""

    exit_code = 0


class EventChannel:
    """Events from the workers to the caller's thread, bounded by their bytes.

    A worker that finds the budget spent waits (backpressure reaches its agent through
    SSH flow control), so a slow reader of stdout costs no memory; the consumer thread
    itself never waits, so it can emit while it drains.
    """

    def __init__(self, budget: int = EVENT_BUDGET) -> None:
        self._budget = budget
        self._queued = 0
        self._events: deque[Event] = deque()
        self._ready = threading.Condition()
        self.consumer = threading.get_ident()
        self._stage_over = False

    def start_stage(self) -> None:
        """A stage begins: ``get`` waits for its events again."""
        with self._ready:
            self._stage_over = False

    def end_stage(self) -> None:
        """The stage's work is done: ``get`` stops waiting at once, so the next stage
        starts now rather than at the end of the consumer's timeout."""
        with self._ready:
            self._stage_over = True
            self._ready.notify_all()

    @property
    def stage_over(self) -> bool:
        return self._stage_over

    def put(self, event: Event) -> None:
        size = len(event.text) + 128
        with self._ready:
            if threading.get_ident() != self.consumer:
                self._ready.wait_for(lambda: self._queued + size <= self._budget
                                     or not self._events)
            self._events.append(event)
            self._queued += size
            self._ready.notify_all()

    def take(self, timeout: float) -> list[Event]:
        """The events waiting, in order, up to TAKE_BYTES of them (one lock and one
        wake-up for a burst of output lines, not one each, in bounded memory); none
        after ``timeout`` or once the stage is over."""
        with self._ready:
            self._ready.wait_for(lambda: bool(self._events) or self._stage_over, timeout)
            events: list[Event] = []
            taken = 0
            while self._events and (not events or taken < TAKE_BYTES):
                event = self._events.popleft()
                events.append(event)
                taken += len(event.text) + 128
            self._queued -= taken
            self._ready.notify_all()
            return events


class Session:
    """One run of one manifest on its hosts; see the module's docstring."""

    def __init__(self, manifest: Manifest, hosts: list[Host], *,
                 extra_vars: Mapping[str, Any] | None = None,
                 options: RunOptions | None = None, listener: Listener | None = None,
                 builder: Builder | None = None, connector: Connector = connect,
                 record: bool = True, baseline: str | None = None,
                 engine: Engine | None = None) -> None:
        """``baseline``: a run id (or unique prefix) of the same manifest, or "last" (its
        newest finished run), whose output the run's is compared with when it ends.
        ``engine``: what runs the plan on the hosts instead of this process's Fleet."""
        self.manifest = manifest
        self.hosts = hosts
        self.extra_vars = dict(extra_vars or {})
        self.listener: Listener = listener or Silent()
        self.builder = builder or Builder(progress=lambda text: self._phase(text))
        self.channel = EventChannel()
        self.run_id = time.strftime("%Y%m%d-%H%M%S-") + manifest.name + "-" + \
            secrets.token_hex(2)
        self.fleet = Fleet(manifest, options or RunOptions(), self.channel.put, connector,
                           run_name=self.run_id)
        self.engine = engine.begin(self.fleet, self._note) if engine is not None else None
        self.record = record
        self.recorder: RunRecorder | None = None
        self._aggregator = Aggregator()
        self._lines: Counter[tuple[str, str]] = Counter()  # (host, probe) → output lines
        self._compare = baseline is not None
        self.baseline = self._baseline(baseline) if baseline is not None else None
        self._interrupts = 0
        self._signal = int(signal.SIGINT)
        # phases and build progress from the workers, delivered in the caller's thread
        self._notes: deque[Callable[[], None]] = deque()
        # a streamed run's: each host's plan, and each module's build shared by its hosts;
        # hosts are planned one at a time (the Builder's choices per kernel are made once)
        # and compiled one per CPU at most, as build_plan does
        self._plans: list[Plan] = []
        self._builds: dict[str, Future[ModuleJob]] = {}
        self._builds_lock = threading.Lock()
        self._planning = threading.Lock()
        self._compiles = threading.BoundedSemaphore(compiles_at_once())

    # -- the stages, in order ------------------------------------------------------------
    def validate(self) -> int:
        """Render every probe for every host and parse each distinct script; no host is
        contacted. Returns how many scripts were parsed."""
        return check_scripts(self.manifest, self.hosts, self.extra_vars)

    def connect(self, spares: bool = False) -> dict[str, tuple[Host, HostFacts]]:
        """Connect, ship the agent and gather facts (and kernel symbols when a probe
        needs them); the hosts that failed are outcomes already. ``spares``: a run
        follows, so the first hosts' agents are started now (Fleet.connect)."""
        if self.record and self.recorder is None:
            self.recorder = RunRecorder(self.run_id, self.manifest)
        self._phase(f"connecting to {len(self.hosts)} host(s)…")
        return self._in_background(lambda: self._connect(spares)) or {}

    def plan(self, connected: Mapping[str, tuple[Host, HostFacts]]) -> Plan:
        """Render each probe for each connected host and group them into modules; a build
        root a kernel needs is made (or its headers fetched) here, with progress shown."""
        return self._in_background(
            lambda: make_plan(self.manifest, connected, self.builder, self.extra_vars)
        ) or Plan(jobs=())

    def build(self, plan: Plan) -> Plan:
        """Compile the modules not cached, in parallel; failures stay with their jobs."""
        todo = [job for job in plan.jobs if not job.cached]
        if not todo or self.interrupted:
            return plan
        self._phase(f"compiling {len(todo)} module(s) with stap…")

        def progress(job: ModuleJob, state: str) -> None:
            self._notes.append(lambda: self.listener.build(job, state))

        return self._in_background(lambda: build_plan(plan, self.builder, progress)) or plan

    def run(self, plan: Plan) -> None:
        """Run the plan on the connected hosts under the manifest's rollout policy."""
        if self.interrupted or not plan.jobs:
            return
        if self.recorder is not None:
            self.recorder.plan(plan)
        self._phase("running")
        engine = self.engine
        if engine is None:
            self._in_background(lambda: self.fleet.run(plan))
        else:
            self._in_background(lambda: engine.run(plan))

    @property
    def streams(self) -> bool:
        """Whether apply streams the hosts (``stream``): always, but for an engine's run,
        whose workers each take a slice of one plan made first."""
        return self.engine is None

    def stream(self, plan_for: Callable[[Host, HostFacts], Plan] | None = None) -> None:
        """Connect, plan and run each host in one go (Fleet.stream), by default with its
        plan made and built here (``plan_for`` stands in for that, given a host and its
        facts); the plan is recorded once every host has ended."""
        if self.record and self.recorder is None:
            self.recorder = RunRecorder(self.run_id, self.manifest)
        if self.interrupted:  # before any host was reached: each is skipped
            self.fleet.stop.set()
        self._phase(f"connecting to and running on {len(self.hosts)} host(s), "
                    f"{self.fleet.at_once} at once…")
        make = plan_for or self._plan_host

        def planned(host: Host, facts: HostFacts) -> Plan:
            plan = make(host, facts)
            with self._builds_lock:
                self._plans.append(plan)
            return plan

        try:
            self._in_background(lambda: self.fleet.stream(self.hosts, planned))
        finally:
            if self.recorder is not None and self._plans:
                self.recorder.plan(merge_plans(self._plans))

    def _plan_host(self, host: Host, facts: HostFacts) -> Plan:
        """One host's plan (its symbols read first if a probe needs them), every module
        in it looked up in the cache and built if not there: once, however many hosts
        wait for it."""
        connected = gather_symbol_maps(self.manifest, {host.name: (host, facts)},
                                       self.fleet.read_file, self.builder)
        with self._planning:
            planned = make_plan(self.manifest, connected, self.builder, self.extra_vars,
                                look_up=False)
        return Plan(jobs=tuple(self._built(job) for job in planned.jobs))

    def _built(self, job: ModuleJob) -> ModuleJob:
        if job.error:
            return job
        with self._builds_lock:
            build = self._builds.get(job.spec.key)
            first = build is None
            if build is None:
                build = self._builds[job.spec.key] = Future()
        if first:
            def progress(built: ModuleJob, state: str) -> None:
                # the hosts it serves are those of its kernel still to come: none named
                shown = replace(built, hosts=())
                self._notes.append(lambda: self.listener.build(shown, state))

            try:
                if (artifact := self.builder.cached(job.spec)) is not None:
                    build.set_result(replace(job, artifact=artifact))
                else:
                    with self._compiles:
                        build.set_result(build_job(job, self.builder, progress))
            except BaseException as exc:  # a controller fault: every host waiting gets it
                build.set_exception(exc)
        built = build.result()
        return replace(job, artifact=built.artifact, error=built.error)

    def finish(self, error: BaseException | None = None) -> Run:
        """Close every connection, give each host not yet ended its outcome, send the
        run to the manifest's sinks and finish the record: always the last stage,
        whatever happened before. A sink that fails is a warning of the run."""
        self._close()
        self.fleet.settle()
        self._deliver_waiting()
        self.listener.phase("interrupted" if self.interrupted else "done")
        run = Run(id=self.run_id, outcomes=tuple(self.fleet.outcomes),
                  interrupted=self.interrupted, by_signal=self._signal,
                  fatal_exit=_exit_code(error), lines=dict(self._lines),
                  aggregates=self._aggregator.result(),
                  difference=self._difference(complete=error is None and not self.interrupted))
        if self.recorder is not None:
            if self.manifest.output.sinks:
                from stapctl.sinks import deliver  # with http.client and ssl: only when used

                self.listener.phase(f"sending to {len(self.manifest.output.sinks)} sink(s)…")
                warnings = deliver(run, self.manifest)
                for warning in warnings:
                    self.listener.note(warning)
                run = replace(run, warnings=tuple(warnings))
            if self.fleet.detached:
                self.recorder.detached(self.fleet.detached)
            self.recorder.finish(run)
            for warning in self.recorder.warnings:
                self.listener.note(f"run record: {warning}")
        return run

    def list_probes(self, pattern: str, connected: Mapping[str, tuple[Host, HostFacts]],
                    with_vars: bool = False) -> ProbeListing:
        """stap's probe listing for ``pattern`` on the connected hosts' kernels (see
        stapctl.probes); connections may be closed already, the facts are all it needs."""
        releases = {facts.release for _, facts in connected.values()}
        self._phase(f"asking stap for {pattern} on {len(releases)} kernel(s)…")
        listing = self._in_background(
            lambda: list_probes(pattern, connected, self.builder, with_vars))
        return listing or ProbeListing(pattern=pattern, points=(), kernels={})

    def apply(self) -> Run:
        """Every stage, then the record: the run as it ended, interrupted or not. An
        error (bad input found on the way) is recorded and then raised."""
        error: BaseException | None = None
        try:
            if self.streams:
                self.stream()
            else:
                self.run(self.build(self.plan(self.connect(spares=True))))
        except BaseException as exc:  # noqa: BLE001 - recorded, then raised
            error = exc
        run = self.finish(error)
        if error is not None:
            raise error
        return run

    def interrupt(self, signum: int = signal.SIGINT) -> None:
        """Ask the run to stop; safe to call from a signal handler. The first asks every
        host to stop cleanly (EXIT, drain, unload) and lets the run finish; the second
        cuts the connections (the agents unload on their own), waits a moment for the
        hosts cut off, and ends the stage; a third ends it at once."""
        if self._interrupts == 0:
            self._signal = int(signum)
        self._interrupts += 1

    @property
    def interrupted(self) -> bool:
        return self._interrupts > 0

    @property
    def outcomes(self) -> list[HostOutcome]:
        return self.fleet.outcomes

    def _baseline(self, wanted: str) -> dict[str, Any] | None:
        """The history row of the run to compare with; checked before anything runs."""
        from stapctl import history
        if wanted == "last":
            try:
                return history.previous_run(self.manifest.name, before=self.run_id)
            except HistoryError as error:  # the run still goes, and is recorded as it can
                self.listener.note(f"not compared with a baseline: {error}")
                self._compare = False
                return None
        try:
            row = history.find_run(wanted)
        except StapctlError as error:
            raise UsageError(f"--baseline: {error} (`stapctl runs list` shows the runs)") \
                from None
        if row["name"] != self.manifest.name:
            raise UsageError(f"--baseline: run {row['id']} is of the manifest '{row['name']}',"
                             f" not '{self.manifest.name}': give a run of the same manifest")
        return row

    def _difference(self, complete: bool) -> Difference | None:
        """This run's output against the baseline's, from both run folders; a comparison
        that cannot be made is a note, never the run's failure. A run cut short is not
        compared: what it did not get to print would show as removed."""
        if not self._compare or self.recorder is None:
            return None
        if not complete:
            self.listener.note("not compared with a baseline: the run did not complete")
            return None
        if self.baseline is None:
            self.listener.note(f"no earlier run of {self.manifest.name} to compare with: "
                               "this run is the baseline of the next")
            return None
        try:
            baseline_folder = run_folder(self.baseline)
            hosts = {o.host for o in self.fleet.outcomes} | set(recorded_hosts(baseline_folder))
            many = self.manifest.labels_output or recorded_many_probes(baseline_folder)
            return compare(self.run_id, self.recorder.dir, self.baseline["id"],
                           baseline_folder, hosts, self.manifest.diff, many)
        except StapctlError as error:
            self.listener.note(f"cannot compare with run {self.baseline['id']}: {error}")
            return None

    def _connect(self, spares: bool) -> dict[str, tuple[Host, HostFacts]]:
        """Through the engine, if any: its workers connect, and read the hosts' files."""
        if self.engine:
            connected, read_file = self.engine.connect(self.hosts), self.engine.read_file
        else:
            connected, read_file = self.fleet.connect(self.hosts, spares), self.fleet.read_file
        if not connected or self.fleet.stop.is_set():
            return {}
        return gather_symbol_maps(self.manifest, connected, read_file, self.builder)

    def _close(self) -> None:
        self.fleet.close()
        if self.engine is not None:
            self.engine.close()

    def _cut(self) -> None:
        """The second interrupt: every connection cut, here or on the engine's workers."""
        self.fleet.close()
        if self.engine is not None:
            self.engine.cut()

    def _phase(self, text: str) -> None:
        self._notes.append(lambda: self.listener.phase(text))

    def _note(self, text: str) -> None:
        self._notes.append(lambda: self.listener.note(text))

    # -- the caller's thread -------------------------------------------------------------
    def _in_background(self, work: Callable[[], T]) -> T | None:
        """Run ``work`` in a thread while this one delivers its events and watches for
        interrupts; returns its value (None when the run was cut short), re-raises its
        error."""
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = work()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = exc
            finally:
                self.channel.end_stage()

        self.channel.consumer = threading.get_ident()
        self.channel.start_stage()
        worker = threading.Thread(target=target, name="stapctl-run", daemon=True)
        worker.start()
        handled = 0
        forced_at: float | None = None
        self._deliver_notes()  # the stage's phase is shown as it starts, not 0.2 s on
        while not self.channel.stage_over:
            events = self.channel.take(timeout=0.2)
            self._deliver_notes()
            self._deliver(events)
            self.listener.tick()
            if self._interrupts > handled:
                handled = self._interrupts
                self.listener.interrupted(handled, self._signal)
                if handled == 1:
                    self.fleet.stop.set()
                elif handled == 2:
                    self._cut()
                    forced_at = time.monotonic()
                else:
                    break
            if forced_at is not None and time.monotonic() > forced_at + FORCE_GRACE:
                break
        self._deliver_waiting()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _deliver_waiting(self) -> None:
        self._deliver_notes()
        while events := self.channel.take(timeout=0):
            self._deliver(events)

    def _deliver_notes(self) -> None:
        while self._notes:
            self._notes.popleft()()

    def _deliver(self, events: list[Event]) -> None:
        if self.recorder is not None and events:
            self.recorder.events(events)
        for event in events:
            if event.kind == "output":
                self._lines[(event.host, event.probe)] += 1
                self._aggregator.feed(event)
            self.listener.event(event)


def _exit_code(error: BaseException | None) -> int | None:
    if error is None:
        return None
    return error.exit_code if isinstance(error, StapctlError) else 1
