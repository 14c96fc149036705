"""Fan-out over Celery workers on a Redis broker (`--engine celery+redis://HOST:PORT/DB`).

The controller connects, plans and compiles as for a local run; only the run stage's
fan-out changes: the hosts are cut into slices, each slice is one Celery task, and a
`stapctl worker` anywhere that reaches the broker and the hosts runs it with the same
Fleet a local run uses. What crosses the broker, and why it can be trusted:

- a task is a pickled ``SliceWork`` with an HMAC-SHA256 of it under the shared secret
  (``Config.secret()``); a worker checks the HMAC before unpickling anything and refuses
  a task that is unsigned, tampered with or older than a day;
- modules are stored under ``stapctl:module:SHA256``; a worker keeps one only if its
  bytes hash to that name, and caches it by that name;
- every message a worker sends back (events, outcomes, the slice's start and end) goes
  into the run's Redis stream signed the same way; the controller drops anything
  unsigned, and checks hosts and kinds as it would a target's.

Faults: each worker's slice holds a lease key it renews every second. When a lease
lapses before its slice ended, the hosts that worker had started end failed as
``worker-lost`` (their agents unload on their dead-man once its SSH connections drop)
and the hosts it had not started go to another worker once. Hosts are claimed one by
one in Redis before they are started, so a task Celery hands out again (late
acknowledgement, rejected when its worker is lost) never runs a host twice.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import pickle
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args
from urllib.parse import urlsplit

import platformdirs

from stapctl.config import load_config
from stapctl.errors import StapctlError, UsageError
from stapctl.execute import Fleet, RunOptions
from stapctl.models import (
    Event,
    EventKind,
    FailureKind,
    Host,
    HostOutcome,
    Manifest,
    OutcomeStatus,
)
from stapctl.plan import ModuleJob, Plan

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
STREAM_BOUND = 10_000  # messages waiting in a run's stream before workers wait
BATCH = 500  # messages sent, or read, at once
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
    jobs: tuple[ModuleJob, ...]
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

    def claim(self, host: str) -> str:
        return self.key(f"claim:{host}")

    def lease(self, execution: str) -> str:
        return self.key(f"lease:{execution}")


# -- the controller's side ---------------------------------------------------------------
@dataclass
class Slice:
    id: str
    hosts: list[str]
    again: bool = False  # the unstarted hosts of a lost slice, handed out once more
    running: dict[str, str] = field(default_factory=dict)  # execution → worker
    ended: bool = False


@dataclass
class CeleryEngine:
    """Runs the fan-out of a run on Celery workers; see the module's docstring."""

    url: str  # the broker's redis:// URL
    secret: bytes
    slices: int | None = None  # how many slices; None: one per `forks` hosts

    def run(self, fleet: Fleet, plan: Plan) -> None:
        Dispatch(self, fleet, plan).run()


