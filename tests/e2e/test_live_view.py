"""The live fleet view on three real kernels, in a real terminal (tmux capture)."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stapctl.lab import LabStatus
from stapctl.report import fold_hosts

pytestmark = pytest.mark.e2e

SCRIPT = ('probe begin { println("probing") } '
          'probe timer.s(5) { printf("host %d\\n", remote_id() / 2); exit() }')


def test_live_merged_output_grouped_in_tmux(lab: LabStatus, tmp_path: Path) -> None:
    names = [guest.name for guest in lab.guests]
    socket = tmp_path / "tmux.sock"
    done_file = tmp_path / "exit-code"
    command = shlex.join([sys.executable, "-m", "stapctl", "run", "all", "-e", SCRIPT,
                          "--format", "merged", "--live"])

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-S", str(socket), *args], capture_output=True,
                              text=True, check=True, timeout=30).stdout

    tmux("new-session", "-d", "-x", "150", "-y", "40",
         f"{command}; echo $? > {done_file}; sleep 900")
    try:
        deadline = time.monotonic() + 900
        while not done_file.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        screen = tmux("capture-pane", "-p", "-J")
    finally:
        subprocess.run(["tmux", "-S", str(socket), "kill-server"], capture_output=True,
                       check=False, timeout=30)

    assert done_file.read_text().strip() == "0", screen
    lines = screen.splitlines()
    assert f"{fold_hosts(names)}: probing" in lines, screen
    # remote_id() / 2: lab-1 and lab-2 print "host 0", lab-3 "host 1"
    assert f"{fold_hosts(names[:2])}: host 0" in lines, screen
    assert f"{names[2]}: host 1" in lines, screen
