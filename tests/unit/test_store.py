"""Run records: private, never through symlinks, never failing the run, bounded in
descriptors and memory."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stapctl import history, report, store
from stapctl.errors import StapctlError
from stapctl.models import (
    Event,
    EventKind,
    FailureKind,
    HostOutcome,
    Manifest,
    ModuleSpec,
    OutputSpec,
    Probe,
    Run,
)
from stapctl.plan import ModuleJob, Plan
from stapctl.store import RunRecorder, file_name, host_log_path, merged_output

pytestmark = pytest.mark.unit


def make_manifest(tmp_path: Path, probes: tuple[str, ...] = ("p",),
                  runs: Path | None = None) -> Manifest:
    path = tmp_path / "m.yaml"
    path.write_text("name: t\n")
    return Manifest(path=path, name="t",
                    probes=tuple(Probe(name, "probe begin {}", str(path), 1) for name in probes),
                    output=OutputSpec(dir=runs or tmp_path / "runs"))


def merged_in_memory(events: list[Event], many_probes: bool) -> list[str]:
    """The merged report computed the plain way, with every line in memory: what the
    streaming one read from disk must equal."""
    per_host: dict[tuple[str, str], list[str]] = defaultdict(list)
    for event in events:
        if event.kind == "output":
            per_host[(event.probe, event.host)].append(event.text)
    groups: dict[tuple[str, tuple[str, ...]], list[str]] = defaultdict(list)
    for (probe, host), lines in per_host.items():
        groups[(probe, tuple(lines))].append(host)
    text: list[str] = []
    for (probe, output), hosts in sorted(groups.items(), key=lambda item: sorted(item[1])):
        text += [*report.merged_heading(hosts, probe, many_probes), *output]
    return text


def make_plan(probe: str = "p") -> Plan:
    spec = ModuleSpec(script="probe begin { exit() }", release="6.1.0", arch="x86_64")
    return Plan((ModuleJob(Probe(probe, "", "m.yaml", 1), spec, ("a",)),))


def history_row(where: str | Path, run_id: str) -> dict[str, object]:
    [row] = [row for row in history.list_runs(history=where) if row["id"] == run_id]
    return row


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def run_python(code: str) -> None:
    """Run a snippet in its own process (for limits that must not touch pytest's)."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, check=False, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr


RUN = Run("r1", (HostOutcome("a", "p", "ok"),
                 HostOutcome("b", "p", "failed", FailureKind.RUNTIME_ERROR)))


# -- the record --------------------------------------------------------------------------
def test_a_run_still_going_is_in_the_history_a_moment_in(
        tmp_path: Path, history_where: str | Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "LISTING_DELAY", 0.3)
    RunRecorder("r1", make_manifest(tmp_path), history_where)
    deadline = time.monotonic() + 30
    while not history.list_runs(history=history_where) and time.monotonic() < deadline:
        time.sleep(0.05)
    [row] = history.list_runs(history=history_where)
    assert row["id"] == "r1" and row["finished"] is None


def test_the_history_library_is_imported_once_every_probe_of_the_plan_has_ended(
        tmp_path: Path) -> None:
    """Its import (a third of a second of CPU) overlaps the end of a short run, which
    waits on its targets, and not another host's probe still loading or printing; the row
    itself is still added when LISTING_DELAY is up."""
    run_python(f"""
        import sys, time
        from pathlib import Path
        from stapctl import store
        from stapctl.models import Event, Manifest, ModuleSpec, OutputSpec, Probe
        from stapctl.plan import ModuleJob, Plan
        store.LISTING_DELAY = 60.0
        manifest = Manifest(path=Path("t.yaml"), name="t", probes=(),
                            output=OutputSpec(dir=Path({str(tmp_path)!r})))
        where = Path({str(tmp_path / "h.sqlite")!r})
        recorder = store.RunRecorder("r1", manifest, where)
        spec = ModuleSpec(script="probe begin {{ exit() }}", release="6.1.0", arch="x86_64")
        recorder.plan(Plan((ModuleJob(Probe("p", "", "m.yaml", 1), spec, ("a", "b")),)))
        recorder.event(Event("a", "stopping", "p", "exit()"))
        recorder.event(Event("b", "output", "p", "hello"))
        recorder.event(Event("b", "stopping", "other", "exit()"))  # not a probe of the plan
        time.sleep(0.5)
        assert "stapctl.history" not in sys.modules, "imported while b's probe runs"
        recorder.event(Event("b", "failed", "p", "runtime-error: gone"))
        deadline = time.monotonic() + 30
        while "stapctl.history" not in sys.modules and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "stapctl.history" in sys.modules, "not imported after every probe ended"
        from stapctl import history
        time.sleep(0.5)
        assert history.list_runs(history=where) == []  # the row: not before its time
    """)


def test_a_run_is_recorded_in_its_folder_and_the_history(tmp_path: Path,
                                                         history_where: str | Path) -> None:
    recorder = RunRecorder("r1", make_manifest(tmp_path), history_where)
    recorder.event(Event("a", "output", "p", "hello"))
    recorder.event(Event("a", "finished", "p"))
    recorder.plan(make_plan())
    recorder.finish(RUN)
    folder = tmp_path / "runs" / "r1"
    assert recorder.warnings == []
    assert host_log_path(folder, "a").read_text() == "hello\n"
    assert [json.loads(line)["kind"] for line in
            (folder / "events.jsonl").read_text().splitlines()] == ["output", "finished"]
    assert (folder / "manifest.yaml").read_text() == "name: t\n"
    assert json.loads((folder / "plan.json").read_text())[0]["probe"] == "p"
    assert len(list((folder / "scripts").iterdir())) == 1
    assert json.loads((folder / "summary.json").read_text())["exit_code"] == 3
    row = history_row(history_where, "r1")
    assert (row["exit_code"], row["hosts"], row["ok"], row["failed"]) == (3, 2, 1, 1)
    assert row["controller"] == store.controller_name() and row["dir"] == str(folder)
    assert history.find_run("r", history_where) == row
    assert sorted(p.name for p in folder.iterdir()) == [
        "events.jsonl", "hosts", "manifest.yaml", "plan.json", "scripts", "summary.json"]


def test_records_are_private_to_their_owner(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "share"))
    old_umask = os.umask(0o022)
    try:
        store.data_dir().mkdir(parents=True, mode=0o755)  # as an older stapctl left it
        manifest = make_manifest(tmp_path)
        recorder = RunRecorder("r1", Manifest(manifest.path, "t", manifest.probes))
        recorder.event(Event("a", "output", "p", "secret"))
        recorder.plan(make_plan())
        recorder.finish(RUN)
    finally:
        os.umask(old_umask)
    data = store.data_dir()
    folder = data / "runs" / "r1"
    assert recorder.warnings == [] and folder == recorder.dir
    assert mode(data) == mode(data / "runs") == 0o700
    assert mode(data / "history.sqlite") == 0o600
    dirs = [folder, folder / "hosts", folder / "scripts"]
    assert {mode(d) for d in dirs} == {0o700}
    files = [p for d in dirs for p in d.iterdir() if not p.is_dir()]
    assert len(files) == 6 and {mode(f) for f in files} == {0o600}


