"""Detached runs on real kernels in lab guests: `apply --detach` returns and the probes run
on without the controller; `runs show`, `attach`, `collect` and `stop` reach them later over
new connections; rotation, the disk bound and a guest rebooted mid-run end them cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from stapctl.lab import Lab, LabStatus

from .helpers import guest_run, stap_modules_loaded

pytestmark = pytest.mark.e2e

HOSTS = ["lab-1", "lab-2", "lab-3"]
# ~70 bytes every 20 ms: output grows fast enough to rotate and reach a small disk bound
TICKS = """
    global n
    probe timer.ms(20) {
      n++
      printf("tick %d ..................................................\\n", n)
    }
"""
AGENTS = "grep -l 'stapctl-agen[t]' /proc/[0-9]*/cmdline 2>/dev/null; true"


def ticks_manifest(directory: Path, **detach: Any) -> Path:
    """The same script at the same place of a file of the same name, whatever the
    detach settings after it, so every test uses one compiled module."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ticks.yaml"
    document = {"apiVersion": "stapctl/v1", "kind": "Trace", "name": "ticks",
                "probes": [{"name": "ticks", "script": textwrap.dedent(TICKS)}],
                "detach": detach or True}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def stapctl(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stapctl", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def detach(lab: LabStatus, manifest: Path, *args: str) -> str:
    """apply --detach; returns the run id, the last line on stdout."""
    result = stapctl("apply", "-i", str(lab.inventory), "--detach", *args, str(manifest))
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.splitlines()[-1]
    listed = json.loads(stapctl("runs", "list", "--json").stdout)
    assert listed[0]["id"] == run_id
    return run_id


def show(lab: LabStatus, run_id: str) -> dict[str, Any]:
    result = stapctl("runs", "show", run_id, "--json", "-i", str(lab.inventory))
    assert result.returncode == 0, result.stderr
    shown: dict[str, Any] = json.loads(result.stdout)
    return shown


def ticks_in(path: Path) -> list[int]:
    return [int(line.split()[1]) for line in path.read_text().splitlines()]


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(1)


def run_folder(run_id: str) -> Path:
    return Path(json.loads(stapctl("runs", "show", run_id, "--json").stdout)["dir"])


def clean(lab: LabStatus, index: int) -> tuple[str, str]:
    """What is left in a guest: stap modules loaded, stapctl agent processes running."""
    return stap_modules_loaded(lab, index), guest_run(lab, AGENTS, index).strip()


def test_a_detached_on_three_guests_attach_collect_twice_and_stop(
        lab: LabStatus, tmp_path: Path) -> None:
    run_id = detach(lab, ticks_manifest(tmp_path), "--max-duration", "10m")
    # the controller's connections are gone: apply returned; the probes run on
    assert show(lab, run_id)["detached"] == dict.fromkeys(HOSTS, "running")

    attach = subprocess.Popen([sys.executable, "-m", "stapctl", "attach", run_id, "-i",
                               str(lab.inventory), "--limit", "lab-2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert attach.stdout is not None
    first = [attach.stdout.readline() for _ in range(3)]
    time.sleep(2)
    attach.send_signal(signal.SIGINT)
    rest = attach.stdout.read()  # what the first lines' reads buffered, then up to EOF
    assert attach.stderr is not None
    errors = attach.stderr.read()
    assert attach.wait(60) == 0, errors
    lines = first + rest.splitlines(keepends=True)
    assert all(line.startswith("lab-2: tick ") for line in lines), lines
    numbers = [int(line.split()[2]) for line in lines]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # in order
    assert numbers[0] > 1  # from where it stood, not from the start
    assert len(numbers) > 20  # it went on while attached
    assert show(lab, run_id)["detached"] == dict.fromkeys(HOSTS, "running")

    folder = run_folder(run_id)
    collected = folder / "collected" / "lab-1" / "ticks.out"
    assert stapctl("collect", run_id, "-i", str(lab.inventory)).returncode == 0
    once = ticks_in(collected)
    time.sleep(3)
    assert stapctl("collect", run_id, "-i", str(lab.inventory)).returncode == 0
    twice = ticks_in(collected)
    assert once == list(range(1, len(once) + 1))
    assert twice == list(range(1, len(twice) + 1)) and len(twice) > len(once) + 20

    assert show(lab, run_id)["detached"] == dict.fromkeys(HOSTS, "running")
    stopped = stapctl("stop", run_id, "-i", str(lab.inventory))
    assert stopped.returncode == 0, stopped.stderr
    final = ticks_in(collected)
    assert final == list(range(1, len(final) + 1)) and len(final) >= len(twice)
    assert show(lab, run_id)["detached"] == dict.fromkeys(HOSTS, "finished")
    for index in range(len(HOSTS)):
        assert clean(lab, index) == ("", "")
        assert guest_run(lab, f"ls ~/.cache/stapctl-agent/detached/ | grep -c {run_id}; true",
                         index).strip() == "0"


def test_b_output_rotates_and_the_disk_bound_ends_the_run(lab: LabStatus,
                                                          tmp_path: Path) -> None:
    manifest = ticks_manifest(tmp_path, file_size="2KiB", file_count=3)
    run_id = detach(lab, manifest, "--limit", "lab-1", "--max-disk", "12KiB")
    wait_for(lambda: show(lab, run_id)["detached"] == {"lab-1": "finished"}, 120,
             "the disk bound ends the run")
    folder = f"~/.cache/stapctl-agent/detached/{run_id}.ticks"
    sizes = guest_run(lab, f"cd {folder} && wc -c out.* | grep -v total").split()
    assert sizes == ["2048", "out.3", "2048", "out.4", "2048", "out.5"], sizes
    state = json.loads(guest_run(lab, f"cat {folder}/state.json"))
    assert state["reason"] == "max-disk" and state["written"] == 12 * 1024
    assert clean(lab, 0) == ("", "")

    collect = stapctl("collect", run_id, "-i", str(lab.inventory))
    assert collect.returncode == 0, collect.stderr
    assert "6144 new bytes, 6144 bytes removed by rotation before" in collect.stderr
    out = run_folder(run_id) / "collected" / "lab-1" / "ticks.out"
    assert out.stat().st_size == 6144
    stapctl("stop", run_id, "-i", str(lab.inventory))  # removes its files


def test_c_a_guest_rebooted_mid_run_is_lost_with_nothing_loaded(lab: LabStatus,
                                                                tmp_path: Path) -> None:
    victim = lab.guests[2]
    run_id = detach(lab, ticks_manifest(tmp_path), "--limit", victim.name)
    assert show(lab, run_id)["detached"] == {victim.name: "running"}
    try:
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        rebooted = Lab.default().up(len(HOSTS))  # qemu started again: a fresh boot
    assert show(rebooted, run_id)["detached"] == {victim.name: "lost"}
    text = stapctl("runs", "show", run_id, "-i", str(rebooted.inventory))
    assert "lost" in text.stdout
    assert clean(rebooted, 2) == ("", "")


def test_d_its_maximum_duration_ends_it_cleanly(lab: LabStatus, tmp_path: Path) -> None:
    run_id = detach(lab, ticks_manifest(tmp_path), "--limit", "lab-2", "--max-duration", "5s")
    wait_for(lambda: show(lab, run_id)["detached"] == {"lab-2": "finished"}, 120,
             "the maximum duration ends the run")
    state = json.loads(guest_run(
        lab, f"cat ~/.cache/stapctl-agent/detached/{run_id}.ticks/state.json", 1))
    assert state["reason"] == "max-duration" and state["status"] == "ok"
    assert clean(lab, 1) == ("", "")
    stopped = stapctl("stop", run_id, "-i", str(lab.inventory))  # collects, removes files
    assert stopped.returncode == 0, stopped.stderr
    out = run_folder(run_id) / "collected" / "lab-2" / "ticks.out"
    ticks = ticks_in(out)
    assert ticks == list(range(1, len(ticks) + 1)) and len(ticks) > 50
