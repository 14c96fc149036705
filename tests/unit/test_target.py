"""A probe's target process through the Session, against fake connections running the
real agent on tests/agent's FakeKernel (test doubles: no SSH, stap or qemu); and the
target options of `stapctl run`."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from stapctl.runtime import stapctl_agent as agent

from stapctl import report
from stapctl.adhoc import AdhocRun, adhoc_manifest
from stapctl.display import HostBoard
from stapctl.execute import RunOptions
from stapctl.models import Event, EventKind, FailureKind, Target
from stapctl.session import Session
from tests.agent.fakekernel import Scenario, add_process
from tests.fleet_double import (
    FakeBuilder,
    FakeFleet,
    quick_agent,  # noqa: F401 - autouse: shortened agent waits
)
from tests.unit.test_adhoc import stapctl
from tests.unit.test_fleet import QUICK, Recorder, by_host, manifest

pytestmark = pytest.mark.unit

EXIT_AT_ONCE: dict[str, Any] = dict(running=[("request_exit",)])


def aimed(tmp_path: Path, fleet: FakeFleet, target: Target) -> tuple[Session, Recorder]:
    """The fake fleet's session, its one probe aimed at ``target``."""
    plain = manifest(tmp_path)
    aimed_manifest = replace(plain, probes=(replace(plain.probes[0], target=target),))
    listener = Recorder()
    return Session(aimed_manifest, fleet.hosts(), listener=listener,
                   options=RunOptions(timing=QUICK), builder=FakeBuilder(tmp_path / "cache"),
                   connector=fleet.connect), listener


def start_target(fleet: FakeFleet, host: str) -> int:
    payloads = [p for name, p in fleet.kernels[host].history[0].received if name == "START"]
    return int(agent.START.unpack(payloads[0])[0])


def test_a_host_without_the_process_fails_alone_with_no_target(tmp_path: Path) -> None:
    fleet = FakeFleet(tmp_path, {h: Scenario(**EXIT_AT_ONCE) for h in ("web1", "web2", "db")})
    for host, pid in (("web1", 300), ("web2", 41)):
        add_process(str(tmp_path / host / "kernel" / "proc"), pid, "nginx", "nginx: worker", 5)
    add_process(str(tmp_path / "web2" / "kernel" / "proc"), 40, "nginx", "nginx: master", 1)
    run_session, listener = aimed(tmp_path, fleet, Target(process="nginx"))
    run = run_session.apply()

    outcomes = by_host(run.outcomes)
    assert outcomes["web1"].ok and outcomes["web2"].ok
    assert outcomes["db"].kind == FailureKind.NO_TARGET
    assert outcomes["db"].message == "no process named 'nginx'"
    assert run.exit_code == 3
    assert start_target(fleet, "web1") == 300
    assert start_target(fleet, "web2") == 40  # the oldest of two
    warnings = [e.text for e in listener.events if e.host == "web2" and e.kind == "warning"]
    assert warnings == ["2 processes named 'nginx': aiming at the oldest, PID 40"]
    assert "db" not in fleet.kernels or fleet.kernels["db"].loads == []
    assert fleet.loaded() == {}


def test_a_commands_output_is_its_own_stream_and_recorded(tmp_path: Path) -> None:
    fleet = FakeFleet(tmp_path, {"web1": Scenario(begin=[("print", 0, b"probe line\n")])})
    command = "echo one; echo 'two \033[31mred' >&2"
    run_session, listener = aimed(tmp_path, fleet, Target(command=command))
    run = run_session.apply()

    assert run.exit_code == 0, run.outcomes
    assert run.outcomes[0].message == "the command exited with status 0"
    by_kind = {kind: [e.text for e in listener.events if e.kind == kind]
               for kind in ("output", "command-output")}
    assert by_kind["output"] == ["probe line"]
    assert by_kind["command-output"] == ["one", "two \033[31mred"]
    assert run_session.recorder is not None
    recorded = [json.loads(line) for line in
                (run_session.recorder.dir / "events.jsonl").read_text().splitlines()]
    assert [e["text"] for e in recorded if e["kind"] == "command-output"] == ["one",
                                                                             "two \033[31mred"]


