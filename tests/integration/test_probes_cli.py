"""`stapctl probes` through the real CLI, the real agent and the real stap: a local host
reporting (through a stand-in `uname`, a test double) a release this machine has headers
for, and a host that refuses connections."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.test_hostile_cli import headers_release

pytestmark = pytest.mark.integration

SCHED_SWITCH = 'kernel.trace("sched:sched_switch")'


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def probes(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    release = headers_release()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    uname = bin_dir / "uname"
    uname.write_text(f"#!/bin/sh\ncase \"$1\" in -m) echo x86_64;; -rm) echo {release} x86_64;; "
                     f"*) echo {release};; esac\n")
    uname.chmod(0o755)
    inventory = tmp_path / "hosts.yaml"
    inventory.write_text(yaml.safe_dump({"all": {"hosts": {
        "here": {"ansible_host": "local", "ansible_python_interpreter": sys.executable},
        "gone": {"ansible_host": "127.0.0.1", "ansible_port": closed_port()}}}}))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}",
               XDG_DATA_HOME=str(tmp_path / "data"))
    return subprocess.run([sys.executable, "-m", "stapctl", "probes", "-i", str(inventory),
                           *args], capture_output=True, text=True, env=env, timeout=600,
                          check=False)


def test_listing_from_the_hosts_reached_and_the_others_named(tmp_path: Path) -> None:
    release = headers_release()
    done = probes(tmp_path, "--vars", SCHED_SWITCH)
    assert done.returncode == 1, done.stderr  # a host could not be asked
    assert done.stdout.startswith(f"{SCHED_SWITCH} $")
    assert done.stdout.endswith(f"  [{release}]\n")
    assert "gone" in done.stderr and "not asked" in done.stderr
    assert f"asking stap for {SCHED_SWITCH} on 1 kernel(s)" in done.stderr

    only_here = probes(tmp_path, "--limit", "here", "--json", SCHED_SWITCH)
    assert only_here.returncode == 0, only_here.stderr
    assert json.loads(only_here.stdout) == {
        "pattern": SCHED_SWITCH,
        "probes": [{"probe": SCHED_SWITCH, "kernels": [release]}],
        "kernels": {release: ["here"]}, "skipped": {}}


def test_nothing_matching_exits_1_and_says_so(tmp_path: Path) -> None:
    done = probes(tmp_path, "--limit", "here", 'kernel.trace("nosuch:*")')
    assert done.returncode == 1 and done.stdout == "", done.stderr
    assert f'no probe point matches kernel.trace("nosuch:*") on {headers_release()}' \
        in done.stderr


def test_a_bad_pattern_is_one_line_before_any_host(tmp_path: Path) -> None:
    done = probes(tmp_path, "syscall.open*{")
    assert done.returncode == 2
    assert done.stderr.startswith("error: not a probe point pattern") and \
        len(done.stderr.splitlines()) == 1, done.stderr
