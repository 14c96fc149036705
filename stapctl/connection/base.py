"""The interface every kind of connection offers, and what is built on it alone."""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from stapctl.clock import CLOCK
from stapctl.errors import ConnectError
from stapctl.models import Host

STDERR_TAIL_BYTES = 64 * 1024


@dataclass(frozen=True)
class ConnectOptions:
    connect_timeout: float = 10.0
    accept_new_host_keys: bool = False  # like OpenSSH's StrictHostKeyChecking=accept-new
    become: bool = False  # use `sudo -n` when the login user is not root
    ssh_config: Path | None = Path("~/.ssh/config")  # None: read no ssh_config
    # seconds an SFTP request (stat, upload, read...) may wait for the target's answer
    io_timeout: float = 60.0
    # like OpenSSH's UserKnownHostsFile (a host's own `known_hosts` wins) and
    # GlobalKnownHostsFile (always trusted, never written)
    user_known_hosts: Path = Path("~/.ssh/known_hosts")
    global_known_hosts: Path = Path("/etc/ssh/ssh_known_hosts")


class Process(Protocol):
    """A command running on a target, with its stdin, stdout and stderr as streams."""

    def send(self, data: bytes) -> None: ...
    def close_stdin(self) -> None: ...
    def recv(self, size: int) -> bytes: ...  # b"" at EOF
    def stderr_tail(self) -> str: ...
    def wait(self) -> int: ...
    def kill(self) -> None: ...


class Connection(Protocol):
    """A target reached one way or another. Building one does no I/O; ``open`` does.
    ``close`` may be called at any time, from any thread, any number of times."""

    host: Host

    def open(self) -> None: ...
    def put(self, local: Path, remote: str) -> None: ...  # the one way to upload
    def read_file(self, path: str, limit: int) -> bytes: ...
    # as the login user, or with become through sudo() (`sudo -n --` unless it is root)
    def start(self, argv: Sequence[str], become: bool = True) -> Process: ...
    def sudo(self) -> list[str]: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Completed:
    status: int
    stdout: bytes
    stderr: str  # the tail only


COMMAND_OUTPUT_LIMIT = 1 << 20  # bytes a short command may send: the prepare lists modules


def run_command(connection: Connection, argv: Sequence[str], stdin: bytes = b"",
                timeout: float | None = None, become: bool = True,
                limit: int = COMMAND_OUTPUT_LIMIT) -> Completed:
    """Run a short command to its end: the one way to run something that is not the agent.

    A command that stays silent (no output, no exit) for ``timeout`` seconds, or that
    sends more than ``limit`` bytes (a hostile target's flood), is killed
    (``Process.kill``) and reported as a ConnectError.
    """
    process = connection.start(argv, become)
    watchdog = Watchdog(timeout, process.kill)
    try:
        if stdin:
            process.send(stdin)
        process.close_stdin()
        chunks = []
        size = 0
        while chunk := process.recv(65536):
            watchdog.heard()
            size += len(chunk)
            if size > limit:
                process.kill()
                raise ConnectError(f"{connection.host.name}: `{argv[0]}` sent more than "
                                   f"{limit >> 10} KiB: stopped (a short command never does)")
            chunks.append(chunk)
        status = process.wait()
    except ConnectError as exc:
        if watchdog.fired:
            raise watchdog.error(connection.host.name, argv) from exc
        raise
    finally:
        watchdog.stop()
    if watchdog.fired:
        raise watchdog.error(connection.host.name, argv)
    return Completed(status, b"".join(chunks), process.stderr_tail())


class Watchdog:
    """Calls ``kill`` once nothing has been heard for ``timeout`` seconds (never if None):
    an alarm on the shared clock that, when due after something was heard, is set again
    for the rest of the time."""

    def __init__(self, timeout: float | None, kill: Callable[[], None]) -> None:
        self.timeout = timeout
        self.fired = False
        self._kill = kill
        self._last_heard = time.monotonic()
        self._stopped = False
        self._alarm = None if timeout is None else CLOCK.after(timeout, self._check)

    def _check(self) -> None:
        if self._stopped or self.timeout is None:
            return
        left = self._last_heard + self.timeout - time.monotonic()
        if left > 0:
            self._alarm = CLOCK.after(left, self._check)
            return
        self.fired = True
        with contextlib.suppress(Exception):  # a connection gone is stopped
            self._kill()

    def heard(self) -> None:
        self._last_heard = time.monotonic()

    def stop(self) -> None:
        self._stopped = True
        if self._alarm is not None:
            self._alarm.cancel()

    def error(self, host: str, argv: Sequence[str]) -> ConnectError:
        return ConnectError(f"{host}: {argv[0]}: no answer within {self.timeout:g}s")


def sudo_prefix(user_is_root: bool, become: bool) -> list[str]:
    """What a command run with become is prefixed with: a non-interactive sudo when the
    login user is not root."""
    return [] if user_is_root or not become else ["sudo", "-n", "--"]


def partial_name(remote: str) -> str:
    """Where an upload goes before its atomic rename: its own name, so two controllers
    shipping the same file to one host at once do not write into each other's."""
    return f"{remote}.{secrets.token_hex(4)}.part"


class StderrCollector:
    """Drains a stream in a thread, keeping the last STDERR_TAIL_BYTES.

    Reading stderr as it comes keeps a chatty remote from filling the SSH window and
    blocking the stdout we actually care about.
    """

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self._tail = bytearray()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while True:
            try:
                chunk = self._read(4096)
            except Exception:  # whatever broke the stream, its tail is complete
                return
            if not chunk:
                return
            self._tail += chunk
            del self._tail[:-STDERR_TAIL_BYTES]

    def text(self) -> str:
        self._thread.join(timeout=2)
        return self._tail.decode(errors="replace")
