"""The run history: one row per run, in SQLite by default or in a shared PostgreSQL.

Every query is written once, in the SQL both databases share, with named parameters
(``:name``), and goes through Python's DB-API: the standard library's sqlite3, or psycopg 3
for PostgreSQL. The embedded default is a private SQLite file in stapctl's data folder;
``history: postgresql://…`` in the settings (or $STAPCTL_HISTORY) makes several
controllers and schedules record into one database. The schema is stapctl's: created on
first use and migrated in place, one numbered step at a time, under a lock, so
controllers starting together agree on it.

Each row names the controller (host name) that recorded it: a run's folder (output,
events, summary) stays on that machine; the history holds its counts and retry hosts.
No database library is imported by a run that does not use it: sqlite3 takes milliseconds,
and the PostgreSQL driver (a third of a second of CPU) is imported only for a
postgresql:// history.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from stapctl.config import ENVIRONMENT, config_path, load_config
from stapctl.errors import HistoryError, StapctlError, UsageError
from stapctl.store import HISTORY_FILE, controller_name, own_data_dir

SCHEMA_VERSION = 2
CONNECT_TIMEOUT = 10  # seconds to reach a PostgreSQL server
BUSY_TIMEOUT = 30  # seconds to wait for another process's SQLite write
SCHEMA_LOCK = 0x73746170  # PostgreSQL advisory lock held while the schema is set up
POSTGRESQL_SCHEMES = ("postgresql", "postgres")

# the schema as SCHEMA_VERSION has it; FLOAT is a double in both databases
CREATE_SCHEMA = (
    """CREATE TABLE runs (
         id TEXT PRIMARY KEY, name TEXT NOT NULL, manifest TEXT NOT NULL, dir TEXT NOT NULL,
         started FLOAT NOT NULL, finished FLOAT, exit_code INTEGER,
         hosts INTEGER NOT NULL DEFAULT 0, ok INTEGER NOT NULL DEFAULT 0,
         failed INTEGER NOT NULL DEFAULT 0, controller TEXT NOT NULL DEFAULT '')""",
    """CREATE TABLE retry_hosts (
         run TEXT NOT NULL, host TEXT NOT NULL, position INTEGER NOT NULL DEFAULT 0,
         PRIMARY KEY (run, host))""",
    "CREATE TABLE stapctl_schema (version INTEGER NOT NULL)",
)
RUN_COLUMNS = ("id", "name", "manifest", "dir", "started", "finished", "exit_code", "hosts",
               "ok", "failed", "controller")
PARAMETER = re.compile(r":(\w+)")


def configured() -> str | Path:
    """Where the history is: the setting, else the SQLite file in the data folder."""
    return load_config().history or own_data_dir() / HISTORY_FILE


def import_driver(where: str | Path | None = None) -> None:
    """Import the PostgreSQL driver of a shared history ahead of its first use, which
    then does not wait for it; a driver that cannot be imported is reported by that use."""
    if _is_url(configured() if where is None else where):
        with contextlib.suppress(ImportError):
            import psycopg  # noqa: F401


def _is_url(where: str | Path) -> bool:
    return isinstance(where, str) and "://" in where


def describe(where: str | Path) -> str:
    """``where`` for messages: a URL without its password (``user:password@`` or libpq's
    ``?password=``)."""
    if not _is_url(where):
        return str(where)
    try:
        parts = urlsplit(str(where))
        netloc = parts.netloc
        if parts.password is not None:
            netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
        query = "&".join("password=***" if item.partition("=")[0] == "password" else item
                         for item in parts.query.split("&"))
        return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
    except ValueError:
        return "(an unreadable URL)"


def _postgresql_url(where: str) -> str:
    """A postgresql:// history setting, checked to be one (libpq reads the rest)."""
    try:
        parts = urlsplit(where)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        usable = parts.scheme in POSTGRESQL_SCHEMES
    except ValueError:
        usable = False
    if not usable:
        source = f"{ENVIRONMENT['history']} or history in {config_path()}"
        raise HistoryError(describe(where), f"not a path nor a postgresql://USER@HOST/DATABASE"
                           f" URL: fix {source}")
    return where


class Database:
    """One transaction on the history, through the DB-API connection of its database."""

    def __init__(self, connection: Any, dialect: str) -> None:
        self.connection = connection
        self.dialect = dialect  # "sqlite" or "postgresql"

    def _sql(self, sql: str) -> str:
        """Named parameters as the driver takes them: sqlite3 reads ``:name`` itself,
        psycopg wants ``%(name)s``."""
        return sql if self.dialect == "sqlite" else PARAMETER.sub(r"%(\1)s", sql)

    def execute(self, sql: str, parameters: Mapping[str, Any] | None = None) -> None:
        self.connection.cursor().execute(self._sql(sql), parameters or {})

    def execute_many(self, sql: str, rows: Sequence[Mapping[str, Any]]) -> None:
        self.connection.cursor().executemany(self._sql(sql), rows)

    def rows(self, sql: str, parameters: Mapping[str, Any] | None = None
             ) -> list[dict[str, Any]]:
        cursor = self.connection.cursor()
        cursor.execute(self._sql(sql), parameters or {})
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


