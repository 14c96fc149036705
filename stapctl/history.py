"""The run history: one row per run, in SQLite by default or in a shared PostgreSQL.

Every query is written once, with SQLAlchemy Core, for both databases. The embedded
default is a private SQLite file in stapctl's data folder; ``history: postgresql://…`` in
the settings (or $STAPCTL_HISTORY) makes several controllers and schedules record into
one database. The schema is stapctl's: created on first use and migrated in place, one
numbered step at a time, under a lock, so controllers starting together agree on it.

Each row names the controller (host name) that recorded it: a run's folder (output,
events, summary) stays on that machine; the history holds its counts and retry hosts.
SQLAlchemy and the PostgreSQL driver are imported only by the commands that use the
history (this module is imported where it is needed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from stapctl.config import ENVIRONMENT, config_path, load_config
from stapctl.errors import HistoryError, StapctlError, UsageError
from stapctl.store import HISTORY_FILE, controller_name, own_data_dir

SCHEMA_VERSION = 2
CONNECT_TIMEOUT = 10  # seconds to reach a PostgreSQL server
BUSY_TIMEOUT = 30  # seconds to wait for another process's SQLite write
SCHEMA_LOCK = 0x73746170  # PostgreSQL advisory lock held while the schema is set up

metadata = sa.MetaData()
runs = sa.Table(
    "runs", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("manifest", sa.Text, nullable=False),
    sa.Column("dir", sa.Text, nullable=False),
    sa.Column("started", sa.Float, nullable=False),
    sa.Column("finished", sa.Float),
    sa.Column("exit_code", sa.Integer),
    sa.Column("hosts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("ok", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("controller", sa.Text, nullable=False, server_default=""),
)
retry_hosts = sa.Table(
    "retry_hosts", metadata,
    sa.Column("run", sa.Text, primary_key=True),
    sa.Column("host", sa.Text, primary_key=True),
    sa.Column("position", sa.Integer, nullable=False, server_default="0"),
)
schema = sa.Table("stapctl_schema", metadata, sa.Column("version", sa.Integer, nullable=False))


def configured() -> str | Path:
    """Where the history is: the setting, else the SQLite file in the data folder."""
    return load_config().history or own_data_dir() / HISTORY_FILE


def describe(where: str | Path) -> str:
    """``where`` for messages: a URL without its password."""
    if isinstance(where, str) and "://" in where:
        try:
            return sa.make_url(where).render_as_string(hide_password=True)
        except (sa.exc.ArgumentError, ValueError):
            return "(an unreadable URL)"
    return str(where)


def _url(where: str | Path) -> sa.URL:
    """The database URL of a history setting: a path is SQLite, postgresql:// PostgreSQL
    through psycopg 3."""
    if isinstance(where, Path) or "://" not in where:
        return sa.URL.create("sqlite", database=str(Path(where).expanduser()))
    try:
        url = sa.make_url(where)
    except (sa.exc.ArgumentError, ValueError):
        url = None
    if url is None or url.get_backend_name() not in ("postgresql", "postgres"):
        source = f"{ENVIRONMENT['history']} or history in {config_path()}"
        raise HistoryError(describe(where), f"not a path nor a postgresql://USER@HOST/DATABASE"
                           f" URL: fix {source}")
    return url.set(drivername="postgresql+psycopg")


@cache
def _engine(url: sa.URL) -> sa.Engine:
    """One engine per database for this process. No pool: a connection lives as long as
    one step, so a forked process never shares one."""
    if url.get_backend_name() == "sqlite":
        engine = sa.create_engine(url, poolclass=NullPool,
                                  connect_args={"timeout": BUSY_TIMEOUT})

        @sa.event.listens_for(engine, "connect")
        def _manual_transactions(dbapi_connection: Any, _: Any) -> None:
            dbapi_connection.isolation_level = None  # the BEGIN below, not the driver's

        @sa.event.listens_for(engine, "begin")
        def _write_lock(connection: sa.Connection) -> None:
            # one writer at a time from the start: a schema check then its creation is atomic
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return sa.create_engine(url, poolclass=NullPool,
                            connect_args={"connect_timeout": CONNECT_TIMEOUT})


_ready: set[sa.URL] = set()  # databases whose schema this process has checked


@contextmanager
def transaction(where: str | Path | None = None) -> Iterator[sa.Connection]:
    """One transaction on the history (``where`` as the setting; None: as configured),
    its schema created or migrated first. Any database failure is a HistoryError."""
    where = configured() if where is None else where
    url = _url(where)
    try:
        if url.get_backend_name() == "sqlite":
            _create_private(Path(url.database or ""))
        with _engine(url).begin() as connection:
            if url not in _ready:
                _set_up(connection)
            yield connection
        _ready.add(url)
    except sa.exc.SQLAlchemyError as error:
        raise HistoryError(describe(where), _reason(error)) from None
    except OSError as error:
        raise HistoryError(describe(where), error.strerror or str(error)) from None
    except ImportError as error:
        raise HistoryError(describe(where), f"{error.name} is not installed: "
                           "pip install 'psycopg[binary]'") from None


def _create_private(path: Path) -> None:
    """The SQLite file, created private (its journals take its mode): it names every
    run's hosts and folders."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))


