"""Sinks: where a finished run is sent besides its record (``output.sinks``).

Each sink gets the run once, after every host has ended: a JSON-lines file, the local
syslog socket (RFC 5424), an HTTP POST, a node_exporter textfile. A sink that fails
costs its own delivery only: its error becomes one warning of the run, and the other
sinks and the record go on.

What is sent is ``{"summary": ..., "difference": ...}``: the summary as ``--format json``
prints it plus the manifest's name, the output lines per host and the aggregates; the
difference is the run's change from the run before it, or null when there is none.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from collections.abc import Mapping
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from stapctl import report
from stapctl.aggregate import aggregates_json
from stapctl.models import (
    HttpSink,
    JsonLinesSink,
    Manifest,
    Run,
    Sink,
    SyslogSink,
    TextfileSink,
)
from stapctl.store import difference_json

FILE_MODE = 0o600
SYSLOG_FACILITIES = {"user": 1, "daemon": 3, "auth": 4, "authpriv": 10,
                     **{f"local{n}": 16 + n for n in range(8)}}
SYSLOG_INFO, SYSLOG_WARNING = 6, 4
SYSLOG_ENTERPRISE = 32473  # the enterprise number RFC 5612 reserves for examples
MAX_SYSLOG_TEXT = 1024  # characters of one outcome's message in a syslog message
MAX_TEXTFILE_KEYS = 50  # keys of a count aggregate exported to Prometheus: the top ones


def payload(run: Run, manifest: Manifest) -> dict[str, Any]:
    """What every sink sends: the summary and the difference from the baseline (or null)."""
    summary = report.summary_data(run)
    summary["name"] = manifest.name
    summary["lines"] = [{"host": host, "probe": probe, "lines": lines}
                        for (host, probe), lines in sorted(run.lines.items())]
    summary["aggregates"] = aggregates_json(run.aggregates)
    difference = json.loads(difference_json(run.difference)) if run.difference else None
    return {"summary": summary, "difference": difference}


def deliver(run: Run, manifest: Manifest) -> list[str]:
    """Send the run to each of the manifest's sinks; one warning per sink that failed."""
    data = payload(run, manifest)
    warnings: list[str] = []
    for sink in manifest.output.sinks:
        try:
            match sink:
                case JsonLinesSink():
                    send_jsonl(sink, data)
                case SyslogSink():
                    send_syslog(sink, run, manifest)
                case HttpSink():
                    send_http(sink, data)
                case TextfileSink():
                    send_textfile(sink, run, manifest)
        except (OSError, http.client.HTTPException, ValueError) as error:
            reason = report.printable(str(error)[:MAX_SYSLOG_TEXT])  # a server's words
            warnings.append(f"sink {describe(sink)} failed: {reason}")
    return warnings


def describe(sink: Sink) -> str:
    """The sink in a few words, for warnings."""
    if isinstance(sink, JsonLinesSink):
        return f"jsonl {sink.path}"
    if isinstance(sink, SyslogSink):
        return f"syslog {sink.socket}"
    if isinstance(sink, HttpSink):
        return f"http {sink.url}"
    return f"textfile {sink.path}"


# -- JSON lines --------------------------------------------------------------------------
def send_jsonl(sink: JsonLinesSink, data: dict[str, Any]) -> None:
    line = (json.dumps(data, separators=(",", ":")) + "\n").encode()
    with suppress(FileNotFoundError):
        size = sink.path.stat().st_size
        if size and size + len(line) > sink.max_bytes:
            _rotate(sink.path, sink.keep)
    fd = os.open(sink.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, FILE_MODE)
    with os.fdopen(fd, "wb") as stream:
        stream.write(line)


def _rotate(path: Path, keep: int) -> None:
    """path → path.1 → path.2 … → path.KEEP, the oldest dropped."""
    with suppress(FileNotFoundError):
        os.unlink(f"{path}.{keep}")
    for number in range(keep - 1, 0, -1):
        with suppress(FileNotFoundError):
            os.replace(f"{path}.{number}", f"{path}.{number + 1}")
    os.replace(path, f"{path}.1")


