"""Fan-out over Celery workers on a Redis broker (`--engine celery+redis://HOST:PORT/DB`).

With an engine the controller never connects to a host: it cuts the hosts into slices,
each slice one Celery task, and a `stapctl worker` anywhere that reaches the broker and
the slice's hosts serves it with the same Fleet a local run uses, one connection per host
from facts to run. The run goes in three steps over the broker:

1. connect: each worker claims its slice's hosts, connects, ships the agent and gathers
   facts; it sends each host's facts (checked on the controller as a target's own are)
   or its outcome. The controller waits for every host's, plans and compiles as for a
   local run; a host's file it needs (kernel symbols) is read by the worker holding the
   host's connection, on request;
2. plan: the controller stores the modules and publishes the plan to every worker of
   the run (the run's control stream);
3. run: the controller rolls the run out batch by batch under the manifest's policy, as
   a local run does (`serial`, the canary, max_fail_percentage over the whole run): it
   releases a batch with a `go` message, and the next only when every host of it has
   ended; then `end`.

What crosses the broker, and why it can be trusted:

- a task is a pickled ``SliceWork`` with an HMAC-SHA256 of it under the shared secret
  (``Config.secret()``); a worker checks the HMAC before unpickling anything and refuses
  a task that is unsigned, tampered with or older than a day. The controller's messages
  (the plan, batches, file requests, `end`) are signed the same way;
- modules are stored under ``stapctl:module:SHA256``; a worker keeps one only if its
  bytes hash to that name, and caches it by that name;
- every message a worker sends back (facts, events, outcomes, files, the slice's start
  and end) goes into the run's Redis stream signed the same way; the controller drops
  anything unsigned, and checks hosts, facts and kinds as it would a target's.

Stops and faults: a stop (first interrupt) is a key the workers watch, as is a cut (the
second: they close their hosts' connections and the agents unload on their dead-man).
Each worker's slice holds a lease key it renews every second, and the controller one the
workers wait on (a worker whose controller went away ends its slice). Hosts are claimed
one by one in Redis before they are connected, and marked started there (only while
still claimed) before anything is sent to them, so a task Celery hands out again (late
acknowledgement, rejected when its worker is lost) never serves a host twice. When a
slice's lease lapses, the hosts its worker had started and not ended fail as
``worker-lost``; the others lose its claim (atomically with that check, so it can no
longer start them) and go to another worker once, as a new slice. A new slice after the
plan connects its hosts, runs them under the batches already released (a host whose
kernel is not the one the plan built for fails as ``bad-facts``) and waits for the next.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import math
import pickle
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args
from urllib.parse import urlsplit

import platformdirs

from stapctl.agent import checked_facts
from stapctl.cache import replace_file
from stapctl.config import load_config
from stapctl.errors import BadFactsError, StapctlError, UsageError
from stapctl.execute import Fleet, RunOptions
from stapctl.models import (
    Event,
    EventKind,
    FailureKind,
    Host,
    HostFacts,
    HostOutcome,
    Manifest,
    OutcomeStatus,
)
from stapctl.plan import Plan

if TYPE_CHECKING:  # imported when used: a local run does not pay for them
    import celery
    import redis

SCHEME = "celery+redis://"
TASK = "stapctl.slice"
PREFIX = "stapctl:"
MODULE_TTL = 7 * 86400  # seconds a module stays on the broker after its last run
RUN_TTL = 86400  # a run's keys, and the age past which a task is refused
LEASE = 6.0  # seconds a worker's slice lives on the broker without a renewal
RENEW = 1.0  # how often a worker renews its lease and looks for a stop
NO_WORKER_NOTE = 5.0  # seconds with no worker serving the run before it is said
FILE_WAIT = 120.0  # seconds the controller waits for a host's file from its worker
STREAM_BOUND = 10_000  # messages waiting in a run's stream before workers wait
BATCH = 500  # messages sent, or read, at once
# a worker starts a host only while it holds the host's claim; 1 if it may start it
START = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('set', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[2]) then return 1 end
return 0
"""
# a lost execution's host: another's (0), started by it (STARTED), or taken from it
HAND_ON = """
local claim = redis.call('get', KEYS[1])
if claim and claim ~= ARGV[1] then return 0 end
if redis.call('exists', KEYS[2]) == 1 then return 1 end
redis.call('del', KEYS[1])
return 2
"""
STARTED, HANDED_ON = 1, 2
EVENT_KINDS = frozenset(get_args(EventKind))
STATUSES = frozenset(get_args(OutcomeStatus))

