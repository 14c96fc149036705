"""Retry the failed hosts, as Ansible's retry files do: a guest is down during a run,
then `apply --limit @last:failed` runs again on that guest alone."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from stapctl.lab import GuestState, Lab, LabStatus

from .helpers import apply, write_manifest

pytestmark = pytest.mark.e2e

HOSTS = ("lab-1", "lab-2", "lab-3")
SAY_HELLO = """
    probe begin { printf("hello\\n"); exit() }
"""


def outcomes(stdout: str) -> dict[str, str]:
    """Each host's status, from the summary line of `apply --format json`."""
    (summary,) = [record for record in map(json.loads, stdout.splitlines())
                  if record.get("type") == "summary"]
    return {outcome["host"]: outcome["status"] for outcome in summary["outcomes"]}


def test_a_retry_of_the_last_run_brings_back_only_the_host_that_was_down(
        fleet_lab: LabStatus, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, "retry-hello", SAY_HELLO)
    victim = fleet_lab.guests[2]
    try:
        os.kill(victim.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while Lab.default().status().guests[2].state is not GuestState.STOPPED:
            assert time.monotonic() < deadline, "the killed guest still runs"
            time.sleep(0.5)
        first = apply(fleet_lab, manifest, "--format", "json")
        assert first.returncode == 3, first.stderr
        assert outcomes(first.stdout) == {"lab-1": "ok", "lab-2": "ok",
                                          victim.name: "unreachable"}
    finally:
        lab = Lab.default().up(len(HOSTS))  # the victim boots again, on a new port
    listed = apply(lab, manifest, "--limit", "@last:failed", "--list-hosts")
    assert (listed.returncode, listed.stdout) == (0, f"{victim.name}\n"), listed.stderr
    retry = apply(lab, manifest, "--limit", "@last:failed", "--format", "json")
    assert retry.returncode == 0, retry.stderr
    assert outcomes(retry.stdout) == {victim.name: "ok"}
    again = apply(lab, manifest, "--limit", "@last:failed", "--format", "json")
    assert again.returncode == 0, again.stderr
    assert again.stdout == ""
    assert "nothing to retry" in again.stderr
