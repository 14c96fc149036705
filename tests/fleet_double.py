"""Test doubles for driving a whole Session without SSH, stap or a kernel.

FakeConnection is a Connection whose agent is the real agent (runtime/stapctl_agent.py),
run in a thread against tests/agent's FakeKernel; FakeBuilder hands out a prebuilt fake
module for every spec instead of compiling. A HostileProcess is a stand-in agent that
sends whatever bytes a test gives it. Together they let the rollout policy, interrupts,
deadlines and hostile streams be tested in well under a second each.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from stapctl.runtime import stapctl_agent as wire

from stapctl.agent import WORKDIR
from stapctl.build import Builder
from stapctl.connection import ConnectOptions, Process
from stapctl.errors import ConnectError
from stapctl.models import Host, ModuleArtifact, ModuleSpec
from stapctl.toolchains import Toolchain
from tests.agent.fakekernel import RELEASE, FakeKernel, Scenario, make_ko


class SocketProcess:
    """A Process over two socketpairs: what the controller sees of an agent."""

    def __init__(self) -> None:
        self.stdin_ours, self.stdin_theirs = socket.socketpair()
        self.stdout_ours, self.stdout_theirs = socket.socketpair()
        self.code = 0
        self.done = threading.Event()
        self.killed = threading.Event()

    def send(self, data: bytes) -> None:
        try:
            self.stdin_ours.sendall(data)
        except OSError as exc:
            raise ConnectError(f"fake agent gone: {exc}") from exc

    def close_stdin(self) -> None:
        with contextlib.suppress(OSError):
            self.stdin_ours.shutdown(socket.SHUT_WR)

    def recv(self, size: int) -> bytes:
        try:
            return self.stdout_ours.recv(size)
        except OSError:
            return b""

    def stderr_tail(self) -> str:
        return ""

    def wait(self) -> int:
        self.done.wait(10)
        return self.code

    def kill(self) -> None:
        self.killed.set()
        for end in (self.stdin_ours, self.stdout_ours):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


class AgentProcess(SocketProcess):
    """The real agent, serving FakeKernel in a thread, as the file at ``path`` (its HELLO
    says where it runs)."""

    def __init__(self, kernel: FakeKernel, path: str) -> None:
        super().__init__()
        self.thread = threading.Thread(target=self._serve, args=(kernel, path), daemon=True)
        self.thread.start()

    def _serve(self, kernel: FakeKernel, path: str) -> None:
        try:
            self.code = wire.serve(kernel, self.stdin_theirs.fileno(),
                                   self.stdout_theirs.fileno(), gap_wait=0.05, path=path)
        finally:
            self.stdout_theirs.close()
            self.stdin_theirs.close()
            self.done.set()


class HostileProcess(SocketProcess):
    """A stand-in agent (test double) that sends ``stream`` and then, unless ``hang``,
    closes; it never reads its request."""

    def __init__(self, stream: bytes | Callable[[socket.socket], None],
                 hang: bool = False) -> None:
        super().__init__()
        self.stream = stream
        self.hang = hang
        threading.Thread(target=self._play, daemon=True).start()

    def _play(self) -> None:
        try:
            if callable(self.stream):
                self.stream(self.stdout_theirs)
            else:
                self.stdout_theirs.sendall(self.stream)
            if self.hang:
                self.killed.wait(60)  # says nothing more, whatever it is sent, until cut off
        except OSError:
            pass
        finally:
            self.stdout_theirs.close()
            self.done.set()


class CompletedProcess(SocketProcess):
    """A short command's canned answer (the prepare command)."""

    def __init__(self, stdout: bytes) -> None:
        super().__init__()
        self.stdout_theirs.sendall(stdout)
        self.stdout_theirs.close()
        self.done.set()


def ls_aln(folder: Path) -> str:
    """What `ls -aln` says of ``folder``: the fields the prepare command's reader uses."""
    entries = [(".", folder.lstat()), *((path.name, path.lstat()) for path in folder.iterdir())]
    return "".join(f"{stat.filemode(st.st_mode)} 1 0 0 {st.st_size} Jan  1 00:00 {name}\n"
                   for name, st in entries)


