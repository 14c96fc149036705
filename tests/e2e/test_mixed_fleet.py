"""A mixed fleet: a Debian 12 guest (6.1, the controller's systemtap 4.8) and a Debian 13
guest (6.12, systemtap 5.1 from the trixie build root) in one lab and one apply.

The lab is booted as a user would (`stapctl lab up --hosts 2 --release bookworm,trixie`)
in a folder of its own, so the trixie build root is made on demand if the test state has
none yet; the lab is stopped when this module's tests are done.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from stapctl.lab import Lab, LabStatus
from stapctl.manifest import load_manifest
from stapctl.plan import ModuleJob
from stapctl.session import Session, Silent, select_hosts

from .helpers import apply, stap_module_names, unload_stap_modules

pytestmark = pytest.mark.e2e

PLAYBOOKS = Path(__file__).resolve().parents[2] / "playbooks"
MIXED_LAB = Lab.default().directory.parent / "lab-mixed"


def stapctl(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it, on the mixed lab."""
    return subprocess.run([sys.executable, "-m", "stapctl", *args], capture_output=True,
                          text=True, timeout=timeout, check=False,
                          env=dict(os.environ, STAPCTL_LAB_DIR=str(MIXED_LAB)))


@pytest.fixture(scope="module")
def lab() -> Iterator[LabStatus]:
    """The mixed lab, standing in for the session's lab in this module (so the shared
    check for modules left loaded looks at these guests too)."""
    up = stapctl("lab", "up", "--hosts", "2", "--release", "bookworm,trixie")
    assert up.returncode == 0, up.stderr
    try:
        yield Lab(MIXED_LAB).status()
    finally:
        Lab(MIXED_LAB).down()


@pytest.fixture(autouse=True)
def nothing_left_loaded(lab: LabStatus) -> Iterator[None]:
    yield
    left = {g.name: stap_module_names(lab, index) for index, g in enumerate(lab.guests)}
    for index, guest in enumerate(lab.guests):
        unload_stap_modules(lab, left[guest.name], index)
    assert not any(left.values()), f"modules left loaded: {left}"


def test_lab_status_gives_each_guests_release(lab: LabStatus) -> None:
    status = stapctl("lab", "status", "--json")
    assert status.returncode == 0, status.stderr
    guests = json.loads(status.stdout)["guests"]
    releases = [g["release"] for g in guests]
    assert [g["name"] for g in guests] == ["lab-1", "lab-2"]
    assert releases[0].startswith("6.1.") and releases[1].startswith("6.12."), releases
    assert "+deb13" in releases[1]
    inventory = yaml.safe_load(Path(json.loads(status.stdout)["inventory"]).read_text())
    assert sorted(inventory["all"]["hosts"]) == ["lab-1", "lab-2"]


def test_one_apply_two_toolchains_in_parallel_then_nothing_to_compile(
        lab: LabStatus, tmp_path: Path) -> None:
    token = secrets.token_hex(4)  # a script no cache has seen: both compiles are real
    manifest_path = tmp_path / "kernels.yaml"
    manifest_path.write_text(yaml.safe_dump({
        "apiVersion": "stapctl/v1", "kind": "Trace", "name": "kernels",
        "inventory": str(lab.inventory),
        "probes": [{"name": "kernels", "script":
                    f'probe oneshot {{ printf("{token} %s\\n", "{{{{ kernel_release }}}}") }}'}],
    }))
    manifest = load_manifest(manifest_path)
    times: dict[tuple[str, str], float] = {}

    class BuildTimes(Silent):
        def build(self, job: ModuleJob, state: str) -> None:
            times[(job.spec.toolchain or "host", state)] = time.monotonic()

    session = Session(manifest, select_hosts(manifest), listener=BuildTimes(), record=False)
    try:
        connected = session.connect()
    finally:
        session.finish()
    plan = session.plan(connected)
    assert sorted(job.spec.toolchain for job in plan.jobs) == ["", "trixie"]
    assert sorted(job.spec.stap_version for job in plan.jobs) == ["4.8", "5.1"]
    built = session.build(plan)
    assert all(job.cached for job in built.jobs), [job.error for job in built.jobs]
    # in parallel: each compile started before the other one finished
    assert times[("host", "building")] < times[("trixie", "built")]
    assert times[("trixie", "building")] < times[("host", "built")]

    for attempt in ("first", "second"):
        result = apply(lab, PLAYBOOKS / "hello.yaml")
        assert result.returncode == 0, (attempt, result.stderr)
        assert sorted(result.stdout.splitlines()) == ["lab-1: hello, world!",
                                                      "lab-2: hello, world!"], attempt
    assert "building" not in result.stderr  # the second apply compiled nothing


