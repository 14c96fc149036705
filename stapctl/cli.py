"""The command line: the only module that imports click and prints.

Probe output goes to stdout; progress, warnings and the summary go to stderr.
A StapctlError becomes one clean message and its exit code, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, TypeVar

import click
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from stapctl import lab, report
from stapctl.build import Builder, list_cached, prune
from stapctl.errors import Issue, ManifestError, StapctlError
from stapctl.execute import Fleet, RunOptions
from stapctl.inventory import load_inventory
from stapctl.manifest import explain as explain_key
from stapctl.manifest import load_manifest, parse_duration
from stapctl.models import Event, Host, HostOutcome, Manifest, Run
from stapctl.plan import (
    ModuleJob,
    Plan,
    build_plan,
    check_scripts,
    gather_symbol_maps,
    make_plan,
)
from stapctl.render import parse_extra_vars
from stapctl.store import RunRecorder, find_run, list_runs, safe_name

err = Console(stderr=True, highlight=False)
T = TypeVar("T")


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        err.print("interrupted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except StapctlError as exc:
        err.print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
        sys.exit(exc.exit_code)


@click.group()
@click.version_option(package_name="stapctl")
def cli() -> None:
    """Compile SystemTap probes once, run them on many hosts over SSH."""


# -- shared steps ------------------------------------------------------------------------
def resolve_hosts(manifest: Manifest, inventory: Path | None, limit: str | None,
                  extra_vars: Mapping[str, Any]) -> list[Host]:
    """The hosts to work on: -i, else the manifest's inventory, else the running lab's."""
    source: Path | Mapping[str, Any]
    if inventory is not None:
        source, origin = inventory, inventory
    elif manifest.inventory is not None:
        source, origin = manifest.inventory, manifest.path
    else:
        status = lab.Lab.default().status()
        if not any(guest.state is lab.GuestState.RUNNING for guest in status.guests):
            raise ManifestError(Issue(str(manifest.path), None, None, "inventory",
                                      "no inventory: pass -i INVENTORY, set `inventory:` in "
                                      "the manifest, or start the lab with `stapctl lab up`"))
        source, origin = status.inventory, status.inventory
    loaded = load_inventory(source, origin)
    return loaded.select(manifest.hosts, limit)


def with_overrides(manifest: Manifest, forks: int | None, fmt: str | None) -> Manifest:
    if forks is not None:
        manifest = replace(manifest, strategy=replace(manifest.strategy, forks=forks))
    if fmt is not None:
        manifest = replace(manifest, output=replace(manifest.output, format=fmt))  # type: ignore[arg-type]
    return manifest


FORCE_GRACE = 3.0  # seconds to collect the outcomes of cut connections after a 2nd Ctrl-C


def in_background(work: Callable[[], T], events: queue.Queue[Event | None],
                  on_event: Callable[[Event], None], fleet: Fleet) -> T | None:
    """Run ``work`` in a thread while this thread renders its events.

    The first Ctrl-C asks every host to stop cleanly (EXIT, drain, unload) and lets the
    work finish; the second cuts the connections (the agents unload on their own), waits
    a moment for the hosts cut off to report, and returns None; a third returns at once.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = work()
        except BaseException as exc:  # re-raised in the main thread
            box["error"] = exc
        finally:
            events.put(None)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    interrupts = 0
    forced_at: float | None = None
    while True:
        try:
            event = events.get(timeout=0.2)
            if event is None:
                break
            on_event(event)
        except queue.Empty:
            if forced_at is not None and time.monotonic() > forced_at + FORCE_GRACE:
                break
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts == 1:
                err.print("[yellow]interrupt: stopping every probe cleanly "
                          "(Ctrl-C again to cut connections)[/]")
                fleet.stop.set()
            elif interrupts == 2:
                err.print("[red]second interrupt: cutting connections; "
                          "the agents unload on their own[/]")
                fleet.close()
                forced_at = time.monotonic()
            else:
                break
    if "error" in box:
        raise box["error"]
    return box.get("value")


def print_plan(plan: Plan) -> None:
    table = Table(title="plan", title_justify="left")
    for column in ("probe", "module", "kernel", "hosts", "state"):
        table.add_column(column)
    for job in plan.jobs:
        state = "failed" if job.error else ("cached" if job.cached else "to build")
        table.add_row(job.probe.name, job.spec.key[:12], job.spec.release,
                      ",".join(job.hosts), state)
    err.print(table)
    for host, reason in plan.unservable.items():
        err.print(f"[red]{host}: cannot be served:[/] {reason}")


