"""The Celery engine end to end, through the real CLI: a real redis-server, three real
`stapctl worker` processes, 300 loopback SSH targets whose agent is a test double
(tests/engine_fleet.py). Module compiles are the real stap's, cached."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from stapctl import engine
from stapctl.engine import TASK, CeleryEngine, SliceWork, broker_url, celery_app, seal
from stapctl.errors import StapctlError
from stapctl.execute import RunOptions
from stapctl.manifest import load_manifest
from stapctl.models import Host
from stapctl.session import Session, select_hosts
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

    def __init__(self, targets: Targets, broker: Broker, env: dict[str, str],
                 manifest: Path | None = None, slices: int = 30) -> None:
        folder = Path(env["XDG_DATA_HOME"]).parent
        self.stdout, self.stderr = folder / "stdout", folder / "stderr"
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "stapctl", "apply", str(manifest or targets.manifest),
                 "-i", str(targets.inventory), "--engine", broker.engine, "--forks", "10",
                 "--slices", str(slices), "--format", "json"], stdout=out, stderr=err,
                env=env)

    def wait(self, seconds: float) -> int:
        return self.process.wait(timeout=seconds)

    def errors(self) -> str:
        return self.stderr.read_text(errors="replace")[-3000:]


def summary(env: dict[str, str]) -> dict[str, Any]:
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
    assert wait_for(lambda: not targets.running(), 30), targets.running()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_controller_stops_every_slice_cleanly(
        tmp_path: Path, targets: Targets, broker: Broker, env: dict[str, str],
        workers: Workers, signum: int) -> None:
    """In batches of 100, so the stop comes while the first batch runs, its hosts held by
    the agent's pause: without batches, a loaded machine could start all 300 before the
    stop reached the workers, and none would be left to skip."""
    running = Controller(targets, broker, env, in_batches(tmp_path, 100))
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


# -- a small fleet of its own for each test below ---------------------------------------
SMALL = 20
ZONE = "stapctl-zone"  # the targets' address: only the workers' ssh_config resolves it


def small_targets(tmp_path: Path, **agent: Any) -> Iterator[Targets]:
    if os.geteuid() != 0:
        pytest.skip("the loopback sshd logs in as root; run the tests as root")
    fleet = make_targets(tmp_path / "targets", SMALL, headers_release(), **agent)
    yield fleet
    fleet.sshds.stop()


def zone_env(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """The workers' environment: a home whose ssh_config resolves ZONE to loopback."""
    home = tmp_path / "zone-home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(f"Host {ZONE}\n    HostName 127.0.0.1\n")
    return dict(env, HOME=str(home))


@pytest.fixture
def zone(tmp_path: Path) -> Iterator[Targets]:
    (tmp_path / "targets").mkdir()
    yield from small_targets(tmp_path, pause=0.5, address=ZONE)


def test_the_workers_connect_and_the_controller_never_does(
        tmp_path: Path, zone: Targets, broker: Broker, env: dict[str, str]) -> None:
    # the controller cannot reach the hosts: its own (local) run finds them unreachable
    local = subprocess.run(
        [sys.executable, "-m", "stapctl", "apply", str(zone.manifest), "-i",
         str(zone.inventory), "--format", "json"],
        capture_output=True, text=True, timeout=120, check=False, env=env)
    records = [json.loads(line) for line in local.stdout.splitlines()]
    (result,) = [r for r in records if r["type"] == "summary"]
    assert {o["status"] for o in result["outcomes"]} == {"unreachable"}, local.stderr
    for old in (Path(env["XDG_DATA_HOME"]) / "stapctl" / "runs").iterdir():
        shutil.rmtree(old)
    for _ in start_workers(tmp_path / "workers", broker.engine, zone_env(tmp_path, env), 2,
                           concurrency=2):
        done = Controller(zone, broker, env, slices=4)
        assert done.wait(120) == 0, done.errors()

    outcomes = outcomes_once(env, zone)
    assert {o["status"] for o in outcomes} == {"ok"}
    assert len(zone.traced("started")) == SMALL == len(zone.traced("done"))
    folder = run_folder(Path(env["XDG_DATA_HOME"]))
    assert folder is not None
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    connected = [e for e in events if e["kind"] == "connected"]
    assert sorted(e["host"] for e in connected) == zone.names  # from the workers' facts
    assert {e["text"] for e in connected} == {f"{headers_release()} x86_64"}


