"""A real OpenSSH sshd on a loopback port, started and stopped by the tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True)
    return path.with_suffix(".pub").read_text().strip()


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
    base = tmp_path_factory.mktemp("sshd")
    host_pub = keygen(base / "host_ed25519")
    client_pub = keygen(base / "client_ed25519")
    (base / "authorized_keys").write_text(client_pub + "\n")
    port = free_port()
    known_hosts = base / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {' '.join(host_pub.split()[:2])}\n")
    config = base / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {base}/host_ed25519\n"
        f"AuthorizedKeysFile {base}/authorized_keys .ssh/authorized_keys\nPidFile {base}/sshd.pid\n"
        "StrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nMaxStartups 200\nMaxSessions 50\n"
        f"Subsystem sftp {SFTP_SERVER}\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)],
                               stderr=open(base / "sshd.log", "wb"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        process.kill()
        pytest.fail(f"sshd did not start: {(base / 'sshd.log').read_text()}")
    yield Sshd(port=port, client_key=base / "client_ed25519", known_hosts=known_hosts,
               pid=process.pid)
    process.terminate()
    process.wait(timeout=10)
