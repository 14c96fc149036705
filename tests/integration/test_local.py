"""The local connection (no SSH) and what every connection promises: no I/O before
open(), a silent command cut off, a failed upload leaving nothing behind."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from stapctl.connection import ConnectOptions, LocalConnection, SSHConnection, run_command
from stapctl.errors import ConnectError
from stapctl.models import Host

pytestmark = pytest.mark.integration


def test_building_an_ssh_connection_does_no_io(tmp_path: Path) -> None:
    """Test double: a listener that records whether anyone connected."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.3)
        config = tmp_path / "missing" / "ssh_config"  # read by open(), not before
        host = Host(name="h", address="127.0.0.1", port=listener.getsockname()[1])
        connection = SSHConnection(host, ConnectOptions(ssh_config=config))
        with pytest.raises(TimeoutError):
            listener.accept()
        with pytest.raises(ConnectError, match="h: connection not opened yet"):
            connection.start(["true"])
        connection.close()
        connection.close()  # idempotent
        with pytest.raises(ConnectError, match="opened only once"):
            connection.open()


def test_local_process_stdin_closed_is_a_connect_error() -> None:
    process = LocalConnection(Host(name="here", address="local"), ConnectOptions()) \
        .start(["cat"])
    process.send(b"ping\n")
    process.close_stdin()
    process.close_stdin()  # idempotent
    with pytest.raises(ConnectError, match="local agent gone"):
        process.send(b"ping\n")
    assert process.recv(100) == b"ping\n"
    assert process.wait() == 0


def test_local_process_gone_is_a_connect_error() -> None:
    process = LocalConnection(Host(name="here", address="local"), ConnectOptions()) \
        .start(["true"])
    process.wait()
    with pytest.raises(ConnectError, match="local agent gone"):
        for _ in range(100):  # the pipe's buffer may take the first writes
            process.send(b"x" * 65536)


def sleepers(tag: str) -> list[int]:
    """PIDs of this test's own `sleep` processes, told apart by their argument."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[:2] == [b"sleep", tag.encode()]:
            found.append(int(entry.name))
    return found


def test_a_silent_local_command_is_killed_after_its_timeout() -> None:
    connection = LocalConnection(Host(name="here", address="local"), ConnectOptions())
    tag = f"{30 + os.getpid() % 1000 / 1000:.3f}"
    started = time.monotonic()
    with pytest.raises(ConnectError, match=r"here: sleep: no answer within 0.5s"):
        run_command(connection, ["sleep", tag], timeout=0.5)
    assert time.monotonic() - started < 5
    assert sleepers(tag) == []


def test_a_command_that_keeps_talking_is_not_cut_off() -> None:
    connection = LocalConnection(Host(name="here", address="local"), ConnectOptions())
    script = "for i in 1 2 3 4 5; do echo $i; sleep 0.2; done"
    done = run_command(connection, ["sh", "-c", script], timeout=0.6)
    assert done.status == 0 and done.stdout.split() == [b"1", b"2", b"3", b"4", b"5"]


def test_a_failed_local_upload_leaves_no_partial_file(tmp_path: Path) -> None:
    connection = LocalConnection(Host(name="here", address="local"), ConnectOptions())
    source = tmp_path / "module.ko"
    source.write_bytes(b"x" * 1000)
    target = tmp_path / "work" / "m.ko"
    target.mkdir(parents=True)
    (target / "keep").write_text("a directory is in the way")
    with pytest.raises(ConnectError, match="copy of module.ko"):
        connection.put(source, str(target))
    assert sorted(path.name for path in target.parent.iterdir()) == ["m.ko"]
    connection.put(source, str(tmp_path / "work" / "n.ko"))
    assert (tmp_path / "work" / "n.ko").read_bytes() == source.read_bytes()
    assert sorted(path.name for path in target.parent.iterdir()) == ["m.ko", "n.ko"]
