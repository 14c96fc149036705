"""`stapctl runs show RUN --html`: one self-contained page about a recorded run.

The summary, each host's outcome, the difference from the baseline (difference.json)
and the fleet-wide aggregates (aggregates.json, as stapctl.aggregate writes it: each
count's totals and each histogram's buckets drawn as CSS bars). No script, no external
asset: the page is one file to attach or archive. Everything a target sent is escaped
with html.escape.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from stapctl import report
from stapctl.difference import read_difference
from stapctl.errors import StapctlError
from stapctl.models import Difference, HostOutcome

MAX_AGGREGATES = 4 << 20  # bytes of aggregates.json read into a page

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #1d1d1f; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; } h3 { font-size: 1em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
.ok { color: #176f2c; } .failed, .unreachable { color: #b00020; } .skipped { color: #777; }
pre { margin: 0; white-space: pre-wrap; word-break: break-all; }
.added { color: #176f2c; } .removed { color: #b00020; }
.bar { background: #3b6fd8; height: 1em; min-width: 1px; }
td.bars { width: 24em; }
"""


def render(row: Mapping[str, Any], folder: Path) -> str:
    """The page for the run whose history row is ``row`` and folder ``folder``."""
    summary = _json(folder / "summary.json", 1 << 24) or {"outcomes": [], "exit_code": None}
    outcomes = [HostOutcome(**outcome) for outcome in summary["outcomes"]]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>stapctl run {_text(row['id'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>Run {_text(row['id'])}</h1>",
        _summary(row, summary, outcomes),
        "<h2>Hosts</h2>", _outcomes(outcomes),
        "<h2>Difference from the baseline</h2>", _difference(read_difference(folder)),
    ]
    aggregates = _json(folder / "aggregates.json", MAX_AGGREGATES)
    if aggregates is not None:
        parts += ["<h2>Aggregates</h2>", _aggregates(aggregates)]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _summary(row: Mapping[str, Any], summary: Mapping[str, Any],
             outcomes: Sequence[HostOutcome]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(row["started"]))
    facts = [("manifest", row["name"]), ("file", row["manifest"]), ("started", started),
             ("exit code", str(summary["exit_code"])),
             ("hosts", report.summary_counts(outcomes))]
    return _table(("", ""), [(escape(key), _text(str(value))) for key, value in facts],
                  header=False)


def _outcomes(outcomes: Sequence[HostOutcome]) -> str:
    if not outcomes:
        return "<p>No host outcomes were recorded.</p>"
    rows = [(_text(o.host), _text(o.probe),
             f'<span class="{escape(o.status)}">{escape(report.outcome_reason(o))}</span>',
             f"<pre>{_text(report.first_line(o.message))}</pre>")
            for o in sorted(outcomes, key=lambda o: (o.ok, o.host, o.probe))]
    return _table(("host", "probe", "result", "detail"), rows)


def _difference(difference: Difference | None) -> str:
    if difference is None:
        return "<p>Not compared (apply --baseline records a difference).</p>"
    heading = f"<p>Compared with run {_text(difference.baseline)}: "
    if not difference.changed:
        return heading + "no host's output changed.</p>"
    rows = []
    for host in difference.hosts:
        lines = [f'<pre class="added">+ {_text(line)}</pre>' for line in host.added]
        lines += [f'<pre class="removed">- {_text(line)}</pre>' for line in host.removed]
        hidden = host.added_total + host.removed_total - len(host.added) - len(host.removed)
        if hidden:
            lines.append(f"<p>… {hidden} more line(s) not recorded</p>")
        rows.append((_text(host.host), f"{host.added_total} added, "
                     f"{host.removed_total} removed", "".join(lines)))
    return heading + f"{len(difference.hosts)} host(s) changed.</p>" + _table(
        ("host", "change", "lines"), rows)


def _aggregates(data: Mapping[str, Any]) -> str:
    """Each count as its keys' fleet totals, each histogram as its buckets, as bars."""
    parts = []
    for count in data.get("counts", []):
        parts += [_aggregate_title(count), _bars(
            ("key", "total"), [(str(t["key"]), int(t["value"])) for t in count["totals"]])]
    for histogram in data.get("histograms", []):
        parts += [_aggregate_title(histogram), _bars(
            ("value", "count"), [(f"{b['bound']}{b['value']}", int(b["count"]))
                                 for b in histogram["buckets"]])]
    if data.get("rejected"):
        parts.append(f"<p>{int(data['rejected'])} malformed or excess record(s) rejected.</p>")
    return "".join(parts) or "<p>No aggregates.</p>"


def _aggregate_title(aggregate: Mapping[str, Any]) -> str:
    hosts = len(aggregate.get("hosts", []))
    return (f"<h3>{_text(str(aggregate['name']))} <small>(probe "
            f"{_text(str(aggregate['probe']))}, {hosts} host(s))</small></h3>")


def _bars(columns: tuple[str, str], rows: Sequence[tuple[str, int]]) -> str:
    largest = max((abs(value) for _, value in rows), default=0) or 1
    cells = [(_text(label), escape(str(value)),
              f'<div class="bar" style="width:{100 * abs(value) / largest:.1f}%"></div>')
             for label, value in rows]
    return _table((*columns, ""), cells, bars=True)


def _text(text: str) -> str:
    """Text from a target (or about one) in the page: control characters made visible
    escapes, as on a terminal (the page may be printed to one), then HTML-escaped."""
    return escape(report.printable(text))


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]], header: bool = True,
           bars: bool = False) -> str:
    """A table of cells already escaped."""
    head = "<tr>" + "".join(f"<th>{escape(c)}</th>" for c in columns) + "</tr>" \
        if header else ""
    body = "".join("<tr>" + "".join(
        f'<td class="bars">{cell}</td>' if bars and index == 2 else f"<td>{cell}</td>"
        for index, cell in enumerate(row)) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _json(path: Path, limit: int) -> Any:
    """A JSON file of the run folder; None if it is not there."""
    try:
        with path.open("rb") as stream:
            data = stream.read(limit + 1)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise StapctlError(f"cannot read {path}: {error.strerror}") from None
    if len(data) > limit:
        raise StapctlError(f"{path} is larger than {limit >> 20} MiB: not shown")
    try:
        return json.loads(data)
    except ValueError as error:
        raise StapctlError(f"{path} is not JSON: {error}") from None
