"""The real CLI against a hostile target, on a real terminal (a pty).

The target is this machine through the `local` connection; its "Python interpreter" is
a stand-in agent (a test double) that answers the request with crafted frames: escape
sequences and rich markup in the output, an event and the result. `uname` is a stand-in
too, so the target reports the kernel release we choose (one this machine has headers
for, so the probe really compiles; or a hostile one).
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

EVIL = "\x1b]52;c;ZXZpbA==\x07\x1b[2J\x1b]0;owned\x07\x9b31m\u202e[/x][bold]markup[/bold]"
# what a target may not make the operator's terminal do: set the clipboard or the title,
# clear the screen, ring the bell, use 8-bit CSI, reorder text
FORBIDDEN = ("\x1b]52", "\x1b]0;", "\x1b[2J", "\x07", "\x9b", "\u202e")


def headers_release() -> str:
    releases = sorted(p.parent.name for p in Path("/lib/modules").glob("*/build"))
    if not releases:
        pytest.fail("no kernel headers installed: run scripts/install.sh")
    return releases[-1]


def hostile_target(tmp_path: Path, release: str,
                   names: tuple[str, ...] = ("evil",)) -> tuple[Path, dict[str, str]]:
    """An inventory of hostile local hosts, and the environment that fakes uname."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    uname = bin_dir / "uname"
    uname.write_text(f"#!/bin/sh\ncase \"$1\" in -m) echo x86_64;; -rm) printf '%s x86_64\\n' "
                     f"{json.dumps(release)};; *) printf '%s\\n' {json.dumps(release)};; esac\n")
    agent = bin_dir / "evil-python"
    agent.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, struct, sys
        EVIL = {EVIL!r}
        def frame(kind, payload):
            sys.stdout.buffer.write(struct.pack(">BI", ord(kind), len(payload)) + payload)
        frame("H", json.dumps({{"protocol": 1, "agent": "evil", "pid": 1}}).encode())
        sys.stdout.flush()
        sys.stdin.readline()
        frame("E", json.dumps({{"event": "warning", "text": EVIL}}).encode())
        frame("O", (EVIL + "\\n").encode())
        frame("R", json.dumps({{"status": "failed", "kind": "runtime-error",
                                "message": "[man error::fault] " + EVIL}}).encode())
        sys.stdout.flush()
        """))
    for script in (uname, agent):
        script.chmod(0o755)
    inventory = tmp_path / "hosts.yaml"
    inventory.write_text(yaml.safe_dump({"all": {"hosts": {name: {
        "ansible_host": "local", "ansible_python_interpreter": str(agent)}
        for name in names}}}))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}",
               XDG_DATA_HOME=str(tmp_path / "data"))
    return inventory, env


def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "hello.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "stapctl/v1", "kind": "Trace",
                                    "name": "hello", "probes": [{
                                        "name": "hello",
                                        "script": 'probe oneshot { println("hi") }'}]}))
    return path


def run_in_pty(argv: list[str], env: dict[str, str], timeout: float = 600) -> tuple[int, str]:
    """Run a command with a pty as its terminal; returns its exit code and the screen's
    bytes as text."""
    primary, secondary = pty.openpty()
    process = subprocess.Popen(argv, stdin=secondary, stdout=secondary, stderr=secondary,
                               env={**env, "TERM": "xterm-256color"}, close_fds=True)
    os.close(secondary)
    captured = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the other side closed
                break
            if not chunk:
                break
            captured += chunk
        elif process.poll() is not None:
            break
    os.close(primary)
    return process.wait(timeout=30), captured.decode(errors="replace")


def test_a_hostile_target_cannot_drive_the_operators_terminal(tmp_path: Path) -> None:
    inventory, env = hostile_target(tmp_path, headers_release())
    code, screen = run_in_pty([sys.executable, "-m", "stapctl", "apply", "-i",
                               str(inventory), str(manifest(tmp_path))], env)

    assert code == 1, screen
    for sequence in FORBIDDEN:
        assert sequence not in screen, (sequence, screen)
    assert "\\x1b]52;c;ZXZpbA==" in screen  # shown, as text
    assert "[/x][bold]markup[/bold]" in screen  # shown, not interpreted
    assert "[man error::fault]" in screen

    # the host's log, shown later, is as safe as the live output
    found = re.search(r"\(run ([\w.-]+)\)", screen)
    assert found, screen
    shown = subprocess.run([sys.executable, "-m", "stapctl", "runs", "show", found.group(1),
                            "--host", "evil"], capture_output=True, text=True, env=env,
                           check=True)
    assert not any(sequence in shown.stdout for sequence in FORBIDDEN), shown.stdout
    assert "\\x1b]52;c;ZXZpbA==" in shown.stdout


def test_the_json_format_stays_lossless(tmp_path: Path) -> None:
    inventory, env = hostile_target(tmp_path, headers_release())
    done = subprocess.run([sys.executable, "-m", "stapctl", "apply", "-i", str(inventory),
                           "--format", "json", str(manifest(tmp_path))],
                          capture_output=True, text=True, env=env, timeout=600, check=False)

    records = [json.loads(line) for line in done.stdout.splitlines()]
    outputs = [r["text"] for r in records if r.get("kind") == "output"]
    assert outputs == [EVIL]
    assert "\x1b" not in done.stdout  # JSON escapes it, losing nothing


def test_the_merged_format_groups_hosts_and_stays_safe(tmp_path: Path) -> None:
    inventory, env = hostile_target(tmp_path, headers_release(), ("evil1", "evil2"))
    done = subprocess.run([sys.executable, "-m", "stapctl", "apply", "-i", str(inventory),
                           "--format", "merged", str(manifest(tmp_path))],
                          capture_output=True, text=True, env=env, timeout=600, check=False)

    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert "evil1,evil2 (2)" in lines
    assert lines.count("\\x1b]52;c;ZXZpbA==\\x07\\x1b[2J\\x1b]0;owned\\x07\\x9b31m\\u202e"
                       "[/x][bold]markup[/bold]") == 1
    assert not any(sequence in done.stdout for sequence in FORBIDDEN)


@pytest.mark.parametrize("release", ["[/x]", "../../x", "/x"])
def test_a_hostile_release_fails_the_host_and_the_run_is_recorded(tmp_path: Path,
                                                                  release: str) -> None:
    inventory, env = hostile_target(tmp_path, release)
    done = subprocess.run([sys.executable, "-m", "stapctl", "apply", "-i", str(inventory),
                           str(manifest(tmp_path))],
                          capture_output=True, text=True, env=env, timeout=120, check=False)

    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "bad-facts" in done.stderr
    listed = subprocess.run([sys.executable, "-m", "stapctl", "runs", "list"],
                            capture_output=True, text=True, env=env, check=True)
    row = next(line for line in listed.stdout.splitlines() if "hello" in line)
    assert " 1 " in row  # the run's exit code is recorded: it finished
