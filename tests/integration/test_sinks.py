"""Sinks against real receivers the tests own: an HTTP server on loopback, a syslog
datagram socket, files; and whole runs through the Session on the fleet double (fake
connections running the real agent), whose aggregates are checked against sums by hand."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from stapctl.runtime import stapctl_agent as agent

from stapctl import sinks
from stapctl.agent import Timing
from stapctl.execute import RunOptions
from stapctl.manifest import load_manifest
from stapctl.models import (
    Difference,
    FailureKind,
    HostDifference,
    HostOutcome,
    HttpSink,
    JsonLinesSink,
    Manifest,
    OutputSpec,
    Probe,
    Run,
    SyslogSink,
    TextfileSink,
)
from stapctl.session import Session
from tests.agent.fakekernel import Scenario
from tests.fleet_double import FakeBuilder, FakeFleet

pytestmark = pytest.mark.integration


class Receiver(ThreadingHTTPServer):
    """A real HTTP server on loopback that keeps what is POSTed to it."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: list[tuple[str, dict[str, str], Any]] = []
        self.status = status
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.bodies.append((self.path, dict(self.headers), json.loads(body)))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook?from=stapctl"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def syslog_socket(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    path = tmp_path / "log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(2)
        yield path, server


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def a_manifest(tmp_path: Path, *sink: Any) -> Manifest:
    path = tmp_path / "audit.yaml"
    path.write_text("name: audit\n")
    probe = Probe(name="p", template="probe oneshot { println(1) }", origin=str(path),
                  first_line=1)
    return Manifest(path=path, name="audit", probes=(probe,),
                    output=OutputSpec(sinks=tuple(sink)))


def a_run() -> Run:
    return Run(id="20261129-000000-audit-abcd", outcomes=(
        HostOutcome("web1", "p", "ok", stats={"lost_records": 0}),
        HostOutcome("web2", "p", "failed", FailureKind.RUNTIME_ERROR, 'bad "thing"]\n\x1b[31m',
                    stats={"lost_records": 7}),
    ), lines={("web1", "p"): 12, ("web2", "p"): 3})


# -- each sink on its own -----------------------------------------------------------------
def test_http_posts_the_summary_and_the_difference(tmp_path: Path,
                                                   receiver: Receiver) -> None:
    sink = HttpSink(receiver.url, headers={"Authorization": "Bearer t0ken"})
    difference = Difference(run="20261129-000000-audit-abcd", baseline="20261128-000000-audit-0123",
                            hosts=(HostDifference("web1", added=("x",), added_total=1),))
    run = replace(a_run(), difference=difference)
    assert sinks.deliver(run, a_manifest(tmp_path, sink)) == []
    [(path, headers, body)] = receiver.bodies
    assert path == "/hook?from=stapctl"
    assert headers["Authorization"] == "Bearer t0ken"
    assert headers["Content-Type"] == "application/json"
    assert body["difference"]["baseline"] == "20261128-000000-audit-0123"
    assert body["difference"]["hosts"] == [{"host": "web1", "added": ["x"], "removed": [],
                                            "added_total": 1, "removed_total": 0}]
    summary = body["summary"]
    assert (summary["run"], summary["name"], summary["exit_code"]) == \
        ("20261129-000000-audit-abcd", "audit", 3)
    assert [o["host"] for o in summary["outcomes"]] == ["web1", "web2"]
    assert {(x["host"], x["lines"]) for x in summary["lines"]} == {("web1", 12), ("web2", 3)}


def test_http_without_a_difference_posts_null(tmp_path: Path, receiver: Receiver) -> None:
    sinks.deliver(a_run(), a_manifest(tmp_path, HttpSink(receiver.url)))
    assert receiver.bodies[0][2]["difference"] is None


def test_an_http_error_answer_is_a_warning(tmp_path: Path, receiver: Receiver) -> None:
    receiver.status = 500
    [warning] = sinks.deliver(a_run(), a_manifest(tmp_path, HttpSink(receiver.url)))
    assert "500" in warning and receiver.url in warning


