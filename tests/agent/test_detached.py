"""Detached runs against FakeKernel: started, bounded, rotated, collected, tailed, stopped,
and lost. The detached process is a thread here (the fake kernel lives in this process);
the real double fork is tested on lab guests (tests/e2e/test_detach.py)."""

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from stapctl.runtime import stapctl_agent as agent

from tests.agent.fakekernel import FakeKernel, Outcome, Scenario, drive, module_file

pytestmark = pytest.mark.agent

LIMITS = {"max_duration": 30.0, "max_disk": 1 << 20, "file_size": 1 << 16, "file_count": 4}


@pytest.fixture(autouse=True)
def detached_in_a_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[threading.Thread]]:
    """Fault-injection double for the double fork: the detached run in a thread."""
    threads: list[threading.Thread] = []

    def spawn(target: Callable[[], object], _log_path: str) -> None:
        thread = threading.Thread(target=target, daemon=True)
        threads.append(thread)
        thread.start()

    monkeypatch.setattr(agent, "daemonize", spawn)
    monkeypatch.setattr(agent.Run, "startup_timeout", 2.0)
    yield threads
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive(), "a detached run did not end"


def setup(tmp_path: Path, **scenario: Any) -> tuple[FakeKernel, str]:
    kernel = FakeKernel(tmp_path / "root", Scenario(**scenario))
    workdir = tmp_path / "work"
    workdir.mkdir()
    return kernel, str(workdir)


def detach(kernel: FakeKernel, workdir: str, tmp_path: Path, name: str = "run-1",
           **overrides: Any) -> Outcome:
    path, digest, module = module_file(tmp_path)
    request = {"protocol": 1, "action": "detach", "module": path, "sha256": digest,
               "module_name": module, "params": {}, "bufsize_mb": 0, "exit_timeout": 2.0,
               "workdir": workdir, "name": name, **LIMITS}
    request.update(overrides)
    return drive(kernel, request)


def call(kernel: FakeKernel, workdir: str, action: str, name: str = "run-1",
         lines: Iterable[tuple[float, str]] = (), **fields: Any) -> Outcome:
    return drive(kernel, {"protocol": 1, "action": action, "workdir": workdir, "name": name,
                          **fields}, lines=lines)


def state_of(kernel: FakeKernel, workdir: str, name: str = "run-1") -> dict[str, Any]:
    state: dict[str, Any] = call(kernel, workdir, "status", names=[name]).result["detached"][name]
    return state


def wait_for_state(kernel: FakeKernel, workdir: str, wanted: str, timeout: float = 10.0,
                   name: str = "run-1") -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = state_of(kernel, workdir, name)
        if state["state"] == wanted:
            return state
        time.sleep(0.1)
    raise AssertionError(f"still {state['state']}: {state}")


def mark_agent_process(kernel: FakeKernel, pid: int | None = None) -> None:
    """The fake /proc's cmdline of the (thread-run) detached agent names the agent file."""
    folder = os.path.join(kernel.proc, str(pid or os.getpid()))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "cmdline"), "w") as f:
        f.write("python3\0-I\0" + os.path.abspath(agent.__file__) + "\0")


def test_detach_returns_at_once_and_the_run_goes_on_until_stopped(tmp_path: Path) -> None:
    lines = [("sleep", 0.3)] + [("print", 0, b"line %d\n" % i) for i in range(5)]
    kernel, workdir = setup(tmp_path, running=lines)
    mark_agent_process(kernel)
    outcome = detach(kernel, workdir, tmp_path)

    assert outcome.result["status"] == "ok", outcome.result
    state = outcome.result["detached"]
    assert state["state"] == "running" and state["module"] in kernel.modules
    assert state["boot_id"] == "" or isinstance(state["boot_id"], str)

    time.sleep(1.0)
    first = call(kernel, workdir, "collect", offset=0)
    assert first.output == b"".join(b"line %d\n" % i for i in range(5))
    again = call(kernel, workdir, "collect", offset=first.result["end"])
    assert again.output == b"" and again.result["end"] == first.result["end"]

    stopped = call(kernel, workdir, "stop", timeout=10)
    assert stopped.result["status"] == "ok", stopped.result
    final = stopped.result["detached"]
    assert final["state"] == "finished" and final["reason"] == "stop"
    assert final["status"] == "ok" and final["written"] == first.result["end"]
    assert kernel.modules == {}


