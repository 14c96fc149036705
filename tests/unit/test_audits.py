"""Differential results and retention: runs recorded through the Session against fake
connections running the real agent on tests/agent's FakeKernel (test doubles), then
compared by `apply --baseline`, by `runs diff` (the real CLI) and pruned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stapctl import history, store
from stapctl.agent import Timing
from stapctl.errors import UsageError
from stapctl.execute import RunOptions
from stapctl.manifest import load_diff_spec, load_manifest
from stapctl.models import DiffSpec, HostDifference, Manifest, Run
from stapctl.session import Session
from tests.agent.fakekernel import Scenario
from tests.fleet_double import (
    FakeBuilder,
    FakeFleet,
    quick_agent,  # noqa: F401 - autouse: shortened agent waits
)

pytestmark = pytest.mark.unit

MANIFEST = """\
apiVersion: stapctl/v1
kind: Trace
name: {name}
probes:
  - name: execs
    script: 'probe syscall.execve {{ println(filename) }}'
diff:
  ignore_fields: [1, 2]
  ignore_patterns: ['pid=[0-9]+']
"""
# what a host "prints" in each run: a time (two fields) and a pid change every time
BEFORE = [b"Sun 10:00:01 pid=101 exec /bin/ls", b"Sun 10:00:02 pid=102 exec /bin/cat"]
AFTER = [b"Mon 11:30:01 pid=907 exec /bin/ls", b"Mon 11:30:02 pid=908 exec /bin/cat",
         b"Mon 11:30:03 pid=909 exec /tmp/planted"]


def printing(lines: list[bytes]) -> Scenario:
    return Scenario(begin=[("print", 0, line + b"\n") for line in lines],
                    running=[("request_exit",)])


def write_manifest(tmp_path: Path, name: str = "audit") -> Manifest:
    path = tmp_path / f"{name}.yaml"
    path.write_text(MANIFEST.format(name=name))
    return load_manifest(path)


def apply(tmp_path: Path, manifest: Manifest, outputs: dict[str, list[bytes]],
          baseline: str | None = None) -> tuple[Run, list[str]]:
    """One run through the Session; returns it and the notes it gave its listener."""
    notes: list[str] = []

    class Notes:
        def phase(self, text: str) -> None: ...
        def event(self, event: object) -> None: ...
        def build(self, job: object, state: str) -> None: ...
        def interrupted(self, count: int, signum: int) -> None: ...
        def tick(self) -> None: ...

        def note(self, text: str) -> None:
            notes.append(text)

    fleet = FakeFleet(tmp_path / f"fleet-{time.monotonic_ns()}",
                      {host: printing(lines) for host, lines in outputs.items()})
    session = Session(manifest, fleet.hosts(), options=RunOptions(timing=Timing(exit_timeout=1)),
                      builder=FakeBuilder(tmp_path / "cache"), connector=fleet.connect,
                      listener=Notes(), baseline=baseline)
    run = session.apply()
    assert run.exit_code == 0, run.outcomes
    return run, notes


def stapctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stapctl", *args], capture_output=True,
                          text=True, check=False, env=os.environ)


def test_normalisation_drops_fields_then_replaces_patterns() -> None:
    spec = DiffSpec(ignore_fields=(1, 3), ignore_patterns=("pid=[0-9]+", "[0-9]+ms"))
    assert spec.normalise("Sun  x 10:00 pid=12 took 35ms") == "x * took *"
    assert DiffSpec().normalise("as  it is ") == "as  it is "


@pytest.mark.usefixtures("configured_history")
def test_baseline_last_records_exactly_the_planted_change(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    first, notes = apply(tmp_path, manifest, {"h1": BEFORE, "h2": BEFORE}, baseline="last")
    assert first.difference is None
    assert any("no earlier run of audit" in note for note in notes)

    second, _ = apply(tmp_path, manifest, {"h1": AFTER, "h2": BEFORE[:1]}, baseline="last")
    assert second.difference is not None and second.difference.baseline == first.id
    assert second.difference.hosts == (
        HostDifference("h1", added=("* exec /tmp/planted",), added_total=1),
        HostDifference("h2", removed=("* exec /bin/cat",), removed_total=1),
    )
    folder = Path(history.find_run(second.id)["dir"])
    recorded = json.loads((folder / "difference.json").read_text())
    assert recorded["baseline"] == first.id
    assert [h["host"] for h in recorded["hosts"]] == ["h1", "h2"]

    shown = stapctl("runs", "show", second.id)
    assert shown.returncode == 0 and f"changed from run {first.id}: 2 host(s)" in shown.stderr
    assert "--- h1\n+ * exec /tmp/planted\n--- h2\n- * exec /bin/cat" in shown.stderr

    unchanged, _ = apply(tmp_path, manifest, {"h1": AFTER, "h2": BEFORE[:1]}, baseline="last")
    assert unchanged.difference is not None and not unchanged.difference.changed
    assert unchanged.difference.baseline == second.id


@pytest.mark.usefixtures("configured_history")
def test_runs_diff_exits_as_diff_does(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    first, _ = apply(tmp_path, manifest, {"h1": BEFORE})
    second, _ = apply(tmp_path, manifest, {"h1": AFTER})
    other, _ = apply(tmp_path, write_manifest(tmp_path, "other"), {"h1": BEFORE})

    changed = stapctl("runs", "diff", first.id, second.id)
    assert (changed.returncode, changed.stdout) == (1, "--- h1\n+ * exec /tmp/planted\n")
    backwards = stapctl("runs", "diff", second.id, first.id, "--json")
    assert backwards.returncode == 1
    assert json.loads(backwards.stdout)["hosts"][0]["removed"] == ["* exec /tmp/planted"]
    same = stapctl("runs", "diff", first.id, first.id)
    assert (same.returncode, same.stdout) == (0, "")

    mixed = stapctl("runs", "diff", first.id, other.id)
    assert mixed.returncode == 2 and "different manifests" in mixed.stderr
    unknown = stapctl("runs", "diff", first.id, "no-such-run")
    assert unknown.returncode == 2 and "no run matches" in unknown.stderr
    assert "Traceback" not in mixed.stderr + unknown.stderr


def test_a_baseline_of_another_manifest_is_refused_before_the_run(tmp_path: Path) -> None:
    other, _ = apply(tmp_path, write_manifest(tmp_path, "other"), {"h1": BEFORE})
    with pytest.raises(UsageError, match="is of the manifest 'other'"):
        Session(write_manifest(tmp_path), [], baseline=other.id)
    with pytest.raises(UsageError, match="no run matches"):
        Session(write_manifest(tmp_path), [], baseline="nothing-like-it")


def test_a_bad_diff_key_is_located(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(MANIFEST.format(name="bad").replace("'pid=[0-9]+'", "'pid=([0-9]+'")
                    .replace("[1, 2]", "[0]"))
    with pytest.raises(Exception) as caught:
        load_manifest(path)
    text = str(caught.value)
    assert "bad.yaml:8:19: diff.ignore_fields[0]: must be at least 1" in text
    assert "bad.yaml:9" in text and "not a regular expression" in text
    with pytest.raises(Exception, match="not a regular expression"):
        load_diff_spec(path)


# -- retention ---------------------------------------------------------------------------
def record(tmp_path: Path, where: str | Path, run_id: str, name: str, age: float,
           finished: bool = True) -> Path:
    manifest = Manifest(path=tmp_path / "m.yaml", name=name, probes=())
    (tmp_path / "m.yaml").write_text("name: x\n")
    recorder = store.RunRecorder(run_id, manifest, where)
    if finished:
        recorder.finish(Run(run_id, ()))
    else:
        assert recorder.listed()  # a run still going is in the history
    change_run(where, run_id, started=time.time() - age)  # as if it started `age` s ago
    return recorder.dir


def change_run(where: str | Path, run_id: str, **values: object) -> None:
    with history.transaction(where) as database:
        history.update_run(database, run_id, values)


def test_prune_keeps_the_newest_and_the_unfinished(tmp_path: Path,
                                                   history_where: str | Path) -> None:
    where = history_where
    folders = {run_id: record(tmp_path, where, run_id, name, age)
               for run_id, name, age in [("a1", "a", 50), ("a2", "a", 40), ("a3", "a", 30),
                                         ("b1", "b", 45)]}
    folders["a0"] = record(tmp_path, where, "a0", "a", 60, finished=False)
    folders["x1"] = record(tmp_path, where, "x1", "a", 70)
    change_run(where, "x1", controller="another-controller")  # its folder is over there

    assert store.prune_runs(keep=2, name="a", history=where) == ["a1"]
    assert not folders["a1"].exists() and folders["a2"].exists() and folders["a0"].exists()
    assert store.prune_runs(older_than=42, history=where) == ["b1"]
    assert sorted(row["id"] for row in history.list_runs(history=where)) == [
        "a0", "a2", "a3", "x1"]
    assert store.prune_runs(keep=0, history=where) == ["a3", "a2"]
    assert [row["id"] for row in history.list_runs(history=where)] == ["a0", "x1"]
    assert folders["x1"].exists()


@pytest.mark.usefixtures("configured_history")
def test_runs_prune_on_the_command_line(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    runs = [apply(tmp_path, manifest, {"h1": BEFORE})[0] for _ in range(3)]
    pruned = stapctl("runs", "prune", "--keep", "1", "--manifest", "audit")
    assert pruned.returncode == 0 and "removed 2 run(s)" in pruned.stderr
    assert [row["id"] for row in history.list_runs()] == [runs[-1].id]
    nothing = stapctl("runs", "prune")
    assert nothing.returncode == 2 and "--keep" in nothing.stderr
    bad = stapctl("runs", "prune", "--older-than", "soon")
    assert bad.returncode == 2 and "30d" in bad.stderr and "Traceback" not in bad.stderr


def test_an_interrupted_run_is_no_baseline(tmp_path: Path, history_where: str | Path) -> None:
    record(tmp_path, history_where, "done", "a", 20)
    record(tmp_path, history_where, "cut", "a", 10)
    change_run(history_where, "cut", exit_code=143)
    row = history.previous_run("a", before="now", history=history_where)
    assert row is not None and row["id"] == "done"
    assert history.previous_run("b", before="now", history=history_where) is None
