"""The contenders on the lab's guests: `stapctl` against `stap --remote=ssh://` (stapsh
and staprun on the guest, from systemtap-runtime), each run as a user would type it.

stap --remote runs the `ssh` it finds on PATH; a wrapper ahead on PATH gives it the lab's
key and known_hosts (an ssh config file of the benchmark's own), nothing else.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from measure import Timing, run

from stapctl import lab
from stapctl.agent import AgentHost, AgentRequest
from stapctl.build import Builder
from stapctl.cache import cache_dir
from stapctl.connection import Connection, ConnectOptions, connect
from stapctl.models import Host, ModuleArtifact
from stapctl.report import printable

STAPCTL = str(Path(sys.executable).parent / "stapctl")
FLOOR = Path(__file__).with_name("floor.py")
REPO = Path(__file__).resolve().parents[1]
HELLO_PLAYBOOK = REPO / "playbooks" / "hello.yaml"
HELLO = 'probe oneshot { printf("hello, world!\\n") }\n'
SYSCALLS = """probe kernel.trace("raw_syscalls:sys_enter") {
  printf("%d %s %d\\n", pid(), execname(), $id)
}
probe timer.s(5) { exit() }
"""
# Scripts whose output is the same on every run: the behaviour check compares the two
# tools' outputs line by line.
EXAMPLES = {
    "hello": HELLO,
    "aggregates": """probe oneshot {
  for (i = 1; i <= 1000; i++) s <<< i * i
  printf("count %d sum %d min %d max %d avg %d\\n", @count(s), @sum(s), @min(s), @max(s), @avg(s))
  print(@hist_log(s))
}
global s
""",
    "strings": """probe oneshot {
  printf("%-10s|%10s|%x|%o|%c|%5.2s|\\n", "left", "right", 3054, 8, 65, "truncated")
  printf("%s %s %d\\n", substr("systemtap", 6, 3), str_replace("a-b-c", "-", "+"), strlen("x"))
  printf("%s\\n", sprintf("%08d", 42))
}
""",
    "arrays": """global squares
probe oneshot {
  for (i = 0; i < 20; i++) squares[i % 7, i] = i * i
  foreach ([k, i] in squares- limit 5) printf("%d %d %d\\n", k, i, squares[k, i])
  delete squares[3, 3]
  kept = ([3, 10] in squares)
  gone = ([3, 3] in squares)
  printf("%d %d %d\\n", kept, gone, [3, 17] in squares)
}
""",
}


@dataclass
class Guests:
    """The running lab, and how stap --remote reaches its guests."""

    hosts: list[Host]
    pids: dict[str, int]  # each guest's qemu
    path: str  # PATH with the ssh wrapper first
    stap_dir: Path  # stap --remote's own SYSTEMTAP_DIR

    @classmethod
    def find(cls, work: Path, stap_dir: Path) -> Guests:
        status = lab.Lab.default().status()
        running = [g for g in status.guests if g.state is lab.GuestState.RUNNING]
        if len(running) < 3:
            raise SystemExit("bench/run needs 3 lab guests: stapctl lab up --hosts 3")
        hosts = [status.host(g.name) for g in running[:3]]
        config = work / "ssh_config"
        config.write_text("".join(
            f"Host stapctl-bench-{h.name}\n  HostName {h.address}\n  Port {h.port}\n"
            f"  User {h.user}\n  IdentityFile {h.key_file}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {h.known_hosts}\n  HostKeyAlias [{h.address}]:{h.port}\n"
            "  StrictHostKeyChecking yes\n  BatchMode yes\n" for h in hosts))
        wrapper = work / "bin" / "ssh"
        wrapper.parent.mkdir(exist_ok=True)
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {shlex.quote(str(config))} "$@"\n')
        wrapper.chmod(0o755)
        stap_dir.mkdir(parents=True, exist_ok=True)
        return cls(hosts, {g.name: g.pid for g in running[:3] if g.pid},
                   f"{wrapper.parent}:{os.environ['PATH']}", stap_dir)

    @staticmethod
    def runtime() -> Path | None:
        """The runtime copy stapctl compiles with (for -R), if it needs one: looked up at
        each run, since stapctl makes it at its first compile, which may follow find()."""
        runtimes = sorted((cache_dir() / "runtime").glob("*"))
        return runtimes[-1] if runtimes else None

    def stap_remote(self, script: Path, hosts: list[Host], timeout: float = 300) -> Timing:
        """`stap --remote=ssh://…` once per host, the way a user runs it on several."""
        argv = ["stap", *(f"--remote=ssh://stapctl-bench-{h.name}" for h in hosts)]
        if runtime := self.runtime():
            argv += ["-R", str(runtime)]
        env = dict(os.environ, PATH=self.path, SYSTEMTAP_DIR=str(self.stap_dir))
        return run([*argv, str(script)], env=env, timeout=timeout, watch=self.qemu(hosts))

    def stapctl_run(self, script: Path, hosts: list[Host], *extra: str,
                    timeout: float = 300) -> Timing:
        """`stapctl run` of the same script file, output as JSON lines."""
        return run([STAPCTL, "run", ",".join(h.name for h in hosts), "--format", "json",
                    *extra, str(script)], timeout=timeout)

    def stapctl_hello(self, hosts: list[Host]) -> Timing:
        """The seed's hello world, as the README runs it."""
        return run([STAPCTL, "apply", "--limit", ",".join(h.name for h in hosts),
                    str(HELLO_PLAYBOOK)], watch=self.qemu(hosts))

    def floor(self, ko: str, hosts: list[Host]) -> Timing:
        """bench/floor.py: paramiko alone and the guests' own staprun, on every host at
        once (the lab's guests share one key and one known_hosts)."""
        return run([sys.executable, str(FLOOR), ko, str(hosts[0].key_file),
                    str(hosts[0].known_hosts), *(f"{h.user}@{h.address}:{h.port}" for h in hosts)],
                   watch=self.qemu(hosts))

    def qemu(self, hosts: list[Host]) -> list[int]:
        """The qemu processes of ``hosts``: their CPU is the guests' work."""
        return [self.pids[h.name] for h in hosts if h.name in self.pids]

    def connect(self, host: Host) -> Connection:
        return connect(host, ConnectOptions())


