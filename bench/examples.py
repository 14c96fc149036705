"""SystemTap's own example scripts, run through `stapctl apply` on a lab guest's kernel.

The examples are other people's code, so they are neither committed nor fetched here:
copy the chosen ones (and their .meta files) from systemtap's
testsuite/systemtap.examples into a directory first. Each script runs for a few seconds
(`--duration`) while the guest is kept busy (execs, opens, sleeps, signals), and passes
when the run ends cleanly (status ok, no lost records, no module left loaded) and prints
the kind of output the example documents (EXPECTED below, from its .meta/.txt and the
script's own printf formats). Prints a Markdown table; writes bench/results/examples.json.

    stapctl lab up
    python bench/examples.py /tmp/stap-examples [--duration 6] [--host lab-1] [NAME ...]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from stapctl import lab
from stapctl.connection import ConnectOptions, connect, run_command
from stapctl.models import Host

RESULTS = Path(__file__).resolve().parent / "results" / "examples.json"

# What each example's output must contain (a regex, multi-line), after its documentation.
EXPECTED = {
    "helloworld": r"^hello world$",
    "ansi_colors": r"\x1b\[[\d;]*m",  # escape sequences, one per colour
    "stopwatches": r"^wall clock in kernel-space\s+\d+us$",
    "syscalls_by_proc": r"^#SysCalls\s+Process Name\n(\d+\s+\S.*\n?)+",
    "syscalls_by_pid": r"^#SysCalls\s+PID\n(\d+\s+\d+\n?)+",
    "syscallbypid-nd": r"^PID\s+CMD\s+SYSCALL\s+COUNT\n(\d+\s+\S+\s+\S+\s+\d+\n?)+",
    "sched-latency": r"^pid:\d+ prio:\d+\n.*value \|-+ count",
    "cycle_thief": r"^task 0 migrated: \d+(.|\n)*^other pids taking processor from task 0$",
    "dropwatch": r"^Monitoring for dropped packets\n(.|\n)*Stopping dropped packet monitor$",
    "forktracker": r": \S+ \(\d+:\d+\) created \d+:\d+$(.|\n)*is exec'ing ",
    "thread-business": r"^\s+execname\s+tid\s+count",
    "topsys": r"^\s+SYSCALL\s+COUNT\n(\s*\S+\s+\d+\n)+-{20,}",
    "errno": r"^\s+PID\s+Syscall\s+Process\s+Error\s+Count$",
    "futexes": r"^\S+\[\d+\] lock 0x[0-9a-f]+ contended \d+ times, \d+ avg us$",
    "sleeptime": r"^\d+ \d+ \(\S+\) \w*nanosleep: \d+$",
    "bitesize-nd": r"^Tracing block I/O(.|\n)*^I/O size \(bytes\):$",
}

# Keeps the guest's kernel busy while a probe runs: syscalls, execs, sleeps, futex
# contention (a python thread pair), a signal, a dropped packet (UDP to a closed port).
ACTIVITY = r"""
end=$(( $(date +%s) + {seconds} ))
while [ $(date +%s) -lt $end ]; do
  cat /etc/hostname >/dev/null; ls /proc >/dev/null; sleep 0.2
  sh -c 'kill -USR1 $$' 2>/dev/null
  python3 -c 'import socket; socket.socket(2, 2).sendto(b"x", ("127.0.0.1", 9))' || true
  python3 -c '
import threading
lock = threading.Lock()
def work():
    for _ in range(2000):
        with lock: pass
