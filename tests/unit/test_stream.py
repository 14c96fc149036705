"""A run without an engine is streamed: each host connected, planned and run in one go
(Session.stream), against fake connections running the real agent on tests/agent's
FakeKernel (test doubles; no SSH, stap or qemu)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from stapctl.connection import ConnectOptions
from stapctl.errors import ManifestError
from stapctl.models import (
    FailureKind,
    Host,
    HostFacts,
    Manifest,
    ModuleArtifact,
    ModuleSpec,
    Percent,
    Probe,
    Strategy,
)
from stapctl.plan import ModuleJob, Plan
from tests.agent.fakekernel import RELEASE, Scenario
from tests.fleet_double import (
    FakeBuilder,
    FakeConnection,
    FakeFleet,
    agents_started,
    quick_agent,  # noqa: F401 - autouse: shortened agent waits
)
from tests.unit.test_fleet import HELLO_EXIT, by_host, session

pytestmark = pytest.mark.unit


class CountingFleet(FakeFleet):
    """A FakeFleet that counts each host's connects and the connections open at once."""

    def __init__(self, root: Path, scenarios: dict[str, Scenario], **kwargs: object) -> None:
        super().__init__(root, scenarios, **kwargs)  # type: ignore[arg-type]
        self.connects: dict[str, int] = {}
        self.open = 0
        self.most_open = 0
        self._count_lock = threading.Lock()

    def connect(self, host: Host, options: ConnectOptions) -> FakeConnection:
        connection = super().connect(host, options)
        with self._count_lock:
            self.connects[host.name] = self.connects.get(host.name, 0) + 1
            self.open += 1
            self.most_open = max(self.most_open, self.open)
        close = connection.close

        def closed() -> None:
            if not connection.closed:
                with self._count_lock:
                    self.open -= 1
            close()

        connection.close = closed  # type: ignore[method-assign]
        return connection


class SlowBuilder(FakeBuilder):
    """Caches nothing, and takes a moment to build: counts its builds."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.builds = 0

    def cached(self, spec: ModuleSpec) -> ModuleArtifact | None:
        return None

    def build(self, spec: ModuleSpec) -> ModuleArtifact:
        self.builds += 1
        time.sleep(0.3)
        return super().cached(spec)  # type: ignore[return-value]


def hello_fleet(tmp_path: Path, count: int, **kwargs: object) -> CountingFleet:
    return CountingFleet(tmp_path, {f"h{i}": Scenario(**HELLO_EXIT) for i in range(count)},
                         **kwargs)


def test_each_host_is_connected_once_with_forks_connections_open_at_most(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = hello_fleet(tmp_path, 7)
    assert session(tmp_path, fleet)[0].apply().exit_code == 0  # ships the agent
    fleet.connects.clear()
    fleet.most_open = 0
    started = agents_started(monkeypatch)

    streamed, listener = session(tmp_path, fleet, Strategy(forks=3))
    assert streamed.streams
    run = streamed.apply()

    assert run.exit_code == 0, run.outcomes
    assert {o.host for o in run.outcomes if o.ok} == {f"h{i}" for i in range(7)}
    for host in fleet.scenarios:
        assert [e.text for e in listener.events
                if e.host == host and e.kind == "output"] == ["hello, world!"]
    assert fleet.connects == {f"h{i}": 1 for i in range(7)}  # none parked, none opened again
    assert fleet.most_open == 3 and fleet.open == 0
    # one agent each, started at the connect (its spare): no prepare command ran
    connected = {e.host: e.time for e in listener.events if e.kind == "connected"}
    assert sorted(host for host, _ in started) == sorted(fleet.scenarios)
    assert all(when <= connected[host] for host, when in started)
    assert fleet.loaded() == {}
    assert any(note.startswith("phase: connecting to and running on 7 host(s), 3 at once")
               for note in listener.notes)
    assert streamed.recorder is not None
    plan = json.loads((streamed.recorder.dir / "plan.json").read_text())
    assert [sorted(job["hosts"]) for job in plan] == [sorted(fleet.scenarios)]


def test_a_streamed_run_ends_as_the_same_run_connected_first_would(tmp_path: Path) -> None:
    scenarios = {f"h{i}": Scenario(**HELLO_EXIT) for i in range(4)}
    scenarios["h2"] = Scenario(load_errno=8)  # ENOEXEC: built for another kernel
    ends = []
    for staged in (True, False):
        folder = tmp_path / ("staged" if staged else "streamed")
        folder.mkdir()
        fleet = CountingFleet(folder, dict(scenarios), unreachable=["h3"])
        run_session, listener = session(folder, fleet, Strategy(forks=2))
        assert run_session.streams
        if staged:  # the library's stages, one after the other
            run_session.run(run_session.build(run_session.plan(run_session.connect(True))))
            run = run_session.finish()
        else:
            run = run_session.apply()
        ends.append((run.exit_code, {host: (o.status, o.kind) for host, o in
                                     by_host(run.outcomes).items()},
                     sorted((e.host, e.text) for e in listener.events if e.kind == "output")))
    assert ends[0] == ends[1]
    assert ends[1][1]["h3"] == ("unreachable", FailureKind.UNREACHABLE)
    assert ends[1][1]["h2"][0] == "failed" and ends[1][1]["h0"][0] == "ok"


class LateFleet(CountingFleet):
    """A CountingFleet whose host h0 answers its connect only once every other host has
    connected and closed its connection again (or after 10 s)."""

    def connect(self, host: Host, options: ConnectOptions) -> FakeConnection:
        if host.name == "h0":
            others = set(self.scenarios) - {"h0"}
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (
                    others <= set(self.connects) and self.open == 0):
                time.sleep(0.01)
        return super().connect(host, options)


def test_no_host_waits_for_another_s_connect(tmp_path: Path) -> None:
    """The hosts that answer run and end while a slow one is still connecting; connected
    first, they would have waited for it."""
    fleet = LateFleet(tmp_path, {f"h{i}": Scenario(**HELLO_EXIT) for i in range(3)})
    run_session, listener = session(tmp_path, fleet)
    run = run_session.apply()

    assert run.exit_code == 0, run.outcomes
    kinds = [(e.host, e.kind) for e in listener.events]
    assert max(kinds.index((h, "finished")) for h in ("h1", "h2")) < \
        kinds.index(("h0", "connected")) < kinds.index(("h0", "finished"))


def test_the_canary_still_ends_before_another_host_connects(tmp_path: Path) -> None:
    fleet = hello_fleet(tmp_path, 4)
    run_session, listener = session(tmp_path, fleet, Strategy(forks=2,
                                                              serial=(1, Percent(100))))
    assert run_session.apply().exit_code == 0
    kinds = [(e.host, e.kind) for e in listener.events]
    canary_done = kinds.index(("h0", "finished"))
    assert canary_done < min(kinds.index((h, "connected")) for h in ("h1", "h2", "h3"))


def test_a_module_is_built_once_for_every_host_waiting_for_it(tmp_path: Path) -> None:
    fleet = hello_fleet(tmp_path, 5)
    builder = SlowBuilder(tmp_path / "cache")
    run_session, _ = session(tmp_path, fleet, Strategy(forks=4))
    run_session.builder = builder
    run = run_session.apply()

    assert run.exit_code == 0, run.outcomes
    assert builder.builds == 1


class CountingBuilder(SlowBuilder):
    """A SlowBuilder that also counts the builds under way at once."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.building = 0
        self.most_at_once = 0
        self._count_lock = threading.Lock()

    def build(self, spec: ModuleSpec) -> ModuleArtifact:
        with self._count_lock:
            self.building += 1
            self.most_at_once = max(self.most_at_once, self.building)
        try:
            return super().build(spec)
        finally:
            with self._count_lock:
                self.building -= 1