def test_syslog_sends_rfc5424_messages_one_per_outcome_and_one_for_the_run(
        tmp_path: Path, syslog_socket: tuple[Path, socket.socket]) -> None:
    path, server = syslog_socket
    sink = SyslogSink(socket=path, facility="local3", app_name="audits")
    assert sinks.deliver(a_run(), a_manifest(tmp_path, sink)) == []
    messages = [server.recv(65536).decode() for _ in range(3)]
    header = re.compile(r"<(\d+)>1 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z \S+ audits \d+ "
                        r"(\S+) \[stapctl@32473 (.*?[^\\])\] (.*)")
    parsed = [header.fullmatch(m) for m in messages]
    assert all(parsed), messages
    # local3 = 19: 19 * 8 + 6 (info) and + 4 (warning)
    assert [(p[1], p[2]) for p in parsed if p] == \
        [("158", "outcome"), ("156", "outcome"), ("156", "run")]
    failed = parsed[1]
    assert failed is not None
    assert 'host="web2"' in failed[3] and 'kind="runtime-error"' in failed[3]
    assert "\n" not in messages[1] and "\x1b" not in messages[1]
    assert failed[4] == 'web2 p: runtime-error bad "thing"]'
    assert parsed[2] is not None and parsed[2][4].endswith("1 ok, 1 runtime-error")


