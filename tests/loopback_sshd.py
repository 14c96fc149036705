"""Real OpenSSH sshd processes on loopback ports: the integration tests' server, and the
fan-out benchmark's targets."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
class Sshds:
    """Running sshd processes sharing one host key and one authorized client key."""

    ports: list[int]
    client_key: Path
    known_hosts: Path
    processes: list[subprocess.Popen[bytes]]

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(timeout=10)


def start_sshds(base: Path, count: int = 1, extra_config: str = "",
                ports: list[int] | None = None, sftp_server: str = SFTP_SERVER) -> Sshds:
    """``count`` sshd processes on free loopback ports (or on ``ports``), with a new host
    key; their logs are in ``base``.

    Users log in with ``client_key`` (root included); a user's own
    ~/.ssh/authorized_keys is honoured too.
    """
    host_pub = " ".join(keygen(base / "host_ed25519").split()[:2])
    (base / "authorized_keys").write_text(keygen(base / "client_ed25519") + "\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    ports = ports or [free_port() for _ in range(count)]
    processes = []
    for index, port in enumerate(ports):
        config = base / f"sshd_config.{index}"
        config.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {base}/host_ed25519\n"
            f"AuthorizedKeysFile {base}/authorized_keys .ssh/authorized_keys\n"
            f"PidFile {base}/sshd.{index}.pid\nStrictModes no\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nMaxStartups 500\nMaxSessions 50\n"
            f"Subsystem sftp {sftp_server}\n{extra_config}")
        log = open(base / f"sshd.{index}.log", "wb")
        processes.append(subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=log))
    sshds = Sshds(ports, base / "client_ed25519", base / "known_hosts", processes)
    (base / "known_hosts").write_text("".join(f"[127.0.0.1]:{port} {host_pub}\n"
                                              for port in ports))
    for index, port in enumerate(ports):
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    sshds.stop()
                    log_text = (base / f"sshd.{index}.log").read_text()
                    raise RuntimeError(f"sshd on port {port} did not start: {log_text}") \
                        from None
                time.sleep(0.05)
    return sshds


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``: for a listening sshd, one per connection."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            # the command name is in parentheses and may hold spaces: split after it
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    below = children(pid)
    return below + [grandchild for child in below for grandchild in descendants(child)]


def wait_for(condition: Callable[[], bool], seconds: float = 10) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass; whether it held."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
