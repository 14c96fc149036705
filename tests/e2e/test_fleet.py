"""An incident responder's day on three real kernels: apply everywhere at once, lose a
host, Ctrl-C, kill the controller, roll out behind a canary, stop on failures, and find
the results afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from stapctl.agent import Timing
from stapctl.lab import Lab, LabStatus

from .helpers import guest_run, write_manifest

pytestmark = pytest.mark.e2e

HOSTS = ("lab-1", "lab-2", "lab-3")

# One syscall script for every long-running test: a syscall module is the slowest to
# compile, and --duration (which is not part of the module) sets how long each run lasts.
WATCH_OPENS = """
    probe begin { system("cat /proc/sys/kernel/hostname") }
    probe syscall.openat {
      if (execname() == "cat") printf("cat opened %s\\n", filename)
    }
"""


class BackgroundApply:
    """`stapctl apply --format json` as a separate process, its JSON lines read as they
    come, so a test can act on it mid-run (signal it, kill a guest)."""

    def __init__(self, inventory: Path, manifest: Path, *args: str,
                 as_background_job: bool = False) -> None:
        """``as_background_job``: started as cron or `cmd &` would, with SIGINT ignored
        and stdin at /dev/null."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stapctl", "apply", "-i", str(inventory), "--format",
             "json", *args, str(manifest)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, preexec_fn=ignore_sigint if as_background_job else None)
        self.records: list[dict[str, Any]] = []
        self.stderr = ""
        self._readers = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.records.append(json.loads(line))

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        self.stderr = self.process.stderr.read()

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in list(self.records) if r["type"] == "event" and r["kind"] == kind]

    def wait_for(self, condition: Callable[[], bool], timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                self.finish()
                pytest.fail(f"apply ended early ({self.process.returncode}): {self.stderr}")
            if time.monotonic() > deadline:
                self.process.kill()
                self.finish()
                pytest.fail(f"apply did not get there in {timeout:g} s: {self.stderr}")
            time.sleep(0.2)

    def wait_until_running(self, hosts: tuple[str, ...] = HOSTS) -> None:
        """Until every host's probe has started (a cold syscall compile comes first)."""
        self.wait_for(lambda: {e["host"] for e in self.events("started")} >= set(hosts))

    def finish(self, timeout: float = 120) -> int:
        code = self.process.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return code

    @property
    def summary(self) -> dict[str, Any]:
        (summary,) = [r for r in self.records if r["type"] == "summary"]
        return summary

    def outcomes(self) -> dict[str, dict[str, Any]]:
        return {o["host"]: o for o in self.summary["outcomes"]}

    def output(self, host: str) -> list[str]:
        return [e["text"] for e in self.events("output") if e["host"] == host]


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stapctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stapctl", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def leftovers(lab: LabStatus, apply: BackgroundApply,
              hosts: tuple[str, ...] = HOSTS) -> dict[str, str]:
    """What is left on each guest of the modules this run loaded: in /proc/modules or
    under /proc/systemtap. Others' runs on a shared lab do not count."""
    loaded = {e["host"]: e["text"] for e in apply.events("loaded")}
    index = {g.name: i for i, g in enumerate(lab.guests)}
    return {host: guest_run(lab, f"grep -w {loaded[host]} /proc/modules; "
                                 f"ls -A /proc/systemtap | grep -x {loaded[host]}; true",
                            index[host]).strip()
            for host in hosts if host in loaded}


def with_host_vars(lab: LabStatus, directory: Path,
                   per_host: dict[str, dict[str, Any]]) -> Path:
    """A copy of the lab's inventory with extra variables for some hosts."""
    document = yaml.safe_load(lab.inventory.read_text())
    for host, variables in per_host.items():
        document["all"]["hosts"][host].update(variables)
    path = directory / "inventory.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_a_syscall_probe_runs_on_every_host_and_each_hosts_output_arrives(
        fleet_lab: LabStatus, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, "watch-opens", WATCH_OPENS)
    apply = BackgroundApply(fleet_lab.inventory, manifest, "--duration", "5s")
    code = apply.finish(timeout=900)  # a cold syscall compile takes minutes
    assert code == 0, apply.stderr
    for host in HOSTS:
        lines = apply.output(host)
        assert host in lines, lines  # system()'s output: the guest's own hostname
        assert any("kernel/hostname" in line for line in lines), lines  # the probe saw it
    assert {o["status"] for o in apply.outcomes().values()} == {"ok"}
    assert leftovers(fleet_lab, apply) == dict.fromkeys(HOSTS, "")


def test_b_a_host_that_dies_mid_run_is_transport_lost_and_the_others_complete(
        fleet_lab: LabStatus, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, "watch-opens", WATCH_OPENS)
    victim = fleet_lab.guests[2]
    apply = BackgroundApply(fleet_lab.inventory, manifest, "--duration", "25s")
    try:
        apply.wait_until_running()
        os.kill(victim.pid, signal.SIGKILL)
        code = apply.finish()
    finally:
        Lab.default().up(len(HOSTS))  # boot the victim again for the tests that follow
    assert code == 3, apply.stderr
    outcomes = apply.outcomes()
    assert outcomes[victim.name]["kind"] in ("transport-lost", "unreachable"), outcomes
    assert [outcomes[h]["status"] for h in HOSTS if h != victim.name] == ["ok", "ok"]
    assert leftovers(fleet_lab, apply, HOSTS[:2]) == dict.fromkeys(HOSTS[:2], "")


