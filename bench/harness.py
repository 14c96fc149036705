"""bench/run: stapctl head to head with stap --remote, staprun, a bare paramiko pool and
Ansible, in one invocation; writes bench/RESULTS.md (--quick: bench/RESULTS-quick.md;
see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import cache, partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.loopback_sshd: the loopback SSH servers

import fanout  # noqa: E402
import guests  # noqa: E402
import plan  # noqa: E402
import platformdirs  # noqa: E402
import throughput  # noqa: E402
from measure import Figure, Timing, figure, run  # noqa: E402

from stapctl import lab as stapctl_lab  # noqa: E402
from stapctl.agent import AgentRequest, agent_argv  # noqa: E402
from stapctl.cache import cache_dir  # noqa: E402
from stapctl.models import Host  # noqa: E402
from tests.loopback_sshd import free_port  # noqa: E402

SECTIONS = ("hello", "exec", "throughput", "syscalls", "fanout", "thousand", "plan",
            "behaviour")
QUICK_SECTIONS = ("hello", "exec", "throughput", "fanout")  # those with a target
RESULTS = REPO / "bench" / "RESULTS.md"
QUICK_RESULTS = REPO / "bench" / "RESULTS-quick.md"  # a quick run leaves the full one be


@dataclass(frozen=True)
class Mode:
    runs: int  # runs per figure (medians over these)
    lines: int  # throughput: lines per run
    fanout: tuple[int, ...]  # N loopback targets
    ansible: tuple[int, ...]  # the N Ansible runs at (once each: it is slow)
    forks: int  # hosts worked on at once, the same for every fan-out contender
    runs_at_1000: int  # fan-out runs at N = 1000 (each takes about a minute)
    # the sections without a target (syscalls, behaviour, 1,000-host apply, plan) and the
    # measures that only bound a target (the hello floor, the libraries' import, the link)
    full: bool


# what a run needs before its first host: click reads the command line, yaml the manifest,
# rich shows the phase, paramiko connects
LIBRARIES = "import click, yaml, rich.console, paramiko"


# quick: the fan-out at N = 100 alone; N = 1000 (about 90 s for its two runs on a machine of
# 2 cores) is the full run's
QUICK = Mode(runs=3, lines=300_000, fanout=(100,), ansible=(100,), forks=100,
             runs_at_1000=1, full=False)
FULL = Mode(runs=3, lines=500_000, fanout=(10, 100, 1000), ansible=(10, 100, 1000),
            forks=100, runs_at_1000=1, full=True)


@dataclass
class Verdict:
    """One line of the quick summary: the ratio, its target, and whether it is met."""

    name: str
    ratio: float
    target: float
    note: str = ""
    bound: tuple[float, str] | None = None  # a ratio measured in the same run that
    # bounds this one from below, and what it is (RESULTS.md shows it under the targets)

    @property
    def ok(self) -> bool:
        return self.ratio <= self.target and "lost" not in self.note

    def line(self) -> str:
        return (f"{self.name}: ratio={self.ratio:.2f} target<={self.target:.2f} "
                f"{'ok' if self.ok else 'short'}")


@dataclass
class Report:
    sections: list[str] = field(default_factory=list)
    commands: dict[str, str] = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)
    places: dict[str, str] = field(default_factory=dict)  # path → how RESULTS.md names it

    def command(self, label: str, argv: list[str]) -> None:
        text = shlex.join(argv)
        for path, name in sorted(self.places.items(), key=lambda p: -len(p[0])):
            text = text.replace(path, name)
        self.commands.setdefault(label, text)

    def table(self, title: str, head: list[str], rows: list[list[str]], note: str = "") -> None:
        lines = [f"## {title}", "", *([note, ""] if note else []),
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        self.sections.append("\n".join(lines) + "\n")
        print(self.sections[-1], flush=True)


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def alternate(runs: int, contenders: dict[str, Callable[[], Any]]) -> dict[str, list[Any]]:
    """Each contender ``runs`` times, in an order that rotates from round to round."""
    names = list(contenders)
    results: dict[str, list[Any]] = {name: [] for name in names}
    for round_ in range(runs):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(contenders[name]())
    return results


def checked(timing: Timing, label: str, wanted_lines: int | None = None) -> Timing:
    if timing.returncode != 0 or (wanted_lines is not None and len(timing.stdout) <
                                  wanted_lines):
        tail = "\n".join(line for _, line in timing.stderr[-15:])
        raise SystemExit(f"{label} failed (exit {timing.returncode}):\n{tail}")
    return timing


# -- the comparisons ---------------------------------------------------------------------
def hello(report: Report, lab: guests.Guests, mode: Mode, work: Path) -> None:
    script = work / "hello.stp"
    script.write_text(guests.HELLO)
    one, three = lab.hosts[:1], lab.hosts
    ko = place_module(lab, guests.HELLO, "hello") if mode.full else ""
    tools: dict[str, tuple[str, Callable[[list[Host]], Timing]]] = {
        "stapctl": ("stapctl apply", lab.stapctl_hello),
        "stap": ("stap --remote", partial(lab.stap_remote, script)),
        **({"floor": ("bench/floor.py", partial(lab.floor, ko))} if ko else {}),
    }

    def contender(label: str, tool: Callable[[list[Host]], Timing],
                  hosts: list[Host]) -> Callable[[], Timing]:
        return lambda: checked(tool(hosts), label, len(hosts))

    contenders = {f"{name} {len(hosts)}": contender(label, tool, hosts)
                  for hosts in (one, three) for name, (label, tool) in tools.items()}
    say("hello: a first run of each tool compiles what it needs")
    contenders["stapctl 1"]()
    contenders["stap 1"]()
    say(f"hello: {mode.runs} runs each, alternating")
    try:
        results = alternate(mode.runs, contenders)
    finally:
        if ko:
            remove_module(lab, ko)
    for name, timings in results.items():
        report.command(f"hello, {name} guest(s)", timings[0].argv)
    rows = []
    last: dict[str, Figure] = {}
    guest_cpu: dict[str, Figure] = {}
    for name, timings in results.items():
        last[name] = figure([t.last_line for t in timings])
        guest_cpu[name] = figure([t.watched_cpu for t in timings])
        rows.append([name, last[name].show(), figure([t.wall for t in timings]).show(),
                     figure([t.cpu for t in timings]).show(), guest_cpu[name].show()])
    report.table("1. Hello world, module already compiled",
                 ["tool, guests", "to the last line", "to exit", "controller CPU",
                  "guests' CPU"], rows,
                 "`stapctl apply playbooks/hello.yaml` against `stap --remote=ssh://…` "
                 "(one --remote per guest). `floor` (full run): bench/floor.py, the least a "
                 "Python tool on paramiko can do (paramiko alone, every guest at once, the "
                 "guest's own `staprun` of the same module, no agent). Seconds from the "
                 "process's start; the guests' CPU is their qemu processes' (SSH, the "
                 "tool's target side, the module), start to exit.")
    for n in ("1", "3"):
        report.verdicts.append(Verdict(
            f"hello_{n}_guests_stapctl_over_stap_remote",
            last[f"stapctl {n}"].median / last[f"stap {n}"].median, 0.6 if n == "3" else 1.0,
            bound=(last[f"floor {n}"].median / last[f"stap {n}"].median,
                   "bench/floor.py over stap --remote, to the last line: paramiko alone "
                   "connecting to every guest at once and running their own staprun, with "
                   f"the guests sharing this machine's {os.cpu_count()} cores")
            if ko else None))
    started = figure([t.first_stderr("connecting") for t in results["stapctl 1"]])
    rows = [["process start → \"connecting to 1 host(s)\" (warm cache, 1 guest)",
             started.show()]]
    bound = None
    if mode.full:
        libraries = figure([checked(run([sys.executable, "-c", LIBRARIES]), LIBRARIES).wall
                            for _ in range(mode.runs)])
        rows.append([f"`python3 -c '{LIBRARIES}'`, start to exit", libraries.show()])
        bound = (libraries.median / 0.3, "Python importing the four libraries of the design "
                                         "card that a run needs before its first host (the "
                                         "command line, the manifest, the screen, SSH), over "
                                         "0.3 s")
    report.table("Warm start-up", ["measure", "seconds"], rows)
    report.verdicts.append(Verdict("warm_start_first_host_over_0.3s", started.median / 0.3,
                                   1.0, bound=bound))


def place_module(lab: guests.Guests, script: str, origin: str) -> str:
    """The script's module at one path on every guest, named as staprun wants it (after
    the module); that path. The guests run one kernel, so one module serves them all."""
    paths = set()
    for host in lab.hosts:
        connection = lab.connect(host)
        try:
            paths.add(guests.module_on(connection, script, origin).ko)
        finally:
            connection.close()
    if len(paths) != 1:
        raise SystemExit(f"bench/run needs guests of one kernel; their modules: {sorted(paths)}")
    return paths.pop()


def remove_module(lab: guests.Guests, path: str) -> None:
    for host in lab.hosts:
        connection = lab.connect(host)
        try:
            guests.shell(connection, f"rm -f {path}")
        finally:
            connection.close()


def exec_to_loaded(report: Report, lab: guests.Guests, mode: Mode) -> None:
    """From exec to the module in /sys/module, in the guest: staprun vs stapctl's agent."""
    host = lab.hosts[0]
    connection = lab.connect(host)
    try:
        module = guests.module_on(connection, guests.HELLO, "hello")
        name = module.artifact.module_name
        request = AgentRequest(action="run", module=module.path, sha256=module.artifact.sha256,
                               module_name=name).encode().decode().strip()
        contenders: dict[str, Callable[[], float]] = {
            "staprun": lambda: guests.loaded_after(connection, name, "",
                                                   ["staprun", module.ko]),
            "stapctl agent": lambda: guests.loaded_after(
                connection, name, request,
                agent_argv("python3", module.agent.path, loads=True)),  # as AgentHost.call does
            # the agent is a Python program: the interpreter's start alone, exec to exit
            "python3 -I -S -c pass": lambda: guests.exec_to_exit(
                connection, ["python3", "-I", "-S", "-c", "pass"])[0],
        }
        for contender in contenders.values():
            contender()  # the agent's bytecode, the guest's page cache
        results = alternate(mode.runs, contenders)
        guests.shell(connection, f"rm -f {module.ko}")
    finally:
        connection.close()
    figures = {name: figure(values) for name, values in results.items()}
    report.table("Exec to module loaded, in the guest",
                 ["tool", "exec → /sys/module/NAME appears"],
                 [[name, f.show()] for name, f in figures.items()],
                 "The same hello module; a stopwatch in the guest polls /sys/module every "
                 "millisecond from the tool's exec for a new entry named like the module "
                 "(the agent renames it as staprun -R does). `python3 -I -S -c pass`: the "
                 "same kind of stopwatch, exec to exit.")
    staprun = figures["staprun"].median
    report.verdicts.append(Verdict(
        "agent_exec_to_loaded_over_staprun", figures["stapctl agent"].median / staprun, 1.2,
        bound=(figures["python3 -I -S -c pass"].median / staprun,
               "the guest's python3 starting and exiting, doing nothing, over staprun's exec "
               "to loaded: the agent is a Python program")))


