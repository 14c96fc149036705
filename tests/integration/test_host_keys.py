"""Host keys across runs, against real sshd processes on loopback: a key accepted once is
saved, and a changed key fails on every later run."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from stapctl.connection import ConnectOptions, connect, run_command
from stapctl.errors import HostKeyError
from stapctl.models import Host
from tests.loopback_sshd import Sshds, start_sshds

from .conftest import Sshd

pytestmark = pytest.mark.integration


def options(tmp_path: Path, **changes: object) -> ConnectOptions:
    """No ssh_config, and known_hosts files under the test's own directory."""
    fields: dict[str, object] = {
        "ssh_config": None, "user_known_hosts": tmp_path / "home" / ".ssh" / "known_hosts",
        "global_known_hosts": tmp_path / "ssh_known_hosts",
    }
    fields.update(changes)
    return ConnectOptions(**fields)  # type: ignore[arg-type]


def host(port: int, key: Path, known_hosts: Path | None = None) -> Host:
    return Host(name="h", address="127.0.0.1", port=port, user="root", key_file=str(key),
                known_hosts=str(known_hosts) if known_hosts else None)


def runs(target: Host, opts: ConnectOptions) -> bool:
    connection = connect(target, opts)
    try:
        return run_command(connection, ["true"]).status == 0
    finally:
        connection.close()


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[list[Sshds]]:
    """An sshd of its own, which the test may restart with a new host key."""
    base = tmp_path / "first"
    base.mkdir()
    servers = [start_sshds(base)]
    yield servers
    servers[-1].stop()


def test_an_accepted_key_is_saved_and_a_changed_one_fails_on_every_run(
        restartable: list[Sshds], tmp_path: Path) -> None:
    first = restartable[0]
    port, client_key = first.ports[0], first.client_key
    user_file = tmp_path / "home" / ".ssh" / "known_hosts"
    accepting = options(tmp_path, accept_new_host_keys=True)

    assert runs(host(port, client_key), accepting)  # run 1: accepted and saved
    assert user_file.read_text().startswith(f"[127.0.0.1]:{port} ssh-ed25519 ")
    assert (user_file.stat().st_mode & 0o777) == 0o600
    assert (user_file.parent.stat().st_mode & 0o777) == 0o700
    assert runs(host(port, client_key), options(tmp_path))  # known now, without the flag

    first.stop()
    (tmp_path / "second").mkdir()
    restartable.append(start_sshds(tmp_path / "second", ports=[port]))
    second_key = restartable[-1].client_key
    listed = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "second" / "host_ed25519")],
                            check=True, capture_output=True, text=True).stdout
    new_fingerprint = listed.split()[1]
    for _ in range(2):  # run 2, run 3: the flag never accepts a changed key
        with pytest.raises(HostKeyError) as failure:
            runs(host(port, second_key), accepting)
        assert str(failure.value) == (
            f"[127.0.0.1]:{port}: host key CHANGED (now ssh-ed25519 {new_fingerprint}); "
            f"if the host was reinstalled, remove the old key: "
            f"ssh-keygen -R '[127.0.0.1]:{port}' -f {user_file}")
    assert len(user_file.read_text().splitlines()) == 1


def test_a_hosts_own_known_hosts_file_is_the_one_written(sshd: Sshd, tmp_path: Path) -> None:
    own = tmp_path / "lab" / "known_hosts"
    accepting = options(tmp_path, accept_new_host_keys=True)
    assert runs(host(sshd.port, sshd.client_key, own), accepting)
    assert own.read_text().split()[:2] == [f"[127.0.0.1]:{sshd.port}", "ssh-ed25519"]
    assert not (tmp_path / "home").exists()
    assert runs(host(sshd.port, sshd.client_key, own), options(tmp_path))


def test_the_global_known_hosts_is_trusted_and_never_written(sshd: Sshd,
                                                              tmp_path: Path) -> None:
    global_file = tmp_path / "ssh_known_hosts"
    global_file.write_text(sshd.known_hosts.read_text())
    assert runs(host(sshd.port, sshd.client_key), options(tmp_path))
    assert global_file.read_text() == sshd.known_hosts.read_text()
    assert not (tmp_path / "home").exists()


def test_hashed_known_hosts_entries_are_trusted(sshd: Sshd, tmp_path: Path) -> None:
    hashed = tmp_path / "known_hosts"
    hashed.write_text(sshd.known_hosts.read_text())
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(hashed)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert hashed.read_text().startswith("|1|")
    assert runs(host(sshd.port, sshd.client_key, hashed), options(tmp_path))
