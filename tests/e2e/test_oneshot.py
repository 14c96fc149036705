"""The thinnest complete path, on a real kernel: manifest → compile → ship → run → unload."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from stapctl.lab import LabStatus

from .helpers import apply, guest_run, stap_modules_loaded, write_manifest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def test_hello_playbook_prints_the_kernels_greeting(lab: LabStatus) -> None:
    result = apply(lab, REPO / "playbooks" / "hello.yaml", "--limit", "lab-1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["lab-1: hello, world!"]
    assert stap_modules_loaded(lab) == ""


def test_timer_ticks_arrive_in_order_and_exit_ends_the_run(lab: LabStatus,
                                                          tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, "ticks", """
        global n
        probe timer.ms(200) {
          n++
          printf("tick %d\\n", n)
          if (n == 3) exit()
        }
    """)
    result = apply(lab, manifest, "--limit", "lab-1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["lab-1: tick 1", "lab-1: tick 2", "lab-1: tick 3"]
    assert stap_modules_loaded(lab) == ""


def test_syscall_probe_sees_opens_and_stops_at_its_duration(lab: LabStatus,
                                                           tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, "openat", """
        probe syscall.openat {
          if (execname() == "cat") printf("%s %s\\n", execname(), filename)
        }
    """, duration="6s")
    stop = threading.Event()

    def open_files() -> None:
        while not stop.is_set():
            guest_run(lab, "for i in 1 2 3 4 5; do cat /etc/hostname >/dev/null; done")
            time.sleep(0.5)

    opener = threading.Thread(target=open_files, daemon=True)
    # compile first (a cold syscall compile takes minutes), so the duration is what we time
    assert apply(lab, manifest, "--limit", "lab-1", "--check").returncode == 0
    opener.start()
    started = time.monotonic()
    try:
        result = apply(lab, manifest, "--limit", "lab-1")
    finally:
        stop.set()
        opener.join()
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line == 'lab-1: cat "/etc/hostname"' for line in lines), lines
    assert 6 <= elapsed < 60, elapsed
    assert stap_modules_loaded(lab) == ""


def test_runtime_error_fails_the_apply_with_its_text_and_unloads(lab: LabStatus,
                                                                 tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, "boom", """
        probe oneshot { error("boom from the probe") }
    """)
    result = apply(lab, manifest, "--limit", "lab-1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "boom from the probe" in result.stderr
    assert "Traceback" not in result.stderr
    assert stap_modules_loaded(lab) == ""
