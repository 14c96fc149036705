"""stapctl's SSH connection against a real sshd on loopback."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from stapctl.connection import ConnectOptions, SSHConnection, connect, run_command
from stapctl.errors import AuthError, ConnectError, HostKeyError
from stapctl.models import Host
from tests.loopback_sshd import free_port, keygen

from .conftest import Sshd, host_for

pytestmark = pytest.mark.integration


def test_connects_with_a_known_host_key_and_runs_argv(sshd: Sshd) -> None:
    connection = connect(host_for(sshd), ConnectOptions())
    try:
        done = run_command(connection, ["echo", "it's", "a $HOME"])  # quoted, not expanded
        assert done.status == 0
        assert done.stdout == b"it's a $HOME\n"
    finally:
        connection.close()


def test_changed_host_key_is_refused(sshd: Sshd, tmp_path: Path) -> None:
    other = keygen(tmp_path / "other")
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(other.split()[:2])}\n")
    with pytest.raises(HostKeyError, match="CHANGED"):
        connect(host_for(sshd, known_hosts=str(known)), ConnectOptions())
    # accepting new keys never accepts a changed one
    with pytest.raises(HostKeyError, match="CHANGED"):
        connect(host_for(sshd, known_hosts=str(known)),
                      ConnectOptions(accept_new_host_keys=True))


def test_unknown_host_key_is_refused_unless_accepted(sshd: Sshd, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyError, match="unknown host key"):
        connect(host_for(sshd, known_hosts=str(empty)), ConnectOptions())
    connect(host_for(sshd, known_hosts=str(empty)),
                  ConnectOptions(accept_new_host_keys=True)).close()


def test_wrong_key_is_an_auth_error(sshd: Sshd, tmp_path: Path) -> None:
    keygen(tmp_path / "stranger")
    with pytest.raises(AuthError, match="authentication failed"):
        connect(host_for(sshd, key_file=str(tmp_path / "stranger")), ConnectOptions())


def test_refused_port_is_a_connect_error() -> None:
    host = Host(name="nobody", address="127.0.0.1", port=free_port())
    with pytest.raises(ConnectError, match="refused"):
        connect(host, ConnectOptions(connect_timeout=2))


def test_server_that_never_answers_times_out(silent_server: int) -> None:
    host = Host(name="mute", address="127.0.0.1", port=silent_server)
    started = time.monotonic()
    with pytest.raises(ConnectError):
        connect(host, ConnectOptions(connect_timeout=1.5))
    assert time.monotonic() - started < 10


def test_upload_arrives_whole_and_private(sshd: Sshd, tmp_path: Path) -> None:
    connection = connect(host_for(sshd), ConnectOptions())
    try:
        target = tmp_path / "remote"
        target.mkdir(mode=0o700)
        source = tmp_path / "module.ko"
        source.write_bytes(b"x" * 300_000)
        connection.put(source, f"{target}/m.ko")
        assert (target / "m.ko").read_bytes() == source.read_bytes()
        assert (target / "m.ko").stat().st_mode & 0o777 == 0o600
        assert [p.name for p in target.iterdir()] == ["m.ko"]  # no partial file left
    finally:
        connection.close()


def test_ssh_config_and_proxyjump(sshd: Sshd, tmp_path: Path) -> None:
    """ssh_config supplies HostName/Port/User/IdentityFile and a ProxyJump hop; the jump
    goes through the same loopback sshd (it forwards to itself)."""
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host target\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User root\n"
        f"  IdentityFile {sshd.client_key}\n  ProxyJump root@127.0.0.1:{sshd.port}\n"
        f"Host 127.0.0.1\n  IdentityFile {sshd.client_key}\n"
    )
    host = Host(name="t", address="target", known_hosts=str(sshd.known_hosts))
    connection = connect(host, ConnectOptions(ssh_config=config))
    try:
        assert isinstance(connection, SSHConnection) and connection._gateway is not None
        assert connection.host.port == sshd.port and connection.host.address == "127.0.0.1"
        transport = connection._client.get_transport()
        assert transport is not None and isinstance(transport.sock, paramiko.Channel)
        done = run_command(connection, ["echo", "through the jump"])
        assert done.status == 0 and done.stdout == b"through the jump\n"
    finally:
        connection.close()


@pytest.fixture
def ssh_agent(sshd: Sshd, monkeypatch: pytest.MonkeyPatch,
              tmp_path: Path) -> Iterator[None]:
    """A real ssh-agent holding the client key (and only there: no key file is named)."""
    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)],
                             stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(socket_path))
        subprocess.run(["ssh-add", "-q", str(sshd.client_key)], check=True)
        yield
    finally:
        agent.terminate()
        agent.wait(timeout=10)


def test_keys_from_ssh_agent(sshd: Sshd, ssh_agent: None) -> None:
    connection = connect(host_for(sshd, key_file=None), ConnectOptions(ssh_config=None))
    try:
        assert run_command(connection, ["true"]).status == 0
    finally:
        connection.close()