def output_throughput(report: Report, lab: guests.Guests, mode: Mode) -> None:
    connection = lab.connect(lab.hosts[0])
    rows = []
    try:
        for text in ("fixed", "random"):
            say(f"throughput: {text} text, {mode.lines} lines, {mode.runs} rounds")
            rates = throughput.measure(connection, text, mode.lines, mode.runs,
                                       link=mode.full)
            medians = {}
            for tool, got in rates.items():
                medians[tool] = figure(got["lines_per_s"])
                shown = "SSH link alone" if tool == "link" else tool
                rows.append([text, shown, medians[tool].show("", 0),
                             "–" if tool == "link" else str(got["lost"])])
            lost = sum(rates["stapctl"]["lost"]) + sum(rates["staprun"]["lost"])
            report.verdicts.append(Verdict(
                f"throughput_{text}_staprun_over_stapctl",
                medians["staprun"].median / medians["stapctl"].median, 1 / 0.9,
                f"lost {lost}" if lost else "",
                # fixed text crosses compressed 29:1: the link is no bound of it
                bound=(medians["staprun"].median / medians["link"].median,
                       "staprun's rate over the SSH link's own (as many bytes of zeros, "
                       "no probe, no agent): output that does not compress at least 2:1 "
                       "goes over SSH as it is") if text == "random" and mode.full else None))
    finally:
        connection.close()
    report.table("3. Output throughput of a print-heavy probe", [
        "text", "tool", "lines/s", "records lost per run"], rows,
        f"{mode.lines} lines of 80 bytes, 100 every 100 µs, the same .ko: "
        "`staprun -o /dev/null` in the guest vs stapctl end to end (agent, SSH, "
        "controller); start-up and unload time subtracted (bench/throughput.py). The SSH "
        "link alone: `head -c` of as many bytes (zeros) over the same connection, read by "
        "the controller, its start subtracted the same way.")


