"""Fan-out cost: stapctl's controller against a bare paramiko script and against Ansible.

N targets, each its own SSH connection to real OpenSSH sshd processes on loopback ports.
Every tool does the same work on every target: connect, upload a 300 KB file (a new one
per target and per round, so nothing is skipped as already there), run one command,
gather its output.

- paramiko: a thread pool doing exactly that, with stapctl's own last command: the
  agent's preflight (the agent run as stapctl runs it, by import with its bytecode cached;
  the request on stdin). The floor for any controller that runs a Python agent on its
  targets.
- floor: the same script running ``sha256sum`` instead: the transport alone.
- stapctl: ``Session.connect`` (agent already shipped, facts) and ``Session.run`` with
  ``RunOptions(check=True)`` on a Plan of prebuilt 300 KB artifacts: upload, then the
  agent's preflight, which refuses here because this machine cannot load modules.
- ansible: ``ansible-playbook`` with ``copy`` + ``command``, forks = N, pipelining on,
  one ControlPersist master per target.

Targets: stapctl ≤ 1.3× paramiko, and ≥ 10× faster than Ansible. All targets share this
machine's cores, so remote work (a Python start: ~25 ms of CPU) adds up here as it would
not on a real fleet, where each host has its own CPU; stapctl/floor shows that cost.

Each SSH session normally runs root's ~/.bashrc (bash does for sshd), which here starts
pyenv twice: ~150 ms of CPU per session, more than everything else a target does. Real
targets' root does not do that, so the benchmark's sshd sets SHLVL=1, which makes bash
skip it; ``--bashrc`` keeps it. Prints a table and writes bench/results/fanout.json
(fanout-bashrc.json with --bashrc). Needs root (sshd logs in as root).

    python bench/fanout.py [--hosts 10,50,100] [--repeat 3] [--bashrc]
                           [--ansible /tmp/ansible-venv/bin/ansible-playbook]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import socket
import statistics
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

from stapctl.agent import BOOTSTRAP, AgentHost
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


def start_targets(base: Path, count: int, bashrc: bool) -> Sshds:
    """``count`` sshd processes; SHLVL=1 makes bash skip root's ~/.bashrc (module doc)."""
    try:
        return start_sshds(base, count, "" if bashrc else "SetEnv SHLVL=1\n")
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
    """Where stapctl keeps its agent on these targets (they are this machine, as root)."""
    return AgentHost(LocalConnection(Host(name="here", address="local"), ConnectOptions())).path


def bare_paramiko(lab: Sshds, targets: list[Target], run_agent: bool) -> int:
    """Connect, SFTP put, run one command, read its output; returns how many succeeded.

    The command is stapctl's own last step, the agent's preflight (``run_agent``), or
    ``sha256sum`` of the upload: the transport alone, with no Python started remotely.
    """

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
            if not run_agent:
                _, out, _ = client.exec_command(f"sha256sum {target.remote}")
                return out.read().decode().split()[0] == sha256
            stdin, out, _ = client.exec_command(
                f"python3 -I -c {shlex.quote(BOOTSTRAP)} {agent_path()}")
            stdin.write(json.dumps({"protocol": 1, "action": "preflight",
                                    "module": target.remote, "sha256": sha256,
                                    "module_name": "stapctl_bench"}) + "\n")
            stdin.channel.shutdown_write()
            return b'"preflight-refused"' in out.read()
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        return sum(pool.map(one, targets))


def stapctl_fleet(lab: Sshds, targets: list[Target]) -> int:
    """Session.connect + Session.run(check=True); returns how many reached the preflight."""
    probe = Probe(name="bench", template="", origin="bench", first_line=1)
    manifest = Manifest(path=Path("bench.yaml"), name="bench", probes=(probe,),
                        strategy=Strategy(forks=len(targets), connect_timeout=60))
    hosts = [Host(name=t.name, address="127.0.0.1", port=t.port, user="root",
                  key_file=str(lab.client_key), known_hosts=str(lab.known_hosts)) for t in targets]
    jobs = []
    for target in targets:
        spec = ModuleSpec(script=target.name, release="bench", arch="x86_64")
        sha256 = hashlib.sha256(target.payload.read_bytes()).hexdigest()
        jobs.append(ModuleJob(probe=probe, spec=spec, hosts=(target.name,),
                              artifact=ModuleArtifact(spec.key, target.payload, sha256,
                                                      "stapctl_bench")))
    session = Session(manifest, hosts, options=RunOptions(check=True), record=False)
    try:
        session.connect()
        session.run(Plan(jobs=tuple(jobs)))
    finally:
        run = session.finish()
    return sum(o.kind == FailureKind.PREFLIGHT_REFUSED for o in run.outcomes)


