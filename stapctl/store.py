"""Run records: a folder per apply, and one SQLite history of them all.

A run folder holds what is needed to understand the run later without the controller:
the manifest as given, the rendered scripts, the plan, every event (JSON lines), each
host's output, and the summary. Records are written as events arrive, so an interrupted
or crashed controller still leaves what it gathered.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import platformdirs

from stapctl.errors import StapctlError
from stapctl.models import Event, Manifest, Run
from stapctl.plan import Plan


def data_dir() -> Path:
    return Path(platformdirs.user_data_dir("stapctl"))


def history_path() -> Path:
    return data_dir() / "history.sqlite"


SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, manifest TEXT NOT NULL, dir TEXT NOT NULL,
  started REAL NOT NULL, finished REAL, exit_code INTEGER,
  hosts INTEGER NOT NULL DEFAULT 0, ok INTEGER NOT NULL DEFAULT 0,
  failed INTEGER NOT NULL DEFAULT 0
)
"""


@contextmanager
def _history(path: Path | None = None) -> Iterator[sqlite3.Connection]:
    target = path or history_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(target, timeout=30)) as db:
        db.execute(SCHEMA)
        with db:
            yield db


class RunRecorder:
    """Writes one run's folder as it happens, and its row in the history."""

    def __init__(self, run_id: str, manifest: Manifest, history: Path | None = None) -> None:
        base = manifest.output.dir or data_dir() / "runs"
        self.dir = base / run_id
        self.run_id = run_id
        self.history = history
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "hosts").mkdir()
        shutil.copyfile(manifest.path, self.dir / "manifest.yaml")
        # line-buffered: a controller killed mid-run leaves every line it had received
        self._events: IO[str] = open(self.dir / "events.jsonl", "w", buffering=1)
        self._host_logs: dict[str, IO[str]] = {}
        self._many_probes = len(manifest.probes) > 1
        with _history(history) as db:
            db.execute("INSERT INTO runs (id, name, manifest, dir, started) VALUES (?,?,?,?,?)",
                       (run_id, manifest.name, str(manifest.path), str(self.dir), time.time()))

    def event(self, event: Event) -> None:
        self._events.write(json.dumps(asdict(event)) + "\n")
        if event.kind == "output":
            log = self._host_logs.get(event.host)
            if log is None:
                log = self._host_logs[event.host] = open(
                    self.dir / "hosts" / f"{safe_name(event.host)}.log", "w", buffering=1)
            log.write((f"[{event.probe}] " if self._many_probes else "") + event.text + "\n")

    def plan(self, plan: Plan) -> None:
        scripts = self.dir / "scripts"
        scripts.mkdir(exist_ok=True)
        for job in plan.jobs:
            (scripts / f"{job.probe.name}-{job.spec.key[:12]}.stp").write_text(job.spec.script)
        (self.dir / "plan.json").write_text(json.dumps([
            {"probe": job.probe.name, "module": job.spec.key, "release": job.spec.release,
             "arch": job.spec.arch, "hosts": list(job.hosts), "cached": job.cached,
             "error": job.error}
            for job in plan.jobs
        ], indent=2))

    def finish(self, run: Run) -> None:
        self._events.close()
        for log in self._host_logs.values():
            log.close()
        hosts = {o.host for o in run.outcomes}
        failed = {o.host for o in run.failed}
        (self.dir / "summary.json").write_text(json.dumps({
            "run": run.id, "exit_code": run.exit_code, "interrupted": run.interrupted,
            "outcomes": [asdict(o) for o in run.outcomes],
        }, indent=2))
        with _history(self.history) as db:
            db.execute("UPDATE runs SET finished=?, exit_code=?, hosts=?, ok=?, failed=? "
                       "WHERE id=?", (time.time(), run.exit_code, len(hosts),
                                      len(hosts - failed), len(failed), run.id))


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def list_runs(limit: int = 20, history: Path | None = None) -> list[dict[str, Any]]:
    with _history(history) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM runs ORDER BY started DESC LIMIT ?", (limit,))
        return [dict(row) for row in rows]


def find_run(run_id: str, history: Path | None = None) -> dict[str, Any]:
    """A run by id or unique id prefix."""
    with _history(history) as db:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("SELECT * FROM runs WHERE id LIKE ? || '%'",
                                            (run_id,))]
    if len(rows) != 1:
        raise StapctlError(f"no run matches {run_id!r}" if not rows else
                           f"{run_id!r} matches {len(rows)} runs; give more of the id")
    return rows[0]