# -- syslog ------------------------------------------------------------------------------
def send_syslog(sink: SyslogSink, run: Run, manifest: Manifest) -> None:
    """One datagram per outcome and one for the run, on the local socket."""
    messages = [syslog_message(sink, "outcome",
                               SYSLOG_INFO if outcome.ok else SYSLOG_WARNING,
                               {"run": run.id, "name": manifest.name, "host": outcome.host,
                                "probe": outcome.probe, "status": outcome.status,
                                "kind": outcome.kind or ""},
                               f"{outcome.host} {outcome.probe}: "
                               f"{report.outcome_reason(outcome)} "
                               f"{report.first_line(outcome.message)}".strip())
                for outcome in run.outcomes]
    messages.append(syslog_message(
        sink, "run", SYSLOG_WARNING if run.exit_code else SYSLOG_INFO,
        {"run": run.id, "name": manifest.name, "exit": str(run.exit_code)},
        f"run {run.id}: {report.summary_counts(run.outcomes)}"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as connection:
        connection.connect(str(sink.socket))
        for message in messages:
            connection.send(message)


def syslog_message(sink: SyslogSink, message_id: str, severity: int,
                   params: Mapping[str, str], text: str) -> bytes:
    """An RFC 5424 message: header, one structured-data element, the text on one line."""
    priority = SYSLOG_FACILITIES[sink.facility] * 8 + severity
    stamp = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    hostname = _syslog_name(socket.gethostname(), 255)
    element = " ".join(f'{name}="{_sd_escape(value)}"' for name, value in params.items())
    line = " ".join(report.printable(text[:MAX_SYSLOG_TEXT]).split())
    return (f"<{priority}>1 {stamp} {hostname} {_syslog_name(sink.app_name, 48)} "
            f"{os.getpid()} {message_id} [stapctl@{SYSLOG_ENTERPRISE} {element}] "
            f"{line}").encode("utf-8", "replace")


def _syslog_name(text: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, or '-' (RFC 5424's NILVALUE)."""
    name = "".join(c for c in text if "!" <= c <= "~")[:limit]
    return name or "-"


def _sd_escape(value: str) -> str:
    """A structured-data parameter value: '"', '\\' and ']' escaped, control characters
    made visible."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")
    return report.printable(escaped).replace("\n", "\\n").replace("\t", "\\t")


# -- HTTP --------------------------------------------------------------------------------
def send_http(sink: HttpSink, data: dict[str, Any]) -> None:
    """POST the payload as JSON; anything but a 2xx answer is a failure (redirects are
    not followed: a POST must not turn into a GET)."""
    url = urlsplit(sink.url)
    connection_type = {"http": http.client.HTTPConnection,
                       "https": http.client.HTTPSConnection}.get(url.scheme)
    if connection_type is None or not url.hostname:
        raise ValueError(f"not an http(s) URL: {sink.url}")
    body = json.dumps(data).encode()
    connection = connection_type(url.hostname, url.port, timeout=sink.timeout)
    try:
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        connection.request("POST", path, body=body, headers={
            "Content-Type": "application/json", "User-Agent": "stapctl", **sink.headers})
        response = connection.getresponse()
        response.read(64 << 10)
        if not 200 <= response.status < 300:
            raise ValueError(f"the server answered {response.status} {response.reason}")
    finally:
        connection.close()


# -- node_exporter textfile --------------------------------------------------------------
def send_textfile(sink: TextfileSink, run: Run, manifest: Manifest) -> None:
    """Write the metrics to a temporary file beside the target and rename it over, so
    node_exporter never reads half a file (it skips files not ending in .prom)."""
    text = prometheus_text(run, manifest)
    temporary = sink.path.with_name(f".{sink.path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, sink.path)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(temporary)


def prometheus_text(run: Run, manifest: Manifest) -> str:
    """The run as Prometheus text format metrics, labelled with the manifest's name."""
    metrics: dict[str, tuple[str, list[str]]] = {}

    def add(metric: str, help_text: str, labels: Mapping[str, str],
            value: int | float) -> None:
        label_text = ",".join(f'{name}="{_label_escape(v)}"' for name, v in
                              {"manifest": manifest.name, **labels}.items())
        metrics.setdefault(metric, (help_text, []))[1].append(
            f"{metric}{{{label_text}}} {value}")

    add("stapctl_run_timestamp_seconds", "When the manifest's last run finished.", {},
        round(time.time(), 3))
    add("stapctl_run_exit_code", "The exit code of the manifest's last run.", {},
        run.exit_code)
    for outcome in run.outcomes:
        host = {"host": outcome.host, "probe": outcome.probe}
        add("stapctl_host_outcome", "1 for how each host and probe ended in the last run.",
            {**host, "status": outcome.status, "kind": outcome.kind or ""}, 1)
        add("stapctl_host_output_lines", "Lines of output each host and probe sent.", host,
            run.lines.get((outcome.host, outcome.probe), 0))
        add("stapctl_host_lost_records", "Records the target lost (the probe printed "
            "faster than its buffers were read).", host, outcome.stats.get("lost_records", 0))
    for count in run.aggregates.counts:
        for key, value in count.totals[:MAX_TEXTFILE_KEYS]:
            add("stapctl_aggregate_count", "A count aggregate's fleet total per key (its "
                f"top {MAX_TEXTFILE_KEYS} keys).",
                {"probe": count.probe, "name": count.name, "key": key}, value)
    for histogram in run.aggregates.histograms:
        for bucket in histogram.buckets:
            add("stapctl_aggregate_histogram_bucket", "A histogram's fleet count per bucket "
                "(the bucket as stap labels it).",
                {"probe": histogram.probe, "name": histogram.name,
                 "bucket": f"{bucket.bound}{bucket.value}"}, bucket.count)
    lines: list[str] = []
    for metric, (help_text, samples) in metrics.items():
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge", *samples]
    return "\n".join(lines) + "\n"


def _label_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

