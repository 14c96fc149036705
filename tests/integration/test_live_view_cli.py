"""The live fleet view through the real CLI: piped, and in a real terminal (tmux).

The hosts are this machine through the `local` connection, each with a stand-in agent (a
test double, as in test_hostile_cli) that prints the lines the test chooses, pausing in
the middle so what is shown live can be told from what is shown at the end.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration.test_hostile_cli import FORBIDDEN, headers_release, hostile_target

pytestmark = pytest.mark.integration

PAUSE = 6.0  # seconds each stand-in agent waits between its first and second lines
SCRIPT = 'probe oneshot { println("hi") }'


def scripted_fleet(tmp_path: Path, outputs: dict[str, tuple[list[str], list[str]]]
                   ) -> tuple[Path, dict[str, str]]:
    """An inventory of local hosts, each printing its (before, after the pause) lines."""
    inventory, env = hostile_target(tmp_path, headers_release(), tuple(outputs))
    hosts = yaml.safe_load(inventory.read_text())["all"]["hosts"]
    for name, (before, after) in outputs.items():
        agent = tmp_path / "bin" / f"agent-{name}"
        agent.write_text(textwrap.dedent(f"""\
            #!{sys.executable}
            import json, struct, sys, time
            def frame(kind, payload):
                sys.stdout.buffer.write(struct.pack(">BI", ord(kind), len(payload)) + payload)
                sys.stdout.flush()
            frame("H", json.dumps({{"protocol": 1, "agent": "scripted", "pid": 1}}).encode())
            request = json.loads(sys.stdin.buffer.readline())
            sys.stdin.buffer.read(request.get("module_size", 0))  # its module, as agents do
            for line in {before!r}:
                frame("O", (line + "\\n").encode())
            time.sleep({PAUSE})
            for line in {after!r}:
                frame("O", (line + "\\n").encode())
            frame("R", json.dumps({{"status": "ok", "kind": None, "message": ""}}).encode())
            """))
        agent.chmod(0o755)
        hosts[name]["ansible_python_interpreter"] = str(agent)
    inventory.write_text(yaml.safe_dump({"all": {"hosts": hosts}}))
    return inventory, env


FLEET = {
    "web1": (["opened /etc/passwd"], ["done"]),
    "web2": (["opened /etc/passwd"], ["done"]),
    "web3": (["opened /etc/passwd"], ["done"]),
    "web7": (["opened /etc/passwd"], ["done"]),
    "web4": (["opened /etc/shadow\x1b]0;owned\x07"], ["done"]),
}


def stapctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "stapctl", *args]


def test_live_merged_lines_come_grouped_as_they_arrive_piped(tmp_path: Path) -> None:
    inventory, env = scripted_fleet(tmp_path, FLEET)
    process = subprocess.Popen(
        stapctl("run", "all", "-i", str(inventory), "-e", SCRIPT, "--format", "merged",
                "--live"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert process.stdout is not None
    arrivals = [(time.monotonic(), line.rstrip("\n")) for line in process.stdout]
    ended = time.monotonic()
    stderr = process.stderr.read() if process.stderr else ""
    assert process.wait(timeout=60) == 0, stderr

    lines = [line for _, line in arrivals]
    assert sorted(lines[:2]) == ["web4: opened /etc/shadow\\x1b]0;owned\\x07",
                                 "web[1-3,7]: opened /etc/passwd"], stderr
    assert lines[2:] == ["web[1-4,7]: done"], stderr
    # the first lines were shown while the hosts were still pausing, not at the end
    assert ended - arrivals[0][0] > PAUSE / 2
    assert not any(sequence in "\n".join(lines) for sequence in FORBIDDEN)


def test_diff_shows_only_the_host_that_differs(tmp_path: Path) -> None:
    inventory, env = scripted_fleet(tmp_path, FLEET)
    done = subprocess.run(stapctl("run", "all", "-i", str(inventory), "-e", SCRIPT,
                                  "--diff"),
                          capture_output=True, text=True, env=env, timeout=600, check=False)

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "--- web[1-3,7]", "+++ web4", "@@ -1,2 +1,2 @@", "-opened /etc/passwd",
        "+opened /etc/shadow\\x1b]0;owned\\x07", " done"]


def test_live_and_diff_refuse_the_json_format(tmp_path: Path) -> None:
    for flags in (["--live"], ["--diff", "--format", "json"], ["--live", "--format", "json"]):
        done = subprocess.run(stapctl("run", "all", "-i", "web1,", "-e", SCRIPT, *flags),
                              capture_output=True, text=True, timeout=60, check=False,
                              env=dict(os.environ, XDG_DATA_HOME=str(tmp_path)))
        assert done.returncode == 2, (flags, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """A tmux server of the test's own (a private socket), killed by that socket after."""
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed: run scripts/install.sh")
    socket = tmp_path / "tmux.sock"

    def command(*args: str) -> str:
        return subprocess.run(["tmux", "-S", str(socket), *args], capture_output=True,
                              text=True, check=True, timeout=30).stdout

    yield command
    subprocess.run(["tmux", "-S", str(socket), "kill-server"], capture_output=True,
                   check=False, timeout=30)


def test_live_merged_lines_in_a_real_terminal(tmp_path: Path,
                                              tmux: Callable[..., str]) -> None:
    inventory, env = scripted_fleet(tmp_path, FLEET)
    done_file = tmp_path / "exit-code"
    argv = shlex.join(["env", f"PATH={env['PATH']}", f"XDG_DATA_HOME={env['XDG_DATA_HOME']}",
                       *stapctl("run", "all", "-i", str(inventory), "-e", SCRIPT,
                                "--format", "merged", "--live")])
    tmux("new-session", "-d", "-x", "120", "-y", "40",
         f"{argv}; echo $? > {done_file}; sleep 600")

    def screen() -> str:
        return tmux("capture-pane", "-p", "-J")

    deadline = time.monotonic() + 300
    while ("opened /etc/passwd" not in screen() and not done_file.exists()
           and time.monotonic() < deadline):
        time.sleep(0.2)
    during = screen()
    while not done_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    after = screen()

    assert "web[1-3,7]: opened /etc/passwd" in during, during
    assert ": done" not in during, during  # the first lines came before the hosts ended
    assert done_file.read_text().strip() == "0", after
    assert "web[1-3,7]: opened /etc/passwd" in after, after
    assert "web4: opened /etc/shadow\\x1b]0;owned\\x07" in after, after
    assert "web[1-4,7]: done" in after, after
    assert after.count("opened /etc/passwd") == 1, after