def stapctl_output(timing: Timing) -> tuple[list[str], int, float | None]:
    """Output lines, records lost, and when the first output line came, from --format json."""
    lines: list[str] = []
    lost = 0
    first = None
    for at, raw in timing.stdout:
        if not raw.startswith("{"):
            continue
        record = json.loads(raw)
        if record.get("kind") == "output":
            lines.append(record["text"])
            first = at if first is None else first
        if record.get("type") == "summary":
            for outcome in record["outcomes"]:
                stats = outcome.get("stats") or {}
                lost += stats.get("lost_records", 0) + stats.get("transport_failures", 0)
    return lines, lost, first


def stap_lost(timing: Timing) -> int:
    """Records stap reports lost: its transport failures and lost/skipped warnings."""
    text = "\n".join(line for _, line in timing.stderr)
    return sum(int(n) for n in re.findall(r"There were (\d+) transport failures", text))


def outcomes(timing: Timing) -> list[dict[str, Any]]:
    """The outcomes of a stapctl --format json run, from its summary line."""
    for _, raw in timing.stdout:
        if raw.startswith('{"v": 1, "type": "summary"'):
            found: list[dict[str, Any]] = json.loads(raw)["outcomes"]
            return found
    return []


def outcome_statuses(timing: Timing) -> dict[str, str]:
    """Each host's status in a stapctl --format json run: ok, failed, unreachable…"""
    return {o["host"]: o["status"] + (f" ({o['kind']})" if o.get("kind") else "")
            for o in outcomes(timing)}


def failures(timing: Timing) -> list[str]:
    """Why each host of a stapctl --format json run that did not end ok ended so, on one
    line, made printable (a message can carry what a target sent)."""
    return [printable(f"{o['host']}: {o['status']} ({o.get('kind') or '-'}): "
                      f"{o['message'][:300]}").replace("\n", " ")
            for o in outcomes(timing) if o["status"] != "ok"]


