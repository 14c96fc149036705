"""The controller's side of the agent protocol (docs/agent-protocol.md).

The agent file is shipped by content hash (uploaded only when ``agent-<sha256>.py`` is
missing) and run as ``python3 -I PATH``; its request goes as JSON on stdin, never as
shell arguments. The frames it sends back are decoded with the agent's own codec, so
both ends share one definition.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from stapctl.connection import Connection, Process, run_command
from stapctl.errors import AgentError, ConnectError
from stapctl.models import HostFacts
from stapctl.runtime import stapctl_agent as wire

PING_INTERVAL = 2.0  # seconds between keep-alives; the agent's dead-man waits much longer
DEADMAN = 20.0  # seconds of silence after which the agent stops the probe by itself
STOP_GRACE = 30.0  # seconds a stopped agent has to unload before the channel is cut
# zlib level the agent is asked to send probe output with (0: plain OUTPUT frames). Level 1:
# probe output compresses well even so, and an emulated guest's CPU is the scarce thing.
COMPRESS = 1
FACTS_SCRIPT = 'uname -r && uname -m && command -v "$0"'  # $0: the interpreter


# the agent's own file, shipped verbatim (the wheel keeps it a real file on disk)
AGENT_FILE = Path(str(resources.files("stapctl.runtime").joinpath("stapctl_agent.py")))
AGENT_SIZE = AGENT_FILE.stat().st_size
AGENT_SHA256 = hashlib.sha256(AGENT_FILE.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Frame:
    kind: str  # "hello" | "output" | "event" | "result"
    data: bytes

    def json(self) -> dict[str, Any]:
        value = json.loads(self.data)
        if not isinstance(value, dict):
            raise AgentError(f"agent sent a non-object {self.kind} frame")
        return value


class AgentHost:
    """The agent installed on one connected host."""

    def __init__(self, connection: Connection, python: str = "python3") -> None:
        self.connection = connection
        self.python = python
        # not ~/.cache/stapctl: on a controller that is its own target, that is the build cache
        self.workdir = connection.home().rstrip("/") + "/.cache/stapctl-agent"
        self.path = f"{self.workdir}/agent-{AGENT_SHA256[:16]}.py"

    def install(self) -> None:
        """Create the private work directory and upload the agent unless it is there."""
        self.connection.ensure_private_dir(self.workdir)
        if not self.connection.exists(self.path, AGENT_SIZE):
            self.connection.put(AGENT_FILE, self.path)

    def facts(self) -> HostFacts:
        """Kernel release and arch (what planning needs) and that the interpreter is there.

        One shell command, not the agent's `facts` action: that costs a Python start per
        host (~25 ms of CPU, more than the rest of a check: bench/fanout.py), and the agent
        collects and checks the full facts again before it loads anything. Run with
        become like the agent, so a sudo that asks for a password fails here.
        """
        done = run_command(self.connection, ["sh", "-c", FACTS_SCRIPT, self.python])
        code = done.status
        lines = done.stdout.decode(errors="replace").splitlines()
        if code != 0 or len(lines) != 3:
            if len(lines) == 2:  # uname answered, `command -v` did not
                raise AgentError(f"{self.python} not found on the host: install Python 3.6+ "
                                 "or set ansible_python_interpreter")
            tail = done.stderr.strip()
            if "password is required" in tail or "a terminal is required" in tail:
                raise AgentError("sudo would ask for a password (become is on, and stapctl "
                                 "never types one): give this user passwordless sudo, or "
                                 "log in as root", tail)
            raise AgentError(f"cannot gather facts (exit {code})" +
                             (f": {tail.splitlines()[-1]}" if tail else ""), tail)
        release, arch, interpreter = lines
        return HostFacts(release=release, arch=arch, python="",
                         raw={"release": release, "arch": arch, "interpreter": interpreter})

    def upload_module(self, local: Path, sha256: str) -> str:
        """Upload a module unless the target already holds it; returns its remote path."""
        remote = f"{self.workdir}/{sha256}.ko"
        if not self.connection.exists(remote, local.stat().st_size):
            self.connection.put(local, remote)
        return remote

    def call(
        self,
        request: Mapping[str, Any],
        on_frame: Callable[[Frame], None] = lambda frame: None,
        stop: threading.Event | None = None,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """Run one agent request to its RESULT frame.

        ``stop`` asks the agent to stop cleanly (EXIT, drain, unload); past ``deadline``
        (a time.monotonic() value) the same happens, and the result says timed-out.
        """
        process = self.connection.start([self.python, "-I", self.path])
        full = {"protocol": wire.PROTOCOL_VERSION, "deadman": DEADMAN, "compress": COMPRESS,
                **request}
        process.send(json.dumps(full).encode() + b"\n")
        stop = stop or threading.Event()
        finished = threading.Event()
        timed_out = threading.Event()

        def keep_alive() -> None:
            """Ping the dead-man; turn a stop or a deadline into one `stop` request."""
            next_ping = time.monotonic() + PING_INTERVAL
            cutoff: float | None = None
            while not finished.wait(0.2):
                now = time.monotonic()
                if deadline is not None and now > deadline:
                    timed_out.set()
                if cutoff is None and (stop.is_set() or timed_out.is_set()):
                    self._send(process, {"op": "stop"})
                    cutoff = now + STOP_GRACE
                if cutoff is not None and now > cutoff:
                    process.kill()
                    return
                if now >= next_ping:
                    self._send(process, {"op": "ping"})
                    next_ping = now + PING_INTERVAL

        pinger = threading.Thread(target=keep_alive, daemon=True)
        pinger.start()
        result: dict[str, Any] | None = None
        try:
            for frame in read_frames(process.recv):
                if frame.kind == "result":
                    result = frame.json()
                    break
                on_frame(frame)
        finally:
            finished.set()
            process.close_stdin()
        if result is None:
            tail = process.stderr_tail().strip()
            process.kill()
            raise AgentError("the agent ended without a result" +
                             (f": {tail.splitlines()[-1]}" if tail else ""), tail)
        process.wait()
        if timed_out.is_set() and result.get("kind") == "stopped":
            result["kind"] = "timed-out"
            result["message"] = "stopped: the host's timeout was reached"
        return result

    @staticmethod
    def _send(process: Process, message: Mapping[str, str]) -> None:
        # a lost connection is seen and reported by the read loop
        with contextlib.suppress(ConnectError):
            process.send(json.dumps(message).encode() + b"\n")


FRAME_KINDS = {
    wire.FRAME_HELLO: "hello",
    wire.FRAME_OUTPUT: "output",
    wire.FRAME_EVENT: "event",
    wire.FRAME_RESULT: "result",
}


def read_frames(recv: Callable[[int], bytes]) -> Iterator[Frame]:
    """Yield frames from a byte stream until EOF; garbage raises AgentError.

    Compressed output (Z frames: one zlib stream per run) comes out as plain `output`
    frames, so callers never see the difference; an agent may send either kind.
    """
    reader = wire.FrameReader()
    inflater = wire.OutputInflater()
    while chunk := recv(65536):
        try:
            frames = reader.feed(chunk)
        except ValueError as exc:
            raise AgentError(f"the agent's stream is corrupt: {exc}") from exc
        for letter, data in frames:
            if letter != wire.FRAME_ZOUTPUT:
                yield Frame(FRAME_KINDS[letter], data)
                continue
            try:  # piece by piece: a frame may inflate far past what memory holds
                for piece in inflater.feed(data):
                    yield Frame("output", piece)
            except ValueError as exc:
                raise AgentError(f"the agent's stream is corrupt: {exc}") from exc
    if reader.pending:
        raise AgentError("the agent's stream ended in the middle of a frame")
