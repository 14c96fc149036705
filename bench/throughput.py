"""Output throughput: stapctl's agent against native staprun, same module, same guest.

A print-heavy probe writes LINES fixed-width numbered lines, PER_HIT of them every 100 µs
(an hrtimer), then exits: PER_HIT 100 is a burst that outruns every reader, PER_HIT 10 a
steady flow. Each round runs the very same .ko, in turn:
- `staprun -o /dev/null` inside the guest (stapio: C, a reader thread per CPU);
- the agent alone inside the guest, its stdout to /dev/null (the agent's own cost);
- stapctl end to end: the agent, its frames over SSH, the controller's frame reader.
A run's time is load to unload; the median time of a run of BASELINE lines (start-up,
insmod, rmmod) is subtracted, so the rates are those of the output path. Records lost:
the module's "There were N transport failures" plus, for stapctl, sequence numbers that
never arrived (lost_records); stapctl's lines are also checked one by one (every number,
once, in order). The agent-alone run reports no loss figure (its stdout is discarded).
Prints a table; writes bench/results/throughput-<mode>.json.

    stapctl lab up
    python bench/throughput.py [--mode burst|steady] [--lines 500000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from stapctl import lab
from stapctl.agent import COMPRESS, AgentHost, AgentRequest, Frame
from stapctl.build import Builder
from stapctl.connection import Connection, ConnectOptions, connect

RESULTS = Path(__file__).resolve().parent / "results"
LINE = 80  # bytes per line: "%08d " + 70 characters + "\n"
BASELINE = 100
PER_HIT = {"burst": 100, "steady": 10}
# What follows each line's number: `fixed` compresses about 29:1 (zlib level 1), `random`
# (hex of a 64-bit LCG) about 2:1, a worst case for the compressed stream.
TEXT = {
    "fixed": ("", '"%08d ' + "x" * 70 + '\\n", ++n'),
    "random": ("s = s * 6364136223846793005 + 1442695040888963407\n"
               "    t = s * 6364136223846793005 + 1442695040888963407\n"
               "    u = t * 6364136223846793005 + 1442695040888963407\n"
               "    s = u * 6364136223846793005 + 1442695040888963407",
               '"%08d %016x%016x%016x%016x%06x\\n", ++n, s, t, u, s ^ t, (u >> 40) & 0xffffff'),
}


def script(text: str) -> str:
    step, printf = TEXT[text]
    return f"""