def _reason(error: sa.exc.SQLAlchemyError) -> str:
    """The driver's own words, on one line, without SQLAlchemy's wrapping."""
    original = getattr(error, "orig", None) or error
    return " ".join(str(original).split()) or type(original).__name__


# -- the schema --------------------------------------------------------------------------
def _set_up(connection: sa.Connection) -> None:
    """Create the schema, or migrate it to SCHEMA_VERSION. A history of the first release
    (SQLite, before versions were kept) is version 1."""
    if connection.dialect.name == "postgresql":
        connection.execute(sa.select(sa.func.pg_advisory_xact_lock(SCHEMA_LOCK)))
    tables = set(sa.inspect(connection).get_table_names())
    if schema.name in tables:
        version = connection.execute(sa.select(sa.func.max(schema.c.version))).scalar_one()
    elif runs.name in tables:
        version = 1
        schema.create(connection)
        connection.execute(schema.insert().values(version=version))
    else:
        metadata.create_all(connection)
        connection.execute(schema.insert().values(version=SCHEMA_VERSION))
        return
    if version > SCHEMA_VERSION:
        raise StapctlError(f"the run history is of a newer stapctl (schema {version}, this "
                           f"one knows {SCHEMA_VERSION}): upgrade stapctl")
    for step in MIGRATIONS[version - 1:]:
        step(connection)
    if version < SCHEMA_VERSION:
        connection.execute(schema.update().values(version=SCHEMA_VERSION))


def _name_controllers_and_order_retries(connection: sa.Connection) -> None:
    """1 → 2: runs name their controller (a first-release history is this machine's) and
    retry hosts keep their order in a column (version 1 kept it in SQLite's rowid)."""
    connection.execute(sa.text("ALTER TABLE runs ADD COLUMN controller TEXT NOT NULL "
                               "DEFAULT ''"))
    connection.execute(runs.update().values(controller=controller_name()))
    connection.execute(sa.text("ALTER TABLE retry_hosts ADD COLUMN position INTEGER NOT NULL "
                               "DEFAULT 0"))
    connection.execute(sa.text("UPDATE retry_hosts SET position = rowid"))  # SQLite only


MIGRATIONS = [_name_controllers_and_order_retries]  # MIGRATIONS[n - 1]: version n → n + 1
assert len(MIGRATIONS) == SCHEMA_VERSION - 1


# -- recording ---------------------------------------------------------------------------
def add_run(where: str | Path | None, run_id: str, name: str, manifest: Path, folder: Path,
            started: float) -> None:
    with transaction(where) as connection:
        connection.execute(runs.insert().values(
            id=run_id, name=name, manifest=str(manifest), dir=str(folder), started=started,
            controller=controller_name()))


