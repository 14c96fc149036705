"""A spare agent (AgentHost.prepare(spare=True)) is started beside the prepare command so
that its Python start overlaps it; the host's first call takes it. One that could not start,
or that waited too long, is replaced; BOOTSTRAP runs nothing from a folder that is not
private.

The target is this machine through the real LocalConnection (its commands start in the
home folder, as an SSH login's do), counting the commands it starts.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from stapctl import agent as agent_module
from stapctl.agent import AgentHost, AgentRequest
from stapctl.connection import ConnectOptions, LocalConnection, Process
from stapctl.errors import AgentError
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