def test_plan_shows_which_toolchain_builds_which_module(lab: LabStatus) -> None:
    result = stapctl("plan", "-i", str(lab.inventory), str(PLAYBOOKS / "hello.yaml"))
    assert result.returncode == 0, result.stderr
    lines = " ".join(result.stderr.split())
    assert "host 4.8" in lines and "trixie 5.1" in lines, lines


PROBES = {
    # name: script; each ends itself once it has printed something
    "timer": 'global n; probe timer.ms(100) { n++; printf("tick %d\\n", n); if (n == 3) exit() }',
    "syscall": 'probe syscall.read { printf("read by %s\\n", execname()); exit() }',
    "tracepoint": 'probe kernel.trace("sched:sched_switch") { println("switched"); exit() }',
    # many records at once: the 5.x transport frames each with a magic the agent must find
    "burst": ('global n; probe timer.ms(5) { for (i = 0; i < 50; i++) printf("burst %d\\n", n++);'
              ' if (n >= 2000) exit() }'),
}


def test_timer_syscall_tracepoint_and_burst_on_both_kernel_lines(
        lab: LabStatus, tmp_path: Path) -> None:
    manifest = tmp_path / "mixed.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "stapctl/v1", "kind": "Trace", "name": "mixed",
        "probes": [{"name": name, "script": script} for name, script in PROBES.items()],
    }, sort_keys=False))
    result = apply(lab, manifest, timeout=2400)
    assert result.returncode == 0, result.stderr
    printed: dict[str, list[str]] = {}  # "host[probe]" → its lines
    for line in result.stdout.splitlines():
        label, _, text = line.partition(": ")
        printed.setdefault(label, []).append(text)
    for guest in ("lab-1", "lab-2"):
        assert printed[f"{guest}[timer]"] == ["tick 1", "tick 2", "tick 3"]
        assert printed[f"{guest}[syscall]"][0].startswith("read by "), printed
        # exit() stops the module asynchronously: another CPU may switch tasks first
        assert set(printed[f"{guest}[tracepoint]"]) == {"switched"}, printed
        burst = printed[f"{guest}[burst]"]
        assert burst == [f"burst {n}" for n in range(2000)], (guest, len(burst))


@pytest.mark.parametrize("guest", ["lab-1", "lab-2"], ids=["6.1", "6.12"])
def test_kprobe_function_on_each_kernel_line(lab: LabStatus, tmp_path: Path,
                                            guest: str) -> None:
    """Each line's stap finds the function in the guest's own kernel symbols (6.12's
    systemtap 5.1 reads them from a /boot of its own in the build root)."""
    token = secrets.token_hex(4)  # a script no cache has seen: the compile is real
    manifest = tmp_path / "kprobe.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "stapctl/v1", "kind": "Trace", "name": "kprobe",
        "probes": [{"name": "kprobe", "script":
                    f'probe kprobe.function("vfs_read") {{ println("{token} vfs_read hit"); '
                    'exit() }'}],
    }))
    result = apply(lab, manifest, "--limit", guest)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{guest}: {token} vfs_read hit"]
