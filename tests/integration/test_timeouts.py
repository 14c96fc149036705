"""Every wait on a target is bounded, against real sshd processes on loopback: a silent
command, a stuck SFTP server, a close() while the handshake is under way."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stapctl.connection import ConnectOptions, SSHConnection, connect, run_command
from stapctl.errors import ConnectError
from stapctl.models import Host
from tests.loopback_sshd import Sshds, descendants, start_sshds

from .conftest import Sshd, host_for

pytestmark = pytest.mark.integration


def test_a_silent_command_times_out_and_the_connection_stays_usable(sshd: Sshd) -> None:
    connection = connect(host_for(sshd), ConnectOptions(ssh_config=None))
    try:
        started = time.monotonic()
        with pytest.raises(ConnectError, match=r"loop: sleep: no answer within 1s"):
            run_command(connection, ["sleep", "3"], timeout=1)
        assert time.monotonic() - started < 2.5
        talking = "for i in 1 2 3 4; do echo $i; sleep 0.4; done"  # never 1 s silent
        done = run_command(connection, ["sh", "-c", talking], timeout=1)
        assert done.status == 0 and done.stdout.split() == [b"1", b"2", b"3", b"4"]
    finally:
        connection.close()


@pytest.fixture
def own_sshd(tmp_path: Path) -> Iterator[Sshds]:
    """An sshd of its own, whose SFTP server process the test can find and stop."""
    servers = start_sshds(tmp_path)
    yield servers
    servers.stop()


def sftp_servers(servers: Sshds) -> list[int]:
    return [pid for pid in descendants(servers.processes[0].pid)
            if Path(f"/proc/{pid}/comm").read_text().strip() == "sftp-server"]


def test_a_stuck_sftp_server_times_out(own_sshd: Sshds, tmp_path: Path) -> None:
    host = Host(name="stuck", address="127.0.0.1", port=own_sshd.ports[0], user="root",
                key_file=str(own_sshd.client_key), known_hosts=str(own_sshd.known_hosts))
    connection = connect(host, ConnectOptions(ssh_config=None, io_timeout=1))
    try:
        key = own_sshd.client_key.read_bytes()
        assert connection.read_file(str(own_sshd.client_key), 4096) == key  # SFTP is up
        [server] = sftp_servers(own_sshd)
        os.kill(server, signal.SIGSTOP)  # the target's SFTP server hangs
        try:
            started = time.monotonic()
            with pytest.raises(ConnectError, match=r"stuck: .*no answer within 1s"):
                connection.read_file(str(own_sshd.client_key), 4096)
            assert time.monotonic() - started < 3
        finally:
            os.kill(server, signal.SIGCONT)
        # the stuck session is dropped; the next request opens another one
        assert connection.read_file(str(own_sshd.client_key), 4096) == key
    finally:
        connection.close()


def test_an_sftp_server_that_never_answers_times_out(tmp_path: Path) -> None:
    servers = start_sshds(tmp_path, sftp_server="/bin/sleep 5")  # test double: mute SFTP
    host = Host(name="mute", address="127.0.0.1", port=servers.ports[0], user="root",
                key_file=str(servers.client_key), known_hosts=str(servers.known_hosts))
    try:
        connection = connect(host, ConnectOptions(ssh_config=None, io_timeout=1))
        try:
            started = time.monotonic()
            with pytest.raises(ConnectError, match=r"mute: SFTP: no answer within 1s"):
                connection.read_file("/etc/hostname", 4096)
            assert time.monotonic() - started < 3
        finally:
            connection.close()
    finally:
        servers.stop()


def test_close_from_another_thread_stops_a_handshake(silent_server: int) -> None:
    connection = SSHConnection(Host(name="mute", address="127.0.0.1", port=silent_server),
                               ConnectOptions(connect_timeout=30, ssh_config=None))
    threading.Timer(0.5, connection.close).start()
    started = time.monotonic()
    with pytest.raises(ConnectError, match="mute: connection closed"):
        connection.open()
    assert time.monotonic() - started < 5
    connection.close()


def test_a_failed_upload_leaves_no_partial_file(sshd: Sshd, tmp_path: Path) -> None:
    connection = connect(host_for(sshd), ConnectOptions(ssh_config=None))
    try:
        source = tmp_path / "module.ko"
        source.write_bytes(b"x" * 100_000)
        in_the_way = tmp_path / "work" / "m.ko"
        in_the_way.mkdir(parents=True)
        (in_the_way / "keep").write_text("a directory where the module should go")
        with pytest.raises(ConnectError, match="upload of module.ko failed"):
            connection.put(source, str(in_the_way))
        assert [path.name for path in in_the_way.parent.iterdir()] == ["m.ko"]
    finally:
        connection.close()
