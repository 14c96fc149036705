"""How bench/run times a command: wall time, time to its first and last line of output,
the CPU it and its children used, and its process tree's peak memory and descriptors.

Everything is read from the kernel (wait4's rusage, /proc), so any tool is measured the
same way whatever language it is written in.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.loopback_sshd import descendants


@dataclass
class Timing:
    argv: list[str]
    returncode: int
    wall: float  # start to exit
    cpu: float  # user + system seconds of the process and the children it waited for
    stdout: list[tuple[float, str]]  # (seconds since start, line)
    stderr: list[tuple[float, str]]
    peak_rss_mb: float = 0.0  # the whole process tree's resident memory, at its peak
    peak_fds: int = 0  # the whole process tree's open descriptors, at their peak
    timed_out: bool = False
    watched_cpu: float = 0.0  # CPU seconds the ``watch`` processes (guests) used meanwhile

    @property
    def first_line(self) -> float | None:
        return self.stdout[0][0] if self.stdout else None

    @property
    def last_line(self) -> float | None:
        return self.stdout[-1][0] if self.stdout else None

    def lines(self) -> list[str]:
        return [line for _, line in self.stdout]

    def first_stderr(self, text: str) -> float | None:
        """When a stderr line holding ``text`` came, in seconds since the start."""
        return next((t for t, line in self.stderr if text in line), None)


def run(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 600,
        sample_tree: bool = False, cwd: Path | None = None,
        watch: Sequence[int] = ()) -> Timing:
    """Run ``argv`` to its end, stdin closed, timing each output line as it comes; the
    CPU the ``watch`` processes (a guest's qemu) used meanwhile is summed too."""
    watched_before = sum(map(process_cpu, watch))
    started = time.monotonic()
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=cwd, start_new_session=True)
    out: list[tuple[float, str]] = []
    err: list[tuple[float, str]] = []

    def read(stream: object, into: list[tuple[float, str]]) -> None:
        for raw in stream:  # type: ignore[attr-defined]
            into.append((time.monotonic() - started, raw.decode(errors="replace").rstrip("\n")))

    readers = [threading.Thread(target=read, args=(proc.stdout, out), daemon=True),
               threading.Thread(target=read, args=(proc.stderr, err), daemon=True)]
    for reader in readers:
        reader.start()
    peak = Peak()
    sampler = threading.Thread(target=peak.follow, args=(proc.pid,), daemon=True)
    if sample_tree:
        sampler.start()
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        _kill_group(proc.pid)

    killer = threading.Timer(timeout, expire)
    killer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    _kill_group(proc.pid)  # what it left behind (ssh control masters) goes with it
    peak.stop.set()
    for reader in readers:
        reader.join(timeout=10)
    if sample_tree:
        sampler.join()
    return Timing(list(argv), proc.returncode, wall, usage.ru_utime + usage.ru_stime, out, err,
                  peak.rss_kb / 1024, peak.fds, expired.is_set(),
                  sum(map(process_cpu, watch)) - watched_before)


def process_cpu(pid: int) -> float:
    """User + system seconds a running process (all its threads) has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


@dataclass
class Peak:
    """The largest sums of RSS and open descriptors seen over a process and its descendants."""

    rss_kb: int = 0
    fds: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def follow(self, pid: int) -> None:
        while not self.stop.wait(0.05):
            rss = fds = 0
            for member in [pid, *descendants(pid)]:
                try:
                    status = Path(f"/proc/{member}/status").read_text()
                    fds += len(os.listdir(f"/proc/{member}/fd"))
                except OSError:
                    continue
                rss += next((int(line.split()[1]) for line in status.splitlines()
                             if line.startswith("VmRSS:")), 0)
            self.rss_kb, self.fds = max(self.rss_kb, rss), max(self.fds, fds)


@dataclass(frozen=True)
class Figure:
    """A median over runs, with the smallest and the largest."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def show(self, unit: str = "s", digits: int = 2) -> str:
        if not self.values:
            return "–"
        if len(self.values) == 1:
            return f"{self.values[0]:.{digits}f}{unit}"
        return (f"{self.median:.{digits}f}{unit} ({min(self.values):.{digits}f}–"
                f"{max(self.values):.{digits}f})")


def figure(values: Sequence[float | None]) -> Figure:
    return Figure(tuple(v for v in values if v is not None))