_ready: set[str] = set()  # databases whose schema this process has checked


@contextmanager
def transaction(where: str | Path | None = None) -> Iterator[Database]:
    """One transaction on the history (``where`` as the setting; None: as configured),
    its schema created or migrated first. Any database failure is a HistoryError."""
    where = configured() if where is None else where
    try:
        with _connected(where) as database:
            if str(where) not in _ready:
                _set_up(database)
            yield database
        _ready.add(str(where))
    except ImportError as error:
        raise HistoryError(describe(where), f"{error.name} is not installed: "
                           "pip install 'psycopg[binary]'") from None
    except Exception as error:
        if not isinstance(error, _database_errors()):
            raise
        raise HistoryError(describe(where), _reason(error)) from None


def _database_errors() -> tuple[type[Exception], ...]:
    """What a database can raise: the system's errors and the drivers' (psycopg's only
    once it is imported)."""
    psycopg = sys.modules.get("psycopg")
    return (OSError, sqlite3.Error) + ((psycopg.Error,) if psycopg is not None else ())


@contextmanager
def _connected(where: str | Path) -> Iterator[Database]:
    """A connection in a transaction, committed if the block ends well, and closed. A
    SQLite transaction takes the write lock from its start (BEGIN IMMEDIATE), so a schema
    check then its creation is atomic; PostgreSQL's takes the advisory lock (_set_up)."""
    if _is_url(where):
        import psycopg

        connection: Any = psycopg.connect(_postgresql_url(str(where)),
                                          connect_timeout=CONNECT_TIMEOUT)
        dialect = "postgresql"
    else:
        path = Path(where).expanduser()
        _create_private(path)
        connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
        connection.execute("BEGIN IMMEDIATE")
        dialect = "sqlite"
    try:
        yield Database(connection, dialect)
        connection.commit()
    except BaseException:
        connection.rollback()
        raise
    finally:
        connection.close()


def _create_private(path: Path) -> None:
    """The SQLite file, created private (its journals take its mode): it names every
    run's hosts and folders."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))


def _reason(error: BaseException) -> str:
    """The driver's own words, on one line."""
    return " ".join(str(error).split()) or type(error).__name__


# -- the schema --------------------------------------------------------------------------
def table_names(database: Database) -> set[str]:
    """The tables of the history's database (PostgreSQL: of the schema it works in)."""
    if database.dialect == "postgresql":
        sql = "SELECT tablename AS name FROM pg_tables WHERE schemaname = current_schema()"
    else:
        sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
    return {row["name"] for row in database.rows(sql)}


def _set_up(database: Database) -> None:
    """Create the schema, or migrate it to SCHEMA_VERSION. A history of the first release
    (SQLite, before versions were kept) is version 1."""
    if database.dialect == "postgresql":
        database.execute("SELECT pg_advisory_xact_lock(:lock)", {"lock": SCHEMA_LOCK})
    tables = table_names(database)
    if "stapctl_schema" in tables:
        version = database.rows("SELECT max(version) AS version FROM stapctl_schema")[0][
            "version"]
    elif "runs" in tables:
        version = 1
        database.execute(CREATE_SCHEMA[-1])
        database.execute("INSERT INTO stapctl_schema (version) VALUES (1)")
    else:
        for statement in CREATE_SCHEMA:
            database.execute(statement)
        database.execute("INSERT INTO stapctl_schema (version) VALUES (:version)",
                         {"version": SCHEMA_VERSION})
        return
    if version > SCHEMA_VERSION:
        raise StapctlError(f"the run history is of a newer stapctl (schema {version}, this "
                           f"one knows {SCHEMA_VERSION}): upgrade stapctl")
    for step in MIGRATIONS[version - 1:]:
        step(database)
    if version < SCHEMA_VERSION:
        database.execute("UPDATE stapctl_schema SET version = :version",
                         {"version": SCHEMA_VERSION})


def _name_controllers_and_order_retries(database: Database) -> None:
    """1 → 2: runs name their controller (a first-release history is this machine's) and
    retry hosts keep their order in a column (version 1 kept it in SQLite's rowid)."""
    database.execute("ALTER TABLE runs ADD COLUMN controller TEXT NOT NULL DEFAULT ''")
    database.execute("UPDATE runs SET controller = :controller",
                     {"controller": controller_name()})
    database.execute("ALTER TABLE retry_hosts ADD COLUMN position INTEGER NOT NULL "
                     "DEFAULT 0")
    database.execute("UPDATE retry_hosts SET position = rowid")  # SQLite only


MIGRATIONS = [_name_controllers_and_order_retries]  # MIGRATIONS[n - 1]: version n → n + 1
assert len(MIGRATIONS) == SCHEMA_VERSION - 1


# -- recording ---------------------------------------------------------------------------
def _insert_run(database: Database, values: Mapping[str, Any]) -> None:
    names = [name for name in RUN_COLUMNS if name in values]
    database.execute(f"INSERT INTO runs ({', '.join(names)}) "
                     f"VALUES ({', '.join(':' + name for name in names)})", values)


