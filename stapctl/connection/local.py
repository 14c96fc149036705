"""The connection to this machine itself (host address `local`): no SSH at all."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from stapctl.connection.base import (
    ConnectOptions,
    Process,
    StderrCollector,
    partial_name,
    sudo_prefix,
)
from stapctl.errors import ConnectError
from stapctl.models import Host


class _LocalProcess:
    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        # Popen's pipes are BufferedReaders: read1 returns what is there, without waiting
        self._stdout = cast(io.BufferedReader, popen.stdout)
        self._stderr = StderrCollector(cast(io.BufferedReader, popen.stderr).read1)

    def send(self, data: bytes) -> None:
        """Write to the command's stdin; a command gone or a stdin already closed (a ping
        racing the end of a run) is a ConnectError like any lost connection."""
        stdin = self._popen.stdin
        assert stdin is not None
        try:
            stdin.write(data)
            stdin.flush()
        except (OSError, ValueError) as exc:  # ValueError: write to closed file
            raise ConnectError(f"local agent gone: {exc}") from exc

    def close_stdin(self) -> None:
        stdin = self._popen.stdin
        assert stdin is not None
        with contextlib.suppress(OSError, ValueError):
            stdin.close()

    def recv(self, size: int) -> bytes:
        try:
            return self._stdout.read1(size)
        except (OSError, ValueError) as exc:
            raise ConnectError(f"local agent gone: {exc}") from exc

    def stderr_tail(self) -> str:
        return self._stderr.text()

    def wait(self) -> int:
        return self._popen.wait()

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self._popen.kill()


class LocalConnection:
    """Runs on this machine without SSH (host address `local`)."""

    def __init__(self, host: Host, options: ConnectOptions) -> None:
        self.host = host
        self.options = options

    def open(self) -> None:
        return None

    def put(self, local: Path, remote: str) -> None:
        """Copy to a partial file renamed into place; a failed copy leaves nothing."""
        partial = partial_name(remote)
        try:
            shutil.copyfile(local, partial)
            os.chmod(partial, 0o600)
            os.replace(partial, remote)
        except OSError as exc:
            _remove_if_there(partial)
            raise ConnectError(f"copy of {local.name} to {remote} failed: "
                               f"{exc.strerror or exc}") from exc
        except BaseException:
            _remove_if_there(partial)
            raise

    def read_file(self, path: str, limit: int) -> bytes:
        try:
            with open(path, "rb") as local:
                data = local.read(limit + 1)
        except OSError as exc:
            raise ConnectError(f"cannot read {path}: {exc.strerror or exc}") from exc
        if len(data) > limit:
            raise ConnectError(f"{path} is larger than {limit} bytes")
        return data

    def sudo(self) -> list[str]:
        return sudo_prefix(os.geteuid() == 0, self.options.become)

    def start(self, argv: Sequence[str], become: bool = True) -> Process:
        full = [*self.sudo(), *argv] if become else list(argv)
        try:
            # in the home folder, where an SSH login's commands start
            popen = subprocess.Popen(full, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=Path.home())
        except OSError as exc:
            raise ConnectError(f"cannot start {full[0]}: {exc.strerror or exc}") from exc
        return _LocalProcess(popen)

    def close(self) -> None:
        return None


def _remove_if_there(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