def build_with_progress(plan: Plan, builder: Builder,
                        phase: Callable[[str], AbstractContextManager[Any]]) -> Plan:
    todo = [job for job in plan.jobs if not job.cached]
    if not todo:
        return plan

    def progress(job: ModuleJob, state: str) -> None:
        err.print(f"build {job.probe.name} for {job.spec.release} "
                  f"({len(job.hosts)} host{'s' * (len(job.hosts) != 1)}): {state}")

    with phase(f"compiling {len(todo)} module(s) with stap…"):
        return build_plan(plan, builder, progress)


# -- live display ------------------------------------------------------------------------
ACTIVE_STATES = ("connecting", "connected", "uploaded", "loaded", "running", "stopping")
STATE_STYLES = {"running": "cyan", "stopping": "yellow", "finished": "green",
                "failed": "bold red", "unreachable": "bold red", "skipped": "dim"}
EVENT_STATES = {"connected": "connected", "uploaded": "uploaded", "loaded": "loaded",
                "started": "running", "stopping": "stopping"}
ENDINGS = ("finished", "failed", "unreachable", "skipped")


@dataclass
class HostRow:
    state: str = "connecting"
    lines: int = 0
    detail: str = ""
    endings: list[str] = field(default_factory=list)  # one per probe that ended


class HostBoard:
    """Each host's state as its events arrive, rendered as a table for rich's Live.

    Renders are made by Live's refresh thread while the main thread updates the rows;
    both only read or replace plain values, and the set of hosts is fixed up front.
    """

    def __init__(self, hosts: list[str], probes: int) -> None:
        self.rows = {host: HostRow() for host in hosts}
        self.probes = probes
        self.phase = ""
        self.started = time.monotonic()

    def update(self, event: Event) -> None:
        row = self.rows.get(event.host)
        if row is None:
            return
        if event.kind == "output":
            row.lines += 1
        elif event.kind in ENDINGS:
            row.endings = [*row.endings, event.kind]
            row.detail = event.text
            if len(row.endings) >= self.probes:
                row.state = next((state for state in ("unreachable", "failed", "finished")
                                  if state in row.endings), "skipped")
        elif event.kind in EVENT_STATES and len(row.endings) < self.probes:
            row.state = EVENT_STATES[event.kind]
            if event.kind in ("connected", "stopping"):  # the kernel, the reason
                row.detail = event.text

    def counts(self) -> str:
        states = Counter(row.state for row in self.rows.values())
        return ", ".join(f"{n} {state}" for state, n in sorted(states.items()))

    def render(self, height: int) -> Group:
        """Every host in inventory order when they fit; else the busy and failed first."""
        elapsed = time.monotonic() - self.started
        header = Text.assemble((self.phase, "bold"), f"  ·  {self.counts()}  ·  {elapsed:.0f} s")
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("host", no_wrap=True)
        table.add_column("state", no_wrap=True, min_width=11)
        table.add_column("lines", justify="right", no_wrap=True)
        table.add_column("detail", overflow="ellipsis", no_wrap=True)
        rows = list(self.rows.items())
        room = max(1, height - 6)
        if len(rows) > room:
            rank = {"failed": 1, "unreachable": 1}
            rows.sort(key=lambda item: 0 if item[1].state in ACTIVE_STATES
                      else rank.get(item[1].state, 2))
            table.caption = f"… and {len(rows) - room + 1} more hosts"
            rows = rows[:room - 1]
        for host, row in rows:
            table.add_row(host, Text(row.state, style=STATE_STYLES.get(row.state, "")),
                          str(row.lines), report.first_line(row.detail))
        return Group(header, table)


