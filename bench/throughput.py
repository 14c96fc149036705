"""Output throughput: stapctl's agent against native staprun, same module, same guest.

A print-heavy probe writes numbered 80-byte lines, PER_HIT of them every 100 µs (an
hrtimer), then exits: 100 a hit is a burst that outruns every reader. Each round runs the
very same .ko, in turn:
- `staprun -o /dev/null` inside the guest (stapio: C, a reader thread per CPU);
- stapctl end to end: the agent, its frames over SSH, the controller's frame reader.
A run's time is load to unload; the fastest run of BASELINE lines (start-up, insmod,
rmmod) is subtracted, so the rates are those of the output path: a baseline run slowed by a
busy machine (the median of three can be one) would leave a full run's output time near
zero and its rate absurd, and the fastest is the same rule for both tools. Records lost:
the module's "There were N transport failures" plus, for stapctl, sequence numbers that
never arrived (lost_records); stapctl's lines are also checked one by one (every number,
once, in order).
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

from guests import exec_to_exit, module_on, shell

from stapctl.agent import COMPRESS, AgentHost, AgentRequest, Frame
from stapctl.connection import Connection

LINE = 80  # bytes per line: "%08d " + 70 characters + "\n"
BASELINE = 100
PER_HIT = {"burst": 100}
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
        args = [f"{k}={v}" for k, v in self.params(lines).items()]
        seconds, code, stderr = exec_to_exit(self.connection, [
            "staprun", "-b", str(self.bufsize), "-o", "/dev/null", self.ko, *args])
        if code != 0:
            sys.exit(f"staprun failed: {stderr}")
        failures = re.search(r"There were (\d+) transport failures", stderr)
        lost = int(failures.group(1)) if failures else 0
        return Run("staprun", lines, seconds, lost, f"transport failures {lost}")

    def link(self, lines: int) -> Run:
        """The SSH link alone: the same number of bytes (zeros: SSH compresses nothing),
        read over an exec channel of the same connection, no probe and no agent."""
        started = time.monotonic()
        process = self.connection.start(["head", "-c", str(lines * LINE), "/dev/zero"])
        received = 0
        while chunk := process.recv(1 << 20):
            received += len(chunk)
        code = process.wait()
        if code != 0 or received != lines * LINE:
            sys.exit(f"head -c over SSH: exit {code}, {received} of {lines * LINE} bytes")
        return Run("link", lines, time.monotonic() - started, None, "")

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


def measure(connection: Connection, text: str, lines: int, rounds: int, link: bool,
            bufsize: int = 64) -> dict[str, Any]:
    """Lines per second of staprun and of stapctl for ``text`` (fixed or random), and
    the records each lost, over ``rounds`` alternating rounds; and with ``link``, as the
    ceiling of anything sent over SSH uncompressed, the link's own rate for as many
    bytes."""
    # the producer is meant to saturate its CPU: no overload check
    module = module_on(connection, script(text), "throughput", ("-DSTP_NO_OVERLOAD",))
    request = AgentRequest(action="run", module=module.path, sha256=module.artifact.sha256,
                           module_name=module.artifact.module_name, bufsize_mb=bufsize,
                           compress=COMPRESS)
    bench = Bench(connection, module.agent, module.ko, request, PER_HIT["burst"], bufsize)
    tools = [bench.staprun, bench.stapctl, *([bench.link] if link else [])]
    runs: list[Run] = []
    for round_ in range(rounds):
        for count in (BASELINE, lines):
            shift = round_ % len(tools)  # rotate the order
            for tool in tools[shift:] + tools[:shift]:
                runs.append(tool(count))
    shell(connection, f"rm -f {module.ko}")
    rates: dict[str, Any] = {}
    for name in dict.fromkeys(r.tool for r in runs):  # each tool, in the order above
        base = min(r.seconds for r in runs if r.tool == name and r.lines == BASELINE)
        full = [r for r in runs if r.tool == name and r.lines == lines]
        rates[name] = {"lines_per_s": [(lines - BASELINE) / max(r.seconds - base, 1e-3)
                                       for r in full],
                       "lost": [r.lost or 0 for r in full]}
    return rates
