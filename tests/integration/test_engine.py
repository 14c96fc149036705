"""The Celery engine end to end, through the real CLI: a real redis-server, three real
`stapctl worker` processes, 300 loopback SSH targets whose agent is a test double
(tests/engine_fleet.py). Module compiles are the real stap's, cached."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from stapctl import engine
from stapctl.engine import TASK, SliceWork, broker_url, celery_app, seal
from stapctl.errors import StapctlError
from stapctl.execute import RunOptions
from stapctl.manifest import load_manifest
from stapctl.models import Host
from tests.engine_fleet import (
    SCRIPT,
    Broker,
    Targets,
    Workers,
    make_targets,
    run_folder,
    start_workers,
    wait_started,
    write_secret,
)
from tests.integration.test_hostile_cli import headers_release
from tests.loopback_sshd import wait_for

pytestmark = pytest.mark.integration

HOSTS = 300


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Targets]:
    if os.geteuid() != 0:
        pytest.skip("the loopback sshd logs in as root; run the tests as root")
    fleet = make_targets(tmp_path_factory.mktemp("targets"), HOSTS, headers_release(), 2.0)
    yield fleet
    fleet.sshds.stop()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, STAPCTL_SECRET_FILE=str(write_secret(tmp_path)),
                XDG_DATA_HOME=str(tmp_path / "data"))


@pytest.fixture
def workers(tmp_path: Path, broker: Broker, env: dict[str, str],
            targets: Targets) -> Iterator[Workers]:
    targets.clear()
    yield from start_workers(tmp_path / "workers", broker.engine, env, 3, concurrency=3)


class Controller:
    """`stapctl apply` through the engine, its stdout and stderr in files (a pipe nobody
    reads while the test waits would stall it)."""

    def __init__(self, targets: Targets, broker: Broker, env: dict[str, str]) -> None:
        folder = Path(env["XDG_DATA_HOME"]).parent
        self.stdout, self.stderr = folder / "stdout", folder / "stderr"
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "stapctl", "apply", str(targets.manifest), "-i",
                 str(targets.inventory), "--engine", broker.engine, "--forks", "10",
                 "--slices", "30", "--format", "json"], stdout=out, stderr=err, env=env)

    def wait(self, seconds: float) -> int:
        return self.process.wait(timeout=seconds)

    def errors(self) -> str:
        return self.stderr.read_text(errors="replace")[-3000:]


def summary(env: dict[str, str]) -> dict[str, object]:
    folder = run_folder(Path(env["XDG_DATA_HOME"]))
    assert folder is not None
    return dict(json.loads((folder / "summary.json").read_text()))


def outcomes_once(env: dict[str, str], targets: Targets) -> list[dict[str, str]]:
    """The run's outcomes, after checking each host has exactly one."""
    outcomes = summary(env)["outcomes"]
    assert isinstance(outcomes, list)
    counts = Counter(outcome["host"] for outcome in outcomes)
    assert sorted(counts) == targets.names
    assert set(counts.values()) == {1}
    return outcomes


def test_one_apply_over_three_workers_records_every_host_once(
        targets: Targets, broker: Broker, env: dict[str, str], workers: Workers) -> None:
    done = Controller(targets, broker, env)

    assert done.wait(600) == 0, done.errors()
    outcomes = outcomes_once(env, targets)
    assert {outcome["status"] for outcome in outcomes} == {"ok"}
    served = Counter(outcome["worker"].split("@")[0] for outcome in outcomes)
    assert set(served) == {"w1", "w2", "w3"}, served  # every worker took slices
    assert json.loads(done.stdout.read_text().splitlines()[-1])["exit_code"] == 0
    folder = run_folder(Path(env["XDG_DATA_HOME"]))
    assert folder is not None
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    assert Counter(e["kind"] for e in events)["output"] == HOSTS  # each host's line, once
    assert len(targets.traced("started")) == HOSTS == len(targets.traced("done"))


def test_a_worker_killed_mid_run_leaves_its_hosts_failed_or_served_by_another(
        targets: Targets, broker: Broker, env: dict[str, str], workers: Workers) -> None:
    running = Controller(targets, broker, env)
    assert wait_started(Path(env["XDG_DATA_HOME"]), 40), running.errors()
    workers.processes["w1"].kill()  # SIGKILL: no chance to report anything
    code = running.wait(600)

    outcomes = outcomes_once(env, targets)
    lost = [o for o in outcomes if o["status"] != "ok"]
    assert lost, "w1 was killed with hosts running"
    assert {(o["status"], o["kind"]) for o in lost} == {("failed", "worker-lost")}, lost
    assert all("w1@" in o["message"] for o in lost)
    assert {o["worker"].split("@")[0] for o in outcomes if o["status"] == "ok"} >= {"w2", "w3"}
    assert code == 3, running.errors()  # partly failed: the run still finished
    assert "Traceback" not in running.errors()
    # the killed worker's agents lost their controller's connection: nothing runs on
    assert wait_for(lambda: len(targets.traced("started")) == len(
        targets.traced("done")) + len(targets.traced("orphaned")), 30)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_controller_stops_every_slice_cleanly(
        targets: Targets, broker: Broker, env: dict[str, str], workers: Workers,
        signum: int) -> None:
    running = Controller(targets, broker, env)
    assert wait_started(Path(env["XDG_DATA_HOME"]), 30), running.errors()
    running.process.send_signal(signum)

    assert running.wait(120) == 128 + signum, running.errors()
    outcomes = outcomes_once(env, targets)
    assert {o["status"] for o in outcomes} <= {"ok", "skipped"}
    assert any(o["status"] == "skipped" for o in outcomes)
    # every started agent was asked to stop (or had finished): EXIT, drain, unload
    assert targets.traced("stopped")
    assert len(targets.traced("started")) == len(targets.traced("done")) + len(
        targets.traced("stopped"))
    assert not targets.traced("orphaned")
    assert all(process.poll() is None for process in workers.processes.values())