class Display:
    """What a person sees while an apply runs.

    stderr, a terminal: a live table of hosts (state, lines received); otherwise plain
    lines. Probe output goes to stdout as before; only when stdout is the very terminal
    the table is drawn on is it printed through the table's console, above the table,
    so the two never overwrite each other.
    """

    def __init__(self, manifest: Manifest, hosts: list[str]) -> None:
        self.format = manifest.output.format
        self.many = len(manifest.probes) > 1
        self.outputs: list[Event] = []  # for the merged format, printed at the end
        self.board = HostBoard(hosts, len(manifest.probes))
        self.live: Live | None = None
        if err.is_terminal:
            self.live = Live(console=err, refresh_per_second=4, redirect_stdout=False,
                             redirect_stderr=False,
                             get_renderable=lambda: self.board.render(err.size.height))
        self.shared_terminal = self.live is not None and _same_terminal(sys.stdout, err.file)

    def __enter__(self) -> Display:
        if self.live is not None:
            self.live.start(refresh=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()

    @contextlib.contextmanager
    def phase(self, text: str) -> Iterator[None]:
        if self.live is not None:
            self.board.phase = text
            yield
        else:
            with err.status(text):
                yield

    def event(self, event: Event) -> None:
        self.board.update(event)
        if event.kind == "output" and self.format == "merged":
            self.outputs.append(event)
        if self.format == "json":
            self.out(report.event_json(event))
        elif event.kind == "output":
            if self.format == "prefix":
                self.out(report.output_prefix(event, self.many))
        elif event.kind in ("warning", "error", "failed", "unreachable"):
            color = "yellow" if event.kind == "warning" else "red"
            err.print(f"[{color}]{escape(event.host)}: {event.kind}:[/] {escape(event.text)}",
                      soft_wrap=True)
        elif self.live is None and event.kind in ("connected", "started", "finished"):
            err.print(f"[dim]{escape(event.host)}: {event.kind} {escape(event.text)}[/]",
                      soft_wrap=True)

    def out(self, line: str) -> None:
        if self.shared_terminal:
            err.print(Text(line), soft_wrap=True)
        else:
            click.echo(line)


def _same_terminal(a: IO[str], b: IO[str]) -> bool:
    try:
        return a.isatty() and os.path.samestat(os.fstat(a.fileno()), os.fstat(b.fileno()))
    except (OSError, ValueError):
        return False


# -- apply -------------------------------------------------------------------------------
@cli.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("-i", "--inventory", type=click.Path(path_type=Path),
              help="Inventory file; overrides the manifest's `inventory:`.")
@click.option("--limit", help="Further limit the hosts (Ansible pattern).")
@click.option("-e", "--extra-vars", "extra", multiple=True, metavar="KEY=VALUE",
              help="Template variable; wins over every other source.")
@click.option("--forks", type=click.IntRange(1, 10000), help="Hosts worked on at once.")
@click.option("--duration", help="Override every probe's duration (e.g. 30s).")
@click.option("--format", "fmt", type=click.Choice(["prefix", "merged", "json"]))
@click.option("--check", is_flag=True,
              help="Connect, upload and run the preflight; load nothing.")
@click.option("--accept-new-host-keys", is_flag=True,
              help="Trust hosts whose key is not yet known (a changed key still fails).")
def apply(manifest: Path, inventory: Path | None, limit: str | None, extra: tuple[str, ...],
          forks: int | None, duration: str | None, fmt: str | None, check: bool,
          accept_new_host_keys: bool) -> None:
    """Compile the manifest's probes and run them on its hosts."""
    try:
        seconds = parse_duration(duration) if duration else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--duration") from None
    loaded = with_overrides(load_manifest(manifest), forks, fmt)
    extra_vars = parse_extra_vars(list(extra))
    hosts = resolve_hosts(loaded, inventory, limit, extra_vars)
    options = RunOptions(duration=seconds, check=check,
                         accept_new_host_keys=accept_new_host_keys)
    run = execute(loaded, hosts, extra_vars, options)
    sys.exit(run.exit_code)


def execute(manifest: Manifest, hosts: list[Host], extra_vars: Mapping[str, Any],
            options: RunOptions) -> Run:
    """Connect, plan, build, run, and record; Ctrl-C anywhere still records the run."""
    builder = Builder()
    events: queue.Queue[Event | None] = queue.Queue()
    fleet = Fleet(manifest, options, events.put)
    run_id = time.strftime("%Y%m%d-%H%M%S-") + manifest.name + "-" + secrets.token_hex(2)
    recorder = RunRecorder(run_id, manifest)
    display = Display(manifest, [host.name for host in hosts])

    def on_event(event: Event) -> None:
        recorder.event(event)
        display.event(event)

    with display:
        try:
            with display.phase(f"connecting to {len(hosts)} host(s)…"):
                connected = in_background(lambda: fleet.connect(hosts), events, on_event,
                                          fleet)
            if connected and not fleet.stop.is_set():
                connected = gather_symbol_maps(manifest, connected, fleet.connections(),
                                               builder)
                plan = make_plan(manifest, connected, builder, extra_vars)
                plan = build_with_progress(plan, builder, display.phase)
                recorder.plan(plan)
                with display.phase("running"):
                    in_background(lambda: fleet.run(plan), events, on_event, fleet)
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            fleet.stop.set()
        finally:
            fleet.close()
        fleet.settle()
        display.board.phase = "interrupted" if fleet.stop.is_set() else "done"
        while not events.empty():  # what came after the last phase, and the settled hosts
            if (event := events.get()) is not None:
                on_event(event)
    run = Run(id=run_id, outcomes=tuple(fleet.outcomes), interrupted=fleet.stop.is_set())
    recorder.finish(run)
    if manifest.output.format == "merged":
        for line in report.merged(display.outputs, display.many):
            click.echo(line)
    if manifest.output.format == "json":
        click.echo(report.summary_json(run))
    print_summary(run)
    return run


def outcomes_table(outcomes: Sequence[HostOutcome], title: str = "") -> Table:
    table = Table(title=title or None, title_justify="left")
    for column in ("host", "probe", "result", "detail"):
        table.add_column(column, overflow="fold")
    for row in report.summary_rows(outcomes):
        table.add_row(*row)
    return table


def print_summary(run: Run) -> None:
    if run.failed:
        err.print(outcomes_table(run.outcomes, f"run {run.id}"))
    err.print(f"{report.summary_counts(run.outcomes)}  (run {run.id})")


# -- runs --------------------------------------------------------------------------------
@cli.group()
def runs() -> None:
    """Past applies: their outcomes and output."""


@runs.command(name="list")
@click.option("-n", "limit", type=click.IntRange(1), default=20, show_default=True)
def runs_list(limit: int) -> None:
    table = Table()
    for column in ("run", "started", "exit", "hosts", "ok", "failed"):
        table.add_column(column)
    for row in list_runs(limit):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["started"]))
        exit_code = "-" if row["exit_code"] is None else str(row["exit_code"])  # unfinished
        table.add_row(row["id"], started, exit_code, str(row["hosts"]),
                      str(row["ok"]), str(row["failed"]))
    # a pipe or file gets whole run ids, however long: they are what people copy
    (Console() if sys.stdout.isatty() else Console(width=1000)).print(table)


