"""Every test runs in folders and an environment of its own, never the user's.

Set when this file is imported, so the CLI's subprocesses inherit it as well:

- the lab and the module cache live in a test-owned folder that persists between runs,
  so the guest image and cold compiles are paid once per machine: ``$STAPCTL_TEST_STATE``,
  else ``~/.cache/stapctl-tests``. The user's own lab, guests and cache stay as they were;
- run records and the history go to a new temporary folder for each test;
- nothing inherited from the user's terminal or shell changes what the CLI prints or which
  SSH keys it offers.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.engine_fleet import Broker, start_broker
from tests.postgres_server import PostgresServer, start_postgres

STATE = Path(os.environ.get("STAPCTL_TEST_STATE")
             or Path.home() / ".cache" / "stapctl-tests").expanduser().resolve()

os.environ["STAPCTL_LAB_DIR"] = str(STATE / "lab")
os.environ["STAPCTL_CACHE_DIR"] = str(STATE / "cache")
# run records and history (platformdirs' user data dir); each test gets its own, below
os.environ["XDG_DATA_HOME"] = str(STATE / "data")
for inherited in ("STAPCTL_CONFIG", "STAPCTL_HISTORY", "STAPCTL_ENGINE", "STAPCTL_SECRET_FILE",
                  "COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE",
                  "TTY_INTERACTIVE", "COLORTERM", "SSH_AUTH_SOCK"):
    os.environ.pop(inherited, None)
    os.unsetenv(inherited)  # readline, which pytest imports, exports COLUMNS and LINES unseen
os.environ["TERM"] = "dumb"
os.environ["LC_ALL"] = "C.UTF-8"  # English messages from stap and gcc, UTF-8 pipes


@pytest.fixture(autouse=True)
def own_run_records(tmp_path_factory: pytest.TempPathFactory,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh history, runs folder and settings, so a test sees only the runs it made."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("data")))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config: pytest.Config,
                                  items: list[pytest.Item]) -> Generator[None, None, None]:
    """A selection that leaves no test to run is an error, not a green run of nothing
    (`pytest tests/e2e` without `-m e2e`, a mistyped -k)."""
    collected = len(items)
    yield
    if collected and not items:
        selection = " ".join(f"{flag} {value!r}" for flag, value in (
            ("-m", config.option.markexpr), ("-k", config.option.keyword)) if value)
        raise pytest.UsageError(
            f"no test left to run: {selection} deselected all {collected} collected tests; "
            "end-to-end tests need `-m e2e`, and scripts/test.sh runs every tier")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on loopback for the tests of a shared history."""
    try:
        server = start_postgres()
    except RuntimeError as error:
        pytest.fail(str(error))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def history_where(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """A new, empty history of each kind: a SQLite file, a PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "history.sqlite"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.new_database()


@pytest.fixture
def configured_history(history_where: str | Path, monkeypatch: pytest.MonkeyPatch) -> str | Path:
    """Each kind of history, as the settings name it: what stapctl, in this process and
    in the commands a test runs, records into and reads."""
    monkeypatch.setenv("STAPCTL_HISTORY", str(history_where))
    return history_where


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A redis-server of the test's own on loopback, for the engine's tests."""
    folder = tmp_path / "redis"
    folder.mkdir()
    running = start_broker(folder)
    yield running
    running.stop()
