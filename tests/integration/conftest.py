"""A real OpenSSH sshd on a loopback port, started and stopped by the tests."""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stapctl.models import Host
from tests.loopback_sshd import SSHD, start_sshds


@dataclass(frozen=True)
class Sshd:
    port: int
    client_key: Path
    known_hosts: Path
    pid: int


def host_for(sshd: Sshd, **changes: object) -> Host:
    fields: dict[str, object] = {
        "name": "loop", "address": "127.0.0.1", "port": sshd.port, "user": "root",
        "key_file": str(sshd.client_key), "known_hosts": str(sshd.known_hosts),
    }
    fields.update(changes)
    return Host(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    if not (os.path.exists(SSHD) and shutil.which("ssh-keygen")):
        pytest.fail("OpenSSH server missing: scripts/install.sh installs openssh-server")
    if os.geteuid() != 0:
        pytest.skip("the loopback sshd logs in as root; run the tests as root")
    try:
        servers = start_sshds(tmp_path_factory.mktemp("sshd"))
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield Sshd(port=servers.ports[0], client_key=servers.client_key,
               known_hosts=servers.known_hosts, pid=servers.processes[0].pid)
    servers.stop()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Test double: accepts TCP connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not done.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    done.set()
    thread.join()
    for sock in held:
        sock.close()
    server.close()
