"""A spare agent (AgentHost.prepare(spare=True)) is started first, and its HELLO says what
the prepare command would have (folder, kernel, modules there), so a host that holds the
agent costs one command; the host's first call takes it. One that could not start, that is
another copy, or that waited too long, is replaced; BOOTSTRAP runs nothing from a folder
that is not private; a HELLO that is not one is the target's fault.

The target is this machine through the real LocalConnection (its commands start in the
home folder, as an SSH login's do), counting the commands it starts; a test double stands
in for a hostile agent.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from stapctl.runtime import stapctl_agent as wire

from stapctl import agent as agent_module
from stapctl.agent import AgentHost, AgentRequest
from stapctl.connection import ConnectOptions, LocalConnection, Process
from stapctl.errors import AgentError, BadFactsError, ProtocolError, UnresponsiveError
from stapctl.models import Host

pytestmark = pytest.mark.unit


class CountingConnection(LocalConnection):
    """The real local connection, keeping the commands it starts and their processes."""

    def __init__(self) -> None:
        super().__init__(Host(name="local", address="local"), ConnectOptions())
        self.started: list[tuple[list[str], Process]] = []

    def start(self, argv: Sequence[str], become: bool = True) -> Process:
        process = super().start(argv, become)
        self.started.append((list(argv), process))
        return process

    def agents(self) -> list[Process]:
        return [process for argv, process in self.started if "-c" in argv
                and argv[argv.index("-c") + 1] == agent_module.BOOTSTRAP]

    def prepare_commands(self) -> int:
        return sum(argv[:3] == ["sh", "-c", agent_module.PREPARE_SCRIPT]
                   for argv, _ in self.started)


@pytest.fixture
def connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CountingConnection:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return CountingConnection()


FACTS = AgentRequest(action="facts")


def test_the_first_call_takes_the_spare(connection: CountingConnection) -> None:
    AgentHost(connection).prepare()  # ships the agent
    connection.started.clear()
    host = AgentHost(connection)
    host.prepare(spare=True)
    assert len(connection.agents()) == 1
    assert host.call(FACTS).ok
    assert len(connection.agents()) == 1  # the spare ran the call
    assert host.call(FACTS).ok
    assert len(connection.agents()) == 2  # a spare serves one call only


def test_without_a_spare_each_call_starts_the_agent(connection: CountingConnection) -> None:
    host = AgentHost(connection)
    host.prepare()
    assert connection.agents() == []
    assert host.call(FACTS).ok
    assert len(connection.agents()) == 1


def test_a_spare_started_before_the_agent_was_shipped_is_replaced(
        connection: CountingConnection) -> None:
    host = AgentHost(connection)
    host.prepare(spare=True)  # the first prepare: no agent there yet when the spare started
    spare = connection.agents()[0]
    assert spare.wait() != 0  # it found no agent file, and ran nothing
    assert host.call(FACTS).ok
    assert len(connection.agents()) == 2


def test_a_spare_that_waited_too_long_is_ended_and_replaced(
        connection: CountingConnection, monkeypatch: pytest.MonkeyPatch) -> None:
    AgentHost(connection).prepare()
    host = AgentHost(connection)
    host.prepare(spare=True)
    monkeypatch.setattr(agent_module, "SPARE_LIFETIME", 0.0)
    spare = connection.agents()[0]
    assert host.call(FACTS).ok
    assert len(connection.agents()) == 2
    assert spare.wait() != 0  # ended without a request, not left waiting for one


def test_an_unused_spare_is_ended(connection: CountingConnection) -> None:
    AgentHost(connection).prepare()
    host = AgentHost(connection)
    host.prepare(spare=True)
    host.discard_spare()
    assert connection.agents()[0].wait() != 0


@pytest.mark.parametrize("mode", [0o755, 0o750])
def test_the_agent_runs_nothing_from_a_folder_that_is_not_private(
        connection: CountingConnection, tmp_path: Path, mode: int) -> None:
    host = AgentHost(connection)
    host.prepare()
    workdir = tmp_path / "home" / ".cache" / "stapctl-agent"
    workdir.chmod(mode)  # as if changed after the prepare command looked
    with pytest.raises(AgentError, match=r"not a private \(0700\) folder"):
        host.call(FACTS)
    assert not (workdir / "__pycache__").exists()  # the agent file was never imported


def test_calls_side_by_side_take_the_spare_once(connection: CountingConnection) -> None:
    """A host's probes call at the same moment: one of them takes the spare, each of the
    others starts an agent of its own."""
    AgentHost(connection).prepare()
    for _ in range(5):
        connection.started.clear()
        assert calls_at_once(connection, 4) == [True] * 4
        assert len(connection.agents()) == 4  # the spare and three fresh starts


def calls_at_once(connection: CountingConnection, count: int) -> list[bool]:
    host = AgentHost(connection)
    host.prepare(spare=True)
    barrier = threading.Barrier(count)
    results: list[bool] = []

    def call() -> None:
        barrier.wait()
        results.append(host.call(FACTS).ok)

    threads = [threading.Thread(target=call) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_a_host_that_holds_the_agent_costs_one_command(connection: CountingConnection,
                                                      tmp_path: Path) -> None:
    """The spare's HELLO tells what the prepare command would have: the same facts,
    folder and module files."""
    prepared = AgentHost(connection)
    facts = prepared.prepare()  # ships the agent
    module = f"{'ab' * 32}.ko"
    (tmp_path / "home" / ".cache" / "stapctl-agent" / module).write_bytes(b"module")
    prepared.prepare()
    connection.started.clear()
    host = AgentHost(connection)
    assert host.prepare(spare=True) == facts
    assert connection.prepare_commands() == 0 and len(connection.started) == 1
    assert (host.workdir, host.path, host.modules) == (prepared.workdir, prepared.path,
                                                       prepared.modules) == (
        prepared.workdir, prepared.path, {module})
    assert host.call(FACTS).ok
    assert len(connection.started) == 1  # the spare ran the call


def test_another_copy_under_the_agents_name_is_shipped_again(
        connection: CountingConnection) -> None:
    shipped = AgentHost(connection)
    shipped.prepare()
    agent_file = Path(shipped.path)
    agent_file.write_text(agent_file.read_text() + "\n# another copy\n")
    connection.started.clear()
    host = AgentHost(connection)
    host.prepare(spare=True)
    assert connection.prepare_commands() == 1  # the spare told of another copy: looked
    assert agent_file.stat().st_size == agent_module.AGENT_SIZE  # and shipped this one
    assert host.call(FACTS).ok


# A hostile agent (a test double): it writes these bytes, is silent for a while, then
# waits for its stdin's end (or, given a negative pause, ends at once).
HOSTILE = "import sys, time; sys.stdout.buffer.write(bytes.fromhex(sys.argv[1])); " \
          "sys.stdout.flush(); p = float(sys.argv[2]); time.sleep(max(p, 0)); " \
          "p < 0 or sys.stdin.read()"


class HostileAgentConnection(CountingConnection):
    """Runs a test double where the agent would run: it sends ``stream``, silent for
    ``pause`` seconds before it reads its stdin (a negative pause: it ends at once)."""

    def __init__(self, stream: bytes, pause: float = 0.0) -> None:
        super().__init__()
        self.stream, self.pause = stream, pause

    def start(self, argv: Sequence[str], become: bool = True) -> Process:
        if agent_module.BOOTSTRAP in argv:
            argv = [sys.executable, "-c", HOSTILE, self.stream.hex(), str(self.pause)]
        return super().start(argv, become)


def hello(**host: object) -> bytes:
    """A HELLO as the agent here would say it, but for ``host``'s fields."""
    release, arch = wire.Kernel().uname()
    here = {"workdir": str(Path.home() / ".cache" / "stapctl-agent"), "release": release,
            "agent_size": agent_module.AGENT_SIZE, "arch": arch, "modules": []}
    here.update(host)
    frame: bytes = wire.encode_json_frame(wire.FRAME_HELLO, {"protocol": 1, "host": here})
    return frame


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


