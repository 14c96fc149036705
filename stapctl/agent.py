"""The controller's side of the agent protocol (docs/agent-protocol.md).

The agent file is shipped by content hash (uploaded only when ``agent-<sha256>.py`` is
missing) and run by import (``agent_argv``: ``python3 -I -S -c BOOTSTRAP PATH``), so
the target's Python keeps its bytecode in the private work directory's ``__pycache__``
and compiles the file only on its first run; its request goes as JSON on stdin, never as
shell arguments. The frames it sends back are decoded with the agent's own codec, so both
ends share one definition.

Everything the agent sends is untrusted: frames are size-capped, compressed output is
inflated in bounded pieces, probe output is capped per run, JSON is checked for shape,
and an agent that falls silent is given up on (it sends a heartbeat while it works).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from stapctl.cache import SHA256
from stapctl.clock import CLOCK, Alarm
from stapctl.connection import Connection, Process, run_command
from stapctl.connection.base import Watchdog
from stapctl.errors import (
    AgentError,
    BadFactsError,
    ConnectError,
    OutputLimitError,
    ProtocolError,
    UnresponsiveError,
)
from stapctl.facts import SAFE_FACT_RULE, is_safe_fact, shown
from stapctl.models import FailureKind, HostFacts
from stapctl.runtime import stapctl_agent as wire

# zlib level the agent is asked to send probe output with (0: plain OUTPUT frames). Level 1:
# probe output compresses well even so, and an emulated guest's CPU is the scarce thing.
COMPRESS = 1
WORKDIR = ".cache/stapctl-agent"  # under the login user's home (not ~/.cache/stapctl: on a
# controller that is its own target, that is the build cache)
# AgentHost.prepare: $0 the interpreter, then the sudo prefix of the connection's commands
# (none without become). Prints the home, the kernel release and arch on one line, the
# work directory's listing (`ls -aln`: its own mode on the "." line, the agent's size,
# the modules; none if it is a symlink), and the interpreter's path. Two processes (ls,
# uname) beside the shell, and no nested shell unless the lookup goes through sudo: it is
# run once per host, on targets whose CPU a fleet's fan-out shares. The listing is sent
# in one write: ls writes in 4 KiB pieces, which would reach the controller as as many
# SSH packets, each decrypted and checked there.
PREPARE_SCRIPT = f"""cd || exit
d={WORKDIR}
[ -d "$d" ] || mkdir -p -m 700 "$d" || exit
pwd
uname -rm || exit
l=
[ -h "$d" ] || l=$(LC_ALL=C ls -aln "$d") || exit
echo "$l"
if [ $# = 0 ]; then command -v "$0"; else "$@" sh -c 'command -v "$0"' "$0"; fi
"""
FACTS_TIMEOUT = 30.0  # seconds the prepare command may stay silent (a hung home, a stuck sudo)
# a spare agent is used only this young: the agent waits 60 s for its request
# (stapctl_agent.Agent.request_timeout), and a spare past that has given up
SPARE_LIFETIME = 30.0
MAX_FRAME = 8 << 20  # the agent batches output in pieces of a few MiB at most
MAX_TEXT = 4096  # characters kept of any text field the agent sends (messages, events)
READ_SIZE = 1 << 20  # bytes asked of the agent's stream at once: what has arrived, up to this
SEND_PIECE = 256 << 10  # a request is sent in pieces this big, each one a sign of life
PING = b'{"op": "ping"}\n'
# Runs the agent file (argv[1]) by import: unlike `python3 FILE`, an import caches the
# compiled file (__pycache__/agent-<sha256>.cpython-*.pyc, checked against the file's
# size and mtime at each start). Its folder is on sys.path only for that import, and by
# name rather than through importlib.util, whose import alone takes tens of milliseconds
# on a slow target. First it checks, as the prepare command does, that the folder is
# private and the file a file: a spare agent (AgentHost.prepare) starts before that
# command has looked. Python 3.6+; -I keeps the home directory off sys.path, -S skips
# site, which the agent does not need (a tenth of its start on an emulated target).
BOOTSTRAP = """import os, sys
p = sys.argv[1]
d, _, f = p.rpartition('/')
try:
    private = (os.lstat(d).st_mode & 0o170077 == 0o040000
               and os.lstat(p).st_mode & 0o170000 == 0o100000)
except OSError:
    private = False
if not private:
    sys.exit('stapctl agent: %s is not a private (0700) folder holding %s' % (d, f))
sys.path.insert(0, d)
m = __import__(f[:-3])
del sys.path[0]
sys.exit(m.main())"""


def agent_argv(python: str, path: str, loads: bool = False) -> list[str]:
    """The command that runs the agent file at ``path``: the one way it is started.
    ``loads``: its request will load a module (the agent readies its loader first)."""
    return [python, "-I", "-S", "-c", BOOTSTRAP, path, *(["load"] if loads else [])]


STOP = b'{"op": "stop"}\n'
LOADING_ACTIONS = ("run", "detach")  # the requests that load a module

# the agent's own file, shipped verbatim (the wheel keeps it a real file on disk)
AGENT_FILE = Path(str(resources.files("stapctl.runtime").joinpath("stapctl_agent.py")))
AGENT_SIZE = AGENT_FILE.stat().st_size
AGENT_SHA256 = hashlib.sha256(AGENT_FILE.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Timing:
    """The clocks of one agent call; tests shrink them."""

    ping: float = 2.0  # seconds between keep-alives
    deadman: float = 20.0  # the agent stops by itself after this long without a ping
    silence: float = 20.0  # the controller gives up on an agent silent this long
    # ... and on one that has not said anything yet after this long: starting Python on a
    # loaded or emulated target can take several seconds, a hung exec for ever
    startup: float = 60.0
    exit_timeout: float = 10.0  # the agent waits this long for the module's EXIT reply
    stop_grace: float = 30.0  # a stopped agent has this long to unload before the cut


@dataclass(frozen=True)
class AgentRequest:
    """A request, field for field as docs/agent-protocol.md has it (`facts` needs no
    module)."""

    action: Literal["facts", "preflight", "run", "targets", "detach", "status", "collect",
                    "tail", "stop"]
    module: str = ""
    sha256: str = ""
    module_name: str = ""
    params: Mapping[str, str | int] = field(default_factory=dict)
    duration: float | None = None
    exit_timeout: float = 10.0
    bufsize_mb: int = 0
    deadman: float = Timing.deadman
    compress: int = COMPRESS
    remove_files: tuple[str, ...] = ()  # deleted when the agent ends, whatever happened
    protocol: int = wire.PROTOCOL_VERSION
    # detached runs: <workdir>/detached/<name> on the target
    workdir: str = ""
    name: str = ""
    names: tuple[str, ...] = ()  # status
    max_duration: float | None = None  # detach: the lifetime bound
    max_disk: int | None = None
    file_size: int | None = None  # detach: output rotation
    file_count: int | None = None
    offset: int | None = None  # collect, tail: from this byte of the output (tail: None, the end)
    remove: bool = False  # collect: remove the run's files once it has ended and all is sent
    timeout: float | None = None  # stop: how long to wait for the run to have ended
    # run, detach: what the script's remote_id() and remote_uri() return on this host
    remote_id: int | None = None
    remote_uri: str = ""
    target: Mapping[str, str | int] | None = None  # run, targets: the process target() names
    # the module's bytes, sent after the request line when the target does not hold it
    # (its size in the request's `module_size`): no SFTP session for it
    module_data: bytes = field(default=b"", repr=False)

    def encode(self) -> bytes:
        fields = {**asdict(self), "params": dict(self.params),
                  "remove_files": list(self.remove_files), "names": list(self.names)}
        del fields["module_data"]
        if self.module_data:
            fields["module_size"] = len(self.module_data)
        return json.dumps(fields).encode() + b"\n" + self.module_data


@dataclass(frozen=True)
class RunResult:
    """The agent's RESULT, checked for shape: nothing in it is trusted as more than text."""

    ok: bool
    kind: FailureKind | None
    message: str
    stats: Mapping[str, int]
    facts: Mapping[str, Any] = field(default_factory=dict)  # facts and preflight only
    detached: Mapping[str, Any] = field(default_factory=dict)  # a detached run's state(s)
    first: int = 0  # collect: the offset of the first byte sent (rotation may skip some)
    end: int = 0  # collect, tail: the offset past the last byte sent
    removed: bool = False  # collect: the run's files are gone from the target
    pids: tuple[int, ...] = ()  # targets: the matching processes, oldest first

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> RunResult:
        ok = data.get("status") == "ok"
        facts, detached = data.get("facts"), data.get("detached")
        return cls(ok=ok, kind=None if ok else FailureKind.from_agent(data.get("kind")),
                   message=text_field(data.get("message")), stats=_counts(data.get("stats")),
                   facts=facts if isinstance(facts, dict) else {},
                   detached=detached if isinstance(detached, dict) else {},
                   first=_count(data.get("first")), end=_count(data.get("end")),
                   removed=data.get("removed") is True, pids=_pids(data.get("pids")))


def module_to_send(result: RunResult) -> Literal["missing", "corrupt"] | None:
    """Whether the agent found no module file to run, or a corrupt one that it removed:
    then the module is to be sent (again) and the request repeated."""
    if result.kind != FailureKind.PREFLIGHT_REFUSED:
        return None
    if "is not on this host" in result.message:
        return "missing"
    return "corrupt" if "sha256 mismatch" in result.message else None


def _pids(value: object) -> tuple[int, ...]:
    """The positive integers of a list from the agent, in its order; nothing else."""
    if not isinstance(value, list):
        return ()
    return tuple(pid for pid in value
                 if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0)


def _count(value: object) -> int:
    """A non-negative integer from the agent, or 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else 0


def _counts(value: object) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    return {str(k)[:64]: v for k, v in value.items()
            if isinstance(v, int) and not isinstance(v, bool)}


def detached_state(value: object) -> dict[str, Any]:
    """One detached run's state as the agent reported it, checked for shape: the state
    is one of the known words, texts are bounded, counts are counts."""
    raw = value if isinstance(value, dict) else {}
    state = raw.get("state")
    return {
        "state": state if state in DETACHED_STATES else "unknown",
        "reason": text_field(raw.get("reason")) if raw.get("reason") else None,
        "status": "ok" if raw.get("status") == "ok" else ("failed" if raw.get("status")
                                                         else None),
        "kind": text_field(raw.get("kind")) if raw.get("kind") else None,
        "message": text_field(raw.get("message")),
        "module": text_field(raw.get("module")) if raw.get("module") else None,
        "pid": _count(raw.get("pid")) or None,
        "written": _count(raw.get("written")),
        "started": raw.get("started") if isinstance(raw.get("started"), int | float) else None,
        "ended": raw.get("ended") if isinstance(raw.get("ended"), int | float) else None,
        "stats": _counts(raw.get("stats")),
    }


DETACHED_STATES = ("starting", "running", "finished", "lost")


def text_field(value: object) -> str:
    """A text field from the agent, as a bounded string whatever it was."""
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "… (cut)"


def checked_facts(release: str, arch: str) -> HostFacts:
    """A host's kernel release and arch, once both pass the rule of stapctl.facts (they
    become paths and arguments here), else BadFactsError. A target's own answer and an
    engine worker's report of it go through this one check."""
    for name, value in (("kernel release", release), ("arch", arch)):
        if not is_safe_fact(value):
            raise BadFactsError(f"the host reports its {name} as {shown(value)}, which "
                                f"stapctl will not use in paths or commands: it must be "
                                f"{SAFE_FACT_RULE}")
    return HostFacts(release=release, arch=arch)


