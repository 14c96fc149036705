"""The rollout policy through the Session, against fake connections running the real
agent on tests/agent's FakeKernel (test doubles; no SSH, stap or qemu)."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from stapctl.agent import AgentHost, Timing
from stapctl.execute import Fleet, RunOptions
from stapctl.models import Event, FailureKind, HostOutcome, Manifest, Percent, Probe, Strategy
from stapctl.plan import ModuleJob
from stapctl.session import Session
from tests.agent.fakekernel import Actions, Scenario
from tests.fleet_double import (
    FakeBuilder,
    FakeConnection,
    FakeFleet,
    agents_started,
    quick_agent,  # noqa: F401 - autouse: shortened agent waits
)

pytestmark = pytest.mark.unit

HELLO_EXIT = Actions(begin=[("print", 0, b"hello, world!\n")], running=[("request_exit",)])
FOREVER = Actions(begin=[("print", 0, b"up\n")], running=[("sleep", 30)])
ALL_AT_ONCE = Strategy()
QUICK = Timing(exit_timeout=1.0)


class Recorder:
    """A Listener that keeps everything it is told."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.notes: list[str] = []
        self.interrupts: list[tuple[int, int]] = []

    def phase(self, text: str) -> None:
        self.notes.append(f"phase: {text}")

    def event(self, event: Event) -> None:
        self.events.append(event)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def interrupted(self, count: int, signum: int) -> None:
        self.interrupts.append((count, signum))

    def build(self, job: ModuleJob, state: str) -> None:
        pass  # FakeBuilder's modules are all cached: nothing is built

    def tick(self) -> None:
        pass

    def kinds(self, host: str) -> list[str]:
        return [e.kind for e in self.events if e.host == host]


def manifest(tmp_path: Path, strategy: Strategy = ALL_AT_ONCE) -> Manifest:
    path = tmp_path / "trace.yaml"
    path.write_text("name: trace\n")
    probe = Probe(name="p", template="probe oneshot { println(1) }", origin=str(path),
                  first_line=1)
    return Manifest(path=path, name="trace", probes=(probe,), strategy=strategy)


def session(tmp_path: Path, fleet: FakeFleet, strategy: Strategy = ALL_AT_ONCE,
            timing: Timing = QUICK) -> tuple[Session, Recorder]:
    listener = Recorder()
    return Session(manifest(tmp_path, strategy), fleet.hosts(), listener=listener,
                   options=RunOptions(timing=timing), builder=FakeBuilder(tmp_path / "cache"),
                   connector=fleet.connect), listener


def by_host(outcomes: tuple[HostOutcome, ...]) -> dict[str, HostOutcome]:
    return {o.host: o for o in outcomes}


def test_every_host_runs_its_probe_and_nothing_stays_loaded(tmp_path: Path) -> None:
    fleet = FakeFleet(tmp_path, {f"h{i}": Scenario(**HELLO_EXIT) for i in range(3)})
    run_session, listener = session(tmp_path, fleet)
    run = run_session.apply()

    assert run.exit_code == 0, run.outcomes
    assert {o.host for o in run.outcomes if o.ok} == {"h0", "h1", "h2"}
    for host in ("h0", "h1", "h2"):
        assert [e.text for e in listener.events
                if e.host == host and e.kind == "output"] == ["hello, world!"]
        assert listener.kinds(host)[-1] == "finished"
    assert fleet.loaded() == {}
    assert run_session.recorder is not None
    summary = json.loads((run_session.recorder.dir / "summary.json").read_text())
    assert summary["exit_code"] == 0


def test_an_unreachable_host_fails_alone(tmp_path: Path) -> None:
    fleet = FakeFleet(tmp_path, {"good": Scenario(**HELLO_EXIT), "gone": Scenario()},
                      unreachable=["gone"])
    run = session(tmp_path, fleet)[0].apply()

    outcomes = by_host(run.outcomes)
    assert outcomes["good"].ok
    assert outcomes["gone"].status == "unreachable"
    assert outcomes["gone"].kind == FailureKind.UNREACHABLE
    assert run.exit_code == 3