global lines = {BASELINE}
global per_hit = 100
global n, s
probe timer.us(100) {{
  for (i = 0; i < per_hit && n < lines; i++) {{
    {step}
    printf({printf})
  }}
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
    lost: int | None  # records lost, when the tool can tell
    detail: str


@dataclass
class Bench:
    connection: Connection
    agent: AgentHost
    ko: str  # the module as staprun wants it: named after the module
    request: AgentRequest  # the agent's run request, less the parameters
    per_hit: int
    bufsize: int

    def params(self, lines: int) -> dict[str, int]:
        return {"lines": lines, "per_hit": self.per_hit}

    def staprun(self, lines: int) -> Run:
        args = " ".join(f"{k}={v}" for k, v in self.params(lines).items())
        out = shell(self.connection, f"cd /tmp && {TIMED} '' staprun -b {self.bufsize} "
                                     f"-o /dev/null {self.ko} {args}")
        seconds, code = out.split("\n", 1)[0].split()
        if code != "0":
            sys.exit(f"staprun failed: {out}")
        failures = re.search(r"There were (\d+) transport failures", out)
        lost = int(failures.group(1)) if failures else 0
        return Run("staprun", lines, float(seconds), lost, f"transport failures {lost}")

    def agent_alone(self, lines: int) -> Run:
        line = replace(self.request, params=self.params(lines)).encode().decode().strip()
        out = shell(self.connection, f"{TIMED} {shlex.quote(line)} python3 -I "
                                     f"{self.agent.path}")
        seconds, code = out.split("\n", 1)[0].split()
        if code != "0":
            sys.exit(f"the agent failed: {out}")
        return Run("agent in guest", lines, float(seconds), None, "stdout to /dev/null")

    def stapctl(self, lines: int) -> Run:
        received = bytearray()

        def on_frame(frame: Frame) -> None:
            if frame.kind == "output":
                received.extend(frame.data)

        started = time.monotonic()
        result = self.agent.call(replace(self.request, params=self.params(lines)), on_frame)
        seconds = time.monotonic() - started
        numbers = [int(line[:8]) for line in received.splitlines()]
        whole = numbers == sorted(set(numbers)) and len(received) == LINE * len(numbers)
        if not result.ok or not whole:
            sys.exit(f"stapctl: {result.kind}: {result.message}; lines whole: {whole}")
        stats = result.stats
        lost = stats["transport_failures"] + stats["lost_records"]
        return Run("stapctl", lines, seconds, lost,
                   f"transport failures {stats['transport_failures']}, lost_records "
                   f"{stats['lost_records']}, desyncs {stats['desyncs']}, lines missing "
                   f"{lines - len(numbers)}")


def shell(connection: Connection, command: str) -> str:
    process = connection.start(["sh", "-c", command])
    out = b""
    while chunk := process.recv(65536):
        out += chunk
    process.wait()
    return out.decode(errors="replace")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=sorted(PER_HIT), default="burst")
    parser.add_argument("--lines", type=int, default=500000)
    parser.add_argument("--text", choices=sorted(TEXT), default="fixed",
                        help="what each line carries after its number")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bufsize", type=int, default=64,
                        help="relay buffer per CPU, MB: the whole output fits (-b, _stp_bufsize)")
    parser.add_argument("--host", default="lab-1")
    parser.add_argument("--compress", type=int, default=COMPRESS,
                        help="zlib level of the agent's output stream, 0 for plain frames "
                             "(the agent in the guest compresses too)")
    args = parser.parse_args()
    status = lab.Lab.default().status()
    if not any(g.name == args.host and g.state is lab.GuestState.RUNNING
               for g in status.guests):
        sys.exit(f"{args.host} is not running: stapctl lab up")
    connection = connect(status.host(args.host), ConnectOptions())
    builder = Builder()
    release = shell(connection, "uname -r").strip()
    # the producer is meant to saturate its CPU: no overload check
    spec = builder.spec(script(args.text), release, "x86_64", ("-DSTP_NO_OVERLOAD",),
                        origin="throughput")
    artifact = builder.build(spec)
    agent = AgentHost(connection)
    agent.install()
    remote = agent.upload_module(artifact.path, artifact.sha256)
    ko = f"/tmp/{artifact.module_name}.ko"  # staprun names the module after the file
    shell(connection, f"cp {remote} {ko}")
    request = AgentRequest(action="run", module=remote, sha256=artifact.sha256,
                           module_name=artifact.module_name, bufsize_mb=args.bufsize,
                           compress=args.compress)
    bench = Bench(connection, agent, ko, request, PER_HIT[args.mode], args.bufsize)
    tools = [bench.staprun, bench.agent_alone, bench.stapctl]
    runs: list[Run] = []
    for round_ in range(args.rounds):
        for lines in (BASELINE, args.lines):
            for tool in tools[round_ % 3:] + tools[:round_ % 3]:  # rotate the order
                run = tool(lines)
                print(f"round {round_ + 1}: {run.tool} {run.lines} lines in {run.seconds:.2f} s,"
                      f" {run.detail}", file=sys.stderr)
                runs.append(run)
    shell(connection, f"rm -f {ko}")
    connection.close()

    rows = []
    for name in ("staprun", "agent in guest", "stapctl"):
        base = statistics.median(r.seconds for r in runs if r.tool == name and
                                 r.lines == BASELINE)
        full = [r for r in runs if r.tool == name and r.lines == args.lines]
        seconds = statistics.median(r.seconds for r in full) - base
        count = args.lines - BASELINE
        rows.append({"tool": name, "lines": args.lines, "overhead_s": round(base, 2),
                     "output_s": round(seconds, 2), "lines_per_s": round(count / seconds),
                     "mb_per_s": round(count * LINE / seconds / 1e6, 1),
                     "records_lost": [r.lost for r in full]})
    print(f"{args.mode}: {args.lines} lines of {LINE} bytes, {PER_HIT[args.mode]} per 100 µs "
          f"hit, {args.rounds} rounds (medians), output compressed at zlib level "
          f"{args.compress}\n")
    print("| tool | run overhead (s) | output time (s) | lines/s | MB/s | records lost |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        lost = "n/a" if row["records_lost"][0] is None else row["records_lost"]
        print(f"| {row['tool']} | {row['overhead_s']} | {row['output_s']} | "
              f"{row['lines_per_s']} | {row['mb_per_s']} | {lost} |")
    ratio = rows[2]["lines_per_s"] / rows[0]["lines_per_s"]
    alone = rows[1]["lines_per_s"] / rows[0]["lines_per_s"]
    print(f"\nstapctl / staprun: {ratio:.2f}; the agent alone / staprun: {alone:.2f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"throughput-{args.mode}-{args.text}.json").write_text(json.dumps(
        {"compress": args.compress, "runs": [asdict(r) for r in runs], "summary": rows,
         "ratio": round(ratio, 3),
         "agent_alone_ratio": round(alone, 3)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
