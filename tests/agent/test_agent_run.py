"""The agent against FakeKernel: every way a run starts, goes and ends."""

import errno
import json
import os
import signal
import struct
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest
from stapctl.runtime import stapctl_agent as agent

from tests.agent.fakekernel import (
    ADDRESSES,
    Actions,
    FakeKernel,
    FakeModule,
    Outcome,
    Scenario,
    drive,
    module_file,
    run_request,
)

pytestmark = pytest.mark.agent


@pytest.fixture(autouse=True)
def quick_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Failure paths wait for timeouts; shorten them."""
    monkeypatch.setattr(agent.Run, "startup_timeout", 2.0)
    monkeypatch.setattr(agent.ControlChannel, "open_retry", 0.5)
    monkeypatch.setattr(agent.Run, "unload_retry", 1.0)


def kernel_for(tmp_path: Path, **scenario: Any) -> FakeKernel:
    return FakeKernel(tmp_path / "root", Scenario(**scenario))


def assert_cleaned_up(kernel: FakeKernel, request: dict[str, Any]) -> None:
    """Every path must end with nothing loaded and the files removed."""
    assert kernel.modules == {}
    for path in request.get("remove_files", []):
        assert not os.path.exists(path)


HELLO_EXIT = Actions(begin=[("print", 0, b"hello, world!\n")], running=[("request_exit",)])


@pytest.mark.parametrize("generation", [4, 5])
def test_a_script_that_exits_is_ok(tmp_path: Path, generation: int) -> None:
    kernel = kernel_for(tmp_path, generation=generation, **HELLO_EXIT)
    request = run_request(tmp_path)
    outcome = drive(kernel, request)

    assert outcome.result["status"] == "ok", outcome.result
    assert outcome.result["kind"] is None
    assert outcome.output == b"hello, world!\n"
    assert outcome.types[0] == "H" and outcome.types[-1] == "R"
    assert outcome.hello["protocol"] == 1 and outcome.hello["agent"] == agent.AGENT_VERSION
    assert outcome.event_names() == ["facts", "loaded", "started", "stopping", "unloaded"]
    assert outcome.events_named("stopping")[0]["reason"] == "exit()"
    assert outcome.result["stats"]["records"] == 1
    assert outcome.result["stats"]["bytes"] == 14
    assert outcome.code == 0
    assert_cleaned_up(kernel, request)


def test_an_exit_requested_before_starts_reply_is_handled_after_it(tmp_path: Path) -> None:
    # Seen on 6.1: a oneshot probe's REQUEST_EXIT can be queued before START's reply.
    kernel = kernel_for(tmp_path, begin=[("print", 0, b"once\n"), ("request_exit",)])
    outcome = drive(kernel, run_request(tmp_path))
    assert outcome.event_names() == ["facts", "loaded", "started", "stopping", "unloaded"]
    assert outcome.output == b"once\n" and outcome.result["status"] == "ok"


def test_the_handshake_follows_staprun(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path, **HELLO_EXIT)
    drive(kernel, run_request(tmp_path))
    module = kernel.history[0]
    names = [name for name, _ in module.received]

    assert names[0] == "PRIVILEGE_CREDENTIALS"
    assert struct.unpack("=i", module.received[0][1]) == (0xE,)
    assert names[-2:] == ["START", "EXIT"]
    assert names.index("READY") < names.index("START")
    relocations = [agent.RELOCATION.unpack(p) for n, p in module.received if n == "RELOCATION"]
    sent = dict(((m.rstrip(b"\0"), r.rstrip(b"\0")), a) for m, r, a in relocations)
    for symbol, address in ADDRESSES.items():
        assert sent[(b"kernel", symbol.encode())] == address
    assert sent[(b"kernel", b".note.gnu.build-id")] == 2
    assert sent[(b"e1000", b".text")] == 0xFFFFFFFFC0001000
    assert sent[(b"e1000", b".init.text")] == 0  # stale init addresses are zeroed
    tz = [agent.TZINFO.unpack(p) for n, p in module.received if n == "TZINFO"]
    assert tz[0][0] == -time.localtime().tm_gmtoff
    # kptr_restrict was raised to 1 for the reading, then put back
    assert open(kernel.proc_path("sys", "kernel", "kptr_restrict")).read().strip() == "0"


def sent_stext(module: FakeModule) -> int | None:
    """The _stext address a module was sent in its RELOCATION messages."""
    for name, payload in module.received:
        if name == "RELOCATION":
            owner, symbol, address = agent.RELOCATION.unpack(payload)
            if (owner.rstrip(b"\0"), symbol.rstrip(b"\0")) == (b"kernel", b"_stext"):
                return cast(int, address)
    return None


def test_the_kernels_addresses_are_scanned_once_a_boot(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path, **HELLO_EXIT)
    boot_id = tmp_path / "root/proc/sys/kernel/random/boot_id"
    boot_id.parent.mkdir(parents=True)
    kallsyms = tmp_path / "root/proc/kallsyms"
    moved = "ffffffff9e000000 T _stext\n"

    boot_id.write_text("first\n")
    drive(kernel, run_request(tmp_path))  # scanned, and kept for this boot
    kallsyms.write_text(moved)  # what a new scan would find
    drive(kernel, run_request(tmp_path))
    boot_id.write_text("second\n")
    drive(kernel, run_request(tmp_path))
    kallsyms.write_text("0000000000000000 T _stext\n")  # hidden: not worth keeping
    boot_id.write_text("third\n")
    drive(kernel, run_request(tmp_path))
    kallsyms.write_text(moved)
    drive(kernel, run_request(tmp_path))

    assert [sent_stext(m) for m in kernel.history] == [
        ADDRESSES["_stext"], ADDRESSES["_stext"], 0xFFFFFFFF9E000000, 0, 0xFFFFFFFF9E000000]


def test_the_module_is_renamed_per_run(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path, **HELLO_EXIT)
    request = run_request(tmp_path, params={"who": "a b", "count": 3}, bufsize_mb=4)
    outcome = drive(kernel, request)

    loaded, params = kernel.loads[0]
    original = request["module_name"]
    assert loaded != original and len(loaded) == len(original)
    assert loaded.endswith(f"_{os.getpid()}")
    assert outcome.events_named("loaded")[0]["module"] == loaded
    assert outcome.events_named("unloaded")[0]["module"] == loaded
    assert params == '_stp_bufsize=4 count=3 who="a b"'


def test_output_is_merged_across_cpus_in_sequence(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path, running=[
        ("print", 0, b"one\n"), ("print", 1, b"two\n"), ("print", 1, b"three\n"),
        ("print", 0, b"four\n"), ("request_exit",)])
    outcome = drive(kernel, run_request(tmp_path))
    assert outcome.output == b"one\ntwo\nthree\nfour\n"
    assert outcome.result["stats"]["lost_records"] == 0


def test_a_missing_sequence_number_is_waited_for_then_counted(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path, running=[
        ("print", 0, b"a\n"), ("skip_seq",), ("print", 1, b"c\n"), ("sleep", 0.5),
        ("print", 0, b"d\n"), ("request_exit",)])
    outcome = drive(kernel, run_request(tmp_path))
    assert outcome.output == b"a\nc\nd\n"
    assert outcome.result["stats"]["lost_records"] == 1
    assert outcome.result["status"] == "ok"


@pytest.mark.parametrize("generation", [4, 5])
def test_desynced_relay_data_is_skipped(tmp_path: Path, generation: int) -> None:
    junk = b"stale bytes of a lost record" + struct.pack("=II", 7, 0)
    kernel = kernel_for(tmp_path, generation=generation, running=[
        ("print", 0, b"before\n"), ("raw", 0, junk), ("print", 0, b"after\n"),
        ("request_exit",)])
    outcome = drive(kernel, run_request(tmp_path))
    assert outcome.output == b"before\nafter\n"
    stats = outcome.result["stats"]
    assert stats["desyncs"] == 1 and stats["lost_bytes"] > 0
    assert outcome.result["status"] == "ok"


def test_each_cpus_relay_file_is_read_on_that_cpu(tmp_path: Path) -> None:
    # Read from elsewhere, a relay read races with the CPU's own writer (stapio pins too).
    kernel = kernel_for(tmp_path, cpus=3, running=[
        ("print", 2, b"two\n"), ("sleep", 0.3), ("print", 0, b"zero\n"), ("request_exit",)])
    outcome = drive(kernel, run_request(tmp_path))
    assert outcome.output == b"two\nzero\n"
    moves = kernel.placements
    assert {2} in moves and {0} in moves and {1} not in moves  # only files with data
    assert moves[-1] == {0, 1, 2}  # and back home after reading


def test_a_record_dropped_by_4x_leaves_stale_bytes_that_are_skipped(tmp_path: Path) -> None:
    # 4.x drops a record whose header does not fit at a sub-buffer's end and leaves those
    # (up to 8) bytes stale; here they look like the start of an old header.
    stale = struct.pack("=II", 1, 1000)[:5]
    kernel = kernel_for(tmp_path, generation=4, running=[
        ("print", 0, b"before\n"), ("skip_seq",), ("raw", 0, stale),
        ("print", 0, b"after\n"), ("request_exit",)])
    outcome = drive(kernel, run_request(tmp_path))
    assert outcome.output == b"before\nafter\n"
    assert outcome.result["stats"]["lost_records"] == 1


def test_garbage_and_short_control_messages_are_ignored(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path, running=[
        ("ctl", b"\x01\x02"), ("ctl", struct.pack("=I", 999) + b"junk"),
        ("ctl", struct.pack("=I", agent.message_type("START", 5)) + b"\x01"),
        ("print", 0, b"still here\n"), ("request_exit",)])
    outcome = drive(kernel, run_request(tmp_path))
    assert outcome.result["status"] == "ok"
    assert outcome.output == b"still here\n"


def test_start_failure_reports_the_modules_error(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path, start_res=-1, begin=[
        ("oob", "ERROR: Can't resolve uprobe_get_swbp_addr!\n")])
    request = run_request(tmp_path)
    outcome = drive(kernel, request)

    assert outcome.result["status"] == "failed"
    assert outcome.result["kind"] == "start-failed"
    assert "Can't resolve uprobe_get_swbp_addr!" in outcome.result["message"]
    assert "EXIT" not in [n for n, _ in kernel.history[0].received]
    assert "unloaded" in outcome.event_names()
    assert_cleaned_up(kernel, request)


def test_an_exit_that_never_comes_detaches_and_unloads(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path, answer_exit=False, running=[("request_exit",)])
    request = run_request(tmp_path, exit_timeout=0.3)
    outcome = drive(kernel, request)
    assert outcome.result["kind"] == "timed-out"
    assert "did not answer EXIT" in outcome.result["message"]
    assert_cleaned_up(kernel, request)


def test_ebusy_on_open_is_retried(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path, ebusy_opens=3, **HELLO_EXIT)
    outcome = drive(kernel, run_request(tmp_path))
    assert outcome.result["status"] == "ok"


def test_a_control_channel_that_stays_busy_fails_the_start(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path, ebusy_opens=1000)
    request = run_request(tmp_path)
    outcome = drive(kernel, request)
    assert outcome.result["kind"] == "start-failed"
    assert "control channel" in outcome.result["message"]
    assert_cleaned_up(kernel, request)


def test_unload_is_retried_while_busy(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path, busy_unloads=3, **HELLO_EXIT)
    request = run_request(tmp_path)
    outcome = drive(kernel, request)
    assert outcome.result["status"] == "ok"
    assert kernel.unload_calls == 4
    assert_cleaned_up(kernel, request)


def test_a_stop_op_runs_end_probes_and_reports_stopped(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path, running=[("print", 0, b"tick\n")],
                       end=[("print", 1, b"bye\n")])
    request = run_request(tmp_path)
    outcome = drive(kernel, request, lines=[(0.3, '{"op": "ping"}'), (0.1, '{"op": "stop"}')])
    assert outcome.result["status"] == "failed" and outcome.result["kind"] == "stopped"
    assert outcome.events_named("stopping")[0]["reason"] == "stop"
    assert outcome.output == b"tick\nbye\n"
    assert outcome.code == 1
    assert_cleaned_up(kernel, request)


def test_stdin_eof_means_the_controller_is_gone(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path)
    request = run_request(tmp_path)
    outcome = drive(kernel, request, close_stdin_after=0.3)
    assert outcome.result["kind"] == "transport-lost"
    assert outcome.events_named("stopping")[0]["reason"] == "controller-gone"
    assert_cleaned_up(kernel, request)


def test_the_dead_man_stops_a_silent_controller(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path)
    request = run_request(tmp_path, deadman=0.4)
    outcome = drive(kernel, request)
    assert outcome.result["kind"] == "transport-lost"
    assert outcome.events_named("stopping")[0]["reason"] == "deadman"
    assert_cleaned_up(kernel, request)


def test_pings_keep_the_dead_man_quiet(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path)
    pings = [(0.2, '{"op": "ping"}')] * 8 + [(0.1, '{"op": "stop"}')]
    outcome = drive(kernel, run_request(tmp_path, deadman=1.0), lines=pings)
    assert outcome.events_named("stopping")[0]["reason"] == "stop"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_stops_the_run(tmp_path: Path, signum: signal.Signals) -> None:
    kernel = kernel_for(tmp_path)
    request = run_request(tmp_path)

    def signal_once_started() -> None:  # the agent's handler is in place by then
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if kernel.history and "START" in [n for n, _ in kernel.history[0].received]:
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.02)

    threading.Thread(target=signal_once_started, daemon=True).start()
    outcome = drive(kernel, request)
    assert outcome.result["kind"] == "stopped"
    assert outcome.events_named("stopping")[0]["reason"] == "signal"
    assert_cleaned_up(kernel, request)
    assert signal.getsignal(signum) is not None  # the agent put the old handler back


def test_reaching_the_duration_is_ok(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path, end=[("print", 0, b"end\n")])
    outcome = drive(kernel, run_request(tmp_path, duration=0.3))
    assert outcome.result["status"] == "ok"
    assert outcome.events_named("stopping")[0]["reason"] == "duration"
    assert outcome.output == b"end\n"


def test_a_runtime_error_fails_the_run(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path, running=[
        ("oob", "ERROR: division by zero near identifier 'x'\n"), ("request_exit",)])
    request = run_request(tmp_path)
    outcome = drive(kernel, request)
    assert outcome.result["kind"] == "runtime-error"
    assert outcome.result["message"] == "division by zero near identifier 'x'"
    assert outcome.events_named("error")[0]["text"] == "division by zero near identifier 'x'"
    assert outcome.events_named("stopping")[0]["reason"] == "error"
    assert_cleaned_up(kernel, request)


def test_warnings_are_counted_and_shown_once(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path, running=[
        ("oob", "WARNING: skipped probe\n"), ("oob", "WARNING: skipped probe\n"),
        ("oob", "WARNING: other\n"), ("request_exit",)],
        end=[("oob", "WARNING: There were 7 transport failures. Try stap -s to increase "
                     "the buffer size from 16.\n")])
    outcome = drive(kernel, run_request(tmp_path))
    texts = [e["text"] for e in outcome.events_named("warning")]
    assert texts[:2] == ["skipped probe", "other"]
    assert texts[2].startswith("There were 7 transport failures")
    assert outcome.result["stats"]["warnings"] == 4
    assert outcome.result["stats"]["transport_failures"] == 7
    assert outcome.result["status"] == "ok"


def test_system_runs_the_command_and_forwards_its_output(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    kernel = kernel_for(tmp_path, running=[
        ("system", f"echo from-system; touch {marker}"), ("sleep", 0.5),
        ("request_exit",)])
    outcome = drive(kernel, run_request(tmp_path))
    assert b"from-system\n" in outcome.output
    assert marker.exists()
    assert outcome.result["stats"]["bytes"] == 0  # probe output only


def test_a_system_command_outliving_the_module_still_reaches_the_controller(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path, running=[("system", "sleep 0.5; echo late"),
                                           ("request_exit",)])
    request = run_request(tmp_path)
    outcome = drive(kernel, request)
    assert outcome.output == b"late\n"
    assert outcome.types[-3:] == ["E", "O", "R"]  # unloaded first: the module did not wait
    assert_cleaned_up(kernel, request)


def test_a_system_command_that_never_ends_is_left_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent.Run, "children_wait", 0.5)
    kernel = kernel_for(tmp_path, running=[("system", "echo early; exec sleep 30"),
                                           ("sleep", 0.3), ("request_exit",)])
    started = time.monotonic()
    outcome = drive(kernel, run_request(tmp_path))
    assert outcome.output == b"early\n" and outcome.result["status"] == "ok"
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("err, words", [
    (errno.EEXIST, "already loaded"), (errno.ENOEXEC, "built for another kernel"),
    (errno.ENOENT, "unknown symbol"), (agent.EKEYREJECTED, "signature"),
    (errno.EPERM, "signed modules")])
def test_insmod_errors_are_explained(tmp_path: Path, err: int, words: str) -> None:
    kernel = kernel_for(tmp_path, load_errno=err)
    request = run_request(tmp_path)
    outcome = drive(kernel, request)
    assert outcome.result["kind"] == "insmod-refused"
    assert words in outcome.result["message"]
    assert errno.errorcode[err] in outcome.result["message"]
    assert kernel.unload_calls == 0
    assert_cleaned_up(kernel, request)


def refused(tmp_path: Path, kernel: FakeKernel, **overrides: Any) -> str:
    request = run_request(tmp_path, **overrides)
    outcome = drive(kernel, request)
    assert outcome.result["kind"] == "preflight-refused", outcome.result
    assert kernel.loads == []
    assert_cleaned_up(kernel, request)
    message: str = outcome.result["message"]
    return message


def test_preflight_refuses_a_non_root_agent(tmp_path: Path) -> None:
    kernel = FakeKernel(tmp_path / "root", euid=1000)
    assert "not root" in refused(tmp_path, kernel)


def test_preflight_refuses_when_modules_are_disabled(tmp_path: Path) -> None:
    kernel = FakeKernel(tmp_path / "root", modules_disabled=1)
    assert "modules_disabled" in refused(tmp_path, kernel)


@pytest.mark.parametrize("action", ["run", "preflight"])
def test_a_corrupt_upload_is_deleted_and_refused(tmp_path: Path, action: str) -> None:
    # deleted, so the controller's next upload (sent only when the file is missing) fixes it
    kernel = FakeKernel(tmp_path / "root")
    request = run_request(tmp_path, action=action, sha256="0" * 64, remove_files=[])
    outcome = drive(kernel, request)
    assert outcome.result["kind"] == "preflight-refused"
    assert "sha256 mismatch" in outcome.result["message"]
    assert not os.path.exists(request["module"])
    assert kernel.loads == []


def with_module(request: dict[str, Any], image: bytes) -> bytes:
    """The request as the controller sends it to a host without its module: the module's
    bytes after the line."""
    return (json.dumps(dict(request, module_size=len(image))) + "\n").encode() + image


def sent_module(tmp_path: Path, **overrides: Any) -> tuple[dict[str, Any], bytes]:
    """A request naming <sha256>.ko in a work folder where it is not yet, and its bytes."""
    path, digest, name = module_file(tmp_path)
    with open(path, "rb") as f:
        image = f.read()
    workdir = tmp_path / "work"
    workdir.mkdir(mode=0o700)
    request = run_request(tmp_path, module=str(workdir / (digest + ".ko")), sha256=digest,
                          module_name=name, remove_files=[], **overrides)
    return request, image


@pytest.mark.parametrize("action", ["run", "preflight", "targets"])
def test_a_module_sent_with_the_request_is_kept_private_and_used(tmp_path: Path,
                                                                action: str) -> None:
    kernel = kernel_for(tmp_path, **HELLO_EXIT)
    request, image = sent_module(tmp_path, action=action)
    outcome = drive(kernel, with_module(request, image))
    # `targets` (the matching PIDs, before one run each) here names none: its error
    assert outcome.result["status"] == "ok" or action == "targets", outcome.result
    with open(request["module"], "rb") as f:
        assert f.read() == image
    assert os.stat(request["module"]).st_mode & 0o777 == 0o600
    assert os.listdir(os.path.dirname(request["module"])) == [os.path.basename(
        request["module"])]  # no partial file left
    if action == "run":
        assert outcome.output == b"hello, world!\n" and len(kernel.loads) == 1
    assert_cleaned_up(kernel, request)


def test_a_module_sent_that_is_not_the_one_named_is_refused_and_not_kept(
        tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path, **HELLO_EXIT)
    request, image = sent_module(tmp_path)
    outcome = drive(kernel, with_module(request, image[:-1] + b"?"))
    assert outcome.result["kind"] == "preflight-refused"  # the controller sends it again
    assert "sha256 mismatch" in outcome.result["message"]
    assert not os.path.exists(request["module"]) and kernel.loads == []


@pytest.mark.parametrize("where", ["relative.ko", "/elsewhere/other.ko"])
def test_a_module_sent_is_kept_only_as_its_sha256(tmp_path: Path, where: str) -> None:
    kernel = kernel_for(tmp_path, **HELLO_EXIT)
    request, image = sent_module(tmp_path)
    outcome = drive(kernel, with_module(dict(request, module=where), image))
    assert outcome.result["kind"] == "agent-error"
    assert "<sha256>.ko" in outcome.result["message"] and kernel.loads == []


@pytest.mark.parametrize("size", [0, -1, "10", True, agent.MAX_MODULE + 1])
def test_a_module_size_that_is_no_size_is_refused(tmp_path: Path, size: object) -> None:
    kernel = kernel_for(tmp_path, **HELLO_EXIT)
    request, image = sent_module(tmp_path)
    outcome = drive(kernel, (json.dumps(dict(request, module_size=size)) + "\n").encode())
    assert outcome.result["kind"] == "agent-error"
    assert "module_size" in outcome.result["message"] and kernel.loads == []


def test_a_module_cut_short_is_refused(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path, **HELLO_EXIT)
    request, image = sent_module(tmp_path)
    outcome = drive(kernel, with_module(request, image)[:-10], close_stdin_after=0.2)
    assert outcome.result["kind"] == "agent-error"
    assert f"stdin closed after {len(image) - 10} of the module's {len(image)} bytes" \
        in outcome.result["message"]
    assert not os.path.exists(request["module"]) and kernel.loads == []


def test_a_good_upload_is_kept_and_touched(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path, **HELLO_EXIT)
    request = run_request(tmp_path, remove_files=[])
    os.utime(request["module"], (1000, 1000))
    outcome = drive(kernel, request)
    assert outcome.result["status"] == "ok"
    assert time.time() - os.stat(request["module"]).st_mtime < 60


def test_preflight_refuses_a_missing_module(tmp_path: Path) -> None:
    kernel = FakeKernel(tmp_path / "root")
    assert "is not on this host" in refused(tmp_path, kernel, module=str(tmp_path / "nope.ko"))


def test_preflight_refuses_a_module_for_another_release(tmp_path: Path) -> None:
    kernel = FakeKernel(tmp_path / "root")
    path, digest, name = module_file(tmp_path, name="stapctl_fedcba9876543210",
                                     vermagic="6.1.0-99-amd64 SMP modversions ")
    message = refused(tmp_path, kernel, module=path, sha256=digest, module_name=name,
                      remove_files=[path])
    assert "built for kernel 6.1.0-99-amd64" in message


def test_preflight_refuses_a_wrong_module_name(tmp_path: Path) -> None:
    kernel = FakeKernel(tmp_path / "root")
    assert "not the name embedded" in refused(tmp_path, kernel, module_name="stap_other")


def test_preflight_refuses_an_unsigned_module_under_lockdown(tmp_path: Path) -> None:
    kernel = FakeKernel(tmp_path / "root", lockdown="integrity")
    assert "only loads signed modules" in refused(tmp_path, kernel)


@pytest.mark.parametrize("params, words", [
    ({"bad name": "x"}, "not an identifier"), ({"x": 'say "hi"'}, "double quote"),
    ({"x": "a\nb"}, "newline"), ({"_stp_bufsize": 1}, "reserved"), ({"x": 1.5}, "float"),
    # UTF-8 \u00e0 is C3 A0: the kernel's parser ends the value at A0 and reads the rest
    # as another parameter, here one of the runtime's
    ({"x": "\u00e0_stp_bufsize=64"}, "0xa0"), ({"x": "no\u00a0break"}, "0xa0"),
    ({"x": "a\tb"}, "control byte 0x09"), ({"x": "a\rb"}, "control byte 0x0d"),
    ({"x": "a\x7fb"}, "control byte 0x7f"), ({"x": "\ud800"}, "not valid UTF-8")])
def test_preflight_refuses_bad_parameters(tmp_path: Path, params: Any, words: str) -> None:
    kernel = FakeKernel(tmp_path / "root")
    assert words in refused(tmp_path, kernel, params=params)


def test_other_non_ascii_parameter_values_pass(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path, **HELLO_EXIT)
    outcome = drive(kernel, run_request(tmp_path, params={"who": "caf\u00e9 \u20ac"}))
    assert outcome.result["status"] == "ok", outcome.result
    assert kernel.loads[0][1] == '_stp_bufsize=0 who="caf\u00e9 \u20ac"'


def test_facts_and_preflight_actions(tmp_path: Path) -> None:
    kernel = FakeKernel(tmp_path / "root", lockdown="integrity", sig_enforce="Y")
    outcome = drive(kernel, {"protocol": 1, "action": "facts"})
    facts = outcome.result["facts"]
    assert outcome.result["status"] == "ok"
    assert facts["release"] == "6.1.0-test-amd64" and facts["arch"] == "x86_64"
    assert facts["lockdown"] == "integrity" and facts["sig_enforce"] is True
    assert facts["modules_disabled"] is False and facts["fips"] is False
    assert facts["mem_available_kb"] == 523456 and facts["kptr_restrict"] == 0
    assert facts["loaded_stap_modules"] == ["stap_old"] and facts["procfs"] is True
    assert facts["euid"] == 0 and facts["module_support"] is True

    request = run_request(tmp_path, action="preflight")
    outcome = drive(FakeKernel(tmp_path / "root2"), request)
    assert outcome.result["status"] == "ok" and "can be loaded" in outcome.result["message"]
    assert outcome.result["facts"]["release"] == "6.1.0-test-amd64"


def test_an_unexpected_exception_is_reported_and_cleaned_up(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path)

    def broken(name: str) -> list[tuple[int, int]]:
        raise RuntimeError("relay dir vanished")

    kernel.open_relays = broken  # type: ignore[method-assign]  # a failure injected
    request = run_request(tmp_path)
    outcome = drive(kernel, request)
    assert outcome.result["kind"] == "agent-error"
    assert "RuntimeError: relay dir vanished" in outcome.result["message"]
    assert "Traceback" in outcome.result["message"]
    assert_cleaned_up(kernel, request)


def test_a_broken_stdout_does_not_stop_the_cleanup(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path, running=[("print", 0, b"x\n"), ("sleep", 0.3),
                                           ("request_exit",)])
    request = run_request(tmp_path)
    code = drive(kernel, request, read_stdout=False)
    assert code == 0
    assert_cleaned_up(kernel, request)


@pytest.mark.parametrize("request_line, words", [
    (b"not json\n", "not JSON"), (b'{"protocol": 2, "action": "run"}\n', "protocol 2"),
    (b'{"protocol": 1, "action": "dance"}\n', "unknown action")])
def test_bad_requests_are_agent_errors(tmp_path: Path, request_line: bytes,
                                      words: str) -> None:
    outcome = drive(kernel_for(tmp_path), request_line)
    assert outcome.result["kind"] == "agent-error" and words in outcome.result["message"]


# ---------------------------------------------------------------- compressed output

def test_compressed_output_arrives_identical(tmp_path: Path) -> None:
    lines = [b"%08d %s\n" % (i, b"x" * 70) for i in range(3000)]
    prints = [("print", i % 2, line) for i, line in enumerate(lines)]
    plain = drive(kernel_for(tmp_path / "plain", running=prints + [("request_exit",)]),
                  run_request(tmp_path))
    kernel = kernel_for(tmp_path / "z", running=prints + [("system", "echo from system"),
                                                          ("sleep", 0.3), ("request_exit",)])
    request = run_request(tmp_path, compress=1)
    outcome = drive(kernel, request)

    assert "O" not in outcome.types and "Z" in outcome.types
    assert plain.output == b"".join(lines) and "Z" not in plain.types
    # system()'s output joins whenever it comes, as in plain frames
    assert outcome.output.count(b"from system\n") == 1
    assert outcome.output.replace(b"from system\n", b"") == b"".join(lines)
    wire = sum(len(p) for t, p in outcome.frames if t == "Z")
    assert wire * 5 < len(outcome.output)
    assert outcome.result["status"] == "ok"
    assert outcome.result["stats"]["bytes"] == len(b"".join(lines))
    assert outcome.result["stats"]["lost_records"] == 0
    assert outcome.event_names() == ["facts", "loaded", "started", "stopping", "unloaded"]
    assert_cleaned_up(kernel, request)


def test_compressed_output_is_not_held_back(tmp_path: Path) -> None:
    # a line printed into an otherwise idle stream reaches the controller within ~100 ms
    kernel = kernel_for(tmp_path, running=[("print", 0, b"early\n"), ("sleep", 1.0),
                                           ("print", 1, b"late\n"), ("request_exit",)])
    outcome = drive(kernel, run_request(tmp_path, compress=1))
    assert outcome.output == b"early\nlate\n" and "Z" in outcome.types
    started = outcome.arrivals[0][0]  # the HELLO
    early, late = outcome.output_time(b"early\n"), outcome.output_time(b"late\n")
    assert early is not None and late is not None
    assert early - started < 0.5
    assert late - early > 0.8


@pytest.mark.parametrize("value", [0, None, "1", True, 10, -1])
def test_a_compress_field_it_cannot_use_means_plain_output(tmp_path: Path, value: Any) -> None:
    outcome = drive(kernel_for(tmp_path, **HELLO_EXIT), run_request(tmp_path, compress=value))
    assert outcome.output == b"hello, world!\n" and "Z" not in outcome.types
    assert outcome.result["status"] == "ok"


def test_a_broken_stdout_does_not_stop_the_cleanup_with_compression(tmp_path: Path) -> None:
    kernel = kernel_for(tmp_path, running=[("print", 0, b"x" * 1000)] * 50 + [
        ("sleep", 0.3), ("request_exit",)])
    request = run_request(tmp_path, compress=6)
    code = drive(kernel, request, read_stdout=False)
    assert code == 0
    assert_cleaned_up(kernel, request)


# ---------------------------------------------------------------- heartbeat

def test_a_quiet_run_sends_heartbeats_and_a_busy_one_does_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent, "HEARTBEAT_INTERVAL", 0.5)
    busy = [action for i in range(30) for action in (("print", 0, b"%d\n" % i), ("sleep", 0.05))]
    kernel = kernel_for(tmp_path, running=busy + [("sleep", 1.8), ("request_exit",)])
    outcome = drive(kernel, run_request(tmp_path))
    assert outcome.result["status"] == "ok"
    assert outcome.output == b"".join(b"%d\n" % i for i in range(30))

    kinds = [("heartbeat" if t == "E" and b'"heartbeat"' in p else t) for t, p in outcome.frames]
    first_output, last_output = kinds.index("O"), len(kinds) - 1 - kinds[::-1].index("O")
    assert "heartbeat" not in kinds[first_output:last_output]  # output kept the line busy
    beats = [e for e in outcome.events if e["event"] == "heartbeat"]
    assert 2 <= len(beats) <= 4, kinds  # 1.8 s of silence, one per 0.5 s
    assert beats == [{"event": "heartbeat"}] * len(beats)
    names = outcome.event_names()
    assert names.index("started") < names.index("heartbeat") and "heartbeat" not in \
        names[names.index("stopping"):]


def test_heartbeats_come_at_the_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent, "HEARTBEAT_INTERVAL", 0.3)
    kernel = kernel_for(tmp_path)
    outcome = drive(kernel, run_request(tmp_path, duration=2.0))
    times = heartbeat_times(outcome)
    assert 4 <= len(times) <= 7, times
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(0.25 < gap < 0.6 for gap in gaps), gaps


def heartbeat_times(outcome: Outcome) -> list[float]:
    """When each heartbeat event reached the controller."""
    reader, times = agent.FrameReader(), []
    for when, chunk in outcome.arrivals:
        for ftype, payload in reader.feed(chunk):
            if ftype == agent.FRAME_EVENT and b'"heartbeat"' in payload:
                times.append(when)
    return times


# ---------------------------------------------------------------- the work directory

DAY = 86400


def test_stale_uploads_are_removed_and_fresh_ones_kept(tmp_path: Path) -> None:
    now = time.time()
    ages = {"a" * 64 + ".ko": 8 * DAY, "b" * 64 + ".ko": 6 * DAY,
            "agent-0123456789abcdef.py": 8 * DAY, "agent-fedcba9876543210.py": 1 * DAY,
            "c" * 64 + ".ko.1a2b3c4d.part": 2 * 3600, "d" * 64 + ".ko.5e6f7a8b.part": 600,
            "notes.txt": 30 * DAY, "stapctl_x.ko": 30 * DAY, "e" * 63 + ".ko": 30 * DAY,
            "agent-mine.py": 30 * DAY, "agent-aaaa.py": 30 * DAY}
    for name, age in ages.items():
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, (now - age, now - age))
    agent.remove_stale_files(str(tmp_path), str(tmp_path / "agent-aaaa.py"), now)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        "b" * 64 + ".ko", "agent-fedcba9876543210.py", "d" * 64 + ".ko.5e6f7a8b.part",
        "notes.txt", "stapctl_x.ko", "e" * 63 + ".ko", "agent-mine.py", "agent-aaaa.py"])


def test_bytecode_of_agents_that_are_gone_is_removed(tmp_path: Path) -> None:
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    (tmp_path / "agent-aaaa.py").write_text("x")
    names = ["agent-aaaa.cpython-311.pyc", "agent-bbbb.cpython-311.pyc",
             "agent-bbbb.cpython-36.opt-1.pyc", "other.cpython-311.pyc"]
    for name in names:
        (cache / name).write_text("x")
    agent.remove_stale_files(str(tmp_path), str(tmp_path / "agent-aaaa.py"))
    assert sorted(p.name for p in cache.iterdir()) == [
        "agent-aaaa.cpython-311.pyc", "other.cpython-311.pyc"]


def test_a_run_cleans_its_work_directory(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    path, digest, name = module_file(tmp_path)
    module = workdir / (digest + ".ko")
    os.rename(path, module)
    old = time.time() - 8 * DAY
    os.utime(module, (old, old))  # in use now, however old
    stale = workdir / ("f" * 64 + ".ko")
    stale.write_text("old module")
    os.utime(stale, (old, old))
    kernel = kernel_for(tmp_path, **HELLO_EXIT)
    request = run_request(tmp_path, module=str(module), sha256=digest, module_name=name,
                          remove_files=[])
    outcome = drive(kernel, request)
    assert outcome.result["status"] == "ok", outcome.result
    assert module.exists() and not stale.exists()


@pytest.mark.parametrize("loads", [False, True])
def test_an_agent_told_it_will_load_readies_its_loader_before_its_request(
        tmp_path: Path, loads: bool) -> None:
    readied: list[str] = []

    class Loader(FakeKernel):
        def libc(self) -> None:
            readied.append("libc")

    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    os.close(stdin_w)  # the request never comes: only what precedes reading it runs
    try:
        code = agent.serve(Loader(tmp_path), stdin_r, stdout_w, loads=loads)
    finally:
        os.close(stdin_r)
        os.close(stdout_w)
        os.close(stdout_r)
    assert code == 1
    assert readied == (["libc"] if loads else [])