@dataclass(frozen=True)
class Frame:
    kind: Literal["hello", "output", "event", "result"]
    data: bytes

    def json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.data)
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(f"the agent sent a {self.kind} frame that is not JSON") \
                from exc
        if not isinstance(value, dict):
            raise ProtocolError(f"the agent sent a {self.kind} frame that is not an object")
        return value


class AgentHost:
    """The agent on one connected host; ``prepare`` first."""

    def __init__(self, connection: Connection, python: str = "python3") -> None:
        self.connection = connection
        self.python = python
        self.workdir = ""  # <home>/.cache/stapctl-agent: the home is known once prepared
        self.path = ""
        self.modules: set[str] = set()  # the module files in it (<sha256>.ko), as prepared
        self._spare: tuple[float, Process] | None = None  # (started, process), for one call
        self._spare_lock = threading.Lock()  # a host's jobs call side by side: one takes it
        self._modules_lock = threading.Lock()

    def prepare(self, spare: bool = False, loads: bool = False,
                startup: float = Timing.startup) -> HostFacts:
        """Make the private work directory, ship the agent unless it is there, and return
        the kernel release and arch (what planning needs): one shell command, and SFTP
        only when the agent must be sent; or, with ``spare``, the agent alone.

        The directory is made and checked as the login user (it receives SFTP uploads):
        a directory, not a symlink, no access for group or others. Only the interpreter's
        lookup goes through sudo with become, so that a sudo that would ask for a password
        fails here. Not the agent's `facts` action: that costs a Python start per host
        (~25 ms of CPU, more than the rest of a check: bench/fanout.py), and the agent
        collects and checks the full facts again before it loads anything. Release and
        arch become paths and arguments, so one that is not a plain name raises
        BadFactsError.

        With ``spare``, the agent is started first, from the home folder (the login's
        working directory), for the host's first call to take: its Python start is the
        largest part of a short run's time on a slow target, and its HELLO says what the
        prepare command would have (``_spare_facts``), so a host that holds this agent
        costs one command, not two (``loads``: the call will load a module, and the spare
        readies its loader as it waits; ``startup``: the seconds it is given to say HELLO,
        as a call gives it, Timing.startup). BOOTSTRAP checks the folder before it runs
        anything; when the agent cannot start (it is not there yet) or is another copy
        under this name, the prepare command runs after all, and the call starts it anew.
        """
        name = f"agent-{AGENT_SHA256[:16]}.py"
        if spare:
            self.discard_spare()
            started = self.connection.start(agent_argv(self.python, f"{WORKDIR}/{name}", loads))
            try:
                facts = self._spare_facts(started, name, startup)
            except BaseException:
                _end(started)
                raise
            if facts is not None:
                with self._spare_lock:
                    self._spare = (time.monotonic(), started)
                return facts
        done = run_command(self.connection, ["sh", "-c", PREPARE_SCRIPT, self.python,
                                             *self.connection.sudo()],
                           timeout=FACTS_TIMEOUT, become=False)
        lines = done.stdout.decode(errors="replace").splitlines()
        if done.status != 0 or len(lines) < 3:
            raise self._unprepared(done.status, lines, done.stderr.strip())
        home, kernel, *listing, _interpreter = lines
        release, _, arch = kernel.rpartition(" ")
        directory, agent_size, modules = _work_directory(listing, name)
        if not directory.startswith("d") or directory[4:10] != "------":
            raise AgentError(text_field(f"{home.rstrip('/')}/{WORKDIR} must be a private "
                                        "directory (0700); it is not: remove it or fix its "
                                        "mode"))  # the home is the target's word: bounded
        facts = checked_facts(release, arch)
        self.workdir = f"{home.rstrip('/')}/{WORKDIR}"
        self.path = f"{self.workdir}/{name}"
        self.modules = modules
        if agent_size != AGENT_SIZE:
            self.connection.put(AGENT_FILE, self.path)
        return facts

    def _spare_facts(self, process: Process, name: str, startup: float) -> HostFacts | None:
        """The host as a spare agent's HELLO tells it (the agent's where_it_runs), or None
        when the agent could not start or is another copy under this name (it is then
        ended). A HELLO whose folder, release or arch is unfit is the target's fault."""
        hello = read_hello(process, startup)
        host = hello.get("host") if hello is not None else None
        if not isinstance(host, dict) or host.get("agent_size") != AGENT_SIZE:
            _end(process)
            return None
        workdir, release, arch = (host.get(key) for key in ("workdir", "release", "arch"))
        if not (isinstance(workdir, str) and workdir.startswith("/") and workdir.isprintable()
                and workdir.endswith(f"/{WORKDIR}") and len(workdir) <= 4096):
            raise ProtocolError(f"the agent reports its folder as {shown(str(workdir))}: "
                                f"not the absolute path of a {WORKDIR} folder")
        if not (isinstance(release, str) and isinstance(arch, str)):
            raise ProtocolError("the agent reports no kernel release or arch")
        facts = checked_facts(release, arch)
        modules = host.get("modules")
        self.workdir = workdir
        self.path = f"{workdir}/{name}"
        self.modules = {m for m in modules if isinstance(m, str) and m.endswith(".ko")
                        and SHA256.fullmatch(m[:-3])} if isinstance(modules, list) else set()
        return facts

    def _unprepared(self, code: int, lines: list[str], tail: str) -> AgentError:
        """Why the prepare command failed, as the error a user can act on."""
        if "password is required" in tail or "a terminal is required" in tail:
            return AgentError("sudo would ask for a password (become is on, and stapctl "
                              "never types one): give this user passwordless sudo, or log "
                              "in as root", tail)
        if len(lines) >= 2 and not tail:  # past uname; the lookup failed, saying nothing
            return AgentError(f"{self.python} not found on the host: install Python 3.6+ "
                              "or set ansible_python_interpreter")
        return AgentError(f"cannot gather facts (exit {code})" +
                          (f": {tail.splitlines()[-1]}" if tail else ""), tail)

    def discard_spare(self) -> None:
        """End the spare agent unused (on its stdin's EOF it exits without a request)."""
        process = self._claim_spare(lambda _: True)
        if process is not None:
            _end(process)

    def _take_spare(self) -> Process | None:
        """The spare agent for this call, if there is one young enough; an older one is
        ended."""
        young = self._claim_spare(lambda started: time.monotonic() - started <= SPARE_LIFETIME)
        if young is None:
            self.discard_spare()
        return young

    def _claim_spare(self, wanted: Callable[[float], bool]) -> Process | None:
        """The spare, taken by one caller only, if ``wanted(its start time)``."""
        with self._spare_lock:
            if self._spare is None or not wanted(self._spare[0]):
                return None
            process = self._spare[1]
            self._spare = None
            return process

    def module(self, local: Path, sha256: str, again: bool = False) -> tuple[str, bytes]:
        """A module's remote path, and its bytes to send with the request
        (AgentRequest.module_data) unless the target held it when prepared or it was
        sent already (``again``: send it all the same). The agent checks the bytes, and
        keeps them as that file; a copy already there it checks before loading it: a
        corrupt or vanished one it reports (`module_to_send`), and it is sent again.

        The local file is hashed as it is read: one that no longer matches ``sha256``
        (its cache entry changed after it was checked) is never shipped.
        """
        if SHA256.fullmatch(sha256) is None:
            raise AgentError(f"{local}: {shown(sha256)} is not a sha256: rebuild the module")
        name = f"{sha256}.ko"
        remote = f"{self.workdir}/{name}"
        with self._modules_lock:
            if name in self.modules and not again:
                return remote, b""
        try:
            data = local.read_bytes()
        except OSError:
            raise AgentError(f"cannot read the module {local}: run again to rebuild it") \
                from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise AgentError(f"{local} changed after it was built (its sha256 is no "
                             f"longer {sha256[:12]}…), so it was not uploaded: run again "
                             "to rebuild it")
        with self._modules_lock:  # a job beside this one then finds it sent (or missing)
            self.modules.add(name)
        return remote, data

    def call(self, request: AgentRequest, on_frame: Callable[[Frame], None] = lambda _: None,
             stop: threading.Event | None = None, deadline: float | None = None,
             timing: Timing = Timing(), max_output: int = 1 << 30) -> RunResult:
        """Run one agent request to its RESULT frame.

        ``stop`` asks the agent to stop cleanly (EXIT, drain, unload); past ``deadline``
        (a time.monotonic() value) the same happens, and the result says timed-out. Past
        ``max_output`` bytes of probe output the agent is stopped the same way and the
        rest of its output dropped. An agent silent for ``timing.silence`` seconds (or
        ``timing.startup`` before its first byte) is cut
        off (its own dead-man then unloads the module) and UnresponsiveError raised.
        """
        spare = self._take_spare()
        if spare is not None:
            try:
                return self._call(spare, request, on_frame, stop, deadline, timing, max_output,
                                  spare=True)
            except _SpareUnstarted:
                pass
        process = self.connection.start(agent_argv(self.python, self.path,
                                                   request.action in LOADING_ACTIONS))
        return self._call(process, request, on_frame, stop, deadline, timing, max_output)

    def _call(self, process: Process, request: AgentRequest,
              on_frame: Callable[[Frame], None], stop: threading.Event | None,
              deadline: float | None, timing: Timing, max_output: int,
              spare: bool = False) -> RunResult:
        """``spare``: the process is a spare agent, which raises _SpareUnstarted if it
        ended before its first byte (it never read the request)."""
        watch = _Watch(process, stop or threading.Event(), deadline, timing)
        watch.start()  # before the request: a module in it may take a while to go out
        unsent: ConnectError | None = None
        result: dict[str, Any] | None = None
        output = 0
        try:
            try:
                watch.send_request(request.encode())
            except ConnectError as exc:  # the agent ended, or never started: its frames say
                unsent = exc
            for frame in read_frames(watch.heard_from(process.recv)):
                if frame.kind == "result":
                    result = frame.json()
                    break
                if frame.kind == "output":
                    output += len(frame.data)
                    if output > max_output:
                        watch.over_limit.set()
                        continue
                on_frame(frame)
        except BaseException as exc:  # the agent then sees EOF and unloads by itself
            watch.finish()
            process.close_stdin()
            process.kill()
            if watch.silent.is_set() and isinstance(exc, ConnectError):
                raise watch.silence_error() from None
            raise
        watch.finish()
        process.close_stdin()
        if result is None:
            tail = process.stderr_tail().strip()
            process.kill()
            if spare and not watch.heard:
                raise _SpareUnstarted
            if watch.silent.is_set():
                raise watch.silence_error()
            if watch.cut.is_set():
                return RunResult(False, FailureKind.TIMED_OUT, "stopped, but it did not end "
                                 f"within {timing.stop_grace:g} s: cut off (its dead-man "
                                 "unloads the module)", {})
            if unsent is not None:
                raise unsent
            raise AgentError("the agent ended without a result" +
                             (f": {text_field(tail.splitlines()[-1])}" if tail else ""),
                             text_field(tail))
        process.wait()
        parsed = RunResult.parse(result)
        if watch.over_limit.is_set():
            raise OutputLimitError(f"more than {max_output >> 20} MiB of probe output: "
                                   "stopped, and the rest dropped")
        if watch.timed_out.is_set() and parsed.kind is FailureKind.STOPPED:
            return RunResult(False, FailureKind.TIMED_OUT,
                             "stopped: the host's timeout was reached", parsed.stats)
        return parsed