def test_kernel_symbols_are_read_by_the_workers(tmp_path: Path, zone: Targets,
                                                broker: Broker, env: dict[str, str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """kprobe.function's symbol maps: each host's /proc/kallsyms is read by the worker
    holding its connection (the controller cannot reach the hosts)."""
    monkeypatch.setenv("STAPCTL_SECRET_FILE", env["STAPCTL_SECRET_FILE"])
    manifest = tmp_path / "kprobe.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "stapctl/v1", "kind": "Trace", "name": "kprobe", "inventory":
        str(zone.inventory), "probes": [{"name": "reads", "script":
                                         'probe kprobe.function("vfs_read") { exit() }'}]}))
    loaded = load_manifest(manifest)
    secret = Path(env["STAPCTL_SECRET_FILE"]).read_bytes().strip()
    for _ in start_workers(tmp_path / "workers", broker.engine, zone_env(tmp_path, env), 1,
                           concurrency=1):
        session = Session(loaded, select_hosts(loaded)[:3], record=False,
                          engine=CeleryEngine(broker_url(broker.engine), secret, 2))
        try:
            connected = session.connect()
            assert session.engine is not None
            with pytest.raises(StapctlError, match="/nonexistent"):
                session.engine.read_file("h001", "/nonexistent", 4096)
        finally:
            session.finish()

    assert sorted(connected) == zone.names[:3]
    maps = {facts.symbol_map for _, facts in connected.values()}
    # the targets are this machine: their symbols are its own
    assert maps == {session.builder.store_symbol_map(Path("/proc/kallsyms").read_bytes())}, \
        [facts for _, facts in connected.values()]


@pytest.fixture
def slow_facts(tmp_path: Path) -> Iterator[Targets]:
    (tmp_path / "targets").mkdir()
    yield from small_targets(tmp_path, pause=0.2, facts_delay=3.0)


def test_a_worker_lost_while_connecting_has_its_hosts_served_by_another(
        tmp_path: Path, slow_facts: Targets, broker: Broker, env: dict[str, str]) -> None:
    # one slice each: a worker of concurrency 1 reserves one task at a time
    started = start_workers(tmp_path / "workers", broker.engine, env, 2, concurrency=1)
    workers = next(started)
    try:
        running = Controller(slow_facts, broker, env, slices=2)
        # w1 has begun its slice: it is logging in to its hosts
        assert wait_for(lambda: all("received" in log.read_text(errors="replace")
                                    for log in workers.logs.values()) and "Authentication"
                        in workers.logs["w1"].read_text(errors="replace"), 30), \
            running.errors()
        workers.processes["w1"].kill()  # while its hosts' facts are being gathered
        code = running.wait(120)
    finally:
        started.close()

    assert code == 0, running.errors()
    outcomes = outcomes_once(env, slow_facts)
    assert {(o["status"], o["worker"].split("@")[0]) for o in outcomes} == {("ok", "w2")}
    assert len(slow_facts.traced("started")) == SMALL  # nothing loaded twice


@pytest.fixture
def slow_run(tmp_path: Path) -> Iterator[Targets]:
    (tmp_path / "targets").mkdir()
    yield from small_targets(tmp_path, pause=3.0, facts_delay=2.0)


def serving_worker(broker: Broker, host: str) -> str:
    """The worker whose execution holds ``host``'s claim, from the broker's keys."""
    client = engine.broker(broker_url(broker.engine))
    (claim,) = client.scan_iter(f"{engine.PREFIX}run:*:claim:{host}")
    # the client does not decode responses: keys and values are bytes
    run_key = cast(bytes, claim).decode().rsplit(":claim:", 1)[0]
    worker = client.get(f"{run_key}:lease:{cast(bytes, client.get(claim)).decode()}")
    assert worker is not None
    return str(cast(bytes, worker).decode())


def in_batches(folder: Path, size: int) -> Path:
    """A manifest run in batches of ``size`` hosts: later batches wait for earlier ones."""
    manifest = folder / "serial.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "stapctl/v1", "kind": "Trace", "name": "serial",
        "strategy": {"serial": [size]}, "probes": [{"name": "hello", "script": SCRIPT}]}))
    return manifest


def test_a_worker_lost_after_the_plan_has_its_unstarted_hosts_served_by_another(
        tmp_path: Path, slow_run: Targets, broker: Broker, env: dict[str, str]) -> None:
    """Batches of two over two slices of ten: the first worker dies running the first
    batch, while the rest of its slice waits for batches not yet released."""
    manifest = in_batches(tmp_path, 2)
    # one slice each: a worker of concurrency 1 reserves one task at a time
    started = start_workers(tmp_path / "workers", broker.engine, env, 2, concurrency=1)
    workers = next(started)
    try:
        running = Controller(slow_run, broker, env, manifest, slices=2)
        assert wait_started(Path(env["XDG_DATA_HOME"]), 2), running.errors()
        dead = serving_worker(broker, "h000")
        workers.processes[dead.split("@")[0]].kill()  # SIGKILL: no chance to report
        code = running.wait(300)
    finally:
        started.close()

    assert code == 3, running.errors()  # partly failed: the run still finished
    outcomes = {o["host"]: o for o in outcomes_once(env, slow_run)}
    first = slow_run.names[:2]
    assert {(outcomes[h]["status"], outcomes[h]["kind"]) for h in first} == {
        ("failed", "worker-lost")}
    assert all(dead in outcomes[h]["message"] for h in first)
    rest = [o for h, o in outcomes.items() if h not in first]
    assert {(o["status"], o["worker"].split("@")[0]) for o in rest} == {
        ("ok", next(name for name in workers.processes if not dead.startswith(name)))}
    assert len(slow_run.traced("started")) == SMALL  # each host's agent started once
    assert "Traceback" not in running.errors()