def syscalls(report: Report, lab: guests.Guests, mode: Mode, work: Path) -> None:
    script = work / "syscalls.stp"
    script.write_text(guests.SYSCALLS)
    # a run that fails (stap's overload check, a lost host) is a result here, not an error
    contenders: dict[str, Callable[[], Timing]] = {
        "stapctl": lambda: lab.stapctl_run(script, lab.hosts),
        "stap --remote": lambda: lab.stap_remote(script, lab.hosts),
    }
    say("syscalls: a first run of each compiles what it needs")
    for name, contender in contenders.items():
        report.command(f"5 s system-call probe, {name}", contender().argv)
    results = alternate(mode.runs, contenders)
    rows = []
    failed = [f"run {n}: " + "; ".join(guests.failures(t))
              for n, t in enumerate(results["stapctl"], 1) if t.returncode != 0]
    for name, timings in results.items():
        if name == "stapctl":
            parsed = [guests.stapctl_output(t) for t in timings]
            lines = [len(p[0]) for p in parsed]
            lost = [p[1] for p in parsed]
            first = [p[2] for p in parsed]
        else:
            lines = [len(t.stdout) for t in timings]
            lost = [guests.stap_lost(t) for t in timings]
            first = [t.first_line for t in timings]
        rows.append([name, figure(lines).show("", 0), str(lost), figure(first).show(),
                     figure([t.wall for t in timings]).show(),
                     str([t.returncode for t in timings])])
    report.table("2. A 5-second system-call probe on 3 guests",
                 ["tool", "lines gathered", "records lost per run", "start → first line",
                  "to exit", "exit codes"], rows,
                 "`probe kernel.trace(\"raw_syscalls:sys_enter\")` printing one line per call "
                 "on every guest (the readers' own calls included), `timer.s(5)` exits."
                 + "".join(f"\n\nstapctl, {line}" for line in failed))