@runs.command(name="show")
@click.argument("run_id")
@click.option("--host", help="Print this host's output.")
def runs_show(run_id: str, host: str | None) -> None:
    try:
        row = find_run(run_id)
    except StapctlError as exc:
        raise click.BadParameter(f"{exc} (`stapctl runs list` shows the runs)",
                                 param_hint="RUN_ID") from None
    folder = Path(row["dir"])
    if host is not None:
        log = folder / "hosts" / f"{safe_name(host)}.log"
        if not log.exists():
            raise click.BadParameter(f"run {row['id']} has no output from {host}",
                                     param_hint="--host")
        click.echo(log.read_text(), nl=False)
        return
    summary = json.loads((folder / "summary.json").read_text()) \
        if (folder / "summary.json").exists() else {"outcomes": [], "exit_code": None}
    err.print(f"run {row['id']}  exit {summary['exit_code']}  folder {folder}")
    Console().print(outcomes_table([HostOutcome(**outcome) for outcome in summary["outcomes"]]))


# -- validate / plan / explain -----------------------------------------------------------
@cli.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("-i", "--inventory", type=click.Path(path_type=Path),
              help="Inventory file; overrides the manifest's `inventory:`.")
@click.option("--limit", help="Further limit the hosts (Ansible pattern).")
@click.option("-e", "--extra-vars", "extra", multiple=True, metavar="KEY=VALUE")
def validate(manifest: Path, inventory: Path | None, limit: str | None,
             extra: tuple[str, ...]) -> None:
    """Check a manifest, its inventory, templates and scripts; touch no host.

    Each probe is rendered for each host and parsed by stap (when stap is installed).
    """
    loaded = load_manifest(manifest)
    extra_vars = parse_extra_vars(list(extra))
    hosts: list[Host] = []
    if inventory is not None or loaded.inventory is not None:
        hosts = resolve_hosts(loaded, inventory, limit, extra_vars)
    parsed = check_scripts(loaded, hosts, extra_vars)
    err.print(f"{manifest}: ok ({len(loaded.probes)} probe(s), {len(hosts)} host(s), "
              f"{parsed} distinct script(s) parsed)")