def finish_run(where: str | Path | None, run_id: str, listed: bool, values: dict[str, Any],
               retry: Sequence[str]) -> None:
    """Finish a run's row (``values``: its columns' final values), adding the row if it
    was not ``listed`` at the start; replace its retry hosts."""
    with transaction(where) as connection:
        if listed:
            connection.execute(runs.update().where(runs.c.id == run_id).values(values))
        else:
            connection.execute(runs.insert().values(id=run_id, controller=controller_name(),
                                                    **values))
        connection.execute(retry_hosts.delete().where(retry_hosts.c.run == run_id))
        if retry:
            connection.execute(retry_hosts.insert(), [
                {"run": run_id, "host": host, "position": position}
                for position, host in enumerate(retry)])


# -- reading -----------------------------------------------------------------------------
def _rows(statement: sa.Select[Any], where: str | Path | None) -> list[dict[str, Any]]:
    with transaction(where) as connection:
        return [dict(row) for row in connection.execute(statement).mappings()]


def list_runs(limit: int = 20, history: str | Path | None = None) -> list[dict[str, Any]]:
    return _rows(sa.select(runs).order_by(runs.c.started.desc()).limit(limit), history)


def find_run(run_id: str, history: str | Path | None = None) -> dict[str, Any]:
    """A run by id or unique id prefix."""
    prefix = run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    found = _rows(sa.select(runs).where(runs.c.id.like(prefix + "%", escape="\\")), history)
    if len(found) != 1:
        raise StapctlError(f"no run matches {run_id!r}" if not found else
                           f"{run_id!r} matches {len(found)} runs; give more of the id")
    return found[0]


def previous_run(name: str, before: str,
                 history: str | Path | None = None) -> dict[str, Any] | None:
    """The newest finished run of the manifest ``name`` other than the run ``before``
    that was not interrupted (exit 128 + a signal): the baseline `apply --baseline last`
    compares with. An interrupted run printed only part of what it would have."""
    found = _rows(sa.select(runs).where(
        runs.c.name == name, runs.c.id != before, runs.c.finished.is_not(None),
        runs.c.exit_code < 128).order_by(runs.c.started.desc()).limit(1), history)
    return found[0] if found else None


def failed_hosts(run_id: str, manifest_name: str,
                 history: str | Path | None = None) -> tuple[str, list[str]]:
    """The id of a finished run and the hosts it failed on or could not reach, in the
    order it listed them. ``run_id`` is an id, a unique prefix, or 'last': the newest
    finished run of the manifest ``manifest_name``."""
    if run_id == "last":
        found = _rows(sa.select(runs.c.id).where(
            runs.c.name == manifest_name, runs.c.finished.is_not(None))
            .order_by(runs.c.started.desc()).limit(1), history)
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
    hosts = _rows(sa.select(retry_hosts.c.host).where(retry_hosts.c.run == row["id"])
                  .order_by(retry_hosts.c.position), history)
    return row["id"], [host["host"] for host in hosts]


def prunable_runs(name: str | None, history: str | Path | None = None) -> list[dict[str, Any]]:
    """This controller's finished runs (of the manifest ``name``, or all), newest first:
    the runs whose folders `runs prune` can remove here."""
    statement = sa.select(runs).where(runs.c.finished.is_not(None),
                                      runs.c.controller == controller_name())
    if name is not None:
        statement = statement.where(runs.c.name == name)
    return _rows(statement.order_by(runs.c.started.desc()), history)


def forget_run(run_id: str, history: str | Path | None = None) -> None:
    with transaction(history) as connection:
        connection.execute(runs.delete().where(runs.c.id == run_id))
        connection.execute(retry_hosts.delete().where(retry_hosts.c.run == run_id))