def _end(process: Process) -> None:
    """End an agent that has not been sent a request: on its stdin's EOF it exits."""
    with contextlib.suppress(Exception):
        process.close_stdin()
        process.kill()


MAX_HELLO = 1 << 20  # bytes of a HELLO frame: the module files listed are the most of it


def read_hello(process: Process, timeout: float) -> dict[str, Any] | None:
    """An agent's first frame, which must be HELLO; None when it ended without a byte
    (it could not start). Silent for ``timeout`` seconds, it is killed and
    UnresponsiveError raised; a stream that is not a HELLO frame raises ProtocolError."""
    watchdog = Watchdog(timeout, process.kill)
    try:
        header = _receive(process, wire.FRAME_HEADER.size, watchdog)
        if watchdog.fired:
            raise UnresponsiveError(f"the agent did not start within {timeout:g} s")
        if not header:
            return None
        ftype, size = wire.FRAME_HEADER.unpack(header) if len(header) == \
            wire.FRAME_HEADER.size else (0, 0)
        if chr(ftype) != wire.FRAME_HELLO or size > MAX_HELLO:
            raise ProtocolError("the agent's first frame is not a HELLO of at most "
                                f"{MAX_HELLO >> 10} KiB")
        payload = _receive(process, size, watchdog)
        if watchdog.fired:
            raise UnresponsiveError(f"the agent did not start within {timeout:g} s")
        if len(payload) < size:
            raise ProtocolError("the agent's stream ended inside its HELLO frame")
    finally:
        watchdog.stop()
    return Frame("hello", payload).json()