def test_jsonl_appends_a_line_a_run_and_rotates_by_size(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonLinesSink(path, max_bytes=1, keep=2)  # every run rotates the one before
    manifest = a_manifest(tmp_path, sink)
    for number in range(4):
        sinks.deliver(replace(a_run(), id=f"run-{number}"), manifest)
    runs = {name: [json.loads(line)["summary"]["run"] for line in
                   (tmp_path / name).read_text().splitlines()]
            for name in ("audit.jsonl", "audit.jsonl.1", "audit.jsonl.2")}
    assert runs == {"audit.jsonl": ["run-3"], "audit.jsonl.1": ["run-2"],
                    "audit.jsonl.2": ["run-1"]}
    assert not (tmp_path / "audit.jsonl.3").exists()
    big = JsonLinesSink(tmp_path / "big.jsonl")
    for number in range(3):
        sinks.deliver(replace(a_run(), id=f"run-{number}"), a_manifest(tmp_path, big))
    assert len((tmp_path / "big.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "big.jsonl").stat().st_mode & 0o777 == 0o600


def test_textfile_writes_prometheus_metrics(tmp_path: Path) -> None:
    path = tmp_path / "stapctl.prom"
    assert sinks.deliver(a_run(), a_manifest(tmp_path, TextfileSink(path))) == []
    text = path.read_text()
    assert 'stapctl_host_outcome{manifest="audit",host="web2",probe="p",status="failed",' \
           'kind="runtime-error"} 1' in text
    assert 'stapctl_host_output_lines{manifest="audit",host="web1",probe="p"} 12' in text
    assert 'stapctl_host_lost_records{manifest="audit",host="web2",probe="p"} 7' in text
    assert 'stapctl_run_exit_code{manifest="audit"} 3' in text
    for metric in re.findall(r"^# TYPE (\S+) gauge$", text, re.M):
        assert f"# HELP {metric} " in text
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    assert all(re.fullmatch(r'[a-z_]+\{([a-z_]+="([^"\\]|\\.)*",?)*\} [0-9.]+', s)
               for s in samples), samples
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_failing_sink_is_a_warning_and_the_others_still_get_the_run(
        tmp_path: Path, receiver: Receiver) -> None:
    missing = TextfileSink(tmp_path / "no-such-dir" / "x.prom")
    dead = HttpSink(f"http://127.0.0.1:{closed_port()}/", timeout=2)
    warnings = sinks.deliver(a_run(), a_manifest(tmp_path, missing, dead,
                                                 HttpSink(receiver.url)))
    assert len(warnings) == 2
    assert warnings[0].startswith(f"sink textfile {missing.path} failed: ")
    assert warnings[1].startswith(f"sink http {dead.url} failed: ")
    assert len(receiver.bodies) == 1


# -- the manifest ---------------------------------------------------------------------------
def test_the_manifest_reads_sinks_relative_to_itself(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("""\
apiVersion: stapctl/v1
kind: Trace
name: m
probes: [{name: p, script: "probe oneshot { println(1) }"}]
output:
  sinks:
    - {type: jsonl, path: out/audit.jsonl, max_bytes: 1000, keep: 5}
    - {type: syslog, facility: auth}
    - {type: http, url: "https://example.invalid/x", timeout: 3s,
       headers: {Authorization: "Bearer x"}}
    - {type: textfile, path: /var/lib/node/stapctl.prom}
""")
    assert load_manifest(path).output.sinks == (
        JsonLinesSink(tmp_path / "out/audit.jsonl", 1000, 5),
        SyslogSink(Path("/dev/log"), "auth", "stapctl"),
        HttpSink("https://example.invalid/x", 3.0, {"Authorization": "Bearer x"}),
        TextfileSink(Path("/var/lib/node/stapctl.prom")),
    )


# -- whole runs through the session -------------------------------------------------------
@pytest.fixture
def quick_agent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(agent.Run, "startup_timeout", 2.0)
    monkeypatch.setattr(agent.ControlChannel, "open_retry", 0.2)
    monkeypatch.setattr(agent.Run, "unload_retry", 0.5)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


def printing(*lines: str) -> Scenario:
    text = "".join(line + "\n" for line in lines).encode()
    return Scenario(begin=[("print", 0, text)], running=[("request_exit",)])


HIST_HEADER = "value |-------------------------------------------------- count"


@pytest.mark.usefixtures("quick_agent")
def test_a_run_merges_aggregates_records_them_and_sends_them_to_its_sinks(
        tmp_path: Path, receiver: Receiver) -> None:
    fleet = FakeFleet(tmp_path, {
        "h1": printing("@agg count calls 10 bash", "@agg hist lat", HIST_HEADER,
                       "    4 |@@                                                 2",
                       "    8 |@                                                  1", ""),
        "h2": printing("@agg count calls 5 bash", "@agg count calls 4 cron", "@agg hist lat",
                       HIST_HEADER,
                       "    8 |@@@                                                3",
                       "   16 |@@@@                                               4", ""),
    })
    dead = HttpSink(f"http://127.0.0.1:{closed_port()}/", timeout=2)
    jsonl = JsonLinesSink(tmp_path / "runs.jsonl")
    manifest = a_manifest(tmp_path, dead, HttpSink(receiver.url), jsonl)
    session = Session(manifest, fleet.hosts(), options=RunOptions(timing=Timing(exit_timeout=1)),
                      builder=FakeBuilder(tmp_path / "cache"), connector=fleet.connect)
    run = session.apply()

    assert run.exit_code == 0, run.outcomes  # the dead sink costs a warning, not the run
    assert len(run.warnings) == 1 and dead.url in run.warnings[0]
    [calls] = run.aggregates.counts
    assert calls.totals == (("bash", 15), ("cron", 4))
    [lat] = run.aggregates.histograms
    assert [(b.value, b.count) for b in lat.buckets] == [(4, 2), (8, 4), (16, 4)]
    assert run.lines == {("h1", "p"): 6, ("h2", "p"): 7}

    assert session.recorder is not None
    folder = session.recorder.dir
    assert json.loads((folder / "summary.json").read_text())["warnings"] == list(run.warnings)
    recorded = json.loads((folder / "aggregates.json").read_text())
    assert recorded["counts"][0]["totals"] == [{"key": "bash", "value": 15},
                                               {"key": "cron", "value": 4}]
    [(_, _, posted)] = receiver.bodies
    assert posted["summary"]["aggregates"] == recorded
    [line] = jsonl.path.read_text().splitlines()
    assert json.loads(line)["summary"]["run"] == run.id
