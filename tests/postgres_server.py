"""A real PostgreSQL server (Debian's package) on a loopback port, in a folder of the
tests' own, started and stopped by them by its PID: never the machine's own cluster.

PostgreSQL refuses to run as root, so as root the server runs as the `postgres` system
user (setpriv execs it: the PID is the server's), in a folder that user owns.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg

USER = "stapctl"
PASSWORD = "history-test-password"
START_TIMEOUT = 60.0


def server_bin() -> Path | None:
    """The newest PostgreSQL of Debian's packages installed here."""
    found = [path for path in Path("/usr/lib/postgresql").glob("*/bin")
             if (path / "postgres").exists() and (path / "initdb").exists()]
    numbers = {path: int(match.group()) for path in found
               if (match := re.fullmatch(r"\d+", path.parent.name))}
    return max(numbers, key=numbers.__getitem__, default=None)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PostgresServer:
    folder: Path
    port: int
    process: subprocess.Popen[bytes]

    def url(self, database: str = "postgres", password: str = PASSWORD) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a new, empty database of this server."""
        name = f"history_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: sessions are cut, the data is kept), then the folder."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def start_postgres() -> PostgresServer:
    binaries = server_bin()
    if binaries is None:
        raise RuntimeError("PostgreSQL missing: scripts/install.sh installs postgresql")
    folder = Path(tempfile.mkdtemp(prefix="stapctl-postgres-"))  # reachable by its user
    as_owner: list[str] = []
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_owner = ["setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}",
                    "--clear-groups", "--"]
    password_file = folder / "password"
    password_file.write_text(PASSWORD + "\n")
    if as_owner:
        os.chown(password_file, pwd.getpwnam("postgres").pw_uid, -1)
    data = folder / "data"
    initdb = subprocess.run(
        [*as_owner, str(binaries / "initdb"), "-D", str(data), "-U", USER, "--no-sync",
         f"--pwfile={password_file}", "--auth=scram-sha-256", "-E", "UTF8", "--locale=C"],
        capture_output=True, text=True, check=False, cwd=folder, timeout=120)
    if initdb.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {initdb.stderr}")
    port = free_port()
    log = open(folder / "server.log", "wb")
    process = subprocess.Popen(
        [*as_owner, str(binaries / "postgres"), "-D", str(data), "-h", "127.0.0.1",
         "-p", str(port), "-k", str(folder), "-c", "fsync=off", "-c", "max_connections=200"],
        stdout=log, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)
    log.close()
    server = PostgresServer(folder, port, process)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            psycopg.connect(server.url(), connect_timeout=2).close()
            return server
        except psycopg.OperationalError:
            if process.poll() is not None or time.monotonic() > deadline:
                text = (folder / "server.log").read_text(errors="replace")
                server.stop()
                raise RuntimeError(f"PostgreSQL did not start: {text}") from None
            time.sleep(0.1)
