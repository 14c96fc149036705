"""An audit on a real kernel: playbooks/exec-audit.yaml applied by hand, then by its
schedule's own command line (`schedule run`) with --baseline last, with a new program run
in the guest in between; the difference is exactly that program. A third scheduled run
stopped with SIGTERM (what `systemctl stop` sends) ends cleanly, recorded, nothing left
loaded."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stapctl import history
from stapctl.lab import LabStatus

from .helpers import apply, guest_run, stap_module_names

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
# a workload that runs the same programs every second, in both runs; the planted change
# is one more program in it
WORKLOAD = "/tmp/stapctl-audit-job.sh"
PLANTED = "/tmp/stapctl-planted-tool"
START_WORKLOAD = f"""
echo 'cat /proc/version >/dev/null' > {WORKLOAD}
setsid sh -c 'echo $$ > /tmp/stapctl-audit-loop.pid;
  while :; do sh {WORKLOAD}; sleep 1; done' </dev/null >/dev/null 2>&1 &
"""
PLANT = f"""
printf '#!/bin/sh\\n:\\n' > {PLANTED} && chmod +x {PLANTED} && echo {PLANTED} >> {WORKLOAD}
"""
STOP_WORKLOAD = f"kill $(cat /tmp/stapctl-audit-loop.pid); rm -f {WORKLOAD} {PLANTED}"


def audit_manifest(folder: Path) -> Path:
    """playbooks/exec-audit.yaml as it is, on lab-1 only, for 8 seconds a run."""
    document = yaml.safe_load((REPO / "playbooks" / "exec-audit.yaml").read_text())
    document["hosts"] = "lab-1"
    document["probes"][0]["duration"] = "8s"
    path = folder / "exec-audit.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def stapctl(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stapctl", *args], capture_output=True,
                          text=True, check=False, timeout=timeout)


def test_a_scheduled_audit_shows_exactly_the_new_program(lab: LabStatus,
                                                         tmp_path: Path) -> None:
    manifest = audit_manifest(tmp_path)
    units = tmp_path / "units"
    added = stapctl("schedule", "add", str(manifest), "--every", "1h", "-i",
                    str(lab.inventory), "--unit-dir", str(units))
    assert added.returncode == 0, added.stderr
    guest_run(lab, START_WORKLOAD)
    try:
        manual = apply(lab, manifest)
        assert manual.returncode == 0, manual.stderr
        assert f"{WORKLOAD}" in manual.stdout  # the workload was seen
        guest_run(lab, PLANT)
        scheduled = stapctl("schedule", "run", "exec-audit", "--unit-dir", str(units))
        assert scheduled.returncode == 0, scheduled.stderr
    finally:
        guest_run(lab, STOP_WORKLOAD)

    first, second = sorted(history.list_runs(), key=lambda row: row["started"])
    recorded = json.loads((Path(second["dir"]) / "difference.json").read_text())
    assert recorded["baseline"] == first["id"]
    [host] = recorded["hosts"]
    assert host["host"] == "lab-1" and host["removed"] == []
    assert host["added"] and all(PLANTED in line for line in host["added"]), host["added"]
    assert "changed from run" in scheduled.stderr and PLANTED in scheduled.stderr

    diff = stapctl("runs", "diff", first["id"], second["id"])
    assert diff.returncode == 1, diff.stderr
    assert diff.stdout.splitlines() == ["--- lab-1", *(f"+ {line}" for line in host["added"])]


def test_a_scheduled_run_stopped_with_sigterm_ends_cleanly(lab: LabStatus,
                                                           tmp_path: Path) -> None:
    units = tmp_path / "units"
    assert stapctl("schedule", "add", str(audit_manifest(tmp_path)), "--every", "1h", "-i",
                   str(lab.inventory), "--unit-dir", str(units)).returncode == 0
    before = stap_module_names(lab)
    running = subprocess.Popen(
        [sys.executable, "-m", "stapctl", "schedule", "run", "exec-audit", "--unit-dir",
         str(units)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not stap_module_names(lab) - before:  # the probe is loaded and running
        assert running.poll() is None and time.monotonic() < deadline, running.stderr
        time.sleep(0.5)
    running.send_signal(signal.SIGTERM)
    _, stderr = running.communicate(timeout=120)
    assert running.returncode == 143, stderr
    [row] = history.list_runs()
    assert row["exit_code"] == 143 and row["finished"] is not None
    assert "not compared with a baseline" in stderr
    assert stap_module_names(lab) - before == set()