log = logging.getLogger(__name__)


class EngineError(StapctlError):
    """The engine failed the run (the broker went away); every host still ends."""


class Refused(Exception):
    """A task or message that is unsigned, tampered with or stale."""


def broker_url(engine: str) -> str:
    """The Redis URL of an engine setting; anything but celery+redis://HOST:PORT/DB is
    the user's mistake."""
    if not engine.startswith(SCHEME):
        raise UsageError(f"engine {engine!r}: the engine is celery+redis://HOST:PORT/DB")
    url = "redis://" + engine[len(SCHEME):]
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as error:
        raise UsageError(f"engine {engine!r}: {error}") from None
    if not parts.hostname or parts.path.strip("/") and not parts.path.strip("/").isdigit():
        raise UsageError(f"engine {engine!r}: the engine is celery+redis://HOST:PORT/DB "
                         "(DB a number)")
    return url


def celery_app(url: str) -> celery.Celery:
    """The Celery application of one broker, with the slice task registered."""
    from celery import Celery

    app = Celery("stapctl", broker=url, set_as_current=False)
    app.conf.update(
        task_serializer="json", accept_content=["json"], task_ignore_result=True,
        task_acks_late=True, task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False)
    app.task(name=TASK, bind=True)(serve_slice)
    return app


def broker(url: str) -> redis.Redis:
    import redis as redis_module

    return redis_module.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)


# -- signatures --------------------------------------------------------------------------
def signature(secret: bytes, data: bytes) -> str:
    return hmac.new(secret, data, hashlib.sha256).hexdigest()


def checked(secret: bytes, data: bytes, signed: str) -> bytes:
    if not hmac.compare_digest(signature(secret, data), signed):
        raise Refused("its signature does not match (unsigned, tampered with, or another "
                      "secret)")
    return data


@dataclass(frozen=True)
class SliceWork:
    """One task: some hosts of one run, and what they run."""

    run_id: str
    slice_id: str
    manifest: Manifest
    options: RunOptions
    hosts: tuple[Host, ...]
    order: tuple[str, ...]  # every host of the run, in order: their remote ids
    issued: float = field(default_factory=time.time)


def seal(secret: bytes, work: SliceWork) -> tuple[str, str]:
    """The task's arguments: the work, and its signature."""
    data = pickle.dumps(work)
    return base64.b64encode(data).decode(), signature(secret, data)


def unseal(secret: bytes, payload: object, signed: object) -> SliceWork:
    """The work of a task whose signature checks, else Refused; nothing is unpickled
    before the check."""
    if not isinstance(payload, str) or not isinstance(signed, str):
        raise Refused("it is not a stapctl slice")
    try:
        data = base64.b64decode(payload, validate=True)
    except ValueError:
        raise Refused("its payload is not base64") from None
    work = pickle.loads(checked(secret, data, signed))  # noqa: S301 - signed by the controller
    if not isinstance(work, SliceWork):
        raise Refused("it is not a stapctl slice")
    if abs(time.time() - work.issued) > RUN_TTL:
        raise Refused("it was issued more than a day ago")
    return work


# -- the broker's keys -------------------------------------------------------------------
def module_key(sha256: str) -> str:
    return f"{PREFIX}module:{sha256}"


@dataclass(frozen=True)
class RunKeys:
    run_id: str

    def key(self, what: str) -> str:
        return f"{PREFIX}run:{self.run_id}:{what}"

    @property
    def stream(self) -> str:
        return self.key("events")

    @property
    def stop(self) -> str:
        return self.key("stop")

    @property
    def over(self) -> str:
        return self.key("over")

    @property
    def control(self) -> str:  # the controller's messages to every worker of the run
        return self.key("control")

    @property
    def cut(self) -> str:  # the second interrupt: workers cut their hosts' connections
        return self.key("cut")

    @property
    def controller(self) -> str:  # the controller's lease: workers wait while it lives
        return self.key("controller")

    def claim(self, host: str) -> str:
        return self.key(f"claim:{host}")

    def started(self, host: str) -> str:
        return self.key(f"started:{host}")

    def lease(self, execution: str) -> str:
        return self.key(f"lease:{execution}")


# -- the controller's side ---------------------------------------------------------------
@dataclass
class Slice:
    id: str
    hosts: list[str]
    again: bool = False  # the unstarted hosts of a slice whose worker went away
    running: dict[str, str] = field(default_factory=dict)  # execution → worker


