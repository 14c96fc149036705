"""A real OpenSSH sshd on a loopback port, started and stopped by the tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.loopback_sshd import SSHD, start_sshds


@dataclass(frozen=True)
class Sshd:
    port: int
    client_key: Path
    known_hosts: Path
    pid: int


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