@pytest.mark.parametrize(("signum", "background"), [
    (signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGHUP, False),
    (signal.SIGINT, True), (signal.SIGTERM, True),
], ids=["sigint", "sigterm", "sighup", "sigint-background", "sigterm-background"])
def test_c_a_signal_stops_every_probe_cleanly_and_records_the_run(
        fleet_lab: LabStatus, tmp_path: Path, signum: signal.Signals, background: bool) -> None:
    manifest = write_manifest(tmp_path, "watch-opens", WATCH_OPENS)
    apply = BackgroundApply(fleet_lab.inventory, manifest, "--duration", "10m",
                            as_background_job=background)
    apply.wait_until_running()
    apply.wait_for(lambda: all(apply.output(h) for h in HOSTS), timeout=60)
    apply.process.send_signal(signum)
    assert apply.finish(timeout=60) == 128 + signum, apply.stderr
    assert leftovers(fleet_lab, apply) == dict.fromkeys(HOSTS, "")
    summary = apply.summary
    assert summary["interrupted"] is True
    assert {o["kind"] for o in summary["outcomes"]} == {"stopped"}, summary

    # what was gathered is on disk and in the history
    listing = stapctl("runs", "list", "-n", "100")
    assert summary["run"] in listing.stdout, listing
    row = next(line for line in listing.stdout.splitlines() if summary["run"] in line)
    assert f" {128 + signum} " in row, row  # the record is finished, with its exit code
    shown = stapctl("runs", "show", summary["run"])
    assert shown.returncode == 0 and shown.stdout.count("stopped") >= len(HOSTS), shown
    host_log = stapctl("runs", "show", summary["run"], "--host", "lab-2")
    assert host_log.returncode == 0, host_log.stderr
    assert host_log.stdout.splitlines() == apply.output("lab-2")
    assert "lab-2" in host_log.stdout.splitlines()


def test_d_a_killed_controller_leaves_nothing_loaded_past_the_deadman(
        fleet_lab: LabStatus, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, "watch-opens", WATCH_OPENS)
    apply = BackgroundApply(fleet_lab.inventory, manifest, "--duration", "10m")
    apply.wait_until_running()
    apply.process.kill()
    killed = time.monotonic()
    apply.finish()
    bound = Timing.deadman + 10 + 15  # the dead-man, EXIT's timeout, then a margin for TCG
    left = leftovers(fleet_lab, apply)
    while any(left.values()) and time.monotonic() - killed < bound:
        time.sleep(2)
        left = leftovers(fleet_lab, apply)
    assert left == dict.fromkeys(HOSTS, ""), left


def test_d_a_frozen_controller_is_outlived_by_the_deadman(fleet_lab: LabStatus,
                                                         tmp_path: Path) -> None:
    """SIGSTOP keeps the connections open but silent: only the dead-man can act."""
    manifest = write_manifest(tmp_path, "watch-opens", WATCH_OPENS)
    apply = BackgroundApply(fleet_lab.inventory, manifest, "--duration", "10m")
    apply.wait_until_running()
    apply.process.send_signal(signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        time.sleep(Timing.deadman / 2)
        assert all(leftovers(fleet_lab, apply).values())  # the agents wait for a while
        left = leftovers(fleet_lab, apply)
        while any(left.values()) and time.monotonic() - frozen < Timing.deadman + 10 + 15:
            time.sleep(2)
            left = leftovers(fleet_lab, apply)
        assert left == dict.fromkeys(HOSTS, ""), left
    finally:
        apply.process.kill()
        apply.finish()


def test_e_serial_runs_the_canary_before_the_others(fleet_lab: LabStatus,
                                                    tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, "canary",
                              'probe oneshot { printf("hello from the rollout\\n") }')
    document = yaml.safe_load(manifest.read_text())
    document["strategy"] = {"serial": [1, "100%"]}
    manifest.write_text(yaml.safe_dump(document))
    apply = BackgroundApply(fleet_lab.inventory, manifest)
    assert apply.finish(timeout=600) == 0, apply.stderr
    started = {e["host"]: e["time"] for e in apply.events("started")}
    finished = {e["host"]: e["time"] for e in apply.events("finished")}
    assert set(started) == set(finished) == set(HOSTS)
    canary = min(started, key=started.__getitem__)
    assert canary == "lab-1"  # inventory order, as Ansible
    others = [started[h] for h in HOSTS if h != canary]
    assert started[canary] < finished[canary] < min(others), (started, finished)


def test_f_max_fail_percentage_stops_later_batches(fleet_lab: LabStatus,
                                                  tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, "fail-some", """
        probe oneshot {
        {% if fail %}
          error("lab-2 fails on purpose")
        {% else %}
          printf("fine\\n")
        {% endif %}
        }
    """)
    document = yaml.safe_load(manifest.read_text())
    document["vars"] = {"fail": False}
    document["strategy"] = {"serial": 1, "max_fail_percentage": 30}
    manifest.write_text(yaml.safe_dump(document))
    inventory = with_host_vars(fleet_lab, tmp_path, {"lab-2": {"fail": True}})
    apply = BackgroundApply(inventory, manifest)
    assert apply.finish(timeout=600) == 3, apply.stderr
    outcomes = apply.outcomes()
    assert outcomes["lab-1"]["status"] == "ok"
    assert outcomes["lab-2"]["kind"] == "runtime-error"
    assert "fails on purpose" in outcomes["lab-2"]["message"]
    assert outcomes["lab-3"]["status"] == "skipped"
    assert "max_fail_percentage" in outcomes["lab-3"]["message"]
    assert "lab-3" not in {e["host"] for e in apply.events("uploaded")}  # never touched
    assert leftovers(fleet_lab, apply) == dict.fromkeys(HOSTS[:2], "")