@dataclass
class CeleryEngine:
    """Serves runs on Celery workers; see the module's docstring."""

    url: str  # the broker's redis:// URL
    secret: bytes
    slices: int | None = None  # how many slices; None: one per `forks` hosts

    def begin(self, fleet: Fleet, note: Callable[[str], None]) -> Dispatch:
        return Dispatch(self, fleet, note)


class Dispatch:
    """One run handed out in slices. A thread of its own (the pump) feeds the workers'
    messages into the run's Fleet, keeps the controller's lease and passes a stop on;
    the stages wait on what it has taken in."""

    def __init__(self, engine: CeleryEngine, fleet: Fleet, note: Callable[[str], None]) -> None:
        self.engine = engine
        self.fleet = fleet
        self.note = note
        self.keys = RunKeys(fleet.run_name)
        self.redis = broker(engine.url)
        self.app = celery_app(engine.url)
        self.slices: dict[str, Slice] = {}
        self.hosts: dict[str, Host] = {}
        self.facts: dict[str, HostFacts] = {}
        self.owner: dict[str, str] = {}  # host → the execution that connected it
        self.lost: set[str] = set()  # executions whose worker went away
        self.reading: set[str] = set()  # the file requests still waited for
        self.files: dict[str, bytes | str] = {}  # request → the file, or why not
        self.noted = False  # whether the run was said to wait for a worker
        self.changed = threading.Condition()
        self.error: EngineError | None = None
        self.closing = threading.Event()
        self.pump: threading.Thread | None = None

    # -- the stages ----------------------------------------------------------------------
    def connect(self, hosts: Sequence[Host]) -> dict[str, tuple[Host, HostFacts]]:
        """Hand the hosts out in slices; wait until each has its facts or its outcome
        (or the run stops). The workers connect: this process never does."""
        self.hosts = {host.name: host for host in hosts}
        names = list(self.hosts)
        self.fleet.hosts += names
        count = self.engine.slices or math.ceil(len(names) / max(1, self.fleet.strategy.forks))

        def hand_out() -> None:
            self.redis.set(self.keys.controller, "1", px=int(LEASE * 1000))
            for piece in split(names, count):
                self._send(piece, again=False)

        self._guard(hand_out)
        self.pump = threading.Thread(target=self._pump, name="stapctl-engine", daemon=True)
        self.pump.start()
        self._wait_for_workers(lambda: all(name in self.facts or self.fleet.has_ended(name)
                                           for name in names))
        with self.changed:
            return {name: (self.hosts[name], self.facts[name]) for name in names
                    if name in self.facts}

    def read_file(self, name: str, path: str, limit: int) -> bytes:
        """A file of a connected host's, read by the worker that holds its connection."""
        request = secrets.token_hex(8)
        with self.changed:
            self.reading.add(request)
        self._control({"t": "read", "id": request, "host": name, "path": path,
                       "limit": limit})
        deadline = time.monotonic() + FILE_WAIT
        self._wait(lambda: request in self.files or self.owner.get(name) in self.lost
                   or time.monotonic() > deadline, None)
        with self.changed:
            self.reading.discard(request)
            answer = self.files.pop(request, None)
        if isinstance(answer, bytes):
            return answer
        raise StapctlError(f"{path}: {answer or 'its worker went away or did not answer'}")

    def run(self, plan: Plan) -> None:
        """Publish the plan, then release the run's batches one by one: each only once
        every host of the one before has its outcome, the rollout policy checked over the
        whole run as a local run does; then wait for every slice to end."""
        self._guard(lambda: self._store_modules(plan))
        self._control({"t": "plan", "plan": base64.b64encode(pickle.dumps(plan)).decode()})
        with self.changed:
            names = [name for name in self.fleet.hosts if name in self.facts]

        def release(batch: list[str]) -> None:
            # every host of the batch ends, wherever it runs: on the worker that connected
            # it, or on the one its slice was handed to when that worker went away
            self._control({"t": "go", "hosts": batch})
            self._wait_for_workers(lambda: all(self.fleet.has_ended(name) for name in batch))

        self.fleet.roll_out(names, release)
        self._control({"t": "end"})
        self._wait(lambda: not any(piece.running for piece in self.slices.values()), None)

    def _store_modules(self, plan: Plan) -> None:
        for job in plan.jobs:
            if job.artifact is None or job.error:
                continue
            key = module_key(job.artifact.sha256)
            if not self.redis.expire(key, MODULE_TTL):
                self.redis.set(key, job.artifact.path.read_bytes(), ex=MODULE_TTL)

    def cut(self) -> None:
        with contextlib.suppress(Exception):  # the broker's loss is reported already
            self.redis.set(self.keys.cut, "1", ex=RUN_TTL)

    def close(self) -> None:
        """The run is over: the workers still waiting end their slices."""
        if self.pump is None:
            return
        with contextlib.suppress(Exception):  # the broker's loss is reported already
            self.redis.set(self.keys.over, "1", ex=RUN_TTL)
            self._control({"t": "end"})
        self.closing.set()
        self.pump.join()
        self.pump = None
        with contextlib.suppress(Exception):
            self.redis.delete(self.keys.stream, self.keys.control)

    # -- waiting on the pump -------------------------------------------------------------
    def _wait_for_workers(self, done: Callable[[], bool]) -> None:
        """Wait until ``done`` or a stop; said once when no worker serves any slice of the
        run for a while (none started yet, or every one went away)."""
        idle_from = time.monotonic()
        while not self._wait(lambda: self.fleet.stop.is_set() or done(), RENEW):
            with self.changed:
                serving = any(piece.running for piece in self.slices.values())
            if serving:
                idle_from = time.monotonic()
            elif not self.noted and time.monotonic() - idle_from > NO_WORKER_NOTE:
                self.noted = True
                self.note(f"waiting for a worker on {self.engine.url}: none is serving this "
                          f"run's slices; start one with `stapctl worker --engine "
                          f"{SCHEME}{self.engine.url.removeprefix('redis://')}`")

    def _wait(self, done: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until ``done`` (checked under the lock) or ``timeout``; whether it is. The
        broker's loss fails the run."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.changed:
            while not done():
                if self.error is not None:
                    raise self.error
                left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
                if left <= 0:
                    return False
                self.changed.wait(left)
            return True

    def _guard(self, work: Callable[[], object]) -> None:
        import redis as redis_module

        try:
            work()
        except redis_module.RedisError as error:
            raise self._broken(error) from None

    def _broken(self, error: Exception) -> EngineError:
        return EngineError(f"the broker {self.engine.url} cannot be reached or went away "
                           f"({error}): the workers stop their hosts, whose agents unload")

    def _control(self, message: dict[str, Any]) -> None:
        """A signed message to every worker of the run."""
        data = json.dumps(message).encode()
        self._guard(lambda: (
            self.redis.xadd(self.keys.control, {"m": data, "s": signature(
                self.engine.secret, data)}),
            self.redis.expire(self.keys.control, RUN_TTL)))

    def _send(self, hosts: list[str], again: bool) -> None:
        slice_id = f"{len(self.slices) + 1}"
        work = SliceWork(run_id=self.keys.run_id, slice_id=slice_id,
                         manifest=replace(self.fleet.manifest, document=None),
                         options=self.fleet.options,
                         hosts=tuple(self.hosts[name] for name in hosts),
                         order=tuple(self.fleet.hosts))
        self.slices[slice_id] = Slice(slice_id, hosts, again=again)
        self.app.send_task(TASK, args=seal(self.engine.secret, work))

    # -- the pump ------------------------------------------------------------------------
    def _pump(self) -> None:
        import redis as redis_module

        last, stop_sent, checked_at = "0-0", False, 0.0
        try:
            while not self.closing.is_set():
                if time.monotonic() - checked_at > RENEW:
                    checked_at = time.monotonic()
                    self.redis.set(self.keys.controller, "1", px=int(LEASE * 1000))
                    last = self._check_leases(last)
                if self.fleet.stop.is_set() and not stop_sent:
                    self.redis.set(self.keys.stop, "1", ex=RUN_TTL)
                    stop_sent = True
                last, _ = self._read(last, block=200)
        except redis_module.RedisError as error:
            with self.changed:
                self.error = self._broken(error)
                self.changed.notify_all()

    def _read(self, last: str, block: int | None) -> tuple[str, bool]:
        """Take the messages after ``last`` (waiting up to ``block`` ms, None: not at all);
        the new last one, and whether there were any."""
        entries: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] = \
            self.redis.xread({self.keys.stream: last}, count=BATCH, block=block)  # type: ignore[assignment]
        with self.changed:
            for _, messages in entries:
                for message_id, fields in messages:
                    last = message_id.decode()
                    self._take(fields)
            self.changed.notify_all()
        if entries:
            self.redis.xtrim(self.keys.stream, minid=last)
        return last, bool(entries)

    def _take(self, fields: dict[bytes, bytes]) -> None:
        try:
            data = checked(self.engine.secret, fields.get(b"m", b""),
                           fields.get(b"s", b"").decode(errors="replace"))
            message = json.loads(data)
            self._apply(message)
        except (Refused, ValueError, KeyError, TypeError) as error:
            log.warning("dropped a message in run %s's stream: %s", self.keys.run_id, error)

    def _apply(self, message: dict[str, Any]) -> None:
        kind = message["t"]
        if kind in ("begin", "end"):
            piece = self.slices[str(message["slice"])]
            execution = str(message["execution"])
            if kind == "begin":
                piece.running[execution] = str(message["worker"])
            else:
                piece.running.pop(execution, None)
            return
        host = str(message["host"])
        if host not in self.hosts:
            raise ValueError(f"host {host!r} is not in this run")
        if kind == "facts":
            self._facts(host, message)
        elif kind == "file":
            # a slice handed on replays the run's requests: answers nobody waits for are
            # dropped, not kept (a kallsyms is megabytes)
            if str(message["id"]) in self.reading:
                self.files[str(message["id"])] = base64.b64decode(message["data"]) \
                    if message.get("data") is not None else str(message["error"])
        elif kind == "event" and message["kind"] in EVENT_KINDS:
            self.fleet.emit(Event(host=host, kind=message["kind"], probe=str(message["probe"]),
                                  text=str(message["text"]), time=float(message["time"])))
        elif kind == "outcome" and message["status"] in STATUSES:
            stats = {str(k): int(v) for k, v in dict(message["stats"]).items()}
            self.fleet.record(HostOutcome(
                host=host, probe=str(message["probe"]), status=message["status"],
                kind=FailureKind.from_agent(message["kind"]) if message["kind"] else None,
                message=str(message["message"]), stats=stats, worker=str(message["worker"])))
        else:
            raise ValueError(f"unknown message {kind!r}")

    def _facts(self, host: str, message: dict[str, Any]) -> None:
        """A host's facts as its worker read them, checked as a target's own are."""
        execution = str(message["execution"])
        if execution in self.lost or self.fleet.has_ended(host):
            return
        try:
            facts = checked_facts(str(message["release"]), str(message["arch"]))
        except BadFactsError as error:
            self.fleet.fail_all(host, "failed", error.kind, str(error))
            return
        self.facts[host] = facts
        self.owner[host] = execution
        self.fleet.emit(Event(host=host, kind="connected", text=f"{facts.release} "
                              f"{facts.arch}", time=time.time()))

    def _check_leases(self, last: str) -> str:
        """Hand on the slices whose lease lapsed. A worker sends its slice's end before
        it drops the lease, so the stream is read to its end first: a slice that ended
        in the meantime is not taken for lost."""
        with self.changed:
            running = [(piece, execution) for piece in self.slices.values()
                       for execution in piece.running]
        lapsed = [(piece, execution) for piece, execution in running
                  if not self.redis.exists(self.keys.lease(execution))]
        more = bool(lapsed)
        while more:
            last, more = self._read(last, block=None)
        for piece, execution in lapsed:
            worker = piece.running.pop(execution, None)
            if worker is not None:
                with self.changed:
                    self._lost(piece, execution, worker)
                    self.changed.notify_all()
        return last

    def _lost(self, piece: Slice, execution: str, worker: str) -> None:
        """A worker went away in the middle of a slice: the hosts it had started and not
        ended fail; the others it held go to another worker (once), unless the run stops.
        Before the plan it had started none."""
        self.lost.add(execution)
        held = [host for host in piece.hosts if not self.fleet.has_ended(host)]
        pipe = self.redis.pipeline(transaction=False)
        for host in held:
            pipe.eval(HAND_ON, 2, self.keys.claim(host), self.keys.started(host), execution)
        fates = dict(zip(held, pipe.execute(), strict=True))
        for host in held:
            if fates[host] == STARTED:
                self.fleet.fail_all(host, "failed", FailureKind.WORKER_LOST,
                                    f"worker {worker} went away while serving it")
        handed = [host for host in held if fates[host] == HANDED_ON]
        for host in handed:
            self.facts.pop(host, None)
            self.owner.pop(host, None)
        if not handed or self.fleet.stop.is_set():
            return
        if piece.again:
            for host in handed:
                self.fleet.fail_all(host, "failed", FailureKind.WORKER_LOST,
                                    f"not served: its workers went away twice ({worker})")
            return
        self._send(handed, again=True)