# Times, inside the guest, from a tool's exec to its module appearing in /sys/module:
# the same stopwatch for staprun and for stapctl's agent (argv after the module's name;
# the first argument is a line for the tool's stdin, kept open until the tool ends). The
# agent loads a module under a name of its own (staprun -R's scheme: the name's head, then
# its pid), so any new entry named like the module's head counts; a tool that ends without
# one fails the measure.
LOADED_AFTER = ("python3 -c 'import os, subprocess, sys, time; "
                "head = sys.argv[1][:-8]; before = set(os.listdir(\"/sys/module\")); "
                "t = time.monotonic(); p = subprocess.Popen(sys.argv[3:], stdin=subprocess.PIPE,"
                " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
                "p.stdin.write(sys.argv[2].encode() + b\"\\n\"); p.stdin.flush()\n"
                "new = lambda: any(m.startswith(head) for m in set(os.listdir(\"/sys/module\"))"
                " - before)\n"
                "while not new() and p.poll() is None: time.sleep(0.001)\n"
                "loaded = time.monotonic() - t if p.poll() is None or new() else -1; p.wait(); "
                "print(loaded, p.returncode)'")


# Times, inside the guest, a command from its exec to its exit, its output to /dev/null
# (no SSH round trip counted); the first argument is a line for its stdin, which stays
# open until the command ends. Prints the seconds and the exit code, then its stderr.
EXEC_TO_EXIT = ("python3 -c 'import subprocess, sys, time; t = time.monotonic(); "
                "p = subprocess.Popen(sys.argv[2:], stdin=subprocess.PIPE, "
                "stdout=subprocess.DEVNULL, stderr=subprocess.PIPE); "
                "p.stdin.write(sys.argv[1].encode() + b\"\\n\"); p.stdin.flush(); "
                "err = p.stderr.read(); p.wait(); print(time.monotonic() - t, p.returncode); "
                "sys.stdout.write(err.decode())'")


def exec_to_exit(connection: Connection, argv: list[str], stdin_line: str = "",
                 folder: str = "/tmp") -> tuple[float, int, str]:
    """Seconds from exec to exit of ``argv`` in the guest, its exit code and stderr."""
    out = shell(connection, f"cd {shlex.quote(folder)} && {EXEC_TO_EXIT} "
                            f"{shlex.quote(stdin_line)} {shlex.join(argv)}")
    head, _, stderr = out.partition("\n")
    seconds, code = head.split()
    return float(seconds), int(code), stderr


def loaded_after(connection: Connection, module_name: str, stdin_line: str,
                 argv: list[str]) -> float:
    out = shell(connection, f"{LOADED_AFTER} {shlex.quote(module_name)} "
                            f"{shlex.quote(stdin_line)} {shlex.join(argv)}")
    seconds, code = out.split()[:2]
    if code != "0" or float(seconds) < 0:
        raise SystemExit(f"{argv[0]} failed in the guest or loaded no module: {out}")
    return float(seconds)


def shell(connection: Connection, command: str) -> str:
    process = connection.start(["sh", "-c", command])
    out = b""
    while chunk := process.recv(65536):
        out += chunk
    process.wait()
    return out.decode(errors="replace")


@dataclass
class GuestModule:
    """A script's module in a guest: where a run keeps it, and a copy for staprun."""

    artifact: ModuleArtifact
    agent: AgentHost  # prepared on the guest
    path: str  # in the agent's folder, as a run ships it
    ko: str  # /tmp/NAME.ko: staprun names the module after the file; the caller removes it


def module_on(connection: Connection, script: str, origin: str,
              options: tuple[str, ...] = ()) -> GuestModule:
    """The script's module, built by stapctl for the guest's kernel and shipped as a run
    ships it (with a request, here a preflight, whose refusal on a host that cannot load
    it does not matter), then copied for staprun."""
    release = shell(connection, "uname -r").strip()
    builder = Builder()
    artifact = builder.build(builder.spec(script, release, "x86_64", options, origin=origin))
    agent = AgentHost(connection)
    agent.prepare()
    path, data = agent.module(artifact.path, artifact.sha256)
    if data:
        agent.call(AgentRequest(action="preflight", module=path, sha256=artifact.sha256,
                                module_name=artifact.module_name, module_data=data))
    ko = f"/tmp/{artifact.module_name}.ko"
    shell(connection, f"cp {path} {ko}")
    return GuestModule(artifact, agent, path, ko)
