"""What the engine's tests and benchmark run on: a real redis-server on a loopback port,
real `stapctl worker` processes, and loopback SSH targets (several host names per sshd),
each host's agent a test double that reports a run, pausing in the middle, and leaves a
trace of how it ended in a folder the test reads."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.loopback_sshd import Sshds, free_port, start_sshds, wait_for

HOSTS_PER_SSHD = 25
SCRIPT = 'probe oneshot { println("hi") }'


@dataclass
class Broker:
    engine: str  # celery+redis://127.0.0.1:PORT/0
    port: int
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def start_broker(folder: Path) -> Broker:
    """redis-server on a free loopback port, its files in ``folder``, nothing saved."""
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise RuntimeError("redis-server missing: scripts/install.sh installs it")
    port = free_port()
    process = subprocess.Popen(
        [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
         "--save", "", "--appendonly", "no", "--logfile", str(folder / "redis.log")],
        stdout=subprocess.DEVNULL)
    broker = Broker(f"celery+redis://127.0.0.1:{port}/0", port, process)
    import redis

    def answers() -> bool:
        try:
            return bool(redis.Redis(port=port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    if not wait_for(answers, 10):
        broker.stop()
        raise RuntimeError(f"redis-server did not start: {(folder / 'redis.log').read_text()}")
    return broker


@dataclass
class Targets:
    """Loopback SSH hosts whose agent is a test double; its traces are in ``traces``."""

    inventory: Path
    manifest: Path
    traces: Path
    sshds: Sshds
    names: list[str]

    def traced(self, state: str) -> list[Path]:
        return list(self.traces.glob(f"*.{state}"))

    def running(self) -> set[str]:
        """The agents that started and have not ended (done, stopped or orphaned)."""
        def ids(state: str) -> set[str]:
            return {trace.stem for trace in self.traced(state)}

        return ids("started") - ids("done") - ids("stopped") - ids("orphaned")

    def clear(self) -> None:
        for trace in self.traces.iterdir():
            trace.unlink()


def agent_double(path: Path, traces: Path, pause: float, heeds_stop: bool = True,
                 failing: tuple[int, ...] = ()) -> None:
    """Test double of the agent: hello, loaded, started, a line, then `pause` seconds
    listening for the controller's stop (unless not ``heeds_stop``); leaves ID.started and
    ID.done / .stopped / .orphaned (its controller's connection went away) in ``traces``.
    The hosts whose remote id is in ``failing`` end failed (runtime-error)."""
    path.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, select, signal, struct, sys, time
        TRACES, PAUSE = {str(traces)!r}, {pause!r}
        HEEDS_STOP, FAILING = {heeds_stop!r}, {list(failing)!r}
        ME = "%d-%s" % (os.getpid(), os.urandom(8).hex())  # PIDs are reused in a run
        def trace(state):
            open(os.path.join(TRACES, "%s.%s" % (ME, state)), "w").close()
        def orphaned(*_):
            trace("orphaned")
            os._exit(0)
        signal.signal(signal.SIGHUP, orphaned)  # sshd's word that the connection is gone
        def frame(kind, data):
            payload = json.dumps(data).encode() if isinstance(data, dict) else data
            try:
                sys.stdout.buffer.write(struct.pack(">BI", ord(kind), len(payload)) + payload)
                sys.stdout.flush()
            except BrokenPipeError:
                orphaned()
        frame("H", {{"protocol": 1, "agent": "double", "pid": os.getpid()}})  # always first
        request = json.loads(sys.stdin.buffer.readline())
        sys.stdin.buffer.read(request.get("module_size", 0))  # a module sent with it
        frame("E", {{"event": "loaded", "module": request.get("module_name", "")}})
        frame("E", {{"event": "started"}})
        trace("started")
        frame("O", b"hi\\n")
        end, ending = time.monotonic() + PAUSE, "done"
        while time.monotonic() < end:
            ready, _, _ = select.select([sys.stdin], [], [], 0.1)
            if ready:
                line = sys.stdin.buffer.readline()
                if not line:
                    orphaned()
                if json.loads(line).get("op") == "stop" and HEEDS_STOP:
                    ending = "stopped"
                    break
        if request.get("remote_id") in FAILING:
            frame("R", {{"status": "failed", "kind": "runtime-error", "message": "failing"}})
        else:
            frame("R", {{"status": "ok", "message": ending}})
        trace(ending)
        """))
    path.chmod(0o755)