class Dispatch:
    """One run handed out in slices, its workers' messages fed into the run's Fleet."""

    def __init__(self, engine: CeleryEngine, fleet: Fleet, plan: Plan) -> None:
        self.engine = engine
        self.fleet = fleet
        self.plan = plan
        self.keys = RunKeys(fleet.run_name)
        self.redis = broker(engine.url)
        self.app = celery_app(engine.url)
        self.slices: dict[str, Slice] = {}
        self.hosts = {host.name: host for host in
                      (session.host for session in fleet.sessions.values())}
        self.order = tuple(fleet.hosts)

    def run(self) -> None:
        import redis as redis_module

        names = [name for name in self.fleet.hosts if name in self.fleet.sessions]
        self.fleet.close()  # the workers connect on their own
        try:
            self._store_modules()
            for hosts in split(names, self.engine.slices or math.ceil(
                    len(names) / max(1, self.fleet.strategy.forks))):
                self._send(hosts, again=False)
            self._follow()
        except redis_module.RedisError as error:
            raise EngineError(f"the broker {self.engine.url} cannot be reached or went away "
                              f"({error}): the workers stop their hosts, whose agents "
                              "unload") from None
        finally:
            with contextlib.suppress(Exception):  # the broker's loss is reported already
                self.redis.set(self.keys.over, "1", ex=RUN_TTL)

    def _store_modules(self) -> None:
        for job in self.plan.jobs:
            if job.artifact is None or job.error:
                continue
            key = module_key(job.artifact.sha256)
            if not self.redis.expire(key, MODULE_TTL):
                self.redis.set(key, job.artifact.path.read_bytes(), ex=MODULE_TTL)

    def _send(self, hosts: list[str], again: bool) -> None:
        chosen = set(hosts)
        jobs = tuple(replace(job, hosts=tuple(h for h in job.hosts if h in chosen))
                     for job in self.plan.jobs if chosen.intersection(job.hosts))
        slice_id = f"{len(self.slices) + 1}"
        work = SliceWork(run_id=self.keys.run_id, slice_id=slice_id,
                         manifest=replace(self.fleet.manifest, document=None),
                         options=self.fleet.options,
                         hosts=tuple(self.hosts[name] for name in hosts), order=self.order,
                         jobs=jobs)
        self.slices[slice_id] = Slice(slice_id, hosts, again=again)
        self.app.send_task(TASK, args=seal(self.engine.secret, work))

    def _follow(self) -> None:
        """Feed the workers' messages to the fleet until every slice ended; pass a stop
        on; hand out again the hosts of a worker that went away."""
        last, stop_sent, checked_at = "0-0", False, time.monotonic()
        while not all(s.ended and not s.running for s in self.slices.values()):
            if self.fleet.stop.is_set() and not stop_sent:
                self.redis.set(self.keys.stop, "1", ex=RUN_TTL)
                stop_sent = True
            if stop_sent:  # a slice no worker took will not start
                for piece in self.slices.values():
                    piece.ended = piece.ended or not piece.running
            last, _ = self._read(last, block=200)
            if time.monotonic() - checked_at > RENEW:
                checked_at = time.monotonic()
                last = self._check_leases(last)
        self.redis.delete(self.keys.stream)

    def _read(self, last: str, block: int | None) -> tuple[str, bool]:
        """Take the messages after ``last`` (waiting up to ``block`` ms, None: not at all);
        the new last one, and whether there were any."""
        entries: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] = \
            self.redis.xread({self.keys.stream: last}, count=BATCH, block=block)  # type: ignore[assignment]
        for _, messages in entries:
            for message_id, fields in messages:
                last = message_id.decode()
                self._take(fields)
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
                piece.ended = False
            else:
                piece.running.pop(execution, None)
                piece.ended = True
            return
        host = str(message["host"])
        if host not in self.hosts:
            raise ValueError(f"host {host!r} is not in this run")
        if kind == "event" and message["kind"] in EVENT_KINDS:
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

    def _check_leases(self, last: str) -> str:
        """Hand on the slices whose lease lapsed. A worker sends its slice's end before
        it drops the lease, so the stream is read to its end first: a slice that ended
        in the meantime is not taken for lost."""
        lapsed = [(piece, execution) for piece in self.slices.values()
                  for execution in piece.running
                  if not self.redis.exists(self.keys.lease(execution))]
        more = bool(lapsed)
        while more:
            last, more = self._read(last, block=None)
        for piece, execution in lapsed:
            worker = piece.running.pop(execution, None)
            if worker is not None:
                self._lost(piece, execution, worker)
        return last

    def _lost(self, piece: Slice, execution: str, worker: str) -> None:
        """A worker went away in the middle of a slice: the hosts it started fail, the
        others go to another worker (once)."""
        claims: list[bytes | None] = self.redis.mget(  # type: ignore[assignment]
            [self.keys.claim(host) for host in piece.hosts])
        unstarted = []
        for host, claim in zip(piece.hosts, claims, strict=True):
            if claim is None:
                unstarted.append(host)
            elif claim.decode() == execution:
                self.fleet.fail_all(host, "failed", FailureKind.WORKER_LOST,
                                    f"worker {worker} went away while running it")
        piece.ended = True
        if not unstarted or self.fleet.stop.is_set():
            return
        if piece.again:
            for host in unstarted:
                self.fleet.fail_all(host, "failed", FailureKind.WORKER_LOST,
                                    f"not started: its workers went away twice ({worker})")
        else:
            self._send(unstarted, again=True)


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
    SliceRunner(broker(task.app.conf.broker_url), secret, work, worker).run()
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
    """A Fleet whose ended hosts are sent to the controller as outcomes."""

    publisher: Publisher
    worker: str

    def report(self, outcome: HostOutcome) -> None:
        message = {"t": "outcome", **outcome_fields(outcome), "worker": self.worker}
        self.publisher.send(message)