def test_the_canary_ends_before_any_other_host_starts(tmp_path: Path) -> None:
    fleet = FakeFleet(tmp_path, {f"h{i}": Scenario(**HELLO_EXIT) for i in range(4)})
    run_session, listener = session(tmp_path, fleet, Strategy(serial=(1, Percent(100))))
    run = run_session.apply()

    assert run.exit_code == 0
    kinds = [(e.host, e.kind) for e in listener.events]
    canary_done = kinds.index(("h0", "finished"))
    first_other = min(kinds.index((h, "uploaded")) for h in ("h1", "h2", "h3"))
    assert canary_done < first_other


def test_a_failed_canary_past_max_fail_percentage_skips_the_rest(tmp_path: Path) -> None:
    scenarios = {"h0": Scenario(load_errno=8)}  # ENOEXEC: built for another kernel
    scenarios.update({f"h{i}": Scenario(**HELLO_EXIT) for i in range(1, 4)})
    fleet = FakeFleet(tmp_path, scenarios)
    strategy = Strategy(serial=(1, Percent(100)), max_fail_percentage=0)
    run = session(tmp_path, fleet, strategy)[0].apply()

    outcomes = by_host(run.outcomes)
    assert outcomes["h0"].kind == FailureKind.INSMOD_REFUSED
    for host in ("h1", "h2", "h3"):
        assert outcomes[host].status == "skipped"
        assert "max_fail_percentage" in outcomes[host].message
    assert not any(kernel.loads for name, kernel in fleet.kernels.items() if name != "h0")
    assert run.exit_code == 1


def test_the_first_outcome_of_a_host_wins(tmp_path: Path) -> None:
    events: list[Event] = []
    fleet = Fleet(manifest(tmp_path), RunOptions(), events.append)
    fleet.hosts.append("h")
    first = HostOutcome(host="h", probe="p", status="failed", kind=FailureKind.STOPPED)
    fleet.record(first)
    fleet.record(replace(first, status="ok", kind=None))
    fleet.settle()

    assert fleet.outcomes == [first]
    assert [e.kind for e in events] == ["failed"]


def test_an_interrupt_stops_every_host_cleanly_and_settles_the_run(tmp_path: Path) -> None:
    fleet = FakeFleet(tmp_path, {f"h{i}": Scenario(**FOREVER) for i in range(3)})
    run_session, listener = session(tmp_path, fleet)

    def interrupt_when_running() -> None:
        while sum(e.kind == "started" for e in list(listener.events)) < 3:
            threading.Event().wait(0.02)
        run_session.interrupt(15)

    threading.Thread(target=interrupt_when_running, daemon=True).start()
    run = run_session.apply()

    assert run.interrupted and run.exit_code == 143
    assert {o.kind for o in run.outcomes} == {FailureKind.STOPPED}
    assert listener.interrupts == [(1, 15)]
    assert fleet.loaded() == {}
    assert run_session.recorder is not None
    assert json.loads((run_session.recorder.dir / "summary.json").read_text())[
        "exit_code"] == 143


def test_an_interrupt_while_connecting_skips_the_hosts_not_yet_reached(tmp_path: Path) -> None:
    fleet = FakeFleet(tmp_path, {f"h{i}": Scenario(**HELLO_EXIT) for i in range(3)})
    run_session, _ = session(tmp_path, fleet, Strategy(forks=1))
    run_session.interrupt()  # before anything: every host is accounted for anyway
    run = run_session.apply()

    assert run.exit_code == 130
    assert sorted(o.host for o in run.outcomes) == ["h0", "h1", "h2"]
    assert all(o.status == "skipped" for o in run.outcomes)


def test_a_deadline_stops_the_probe(tmp_path: Path) -> None:
    fleet = FakeFleet(tmp_path, {"h": Scenario(**FOREVER)})
    run = session(tmp_path, fleet, Strategy(timeout=0.3))[0].apply()

    assert run.outcomes[0].kind == FailureKind.TIMED_OUT
    assert fleet.loaded() == {}


def test_an_agent_that_does_not_end_after_the_stop_is_cut(tmp_path: Path) -> None:
    fleet = FakeFleet(tmp_path, {"h": Scenario(answer_exit=False, **FOREVER)})
    timing = Timing(exit_timeout=5.0, stop_grace=0.3)
    run = session(tmp_path, fleet, Strategy(timeout=0.2), timing)[0].apply()

    outcome = run.outcomes[0]
    assert outcome.kind == FailureKind.TIMED_OUT
    assert "cut off" in outcome.message


