"""Turn events and outcomes into what a person or a script reads.

Pure functions: they return text and data; printing is the CLI's job. Probe output goes
to stdout, everything about the run (progress, warnings, the summary) to stderr, so
`stapctl apply x.yaml > out.txt` captures exactly what the probes printed.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
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
