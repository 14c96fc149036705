"""The Celery engine on real kernels: three lab guests served through two `stapctl
worker` processes on a real redis-server, hello world and a syscall probe, nothing left
loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stapctl.lab import LabStatus
from tests.engine_fleet import Broker, Workers, start_workers, write_secret
from tests.loopback_sshd import wait_for

from .helpers import stap_modules_loaded, write_manifest
from .test_fleet import HOSTS, WATCH_OPENS

pytestmark = pytest.mark.e2e


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, STAPCTL_SECRET_FILE=str(write_secret(tmp_path)),
                XDG_DATA_HOME=str(tmp_path / "data"))


@pytest.fixture
def workers(tmp_path: Path, broker: Broker, env: dict[str, str]) -> Iterator[Workers]:
    # one slice at a time each: of three slices, each worker takes one before either ends
    yield from start_workers(tmp_path / "workers", broker.engine, env, 2, concurrency=1)


HELLO = Path(__file__).resolve().parents[2] / "playbooks" / "hello.yaml"


@pytest.mark.parametrize("probe", ["hello", "syscall"])
def test_three_guests_through_two_workers(fleet_lab: LabStatus, tmp_path: Path,
                                          env: dict[str, str], broker: Broker,
                                          workers: Workers, probe: str) -> None:
    args: tuple[str, ...]
    if probe == "hello":
        manifest, args, expected = HELLO, (), dict.fromkeys(HOSTS, "hello, world!")
    else:  # the script prints the guest's hostname, which is its name in the lab
        manifest = write_manifest(tmp_path, "watch-opens", WATCH_OPENS)
        args, expected = ("--duration", "5s"), {host: host for host in HOSTS}
    done = subprocess.run(
        [sys.executable, "-m", "stapctl", "apply", "-i", str(fleet_lab.inventory), "--engine",
         broker.engine, "--slices", "3", "--format", "json", *args, str(manifest)],
        capture_output=True, text=True, timeout=900, env=env, check=False)

    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines()]
    (summary,) = [r for r in records if r["type"] == "summary"]
    outcomes = {o["host"]: o for o in summary["outcomes"]}
    assert sorted(outcomes) == sorted(HOSTS)
    assert {o["status"] for o in outcomes.values()} == {"ok"}
    assert {o["worker"].split("@")[0] for o in outcomes.values()} == {"w1", "w2"}
    for host, words in expected.items():
        lines = [r["text"] for r in records
                 if r["type"] == "event" and r["kind"] == "output" and r["host"] == host]
        assert words in lines, lines
    for index in range(len(HOSTS)):
        assert stap_modules_loaded(fleet_lab, index) == ""


def test_the_broker_gone_mid_run_leaves_nothing_loaded(fleet_lab: LabStatus, tmp_path: Path,
                                                       env: dict[str, str], broker: Broker,
                                                       workers: Workers) -> None:
    manifest = write_manifest(tmp_path, "watch-opens", WATCH_OPENS)
    errors = tmp_path / "stderr"
    with errors.open("wb") as stream:  # a file: nobody reads a pipe while the test waits
        # two slices, one per worker: a third would wait for a worker to be free
        running = subprocess.Popen(
            [sys.executable, "-m", "stapctl", "apply", "-i", str(fleet_lab.inventory),
             "--engine", broker.engine, "--slices", "2", "--duration", "10m", str(manifest)],
            stdout=subprocess.DEVNULL, stderr=stream, env=env)
    folder = Path(env["XDG_DATA_HOME"]) / "stapctl" / "runs"

    def all_started() -> bool:
        events = list(folder.glob("*/events.jsonl"))
        return bool(events) and events[0].read_text().count('"kind": "started"') >= len(HOSTS)

    assert wait_for(all_started, 300), "the probes did not start"
    broker.process.kill()
    code = running.wait(timeout=120)
    stderr = errors.read_text(errors="replace")

    assert code == 1, stderr[-3000:]
    assert "went away" in stderr
    # the workers stopped their probes: within the agents' dead-man at the latest
    assert wait_for(lambda: all(stap_modules_loaded(fleet_lab, index) == ""
                                for index in range(len(HOSTS))), 90)