def fan_out(report: Report, mode: Mode, work: Path) -> None:
    count = max(mode.fanout)
    sshds = fanout.start_targets(work, count)
    (work / "targets.json").write_text(json.dumps({
        "ports": sshds.ports, "client_key": str(sshds.client_key),
        "known_hosts": str(sshds.known_hosts)}))
    rows = []
    try:
        warm = one_fanout("stapctl", 1, mode.forks, work)  # the agent shipped, as on a fleet
        if warm["done"] != 1:
            raise SystemExit(f"stapctl did not reach the loopback target: {warm}")
        for n in mode.fanout:
            contenders: dict[str, Callable[[], dict[str, Any]]] = {
                tool: partial(one_fanout, tool, n, mode.forks, work)
                for tool in ("stapctl", "paramiko")}
            runs = mode.runs_at_1000 if n >= 1000 else mode.runs
            say(f"fan-out: N={n}, {runs} runs each")
            results = alternate(runs, contenders)
            if n in mode.ansible:
                say(f"fan-out: N={n}, Ansible once")
                results["ansible"] = [one_fanout("ansible", n, mode.forks, work)]
            seconds = {tool: figure([r["seconds"] for r in got]) for tool, got in results.items()}
            for tool, got in results.items():
                rows.append([str(n), tool, seconds[tool].show(),
                             figure([r["peak_rss_mb"] for r in got]).show(" MB", 0),
                             figure([r["peak_fds"] for r in got]).show("", 0),
                             f"{min(r['done'] for r in got)}/{n}"])
            if n >= 100:
                report.verdicts.append(Verdict(f"fanout_{n}_stapctl_over_paramiko",
                                               seconds["stapctl"].median /
                                               seconds["paramiko"].median, 1.3))
                if "ansible" in seconds:
                    report.verdicts.append(Verdict(f"fanout_{n}_stapctl_over_ansible",
                                                   seconds["stapctl"].median /
                                                   seconds["ansible"].median, 0.1))
    finally:
        sshds.stop()
        fanout.clean_remote()
    report.command("fan-out, each contender (TOOL: stapctl, paramiko, ansible)", [
        sys.executable, str(REPO / "bench" / "fanout.py"), "TOOL", "N", str(mode.forks),
        str(work)])
    report.table("4. Fan-out on N loopback SSH targets", [
        "N", "tool", "seconds", "controller peak RSS", "peak open descriptors", "did the work"],
        rows,
        f"Connect, upload 300 KB, run the agent's preflight (Ansible: copy + sha256sum); "
        f"{mode.forks} hosts at once for every tool, {fanout.TARGETS_PER_SSHD} names per "
        "sshd, each contender a process of its own with the default descriptor limit "
        "(1024); RSS and descriptors summed over its process tree (ssh children "
        "included), sampled every 50 ms (bench/fanout.py).")


