"""Turn events and outcomes into what a person or a script reads.

Pure functions: they return text and data; printing is the CLI's job. Probe output goes
to stdout, everything about the run (progress, warnings, the summary) to stderr, so
`stapctl apply x.yaml > out.txt` captures exactly what the probes printed.
"""

from __future__ import annotations

import difflib
import json
import re
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Any

from stapctl.aggregate import aggregates_json, draw_histogram
from stapctl.models import Aggregates, Event, HostOutcome, Run

JSON_SCHEMA_VERSION = 1
TOP_KEYS = 10  # keys of a count aggregate shown after a run
# bytes a terminal acts on: C0 but tab and newline, DEL, C1, and the bidirectional
# overrides that reorder what is shown (so a line cannot hide or fake its content)
UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """Text from a target made safe for a terminal: control characters become visible
    escapes (``\\x1b``, ``\\u202e``), tab and newline stay. Every human format uses it;
    the json format stays lossless."""
    return UNPRINTABLE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def output_prefix(event: Event, many_probes: bool) -> str:
    """`host: line`, or `host[probe]: line` when the manifest has several probes."""
    label = f"{event.host}[{event.probe}]" if many_probes else event.host
    return printable(f"{label}: {event.text}")


def command_prefix(event: Event) -> str:
    """`host[cmd]: line`: a line of the probe's target command, apart from probe output."""
    return printable(f"{event.host}[cmd]: {event.text}")


def event_json(event: Event) -> str:
    """One JSON line per event (the `json` format; schema in the README)."""
    return json.dumps({"v": JSON_SCHEMA_VERSION, "type": "event", **asdict(event)})


def summary_data(run: Run) -> dict[str, Any]:
    """The summary as JSON data: the `json` format's last line, and what sinks send."""
    return {
        "v": JSON_SCHEMA_VERSION, "type": "summary", "run": run.id,
        "exit_code": run.exit_code, "interrupted": run.interrupted,
        "outcomes": [asdict(o) for o in run.outcomes],
    }


def summary_json(run: Run) -> str:
    return json.dumps(summary_data(run))


def aggregates_line(aggregates: Aggregates) -> str:
    """The aggregates as one line of the `json` format, before the summary."""
    return json.dumps({"v": JSON_SCHEMA_VERSION, "type": "aggregates",
                       **aggregates_json(aggregates)})


def aggregate_lines(aggregates: Aggregates, top: int = TOP_KEYS) -> list[str]:
    """The aggregates for a person: each count aggregate as a table of its fleet's top
    keys, each histogram drawn as stap draws it. Keys come from targets: escaped."""
    lines: list[str] = []
    for count in aggregates.counts:
        shown = count.totals[:top]
        lines.append(f"{count.name} [{count.probe}], {len(count.hosts)} host(s): top "
                     f"{len(shown)} of {len(count.totals)}")
        width = max(len(str(value)) for _, value in shown) if shown else 1
        lines += [f"  {value:>{width}}  {key or '-'}" for key, value in shown]
        lines.append("")
    for histogram in aggregates.histograms:
        lines.append(f"{histogram.name} [{histogram.probe}], {len(histogram.hosts)} host(s)")
        lines += [*draw_histogram(histogram), ""]
    if aggregates.rejected:
        lines.append(f"{aggregates.rejected} @agg record(s) rejected: malformed or past a "
                     "limit")
    return [printable(line) for line in lines]


def merged_heading(hosts: Sequence[str], probe: str, many_probes: bool) -> list[str]:
    """The lines above one group of identical output: its hosts, and its probe if many."""
    title = ",".join(sorted(hosts)) + (f" [{probe}]" if many_probes else "")
    return ["-" * 15, f"{title} ({len(hosts)})", "-" * 15]


HOST_NUMBER = re.compile(r"^(.*?)(\d+)(\D*)$")  # the last number in a host name


def fold_hosts(hosts: Iterable[str]) -> str:
    """Host names folded as clush shows node sets: ``web[1-3,7],db1,lab-[01-03]``.

    Names are grouped by what surrounds their last number; runs of consecutive numbers
    become ranges, zero padding kept (``08-10`` is 08, 09, 10; ``9-10`` is 9, 10)."""
    numbered: dict[tuple[str, str], list[str]] = {}
    plain: list[str] = []
    for host in sorted(set(hosts)):
        match = HOST_NUMBER.match(host)
        if match is None:
            plain.append(host)
        else:
            numbered.setdefault((match[1], match[3]), []).append(match[2])
    parts = plain
    for (prefix, suffix), numbers in numbered.items():
        ranges = _number_ranges(sorted(numbers, key=lambda n: (int(n), n)))
        if len(numbers) == 1:
            parts.append(f"{prefix}{numbers[0]}{suffix}")
            continue
        spans = ",".join(first if first == last else f"{first}-{last}"
                         for first, last in ranges)
        parts.append(f"{prefix}[{spans}]{suffix}")
    return ",".join(sorted(parts))


