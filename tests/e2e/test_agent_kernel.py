"""The agent on a real kernel: every way a run ends leaves nothing behind.

The agent's tests (tests/agent) drive a simulated kernel; these drive the lab guest's
real one, through the controller's own AgentHost (to stop, cut or signal a run exactly
when we want) or through `stapctl apply`. After every run, nothing of it may remain on
the guest: not its module, not its /proc/systemtap directory, not the agent process, not
the per-run module copy it was told to remove. The checks look for this run's module by
name, because the lab's guests are shared with other tests running at the same time.

Not here: a module that never answers EXIT (kind timed-out) is proven on the test double
only. A real module answers EXIT from inside the write that sends it (its end probes run
there), so no script can leave the agent waiting for the reply.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from stapctl.agent import AGENT_SHA256, AgentHost, AgentRequest, Frame, RunResult
from stapctl.build import Builder
from stapctl.connection import ConnectOptions, Process, SSHConnection
from stapctl.errors import ConnectError, StapctlError
from stapctl.lab import LabStatus
from stapctl.models import ModuleArtifact

from .helpers import apply, guest_host, guest_run, write_manifest

pytestmark = pytest.mark.e2e

# Ticks until `stop_after` (a module parameter; 0: forever); its end probe says how far
# it got, so a run that stops cleanly shows its end probe's output arrived.
TICKER = """
global stop_after = 0
global n
probe timer.ms(100) {
  n++
  printf("tick %d\\n", n)
  if (stop_after && n >= stop_after) exit()
}
probe end { printf("end after %d\\n", n) }
"""


def build(script: str, release: str) -> ModuleArtifact:
    """Compile through the module cache (and stap's), as `stapctl apply` does."""
    builder = Builder()
    return builder.build(builder.spec(script, release, "x86_64", (), origin="test_agent_kernel"))


@pytest.fixture(scope="module")
def release(lab: LabStatus) -> str:
    return guest_run(lab, "uname -r").strip()


@pytest.fixture(scope="module")
def ticker(release: str) -> ModuleArtifact:
    return build(TICKER, release)


class TappedProcess:
    """The agent's process as AgentHost drives it, with a mute for the keep-alives."""

    def __init__(self, inner: Process) -> None:
        self.inner = inner
        self.muted = False

    def send(self, data: bytes) -> None:
        if not (self.muted and b'"op": "ping"' in data):
            self.inner.send(data)

    def close_stdin(self) -> None:
        self.inner.close_stdin()

    def recv(self, size: int) -> bytes:
        return self.inner.recv(size)

    def stderr_tail(self) -> str:
        return self.inner.stderr_tail()

    def wait(self) -> int:
        return self.inner.wait()

    def kill(self) -> None:
        self.inner.kill()


class TappedConnection(SSHConnection):
    """An SSH connection that lets the test reach the agent process it starts."""

    process: TappedProcess | None = None

    def start(self, argv: Sequence[str], become: bool = True) -> Process:
        self.process = TappedProcess(super().start(argv, become))
        return self.process


class Run:
    """One agent run of a module on lab-1, in a thread, through the controller's AgentHost.

    The module is uploaded once more as a per-run copy that the agent must delete when it
    ends (`remove_files`), standing for the temporary files of a run.
    """

    def __init__(self, lab: LabStatus, artifact: ModuleArtifact, **request: Any) -> None:
        self.lab = lab
        self.connection = TappedConnection(guest_host(lab), ConnectOptions())
        self.connection.open()
        agent = AgentHost(self.connection)
        agent.prepare()
        self.copy = f"{agent.workdir}/run-{secrets.token_hex(6)}.ko"
        self.connection.put(artifact.path, self.copy)
        self.frames: list[Frame] = []
        self.started = threading.Event()
        self.stop = threading.Event()
        self.result: RunResult | None = None
        self.error: StapctlError | None = None
        full = AgentRequest(**{"action": "run", "module": self.copy, "sha256": artifact.sha256,
                               "module_name": artifact.module_name,
                               "remove_files": (self.copy,), "exit_timeout": 10.0, **request})
        self.thread = threading.Thread(target=self._call, args=(agent, full), daemon=True)
        self.thread.start()

    def _call(self, agent: AgentHost, request: AgentRequest) -> None:
        try:
            self.result = agent.call(request, self._frame, self.stop)
        except StapctlError as exc:
            self.error = exc
        finally:
            self.started.set()  # wake a waiter even when the run never started

    def _frame(self, frame: Frame) -> None:
        self.frames.append(frame)
        if frame.kind == "event" and frame.json()["event"] == "started":
            self.started.set()

    def wait_started(self) -> None:
        assert self.started.wait(120) and self.error is None and self.result is None, \
            (self.error, self.result)

    def wait_output(self, text: bytes, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert time.monotonic() < deadline, f"no {text!r} in {self.output()!r}"
            assert self.thread.is_alive(), (self.error, self.result)
            time.sleep(0.1)

    def finish(self, timeout: float = 120) -> RunResult:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the run did not end"
        assert self.error is None, self.error
        assert self.result is not None
        return self.result

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = [f.json() for f in self.frames if f.kind == "event"]
        return [e for e in found if name is None or e["event"] == name]

    def output(self) -> bytes:
        return b"".join(f.data for f in self.frames if f.kind == "output")

    @property
    def pid(self) -> int:
        return int(self.frames[0].json()["pid"])

    @property
    def module(self) -> str:
        return str(self.events("loaded")[0]["module"])

    def leftovers(self) -> str:
        """Whatever of this run is still on the guest: module, control dir, process, copy."""
        return guest_run(self.lab, f"grep -w '^{self.module}' /proc/modules; "
                                   f"ls -d /proc/systemtap/{self.module} /proc/{self.pid} "
                                   f"{self.copy} 2>/dev/null; true").strip()

    def assert_nothing_left(self, timeout: float = 0) -> None:
        """Nothing remains now, or within ``timeout`` seconds for a run cut off from us."""
        deadline = time.monotonic() + timeout
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert left == ""
        assert self.events("unloaded") in ([], [{"event": "unloaded", "module": self.module}])


def status_of(result: RunResult) -> tuple[str, str | None]:
    return ("ok" if result.ok else "failed", result.kind)


def ticks(output: bytes) -> list[int]:
    return [int(n) for n in re.findall(rb"^tick (\d+)$", output, re.M)]


def assert_clean_ending(run: Run, status: str, kind: str | None, reason: str) -> list[int]:
    """The result, the `stopping` reason, whole output with the end probe's line last."""
    result = run.finish()
    assert status_of(result) == (status, kind), result
    assert [e["reason"] for e in run.events("stopping")] == [reason]
    assert run.events("unloaded") == [{"event": "unloaded", "module": run.module}]
    counted = ticks(run.output())
    assert counted == list(range(1, len(counted) + 1)), run.output()
    assert run.output().endswith(b"end after %d\n" % counted[-1])
    assert result.stats["lost_records"] == 0
    run.assert_nothing_left()
    return counted


# -- every way a run ends -------------------------------------------------------------

def test_the_scripts_exit_ends_the_run_ok(lab: LabStatus, ticker: ModuleArtifact) -> None:
    run = Run(lab, ticker, params={"stop_after": 3})
    assert assert_clean_ending(run, "ok", None, "exit()") == [1, 2, 3]


def test_the_agent_runs_from_bytecode_cached_by_its_first_run(lab: LabStatus,
                                                              ticker: ModuleArtifact) -> None:
    """The agent is run by import, so the guest's Python keeps its compiled file and
    later runs load that instead of compiling the agent again."""
    first = Run(lab, ticker, params={"stop_after": 1})
    assert_clean_ending(first, "ok", None, "exit()")
    cache = first.copy.rsplit("/", 1)[0] + "/__pycache__"
    compiled = f"stat -c '%n %y' {cache}/agent-{AGENT_SHA256[:16]}.cpython-*.pyc"
    written = guest_run(lab, compiled)
    assert written.strip(), f"no bytecode in {cache}"
    second = Run(lab, ticker, params={"stop_after": 1})
    assert_clean_ending(second, "ok", None, "exit()")
    assert guest_run(lab, compiled) == written  # loaded, not compiled and written again


def test_reaching_the_duration_ends_the_run_ok(lab: LabStatus, ticker: ModuleArtifact) -> None:
    run = Run(lab, ticker, duration=2.0)
    assert len(assert_clean_ending(run, "ok", None, "duration")) >= 5


def test_a_stop_from_the_controller_ends_the_run_stopped(lab: LabStatus,
                                                          ticker: ModuleArtifact) -> None:
    run = Run(lab, ticker)
    run.wait_output(b"tick 3\n")
    run.stop.set()
    assert_clean_ending(run, "failed", "stopped", "stop")


def test_stdin_closing_means_the_controller_is_gone(lab: LabStatus,
                                                     ticker: ModuleArtifact) -> None:
    run = Run(lab, ticker)
    run.wait_output(b"tick 3\n")
    assert run.connection.process is not None
    run.connection.process.close_stdin()
    assert_clean_ending(run, "failed", "transport-lost", "controller-gone")


def test_a_silent_controller_trips_the_dead_man(lab: LabStatus, ticker: ModuleArtifact) -> None:
    run = Run(lab, ticker, deadman=3.0)
    run.wait_started()
    assert run.connection.process is not None
    run.connection.process.muted = True  # the connection stays up; the pings stop
    assert_clean_ending(run, "failed", "transport-lost", "deadman")


def test_a_lost_connection_unloads_the_module(lab: LabStatus, ticker: ModuleArtifact) -> None:
    """The SSH connection is cut mid-run: the controller sees the loss (execute.py turns it
    into transport-lost), and the agent, its stdin at EOF, unloads on its own."""
    run = Run(lab, ticker)
    run.wait_output(b"tick 3\n")
    run.connection.close()
    run.thread.join(60)
    assert isinstance(run.error, ConnectError), (run.error, run.result)
    run.assert_nothing_left(timeout=60)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_to_the_agent_stops_the_run(lab: LabStatus, ticker: ModuleArtifact,
                                             signum: signal.Signals) -> None:
    run = Run(lab, ticker)
    run.wait_output(b"tick 3\n")
    guest_run(lab, f"kill -{signum.name[3:]} {run.pid}")
    assert_clean_ending(run, "failed", "stopped", "signal")
    assert run.finish().message == f"stopped by signal {int(signum)}"


# -- two runs of one module -----------------------------------------------------------

def test_two_runs_of_one_module_coexist(lab: LabStatus, ticker: ModuleArtifact) -> None:
    long, short = Run(lab, ticker, duration=8.0), Run(lab, ticker, duration=3.0)
    long.wait_started()
    short.wait_started()
    assert long.module != short.module
    loaded = guest_run(lab, "cut -d' ' -f1 /proc/modules")
    assert long.module in loaded.split() and short.module in loaded.split()
    assert_clean_ending(short, "ok", None, "duration")
    assert long.thread.is_alive()
    seen = len(ticks(long.output()))
    long.wait_output(b"tick %d\n" % (seen + 3))  # still ticking after the other unloaded
    assert long.module in guest_run(lab, "cut -d' ' -f1 /proc/modules").split()
    assert len(assert_clean_ending(long, "ok", None, "duration")) > len(ticks(short.output()))


# -- refused before insmod ------------------------------------------------------------

def test_a_module_for_another_kernel_is_refused_before_insmod(
        lab: LabStatus, release: str) -> None:
    others = sorted(p.parent.name for p in Path("/lib/modules").glob("*-amd64/build")
                    if p.parent.name != release)
    if not others:
        pytest.fail("no second kernel's headers are installed: run scripts/install.sh")
    foreign = build(TICKER, others[-1])
    run = Run(lab, foreign)
    result = run.finish()
    assert status_of(result) == ("failed", "preflight-refused")
    assert result.message == (f"module {run.copy} was built for kernel {others[-1]}, "
                                 f"but this host runs {release}")
    assert [e["event"] for e in run.events()] == ["facts"]  # nothing was loaded
    left = guest_run(lab, f"grep '^{foreign.module_name[:16]}' /proc/modules; "
                          f"ls -d {run.copy} 2>/dev/null; true")
    assert left.strip() == ""


def test_a_parameter_the_kernel_would_split_is_refused_before_insmod(
        lab: LabStatus, ticker: ModuleArtifact) -> None:
    # UTF-8 \u00e0 is C3 A0, and the kernel's parser takes A0 for a blank
    run = Run(lab, ticker, params={"stop_after": "3\u00e0_stp_bufsize=1"})
    result = run.finish()
    assert status_of(result) == ("failed", "preflight-refused"), result
    assert "0xa0" in result.message
    assert [e["event"] for e in run.events()] == ["facts"]  # nothing was loaded


def test_a_corrupt_upload_is_deleted_so_the_next_upload_replaces_it(
        lab: LabStatus, ticker: ModuleArtifact) -> None:
    run = Run(lab, ticker, sha256="0" * 64, remove_files=())
    result = run.finish()
    assert status_of(result) == ("failed", "preflight-refused"), result
    assert "sha256 mismatch" in result.message
    assert guest_run(lab, f"ls {run.copy} 2>/dev/null; true").strip() == ""


def test_a_run_removes_stale_uploads_from_the_work_directory(
        lab: LabStatus, ticker: ModuleArtifact) -> None:
    run = Run(lab, ticker)
    run.wait_started()
    workdir = run.copy.rsplit("/", 1)[0]
    stale = f"{workdir}/{secrets.token_hex(32)}.ko"
    fresh = f"{workdir}/{secrets.token_hex(32)}.ko"
    part = f"{workdir}/{secrets.token_hex(32)}.ko.{secrets.token_hex(4)}.part"
    ages = {stale: 8 * 86400, part: 2 * 3600, fresh: 6 * 86400}
    guest_run(lab, "python3 -c 'import os, sys, time\n"  # busybox touch takes no '8 days ago'
                   "for path, age in zip(sys.argv[1::2], sys.argv[2::2]):\n"
                   "    open(path, \"w\").close()\n"
                   "    os.utime(path, (time.time() - int(age),) * 2)' " +
              " ".join(f"{path} {age}" for path, age in ages.items()))
    try:
        assert len(guest_run(lab, f"ls {stale} {part} {fresh}").split()) == 3
        run.stop.set()
        assert_clean_ending(run, "failed", "stopped", "stop")
        assert guest_run(lab, f"ls {stale} {part} {fresh} 2>/dev/null; true").split() == [fresh]
    finally:
        guest_run(lab, f"rm -f {stale} {part} {fresh}")


# -- liveness ---------------------------------------------------------------------------

QUIET = """
global seconds
probe timer.s(1) { seconds++ }
probe end { printf("quiet for %d s\\n", seconds) }
"""


def test_a_quiet_probe_sends_heartbeats(lab: LabStatus, release: str) -> None:
    """Nothing to print for 7 s: the agent says it is alive every 5 s all the same."""
    run = Run(lab, build(QUIET, release), duration=7.0)
    result = run.finish()
    assert status_of(result) == ("ok", None), result
    names = [e["event"] for e in run.events()]
    beats = names.count("heartbeat")
    assert beats >= 1 and names.index("started") < names.index("heartbeat"), names
    assert run.output().startswith(b"quiet for ")
    run.assert_nothing_left()


# -- what scripts do, through `stapctl apply` -----------------------------------------

def apply_json(lab: LabStatus, manifest: Path, *args: str,
               when_started: Callable[[], object] | None = None) -> tuple[
        int, list[dict[str, Any]], dict[str, Any]]:
    """Runs `stapctl apply --format json` on lab-1: (exit code, events, lab-1's outcome).

    ``when_started`` is called as soon as the probe has started on the guest.
    """
    argv = [sys.executable, "-m", "stapctl", "apply", "-i", str(lab.inventory),
            "--limit", "lab-1", "--format", "json", *args, str(manifest)]
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryFile("w+") as stderr, subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=stderr, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            records.append(json.loads(line))
            if when_started is not None and records[-1].get("kind") == "started":
                when_started()
        code = proc.wait(timeout=900)
        stderr.seek(0)
        errors = stderr.read()
    events = [r for r in records if r["type"] == "event"]
    summary = next(r for r in records if r["type"] == "summary")
    assert len(summary["outcomes"]) == 1, errors
    loaded = [e["text"] for e in events if e["kind"] == "loaded"]
    assert len(loaded) == 1, errors
    left = guest_run(lab, f"grep -w '^{loaded[0]}' /proc/modules; "
                          f"ls -d /proc/systemtap/{loaded[0]} 2>/dev/null; true")
    assert left.strip() == ""
    return code, events, summary["outcomes"][0]


def compile_first(lab: LabStatus, manifest: Path) -> None:
    """`apply --check` builds the module and loads nothing: a later run is timed alone."""
    result = apply(lab, manifest, "--limit", "lab-1", "--check")
    assert result.returncode == 0, result.stderr


def lines(events: list[dict[str, Any]], kind: str = "output") -> list[str]:
    return [str(e["text"]) for e in events if e["kind"] == kind]


def test_params_warnings_and_system_reach_the_user(lab: LabStatus, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, "features", """
        global greeting = "unset"
        global count = 0
        probe oneshot {
          printf("greeting=[%s] count=%d\\n", greeting, count)
          for (i = 0; i < count; i++) warn("careful now")
          warn("another warning")
          system("echo system says $((6 * 7))")
          system("sleep 2; echo system, after the module is gone")
        }
    """, params={"greeting": "hello big world", "count": 3})
    code, events, outcome = apply_json(lab, manifest)
    assert code == 0, outcome
    assert sorted(lines(events)) == ["greeting=[hello big world] count=3",
                                     "system says 42", "system, after the module is gone"]
    assert lines(events, "warning") == ["careful now", "another warning"]  # each shown once
    assert outcome["stats"]["warnings"] == 4


def test_an_error_fails_the_run_after_the_output_before_it(lab: LabStatus,
                                                            tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, "error", """
        global n
        probe timer.ms(100) {
          printf("before %d\\n", ++n)
          if (n == 3) error(sprintf("gave up at %d", n))
        }
    """)
    code, events, outcome = apply_json(lab, manifest)
    assert code == 1
    assert (outcome["status"], outcome["kind"]) == ("failed", "runtime-error")
    assert outcome["message"].startswith("gave up at 3")
    assert lines(events) == ["before 1", "before 2", "before 3"]


def test_twenty_thousand_lines_arrive_whole_and_in_order(lab: LabStatus,
                                                         tmp_path: Path) -> None:
    count = 20000
    manifest = write_manifest(tmp_path, "flood", f"""
        global n
        probe timer.ms(5) {{
          for (i = 0; i < 200 && n < {count}; i++) printf("line %d\\n", ++n)
          if (n >= {count}) exit()
        }}
    """)
    code, events, outcome = apply_json(lab, manifest)
    assert code == 0, outcome
    assert lines(events) == [f"line {i}" for i in range(1, count + 1)]
    stats = outcome["stats"]
    assert (stats["lost_records"], stats["transport_failures"], stats["desyncs"]) == (0, 0, 0)
    assert stats["bytes"] == sum(len(f"line {i}\n") for i in range(1, count + 1))


# -- scripts in the spirit of systemtap's examples ------------------------------------

def busy_guest(lab: LabStatus, command: str, seconds: float) -> Callable[[], None]:
    """Runs ``command`` in the guest in a loop while a probe runs; returns its stopper."""
    stop = threading.Event()

    def loop() -> None:
        deadline = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < deadline:
            guest_run(lab, command)
            time.sleep(0.3)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()

    def stopper() -> None:
        stop.set()
        thread.join()
    return stopper


def test_a_syscall_count_printed_at_end_arrives_complete(lab: LabStatus,
                                                         tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, "syscount", """
        global calls
        probe syscall_any { calls[name] <<< 1 }
        probe end {
          foreach (s in calls- limit 20) {
            printf("%s %d\\n", s, @count(calls[s]))
            shown++
          }
          printf("%d syscalls shown\\n", shown)
        }
    """)
    compile_first(lab, manifest)
    stop = busy_guest(lab, "cat /etc/hostname /etc/passwd >/dev/null", 30)
    try:
        code, events, outcome = apply_json(lab, manifest, "--duration", "4s")
    finally:
        stop()
    assert code == 0, outcome
    *rows, last = lines(events)
    assert last == f"{len(rows)} syscalls shown" and len(rows) >= 5
    counts = {name: int(n) for name, n in (row.split() for row in rows)}
    assert list(counts.values()) == sorted(counts.values(), reverse=True)
    assert counts.get("read", 0) > 0 and counts.get("openat", 0) > 0, counts


def test_an_exec_watcher_sees_each_exec(lab: LabStatus, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, "execs", """
        probe kernel.trace("sched:sched_process_exec") {
          printf("exec %s by %d\\n", kernel_string($bprm->filename), pid())
        }
    """)
    compile_first(lab, manifest)
    program = f"/tmp/stapctl-exec-{secrets.token_hex(4)}"
    guest_run(lab, f"printf '#!/bin/sh\\n' > {program} && chmod +x {program}")
    try:
        code, events, outcome = apply_json(
            lab, manifest, "--duration", "5s",
            when_started=lambda: guest_run(lab, f"{program}; {program}; {program}"))
    finally:
        guest_run(lab, f"rm -f {program}")
    assert code == 0, outcome
    execs = [line for line in lines(events) if line.startswith(f"exec {program} by ")]
    assert len(execs) == 3, lines(events)


def test_a_histogram_printed_at_end_arrives_complete(lab: LabStatus, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, "readhist", """
        global sizes
        probe syscall_any.return { if (name == "read" && retval >= 0) sizes <<< retval }
        probe end {
          printf("reads %d\\n", @count(sizes))
          print(@hist_log(sizes))
          printf("end of report\\n")
        }
    """)
    compile_first(lab, manifest)
    stop = busy_guest(lab, "cat /etc/passwd /proc/kallsyms >/dev/null", 30)
    try:
        code, events, outcome = apply_json(lab, manifest, "--duration", "4s")
    finally:
        stop()
    assert code == 0, outcome
    out = lines(events)
    assert out[0].startswith("reads ") and out[-1] == "end of report", out
    assert re.fullmatch(r"value \|-+ count", out[1].strip()), out
    rows = [re.fullmatch(r"\s*(\d+) \|@* *(\d+)", line) for line in out[2:-1]]
    counted = sum(int(row.group(2)) for row in rows if row)
    assert counted == int(out[0].split()[1]) > 0, out
