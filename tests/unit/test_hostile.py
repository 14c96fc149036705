"""A hostile target among good ones: each attack fails that host alone, with a clear
kind, in bounded memory, and the run record is finished. The hostile agents are
stand-ins (test doubles) that send crafted frames; the good hosts run the real agent."""

from __future__ import annotations

import json
import socket
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from stapctl.runtime import stapctl_agent as wire

from stapctl import agent as agent_module
from stapctl import display as display_module
from stapctl import execute
from stapctl.agent import Timing
from stapctl.connection import Process
from stapctl.display import Display
from stapctl.execute import RunOptions
from stapctl.models import Event, FailureKind, Manifest, Probe, Run
from stapctl.plan import ModuleJob
from stapctl.session import Listener, Session
from tests.agent.fakekernel import Scenario
from tests.fleet_double import FakeBuilder, FakeConnection, FakeFleet, HostileProcess

pytestmark = pytest.mark.unit

HELLO = wire.encode_json_frame(wire.FRAME_HELLO, {"protocol": 1, "agent": "evil", "pid": 1})
RESULT_OK = wire.encode_json_frame(wire.FRAME_RESULT, {"status": "ok", "kind": None,
                                                       "message": "", "stats": {}})
GOOD = Scenario(begin=[("print", 0, b"fine\n")], running=[("request_exit",)])
MiB = 1 << 20
QUICK = Timing(exit_timeout=1.0)


