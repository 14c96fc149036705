"""Detached runs through the Session and stapctl.detach, against fake connections running
the real agent on FakeKernel, its detached process a thread (test doubles; no SSH, stap
or qemu): apply --detach records where each probe runs; runs show, collect, attach and
stop reach them again over fresh connections; `runs list --json`/`runs show --json`
give their documented shapes."""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from stapctl.runtime import stapctl_agent as agent

from stapctl.agent import Timing
from stapctl.cli import cli
from stapctl.errors import ManifestError
from stapctl.execute import RunOptions
from stapctl.manifest import load_manifest
from stapctl.models import DetachSpec, Manifest, Probe
from stapctl.session import Session, detached_run
from stapctl.store import read_detached
from tests.agent.fakekernel import Scenario
from tests.fleet_double import FakeBuilder, FakeFleet

pytestmark = pytest.mark.unit

TICKS = [("print", 0, b"tick %d\n" % i) for i in range(3)]
SPEC = DetachSpec(max_duration=30.0, max_disk=1 << 20, file_size=4096, file_count=8)


@pytest.fixture(autouse=True)
def detached_in_threads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Fault-injection double for the double fork (the fake kernel lives in this
    process); run records in the test's folder."""
    threads: list[threading.Thread] = []

    def spawn(target: Callable[[], object], _log_path: str) -> None:
        thread = threading.Thread(target=target, daemon=True)
        threads.append(thread)
        thread.start()

    monkeypatch.setattr(agent, "daemonize", spawn)
    monkeypatch.setattr(agent.Run, "startup_timeout", 2.0)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    yield
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive(), "a detached run did not end"


def manifest(tmp_path: Path) -> Manifest:
    path = tmp_path / "trace.yaml"
    path.write_text("name: trace\n")
    probe = Probe(name="p", template="probe oneshot { println(1) }", origin=str(path),
                  first_line=1)
    return Manifest(path=path, name="trace", probes=(probe,), detach=SPEC)


def alive(fleet: FakeFleet, host: str) -> None:
    """The fake /proc of a host shows this process as the agent: its detached run (a
    thread here) counts as running."""
    folder = fleet.root / host / "kernel" / "proc" / str(os.getpid())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cmdline").write_text(f"python3\0-I\0{os.path.abspath(agent.__file__)}\0")


def start(tmp_path: Path, scenarios: dict[str, Scenario]) -> tuple[FakeFleet, str]:
    fleet = FakeFleet(tmp_path / "hosts", scenarios)
    for host in scenarios:
        alive(fleet, host)
    session = Session(manifest(tmp_path), fleet.hosts(),
                      options=RunOptions(timing=Timing(exit_timeout=1.0)),
                      builder=FakeBuilder(tmp_path / "cache"), connector=fleet.connect)
    run = session.apply()
    assert run.exit_code == 0, run.outcomes
    assert all(o.message.startswith("detached: running") for o in run.outcomes)
    return fleet, run.id


def test_detached_probes_are_recorded_and_reached_again(tmp_path: Path) -> None:
    scenarios = {"a": Scenario(running=TICKS), "b": Scenario(running=TICKS)}
    fleet, run_id = start(tmp_path, scenarios)
    detached = detached_run(run_id, connector=fleet.connect)
    assert sorted(p.host.name for p in detached.probes) == ["a", "b"]
    assert all(p.name == f"{run_id}.p" for p in detached.probes)

    states = detached.status()
    assert [s.word for s in states] == ["running", "running"]
    time.sleep(0.5)
    first = detached.collect()
    assert sorted(f.new_bytes for f in first) == [21, 21]
    out = tmp_path / "data" / "stapctl" / "runs" / run_id / "collected" / "a" / "p.out"
    assert out.read_bytes() == b"tick 0\ntick 1\ntick 2\n"
    second = detached.collect()
    assert [f.new_bytes for f in second] == [0, 0]  # only new bytes
    shown = CliRunner().invoke(cli, ["runs", "show", run_id, "--host", "a"])
    assert shown.output == "tick 0\ntick 1\ntick 2\n"

    stopped = detached.stop()
    assert {f.state["state"] for f in stopped} == {"finished"}
    assert {f.state["reason"] for f in stopped} == {"stop"}
    assert out.read_bytes() == b"tick 0\ntick 1\ntick 2\n"
    assert not (fleet.root / "a" / "home" / ".cache" / "stapctl-agent" / "detached"
                / f"{run_id}.p").exists()  # the final collect removed its files
    fleet.unreachable.update(scenarios)  # the run folder remembers how they ended
    assert {s.state["reason"] for s in detached_run(run_id, connector=fleet.connect)
            .status()} == {"stop"}