def test_the_script_s_exit_ends_it_and_collect_with_remove_clears_the_folder(
        tmp_path: Path) -> None:
    kernel, workdir = setup(tmp_path, running=[("print", 1, b"bye\n"), ("sleep", 0.2),
                                               ("request_exit",)])
    outcome = detach(kernel, workdir, tmp_path)
    assert outcome.result["status"] == "ok"
    state = wait_for_state(kernel, workdir, "finished")
    assert state["reason"] == "exit()" and kernel.modules == {}

    collected = call(kernel, workdir, "collect", offset=0, remove=True)
    assert collected.output == b"bye\n" and collected.result["removed"]
    assert not os.path.exists(os.path.join(workdir, "detached", "run-1"))


def test_max_duration_ends_it(tmp_path: Path) -> None:
    kernel, workdir = setup(tmp_path)
    detach(kernel, workdir, tmp_path, max_duration=0.5)
    state = wait_for_state(kernel, workdir, "finished")
    assert state["reason"] == "max-duration" and state["status"] == "ok"
    assert kernel.modules == {}


def test_output_rotates_and_the_disk_bound_ends_it(tmp_path: Path) -> None:
    record = b"x" * 999 + b"\n"
    kernel, workdir = setup(tmp_path, running=[("print", 0, record)] * 40)
    detach(kernel, workdir, tmp_path, file_size=4096, file_count=3, max_disk=20000)
    state = wait_for_state(kernel, workdir, "finished")

    assert state["reason"] == "max-disk" and state["written"] == 20000
    folder = os.path.join(workdir, "detached", "run-1")
    files = sorted(name for name in os.listdir(folder) if name.startswith("out."))
    assert files == ["out.2", "out.3", "out.4"]  # 20000 bytes: files 0-4; newest 3 kept
    assert os.path.getsize(os.path.join(folder, "out.4")) == 20000 - 4 * 4096
    collected = call(kernel, workdir, "collect", offset=0)
    assert collected.result["first"] == 2 * 4096  # what rotation removed is skipped
    assert len(collected.output) == 20000 - 2 * 4096
    assert kernel.modules == {}


def test_tail_streams_new_output_until_the_run_ends(tmp_path: Path) -> None:
    running = [("print", 0, b"early\n"), ("sleep", 1.0), ("print", 0, b"late\n"),
               ("sleep", 0.3), ("request_exit",)]
    kernel, workdir = setup(tmp_path, running=running)
    mark_agent_process(kernel)
    detach(kernel, workdir, tmp_path)
    time.sleep(0.5)
    tailed = call(kernel, workdir, "tail", offset=None)  # from where it stands
    assert tailed.output == b"late\n"
    assert tailed.result["detached"]["state"] == "finished"
    from_start = call(kernel, workdir, "tail", offset=0)
    assert from_start.output == b"early\nlate\n"


def test_a_run_whose_host_rebooted_is_lost(tmp_path: Path) -> None:
    kernel, workdir = setup(tmp_path)
    boot = os.path.join(kernel.proc, "sys", "kernel", "random", "boot_id")
    os.makedirs(os.path.dirname(boot), exist_ok=True)
    with open(boot, "w") as f:
        f.write("boot-1\n")
    mark_agent_process(kernel)
    detach(kernel, workdir, tmp_path)
    assert state_of(kernel, workdir)["state"] == "running"
    with open(boot, "w") as f:
        f.write("boot-2\n")
    state = state_of(kernel, workdir)
    assert state["state"] == "lost" and "rebooted" in state["message"]
    missing = state_of(kernel, workdir, name="never-was")
    assert missing["state"] == "lost" and "no trace" in missing["message"]
    gone = call(kernel, workdir, "collect", name="never-was", offset=0, remove=True)
    assert gone.result["status"] == "ok" and gone.result["detached"]["state"] == "lost"
    open(os.path.join(workdir, "detached", "run-1", "stop"), "w").close()  # end the thread


