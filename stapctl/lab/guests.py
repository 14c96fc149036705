"""A lab folder and its guests: qemu processes booting the lab's image, reachable over SSH
on loopback, published as an Ansible inventory with its own known_hosts.

Only qemu processes whose command line names the lab folder count as the lab's, so a
reused pid or another lab's guest is never stopped.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

import paramiko
import platformdirs
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stapctl.errors import LabError
from stapctl.lab.image import Keys, Progress, guest_image, preflight
from stapctl.lab.kernels import guest_kernels
from stapctl.lab.system import run, tool, write_atomic
from stapctl.models import Host

HOST = "127.0.0.1"
USER = "root"
BOOT_TIMEOUT = 300.0  # TCG on a loaded 2-core machine has taken 40 s+; leave a wide margin
KVM_TIMEOUT = 30.0  # a KVM guest that is not up by then is hung: fall back to TCG


class GuestState(Enum):
    RUNNING = "running"  # its qemu is alive and root can log in over SSH
    UNREACHABLE = "unreachable"  # its qemu is alive, its SSH does not answer (yet)
    STOPPED = "stopped"  # no qemu of this lab runs it


@dataclass(frozen=True)
class Guest:
    name: str
    host: str
    port: int
    user: str
    key: str  # the client's private key file (OpenSSH format)
    release: str
    pid: int
    state: GuestState


@dataclass(frozen=True)
class LabStatus:
    guests: tuple[Guest, ...]
    inventory: Path
    known_hosts: Path

    def host(self, name: str) -> Host:
        """A guest as a target, with the lab's known_hosts (host keys stay checked)."""
        guest = next((g for g in self.guests if g.name == name), None)
        if guest is None:
            raise LabError(f"the lab has no guest {name!r}: `stapctl lab status` lists them")
        return Host(name=guest.name, address=guest.host, port=guest.port, user=guest.user,
                    key_file=guest.key, known_hosts=str(self.known_hosts))


def _quiet(_: str) -> None:
    pass


