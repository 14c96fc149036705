"""Output throughput: stapctl's agent against native staprun, same module, same guest.

A print-heavy probe writes LINES fixed-width numbered lines as fast as its timer lets it,
then exits. Each round runs the very same .ko once with `staprun -o /dev/null` inside the
guest and once through stapctl (the agent, its frames over SSH, the controller's frame
reader), alternating. A run's time is load to unload; the per-run overhead (a run of
BASELINE lines) is subtracted, so the rates are those of the output path. Loss: stapctl's
stats (lost_records, transport_failures) and a check of every line number; staprun's
"There were N transport failures". Prints a table; writes bench/results/throughput.json.

    stapctl lab up
    python bench/throughput.py [--lines 500000] [--bufsize 64] [--rounds 3] [--host lab-1]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from stapctl import lab
from stapctl.agent import AgentHost, Frame
from stapctl.build import Builder
from stapctl.connection import ConnectOptions, SSHConnection
from stapctl.models import Host

RESULTS = Path(__file__).resolve().parent / "results" / "throughput.json"
PAD = "x" * 70
LINE = 80  # bytes: "%08d " + PAD + "\n"
BASELINE = 100
SCRIPT = f"""
global lines = {BASELINE}
global n
probe timer.us(100) {{
  for (i = 0; i < 100 && n < lines; i++)
    printf("%08d {PAD}\\n", ++n)
  if (n >= lines) exit()
}}
"""
# Times a command inside the guest (no SSH round trip counted), its output to /dev/null;
# the first argument is a line for its stdin, which stays open until the command ends.
TIMED = ("python3 -c 'import subprocess, sys, time; t = time.monotonic(); "
         "p = subprocess.Popen(sys.argv[2:], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, "
         "stderr=subprocess.PIPE); p.stdin.write(sys.argv[1].encode() + b\"\\n\"); "
         "p.stdin.flush(); err = p.stderr.read(); p.wait(); "
         "print(time.monotonic() - t, p.returncode); sys.stdout.write(err.decode())'")


@dataclass
class Run:
    tool: str
    lines: int
    seconds: float
    lost: int  # lines missing (stapctl) or transport failures (staprun)
    detail: str


def guest(status: lab.LabStatus, name: str) -> Host:
    g = next(g for g in status.guests if g.name == name)
    return Host(name=g.name, address=g.host, port=g.port, user=g.user, key_file=g.key,
                known_hosts=str(status.known_hosts))


def shell(connection: SSHConnection, command: str) -> str:
    process = connection.start(["sh", "-c", command])
    out = b""
    while chunk := process.recv(65536):
        out += chunk
    process.wait()
    return out.decode(errors="replace")


def run_staprun(connection: SSHConnection, ko: str, bufsize: int, lines: int) -> Run:
    out = shell(connection, f"cd /tmp && {TIMED} '' staprun -b {bufsize} -o /dev/null {ko} "
                            f"lines={lines}")
    seconds, code = out.split("\n", 1)[0].split()
    failures = re.search(r"There were (\d+) transport failures", out)
    if code != "0":
        sys.exit(f"staprun failed: {out}")
    return Run("staprun", lines, float(seconds), int(failures.group(1)) if failures else 0,
               "transport failures: " + (failures.group(1) if failures else "0"))


def run_agent_in_guest(connection: SSHConnection, agent: AgentHost,
                       request: dict[str, object], lines: int) -> Run:
    """The agent alone, its stdout to /dev/null: what it costs to read the relays."""
    line = json.dumps({**request, "protocol": 1, "params": {"lines": lines}})
    out = shell(connection, f"{TIMED} {shlex.quote(line)} python3 -I {agent.path}")
    seconds, code = out.split("\n", 1)[0].split()
    if code != "0":
        sys.exit(f"the agent failed: {out}")
    return Run("agent in guest", lines, float(seconds), 0, "stdout to /dev/null")


def run_stapctl(agent: AgentHost, request: dict[str, object], lines: int) -> Run:
    received = bytearray()

    def on_frame(frame: Frame) -> None:
        if frame.kind == "output":
            received.extend(frame.data)

    started = time.monotonic()
    result = agent.call({**request, "params": {"lines": lines}}, on_frame)
    seconds = time.monotonic() - started
    numbers = [int(line[:8]) for line in received.splitlines()]
    missing = lines - len(set(numbers))
    if result["status"] != "ok" or numbers != sorted(numbers) or len(received) != LINE * len(
            numbers):
        print(f"stapctl: {result['kind']}: {result['message']}; "
              f"in order: {numbers == sorted(numbers)}", file=sys.stderr)
    stats = result["stats"]
    return Run("stapctl", lines, seconds, missing,
               f"lost_records {stats['lost_records']}, transport_failures "
               f"{stats['transport_failures']}, desyncs {stats['desyncs']}, "
               f"records {stats['records']}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=500000)
    parser.add_argument("--bufsize", type=int, default=64,
                        help="relay buffer per CPU, MB: the whole output fits (-b, _stp_bufsize)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--host", default="lab-1")
    args = parser.parse_args()
    status = lab.status()
    if not any(g.name == args.host and g.state == "running" for g in status.guests):
        sys.exit(f"{args.host} is not running: stapctl lab up")
    connection = SSHConnection(guest(status, args.host), ConnectOptions())
    builder = Builder()
    release = shell(connection, "uname -r").strip()
    # the producer is meant to saturate its CPU: no overload check
    spec = builder.spec(SCRIPT, release, "x86_64", ("-DSTP_NO_OVERLOAD",))
    artifact = builder.build(spec, "throughput", 1)
    agent = AgentHost(connection)
    agent.install()
    remote = agent.upload_module(artifact.path, artifact.sha256)
    ko = f"/tmp/{artifact.module_name}.ko"  # staprun names the module after the file
    shell(connection, f"cp {remote} {ko}")
    request: dict[str, object] = {"action": "run", "module": remote,
                                  "sha256": artifact.sha256,
                                  "module_name": artifact.module_name,
                                  "bufsize_mb": args.bufsize}
    runs: list[Run] = []
    for round_ in range(args.rounds):
        for lines in (BASELINE, args.lines):
            tools = [lambda n=lines: run_staprun(connection, ko, args.bufsize, n),
                     lambda n=lines: run_agent_in_guest(connection, agent, request, n),
                     lambda n=lines: run_stapctl(agent, request, n)]
            for tool in tools if round_ % 2 == 0 else reversed(tools):  # alternate the order
                run = tool()
                print(f"round {round_ + 1}: {run.tool} {run.lines} lines in {run.seconds:.2f} s,"
                      f" {run.detail}", file=sys.stderr)
                runs.append(run)
    shell(connection, f"rm -f {ko}")
    connection.close()

    rows = []
    for tool in ("staprun", "agent in guest", "stapctl"):
        base = statistics.median(r.seconds for r in runs if r.tool == tool and
                                 r.lines == BASELINE)
        full = [r for r in runs if r.tool == tool and r.lines == args.lines]
        seconds = statistics.median(r.seconds for r in full) - base
        count = args.lines - BASELINE
        rows.append({"tool": tool, "lines": args.lines, "overhead_s": round(base, 2),
                     "output_s": round(seconds, 2), "lines_per_s": round(count / seconds),
                     "mb_per_s": round(count * LINE / seconds / 1e6, 2),
                     "lost": [r.lost for r in full], "detail": [r.detail for r in full]})
    print("| tool | lines | run overhead (s) | output time (s) | lines/s | MB/s | lost |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['tool']} | {row['lines']} | {row['overhead_s']} | {row['output_s']} | "
              f"{row['lines_per_s']} | {row['mb_per_s']} | {row['lost']} |")
    ratio = rows[2]["lines_per_s"] / rows[0]["lines_per_s"]
    print(f"\nstapctl / staprun throughput: {ratio:.2f}; the agent alone in the guest: "
          f"{rows[1]['lines_per_s'] / rows[0]['lines_per_s']:.2f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"runs": [asdict(r) for r in runs], "summary": rows,
                                   "ratio": round(ratio, 3)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
