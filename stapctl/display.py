"""What a person sees while a run goes, and how they stop it.

stderr a terminal: a live table of hosts (state, lines received); otherwise plain lines,
one per message, whatever the terminal width (log readers rely on it). Probe output goes
to stdout; only when stdout is the very terminal the table is drawn on is it printed
through the table's console, above the table, so the two never overwrite each other.

Everything a target sent is shown through ``report.printable`` and as rich ``Text``,
never as markup: a target cannot move the cursor, set the title or style the table.

Signals: SIGINT, SIGTERM and SIGHUP all stop a run the same way (the first cleanly, the
second by cutting connections), whatever disposition the process inherited: a run
started in the background, with SIGINT ignored, still stops on `kill -INT`. Only a
SIGHUP ignored on purpose (nohup) stays ignored.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import IO, Protocol

import click
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from stapctl import report
from stapctl.models import ENDING_EVENT, PROGRESS_STATE, Event, Manifest
from stapctl.plan import ModuleJob
from stapctl.report import LineGroups


class Interruptible(Protocol):
    """A session, or anything else a signal asks to stop (a detached run's attach)."""

    def interrupt(self, signum: int) -> None: ...

err = Console(stderr=True, highlight=False, soft_wrap=True)

ENDINGS = tuple(ENDING_EVENT.values())
ACTIVE_STATES = ("connecting", *PROGRESS_STATE.values())
STATE_STYLES = {"running": "cyan", "stopping": "yellow", "finished": "green",
                "failed": "bold red", "unreachable": "bold red", "skipped": "dim"}
LIVE_WINDOW = 2.0  # seconds a line waits for the other hosts that print it (--live)
LIVE_ROOM = 1000  # distinct lines held at once by --live; past it the oldest is shown
SIGNAL_NAMES = {signal.SIGINT: "interrupt", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


def message(text: str, style: str = "") -> None:
    """One line on stderr about the run; ``text`` may hold what a target sent."""
    err.print(Text(report.printable(text), style=style))


@dataclass
class HostRow:
    state: str = "connecting"
    lines: int = 0
    detail: str = ""
    endings: list[str] = field(default_factory=list)  # one per probe (or run) that ended
    # probes and runs under way (one run per match adds runs no count foresees), and ended
    active: set[str] = field(default_factory=set)
    ended: set[str] = field(default_factory=set)


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
            row.ended.add(event.probe)
            row.active.discard(event.probe)
            row.detail = event.text
            if len(row.endings) >= self.probes and not row.active:
                row.state = next((state for state in ("unreachable", "failed", "finished")
                                  if state in row.endings), "skipped")
        elif event.kind in PROGRESS_STATE and event.probe not in row.ended:
            if event.probe:
                row.active.add(event.probe)
            row.state = PROGRESS_STATE[event.kind]
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
            table.add_row(Text(report.printable(host)),
                          Text(row.state, style=STATE_STYLES.get(row.state, "")),
                          str(row.lines), Text(report.printable(report.first_line(row.detail))))
        return Group(header, table)


class Display:
    """A session's Listener for a person: the live table or plain lines, and stdout.

    ``live``: output lines grouped across hosts as they come (``web[1-3]: line``);
    ``diff``: no output lines during the run (unless live), the report after it shows
    only what differs from the majority.
    """

    def __init__(self, manifest: Manifest, hosts: list[str], *, live: bool = False,
                 diff: bool = False) -> None:
        self.format = manifest.output.format
        self.many = manifest.labels_output
        self.diff = diff
        self.groups = LineGroups(LIVE_WINDOW, LIVE_ROOM, hosts) if live else None
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
        if self.groups is not None:
            self.show_groups(self.groups.flush())
        if self.live is not None:
            self.live.stop()

    # -- Listener ------------------------------------------------------------------------
    def phase(self, text: str) -> None:
        self.board.phase = text
        if self.live is None and text not in ("done", "interrupted"):
            message(text, "dim")

    def note(self, text: str) -> None:
        message(text)

    def build(self, job: ModuleJob, state: str) -> None:
        """A build's progress; a streamed run's names no hosts (its kernel's, as they
        come)."""
        hosts = len(job.hosts)
        count = f" ({hosts} host{'s' * (hosts != 1)})" if hosts else ""
        message(f"build {job.probe.name} for {job.spec.release}{count}: {state}")

    def interrupted(self, count: int, signum: int) -> None:
        name = SIGNAL_NAMES.get(signal.Signals(signum), f"signal {signum}")
        if count == 1:
            message(f"{name}: stopping every probe cleanly ({name} again to cut "
                    "connections)", "yellow")
        elif count == 2:
            message(f"second {name}: cutting connections; the agents unload on their own",
                    "red")

    def tick(self) -> None:
        if self.groups is not None:
            self.show_groups(self.groups.due(time.monotonic()))

    def event(self, event: Event) -> None:
        self.board.update(event)
        row = self.board.rows.get(event.host)
        if (self.groups is not None and event.kind in ENDINGS and row is not None
                and row.state not in ACTIVE_STATES):  # its last probe ended
            self.show_groups(self.groups.ended(event.host, time.monotonic()))
        if self.format == "json":
            self.out(report.event_json(event))
        elif event.kind == "output":
            if self.groups is not None:
                self.show_groups(self.groups.add(event.host, event.probe, event.text,
                                                 time.monotonic()))
            elif self.format == "prefix" and not self.diff:
                self.out(report.output_prefix(event, self.many))
        elif event.kind == "command-output":
            if self.format == "prefix":
                self.out(report.command_prefix(event))
            else:  # merged output is printed at the end; the command's is shown as it comes
                err.print(Text(report.command_prefix(event), style="dim"))
        elif event.kind in ("warning", "error", "failed", "unreachable"):
            color = "yellow" if event.kind == "warning" else "red"
            err.print(Text.assemble((report.printable(f"{event.host}: {event.kind}:"), color),
                                    " ", report.printable(event.text)))
        elif self.live is None and event.kind in ("connected", "started", "finished"):
            message(f"{event.host}: {event.kind} {event.text}", "dim")

    def show_groups(self, groups: list[tuple[str, str, str]]) -> None:
        for hosts, probe, line in groups:
            self.out(report.grouped_line(hosts, probe, line, self.many))

    def out(self, line: str) -> None:
        """A line for stdout, already safe (json, or through report.printable)."""
        if self.shared_terminal:
            err.print(Text(line))
        else:
            click.echo(line)


def _same_terminal(a: IO[str], b: IO[str]) -> bool:
    try:
        return a.isatty() and os.path.samestat(os.fstat(a.fileno()), os.fstat(b.fileno()))
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def signals_to(session: Interruptible) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP interrupt ``session`` while the block runs."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        session.interrupt(signum)

    watched = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup asked to ignore it
        watched.append(signal.SIGHUP)
    previous = {signum: signal.signal(signum, handler) for signum in watched}
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)