def test_a_tampered_task_is_refused(tmp_path: Path, targets: Targets, broker: Broker,
                                    env: dict[str, str], workers: Workers) -> None:
    secret = Path(env["STAPCTL_SECRET_FILE"]).read_bytes().strip()
    # a real slice's task of one host, signed, then one byte of its work changed
    work = SliceWork(run_id="tampered", slice_id="1",
                     manifest=load_manifest(targets.manifest), options=RunOptions(),
                     hosts=(Host(name="h000", address="127.0.0.1"),), order=("h000",))
    payload, signed = seal(secret, work)
    data = bytearray(base64.b64decode(payload))
    data[len(data) // 2] ^= 1
    app = celery_app(broker_url(broker.engine))
    app.send_task(TASK, args=(base64.b64encode(bytes(data)).decode(), signed))
    app.send_task(TASK, args=(payload, "0" * 64))  # signed with another secret
    app.send_task(TASK, args=("not a slice", ""))  # unsigned

    def refused() -> int:
        return sum(log.read_text(errors="replace").count("refused a task")
                   for log in workers.logs.values())

    assert wait_for(lambda: refused() == 3, 30), [log.read_text()[-2000:]
                                                  for log in workers.logs.values()]
    assert not targets.traced("started")



def test_the_broker_gone_mid_run_fails_the_run_and_leaves_nothing_running(
        targets: Targets, broker: Broker, env: dict[str, str], workers: Workers) -> None:
    running = Controller(targets, broker, env)
    assert wait_started(Path(env["XDG_DATA_HOME"]), 30), running.errors()
    broker.process.kill()

    assert running.wait(120) == 1, running.errors()
    assert "the broker" in running.errors() and "went away" in running.errors()
    assert "Traceback" not in running.errors()
    # the workers stopped their hosts: every agent ended, asked to stop or cut off
    assert wait_for(lambda: len(targets.traced("started")) == len(targets.traced("done"))
                    + len(targets.traced("stopped")) + len(targets.traced("orphaned")), 60)


def test_a_worker_keeps_only_modules_whose_bytes_match_their_sha256(
        tmp_path: Path, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    client = engine.broker(broker_url(broker.engine))
    good = b"\x7fELF a module"
    good_sha = hashlib.sha256(good).hexdigest()
    forged_sha = hashlib.sha256(b"what the controller built").hexdigest()
    client.set(engine.module_key(good_sha), good)
    client.set(engine.module_key(forged_sha), b"\x7fELF something else")

    assert engine.fetch_module(client, good_sha).read_bytes() == good
    with pytest.raises(StapctlError, match="does not match its sha256"):
        engine.fetch_module(client, forged_sha)
    with pytest.raises(StapctlError, match="not on the broker"):
        engine.fetch_module(client, "0" * 64)
    assert [p.name for p in engine.module_cache().iterdir()] == [f"{good_sha}.ko"]
    client.delete(engine.module_key(good_sha))  # cached: the broker is not asked again
    assert engine.fetch_module(client, good_sha).read_bytes() == good


def test_stapctl_run_goes_through_the_engine_set_in_the_environment(
        targets: Targets, broker: Broker, env: dict[str, str], workers: Workers) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stapctl", "run", "h00*", "-i", str(targets.inventory),
         "--format", "json", "-e", SCRIPT],
        capture_output=True, text=True, timeout=300, check=False,
        env=dict(env, STAPCTL_ENGINE=broker.engine))

    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines()]
    (result,) = [r for r in records if r["type"] == "summary"]
    assert sorted(o["host"] for o in result["outcomes"]) == targets.names[:10]
    assert all(o["status"] == "ok" and o["worker"] for o in result["outcomes"])


def test_a_detached_apply_is_refused_with_an_engine(targets: Targets,
                                                     env: dict[str, str]) -> None:
    targets.clear()
    done = subprocess.run(
        [sys.executable, "-m", "stapctl", "apply", str(targets.manifest), "-i",
         str(targets.inventory), "--detach", "--engine", "celery+redis://127.0.0.1:1/0"],
        capture_output=True, text=True, timeout=60, check=False, env=env)

    assert done.returncode == 2
    assert "--detach" in done.stderr and "engine" in done.stderr
    assert not targets.traced("started")
