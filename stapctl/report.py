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

from stapctl.models import Event, HostOutcome, Run

JSON_SCHEMA_VERSION = 1
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


def event_json(event: Event) -> str:
    """One JSON line per event (the `json` format; schema in the README)."""
    return json.dumps({"v": JSON_SCHEMA_VERSION, "type": "event", **asdict(event)})


def summary_json(run: Run) -> str:
    return json.dumps({
        "v": JSON_SCHEMA_VERSION, "type": "summary", "run": run.id,
        "exit_code": run.exit_code, "interrupted": run.interrupted,
        "outcomes": [asdict(o) for o in run.outcomes],
    })


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