def test_a_run_whose_agent_process_is_gone_is_lost(tmp_path: Path) -> None:
    kernel, workdir = setup(tmp_path)
    detach(kernel, workdir, tmp_path)  # no cmdline in the fake /proc: the process is gone
    state = state_of(kernel, workdir)
    assert state["state"] == "lost" and "gone" in state["message"]
    assert kernel.unload_calls >= 1  # its module is unloaded (the thread still holds it here)
    open(os.path.join(workdir, "detached", "run-1", "stop"), "w").close()


def test_refusals_come_back_at_once(tmp_path: Path) -> None:
    kernel, workdir = setup(tmp_path)
    bad = detach(kernel, workdir, tmp_path, sha256="0" * 64)
    assert bad.result["kind"] == "preflight-refused" and "sha256" in bad.result["message"]
    unbounded = detach(kernel, workdir, tmp_path, max_disk=None)
    assert unbounded.result["kind"] == "preflight-refused"
    assert "max_disk" in unbounded.result["message"]
    assert kernel.modules == {} and kernel.loads == []


def test_a_start_failure_is_the_detach_result(tmp_path: Path) -> None:
    kernel, workdir = setup(tmp_path, start_res=-1, begin=[("oob", "ERROR: no good")])
    outcome = detach(kernel, workdir, tmp_path)
    assert outcome.result["kind"] == "start-failed" and "no good" in outcome.result["message"]
    assert kernel.modules == {}


def test_the_module_s_own_error_ends_it_failed_and_unloaded(tmp_path: Path) -> None:
    kernel, workdir = setup(tmp_path, running=[("sleep", 0.2), ("oob", "ERROR: division by 0"),
                                               ("request_exit",)])
    assert detach(kernel, workdir, tmp_path).result["status"] == "ok"
    state = wait_for_state(kernel, workdir, "finished")
    assert state["reason"] == "error" and state["kind"] == "runtime-error"
    assert "division by 0" in state["message"]
    assert kernel.modules == {}
    events = open(os.path.join(workdir, "detached", "run-1", "events.jsonl")).read()
    assert '"event": "error"' in events and '"event": "unloaded"' in events


def test_a_run_that_ends_while_its_state_is_read_is_finished_not_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run writes its end, then exits: a reader that saw it running and then finds its
    process gone reads the state again instead of calling it lost (fault injection: the
    end lands between the two)."""
    kernel, _workdir = setup(tmp_path)
    folder = str(tmp_path / "run")
    os.mkdir(folder)
    agent.write_state(folder, {"state": "running", "pid": 4242, "boot_id": "",
                               "agent": "/x/agent.py", "module": "stapctl_gone_1"})

    def ends_meanwhile(_kernel: FakeKernel, _pid: int, _agent_file: str) -> bool:
        agent.write_state(folder, {"state": "finished", "reason": "stop", "pid": 4242})
        return False

    monkeypatch.setattr(agent, "process_runs", ends_meanwhile)
    state = agent.live_state(kernel, folder)
    assert state["state"] == "finished" and state["reason"] == "stop"
    assert kernel.unload_calls == 0


@pytest.mark.parametrize("cmdline, runs", [
    ("python3\0-I\0-S\0-c\0BOOT\0/root/.cache/stapctl-agent/agent-0123.py\0load\0", True),
    # a spare agent, started from the home folder before the home was known
    ("python3\0-I\0-S\0-c\0BOOT\0.cache/stapctl-agent/agent-0123.py\0load\0", True),
    ("python3\0-I\0-S\0-c\0BOOT\0/root/.cache/stapctl-agent/agent-4567.py\0", False),
    ("sshd: root@notty\0", False),  # the pid was reused
    (None, False),  # the process is gone
])
def test_a_run_s_process_is_known_by_its_agent_file(tmp_path: Path, cmdline: str | None,
                                                    runs: bool) -> None:
    kernel = FakeKernel(tmp_path)
    if cmdline is not None:
        os.makedirs(os.path.join(kernel.proc, "4242"))
        with open(os.path.join(kernel.proc, "4242", "cmdline"), "w") as f:
            f.write(cmdline)
    assert agent.process_runs(kernel, 4242, "/root/.cache/stapctl-agent/agent-0123.py") is runs