def test_attach_streams_until_the_runs_end(tmp_path: Path) -> None:
    later = [("sleep", 1.5), ("print", 0, b"later\n"), ("sleep", 0.3), ("request_exit",)]
    fleet, run_id = start(tmp_path, {"a": Scenario(begin=[("print", 0, b"first\n")],
                                                   running=later)})
    time.sleep(0.5)
    lines: list[tuple[str, str, str]] = []
    states = detached_run(run_id, connector=fleet.connect).attach(
        lambda *line: lines.append(line))
    assert lines == [("a", "p", "later")]
    assert [s.word for s in states] == ["finished"]
    again = detached_run(run_id, connector=fleet.connect).attach(
        lambda *line: lines.append(line), from_start=True)
    assert lines[1:] == [("a", "p", "first"), ("a", "p", "later")]
    assert [s.state["reason"] for s in again] == ["exit()"]


def test_an_unreachable_host_is_reported_so(tmp_path: Path) -> None:
    fleet, run_id = start(tmp_path, {"a": Scenario(running=[("sleep", 0.2),
                                                            ("request_exit",)])})
    fleet.unreachable.add("a")
    assert [s.word for s in detached_run(run_id, connector=fleet.connect).status()] == \
        ["unreachable"]
    fleet.unreachable.clear()
    time.sleep(0.5)
    assert [s.state["reason"] for s in detached_run(run_id, connector=fleet.connect)
            .status()] == ["exit()"]


def test_runs_json_shapes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet, run_id = start(tmp_path, {"a": Scenario(running=[("sleep", 0.2),
                                                            ("request_exit",)])})
    runner = CliRunner()
    listed = json.loads(runner.invoke(cli, ["runs", "list", "--json"]).output)
    assert listed[0]["id"] == run_id and listed[0]["name"] == "trace"
    assert listed[0]["outcomes"] == {"ok": 1} and listed[0]["exit_code"] == 0
    assert listed[0]["started"].endswith("Z") and listed[0]["finished"].endswith("Z")
    assert listed[0]["hosts"] == 1
    # runs show reaches the hosts the way they were recorded (the fake fleet's names)
    time.sleep(0.5)
    monkeypatch.setattr("stapctl.cli.detached_run",
                        functools.partial(detached_run, connector=fleet.connect))
    shown = json.loads(runner.invoke(cli, ["runs", "show", run_id, "--json"]).output)
    assert shown["id"] == run_id and shown["interrupted"] is False
    assert shown["dir"].endswith(run_id) and shown["detached"] == {"a": "finished"}
    assert shown["outcomes_detail"][0]["host"] == "a"


def test_unfinished_runs_list_nulls(tmp_path: Path) -> None:
    from stapctl.history import list_runs
    from stapctl.store import RunRecorder, run_json
    recorder = RunRecorder("20260101-000000-trace-abcd", manifest(tmp_path))
    assert recorder.dir.exists() and recorder.listed()
    row = run_json(list_runs()[0])
    assert row["finished"] is None and row["exit_code"] is None and row["outcomes"] == {}


def test_the_manifest_key_and_its_sizes(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("apiVersion: stapctl/v1\nkind: Trace\nname: m\n"
                    "detach: {max_duration: 2h, max_disk: 10MiB, file_size: 1MB}\n"
                    "probes: [{name: p, script: 'probe oneshot { println(1) }'}]\n")
    spec = load_manifest(path).detach
    assert spec == replace(DetachSpec(), max_duration=7200.0, max_disk=10 << 20,
                           file_size=1000 * 1000)
    path.write_text(path.read_text().replace("detach: {max_duration: 2h, max_disk: 10MiB, "
                                             "file_size: 1MB}", "detach: true"))
    assert load_manifest(path).detach == DetachSpec()
    assert "24h" in DetachSpec().describe() and "1 GiB" in DetachSpec().describe()


def test_read_detached_of_an_attached_run_is_empty(tmp_path: Path) -> None:
    assert read_detached(tmp_path) == []


def test_bad_detach_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("apiVersion: stapctl/v1\nkind: Trace\nname: m\n"
                    "probes: [{name: p, script: 'probe oneshot { println(1) }'}]\n"
                    "detach: {max_disk: 0}\n")
    runner = CliRunner()
    bad_key = runner.invoke(cli, ["validate", str(path)])  # main() prints it, exit 2
    assert isinstance(bad_key.exception, ManifestError) and bad_key.exception.exit_code == 2
    assert f"{path}:5" in str(bad_key.exception) and "max_disk" in str(bad_key.exception)
    path.write_text(path.read_text().replace("detach: {max_disk: 0}\n", ""))
    unbound = runner.invoke(cli, ["apply", "--max-disk", "10MB", str(path)])
    assert unbound.exit_code == 2 and "add --detach" in unbound.output
    bad_size = runner.invoke(cli, ["apply", "--detach", "--max-disk", "10XB", str(path)])
    assert bad_size.exit_code == 2 and "expected a size" in bad_size.output
    assert "10 MB" in replace(DetachSpec(), max_disk=10**7).describe()