def one_fanout(tool: str, count: int, forks: int, work: Path) -> dict[str, Any]:
    fanout.clean_remote()
    timing = run([sys.executable, str(REPO / "bench" / "fanout.py"), tool, str(count),
                  str(forks), str(work)], sample_tree=True, timeout=1800)
    last = timing.stdout[-1][1] if timing.stdout else ""
    if timing.returncode != 0 or not last.startswith("{"):
        tail = "\n".join(line for _, line in timing.stderr[-20:])
        return {"done": 0, "seconds": timing.wall, "peak_rss_mb": timing.peak_rss_mb,
                "peak_fds": timing.peak_fds, "error": tail}
    return {**json.loads(last), "peak_rss_mb": timing.peak_rss_mb,
            "peak_fds": timing.peak_fds}


def thousand_hosts(report: Report, work: Path) -> None:
    sshds = fanout.start_targets(work, 1000)
    (work / "targets.json").write_text(json.dumps({
        "ports": sshds.ports, "client_key": str(sshds.client_key),
        "known_hosts": str(sshds.known_hosts)}))
    try:
        say("1,000 hosts: one apply, every host at once")
        result = one_fanout("apply", 1000, 1000, work)
    finally:
        sshds.stop()
        fanout.clean_remote()
    report.table("1,000 hosts on one controller", [
        "hosts", "forks", "outcomes recorded", "seconds", "peak RSS", "peak descriptors",
        "descriptor limit"], [[
            "1000", "1000", f"{result['done']}/1000", f"{result['seconds']:.1f}",
            f"{result['peak_rss_mb']:.0f} MB", str(result["peak_fds"]), "1024"]],
        "A full run (not --check) over 1,000 names on 40 loopback sshds; every host's "
        "preflight refuses (this machine loads no modules) and that outcome is recorded "
        "in the run's record. " + (f"Failed: {result.get('error', '')[-300:]}"
                                   if result["done"] != 1000 else ""))


def planning(report: Report) -> None:
    say("planning and compiling: N hosts over K kernels")
    rows = plan.measure([10, 100, 1000])
    report.table("5. Planning and compiling N hosts over K kernels", [
        "N", "K", "modules", "cache", "plan (s)", "build (s)", "errors"],
        [[str(r["hosts"]), str(r["kernels"]), str(r["modules"]), str(r["cache"]),
          str(r["plan_s"]), str(r["build_s"]), str(len(r["errors"]))]  # type: ignore[arg-type]
         for r in rows],
        "A new script each K, so its first N is a cold build; facts supplied, no host "
        "contacted (bench/plan.py).")