def _receive(process: Process, size: int, watchdog: Watchdog) -> bytes:
    """``size`` bytes of the process's stdout, or fewer at its end: never more, so the
    next reader finds the stream where this one left it."""
    data = b""
    while len(data) < size and (chunk := process.recv(size - len(data))):
        watchdog.heard()
        data += chunk
    return data


def _work_directory(listing: list[str], agent: str) -> tuple[str, int, set[str]]:
    """From the work directory's `ls -aln`: its own mode ("" if not listed), the size of
    the agent's file (0: none, or not a regular file) and the modules (regular files
    named *.ko, as the shell's glob finds them). Only plain files count: a symlink is
    neither agent nor module."""
    directory, size, modules = "", 0, set()
    for line in listing:
        fields = line.split(maxsplit=8)  # mode, links, uid, gid, size, 3 of date, name
        if len(fields) < 9:
            continue  # `total N`
        mode, name = fields[0], fields[8]
        if name == ".":
            directory = mode
        elif mode.startswith("-") and name == agent:
            size = int(fields[4]) if fields[4].isdigit() else 0
        elif mode.startswith("-") and name.endswith(".ko") and not name.startswith("."):
            modules.add(name)
    return directory, size, modules


class _SpareUnstarted(Exception):
    """A spare agent ended without a byte: the call starts the agent anew."""


