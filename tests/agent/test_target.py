"""The run's target process: resolved by pid, comm or command line, or started held."""

import os
from pathlib import Path
from typing import Any

import pytest
from stapctl.runtime import stapctl_agent as agent

from tests.agent.fakekernel import Actions, FakeKernel, Scenario, add_process, drive, run_request

pytestmark = pytest.mark.agent

EXIT_AT_ONCE = Actions(running=[("request_exit",)])


def start_target(kernel: FakeKernel) -> int:
    """The target PID the agent wrote in START."""
    payloads = [p for name, p in kernel.history[0].received if name == "START"]
    pid: int = agent.START.unpack(payloads[0])[0]
    return pid


@pytest.fixture
def kernel(tmp_path: Path) -> FakeKernel:
    kernel = FakeKernel(tmp_path / "root", Scenario(**EXIT_AT_ONCE))
    add_process(kernel.proc_path(), 4321, "nginx", "nginx: worker process", 900)
    add_process(kernel.proc_path(), 4000, "nginx", "nginx: master process /usr/sbin/nginx", 500)
    add_process(kernel.proc_path(), 77, "my (odd) name", "python3 /srv/app.py --port 8080", 100)
    return kernel


def test_a_pid_is_passed_in_start(kernel: FakeKernel, tmp_path: Path) -> None:
    outcome = drive(kernel, run_request(tmp_path, target={"pid": 4321}))
    assert outcome.result["status"] == "ok", outcome.result
    assert start_target(kernel) == 4321
    assert outcome.events_named("target") == [{"event": "target", "pid": 4321}]


def test_no_target_means_pid_zero(kernel: FakeKernel, tmp_path: Path) -> None:
    drive(kernel, run_request(tmp_path))
    assert start_target(kernel) == 0


def test_a_missing_pid_fails_before_any_load(kernel: FakeKernel, tmp_path: Path) -> None:
    outcome = drive(kernel, run_request(tmp_path, target={"pid": 999999}))
    assert outcome.result["kind"] == "no-target"
    assert "999999" in outcome.result["message"]
    assert kernel.loads == []


def test_a_process_name_takes_the_oldest_and_warns_with_the_count(
        kernel: FakeKernel, tmp_path: Path) -> None:
    outcome = drive(kernel, run_request(tmp_path, target={"process": "nginx"}))
    assert outcome.result["status"] == "ok", outcome.result
    assert start_target(kernel) == 4000
    warnings = [e["text"] for e in outcome.events_named("warning")]
    assert any(w.startswith("2 processes named 'nginx'") and "4000" in w for w in warnings)


def test_a_comm_with_parentheses_is_read_whole(kernel: FakeKernel, tmp_path: Path) -> None:
    drive(kernel, run_request(tmp_path, target={"process": "my (odd) name"}))
    assert start_target(kernel) == 77


def test_a_command_line_pattern_matches_the_arguments(kernel: FakeKernel, tmp_path: Path) -> None:
    outcome = drive(kernel, run_request(tmp_path, target={"cmdline": r"app\.py --port 80"}))
    assert start_target(kernel) == 77
    assert outcome.events_named("warning") == []


def test_no_matching_process_fails_with_no_target(kernel: FakeKernel, tmp_path: Path) -> None:
    outcome = drive(kernel, run_request(tmp_path, target={"process": "postgres"}))
    assert outcome.result["kind"] == "no-target"
    assert outcome.result["message"] == "no process named 'postgres'"
    assert kernel.loads == [] and outcome.code == 1


def test_a_bad_target_is_refused(kernel: FakeKernel, tmp_path: Path) -> None:
    for target in ({"pid": "12"}, {"cmdline": "("}, {"who": 1}, "nginx"):
        outcome = drive(kernel, run_request(tmp_path, target=target))
        assert outcome.result["kind"] == "agent-error", target
    assert kernel.loads == []


def test_a_command_is_held_until_start_and_ends_the_run(tmp_path: Path) -> None:
    kernel = FakeKernel(tmp_path / "root", Scenario())  # runs until the command exits
    marker = tmp_path / "ran"
    command = f"echo $$ > {marker}; echo out; echo err >&2; exit 3"
    outcome = drive(kernel, run_request(tmp_path, target={"command": command}))
    assert outcome.result["status"] == "ok", outcome.result
    assert outcome.result["message"] == "the command exited with status 3"
    pid = start_target(kernel)
    assert int(marker.read_text()) == pid  # the PID given to the module is the command's
    names = outcome.event_names()
    assert names.index("started") < names.index("command-output")
    assert outcome.events_named("stopping")[0]["reason"] == "command-exited"
    text = "".join(e["text"] for e in outcome.events_named("command-output"))
    assert text.split() == ["out", "err"]
    assert outcome.output == b""  # the command's output is not the probe's


def test_a_command_does_not_run_before_the_module_starts(tmp_path: Path) -> None:
    kernel = FakeKernel(tmp_path / "root", Scenario(start_res=-1))
    marker = tmp_path / "ran"
    outcome = drive(kernel, run_request(tmp_path, target={"command": f"touch {marker}"}))
    assert outcome.result["kind"] == "start-failed"
    assert not marker.exists()


def test_a_command_still_running_when_the_run_stops_is_killed(tmp_path: Path) -> None:
    kernel = FakeKernel(tmp_path / "root", Scenario())
    outcome = drive(kernel, run_request(tmp_path, duration=0.5,
                                        target={"command": "echo up; sleep 30"}))
    assert outcome.result["status"] == "ok"
    assert outcome.events_named("stopping")[0]["reason"] == "duration"
    pid = start_target(kernel)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def targets_request(target: Any) -> dict[str, Any]:
    return {"protocol": agent.PROTOCOL_VERSION, "action": "targets", "target": target}


def test_targets_lists_every_match_oldest_first_and_loads_nothing(kernel: FakeKernel) -> None:
    outcome = drive(kernel, targets_request({"process": "nginx"}))
    assert outcome.result["status"] == "ok", outcome.result
    assert outcome.result["pids"] == [4000, 4321]
    outcome = drive(kernel, targets_request({"cmdline": r"worker|app\.py"}))
    assert outcome.result["pids"] == [77, 4321]
    assert kernel.loads == []


def test_targets_without_a_match_or_with_a_bad_target_fail(kernel: FakeKernel) -> None:
    outcome = drive(kernel, targets_request({"process": "postgres"}))
    assert outcome.result["kind"] == "no-target" and "pids" not in outcome.result
    for target in ({"cmdline": "("}, {"command": "ls"}, None):
        outcome = drive(kernel, targets_request(target))
        assert outcome.result["kind"] == "agent-error", target