@pytest.fixture(autouse=True)
def no_thread_dies(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Whatever a target does, no controller thread ends in a traceback."""
    died: list[str] = []
    monkeypatch.setattr(threading, "excepthook",
                        lambda args: died.append(f"{args.thread}: {args.exc_value!r}"))
    yield
    assert died == []


class Counting:
    """A listener that keeps counts, not events, so it costs no memory itself."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.kinds: dict[tuple[str, str], int] = {}
        self.texts: list[str] = []

    def phase(self, text: str) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def interrupted(self, count: int, signum: int) -> None:
        pass

    def build(self, job: ModuleJob, state: str) -> None:
        pass  # FakeBuilder's modules are all cached: nothing is built

    def tick(self) -> None:
        pass

    def event(self, event: Event) -> None:
        if self.gate is not None:
            self.gate.wait()
        key = (event.host, event.kind)
        self.kinds[key] = self.kinds.get(key, 0) + 1
        if event.kind != "output":
            self.texts.append(event.text)


def manifest(tmp_path: Path) -> Manifest:
    path = tmp_path / "trace.yaml"
    path.write_text("name: trace\n")
    probe = Probe(name="p", template="probe oneshot { println(1) }", origin=str(path),
                  first_line=1)
    return Manifest(path=path, name="trace", probes=(probe,))


def run_against(tmp_path: Path, stream: bytes | Callable[[socket.socket], None], *,
                hang: bool = False, listener: Listener | None = None,
                facts: bytes | None = None,
                timing: Timing = QUICK) -> tuple[Run, Session, FakeFleet]:
    fleet = FakeFleet(tmp_path, {"good": GOOD, "evil": Scenario()},
                      agents={"evil": lambda _kernel, _path: HostileProcess(stream, hang)},
                      facts={"evil": facts} if facts is not None else None)
    session = Session(manifest(tmp_path), fleet.hosts(), listener=listener or Counting(),
                      options=RunOptions(timing=timing),
                      builder=FakeBuilder(tmp_path / "cache"), connector=fleet.connect)
    return session.apply(), session, fleet


def outcome_of(run: Run, host: str) -> tuple[str, str | None, str]:
    found = next(o for o in run.outcomes if o.host == host)
    return found.status, found.kind, found.message


def assert_the_rest_went_on(run: Run, session: Session, fleet: FakeFleet,
                            exit_code: int = 3) -> None:
    assert outcome_of(run, "good")[0] == "ok"
    assert fleet.loaded() == {}
    assert session.recorder is not None
    summary = json.loads((session.recorder.dir / "summary.json").read_text())
    assert summary["exit_code"] == run.exit_code == exit_code


def zlib_bomb(inflated: int) -> bytes:
    """One Z frame payload inflating to about ``inflated`` bytes of zeros."""
    deflate = zlib.compressobj(9)
    first = deflate.compress(bytes(MiB)) + deflate.flush(zlib.Z_SYNC_FLUSH)
    steady = deflate.compress(bytes(MiB)) + deflate.flush(zlib.Z_SYNC_FLUSH)
    return first + steady * (inflated // MiB - 1)


def test_a_zlib_bomb_fails_its_host_in_bounded_memory(tmp_path: Path) -> None:
    bomb = zlib_bomb(2 << 30)  # 2 GiB of zeros in about 2 MB
    assert len(bomb) < 4 * MiB
    tracemalloc.start()
    run, session, fleet = run_against(
        tmp_path, HELLO + wire.encode_frame(wire.FRAME_ZOUTPUT, bomb) + RESULT_OK)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    status, kind, message = outcome_of(run, "evil")
    assert (status, kind) == ("failed", FailureKind.PROTOCOL_ERROR), message
    assert peak < 96 * MiB, f"peak {peak >> 20} MiB"
    assert_the_rest_went_on(run, session, fleet)


def test_a_line_without_newline_is_split_in_bounded_memory(tmp_path: Path) -> None:
    piece = wire.encode_frame(wire.FRAME_OUTPUT, b"A" * MiB)

    def send(stdout: socket.socket) -> None:
        stdout.sendall(HELLO)
        for _ in range(64):  # 64 MiB, no newline
            stdout.sendall(piece)
        stdout.sendall(RESULT_OK)

    listener = Counting()
    tracemalloc.start()
    run, session, fleet = run_against(tmp_path, send, listener=listener)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    assert outcome_of(run, "evil")[0] == "ok"
    assert listener.kinds[("evil", "output")] == 64 * MiB // RunOptions().max_line
    assert any("were split" in text for text in listener.texts)
    assert peak < 64 * MiB, f"peak {peak >> 20} MiB"
    assert_the_rest_went_on(run, session, fleet, exit_code=0)


def test_probe_output_past_the_run_limit_stops_the_host(tmp_path: Path) -> None:
    lines = wire.encode_frame(wire.FRAME_OUTPUT, b"x" * 1023 + b"\n")
    fleet = FakeFleet(tmp_path, {"good": GOOD, "evil": Scenario()},
                      agents={"evil": lambda _kernel, _path: HostileProcess(
                          HELLO + lines * 2048 + RESULT_OK)})
    session = Session(manifest(tmp_path), fleet.hosts(), listener=Counting(),
                      options=RunOptions(max_output=MiB), builder=FakeBuilder(tmp_path / "c"),
                      connector=fleet.connect)
    run = session.apply()

    assert outcome_of(run, "evil")[:2] == ("failed", FailureKind.OUTPUT_LIMIT)
    assert_the_rest_went_on(run, session, fleet)


@pytest.mark.parametrize("frame", [
    wire.encode_frame(wire.FRAME_EVENT, b"not json at all"),
    wire.encode_frame(wire.FRAME_EVENT, b"[" * 200_000),
    wire.encode_frame(wire.FRAME_EVENT, b'["an", "array"]'),
    wire.encode_frame(wire.FRAME_RESULT, b"\xff\xfe"),
    b"X\x00\x00\x00\x05hello",  # an unknown frame type
    b"O\xff\xff\xff\xff",  # a frame claiming 4 GiB
], ids=["non-json", "deeply-nested", "not-an-object", "binary-result", "unknown-type",
        "huge-length"])
def test_malformed_frames_fail_their_host_as_protocol_errors(tmp_path: Path,
                                                             frame: bytes) -> None:
    run, session, fleet = run_against(tmp_path, HELLO + frame + RESULT_OK)

    assert outcome_of(run, "evil")[:2] == ("failed", FailureKind.PROTOCOL_ERROR)
    assert_the_rest_went_on(run, session, fleet)


def test_a_hello_then_silence_is_unresponsive(tmp_path: Path) -> None:
    run, session, fleet = run_against(tmp_path, HELLO, hang=True,
                                      timing=Timing(exit_timeout=1.0, silence=0.5))

    assert outcome_of(run, "evil")[:2] == ("unreachable", FailureKind.UNRESPONSIVE)
    assert_the_rest_went_on(run, session, fleet)


@pytest.mark.parametrize("release", [b"/x", b"../../x", b"[/x]", b"-rf", b"a" * 300])
def test_a_release_that_would_become_a_path_fails_its_host(tmp_path: Path,
                                                           release: bytes) -> None:
    run, session, fleet = run_against(tmp_path, HELLO + RESULT_OK,
                                      facts=release + b" x86_64\n")

    status, kind, message = outcome_of(run, "evil")
    assert (status, kind) == ("failed", FailureKind.BAD_FACTS), message
    assert_the_rest_went_on(run, session, fleet)


def test_a_flood_while_output_is_not_read_waits_instead_of_growing(tmp_path: Path) -> None:
    lines = wire.encode_frame(wire.FRAME_OUTPUT, (b"y" * 4095 + b"\n") * 16)

    def flood(stdout: socket.socket) -> None:  # 48 MiB of output, three times the event budget
        stdout.sendall(HELLO)
        for _ in range(768):
            stdout.sendall(lines)
        stdout.sendall(RESULT_OK)

    gate = threading.Event()
    listener = Counting(gate)
    threading.Timer(1.0, gate.set).start()  # the reader of stdout pauses for a second
    tracemalloc.start()
    run, session, fleet = run_against(tmp_path, flood, listener=listener)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    assert listener.kinds[("evil", "output")] == 768 * 16
    assert peak < 32 * MiB, f"peak {peak >> 20} MiB"
    assert_the_rest_went_on(run, session, fleet, exit_code=0)


ESCAPES = "\x1b]52;c;ZXZpbA==\x07\x1b[2J\x1b]0;owned\x07\x9b31m\u202e"


def test_escape_sequences_and_markup_never_reach_the_terminal(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(display_module.err, "_force_terminal", False)
    evil = ESCAPES + "[/x][bold]markup[/bold]"
    stream = (HELLO + wire.encode_frame(wire.FRAME_OUTPUT, f"{evil}\n".encode())
              + wire.encode_json_frame(wire.FRAME_EVENT, {"event": "warning", "text": evil})
              + wire.encode_json_frame(wire.FRAME_RESULT, {
                  "status": "failed", "kind": "runtime-error",
                  "message": f"[man error::fault] {evil}", "stats": {}}))
    loaded = manifest(tmp_path)
    shown = Display(loaded, ["good", "evil"])
    run, session, fleet = run_against(tmp_path, stream, listener=shown)
    out, err = capsys.readouterr()

    for captured in (out, err):
        assert not any(ch in captured for ch in "\x1b\x07\x9b\u202e"), repr(captured)
    assert "[/x][bold]markup[/bold]" in out
    assert "[man error::fault]" in err
    assert outcome_of(run, "evil")[:2] == ("failed", FailureKind.RUNTIME_ERROR)
    assert_the_rest_went_on(run, session, fleet)


def test_an_agent_that_ignores_its_duration_is_stopped_at_the_default_deadline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(execute, "DEADLINE_GRACE", 0.2)
    beat = wire.encode_json_frame(wire.FRAME_EVENT, {"event": "heartbeat"})

    def never_ends(stdout: socket.socket) -> None:  # alive, and deaf to its duration and to stop
        stdout.sendall(HELLO)
        for _ in range(200):
            stdout.sendall(beat)
            time.sleep(0.05)

    fleet = FakeFleet(tmp_path, {"good": GOOD, "evil": Scenario()},
                      agents={"evil": lambda _kernel, _path: HostileProcess(never_ends)})
    session = Session(manifest(tmp_path), fleet.hosts(), listener=Counting(),
                      options=RunOptions(duration=0.2, timing=Timing(exit_timeout=0.1,
                                                                     stop_grace=0.3)),
                      builder=FakeBuilder(tmp_path / "cache"), connector=fleet.connect)
    started = time.monotonic()
    run = session.apply()

    status, kind, message = outcome_of(run, "evil")
    assert (status, kind) == ("failed", FailureKind.TIMED_OUT), message
    assert "cut off" in message
    assert time.monotonic() - started < 5
    assert_the_rest_went_on(run, session, fleet)


def test_a_fault_of_the_controller_on_one_host_is_that_hosts_outcome(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = FakeFleet(tmp_path, {"good": GOOD, "evil": Scenario()})
    original = agent_module.AgentHost.module

    def broken_module(self: agent_module.AgentHost, local: Path, sha256: str,
                      again: bool = False) -> tuple[str, bytes]:
        if self.connection.host.name == "evil":
            raise RuntimeError("a bug")
        return original(self, local, sha256, again)

    monkeypatch.setattr(agent_module.AgentHost, "module", broken_module)
    session = Session(manifest(tmp_path), fleet.hosts(), listener=Counting(),
                      options=RunOptions(timing=QUICK), builder=FakeBuilder(tmp_path / "c"),
                      connector=fleet.connect)
    run = session.apply()

    status, kind, message = outcome_of(run, "evil")
    assert (status, kind) == ("failed", FailureKind.CONTROLLER_ERROR)
    assert "RuntimeError: a bug" in message
    assert_the_rest_went_on(run, session, fleet)


def apply_with_evil_prepare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            prepare: Callable[[], Process]) -> tuple[Run, Session, FakeFleet]:
    """An apply on hosts `good` and `evil`, whose prepare command is ``prepare()``."""
    original = FakeConnection.start

    def evil_prepare(self: FakeConnection, argv: Sequence[str], become: bool = True) -> Process:
        if self.host.name == "evil" and argv[0] == "sh":
            return prepare()
        return original(self, argv, become)

    monkeypatch.setattr(FakeConnection, "start", evil_prepare)
    fleet = FakeFleet(tmp_path, {"good": GOOD, "evil": Scenario()})
    session = Session(manifest(tmp_path), fleet.hosts(), listener=Counting(),
                      options=RunOptions(timing=QUICK), builder=FakeBuilder(tmp_path / "c"),
                      connector=fleet.connect)
    return session.apply(), session, fleet


def test_a_facts_command_that_never_answers_times_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "FACTS_TIMEOUT", 0.3)
    # a hung home directory, a stuck sudo
    run, session, fleet = apply_with_evil_prepare(
        tmp_path, monkeypatch, lambda: HostileProcess(b"", hang=True))

    status, kind, message = outcome_of(run, "evil")
    assert status == "failed" and "no answer within 0.3" in message, (kind, message)
    assert_the_rest_went_on(run, session, fleet)


def test_a_prepare_command_that_floods_is_stopped_at_its_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def flood(sock: socket.socket) -> None:
        while True:  # until the controller cuts it off
            sock.sendall(b"m" * 65536)

    run, session, fleet = apply_with_evil_prepare(
        tmp_path, monkeypatch, lambda: HostileProcess(flood))

    status, kind, message = outcome_of(run, "evil")
    assert status == "failed" and "sent more than 1024 KiB" in message, (kind, message)
    assert_the_rest_went_on(run, session, fleet)


def test_an_agent_that_never_starts_is_unresponsive_after_the_startup_allowance(
        tmp_path: Path) -> None:
    started = time.monotonic()
    run, session, fleet = run_against(tmp_path, b"", hang=True,
                                      timing=Timing(exit_timeout=1.0, silence=0.2, startup=1.0))

    status, kind, message = outcome_of(run, "evil")
    assert (status, kind) == ("unreachable", FailureKind.UNRESPONSIVE), message
    assert "did not start within 1 s" in message
    assert time.monotonic() - started > 1.0  # the startup allowance, not the silence, applied
    assert_the_rest_went_on(run, session, fleet)