@pytest.mark.parametrize("stream, error", [
    (lambda: hello(release="../../x"), BadFactsError),
    (lambda: hello(arch=None), ProtocolError),
    (lambda: hello(workdir="/etc"), ProtocolError),
    (lambda: hello(workdir="relative/.cache/stapctl-agent"), ProtocolError),
    (lambda: hello(workdir="/home/\x1b[31m/.cache/stapctl-agent"), ProtocolError),
    (lambda: wire.encode_frame(wire.FRAME_OUTPUT, b"not a hello"), ProtocolError),
    (lambda: wire.FRAME_HEADER.pack(ord(wire.FRAME_HELLO), 2 << 20), ProtocolError),
    (lambda: hello()[:12], ProtocolError),  # the stream ends inside the frame
    (lambda: wire.encode_frame(wire.FRAME_HELLO, b"{not json"), ProtocolError),
])
def test_a_hello_that_is_not_one_is_the_targets_fault(home: Path, stream: object,
                                                      error: type[Exception]) -> None:
    connection = HostileAgentConnection(stream(), pause=-1)  # type: ignore[operator]
    with pytest.raises(error):
        AgentHost(connection).prepare(spare=True)
    assert connection.prepare_commands() == 0


def test_a_silent_agent_is_given_up_on_after_its_startup_allowance(home: Path) -> None:
    connection = HostileAgentConnection(b"", pause=60)
    with pytest.raises(UnresponsiveError, match="did not start within 0.5 s"):
        AgentHost(connection).prepare(spare=True, startup=0.5)


@pytest.mark.parametrize("stream", [b"", wire.encode_json_frame(wire.FRAME_HELLO, {"x": 1})])
def test_an_agent_that_says_nothing_of_the_host_leaves_it_to_the_prepare_command(
        home: Path, stream: bytes) -> None:
    """It ended unstarted, or is an agent that tells nothing: the prepare command looks."""
    connection = HostileAgentConnection(stream, pause=-1)
    facts = AgentHost(connection).prepare(spare=True)
    assert connection.prepare_commands() == 1
    assert facts.release == json.loads(hello()[5:])["host"]["release"]