def behaviour(report: Report, lab: guests.Guests, work: Path) -> None:
    rows = []
    host = lab.hosts[:1]
    for name, text in guests.EXAMPLES.items():
        script = work / f"{name}.stp"
        script.write_text(text)
        ours = lab.stapctl_run(script, host)
        theirs = lab.stap_remote(script, host)
        report.command(f"example {name}, stapctl", ours.argv)
        report.command(f"example {name}, stap --remote", theirs.argv)
        same = guests.stapctl_output(ours)[0] == theirs.lines()
        verdict = ("same" if same else "DIFFERENT") if theirs.returncode == 0 and \
            theirs.stdout else f"stap exit {theirs.returncode}, no output"
        rows.append([name, str(len(theirs.stdout)), verdict])
    report.table("Behaviour: the same scripts through both tools", [
        "script", "lines", "stapctl vs stap --remote"], rows,
        "Deterministic example scripts (bench/guests.py EXAMPLES) on one guest; "
        "stapctl's output lines against stap's, line by line.")

    hello = work / "hello.stp"
    hello.write_text(guests.HELLO)
    down = work / "with-down.yaml"
    port = free_port()  # nothing listens there
    down.write_text((Path(os.environ["STAPCTL_LAB_DIR"]) / "inventory.yaml").read_text()
                    .rstrip() + f"\n    down-1:\n      ansible_host: 127.0.0.1\n"
                    f"      ansible_port: {port}\n")
    with (work / "ssh_config").open("a") as config:
        config.write(f"Host stapctl-bench-down-1\n  HostName 127.0.0.1\n  Port {port}\n"
                     "  BatchMode yes\n")
    ours = run([guests.STAPCTL, "run", "all", "-i", str(down), "--format", "json",
                str(hello)])
    theirs = lab.stap_remote(hello, [*lab.hosts, Host(name="down-1", address="127.0.0.1")])
    rows = [["stapctl", ", ".join(f"{h}: {s}" for h, s in guests.outcome_statuses(ours)
                                  .items()), str(len(guests.stapctl_output(ours)[0]))],
            ["stap --remote", f"exit {theirs.returncode}", str(len(theirs.stdout))]]

    victim = lab.hosts[-1]
    pid = lab.pids[victim.name]
    os.kill(pid, signal.SIGSTOP)
    try:
        hung = run([guests.STAPCTL, "run", ",".join(h.name for h in lab.hosts), "--format",
                    "json", str(hello)], timeout=300)
        stuck = lab.stap_remote(hello, lab.hosts, timeout=60)
    finally:
        os.kill(pid, signal.SIGCONT)
    rows += [[f"stapctl, {victim.name} hung (SIGSTOP)", ", ".join(
        f"{h}: {s}" for h, s in guests.outcome_statuses(hung).items()) +
        f"; ended after {hung.wall:.1f} s", str(len(guests.stapctl_output(hung)[0]))],
        [f"stap --remote, {victim.name} hung", f"exit {stuck.returncode} after "
         f"{stuck.wall:.1f} s" + (" (killed at the bench's 60 s limit)" if stuck.timed_out
                                  else ""), str(len(stuck.stdout))]]
    report.table("Behaviour: a guest down, a guest hung", [
        "run", "outcome", "hello lines"], rows,
        "Down: the 3 guests plus a fourth name whose port nothing listens on. Hung: the "
        "third guest's qemu stopped with SIGSTOP for the run (SIGCONT after).")


# -- the report --------------------------------------------------------------------------
def machine(lab: guests.Guests) -> str:
    cores = os.cpu_count()
    memory = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text()
                  .splitlines() if line.startswith("MemTotal:"))
    qemu = Path(f"/proc/{next(iter(lab.pids.values()))}/cmdline").read_bytes().split(b"\0")
    accel = "KVM" if b"kvm" in b" ".join(qemu) else "TCG"
    version = subprocess.run(["stap", "-V"], capture_output=True, text=True, check=False)
    stap = (version.stdout + version.stderr).splitlines()[0]
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    return (f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; stapctl commit {commit}\n"
            f"- machine: {cores} cores, {memory / 1024 / 1024:.1f} GiB memory, "
            f"{platform.machine()}, Python {platform.python_version()}; guests under qemu "
            f"{accel}, 3 guests of kernel {guest_release(lab)}\n"
            f"- {stap}\n")


def guest_release(lab: guests.Guests) -> str:
    connection = lab.connect(lab.hosts[0])
    try:
        return guests.shell(connection, "uname -r").strip()
    finally:
        connection.close()


def bounds(verdicts: list[Verdict]) -> str:
    """What holds back the targets not met, as measured in the same run."""
    short = [(v.name, v.bound) for v in verdicts if not v.ok and v.bound]
    if not short:
        return ""
    return ("What holds the short ones back, measured in this run (a ratio near or past "
            "the target says the target is out of reach on these guests):\n\n"
            + "".join(f"- {name}: {ratio:.2f}, {what}\n" for name, (ratio, what) in short)
            + "\n")