def test_a_mixed_fleet_compiles_one_module_per_cpu_at_most(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    kernels = {f"h{i}": f"6.1.0-{i}-amd64 x86_64\n".encode() for i in range(5)}
    fleet = CountingFleet(tmp_path, {name: Scenario(**HELLO_EXIT) for name in kernels},
                          facts=kernels)
    builder = CountingBuilder(tmp_path / "cache")
    run_session, listener = session(tmp_path, fleet, Strategy(forks=4))  # 4 kernels at once
    run_session.builder = builder
    run_session.apply()

    assert builder.builds == 5  # a module per kernel
    assert builder.most_at_once == 2


def test_a_template_that_fails_on_a_host_s_facts_starts_no_other_host(
        tmp_path: Path) -> None:
    fleet = hello_fleet(tmp_path, 4)
    run_session, _ = session(tmp_path, fleet, Strategy(forks=1))
    broken = Probe(name="p", template="probe oneshot { println({{ missing.value }}) }",
                   origin=str(tmp_path / "trace.yaml"), first_line=1)
    manifest: Manifest = run_session.manifest
    run_session.manifest = run_session.fleet.manifest = Manifest(
        path=manifest.path, name=manifest.name, probes=(broken,), strategy=manifest.strategy)

    with pytest.raises(ManifestError):
        run_session.apply()
    assert list(fleet.connects) == ["h0"]  # the first host's facts showed it; no other began
    assert fleet.open == 0 and fleet.loaded() == {}
    assert run_session.recorder is not None
    summary = json.loads((run_session.recorder.dir / "summary.json").read_text())
    assert {o["host"]: o["status"] for o in summary["outcomes"]} == {
        f"h{i}": "skipped" for i in range(4)}


def test_the_caller_s_plan_can_stand_in_for_planning(tmp_path: Path) -> None:
    """``stream(plan_for)``: what each host runs comes from the caller (bench/fanout.py
    gives prebuilt modules); nothing is planned or built by the session."""
    fleet = hello_fleet(tmp_path, 3)
    builder = SlowBuilder(tmp_path / "cache")
    run_session, _ = session(tmp_path, fleet, Strategy(forks=1))
    run_session.builder = builder
    prebuilt = FakeBuilder(tmp_path / "prebuilt")
    probe = run_session.manifest.probes[0]
    asked: list[tuple[str, str]] = []

    def plan_for(host: Host, facts: HostFacts) -> Plan:
        asked.append((host.name, facts.release))
        spec = ModuleSpec(script=probe.template, release=facts.release, arch=facts.arch)
        return Plan(jobs=(ModuleJob(probe=probe, spec=spec, hosts=(host.name,),
                                    artifact=prebuilt.cached(spec)),))

    run_session.stream(plan_for)
    run = run_session.finish()
    assert asked == [(f"h{i}", RELEASE) for i in range(3)]
    assert run.exit_code == 0 and builder.builds == 0