def split(names: list[str], count: int) -> Iterable[list[str]]:
    """``names`` in ``count`` slices at most, in order, of sizes differing by one."""
    count = max(1, min(count, len(names)))
    size, extra = divmod(len(names), count)
    start = 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        if end > start:
            yield names[start:end]
        start = end


# -- the worker's side -------------------------------------------------------------------
def serve_slice(task: Any, payload: object, signed: object) -> str:
    """The Celery task: check the work's signature, then run its hosts."""
    secret = load_config().secret()
    try:
        work = unseal(secret, payload, signed)
    except Refused as error:
        log.error("stapctl: refused a task: %s", error)
        return "refused"
    worker = str(task.request.hostname or socket.gethostname())
    runner = SliceRunner(broker(task.app.conf.broker_url), secret, work, worker)
    # the task ends once its hosts are connected: a worker lost before that has its task
    # handed to another (late acknowledgement), and the slot goes to the next slice,
    # since the controller plans only when every slice has connected its hosts
    threading.Thread(target=runner.run, name=f"stapctl-slice-{work.slice_id}").start()
    runner.connected.wait()
    return "served"


class Publisher:
    """A slice's messages to the run's stream, signed, sent in batches by a thread of
    its own. Senders wait while too much is queued, and the thread waits while the
    stream holds STREAM_BOUND unread messages, so a slow controller costs no memory."""

    def __init__(self, client: redis.Redis, secret: bytes, stream: str,
                 on_broken: Callable[[], None]) -> None:
        self._redis = client
        self._secret = secret
        self._stream = stream
        self._on_broken = on_broken
        self._queue: deque[bytes] = deque()
        self._ready = threading.Condition()
        self._closing = False
        self.broken = False
        self._thread = threading.Thread(target=self._send_loop, name="stapctl-publish",
                                        daemon=True)
        self._thread.start()

    def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode()
        with self._ready:
            self._ready.wait_for(lambda: len(self._queue) < STREAM_BOUND or self.broken)
            if not self.broken:
                self._queue.append(data)
                self._ready.notify_all()

    def close(self) -> None:
        with self._ready:
            self._closing = True
            self._ready.notify_all()
        self._thread.join()

    def _send_loop(self) -> None:
        import redis as redis_module

        while True:
            with self._ready:
                self._ready.wait_for(lambda: bool(self._queue) or self._closing)
                if not self._queue:
                    return
                batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
                self._ready.notify_all()
            try:
                while self._redis.xlen(self._stream) > STREAM_BOUND:
                    time.sleep(0.05)
                pipe = self._redis.pipeline(transaction=False)
                for data in batch:
                    pipe.xadd(self._stream, {"m": data, "s": signature(self._secret, data)})
                pipe.execute()
            except redis_module.RedisError as error:
                log.error("stapctl: the broker went away (%s): stopping the slice", error)
                with self._ready:
                    self.broken = True
                    self._queue.clear()
                    self._ready.notify_all()
                self._on_broken()
                return