def test_a_host_is_sent_only_what_its_prepare_command_did_not_find(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = FakeFleet(tmp_path, {"h": Scenario(**HELLO_EXIT)})
    first, _ = session(tmp_path, fleet)
    assert first.apply().exit_code == 0  # a new host: the agent and the module are sent
    sent: list[str] = []  # the agent goes by SFTP, a module with the request that runs it
    put, shipped = FakeConnection.put, AgentHost.module

    def counted_put(self: FakeConnection, local: Path, remote: str) -> None:
        sent.append(Path(remote).name)
        put(self, local, remote)

    def counted_module(self: AgentHost, local: Path, sha256: str,
                       again: bool = False) -> tuple[str, bytes]:
        remote, data = shipped(self, local, sha256, again)
        if data:
            sent.append(Path(remote).name)
        return remote, data

    monkeypatch.setattr(FakeConnection, "put", counted_put)
    monkeypatch.setattr(AgentHost, "module", counted_module)
    second, _ = session(tmp_path, fleet)
    assert second.apply().exit_code == 0
    assert sent == []  # both there, as the prepare command said: nothing sent

    builder = second.builder
    assert isinstance(builder, FakeBuilder)
    module = tmp_path / "h" / "home" / ".cache" / "stapctl-agent" / \
        f"{builder.artifact.sha256}.ko"
    module.unlink()
    third, listener = session(tmp_path, fleet)
    run = third.apply()
    assert run.exit_code == 0, run.outcomes
    assert sent == [module.name] and module.read_bytes() == builder.path.read_bytes()
    assert not any(e.kind == "warning" for e in listener.events)


def test_a_corrupt_module_on_the_host_is_sent_again(tmp_path: Path) -> None:
    fleet = FakeFleet(tmp_path, {"h": Scenario(**HELLO_EXIT)})
    run_session, listener = session(tmp_path, fleet)
    builder = run_session.builder
    assert isinstance(builder, FakeBuilder)
    workdir = tmp_path / "h" / "home" / ".cache" / "stapctl-agent"
    workdir.mkdir(mode=0o700, parents=True)  # private, as the prepare command makes it
    stale = workdir / f"{builder.artifact.sha256}.ko"
    stale.write_bytes(bytes(builder.path.stat().st_size))  # right size, wrong bytes
    run = run_session.apply()

    assert run.exit_code == 0, run.outcomes
    assert stale.read_bytes() == builder.path.read_bytes()
    assert any("corrupt" in e.text for e in listener.events if e.kind == "warning")


def test_spare_agents_start_at_the_connect_for_a_run_s_first_batch_or_a_stream(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = FakeFleet(tmp_path, {f"h{i}": Scenario(**HELLO_EXIT) for i in range(3)})
    started = agents_started(monkeypatch)  # (host, when) of each agent started
    assert session(tmp_path, fleet)[0].apply().exit_code == 0  # ships the agent
    started.clear()

    planning = session(tmp_path, fleet)[0]
    planning.connect()  # as `stapctl plan` and `stapctl probes` connect: no run follows
    planning.finish()
    assert started == []

    # the library's stages, every host connected first: only the first batch gets spares
    canary, listener = session(tmp_path, fleet, Strategy(serial=(1, Percent(100))))
    canary.run(canary.build(canary.plan(canary.connect(spares=True))))
    assert canary.finish().exit_code == 0
    assert sorted(host for host, _ in started) == ["h0", "h1", "h2"]  # one agent each
    connected = {e.host: e.time for e in listener.events if e.kind == "connected"}
    # the canary's agent started at the connect, as its spare; the others' at their turn
    assert [host for host, when in started if when < connected[host]] == ["h0"]

    for strategy in (Strategy(serial=(1, Percent(100))), Strategy(forks=2)):
        started.clear()
        streamed, listener = session(tmp_path, fleet, strategy)
        assert streamed.streams and streamed.apply().exit_code == 0
        connected = {e.host: e.time for e in listener.events if e.kind == "connected"}
        # each host connected and run in one go: every agent is its host's spare
        assert len(started) == 3 and all(when <= connected[host] for host, when in started)

