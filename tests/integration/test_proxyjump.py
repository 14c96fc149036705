"""ProxyJump through a real loopback bastion: one connection to it, however many targets
sit behind it, and none left once they are closed or have failed."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stapctl.connection import Connection, ConnectOptions, SSHConnection, connect, run_command
from stapctl.connection.ssh import GATEWAYS
from stapctl.errors import ConnectError, HostKeyError
from stapctl.models import Host, Manifest, Probe
from stapctl.session import Session
from tests.loopback_sshd import Sshds, children, free_port, start_sshds, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def bastion_and_target(tmp_path: Path) -> Iterator[Sshds]:
    """Two sshd processes: ports[0] the bastion (on 127.0.0.1 and ::1), ports[1] a target."""
    servers = start_sshds(tmp_path, count=2, extra_config="ListenAddress ::1\n")
    key = servers.known_hosts.read_text().split()[1:3]
    with servers.known_hosts.open("a") as known:
        known.write(f"[::1]:{servers.ports[0]} {' '.join(key)}\n")
    yield servers
    servers.stop()


def write_config(tmp_path: Path, servers: Sshds, jump: str) -> Path:
    config = tmp_path / "ssh_config"
    config.write_text(f"Host *\n  IdentityFile {servers.client_key}\n  ProxyJump {jump}\n")
    return config


def target(servers: Sshds, index: int, port: int) -> Host:
    return Host(name=f"t{index}", address="127.0.0.1", port=port, user="root",
                key_file=str(servers.client_key), known_hosts=str(servers.known_hosts))


def bastion_connections(servers: Sshds) -> int:
    return len(children(servers.processes[0].pid))


def open_all(hosts: list[Host], options: ConnectOptions) -> list[Connection | ConnectError]:
    def attempt(host: Host) -> Connection | ConnectError:
        try:
            return connect(host, options)
        except ConnectError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        return list(pool.map(attempt, hosts))


def test_targets_share_one_bastion_connection(bastion_and_target: Sshds,
                                              tmp_path: Path) -> None:
    servers = bastion_and_target
    config = write_config(tmp_path, servers, f"root@[::1]:{servers.ports[0]}")
    results = open_all([target(servers, index, servers.ports[1]) for index in range(3)],
                       ConnectOptions(ssh_config=config))
    connections = [result for result in results if isinstance(result, SSHConnection)]
    try:
        assert len(connections) == 3, results
        for connection in connections:
            assert run_command(connection, ["echo", "behind"]).stdout == b"behind\n"
        assert bastion_connections(servers) == 1
        assert len(children(servers.processes[1].pid)) == 3
        connections[0].close()
        connections[1].close()
        assert GATEWAYS.count() == 1 and bastion_connections(servers) == 1
    finally:
        for connection in connections:
            connection.close()
    assert GATEWAYS.count() == 0
    assert wait_for(lambda: bastion_connections(servers) == 0)


def test_two_hops_are_opened_in_order_and_both_closed(bastion_and_target: Sshds,
                                                       tmp_path: Path) -> None:
    """127.0.0.1 first, then [::1] reached through it (the same bastion, twice)."""
    servers = bastion_and_target
    bastion = servers.ports[0]
    config = write_config(tmp_path, servers, f"root@127.0.0.1:{bastion},root@[::1]:{bastion}")
    connection = connect(target(servers, 0, servers.ports[1]), ConnectOptions(ssh_config=config))
    try:
        assert run_command(connection, ["echo", "two hops"]).stdout == b"two hops\n"
        assert GATEWAYS.count() == 2 and bastion_connections(servers) == 2
    finally:
        connection.close()
    assert GATEWAYS.count() == 0
    assert wait_for(lambda: bastion_connections(servers) == 0)


def test_failed_targets_leave_no_session_on_the_bastion(bastion_and_target: Sshds,
                                                        tmp_path: Path) -> None:
    servers = bastion_and_target
    config = write_config(tmp_path, servers, f"root@127.0.0.1:{servers.ports[0]}")
    nowhere = free_port()  # nothing listens there: the bastion cannot reach it
    results = open_all([target(servers, index, nowhere) for index in range(5)],
                       ConnectOptions(ssh_config=config, connect_timeout=5))
    assert all(isinstance(result, ConnectError) for result in results), results
    assert all("the jump host could not reach it" in str(result) for result in results)
    assert GATEWAYS.count() == 0
    assert wait_for(lambda: bastion_connections(servers) == 0)


def test_a_refused_bastion_fails_every_target_behind_it_cleanly(
        bastion_and_target: Sshds, tmp_path: Path) -> None:
    servers = bastion_and_target
    config = write_config(tmp_path, servers, f"root@127.0.0.1:{servers.ports[0]}")
    unknown = tmp_path / "empty_known_hosts"
    unknown.write_text("")
    hosts = [Host(name=f"t{index}", address="127.0.0.1", port=servers.ports[1], user="root",
                  known_hosts=str(unknown)) for index in range(5)]
    results = open_all(hosts, ConnectOptions(ssh_config=config))
    assert all(isinstance(result, HostKeyError) for result in results), results
    assert all("jump host" in str(result) for result in results)
    assert GATEWAYS.count() == 0
    assert wait_for(lambda: bastion_connections(servers) == 0)


def test_a_bad_proxyjump_fails_that_host_only(bastion_and_target: Sshds,
                                              tmp_path: Path) -> None:
    servers = bastion_and_target
    config = tmp_path / "ssh_config"
    config.write_text(f"Host *\n  IdentityFile {servers.client_key}\n"
                      "Host 127.0.0.2\n  HostName 127.0.0.1\n  ProxyJump ::1:2222\n")
    good = target(servers, 0, servers.ports[1])
    bad = Host(name="bad", address="127.0.0.2", port=servers.ports[1],
               known_hosts=str(servers.known_hosts))
    results = open_all([bad, good], ConnectOptions(ssh_config=config))
    assert isinstance(results[0], ConnectError)
    assert "put an IPv6 address in brackets" in str(results[0])
    assert isinstance(results[1], SSHConnection)
    results[1].close()


def test_in_a_fleet_a_bad_proxyjump_fails_that_host_and_the_others_go_on(
        bastion_and_target: Sshds, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    servers = bastion_and_target
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("Host 127.0.0.2\n  HostName 127.0.0.1\n"
                                          "  ProxyJump [::1]:22x\n")
    monkeypatch.setenv("HOME", str(home))  # the user's ~/.ssh/config is the fleet's
    bad = Host(name="bad", address="127.0.0.2", port=servers.ports[1], user="root",
               key_file=str(servers.client_key), known_hosts=str(servers.known_hosts))
    probe = Probe(name="p", template="probe oneshot {}", origin="t.yaml", first_line=1)
    session = Session(Manifest(path=tmp_path / "t.yaml", name="t", probes=(probe,)),
                      [bad, target(servers, 1, servers.ports[1])], record=False)
    try:
        connected = session.connect()
    finally:
        session.finish()
    assert list(connected) == ["t1"]
    [outcome] = [o for o in session.outcomes if o.host == "bad"]
    assert (outcome.host, outcome.status) == ("bad", "unreachable")
    assert "ProxyJump '[::1]:22x'" in outcome.message