class FakeConnection:
    """A Connection to a fake host: files live in a temporary folder, the prepare command
    makes the work directory there and gives canned facts (``facts``: what `uname -rm`
    prints), and the agent command runs ``agent(kernel, the agent file's path)``."""

    def __init__(self, host: Host, kernel: FakeKernel, home: Path,
                 agent: Callable[[FakeKernel, str], Process] = AgentProcess,
                 facts: bytes = f"{RELEASE} x86_64\n".encode()) -> None:
        self.host = host
        self.kernel = kernel
        self._home = home
        self._agent = agent
        self._facts = facts
        self.closed = False

    def open(self) -> None:
        pass  # FakeFleet.connect, the connector, hands it over ready to use

    def put(self, local: Path, remote: str) -> None:
        shutil.copyfile(local, remote)

    def read_file(self, path: str, limit: int) -> bytes:
        return Path(self.kernel.root, path.lstrip("/")).read_bytes()[:limit]

    def sudo(self) -> list[str]:
        return []

    def start(self, argv: Sequence[str], become: bool = True) -> Process:
        if self.closed:
            raise ConnectError(f"{self.host.name}: connection closed")
        if argv[0] == "sh":  # AgentHost.prepare: the home, facts, the work directory's listing
            workdir = self._home / WORKDIR
            workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
            return CompletedProcess(f"{self._home}\n".encode() + self._facts
                                    + ls_aln(workdir).encode() + b"/usr/bin/python3\n")
        path = argv[argv.index("-c") + 2]  # agent_argv: the agent file, after BOOTSTRAP
        return self._agent(self.kernel, str(self._home / path))  # relative: from the home

    def close(self) -> None:
        self.closed = True


class FakeFleet:
    """Fake hosts by name, each with its own kernel scenario; ``connect`` is the
    connector a Session is given."""

    def __init__(self, root: Path, scenarios: dict[str, Scenario],
                 unreachable: Sequence[str] = (),
                 agents: dict[str, Callable[[FakeKernel, str], Process]] | None = None,
                 facts: dict[str, bytes] | None = None) -> None:
        self.root = root
        self.scenarios = scenarios
        self.unreachable = set(unreachable)
        self.agents = agents or {}
        self.facts = facts or {}
        self.kernels: dict[str, FakeKernel] = {}
        self.connections: dict[str, FakeConnection] = {}
        self.order: list[str] = []  # the hosts in the order they were connected
        self._lock = threading.Lock()

    def hosts(self) -> list[Host]:
        return [Host(name=name, address=name) for name in self.scenarios]

    def connect(self, host: Host, options: ConnectOptions) -> FakeConnection:
        if host.name in self.unreachable:
            raise ConnectError(f"{host.name}:22: connection refused (test double)")
        kernel = FakeKernel(self.root / host.name / "kernel", self.scenarios[host.name])
        home = self.root / host.name / "home"
        home.mkdir(parents=True, exist_ok=True)
        extra = {"facts": self.facts[host.name]} if host.name in self.facts else {}
        connection = FakeConnection(host, kernel, home,
                                    self.agents.get(host.name, AgentProcess), **extra)
        with self._lock:
            self.kernels[host.name] = kernel
            self.connections[host.name] = connection
            self.order.append(host.name)
        return connection

    def loaded(self) -> dict[str, list[str]]:
        """Modules still loaded, per host: a test's proof that nothing was left behind."""
        return {name: list(kernel.modules) for name, kernel in self.kernels.items()
                if kernel.modules}


class FakeBuilder(Builder):
    """Hands out one prebuilt fake module (a minimal ELF the agent accepts) for every
    spec; never runs stap (test double)."""

    def __init__(self, root: Path, name: str = "stapctl_0123456789abcdef") -> None:
        super().__init__(root, Toolchain(stap="stap", stap_version="test", runtime=root))
        image = make_ko(name)
        self.path = root / "module.ko"
        root.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(image)
        self.artifact = ModuleArtifact(key="", path=self.path,
                                       sha256=hashlib.sha256(image).hexdigest(),
                                       module_name=name)

    def cached(self, spec: ModuleSpec) -> ModuleArtifact | None:
        return ModuleArtifact(key=spec.key, path=self.artifact.path,
                              sha256=self.artifact.sha256,
                              module_name=self.artifact.module_name)



def agents_started(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float]]:
    """(host, when) of each agent a FakeConnection starts from now on, the prepare
    command left out."""
    started: list[tuple[str, float]] = []
    start = FakeConnection.start

    def counted(self: FakeConnection, argv: Sequence[str], become: bool = True) -> Process:
        if argv[0] != "sh":
            started.append((self.host.name, time.time()))
        return start(self, argv, become)

    monkeypatch.setattr(FakeConnection, "start", counted)
    return started


@pytest.fixture(autouse=True)
def quick_agent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The agent's own retry waits, shortened; run records in the test's folder. Import
    it into a test module to apply it to every test there."""
    monkeypatch.setattr(wire.Run, "startup_timeout", 2.0)
    monkeypatch.setattr(wire.ControlChannel, "open_retry", 0.2)
    monkeypatch.setattr(wire.Run, "unload_retry", 0.5)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