def write_results(report: Report, header: str, mode: Mode, seconds: float) -> None:
    commands = "\n".join(f"- {label}: `{text}`" for label, text in report.commands.items())
    (RESULTS if mode.full else QUICK_RESULTS).write_text(
        "# stapctl against its peers\n\nWritten by `bench/run` (bench/README.md says what "
        "each figure is). Each figure: the median over the runs, (min–max).\n\n"
        f"{header}- runs per figure: {mode.runs} ({mode.runs_at_1000} at N = 1000); throughput "
        f"{mode.lines} lines a run; "
        f"fan-out N = {', '.join(map(str, mode.fanout))} (Ansible once at N = "
        f"{', '.join(map(str, mode.ansible))}); the whole run took {seconds / 60:.1f} min\n\n"
        "## Targets\n\n```\n" + "\n".join(v.line() for v in report.verdicts) + "\n```\n\n"
        + bounds(report.verdicts) + "\n".join(report.sections)
        + "\n## Commands\n\n" + commands + "\n\n"
        "$LAB is the lab's folder (`stapctl lab status`), $WORK the harness's temporary "
        "folder; `ssh` on stap's PATH is a wrapper adding `-F $WORK/ssh_config` (the "
        "lab's key and known_hosts).\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="at most 5 minutes: the comparisons that have targets")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3)")
    parser.add_argument("--only", help="these sections alone, comma-separated (of "
                        f"{', '.join(SECTIONS)}); printed, no results file written")
    args = parser.parse_args()
    only = args.only.split(",") if args.only else []
    if unknown := set(only) - set(SECTIONS):
        parser.error(f"no section {', '.join(sorted(unknown))}: say one of "
                     f"{', '.join(SECTIONS)}")
    mode = QUICK if args.quick else FULL
    if args.runs:
        mode = replace(mode, runs=args.runs)
    started = time.monotonic()
    stap_dir = Path(os.environ.get("STAPCTL_BENCH_DIR")
                    or platformdirs.user_cache_dir("stapctl-bench")) / "stap"
    report = Report()
    # a user's install keeps its bytecode: every contender runs as it would there, even
    # where the environment asks Python not to write bytecode
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    # runs go to a history of the benchmark's own, not the user's; the lab stays where it is
    os.environ["STAPCTL_LAB_DIR"] = str(stapctl_lab.Lab.default().directory)
    with tempfile.TemporaryDirectory(prefix="stapctl-bench-") as tmp:
        work = Path(tmp)
        os.environ["XDG_DATA_HOME"] = str(work / "data")
        for sub in ("fanout", "thousand"):
            (work / sub).mkdir()
        report.places = {str(work): "$WORK", str(REPO) + "/": "", str(Path(sys.executable)
                         .parent) + "/": ".venv/bin/",
                         os.environ["STAPCTL_LAB_DIR"]: "$LAB",
                         str(cache_dir()): "$STAPCTL_CACHE_DIR"}

        @cache
        def lab() -> guests.Guests:  # the fan-out and planning sections need no lab
            return guests.Guests.find(work, stap_dir)

        header = "" if only else machine(lab())
        sections: dict[str, Callable[[], None]] = {
            "hello": lambda: hello(report, lab(), mode, work),
            "exec": lambda: exec_to_loaded(report, lab(), mode),
            "throughput": lambda: output_throughput(report, lab(), mode),
            "syscalls": lambda: syscalls(report, lab(), mode, work),
            "fanout": lambda: fan_out(report, mode, work / "fanout"),
            "thousand": lambda: thousand_hosts(report, work / "thousand"),
            "plan": lambda: planning(report),
            "behaviour": lambda: behaviour(report, lab(), work),
        }
        chosen = only or [name for name in SECTIONS if mode.full or name in QUICK_SECTIONS]
        for name in chosen:
            section = sections[name]
            try:
                section()
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - said in RESULTS.md
                say(f"a section failed: {exc}")
                report.sections.append(f"## A section failed\n\n```\n{exc}\n```\n")
                report.verdicts.append(Verdict("section_failed", 1.0, 0.0))
    if not only:
        write_results(report, header, mode, time.monotonic() - started)
    for verdict in report.verdicts:
        print(verdict.line())
    sys.exit(0 if all(v.ok for v in report.verdicts) else 1)


if __name__ == "__main__":
    main()
