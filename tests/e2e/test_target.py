"""Aiming at a process on real kernels: `stapctl run --process NAME` on a workload the
test starts on two guests (the third has none), and `-c CMD` started by the agent. The
script prints only target()'s system calls; nothing from other processes may appear."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from stapctl.lab import LabStatus
from tests.e2e.helpers import guest_run, stap_module_names

pytestmark = pytest.mark.e2e

# target() and each of its system calls: a pid column that must be target()'s
SCRIPT = r"""probe begin { printf("target %d\n", target()) }
probe kernel.trace("raw_syscalls:sys_enter") {
  if (pid() == target()) printf("call %d %d\n", pid(), $id)
}"""

# A shell script: its comm is the file's name. It writes its PID, then makes system calls
# of its own (the redirection's openat, read, close; fork and wait for sleep).
WORKLOAD = """#!/bin/sh
echo $$ > /tmp/tgtwork.pid
while :; do read -r line < /proc/version; sleep 0.3; done
"""


def stapctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stapctl", *args], capture_output=True,
                          text=True, timeout=900, check=False)


@pytest.fixture
def workload(lab: LabStatus) -> Iterator[dict[str, int]]:
    """The workload running on the first two guests: their names and its PID on each."""
    pids = {}
    for index in (0, 1):
        guest_run(lab, f"cat > /tmp/tgtwork <<'EOF'\n{WORKLOAD}EOF\nchmod +x /tmp/tgtwork; "
                       "rm -f /tmp/tgtwork.pid; "
                       "setsid /tmp/tgtwork </dev/null >/dev/null 2>&1 &", index)
        pid = guest_run(lab, "for i in 1 2 3 4 5 6 7 8 9 10; do "
                             "[ -s /tmp/tgtwork.pid ] && break; sleep 0.5; done; "
                             "cat /tmp/tgtwork.pid", index)
        pids[lab.guests[index].name] = int(pid)
    yield pids
    for index in (0, 1):
        guest_run(lab, "kill $(cat /tmp/tgtwork.pid); rm -f /tmp/tgtwork /tmp/tgtwork.pid",
                  index)


def lines_of(stdout: str, host: str) -> list[str]:
    prefix = f"{host}: "
    return [line[len(prefix):] for line in stdout.splitlines() if line.startswith(prefix)]


def only_target_calls(lines: list[str], pid: int) -> None:
    """target() is ``pid``, there are system calls, and every one is that process's."""
    assert lines[0] == f"target {pid}", lines[:3]
    calls = [line for line in lines if line.startswith("call ")]
    assert len(calls) >= 3, lines
    assert {int(line.split()[1]) for line in calls} == {pid}
    assert all(re.fullmatch(r"call \d+ \d+", line) for line in calls), calls


def test_process_by_name_on_every_host(lab: LabStatus, workload: dict[str, int]) -> None:
    result = stapctl("run", "all", "--process", "tgtwork", "--duration", "4s", "-e", SCRIPT)
    assert result.returncode == 3, result.stderr  # lab-3 has no such process
    for host, pid in workload.items():
        only_target_calls(lines_of(result.stdout, host), pid)
    missing = lab.guests[2].name
    assert lines_of(result.stdout, missing) == []
    assert f"{missing}: failed: no-target: no process named 'tgtwork'" in result.stderr


def test_command_is_started_held_and_ends_the_run(lab: LabStatus) -> None:
    host = lab.guests[0].name
    command = "for i in 1 2 3; do read -r line < /proc/version; sleep 0.2; done; echo done-$$"
    result = stapctl("run", host, "-c", command, "-e", SCRIPT)  # no --duration: it exits
    assert result.returncode == 0, result.stderr
    done = [line for line in result.stdout.splitlines() if line.startswith(f"{host}[cmd]: ")]
    assert len(done) == 1 and done[0].startswith(f"{host}[cmd]: done-"), result.stdout
    pid = int(done[0].rsplit("-", 1)[1])
    only_target_calls(lines_of(result.stdout, host), pid)
    assert "the command exited with status 0" in result.stderr or \
        "finished" in result.stderr, result.stderr


def test_one_run_per_matching_process(lab: LabStatus, workload: dict[str, int]) -> None:
    """A second tgtwork on lab-1: `--each` runs the script once per process, each its own
    outcome with its own target(), and leaves no module loaded."""
    host = lab.guests[0].name
    guest_run(lab, "mkdir -p /tmp/second; sed 's/tgtwork.pid/tgtwork2.pid/' /tmp/tgtwork "
                   "> /tmp/second/tgtwork; chmod +x /tmp/second/tgtwork; rm -f /tmp/tgtwork2.pid; "
                   "setsid /tmp/second/tgtwork </dev/null >/dev/null 2>&1 &", 0)
    second = int(guest_run(lab, "for i in 1 2 3 4 5 6 7 8 9 10; do "
                                "[ -s /tmp/tgtwork2.pid ] && break; sleep 0.5; done; "
                                "cat /tmp/tgtwork2.pid", 0))
    try:
        result = stapctl("run", host, "--process", "tgtwork", "--each", "--duration", "4s",
                         "-e", SCRIPT)
    finally:
        guest_run(lab, "kill $(cat /tmp/tgtwork2.pid); rm -rf /tmp/tgtwork2.pid /tmp/second", 0)
    assert result.returncode == 0, result.stderr
    for pid in (workload[host], second):
        only_target_calls(lines_of(result.stdout, f"{host}[adhoc[pid {pid}]]"), pid)
    assert not stap_module_names(lab, 0)