def make_targets(base: Path, count: int, release: str, pause: float, *,
                 heeds_stop: bool = True, failing: tuple[int, ...] = (),
                 address: str = "127.0.0.1", facts_delay: float = 0.0) -> Targets:
    """``count`` hosts on count/25 sshd processes; `uname` on them says ``release``
    (after ``facts_delay`` seconds); the inventory names them at ``address`` (an alias
    only an ssh_config may resolve); the agent double as ``agent_double`` has it."""
    bin_dir, traces = base / "bin", base / "traces"
    bin_dir.mkdir()
    traces.mkdir()
    (bin_dir / "uname").write_text(f"#!/bin/sh\nsleep {facts_delay}\ncase \"$1\" in -m) "
                                   f"echo x86_64;; -rm) echo {release} x86_64;; "
                                   f"*) echo {release};; esac\n")
    (bin_dir / "uname").chmod(0o755)
    agent_double(bin_dir / "agent-double", traces, pause, heeds_stop, failing)
    sshds = start_sshds(base, -(-count // HOSTS_PER_SSHD),
                        f"SetEnv PATH={bin_dir}:/usr/bin:/bin SHLVL=1\n")
    names = [f"h{index:03d}" for index in range(count)]
    inventory = base / "hosts.yaml"
    inventory.write_text(yaml.safe_dump({"all": {"hosts": {name: {
        "ansible_host": address, "ansible_port": sshds.ports[index // HOSTS_PER_SSHD],
        "ansible_user": "root", "ansible_ssh_private_key_file": str(sshds.client_key),
        "stapctl_known_hosts": str(sshds.known_hosts),
        "ansible_python_interpreter": str(bin_dir / "agent-double"),
    } for index, name in enumerate(names)}}}))
    manifest = base / "hello.yaml"
    manifest.write_text(yaml.safe_dump({"apiVersion": "stapctl/v1", "kind": "Trace",
                                        "name": "hello", "probes": [{
                                            "name": "hello", "script": SCRIPT}]}))
    return Targets(inventory, manifest, traces, sshds, names)


def write_secret(folder: Path) -> Path:
    secret = folder / "secret"
    secret.write_bytes(os.urandom(32).hex().encode())
    secret.chmod(0o600)
    return secret


@dataclass
class Workers:
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGQUIT)  # Celery's cold shutdown
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def ready(self) -> bool:
        return all(" ready." in log.read_text(errors="replace") for log in self.logs.values())


def start_workers(folder: Path, engine: str, env: dict[str, str], count: int,
                  concurrency: int) -> Generator[Workers, None, None]:
    """``count`` `stapctl worker` processes (thread pools), each with its own cache."""
    workers = Workers()
    stapctl = Path(sys.executable).with_name("stapctl")
    for index in range(1, count + 1):
        name = f"w{index}"
        home = folder / name
        home.mkdir(parents=True)
        log = home / "worker.log"
        workers.logs[name] = log
        with log.open("wb") as stream:
            workers.processes[name] = subprocess.Popen(
                [str(stapctl), "worker", "--engine", engine, "-n", f"{name}@%h",
                 "--pool", "threads", "--concurrency", str(concurrency),
                 "--without-gossip", "--without-mingle", "--without-heartbeat"],
                stdout=stream, stderr=subprocess.STDOUT,
                env=dict(env, XDG_CACHE_HOME=str(home / "cache")))
    try:
        if not wait_for(workers.ready, 60):
            raise RuntimeError("workers did not start: " + " | ".join(
                log.read_text(errors="replace")[-2000:] for log in workers.logs.values()))
        yield workers
    finally:
        workers.stop()


def run_folder(data_home: Path) -> Path | None:
    folders = list((data_home / "stapctl" / "runs").glob("*"))
    return folders[0] if folders else None


def wait_started(data_home: Path, count: int, seconds: float = 120) -> bool:
    """Whether ``count`` hosts reported `started` in the run's events within ``seconds``."""
    def enough() -> bool:
        folder = run_folder(data_home)
        if folder is None or not (folder / "events.jsonl").exists():
            return False
        text = (folder / "events.jsonl").read_text(errors="replace")
        return text.count('"kind": "started"') >= count

    deadline = time.monotonic() + seconds
    return wait_for(enough, max(0.0, deadline - time.monotonic()))