threads = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]'
done
"""


@dataclass
class Outcome:
    name: str
    probes: str
    result: str
    check: str
    lines: int
    seconds: float
    sample: str


def probe_types(script: str) -> str:
    """The probe points a script uses, with tapset aliases and arguments kept short."""
    code = re.sub(r"/\*.*?\*/", "", re.sub(r"(#|//).*", "", script), flags=re.S)
    code = re.sub(r"(\w[\w.]*)\.\{([^{}]*)\}",  # kernel.{a, b} is kernel.a, kernel.b
                  lambda m: ",".join(f"{m.group(1)}.{p.strip()}" for p in m.group(2).split(",")),
                  code)
    points: list[str] = []
    for match in re.finditer(r"\bprobe\s+([^{]+?)\s*\{", code):
        for point in re.split(r",\s*(?![^(]*\))", match.group(1)):
            point = re.sub(r"\s+", "", point).rstrip("?!")
            point = re.sub(r"^timer\.\w+\(.*\)$", lambda m: m.group(0).split("(")[0], point)
            if point and point not in points:
                points.append(point)
    return ", ".join(points)


def guest_run(host: Host, command: str) -> str:
    connection = connect(host, ConnectOptions())
    try:
        return run_command(connection, ["sh", "-c", command]).stdout.decode(errors="replace")
    finally:
        connection.close()


def run_example(path: Path, status: lab.LabStatus, host: Host, duration: float,
                work: Path) -> Outcome:
    name = path.stem
    manifest = work / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "stapctl/v1", "kind": "Trace", "name": re.sub(r"[^a-z0-9-]", "-",
                                                                    name.lower()),
        "probes": [{"name": "example", "file": str(path)}]}))
    argv = [sys.executable, "-m", "stapctl", "apply", "-i", str(status.inventory),
            "--limit", host.name, "--format", "json"]
    # compile first, so that the duration below is spent running, not building
    check = subprocess.run([*argv, "--check", str(manifest)], capture_output=True, text=True,
                           check=False)
    probes = probe_types(path.read_text(errors="replace"))
    if check.returncode != 0:
        reason = (check.stderr.strip().splitlines() or ["?"])[-1]
        for line in check.stderr.splitlines():
            if "semantic error" in line or "error:" in line:
                reason = line.strip()
                break
        return Outcome(name, probes, "compile failed", "-", 0, 0.0, reason[:160])
    activity = threading.Thread(target=guest_run, daemon=True, args=(
        host, ACTIVITY.format(seconds=int(duration) + 8)))
    activity.start()
    time.sleep(1.0)
    started = time.monotonic()
    proc = subprocess.run([*argv, "--duration", f"{duration:g}s", str(manifest)],
                          capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    activity.join()
    records: list[dict[str, Any]] = [json.loads(line) for line in proc.stdout.splitlines()
                                     if line.startswith("{")]
    lines = [r["text"] for r in records if r.get("kind") == "output"]
    loaded = [r["text"] for r in records if r.get("kind") == "loaded"]
    summary = next((r for r in records if r.get("type") == "summary"), {})
    outcome = (summary.get("outcomes") or [{}])[0]
    stats = outcome.get("stats") or {}
    result = "ok" if outcome.get("status") == "ok" else \
        f"{outcome.get('kind')}: {outcome.get('message', proc.stderr[-200:])}"
    if stats.get("lost_records") or stats.get("transport_failures"):
        result += f" (lost {stats.get('lost_records')}, failures {stats.get('transport_failures')})"
    left = guest_run(host, "cat /proc/modules; ls /proc/systemtap 2>/dev/null")
    if any(module in left for module in loaded):
        result += "; MODULE LEFT LOADED"
    text = "\n".join(lines)
    expected = EXPECTED.get(name, r"\S")
    passed = result == "ok" and re.search(expected, text, re.M) is not None
    sample = " ⏎ ".join(line.strip() for line in lines if line.strip())[:160]
    return Outcome(name, probes, result, "pass" if passed else "FAIL", len(lines),
                   round(seconds, 1), sample)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", type=Path, help="where the example .stp files are")
    parser.add_argument("names", nargs="*", help="only these examples (file stems)")
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--host", default="lab-1")
    args = parser.parse_args()
    status = lab.Lab.default().status()
    if not any(g.name == args.host and g.state is lab.GuestState.RUNNING
               for g in status.guests):
        sys.exit(f"{args.host} is not running: stapctl lab up")
    host = status.host(args.host)
    paths = sorted(p for p in args.directory.rglob("*.stp")
                   if not args.names or p.stem in args.names)
    outcomes = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            outcome = run_example(path, status, host, args.duration, Path(tmp))
            print(f"{outcome.name}: {outcome.result}, {outcome.check}", file=sys.stderr)
            outcomes.append(outcome)
    print("| example | probe types | result | check | lines | seconds | output sample |")
    print("|---|---|---|---|---|---|---|")
    for o in outcomes:
        sample = o.sample.replace("|", "\\|").replace("\x1b", "\\e")
        print(f"| {o.name} | {o.probes} | {o.result} | {o.check} | {o.lines} | {o.seconds} "
              f"| {sample} |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps([asdict(o) for o in outcomes], indent=1) + "\n")


if __name__ == "__main__":
    main()