def test_a_run_folder_that_is_a_symlink_is_refused(tmp_path: Path,
                                                   history_where: str | Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r1").symlink_to(elsewhere)
    recorder = RunRecorder("r1", make_manifest(tmp_path), history_where)
    recorder.event(Event("a", "output", "p", "secret"))
    recorder.plan(make_plan())
    recorder.finish(RUN)
    assert list(elsewhere.iterdir()) == []
    assert recorder.warnings == [
        f"run record {recorder.dir} is incomplete: cannot create the run folder: File exists"]
    assert history_row(history_where, "r1")["exit_code"] == 3  # the history still has it


def test_files_in_the_run_folder_are_never_written_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("untouched")
    recorder = RunRecorder("r1", make_manifest(tmp_path), tmp_path / "history.sqlite")
    host_log_path(recorder.dir, "a").symlink_to(target)
    (recorder.dir / "summary.json").symlink_to(target)
    (recorder.dir / ".plan.json.tmp").symlink_to(target)
    recorder.event(Event("a", "output", "p", "evil"))
    recorder.plan(make_plan())
    recorder.finish(RUN)
    assert target.read_text() == "untouched"
    assert not (recorder.dir / "summary.json").is_symlink()  # replaced, not followed
    assert json.loads((recorder.dir / "summary.json").read_text())["run"] == "r1"
    assert len(recorder.warnings) == 2
    assert all("Too many levels of symbolic links" in w for w in recorder.warnings)


def test_plan_and_summary_are_replaced_whole_or_not_at_all(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = RunRecorder("r1", make_manifest(tmp_path), tmp_path / "history.sqlite")
    recorder.plan(make_plan("first"))

    def failing_fsync(fd: int) -> None:  # test double: the disk fills up before the rename
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr("stapctl.store.os.fsync", failing_fsync)
    recorder.plan(make_plan("second"))
    recorder.finish(RUN)
    assert json.loads((recorder.dir / "plan.json").read_text())[0]["probe"] == "first"
    assert not (recorder.dir / "summary.json").exists()
    assert not list(recorder.dir.glob(".*"))  # no temporary file left behind
    assert len(recorder.warnings) == 2
    assert all(w.endswith("No space left on device") for w in recorder.warnings)


# -- failures never end the run ----------------------------------------------------------
def test_a_full_disk_truncates_the_record_but_the_run_is_still_finished(
        tmp_path: Path) -> None:
    history = tmp_path / "history.sqlite"
    run_python(f"""
        import resource, signal
        from pathlib import Path
        from stapctl.models import Event, HostOutcome, Run
        from tests.unit.test_store import make_manifest
        from stapctl.store import RunRecorder

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, as a full disk gives ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
        recorder = RunRecorder("r1", make_manifest(Path({str(tmp_path)!r})),
                               Path({str(history)!r}))
        for i in range(20000):
            recorder.event(Event("a", "output", "p", f"line {{i:06}} " + "x" * 40))
        recorder.finish(Run("r1", (HostOutcome("a", "p", "ok"),)))
        assert len(recorder.warnings) == 2, recorder.warnings
        assert all(w.endswith("File too large") for w in recorder.warnings)
    """)
    folder = tmp_path / "runs" / "r1"
    log = host_log_path(folder, "a").read_text().splitlines()
    assert 1000 < len(log) < 20000
    assert log == [f"line {i:06} " + "x" * 40 for i in range(len(log))]  # whole lines, in order
    assert json.loads((folder / "summary.json").read_text())["exit_code"] == 0
    assert history_row(history, "r1")["exit_code"] == 0


def test_events_delivered_together_are_recorded_as_one_by_one(tmp_path: Path) -> None:
    sources: tuple[tuple[str, EventKind, str], ...] = (
        ("a", "output", "p"), ("b", "output", "q"), ("a", "warning", "p"))
    events = [Event(host, kind, probe, f"{kind} {i} é", time=float(i))
              for i in range(50) for host, kind, probe in sources]
    folders = []
    for name, deliver in (("single", lambda r: [r.event(e) for e in events]),
                          ("batch", lambda r: r.events(events))):
        (tmp_path / name).mkdir()
        recorder = RunRecorder("r1", make_manifest(tmp_path / name, probes=("p", "q")),
                               tmp_path / name / "history.sqlite")
        deliver(recorder)
        recorder.finish(Run("r1", ()))
        assert recorder.warnings == []
        folders.append(recorder.dir)
    single, batch = folders
    assert (batch / "events.jsonl").read_text() == (single / "events.jsonl").read_text()
    assert host_log_path(batch, "a").read_text() == host_log_path(single, "a").read_text() \
        == "".join(f"[p] output {i} é\n" for i in range(50))
    assert host_log_path(batch, "b").read_text() == host_log_path(single, "b").read_text()


def test_an_unwritable_history_still_leaves_the_whole_folder(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    recorder = RunRecorder("r1", make_manifest(tmp_path), tmp_path / "not-a-dir" / "h.sqlite")
    recorder.event(Event("a", "output", "p", "hello"))
    recorder.finish(RUN)
    assert json.loads((recorder.dir / "summary.json").read_text())["exit_code"] == 3
    assert host_log_path(recorder.dir, "a").read_text() == "hello\n"
    assert len(recorder.warnings) == 2
    assert "cannot add the run to the history" in recorder.warnings[0]
    assert "cannot finish the run in the history" in recorder.warnings[1]


def test_a_run_that_cannot_be_recorded_at_all_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    manifest = make_manifest(tmp_path, runs=tmp_path / "file" / "runs")
    with pytest.raises(StapctlError) as error:
        RunRecorder("r1", manifest, tmp_path / "file" / "h.sqlite")
    message = str(error.value)
    assert "\n" not in message and error.value.exit_code == 1
    assert "cannot create the run folder: Not a directory" in message
    assert "cannot add the run to the history" in message


def test_two_thousand_hosts_fit_in_256_open_files(tmp_path: Path) -> None:
    run_python(f"""
        import resource
        from pathlib import Path
        from stapctl.models import Event, Run
        from tests.unit.test_store import make_manifest
        from stapctl.store import RunRecorder

        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        tmp = Path({str(tmp_path)!r})
        recorder = RunRecorder("r1", make_manifest(tmp), tmp / "history.sqlite")
        for line in range(3):
            for host in range(2000):
                recorder.event(Event(f"h{{host}}", "output", "p", f"line {{line}}"))
        recorder.finish(Run("r1", ()))
        assert recorder.warnings == [], recorder.warnings
    """)
    logs = list((tmp_path / "runs" / "r1" / "hosts").iterdir())
    assert len(logs) == 2000
    assert {log.read_text() for log in logs} == {"line 0\nline 1\nline 2\n"}


# -- names -------------------------------------------------------------------------------
def test_host_names_that_look_alike_get_their_own_logs(tmp_path: Path) -> None:
    hosts = ["a/b", "a_b", "a:b", "..", ".", "", "é", "x" * 300, "x" * 301]
    recorder = RunRecorder("r1", make_manifest(tmp_path), tmp_path / "history.sqlite")
    for host in hosts:
        recorder.event(Event(host, "output", "p", f"from {host}"))
    recorder.finish(Run("r1", ()))
    assert recorder.warnings == []
    for host in hosts:
        path = host_log_path(recorder.dir, host)
        assert path.parent == recorder.dir / "hosts"
        assert path.read_text() == f"from {host}\n"
    assert host_log_path(recorder.dir, "web-1.example.com").name == "web-1.example.com.log"


@given(st.text())
def test_file_names_are_one_safe_component_and_stable(name: str) -> None:
    made = file_name(name)
    assert made == file_name(name)
    assert made not in ("", ".", "..") and len(made.encode()) <= 120
    assert all(c.isascii() and (c.isalnum() or c in "-_.~") for c in made)
    assert made == name or "~" in made  # a plain name is never another name's file name


def test_run_ids_that_are_not_plain_names_are_refused(tmp_path: Path) -> None:
    for run_id in ("../r1", "", "..", "r/1"):
        with pytest.raises(StapctlError, match="not a valid run id"):
            RunRecorder(run_id, make_manifest(tmp_path), tmp_path / "history.sqlite")
    assert not (tmp_path / "runs").exists()


def test_probe_names_in_script_file_names_are_made_safe(tmp_path: Path) -> None:
    recorder = RunRecorder("r1", make_manifest(tmp_path), tmp_path / "history.sqlite")
    recorder.plan(make_plan("../../evil"))
    recorder.finish(Run("r1", ()))
    [script] = (recorder.dir / "scripts").iterdir()
    assert script.name.startswith(".._.._evil~") and script.read_text().startswith("probe")


# -- merged output from disk -------------------------------------------------------------
MERGED_CASES = {
    "one probe": (("p",), [("a", "p", "x"), ("b", "p", "x"), ("a", "p", "y"),
                           ("b", "p", "y"), ("c", "p", "z"), ("d", "p", "x")]),
    "many probes": (("p", "q"), [("a", "p", "1"), ("b", "p", "1"), ("a", "q", "[q] 2"),
                                 ("b", "q", "3"), ("c", "q", "3"), ("c", "p", "] 1")]),
    "odd text": (("p",), [("a", "p", "tab\tcr\r"), ("b", "p", ""), ("a", "p", "é ✓"),
                          ("b", "p", "\x0b\x1c"), ("c", "p", "")]),
    "same hosts, two probes": (("p", "q"), [("a", "p", "1"), ("a", "q", "2"),
                                            ("b", "p", "1"), ("b", "q", "2")]),
}


@pytest.mark.parametrize("case", MERGED_CASES)
def test_merged_output_from_disk_is_the_merged_report(tmp_path: Path, case: str) -> None:
    probes, outputs = MERGED_CASES[case]
    events = [Event(host, "output", probe, text) for host, probe, text in outputs]
    events.insert(1, Event("quiet", "started", probes[0]))  # a host that printed nothing
    recorder = RunRecorder("r1", make_manifest(tmp_path, probes), tmp_path / "history.sqlite")
    for event in events:
        recorder.event(event)
    recorder.finish(Run("r1", ()))
    many = len(probes) > 1
    hosts = ["quiet", "d", "c", "b", "a"]
    assert list(merged_output(recorder.dir, hosts, many)) == merged_in_memory(events, many)


def test_merged_output_streams_a_large_run_in_little_memory(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    (folder / "hosts").mkdir(parents=True)
    line = "y" * 99
    for host in range(100):  # 1 MB each: half print the same, half something of their own
        body = "".join(f"{host if host % 2 else 'same'} {i} {line}\n" for i in range(10000))
        host_log_path(folder, f"h{host:03}").write_text(body)
    tracemalloc.start()
    try:
        lines = sum(1 for _ in merged_output(folder, [f"h{h:03}" for h in range(100)], False))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lines == 51 * (3 + 10000)  # one group of 50 hosts, 50 groups of one
    assert peak < 1_000_000, peak  # the run's output is 100 MB


def test_an_unreadable_history_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    for read in (lambda h: history.list_runs(history=h), lambda h: history.find_run("r", h)):
        with pytest.raises(StapctlError, match="^cannot use the run history .*h.sqlite: "):
            read(tmp_path / "file" / "h.sqlite")