def test_hosts_handed_on_that_no_worker_takes_wait_for_one_and_an_interrupt_ends_them(
        tmp_path: Path, slow_run: Targets, broker: Broker, env: dict[str, str]) -> None:
    """The only worker dies running the first batch: the rest of its hosts wait for
    another worker, the controller says so, and Ctrl-C ends the run."""
    manifest = in_batches(tmp_path, 2)
    started = start_workers(tmp_path / "workers", broker.engine, env, 1, concurrency=1)
    workers = next(started)
    try:
        running = Controller(slow_run, broker, env, manifest, slices=1)
        assert wait_started(Path(env["XDG_DATA_HOME"]), 2), running.errors()
        workers.processes["w1"].kill()
        assert wait_for(lambda: "waiting for a worker" in running.errors(), 60), \
            running.errors()
        running.process.send_signal(signal.SIGINT)
        code = running.wait(60)
    finally:
        started.close()

    assert code == 130, running.errors()
    assert running.errors().count("waiting for a worker") == 1
    assert "Traceback" not in running.errors()
    outcomes = {o["host"]: o for o in outcomes_once(env, slow_run)}
    first = slow_run.names[:2]
    assert {(outcomes[h]["status"], outcomes[h]["kind"]) for h in first} == {
        ("failed", "worker-lost")}
    assert {outcomes[h]["status"] for h in slow_run.names[2:]} == {"skipped"}
    assert len(slow_run.traced("started")) == 2


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[Targets]:
    (tmp_path / "targets").mkdir()
    yield from small_targets(tmp_path, pause=0.2, failing=(0,))


def test_a_failing_canary_skips_the_rest_on_every_worker_as_a_local_run_does(
        tmp_path: Path, canary: Targets, broker: Broker, env: dict[str, str],
        workers: Workers) -> None:
    manifest = tmp_path / "canary.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "stapctl/v1", "kind": "Trace", "name": "canary",
        "strategy": {"serial": [1, "50%"], "max_fail_percentage": 0},
        "probes": [{"name": "hello", "script": SCRIPT}]}))
    done = Controller(canary, broker, env, manifest, slices=4)
    code = done.wait(120)
    assert code == 1, done.errors()  # nothing ran ok
    through_engine = outcomes_once(env, canary)
    assert len(canary.traced("started")) == 1  # the canary alone ran
    for folder in (Path(env["XDG_DATA_HOME"]) / "stapctl" / "runs").iterdir():
        shutil.rmtree(folder)
    local = subprocess.run(
        [sys.executable, "-m", "stapctl", "apply", str(manifest), "-i",
         str(canary.inventory), "--format", "json"],
        capture_output=True, text=True, timeout=120, check=False, env=env)
    assert local.returncode == code, local.stderr[-3000:]

    def kinds(outcomes: list[dict[str, str]]) -> dict[str, tuple[str, str, str]]:
        return {o["host"]: (o["status"], o["kind"], o["message"]) for o in outcomes}

    assert kinds(through_engine) == kinds(outcomes_once(env, canary))
    assert kinds(through_engine)["h000"][:2] == ("failed", "runtime-error")
    assert set(list(kinds(through_engine).values())[1:]) == {
        ("skipped", "skipped", "max_fail_percentage (0%) exceeded")}


def test_no_worker_is_said_once_and_an_interrupt_still_stops_cleanly(
        tmp_path: Path, canary: Targets, broker: Broker, env: dict[str, str]) -> None:
    waiting = Controller(canary, broker, env, slices=2)
    assert wait_for(lambda: "waiting for a worker" in waiting.errors(), 30), waiting.errors()
    assert wait_for(lambda: waiting.process.poll() is None, 1)  # it keeps waiting
    waiting.process.send_signal(signal.SIGINT)

    assert waiting.wait(60) == 130, waiting.errors()
    errors = waiting.errors()
    assert errors.count("waiting for a worker") == 1
    assert f"start one with `stapctl worker --engine {broker.engine}`" in errors
    assert "Traceback" not in errors
    assert {o["status"] for o in outcomes_once(env, canary)} == {"skipped"}
    assert not canary.traced("started")


@pytest.fixture
def stubborn(tmp_path: Path) -> Iterator[Targets]:
    (tmp_path / "targets").mkdir()
    yield from small_targets(tmp_path, pause=120.0, heeds_stop=False)


def test_a_second_interrupt_makes_the_workers_cut_their_hosts(
        tmp_path: Path, stubborn: Targets, broker: Broker, env: dict[str, str],
        workers: Workers) -> None:
    running = Controller(stubborn, broker, env, slices=4)
    assert wait_started(Path(env["XDG_DATA_HOME"]), SMALL), running.errors()
    running.process.send_signal(signal.SIGINT)  # the agents do not heed a stop...
    assert wait_for(lambda: running.process.poll() is not None, 3) is False
    running.process.send_signal(signal.SIGINT)  # ... so a second cuts their connections

    assert running.wait(30) == 130, running.errors()
    # cut off, the agents end on their own, long before their 120 s (or a 30 s grace)
    assert wait_for(lambda: len(stubborn.traced("orphaned")) == SMALL, 15), \
        len(stubborn.traced("orphaned"))
    assert "Traceback" not in running.errors()
