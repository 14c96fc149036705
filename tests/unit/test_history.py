"""The history's schema: created once, migrated in place from the first release's SQLite
file, refused when newer; settings that name no usable database are clear errors."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from stapctl import history, store
from stapctl.errors import HistoryError, StapctlError
from stapctl.models import FailureKind, HostOutcome, Manifest, Run

pytestmark = pytest.mark.unit

THREADS = 8  # controllers starting at once

# the history exactly as the first release wrote it (no schema version, order by rowid)
FIRST_RELEASE = """
CREATE TABLE IF NOT EXISTS runs (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, manifest TEXT NOT NULL, dir TEXT NOT NULL,
  started REAL NOT NULL, finished REAL, exit_code INTEGER,
  hosts INTEGER NOT NULL DEFAULT 0, ok INTEGER NOT NULL DEFAULT 0,
  failed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS retry_hosts (
  run TEXT NOT NULL, host TEXT NOT NULL, PRIMARY KEY (run, host)
)
"""


def first_release_history(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.executescript(FIRST_RELEASE)
        db.execute("INSERT INTO runs VALUES ('20250101-000000-audit-aaaa', 'audit', "
                   "'/srv/audit.yaml', '/var/runs/a', 100.0, 160.0, 3, 4, 1, 3)")
        db.execute("INSERT INTO runs (id, name, manifest, dir, started) VALUES "
                   "('20250102-000000-audit-bbbb', 'audit', '/srv/audit.yaml', "
                   "'/var/runs/b', 200.0)")  # cut short: never finished
        db.executemany("INSERT INTO retry_hosts VALUES (?, ?)",
                       [("20250101-000000-audit-aaaa", host) for host in ("zeta", "alpha", "mu")])
    path.chmod(0o600)


def columns(where: Path) -> dict[str, list[tuple[str, str, int, str | None]]]:
    """A SQLite history's tables: each column's name, type affinity (REAL for the first
    release's REAL and today's FLOAT), NOT NULL and default."""
    with sqlite3.connect(where) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master "
                                               "WHERE type = 'table' ORDER BY name")]
        return {table: sorted((name, "REAL" if kind in ("REAL", "FLOAT") else kind, notnull,
                               default)
                              for _cid, name, kind, notnull, default, _pk
                              in db.execute(f"PRAGMA table_info({table})"))
                for table in tables}


def schema_versions(where: str | Path) -> list[int]:
    with history.transaction(where) as database:
        return [row["version"] for row in database.rows("SELECT version FROM stapctl_schema")]


def test_a_first_release_history_is_migrated_in_place(tmp_path: Path) -> None:
    old = tmp_path / "history.sqlite"
    first_release_history(old)

    rows = history.list_runs(history=old)
    assert [row["id"] for row in rows] == ["20250102-000000-audit-bbbb",
                                           "20250101-000000-audit-aaaa"]
    finished = rows[1]
    assert (finished["exit_code"], finished["hosts"], finished["ok"], finished["failed"],
            finished["dir"]) == (3, 4, 1, 3, "/var/runs/a")
    assert {row["controller"] for row in rows} == {store.controller_name()}  # recorded here
    # the retry hosts keep the order the run listed them in, not the alphabet's
    assert history.failed_hosts("last", "audit", old) == (finished["id"], ["zeta", "alpha", "mu"])
    assert schema_versions(old) == [history.SCHEMA_VERSION]
    fresh = tmp_path / "fresh.sqlite"
    assert history.list_runs(history=fresh) == []  # created as today's stapctl creates it
    assert columns(old) == columns(fresh) != {}  # as if created today
    assert stat.S_IMODE(old.stat().st_mode) == 0o600

    manifest = tmp_path / "audit.yaml"
    manifest.write_text("name: audit\n")
    recorder = store.RunRecorder("20250103-000000-audit-cccc",
                                 Manifest(path=manifest, name="audit", probes=()), old)
    recorder.finish(Run(recorder.run_id,
                        (HostOutcome("beta", "p", "failed", FailureKind.UNREACHABLE),
                         HostOutcome("gamma", "p", "ok"))))
    assert recorder.warnings == []
    assert history.failed_hosts("last", "audit", old) == (recorder.run_id, ["beta"])
    previous = history.previous_run("audit", before="now", history=old)
    assert previous is not None and previous["id"] == recorder.run_id


def test_controllers_starting_together_create_the_schema_once(
        history_where: str | Path) -> None:
    url = history_where
    start = threading.Barrier(THREADS)
    failures: list[BaseException] = []

    def first_use() -> None:
        start.wait()
        try:
            history.list_runs(history=url)
        except BaseException as error:  # noqa: BLE001 - reported below
            failures.append(error)

    history._ready.clear()  # each thread checks the schema, as a new process would
    threads = [threading.Thread(target=first_use) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert schema_versions(url) == [history.SCHEMA_VERSION]


def test_a_history_of_a_newer_stapctl_is_refused(tmp_path: Path) -> None:
    where = tmp_path / "history.sqlite"
    assert history.list_runs(history=where) == []
    with history.transaction(where) as database:
        database.execute("UPDATE stapctl_schema SET version = :version",
                         {"version": history.SCHEMA_VERSION + 1})
    history._ready.clear()  # as a new process would, which checks the schema first
    with pytest.raises(StapctlError, match="newer stapctl .* upgrade stapctl"):
        history.list_runs(history=where)


@pytest.mark.parametrize(("setting", "reason"), [
    ("mysql://db.example/stapctl", "not a path nor a postgresql://"),
    ("postgresql://[::1/history", "not a path nor a postgresql://"),
])
def test_a_setting_that_names_no_usable_database_is_a_clear_error(setting: str,
                                                                   reason: str) -> None:
    with pytest.raises(HistoryError, match=reason) as raised:
        history.list_runs(history=setting)
    assert "\n" not in str(raised.value) and raised.value.exit_code == 1


def test_the_postgresql_driver_is_imported_only_for_a_postgresql_history(
        tmp_path: Path) -> None:
    """`stapctl --help`, `validate`, `lab` … start without a database library; the SQLite
    history never loads the PostgreSQL driver (a third of a second of CPU)."""
    code = ("import sys\n"
            "import stapctl.cli\n"
            "assert not {m.split('.')[0] for m in sys.modules} & {'sqlite3', 'psycopg'}\n"
            "from stapctl import history\n"
            f"history.list_runs(history={str(tmp_path / 'h.sqlite')!r})\n"
            "assert 'sqlite3' in sys.modules and 'psycopg' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("setting", "shown"), [
    ("postgresql://stapctl:hunter2@db.example:5432/history",
     "postgresql://stapctl:***@db.example:5432/history"),
    ("postgres://:hunter2@db.example/history", "postgres://:***@db.example/history"),
    ("postgresql://stapctl:hun%40ter2@[::1]:5432/history?sslmode=require",
     "postgresql://stapctl:***@[::1]:5432/history?sslmode=require"),
    ("postgresql://stapctl@db.example/history", "postgresql://stapctl@db.example/history"),
    ("postgresql:///history?host=/run/pg&password=hunter2&user=stapctl",
     "postgresql:///history?host=/run/pg&password=***&user=stapctl"),
])
def test_the_password_of_a_history_url_is_never_shown(setting: str, shown: str) -> None:
    assert history.describe(setting) == shown
