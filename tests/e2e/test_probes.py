"""`stapctl probes` on the two-kernel lab: one stap listing per kernel release, merged,
then answered from the cache; symbols for kprobe.function come from the guests."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stapctl.lab import LabStatus

from .helpers import guest_host, write_inventory
from .test_two_kernels import other_lab  # noqa: F401 - the second guest's fixture

pytestmark = pytest.mark.e2e


def probes(inventory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stapctl", "probes", "-i", str(inventory),
                           *args], capture_output=True, text=True, timeout=1200, check=False)


def test_probes_listed_per_kernel_then_from_the_cache(
        lab: LabStatus, other_lab: LabStatus, tmp_path: Path) -> None:  # noqa: F811
    hosts = {"main": guest_host(lab), "other": guest_host(other_lab)}
    inventory = write_inventory(tmp_path / "inventory.yaml", hosts)

    # kprobe.function: no debuginfo, so stap needs each guest's kallsyms as its System.map
    result = probes(inventory, "--json", 'kprobe.function("vfs_rea*")')
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    releases = sorted(listing["kernels"])
    assert len(releases) == 2, listing["kernels"]
    by_probe = {entry["probe"]: entry["kernels"] for entry in listing["probes"]}
    assert by_probe['kprobe.function("vfs_read")'] == releases, by_probe
    assert all(name.startswith('kprobe.function("vfs_rea') for name in by_probe)

    # a tracepoint with its variables (-L), in the plain form a person reads
    result = probes(inventory, "--vars", 'kernel.trace("sched:sched_switch")')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith('kernel.trace("sched:sched_switch") ')
    assert "$prev:struct task_struct*" in lines[0]
    assert lines[0].endswith(f"[{releases[0]}, {releases[1]}]")

    # the same question again: from the cache, no stap run
    started = time.monotonic()
    again = probes(inventory, "--vars", 'kernel.trace("sched:sched_switch")')
    assert again.returncode == 0 and again.stdout == result.stdout, again.stderr
    assert time.monotonic() - started < 20

    # a pattern stap cannot parse: one line, exit 2, before any host is contacted
    bad = probes(inventory, 'kernel.trace("sched:')
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.splitlines() == [
        "error: stap cannot parse the probe pattern 'kernel.trace(\"sched:': parse error: "
        "Could not find matching closing quote"], bad.stderr