def outcome_fields(outcome: HostOutcome) -> dict[str, Any]:
    return {"host": outcome.host, "probe": outcome.probe, "status": outcome.status,
            "kind": str(outcome.kind) if outcome.kind else None,
            "message": outcome.message, "stats": dict(outcome.stats)}


class SliceRunner:
    """One execution of one slice on a worker."""

    def __init__(self, client: redis.Redis, secret: bytes, work: SliceWork,
                 worker: str) -> None:
        self.redis = client
        self.work = work
        self.keys = RunKeys(work.run_id)
        self.worker = worker
        self.execution = secrets.token_hex(8)
        self.done = threading.Event()
        self.fleet = SliceFleet(work.manifest, work.options, self._event,
                                run_name=work.run_id)
        self.publisher = Publisher(client, secret, self.keys.stream, self.fleet.stop.set)
        self.fleet.publisher = self.publisher
        self.fleet.worker = worker

    def run(self) -> None:
        if self.redis.exists(self.keys.over, self.keys.stop):
            log.info("stapctl: run %s is over or stopping: slice %s dropped",
                     self.work.run_id, self.work.slice_id)
            self.publisher.close()
            return
        self.redis.set(self.keys.lease(self.execution), self.worker, px=int(LEASE * 1000))
        self.publisher.send({"t": "begin", "slice": self.work.slice_id,
                             "execution": self.execution, "worker": self.worker})
        watch = threading.Thread(target=self._watch, name="stapctl-lease", daemon=True)
        watch.start()
        try:
            plan = self._plan()
            hosts = [host for host in self.work.hosts if self._claim(host.name)]
            self.fleet.connect(hosts)
            self.fleet.hosts = list(self.work.order)
            self.fleet.run(plan)
        finally:
            self.fleet.close()
            self.publisher.send({"t": "end", "slice": self.work.slice_id,
                                 "execution": self.execution})
            self.publisher.close()
            self.done.set()
            watch.join()
            with contextlib.suppress(Exception):  # the broker's loss is reported already
                self.redis.delete(self.keys.lease(self.execution))

    def _event(self, event: Event) -> None:
        if event.kind != "connected":  # the controller reported the connection already
            self.publisher.send({"t": "event", "host": event.host, "kind": event.kind,
                                 "probe": event.probe, "text": event.text,
                                 "time": event.time})

    def _claim(self, host: str) -> bool:
        """Whether this execution starts the host: no other one did, and the run is not
        stopping (the controller may have stopped waiting for slices not yet begun)."""
        if self.fleet.stop.is_set() or self.redis.exists(self.keys.stop):
            return False
        return bool(self.redis.set(self.keys.claim(host), self.execution, nx=True,
                                   ex=RUN_TTL))

    def _plan(self) -> Plan:
        """The slice's jobs with their modules from this worker's cache; a host whose
        module cannot be had fails that probe."""
        jobs = []
        for job in self.work.jobs:
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
        return Plan(jobs=tuple(jobs))

    def _watch(self) -> None:
        """Renew the lease and pass a stop on; a broker gone stops the slice cleanly."""
        import redis as redis_module

        while not self.done.wait(RENEW):
            try:
                self.redis.set(self.keys.lease(self.execution), self.worker,
                               px=int(LEASE * 1000))
                if self.redis.exists(self.keys.stop):
                    self.fleet.stop.set()
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
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    partial.write_bytes(data)
    partial.replace(path)
    return path


def start_worker(url: str, celery_args: list[str]) -> None:
    """Celery's own worker on the broker, its options passed through."""
    celery_app(url).worker_main(["worker", "--loglevel=INFO", *celery_args])