def update_run(database: Database, run_id: str, values: Mapping[str, Any]) -> None:
    """Set columns of a run's row (``values``: column → value)."""
    unknown = set(values) - set(RUN_COLUMNS)
    assert not unknown, f"not columns of runs: {unknown}"
    settings = ", ".join(f"{name} = :{name}" for name in values)
    database.execute(f"UPDATE runs SET {settings} WHERE id = :run_id",
                     {**values, "run_id": run_id})


def add_run(where: str | Path | None, run_id: str, name: str, manifest: Path, folder: Path,
            started: float) -> None:
    with transaction(where) as database:
        _insert_run(database, {"id": run_id, "name": name, "manifest": str(manifest),
                               "dir": str(folder), "started": started,
                               "controller": controller_name()})


def finish_run(where: str | Path | None, run_id: str, listed: bool, values: dict[str, Any],
               retry: Sequence[str]) -> None:
    """Finish a run's row (``values``: its columns' final values), adding the row if it
    was not ``listed`` at the start; replace its retry hosts."""
    with transaction(where) as database:
        if listed:
            update_run(database, run_id, values)
        else:
            _insert_run(database, {**values, "id": run_id, "controller": controller_name()})
        database.execute("DELETE FROM retry_hosts WHERE run = :run", {"run": run_id})
        if retry:
            database.execute_many(
                "INSERT INTO retry_hosts (run, host, position) VALUES (:run, :host, :position)",
                [{"run": run_id, "host": host, "position": position}
                 for position, host in enumerate(retry)])


# -- reading -----------------------------------------------------------------------------
def _rows(sql: str, parameters: Mapping[str, Any], where: str | Path | None
          ) -> list[dict[str, Any]]:
    with transaction(where) as database:
        return database.rows(sql, parameters)


def list_runs(limit: int = 20, history: str | Path | None = None) -> list[dict[str, Any]]:
    return _rows("SELECT * FROM runs ORDER BY started DESC LIMIT :limit", {"limit": limit},
                 history)


def find_run(run_id: str, history: str | Path | None = None) -> dict[str, Any]:
    """A run by id or unique id prefix."""
    prefix = run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    found = _rows("SELECT * FROM runs WHERE id LIKE :pattern ESCAPE '\\'",
                  {"pattern": prefix + "%"}, history)
    if len(found) != 1:
        raise StapctlError(f"no run matches {run_id!r}" if not found else
                           f"{run_id!r} matches {len(found)} runs; give more of the id")
    return found[0]


def previous_run(name: str, before: str,
                 history: str | Path | None = None) -> dict[str, Any] | None:
    """The newest finished run of the manifest ``name`` other than the run ``before``
    that was not interrupted (exit 128 + a signal): the baseline `apply --baseline last`
    compares with. An interrupted run printed only part of what it would have."""
    found = _rows("SELECT * FROM runs WHERE name = :name AND id != :before "
                  "AND finished IS NOT NULL AND exit_code < 128 "
                  "ORDER BY started DESC LIMIT 1", {"name": name, "before": before}, history)
    return found[0] if found else None


def failed_hosts(run_id: str, manifest_name: str,
                 history: str | Path | None = None) -> tuple[str, list[str]]:
    """The id of a finished run and the hosts it failed on or could not reach, in the
    order it listed them. ``run_id`` is an id, a unique prefix, or 'last': the newest
    finished run of the manifest ``manifest_name``."""
    if run_id == "last":
        found = _rows("SELECT id FROM runs WHERE name = :name AND finished IS NOT NULL "
                      "ORDER BY started DESC LIMIT 1", {"name": manifest_name}, history)
        if not found:
            raise UsageError(f"no finished run of manifest {manifest_name!r} to retry: "
                             "see `stapctl runs list`")
        run_id = found[0]["id"]
    try:
        row = find_run(run_id, history)
    except HistoryError:
        raise
    except StapctlError as error:
        raise UsageError(f"{error}: see `stapctl runs list`") from None
    if row["finished"] is None:
        raise UsageError(f"run {row['id']} has not finished: it has no failed hosts yet")
    hosts = _rows("SELECT host FROM retry_hosts WHERE run = :run ORDER BY position",
                  {"run": row["id"]}, history)
    return row["id"], [host["host"] for host in hosts]


def prunable_runs(name: str | None, history: str | Path | None = None) -> list[dict[str, Any]]:
    """This controller's finished runs (of the manifest ``name``, or all), newest first:
    the runs whose folders `runs prune` can remove here."""
    same_name = "" if name is None else " AND name = :name"
    return _rows("SELECT * FROM runs WHERE finished IS NOT NULL AND controller = :controller"
                 f"{same_name} ORDER BY started DESC",
                 {"controller": controller_name(), "name": name}, history)


def forget_run(run_id: str, history: str | Path | None = None) -> None:
    with transaction(history) as database:
        database.execute("DELETE FROM runs WHERE id = :run", {"run": run_id})
        database.execute("DELETE FROM retry_hosts WHERE run = :run", {"run": run_id})