def test_the_manifest_an_adhoc_target_amounts_to(tmp_path: Path) -> None:
    made = adhoc_manifest(AdhocRun(hosts="all", script="probe oneshot { exit() }",
                                   target=Target(process="nginx")))
    assert made.probes[0].target == Target(process="nginx")
    assert "target:\n    process: nginx" in made.path.read_text()
    plain = manifest(tmp_path)
    assert plain.probes[0].target is None
    each = adhoc_manifest(AdhocRun(hosts="all", script="probe oneshot { exit() }",
                                   target=Target(process="nginx", each=True)))
    assert each.probes[0].target == Target(process="nginx", each=True)
    assert each.labels_output and not made.labels_output


@pytest.mark.parametrize(("args", "message"), [
    (["-x", "12", "-c", "ls"], "error: -x and -c: give one target, as stap takes one"),
    (["--process", "a-name-longer-than-fifteen"], "cannot be a process name"),
    (["-c", " "], "error: -c: the command is empty"),
    (["-x", "0"], "0 is not in the range x>=1"),
    (["--each"], "error: --each: one run per match needs --process NAME"),
    (["-x", "12", "--each"], "error: --each: one run per match needs --process NAME"),
])
def test_bad_target_options_are_one_line_and_exit_2(tmp_path: Path, args: list[str],
                                                    message: str) -> None:
    result = stapctl(tmp_path, "run", "all", "-i", "web1,", *args, "-e",
                     "probe oneshot { exit() }")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_command_line_is_shown_apart_and_escaped() -> None:
    line = Event(host="web1", kind="command-output", probe="p", text="two \033[31mred",
                 time=0.0)
    shown = report.command_prefix(line)
    assert shown.startswith("web1[cmd]: two ")
    assert "\033" not in shown and "red" in shown


def test_one_run_per_match_gives_each_its_own_outcome_and_target(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The fake fleet's agents are threads of this one process, where real ones are
    # processes whose PIDs tell their module instances apart: tag them by thread instead.
    tag_by_pid = agent.runtime_name
    monkeypatch.setattr(agent, "runtime_name",
                        lambda name, _pid: tag_by_pid(name, str(threading.get_ident() % 10**5)))
    fleet = FakeFleet(tmp_path, {h: Scenario(begin=[("print", 0, b"hello\n")], **EXIT_AT_ONCE)
                                 for h in ("web1", "web2", "db")})
    for host, pid in (("web1", 300), ("web1", 310), ("web2", 41)):
        add_process(str(tmp_path / host / "kernel" / "proc"), pid, "nginx", "nginx: worker", 5)
    run_session, listener = aimed(tmp_path, fleet, Target(process="nginx", each=True))
    run = run_session.apply()

    ended = {(o.host, o.probe): o for o in run.outcomes}
    assert sorted(ended) == [("db", "p"), ("web1", "p[pid 300]"), ("web1", "p[pid 310]"),
                             ("web2", "p[pid 41]")]
    assert all(ended[key].ok for key in ended if key[0] != "db"), run.outcomes
    assert ended[("db", "p")].kind == FailureKind.NO_TARGET
    assert run.exit_code == 3
    started = {host: sorted(int(agent.START.unpack(p)[0]) for module in kernel.history
                            for name, p in module.received if name == "START")
               for host, kernel in fleet.kernels.items() if kernel.history}
    assert started == {"web1": [300, 310], "web2": [41]}
    assert [e for e in listener.events if e.kind == "warning"] == []  # none is left out
    output = sorted((e.host, e.probe) for e in listener.events if e.kind == "output")
    assert output == [("web1", "p[pid 300]"), ("web1", "p[pid 310]"), ("web2", "p[pid 41]")]
    assert fleet.loaded() == {}
    assert run_session.recorder is not None
    log = (run_session.recorder.dir / "hosts" / "web1.log").read_text()
    assert sorted(log.splitlines()) == ["[p[pid 300]] hello", "[p[pid 310]] hello"]


def test_a_hosts_row_ends_with_its_last_run_per_match() -> None:
    board = HostBoard(["web1"], probes=1)

    def see(kind: EventKind, probe: str) -> str:
        board.update(Event(host="web1", kind=kind, probe=probe, time=0.0))
        return board.rows["web1"].state

    assert see("started", "p[pid 300]") == "running"
    assert see("started", "p[pid 310]") == "running"
    assert see("finished", "p[pid 300]") == "running"  # the other is still under way
    assert see("stopping", "p[pid 300]") == "running"  # a late event of an ended run
    assert see("failed", "p[pid 310]") == "failed"
    assert see("stopping", "p[pid 310]") == "failed"