class _Watch:
    """A call's clock: pings the agent's dead-man, turns a stop, a deadline or an output
    limit into one `stop` request, cuts an agent that does not unload within the grace,
    and cuts one that has been silent too long."""

    def __init__(self, process: Process, stop: threading.Event, deadline: float | None,
                 timing: Timing) -> None:
        self.process = process
        self.stop = stop
        self.deadline = deadline
        self.timing = timing
        self.timed_out = threading.Event()
        self.over_limit = threading.Event()
        self.silent = threading.Event()
        self.cut = threading.Event()  # stopped, and cut off for not ending in time
        self._finished = threading.Event()
        self._last_heard = time.monotonic()
        self._heard_once = False
        self._tick = min(0.2, timing.ping)
        self._next_ping = 0.0
        self._alarm: Alarm | None = None
        self._sending = threading.Lock()  # the request goes out whole, no ping inside it

    def start(self) -> None:
        """The first look comes one tick later, as an alarm on the shared clock: a call
        that ends before it (a short request) costs no thread; a longer one is watched
        on in the thread that alarm fires in."""
        self._next_ping = time.monotonic() + self.timing.ping
        self._alarm = CLOCK.after(self._tick, self._run)

    def send_request(self, data: bytes) -> None:
        """Send the request (and a module with it) in pieces, each piece gone a sign of
        life: an agent reading a large module over a slow link is not silent, one that
        stops reading is cut off as silent, which ends the send."""
        with self._sending:
            for start in range(0, len(data), SEND_PIECE):
                self.process.send(data[start:start + SEND_PIECE])
                self._last_heard = time.monotonic()

    def heard_from(self, recv: Callable[[int], bytes]) -> Callable[[int], bytes]:
        """``recv``, noting every byte that arrives as a sign of life (a large frame
        on a slow link is not silence)."""

        def noted(size: int) -> bytes:
            data = recv(size)
            if data:
                self._last_heard = time.monotonic()
                self._heard_once = True
            return data

        return noted

    def finish(self) -> None:
        self._finished.set()
        if self._alarm is not None:
            self._alarm.cancel()

    @property
    def heard(self) -> bool:
        """Whether the agent has sent anything yet."""
        return self._heard_once

    def silence_error(self) -> AgentError:
        if not self._heard_once:
            return UnresponsiveError(f"the agent did not start within "
                                     f"{self.timing.startup:g} s")
        return UnresponsiveError(f"the agent sent nothing for {self.timing.silence:g} s "
                                 "(its dead-man unloads the module)")

    def _run(self) -> None:
        next_ping = self._next_ping
        cutoff: float | None = None
        while not self._finished.is_set():
            now = time.monotonic()
            if self.deadline is not None and now > self.deadline:
                self.timed_out.set()
            if cutoff is None and (self.stop.is_set() or self.timed_out.is_set()
                                   or self.over_limit.is_set()) and self._send(STOP):
                cutoff = now + self.timing.stop_grace
            allowed = self.timing.silence if self._heard_once else self.timing.startup
            if now - self._last_heard > allowed:
                self.silent.set()
            elif cutoff is not None and now > cutoff:
                self.cut.set()
            if self.silent.is_set() or self.cut.is_set():
                self.process.kill()
                return
            if now >= next_ping and self._send(PING):
                next_ping = now + self.timing.ping
            self._finished.wait(self._tick)

    def _send(self, message: bytes) -> bool:
        """Send a control line, unless the request is still going out (whether it was
        sent: the next tick tries again). A lost connection is seen and reported by the
        read loop."""
        if not self._sending.acquire(blocking=False):
            return False
        try:
            with contextlib.suppress(ConnectError):
                self.process.send(message)
        finally:
            self._sending.release()
        return True