class Lab:
    """One lab folder: its keys, image, guests' state, inventory and console logs.

    One `up` or `down` at a time per folder (a file lock): developers and test sessions
    share a lab.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory.expanduser().resolve()
        self.inventory = self.directory / "inventory.yaml"
        self.known_hosts = self.directory / "known_hosts"
        self.client_key = self.directory / "id_ed25519"
        self.client_public_key = self.directory / "id_ed25519.pub"
        self.host_key = self.directory / "host_ed25519"  # baked into the image
        self.host_public_key = self.directory / "host_ed25519.pub"
        self.state_file = self.directory / "state.json"
        self.guests_dir = self.directory / "guests"  # console logs and qemu pid files

    @classmethod
    def default(cls) -> Lab:
        """``$STAPCTL_LAB_DIR``, else one lab per user in the user's data directory."""
        configured = os.environ.get("STAPCTL_LAB_DIR")
        return cls(Path(configured) if configured
                   else Path(platformdirs.user_data_dir("stapctl")) / "lab")

    def up(self, count: int = 1, progress: Progress = _quiet, *,
           timeout: float = BOOT_TIMEOUT, release: str | None = None) -> LabStatus:
        """Make guests lab-1..lab-COUNT answer SSH, keeping those already running.

        ``release`` boots other kernels than the installed headers meta-package names:
        suite names or kernel releases, a comma list assigned to the guests in order
        (stapctl.lab.kernels); one lab folder can hold guests of several releases.
        """
        if count < 1:
            raise LabError(f"the lab needs at least one guest, not {count}")
        with self._locked(progress):
            kernels = guest_kernels(release, count, progress)
            keys = self._keys()
            images = {}
            for kernel in kernels:
                if kernel.release not in images:
                    preflight(kernel.release, kernel.tree)
                    images[kernel.release] = guest_image(self.directory, kernel.release, keys,
                                                         progress, kernel.tree)
            wanted = {f"lab-{i}": kernel.release for i, kernel in enumerate(kernels, 1)}
            guests = [g for g in self._load() if self._is_ours(g.pid)]
            for g in guests:
                if g.name in wanted and g.release != wanted[g.name]:
                    progress(f"{g.name} still runs {g.release}; `stapctl lab down` refreshes it")
            missing = [n for n in wanted if n not in {g.name for g in guests}]
            deadline = time.monotonic() + timeout
            guests = [self._wait(g, keys.host_pub, deadline, progress) for g in guests]
            booted = None
            if missing and _kvm_usable():
                try:
                    booted = self._boot(missing, images, wanted, "kvm", guests, keys.host_pub,
                                        time.monotonic() + KVM_TIMEOUT, progress)
                except LabError as e:
                    progress(f"KVM failed ({e}); falling back to TCG")
            if missing and booted is None:
                booted = self._boot(missing, images, wanted, "tcg", guests, keys.host_pub,
                                    time.monotonic() + timeout, progress)
            guests += booted or []
            guests.sort(key=lambda g: int(g.name.rsplit("-", 1)[1]))
            self._save(guests)
            self._publish(guests, keys.host_pub)
            progress(f"inventory: {self.inventory}")
            return self._status(guests)

    def status(self, login: bool = True) -> LabStatus:
        """Which recorded guests are alive, and whether their SSH answers. Without
        ``login``, a guest whose qemu runs is taken as running unchecked: a run that uses
        the lab as its inventory learns of one that does not answer from its own
        connect, without paying an SSH login per guest before it starts."""
        host_pub = _read(self.host_public_key)
        guests = []
        for g in self._load():
            if not self._is_ours(g.pid):
                g = replace(g, state=GuestState.STOPPED)
            elif login and self._login(g.port, host_pub, timeout=10.0) is None:
                g = replace(g, state=GuestState.UNREACHABLE)
            guests.append(g)
        return self._status(guests)

    def down(self, progress: Progress = _quiet) -> LabStatus:
        """Stop exactly the qemu processes the lab started, and forget them."""
        with self._locked(progress):
            stopped = []
            for g in self._load():
                if self._is_ours(g.pid):
                    progress(f"stopping {g.name} (pid {g.pid})")
                    self._stop(g.pid)
                stopped.append(replace(g, state=GuestState.STOPPED))
            self._save([])
            self._publish([], "")
            return self._status(stopped)

    # --- guests ---------------------------------------------------------------------------

    def _boot(self, names: list[str], images: dict[str, Path], releases: dict[str, str],
              accel: str, running: list[Guest], host_pub: str, deadline: float,
              progress: Progress) -> list[Guest]:
        """Start the guests together (they boot in parallel), then wait for each one's SSH.

        The state file lists each guest as soon as its qemu exists, so `down` finds it even if
        this process dies; on any failure the guests of this batch are stopped again.
        """
        started: list[Guest] = []
        try:
            for name in names:
                release = releases[name]
                started.append(self._start(name, images[release], release, accel, progress))
                self._save(running + started)
            return [self._wait(g, host_pub, deadline, progress) for g in started]
        except BaseException:
            for g in started:
                self._stop(g.pid)
            self._save(running)
            raise

    def _start(self, name: str, image: Path, release: str, accel: str,
               progress: Progress) -> Guest:
        """Launch one daemonized qemu; retry on another port if the free one was taken
        meanwhile."""
        self.guests_dir.mkdir(parents=True, exist_ok=True)
        log, pidfile = self._console_log(name), self.guests_dir / f"{name}.pid"
        error = ""
        for _ in range(3):
            port = _free_port()
            pidfile.unlink(missing_ok=True)
            cmd = [
                tool("qemu-system-x86_64"), "-name", f"stapctl-{name}",
                "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
                "-smp", "2", "-m", "1024", "-nodefaults", "-no-user-config",
                "-display", "none", "-no-reboot",
                "-kernel", str(image / "vmlinux"), "-initrd", str(image / "initramfs.cpio"),
                "-append", f"console=ttyS0 panic=-1 quiet stapctl.name={name}",
                "-chardev", f"file,id=console,path={str(log).replace(',', ',,')}",
                "-serial", "chardev:console",
                "-nic", f"user,model=e1000,hostfwd=tcp:{HOST}:{port}-:22",
                "-daemonize", "-pidfile", str(pidfile),
            ]
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, check=False)
            if proc.returncode == 0:
                pid = int(pidfile.read_text().strip())
                progress(f"{name}: qemu pid {pid} ({accel}), ssh on {HOST}:{port}, "
                         f"console log {log}")
                return Guest(name, HOST, port, USER, str(self.client_key), release, pid,
                             GuestState.UNREACHABLE)
            error = proc.stderr.strip()
            if "forwarding" not in error:  # only a port taken meanwhile is worth a retry
                break
        raise LabError(f"qemu could not start {name}: {error}")

    def _wait(self, g: Guest, host_pub: str, deadline: float, progress: Progress) -> Guest:
        """Poll until root can log in over SSH with the lab's key and the host key checks
        out."""
        progress(f"{g.name}: waiting for SSH on {HOST}:{g.port}")
        log = self._console_log(g.name)
        t0 = time.monotonic()
        while time.monotonic() < deadline:
            if not self._is_ours(g.pid):
                raise LabError(f"{g.name} stopped while booting (qemu pid {g.pid} is gone); "
                               f"console log {log}:\n{_tail(log)}")
            release = self._login(g.port, host_pub,
                                  min(15.0, max(1.0, deadline - time.monotonic())))
            if release is not None:
                progress(f"{g.name}: SSH answers ({release}) after "
                         f"{time.monotonic() - t0:.1f} s")
                return replace(g, release=release, state=GuestState.RUNNING)
            time.sleep(1.0)
        raise LabError(f"{g.name} did not answer SSH on {HOST}:{g.port} in time; console log "
                       f"{log}:\n{_tail(log)}\nRetry, or run `stapctl lab down` and then up "
                       "again")

    def _login(self, port: int, host_pub: str, timeout: float) -> str | None:
        """A real SSH login checking the host key; returns `uname -r`, or None if not up yet.

        A raw banner read comes first: while the guest boots, qemu accepts and drops the TCP
        connection, and paramiko would log an error for each attempt.
        """
        try:
            with socket.create_connection((HOST, port), timeout=timeout) as sock:
                if not sock.recv(64).startswith(b"SSH-"):
                    return None
        except OSError:
            return None
        entry = paramiko.hostkeys.HostKeyEntry.from_line(f"[{HOST}]:{port} {host_pub}")
        if entry is None:
            raise LabError(f"cannot parse the lab's host key {self.host_public_key}: "
                           "run `stapctl lab down`, delete it and run up again")
        client = paramiko.SSHClient()
        client.get_host_keys().add(f"[{HOST}]:{port}", entry.key.get_name(), entry.key)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(HOST, port=port, username=USER, key_filename=str(self.client_key),
                           timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                           look_for_keys=False, allow_agent=False)
            _, out, _ = client.exec_command("uname -r", timeout=timeout)
            return out.read().decode().strip() or None
        except (paramiko.BadHostKeyException, paramiko.AuthenticationException) as e:
            raise LabError(f"the guest on port {port} rejects the lab's keys ({e}): "
                           "run `stapctl lab down` and up again") from None
        except (paramiko.SSHException, OSError, EOFError):
            return None
        finally:
            client.close()

    def _stop(self, pid: int) -> None:
        """SIGTERM, then SIGKILL, one qemu of ours; return once it is gone."""
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            if not self._is_ours(pid):
                return
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
            end = time.monotonic() + grace
            while time.monotonic() < end and self._is_ours(pid):
                time.sleep(0.1)
        if self._is_ours(pid):
            raise LabError(f"qemu pid {pid} survived SIGKILL; check `ps -p {pid}`")

    def _is_ours(self, pid: int) -> bool:
        """Alive and still a qemu of this lab (not a reused pid, nor a zombie, whose cmdline
        is empty)."""
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        mark = str(self.directory).encode()
        return (os.path.basename(argv[0]).startswith(b"qemu-system")
                and any(mark in a for a in argv))

    def _console_log(self, name: str) -> Path:
        return self.guests_dir / f"{name}.log"

    # --- state, inventory, keys -----------------------------------------------------------

    @contextmanager
    def _locked(self, progress: Progress) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / "lock").open("w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                progress("waiting for another `stapctl lab` command on this lab")
                fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _load(self) -> list[Guest]:
        """The guests the state file records, presumed running until checked."""
        try:
            rows = json.loads(self.state_file.read_text())["guests"]
            return [Guest(g["name"], HOST, g["port"], USER, str(self.client_key), g["release"],
                          g["pid"], GuestState.RUNNING) for g in rows]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LabError(f"{self.state_file} is unreadable ({e!r}): stop stray qemu "
                           "processes by pid and delete it") from None

    def _save(self, guests: list[Guest]) -> None:
        rows = [{"name": g.name, "port": g.port, "pid": g.pid, "release": g.release}
                for g in guests]
        write_atomic(self.state_file, json.dumps({"guests": rows}, indent=2) + "\n")

    def _publish(self, guests: list[Guest], host_pub: str) -> None:
        """Write the Ansible inventory and the known_hosts file it points to."""
        hosts: dict[str, Any] = {
            g.name: {
                "ansible_host": HOST,
                "ansible_port": g.port,
                "ansible_user": USER,
                "ansible_ssh_private_key_file": g.key,
                "stapctl_known_hosts": str(self.known_hosts),
            }
            for g in guests
        }
        write_atomic(self.known_hosts,
                     "".join(f"[{HOST}]:{g.port} {host_pub}\n" for g in guests))
        write_atomic(self.inventory, yaml.safe_dump({"all": {"hosts": hosts}}, sort_keys=False))

    def _status(self, guests: list[Guest]) -> LabStatus:
        return LabStatus(tuple(guests), self.inventory, self.known_hosts)

    def _keys(self) -> Keys:
        """The client key and the guests' host key, made once per lab and baked into the
        image."""
        if not self.client_key.exists():
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
            public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                   serialization.PublicFormat.OpenSSH)
            write_atomic(self.client_public_key, public.decode() + " stapctl-lab\n")
            write_atomic(self.client_key, pem.decode(), mode=0o600)
        if not self.host_key.exists():
            with tempfile.TemporaryDirectory(dir=self.directory) as tmp:
                run([tool("dropbearkey"), "-t", "ed25519", "-f", f"{tmp}/key"])
                os.replace(f"{tmp}/key", self.host_key)
        if not self.host_public_key.exists():
            out = run([tool("dropbearkey"), "-y", "-f", str(self.host_key)])
            line = next((s for s in out.splitlines() if s.startswith("ssh-")), "")
            write_atomic(self.host_public_key, " ".join(line.split()[:2]) + "\n")
        client_pub = " ".join(_read(self.client_public_key).split()[:2])
        return Keys(client_pub, self.host_key, _read(self.host_public_key))


def _kvm_usable() -> bool:
    """Only worth a try with /dev/kvm *and* vmx/svm: here /dev/kvm opens, yet guests hang."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    cpuinfo = Path("/proc/cpuinfo").read_text()
    return re.search(r"^flags\s*:.*\b(vmx|svm)\b", cpuinfo, re.M) is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 15) -> str:
    """The end of a console log, led by the panic message, which scrolls off behind its
    stack."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        text = []
    panic = [line for line in text if "Kernel panic" in line][:1]
    return "\n".join(panic + text[-lines:]) or "(no console output)"


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""
