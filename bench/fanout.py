"""Fan-out cost: stapctl's controller against a bare paramiko script and against Ansible.

N targets, each its own SSH connection to real OpenSSH sshd processes on loopback ports
(TARGETS_PER_SSHD names share one server). Every tool does the same work on every
target: connect, upload a 300 KB file (a new one per target and per round, so nothing is
skipped as already there), run one command, gather its output; all with the same number
of hosts worked on at once (``forks``).

- paramiko: a thread pool doing exactly that, with stapctl's own last command: the
  agent's preflight (the agent run as stapctl runs it, by import with its bytecode cached;
  the request on stdin). The floor for any controller that runs a Python agent on its
  targets.
- stapctl: what ``Session.apply`` does, with ``RunOptions(check=True)`` and a Plan of
  prebuilt 300 KB artifacts: ``Session.connect`` (agent already shipped, facts) then
  ``Session.run``, or, with more targets than forks, ``Session.stream`` (each target
  connected and run in one go); the run is the upload, then the agent's preflight, which
  refuses here because this machine cannot load modules.
- apply: the same without ``check``: a full run, whose every host fails at the preflight
  (no module support here), every outcome recorded as a run of stapctl's own.
- ansible: ``ansible-playbook`` with ``copy`` + ``command``, pipelining on, one
  ControlPersist master per target.

Each SSH session normally runs root's ~/.bashrc, which may start anything; the
benchmark's sshd sets SHLVL=1, which makes bash skip it, as on a fleet's bare root.
Each contender runs in a process of its own, started with the usual default descriptor
limit (1024), so that the harness can follow its memory and descriptors:

    python bench/fanout.py TOOL N FORKS WORK   (WORK/targets.json: the sshds)
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import paramiko
import yaml

from stapctl.agent import AgentHost, agent_argv
from stapctl.connection import ConnectOptions, LocalConnection
from stapctl.execute import RunOptions
from stapctl.models import (
    FailureKind,
    Host,
    Manifest,
    ModuleArtifact,
    ModuleSpec,
    Probe,
    Strategy,
)
from stapctl.plan import ModuleJob, Plan
from stapctl.session import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/
from tests.loopback_sshd import Sshds, start_sshds  # noqa: E402

PAYLOAD = 300 * 1024
TARGETS_PER_SSHD = 25
REMOTE_DIR = "/tmp/stapctl-bench"


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    payload: Path  # this target's 300 KB file for the current round
    remote: str  # where the bare script and Ansible put it


def start_targets(base: Path, count: int) -> Sshds:
    """Enough sshd processes for ``count`` targets; SHLVL=1 makes bash skip root's
    ~/.bashrc (module doc)."""
    try:
        return start_sshds(base, -(-count // TARGETS_PER_SSHD), "SetEnv SHLVL=1\n")
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None


def make_targets(lab: Sshds, count: int, round_dir: Path, tool: str) -> list[Target]:
    """Fresh random payloads: nothing can be skipped as already uploaded."""
    round_dir.mkdir(parents=True, exist_ok=True)
    targets = []
    for i in range(count):
        payload = round_dir / f"{tool}-{i}.bin"
        payload.write_bytes(os.urandom(PAYLOAD))
        targets.append(Target(f"t{i}", lab.ports[i // TARGETS_PER_SSHD], payload,
                              f"{REMOTE_DIR}/{tool}-{i}.bin"))
    return targets


# -- the ways compared -------------------------------------------------------------------
def agent_path() -> str:
    """Where stapctl keeps its agent on these targets (they are this machine, as root),
    put there if it is not."""
    agent = AgentHost(LocalConnection(Host(name="here", address="local"), ConnectOptions()))
    agent.prepare()
    return agent.path


def bare_paramiko(lab: Sshds, targets: list[Target], forks: int) -> int:
    """Connect, SFTP put, run stapctl's own last step (the agent's preflight), read its
    output; returns how many succeeded."""
    agent = agent_path()

    def one(target: Target) -> bool:
        client = paramiko.SSHClient()
        client.load_host_keys(str(lab.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        sock = socket.create_connection(("127.0.0.1", target.port), timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as stapctl does
        sha256 = hashlib.sha256(target.payload.read_bytes()).hexdigest()
        try:
            client.connect("127.0.0.1", port=target.port, username="root", sock=sock,
                           key_filename=str(lab.client_key), look_for_keys=False,
                           allow_agent=False, timeout=60, banner_timeout=60)
            with client.open_sftp() as sftp:
                sftp.put(str(target.payload), target.remote)
            stdin, out, _ = client.exec_command(
                shlex.join(agent_argv("python3", agent)))
            stdin.write(json.dumps({"protocol": 1, "action": "preflight",
                                    "module": target.remote, "sha256": sha256,
                                    "module_name": "stapctl_bench"}) + "\n")
            stdin.channel.shutdown_write()
            return b'"preflight-refused"' in out.read()
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=forks) as pool:
        return sum(pool.map(one, targets))


def stapctl_fleet(lab: Sshds, targets: list[Target], forks: int, check: bool) -> int:
    """Session.connect + Session.run; returns how many hosts reached the preflight (which
    refuses: this machine loads no modules), each outcome recorded unless ``check``."""
    probe = Probe(name="bench", template="", origin="bench", first_line=1)
    manifest = Manifest(path=Path("bench.yaml"), name="bench", probes=(probe,),
                        strategy=Strategy(forks=forks, connect_timeout=60))
    hosts = [Host(name=t.name, address="127.0.0.1", port=t.port, user="root",
                  key_file=str(lab.client_key), known_hosts=str(lab.known_hosts)) for t in targets]
    jobs = []
    for target in targets:
        spec = ModuleSpec(script=target.name, release="bench", arch="x86_64")
        sha256 = hashlib.sha256(target.payload.read_bytes()).hexdigest()
        jobs.append(ModuleJob(probe=probe, spec=spec, hosts=(target.name,),
                              artifact=ModuleArtifact(spec.key, target.payload, sha256,
                                                      "stapctl_bench")))
    session = Session(manifest, hosts, options=RunOptions(check=check), record=not check)
    plan = Plan(jobs=tuple(jobs))
    try:  # as apply does
        if session.streams:
            session.stream(lambda host, _facts: Plan(jobs=plan.jobs_for(host.name)))
        else:
            session.connect(spares=True)
            session.run(plan)
    finally:
        run = session.finish()
    if check:
        return sum(o.kind == FailureKind.PREFLIGHT_REFUSED for o in run.outcomes)
    assert session.recorder is not None  # a full run is recorded: count what was written
    summary = json.loads((session.recorder.dir / "summary.json").read_text())
    return sum(o["kind"] == FailureKind.PREFLIGHT_REFUSED for o in summary["outcomes"])


def ansible(lab: Sshds, targets: list[Target], forks: int, work: Path) -> int:
    """ansible-playbook copy + command; returns how many hosts ended with ok=2."""
    control = Path(tempfile.mkdtemp(prefix="cp-", dir=work))  # fresh masters each round
    inventory = {"all": {"hosts": {t.name: {
        "ansible_host": "127.0.0.1", "ansible_port": t.port, "ansible_user": "root",
        "ansible_ssh_private_key_file": str(lab.client_key),
        "ansible_ssh_args": f"-o ControlMaster=auto -o ControlPersist=10s "
                            f"-o ControlPath={control}/{t.name} "
                            f"-o UserKnownHostsFile={lab.known_hosts} "
                            "-o StrictHostKeyChecking=yes",
        "payload": str(t.payload), "remote": t.remote,
    } for t in targets}}}
    (work / "inventory.yaml").write_text(yaml.safe_dump(inventory))
    (work / "play.yaml").write_text(yaml.safe_dump([{
        "hosts": "all", "gather_facts": False, "tasks": [
            {"copy": {"src": "{{ payload }}", "dest": "{{ remote }}"}},
            {"command": "sha256sum {{ remote }}"},
        ]}]))
    env = dict(os.environ, ANSIBLE_PIPELINING="True", ANSIBLE_HOST_KEY_CHECKING="True",
               ANSIBLE_PYTHON_INTERPRETER="/usr/bin/python3", ANSIBLE_NOCOLOR="1",
               ANSIBLE_LOCAL_TEMP=str(work / "local-tmp"), ANSIBLE_RETRY_FILES_ENABLED="0")
    playbook_bin = str(Path(sys.executable).parent / "ansible-playbook")
    result = subprocess.run([playbook_bin, "-i", str(work / "inventory.yaml"), "-f",
                             str(forks), str(work / "play.yaml")],
                            capture_output=True, text=True, env=env, check=False)
    ok = sum(1 for line in result.stdout.splitlines()
             if " : ok=2 " in line and "failed=0" in line and "unreachable=0" in line)
    if ok != len(targets):
        print(result.stdout[-3000:], result.stderr[-3000:], file=sys.stderr)
    return ok


# -- measuring ---------------------------------------------------------------------------
def clean_remote() -> None:
    """The targets are this machine: drop what earlier rounds uploaded."""
    shutil.rmtree(REMOTE_DIR, ignore_errors=True)
    os.makedirs(REMOTE_DIR)


def forget_modules(targets: list[Target]) -> None:
    """stapctl keeps uploaded modules by sha256; this round's must not be there yet."""
    for target in targets:
        sha256 = hashlib.sha256(target.payload.read_bytes()).hexdigest()
        (Path.home() / ".cache" / "stapctl-agent" / f"{sha256}.ko").unlink(missing_ok=True)


DEFAULT_FD_LIMIT = 1024


def main() -> None:
    """One contender, once: prints how many targets did the work and the seconds taken."""
    tool, count, forks, work = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (DEFAULT_FD_LIMIT, hard))
    spec = json.loads((work / "targets.json").read_text())
    lab = Sshds(spec["ports"], Path(spec["client_key"]), Path(spec["known_hosts"]), [])
    targets = make_targets(lab, count, work / f"{tool}-{count}", tool)
    forget_modules(targets)
    runs: dict[str, Callable[[], int]] = {
        "paramiko": lambda: bare_paramiko(lab, targets, forks),
        "stapctl": lambda: stapctl_fleet(lab, targets, forks, check=True),
        "apply": lambda: stapctl_fleet(lab, targets, forks, check=False),
        "ansible": lambda: ansible(lab, targets, forks, work),
    }
    started = time.perf_counter()
    done = runs[tool]()
    print(json.dumps({"done": done, "seconds": time.perf_counter() - started}))
    forget_modules(targets)


if __name__ == "__main__":
    main()