def _number_ranges(numbers: list[str]) -> list[tuple[str, str]]:
    """Consecutive numbers as (first, last) spans that expand back to the same strings."""
    ranges: list[tuple[str, str]] = []
    for number in numbers:
        if ranges:
            first, last = ranges[-1]
            width = len(first) if first.startswith("0") and len(first) > 1 else 0
            if int(number) == int(last) + 1 and number == str(int(number)).zfill(width):
                ranges[-1] = (first, number)
                continue
        ranges.append((number, number))
    return ranges


class LineGroups:
    """Output lines grouped live across hosts, as `clush -bL` shows them.

    A line is held up to ``window`` seconds so that the hosts printing the same line in
    that moment are shown once, as ``web[1-3]: line``; it is shown as soon as every host
    still running has printed it. Each host's lines stay in its order: a host joins a
    held line only if it has no later line held. At most ``room`` lines are held; past
    that the oldest is shown early, so memory is bounded whatever the fleet prints.
    """

    def __init__(self, window: float, room: int, hosts: Iterable[str]) -> None:
        self.window = window
        self.room = room
        self.running = set(hosts)
        self.held: OrderedDict[int, tuple[float, str, str, set[str]]] = OrderedDict()
        self.newest: dict[tuple[str, str], int] = {}  # (probe, line): its newest hold
        self.last_held: dict[str, int] = {}  # host: the number of its newest hold
        self.count = 0

    def add(self, host: str, probe: str, line: str, now: float) -> list[tuple[str, str, str]]:
        """Hold a line; returns the (hosts, probe, line) groups now due, oldest first."""
        number = self.newest.get((probe, line))
        if (number is not None and number > self.last_held.get(host, -1)
                and host not in self.held[number][3]):
            self.held[number][3].add(host)
        else:
            self.count += 1
            number = self.count
            self.held[number] = (now, probe, line, {host})
            self.newest[(probe, line)] = number
        self.last_held[host] = number
        return self.due(now)

    def ended(self, host: str, now: float) -> list[tuple[str, str, str]]:
        """A host that prints no more: held lines no longer wait for it."""
        self.running.discard(host)
        return self.due(now)

    def due(self, now: float) -> list[tuple[str, str, str]]:
        """The groups whose window has passed, that every running host printed, or that
        no longer fit; oldest first."""
        shown = []
        while self.held:
            number, (since, probe, line, hosts) = next(iter(self.held.items()))
            if (since + self.window > now and len(self.held) <= self.room
                    and not self.running <= hosts):
                break
            del self.held[number]
            if self.newest.get((probe, line)) == number:
                del self.newest[(probe, line)]
            shown.append((fold_hosts(hosts), probe, line))
        return shown

    def flush(self) -> list[tuple[str, str, str]]:
        """Every held group, at the end of a run."""
        return self.due(float("inf"))


def grouped_line(hosts: str, probe: str, line: str, many_probes: bool) -> str:
    """`web[1-3]: line`, or `web[1-3] [probe]: line` when the run has several probes."""
    label = f"{hosts} [{probe}]" if many_probes else hosts
    return printable(f"{label}: {line}")


def diff_from_majority(majority: Sequence[str], majority_hosts: str, lines: Sequence[str],
                       hosts: str) -> list[str]:
    """A unified diff of one group's output against the majority's, as clush --diff."""
    return [printable(line.rstrip("\n")) for line in difflib.unified_diff(
        majority, lines, fromfile=majority_hosts, tofile=hosts, lineterm="")]


def outcome_reason(outcome: HostOutcome) -> str:
    return outcome.status if outcome.ok or not outcome.kind else outcome.kind


def summary_rows(outcomes: Sequence[HostOutcome]) -> list[tuple[str, str, str, str]]:
    """(host, probe, result, detail) rows for the final table, failures first."""
    ordered = sorted(outcomes, key=lambda o: (o.ok, o.host, o.probe))
    return [(printable(o.host), printable(o.probe), outcome_reason(o),
             printable(first_line(o.message))) for o in ordered]


def summary_counts(outcomes: Sequence[HostOutcome]) -> str:
    counts = Counter(outcome_reason(o) for o in outcomes)
    ok = counts.pop("ok", 0)
    parts = [f"{ok} ok"] + [f"{n} {reason}" for reason, n in sorted(counts.items())]
    return ", ".join(parts)


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""