def ansible(lab: Sshds, targets: list[Target], playbook_bin: str, work: Path) -> int:
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
    result = subprocess.run([playbook_bin, "-i", str(work / "inventory.yaml"), "-f",
                             str(len(targets)), str(work / "play.yaml")],
                            capture_output=True, text=True, env=env, check=False)
    ok = sum(1 for line in result.stdout.splitlines()
             if " : ok=2 " in line and "failed=0" in line and "unreachable=0" in line)
    if ok != len(targets):
        print(result.stdout[-3000:], result.stderr[-3000:])
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


def timed(run: Callable[[], int], expected: int, label: str) -> float:
    started = time.perf_counter()
    done = run()
    elapsed = time.perf_counter() - started
    if done != expected:
        raise SystemExit(f"{label}: only {done} of {expected} targets did the work")
    return elapsed


COLUMNS = ("floor", "paramiko", "stapctl", "ansible")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="10,50,100")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ansible", default=shutil.which("ansible-playbook") or
                        "/tmp/ansible-venv/bin/ansible-playbook")
    parser.add_argument("--bashrc", action="store_true",
                        help="let each SSH session run ~/.bashrc (see the module's doc)")
    args = parser.parse_args()
    counts = [int(n) for n in args.hosts.split(",")]
    with_ansible = Path(args.ansible).exists()
    if not with_ansible:
        print(f"{args.ansible} not found: Ansible is left out")
    rows = []
    with tempfile.TemporaryDirectory(prefix="stapctl-fanout-") as tmp:
        work = Path(tmp)
        lab = start_targets(work, -(-max(counts) // TARGETS_PER_SSHD), args.bashrc)
        try:
            # the agent is shipped once per host and kept: measure the steady state
            stapctl_fleet(lab, make_targets(lab, 1, work / "warm", "stapctl"))
            print("hosts  floor(sha256sum)  paramiko(agent)  stapctl  ansible   "
                  "stapctl/paramiko  stapctl/floor  ansible/stapctl", flush=True)
            for n in counts:
                runs: dict[str, Callable[[list[Target]], int]] = {
                    "floor": lambda t: bare_paramiko(lab, t, run_agent=False),
                    "paramiko": lambda t: bare_paramiko(lab, t, run_agent=True),
                    "stapctl": lambda t: stapctl_fleet(lab, t),
                    "ansible": lambda t: ansible(lab, t, args.ansible, work),
                }
                times: dict[str, list[float]] = {tool: [] for tool in COLUMNS}
                for round_ in range(args.repeat):
                    clean_remote()
                    for tool, run in runs.items():
                        if tool == "ansible" and (not with_ansible or round_ > 0):
                            continue  # slow: once is enough to compare
                        targets = make_targets(lab, n, work / f"r{n}-{round_}", tool)
                        forget_modules(targets)
                        times[tool].append(timed(lambda r=run, t=targets: r(t), n, tool))
                        forget_modules(targets)
                median = {tool: statistics.median(ts) for tool, ts in times.items() if ts}
                row: dict[str, object] = {
                    "hosts": n, "payload_bytes": PAYLOAD, "repeat": args.repeat,
                    "bashrc": args.bashrc, "seconds": times, "median_s": median,
                    "stapctl_over_paramiko": median["stapctl"] / median["paramiko"],
                    "stapctl_over_floor": median["stapctl"] / median["floor"],
                    "ansible_over_stapctl": median["ansible"] / median["stapctl"]
                    if "ansible" in median else None,
                }
                rows.append(row)
                ansible_s = f"{median['ansible']:6.2f}s" if "ansible" in median else "     -"
                over = (f"{median['ansible'] / median['stapctl']:14.1f}x"
                        if "ansible" in median else "             -")
                print(f"{n:5d}  {median['floor']:15.2f}s  {median['paramiko']:14.2f}s  "
                      f"{median['stapctl']:6.2f}s  {ansible_s}  "
                      f"{median['stapctl'] / median['paramiko']:15.2f}x  "
                      f"{median['stapctl'] / median['floor']:12.2f}x  {over}", flush=True)
        finally:
            lab.stop()
            shutil.rmtree(REMOTE_DIR, ignore_errors=True)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    path = out / ("fanout-bashrc.json" if args.bashrc else "fanout.json")
    path.write_text(json.dumps(rows, indent=2))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