class SliceFleet(Fleet):
    """A Fleet whose ended hosts are sent to the controller as outcomes, and which runs a
    host only once it is marked started on the broker (``begins``)."""

    publisher: Publisher
    worker: str
    begins: Callable[[str], bool]

    def report(self, outcome: HostOutcome) -> None:
        message = {"t": "outcome", **outcome_fields(outcome), "worker": self.worker}
        self.publisher.send(message)

    def _run_host(self, name: str, plan: Plan) -> None:
        if self.begins(name):
            super()._run_host(name, plan)


def outcome_fields(outcome: HostOutcome) -> dict[str, Any]:
    return {"host": outcome.host, "probe": outcome.probe, "status": outcome.status,
            "kind": str(outcome.kind) if outcome.kind else None,
            "message": outcome.message, "stats": dict(outcome.stats)}


class SliceRunner:
    """One execution of one slice on a worker: connect its hosts and report their facts,
    read their files on request, then run each batch the controller releases, on the
    same connections."""

    def __init__(self, client: redis.Redis, secret: bytes, work: SliceWork,
                 worker: str) -> None:
        self.redis = client
        self.secret = secret
        self.work = work
        self.keys = RunKeys(work.run_id)
        self.worker = worker
        self.execution = secrets.token_hex(8)
        self.done = threading.Event()
        self.connected = threading.Event()  # set once its hosts are connected, or it ended
        self.fleet = SliceFleet(work.manifest, work.options, self._event,
                                run_name=work.run_id)
        self.publisher = Publisher(client, secret, self.keys.stream, self.fleet.stop.set)
        self.fleet.publisher = self.publisher
        self.fleet.worker = worker
        self.fleet.begins = self._begins

    def run(self) -> None:
        if self.redis.exists(self.keys.over, self.keys.stop):
            log.info("stapctl: run %s is over or stopping: slice %s dropped",
                     self.work.run_id, self.work.slice_id)
            self.publisher.close()
            self.connected.set()
            return
        self.redis.set(self.keys.lease(self.execution), self.worker, px=int(LEASE * 1000))
        self._send("begin", worker=self.worker)
        watch = threading.Thread(target=self._watch, name="stapctl-lease", daemon=True)
        watch.start()
        try:
            self.fleet.connect([host for host in self.work.hosts if self._claim(host.name)])
            self.fleet.hosts = list(self.work.order)
            self.connected.set()
            self._follow()
        finally:
            self.connected.set()
            self.fleet.close()
            self._send("end")
            self.publisher.close()
            self.done.set()
            watch.join()
            with contextlib.suppress(Exception):  # the broker's loss is reported already
                self.redis.delete(self.keys.lease(self.execution))

    def _send(self, kind: str, **fields: object) -> None:
        self.publisher.send({"t": kind, "slice": self.work.slice_id,
                             "execution": self.execution, **fields})

    def _event(self, event: Event) -> None:
        if event.kind == "connected":  # the controller checks the facts, then says so
            facts = self.fleet.sessions[event.host].facts
            self.publisher.send({"t": "facts", "host": event.host, "release": facts.release,
                                 "arch": facts.arch, "execution": self.execution})
            return
        self.publisher.send({"t": "event", "host": event.host, "kind": event.kind,
                             "probe": event.probe, "text": event.text, "time": event.time})

    def _begins(self, host: str) -> bool:
        """Mark the host started, before anything is sent to it, if this execution still
        holds it (the controller takes back the unstarted hosts of a worker it found
        gone); whether it does. Synchronous, so a controller never hands on a host this
        execution may have started."""
        import redis as redis_module

        try:
            return bool(self.redis.eval(START, 2, self.keys.claim(host),
                                        self.keys.started(host), self.execution, RUN_TTL))
        except redis_module.RedisError as error:
            log.error("stapctl: the broker went away (%s): stopping the slice", error)
            self.fleet.stop.set()
            return False

    def _claim(self, host: str) -> bool:
        """Whether this execution serves the host: no other one does, and the run is not
        stopping (the controller may have stopped waiting for slices not yet begun)."""
        if self.fleet.stop.is_set() or self.redis.exists(self.keys.stop):
            return False
        return bool(self.redis.set(self.keys.claim(host), self.execution, nx=True,
                                   ex=RUN_TTL))

    def _follow(self) -> None:
        """Do what the controller's messages say until it ends the run or goes away: read
        a host's file, take the plan, run a released batch's hosts of this slice."""
        plan, mine, last = Plan(jobs=()), set[str](), "0-0"
        with ThreadPoolExecutor(max_workers=max(1, self.fleet.strategy.forks)) as readers:
            while self.redis.exists(self.keys.controller):
                for message in self._control(last):
                    last = message.pop("id_")
                    kind = message["t"]
                    if kind == "end":
                        return
                    if kind == "read" and message["host"] in self.fleet.sessions:
                        readers.submit(self._read_file, message)
                    elif kind == "plan":
                        plan, mine = self._plan(message["plan"])
                    elif kind == "go":
                        self.fleet.run_hosts(plan, [str(name) for name in message["hosts"]
                                                    if name in mine])
        log.error("stapctl: the controller of run %s went away: slice %s ends",
                  self.work.run_id, self.work.slice_id)

    def _control(self, last: str) -> list[dict[str, Any]]:
        """The controller's messages after ``last`` (waiting a moment for some); one not
        signed by it is dropped. Each carries its stream id as ``id_``."""
        entries: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] = \
            self.redis.xread({self.keys.control: last}, count=BATCH,  # type: ignore[assignment]
                             block=int(RENEW * 1000))
        messages = []
        for _, received in entries:
            for message_id, fields in received:
                try:
                    data = checked(self.secret, fields.get(b"m", b""),
                                   fields.get(b"s", b"").decode(errors="replace"))
                    messages.append({**json.loads(data), "id_": message_id.decode()})
                except (Refused, ValueError) as error:
                    log.warning("stapctl: dropped a message of run %s: %s",
                                self.work.run_id, error)
        return messages

    def _read_file(self, message: dict[str, Any]) -> None:
        host = str(message["host"])
        try:
            data = self.fleet.read_file(host, str(message["path"]), int(message["limit"]))
            answer: dict[str, object] = {"data": base64.b64encode(data).decode()}
        except StapctlError as error:
            answer = {"error": str(error)}
        except Exception as error:  # noqa: BLE001 - a fault stays this host's answer
            answer = {"error": f"the worker failed ({type(error).__name__}: {error})"}
        self.publisher.send({"t": "file", "id": message["id"], "host": host, **answer})

    def _plan(self, payload: str) -> tuple[Plan, set[str]]:
        """The run's plan (its signature was checked) for the hosts this execution still
        holds, with the modules from this worker's cache; a host whose module cannot be
        had fails that probe, and one whose kernel is not the one its module was built
        for (connected again after its first worker went away) fails."""
        plan = pickle.loads(base64.b64decode(payload))  # noqa: S301 - signed by the controller
        if not isinstance(plan, Plan):
            raise Refused("the plan is not a stapctl plan")
        held = [name for name in self.fleet.sessions]
        claims: list[bytes | None] = self.redis.mget(  # type: ignore[assignment]
            [self.keys.claim(name) for name in held]) if held else []
        mine = {name for name, claim in zip(held, claims, strict=True)
                if claim is not None and claim.decode() == self.execution}
        for job in plan.jobs:
            for name in mine.intersection(job.hosts):
                facts = self.fleet.sessions[name].facts
                if (facts.release, facts.arch) != (job.spec.release, job.spec.arch):
                    self.fleet.fail_all(name, "failed", FailureKind.BAD_FACTS,
                                        f"its kernel is now {facts.release} {facts.arch}, "
                                        f"not the {job.spec.release} {job.spec.arch} the run "
                                        "was planned for: apply again")
        mine = {name for name in mine if not self.fleet.has_ended(name)}
        jobs = []
        for job in plan.jobs:
            hosts = tuple(name for name in job.hosts if name in mine)
            if not hosts:
                continue
            job = replace(job, hosts=hosts)
            if job.artifact is None or job.error:
                jobs.append(job)
                continue
            try:
                path = fetch_module(self.redis, job.artifact.sha256)
            except StapctlError as error:
                for host in job.hosts:
                    self.fleet.record(HostOutcome(host=host, probe=job.probe.name,
                                                  status="failed",
                                                  kind=FailureKind.CONTROLLER_ERROR,
                                                  message=str(error), worker=self.worker))
                continue
            jobs.append(replace(job, artifact=replace(job.artifact, path=path)))
        return Plan(jobs=tuple(jobs)), mine

    def _watch(self) -> None:
        """Renew the lease; pass a stop on, and a cut (the controller's second interrupt:
        every connection closed, the agents unload on their own); a broker gone stops the
        slice cleanly."""
        import redis as redis_module

        cut = False
        while not self.done.wait(RENEW):
            try:
                self.redis.set(self.keys.lease(self.execution), self.worker,
                               px=int(LEASE * 1000))
                stop, cutting = self.redis.mget([self.keys.stop, self.keys.cut])
                if stop is not None:
                    self.fleet.stop.set()
                if cutting is not None and not cut:
                    cut = True
                    self.fleet.close()
            except redis_module.RedisError as error:
                log.error("stapctl: the broker went away (%s): stopping the slice", error)
                self.fleet.stop.set()


def module_cache() -> Path:
    return Path(platformdirs.user_cache_dir("stapctl")) / "modules-by-sha256"


def fetch_module(client: redis.Redis, sha256: str) -> Path:
    """The module whose sha256 is ``sha256``, from this worker's cache or the broker;
    bytes that hash to anything else are never kept."""
    if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
        raise StapctlError(f"module {sha256!r}: not a sha256")
    path = module_cache() / f"{sha256}.ko"
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
        return path
    data: bytes | None = client.get(module_key(sha256))  # type: ignore[assignment]
    if data is None:
        raise StapctlError(f"module {sha256} is not on the broker (expired?)")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise StapctlError(f"module {sha256} on the broker does not match its sha256: "
                           "refused")
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, data)
    return path


def start_worker(url: str, celery_args: list[str]) -> None:
    """Celery's own worker on the broker, its options passed through."""
    celery_app(url).worker_main(["worker", "--loglevel=INFO", *celery_args])