@cli.command(name="plan")
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("-i", "--inventory", type=click.Path(path_type=Path))
@click.option("--limit")
@click.option("-e", "--extra-vars", "extra", multiple=True, metavar="KEY=VALUE")
@click.option("--build", is_flag=True, help="Also compile what is not cached.")
@click.option("--accept-new-host-keys", is_flag=True)
def plan_command(manifest: Path, inventory: Path | None, limit: str | None,
                 extra: tuple[str, ...], build: bool, accept_new_host_keys: bool) -> None:
    """Connect for facts and show which module each host gets; build only with --build."""
    loaded = load_manifest(manifest)
    extra_vars = parse_extra_vars(list(extra))
    hosts = resolve_hosts(loaded, inventory, limit, extra_vars)
    events: queue.Queue[Event | None] = queue.Queue()
    fleet = Fleet(loaded, RunOptions(accept_new_host_keys=accept_new_host_keys), events.put)

    def on_event(event: Event) -> None:
        if event.kind in ("failed", "unreachable"):
            err.print(f"[red]{event.host}: {event.text}[/]", soft_wrap=True)

    builder = Builder()
    try:
        with err.status(f"gathering facts from {len(hosts)} host(s)…"):
            connected = in_background(lambda: fleet.connect(hosts), events, on_event, fleet)
            if connected is not None:
                connected = gather_symbol_maps(loaded, connected, fleet.connections(), builder)
    finally:
        fleet.close()
    if connected is None:
        raise click.exceptions.Abort()
    planned = make_plan(loaded, connected, builder, extra_vars)
    if build:
        planned = build_with_progress(planned, builder, err.status)
    print_plan(planned)


@cli.command()
@click.argument("key")
def explain(key: str) -> None:
    """Describe a manifest key, e.g. `strategy.serial`."""
    click.echo(explain_key(key))


# -- cache -------------------------------------------------------------------------------
@cli.group()
def cache() -> None:
    """The local module cache."""


@cache.command(name="list")
def cache_list() -> None:
    table = Table()
    for column in ("key", "module", "kernel", "size", "stap", "fix"):
        table.add_column(column)
    for row in list_cached():
        table.add_row(str(row["key"])[:12], str(row["module_name"]), str(row["release"]),
                      f"{int(str(row['size'])) // 1024} KiB", str(row["stap_version"]),
                      str(row["runtime_fix"]))
    Console().print(table)


@cache.command(name="prune")
@click.option("--keep", type=click.IntRange(0), default=0, help="Newest modules to keep.")
def cache_prune(keep: int) -> None:
    err.print(f"removed {prune(keep=keep)} module(s)")


# -- lab ---------------------------------------------------------------------------------
@cli.group(name="lab")
def lab_group() -> None:
    """Local qemu guests running real kernels, for trying stapctl and for its tests."""


@lab_group.command()
@click.option("--hosts", "count", type=click.IntRange(1, 16), default=1, show_default=True)
@click.option("--release", help="Kernel release to boot (its headers must be installed); "
              "default: the one linux-headers-amd64 names.")
def up(count: int, release: str | None) -> None:
    """Build the guest image if needed and boot COUNT guests."""
    with err.status("lab…") as status:
        result = lab.Lab.default().up(count, progress=lambda text: status.update(text),
                                      release=release)
    show_lab(result, as_json=False)


@lab_group.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def status(as_json: bool) -> None:
    """Show each guest and the inventory path."""
    show_lab(lab.Lab.default().status(), as_json)


@lab_group.command()
def down() -> None:
    """Stop every guest the lab started."""
    with err.status("stopping guests…") as status:
        lab.Lab.default().down(progress=lambda text: status.update(text))
    err.print("lab is down")


def show_lab(result: lab.LabStatus, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({
            "guests": [{"name": g.name, "host": g.host, "port": g.port, "user": g.user,
                        "key": g.key, "release": g.release, "pid": g.pid,
                        "state": g.state.value}
                       for g in result.guests],
            "inventory": str(result.inventory),
        }))
        return
    table = Table()
    for column in ("name", "ssh", "kernel", "pid", "state"):
        table.add_column(column)
    for g in result.guests:
        table.add_row(g.name, f"{g.user}@{g.host}:{g.port}", g.release, str(g.pid),
                      g.state.value)
    Console().print(table)
    click.echo(f"inventory: {result.inventory}")