FRAME_KINDS: Mapping[str, Literal["hello", "output", "event", "result"]] = {
    wire.FRAME_HELLO: "hello",
    wire.FRAME_OUTPUT: "output",
    wire.FRAME_EVENT: "event",
    wire.FRAME_RESULT: "result",
}


def read_frames(recv: Callable[[int], bytes]) -> Iterator[Frame]:
    """Yield frames from a byte stream until EOF; garbage raises ProtocolError.

    Compressed output (Z frames: one zlib stream per run) comes out as plain `output`
    frames of bounded size, so callers never see the difference; an agent may send
    either kind.
    """
    reader = wire.FrameReader(max_frame=MAX_FRAME)
    inflater = wire.OutputInflater()
    while chunk := recv(READ_SIZE):
        try:
            frames = reader.feed(chunk)
        except ValueError as exc:
            raise ProtocolError(f"the agent's stream is corrupt: {exc}") from exc
        for letter, data in frames:
            if letter != wire.FRAME_ZOUTPUT:
                yield Frame(FRAME_KINDS[letter], data)
                continue
            try:  # piece by piece: a frame may inflate far past what memory holds
                for piece in inflater.feed(data):
                    yield Frame("output", piece)
            except ValueError as exc:
                raise ProtocolError(f"the agent's stream is corrupt: {exc}") from exc
    if reader.pending:
        raise ProtocolError("the agent's stream ended in the middle of a frame")
