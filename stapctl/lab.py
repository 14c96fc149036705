"""The local lab: real Debian kernels booted in qemu guests, reachable over SSH on loopback.

Machines without module support (this one, CI) can only load a probe inside a guest. The
guest is built from this machine's own Debian packages, so its kernel is exactly the one
``stap -r RELEASE`` compiles against. See shared/docs/lab.md for the measured facts.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import lzma
import os
import platform
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import paramiko
import platformdirs
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stapctl.errors import LabError
from stapctl.models import Host

Progress = Callable[[str], None]

HOST = "127.0.0.1"
USER = "root"
BOOT_TIMEOUT = 300.0  # TCG on a loaded 2-core machine has taken 40 s+; leave a wide margin
KVM_TIMEOUT = 30.0  # a KVM guest that is not up by then is hung: fall back to TCG
IMAGE_FORMAT = 1  # bump when the image recipe changes, so cached images are rebuilt
HOST_PACKAGES = ("busybox-static", "dropbear-bin", "kmod")
OPTIONAL_PACKAGES = ("systemtap-runtime",)  # staprun/stapio, to compare with native tools
SKIPPED_DIRS = ("usr/share/", "etc/init.d/")  # docs and service scripts a guest never runs
INSTALL_HINTS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "dropbearkey": "dropbear-bin",
    "busybox": "busybox-static",
    "depmod": "kmod",
    "ldd": "libc-bin",
    "dpkg-query": "dpkg",
    "dpkg-deb": "dpkg",
    "apt-get": "apt",
    "apt-cache": "apt",
}

INIT = """#!/bin/sh
export PATH=/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
for arg in $(cat /proc/cmdline); do
  case "$arg" in stapctl.name=*) hostname "${arg#*=}" ;; esac
done
modprobe e1000
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
# dropbear as PID 1 reaps every orphan; if it dies the kernel panics and qemu exits.
exec dropbear -F -E -s -p 22 -r /etc/dropbear/dropbear_ed25519_host_key
"""

ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
    "etc/shells": "/bin/sh\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files\n",
    "etc/hosts": "127.0.0.1 localhost\n",
}


@dataclass(frozen=True)
class Guest:
    name: str
    host: str
    port: int
    user: str
    key: str  # the client's private key file (OpenSSH format)
    release: str
    pid: int
    state: str  # "running" | "stopped" | "unreachable"


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


def lab_dir() -> Path:
    """Where the lab keeps keys, images, state and logs (one lab per user by default)."""
    env = os.environ.get("STAPCTL_LAB_DIR")
    base = Path(env) if env else Path(platformdirs.user_data_dir("stapctl")) / "lab"
    return base.expanduser().resolve()


def guest_release() -> str:
    """The kernel release the guests boot: the one the installed headers meta-package names."""
    for meta in ("linux-headers-amd64", "linux-image-amd64"):
        info = _installed([meta]).get(meta)
        if info:
            kind = meta.rsplit("-", 1)[0]  # linux-headers / linux-image
            match = re.search(rf"\b{kind}-(\S+?)(?:\s|,|$)", info[1])
            if match:
                return match.group(1)
    raise LabError("no Debian kernel is installed: apt-get install linux-headers-amd64 "
                   "linux-image-amd64")


def up(count: int = 1, progress: Progress = _quiet, *,
       timeout: float = BOOT_TIMEOUT, release: str | None = None) -> LabStatus:
    """Make guests lab-1..lab-COUNT answer SSH, keeping those already running.

    ``release`` boots another kernel than the installed headers meta-package names (its
    headers must be installed); one lab directory holds guests of one release.
    """
    if count < 1:
        raise LabError(f"the lab needs at least one guest, not {count}")
    d = lab_dir()
    with _locked(d, progress):
        release = release or guest_release()
        _preflight(release)
        client_pub, host_pub = _keys(d)
        image = _image(d, release, client_pub, host_pub, progress)
        guests = [g for g in _load(d) if _is_ours(g.pid, d)]
        for g in guests:
            if g.release != release:
                progress(f"{g.name} still runs {g.release}; `stapctl lab down` refreshes it")
        names = [f"lab-{i}" for i in range(1, count + 1)]
        missing = [n for n in names if n not in {g.name for g in guests}]
        deadline = time.monotonic() + timeout
        guests = [_wait(d, g, host_pub, deadline, progress) for g in guests]
        booted = None
        if missing and _kvm_usable():
            try:
                booted = _boot(d, missing, image, release, "kvm", guests, host_pub,
                               time.monotonic() + KVM_TIMEOUT, progress)
            except LabError as e:
                progress(f"KVM failed ({e}); falling back to TCG")
        if missing and booted is None:
            booted = _boot(d, missing, image, release, "tcg", guests, host_pub,
                           time.monotonic() + timeout, progress)
        guests += booted or []
        guests.sort(key=lambda g: int(g.name.rsplit("-", 1)[1]))
        _save(d, guests)
        _publish(d, guests, host_pub)
        progress(f"inventory: {d / 'inventory.yaml'}")
        return _status(d, guests)


def status() -> LabStatus:
    """Which recorded guests are alive, and whether their SSH answers."""
    d = lab_dir()
    host_pub = _read(d / "host_ed25519.pub")
    guests = []
    for g in _load(d):
        if not _is_ours(g.pid, d):
            g = replace(g, state="stopped")
        elif _login(d, g.port, host_pub, timeout=10.0) is None:
            g = replace(g, state="unreachable")
        guests.append(g)
    return _status(d, guests)


def down(progress: Progress = _quiet) -> LabStatus:
    """Stop exactly the qemu processes the lab started, and forget them."""
    d = lab_dir()
    with _locked(d, progress):
        stopped = []
        for g in _load(d):
            if _is_ours(g.pid, d):
                progress(f"stopping {g.name} (pid {g.pid})")
                _stop(g.pid, d)
            stopped.append(replace(g, state="stopped"))
        _save(d, [])
        _publish(d, [], "")
        return _status(d, stopped)


# --- guests -----------------------------------------------------------------------------


def _boot(d: Path, names: list[str], image: Path, release: str, accel: str,
          running: list[Guest], host_pub: str, deadline: float,
          progress: Progress) -> list[Guest]:
    """Start the guests together (they boot in parallel), then wait for each one's SSH.

    The state file lists each guest as soon as its qemu exists, so `down` finds it even if
    this process dies; on any failure the guests of this batch are stopped again.
    """
    started: list[Guest] = []
    try:
        for name in names:
            started.append(_start(d, name, image, release, accel, progress))
            _save(d, running + started)
        return [_wait(d, g, host_pub, deadline, progress) for g in started]
    except BaseException:
        for g in started:
            _stop(g.pid, d)
        _save(d, running)
        raise


def _start(d: Path, name: str, image: Path, release: str, accel: str,
           progress: Progress) -> Guest:
    """Launch one daemonized qemu; retry on another port if the free one was taken meanwhile."""
    guests = d / "guests"
    guests.mkdir(parents=True, exist_ok=True)
    log, pidfile = guests / f"{name}.log", guests / f"{name}.pid"
    error = ""
    for _ in range(3):
        port = _free_port()
        pidfile.unlink(missing_ok=True)
        cmd = [
            _tool("qemu-system-x86_64"), "-name", f"stapctl-{name}",
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
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              check=False)
        if proc.returncode == 0:
            pid = int(pidfile.read_text().strip())
            progress(f"{name}: qemu pid {pid} ({accel}), ssh on {HOST}:{port}, "
                     f"console log {log}")
            return Guest(name, HOST, port, USER, str(d / "id_ed25519"), release, pid,
                         "unreachable")
        error = proc.stderr.strip()
        if "forwarding" not in error:  # only a port taken meanwhile is worth a retry
            break
    raise LabError(f"qemu could not start {name}: {error}")


def _wait(d: Path, g: Guest, host_pub: str, deadline: float, progress: Progress) -> Guest:
    """Poll until root can log in over SSH with the lab's key and the host key checks out."""
    progress(f"{g.name}: waiting for SSH on {HOST}:{g.port}")
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        if not _is_ours(g.pid, d):
            raise LabError(f"{g.name} stopped while booting (qemu pid {g.pid} is gone); "
                           f"console log {d / 'guests' / (g.name + '.log')}:\n"
                           + _tail(d / "guests" / f"{g.name}.log"))
        release = _login(d, g.port, host_pub, min(15.0, max(1.0, deadline - time.monotonic())))
        if release is not None:
            progress(f"{g.name}: SSH answers ({release}) after {time.monotonic() - t0:.1f} s")
            return replace(g, release=release, state="running")
        time.sleep(1.0)
    log = d / "guests" / f"{g.name}.log"
    raise LabError(f"{g.name} did not answer SSH on {HOST}:{g.port} in time; console log "
                   f"{log}:\n{_tail(log)}\nRetry, or run `stapctl lab down` and then up again")


def _login(d: Path, port: int, host_pub: str, timeout: float) -> str | None:
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
        raise LabError(f"cannot parse the lab's host key {d / 'host_ed25519.pub'}: "
                       "run `stapctl lab down`, delete it and run up again")
    client = paramiko.SSHClient()
    client.get_host_keys().add(f"[{HOST}]:{port}", entry.key.get_name(), entry.key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(HOST, port=port, username=USER, key_filename=str(d / "id_ed25519"),
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


def _stop(pid: int, d: Path) -> None:
    """SIGTERM, then SIGKILL, one qemu of ours; return once it is gone."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if not _is_ours(pid, d):
            return
        with suppress(ProcessLookupError):
            os.kill(pid, sig)
        end = time.monotonic() + grace
        while time.monotonic() < end and _is_ours(pid, d):
            time.sleep(0.1)
    if _is_ours(pid, d):
        raise LabError(f"qemu pid {pid} survived SIGKILL; check `ps -p {pid}`")


def _is_ours(pid: int, d: Path) -> bool:
    """Alive and still a qemu of this lab (not a reused pid, nor a zombie, whose cmdline is
    empty)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    mark = str(d).encode()
    return os.path.basename(argv[0]).startswith(b"qemu-system") and any(mark in a for a in argv)


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
    """The end of a console log, led by the panic message, which scrolls off behind its stack."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        text = []
    panic = [line for line in text if "Kernel panic" in line][:1]
    return "\n".join(panic + text[-lines:]) or "(no console output)"


# --- state, inventory, keys ---------------------------------------------------------------


@contextmanager
def _locked(d: Path, progress: Progress) -> Iterator[None]:
    """One up/down at a time per lab dir: developers and test sessions share one lab."""
    d.mkdir(parents=True, exist_ok=True)
    with (d / "lock").open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress("waiting for another `stapctl lab` command on this lab")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _load(d: Path) -> list[Guest]:
    try:
        rows = json.loads((d / "state.json").read_text())["guests"]
        return [Guest(g["name"], HOST, g["port"], USER, str(d / "id_ed25519"), g["release"],
                      g["pid"], "running") for g in rows]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LabError(f"{d / 'state.json'} is unreadable ({e!r}): stop stray qemu processes "
                       "by pid and delete it") from None


def _save(d: Path, guests: list[Guest]) -> None:
    rows = [{"name": g.name, "port": g.port, "pid": g.pid, "release": g.release}
            for g in guests]
    _write(d / "state.json", json.dumps({"guests": rows}, indent=2) + "\n")


def _publish(d: Path, guests: list[Guest], host_pub: str) -> None:
    """Write the Ansible inventory and the known_hosts file it points to."""
    hosts: dict[str, Any] = {
        g.name: {
            "ansible_host": HOST,
            "ansible_port": g.port,
            "ansible_user": USER,
            "ansible_ssh_private_key_file": g.key,
            "stapctl_known_hosts": str(d / "known_hosts"),
        }
        for g in guests
    }
    _write(d / "known_hosts", "".join(f"[{HOST}]:{g.port} {host_pub}\n" for g in guests))
    _write(d / "inventory.yaml", yaml.safe_dump({"all": {"hosts": hosts}}, sort_keys=False))


def _status(d: Path, guests: list[Guest]) -> LabStatus:
    return LabStatus(tuple(guests), d / "inventory.yaml", d / "known_hosts")


def _keys(d: Path) -> tuple[str, str]:
    """The client key and the guests' host key, made once per lab and baked into the image.

    Returns both public keys as "type base64" strings.
    """
    client = d / "id_ed25519"
    if not client.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
        _write(d / "id_ed25519.pub", public.decode() + " stapctl-lab\n")
        _write(client, pem.decode(), mode=0o600)
    host = d / "host_ed25519"
    if not host.exists():
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            _run([_tool("dropbearkey"), "-t", "ed25519", "-f", f"{tmp}/key"])
            os.replace(f"{tmp}/key", host)
    if not (d / "host_ed25519.pub").exists():
        out = _run([_tool("dropbearkey"), "-y", "-f", str(host)])
        line = next((s for s in out.splitlines() if s.startswith("ssh-")), "")
        _write(d / "host_ed25519.pub", " ".join(line.split()[:2]) + "\n")
    client_pub = " ".join(_read(d / "id_ed25519.pub").split()[:2])
    return client_pub, _read(d / "host_ed25519.pub")


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """Atomic replace, so a reader (status, another test session) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# --- the image ----------------------------------------------------------------------------


def _preflight(release: str) -> None:
    if platform.machine() != "x86_64":
        raise LabError(f"the lab boots amd64 Debian kernels; this machine is {platform.machine()}")
    for tool in INSTALL_HINTS:
        _tool(tool)
    if not Path(f"/lib/modules/{release}/build").is_dir():
        raise LabError(f"the headers of {release} are missing (stap compiles against them): "
                       f"apt-get install linux-headers-{release}")


@dataclass(frozen=True)
class _Inputs:
    """What goes into the image, and the package versions that name it in the cache."""

    release: str
    python: str  # "3.11"
    copied: tuple[str, ...]  # packages whose files are copied from this machine
    downloads: tuple[str, ...]  # guest-only packages fetched with apt-get download
    kernel_installed: bool  # else linux-image-RELEASE is downloaded too
    versions: dict[str, str]


def _inputs(release: str) -> _Inputs:
    kernel_pkg = f"linux-image-{release}"
    installed = _installed([kernel_pkg, *HOST_PACKAGES, *OPTIONAL_PACKAGES])
    for pkg in HOST_PACKAGES:
        if pkg not in installed:
            raise LabError(f"{pkg} is not installed: apt-get install {pkg}")
    copied = [p for p in (*HOST_PACKAGES, *OPTIONAL_PACKAGES) if p in installed]
    kernel_installed = (kernel_pkg in installed and Path(f"/boot/vmlinuz-{release}").exists()
                        and Path(f"/lib/modules/{release}/kernel").is_dir())
    versions = {p: installed[p][0] for p in copied}
    if kernel_installed:
        versions[kernel_pkg] = installed[kernel_pkg][0]
    downloads = ["openssh-sftp-server"] + ([] if kernel_installed else [kernel_pkg])
    apt = _apt_show(["python3-minimal", *downloads])
    match = re.search(r"^(?:Pre-)?Depends:.*?\bpython(3\.\d+)-minimal\b",
                      apt["python3-minimal"], re.M)
    if match is None:
        raise LabError("cannot tell which python3 the distribution ships (python3-minimal)")
    py = match.group(1)
    pythons = [f"python{py}-minimal", f"libpython{py}-minimal", f"libpython{py}-stdlib"]
    apt |= _apt_show(pythons)
    downloads += pythons
    versions |= {p: _field(apt[p], "Version") for p in downloads}
    return _Inputs(release, py, tuple(copied), tuple(downloads), kernel_installed, versions)


def _image(d: Path, release: str, client_pub: str, host_pub: str,
           progress: Progress) -> Path:
    """The guest's vmlinux + initramfs, rebuilt only when an input package version changes."""
    inputs = _inputs(release)
    recipe = [IMAGE_FORMAT, release, sorted(inputs.versions.items()), client_pub, host_pub,
              INIT, ETC_FILES]
    key = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]
    images = d / "images"
    image = images / key
    if (image / "image.json").exists():
        progress(f"guest image for {release} is cached ({image})")
        return image
    t0 = time.monotonic()
    progress(f"building the guest image for {release}")
    images.mkdir(parents=True, exist_ok=True)
    for stale in images.glob(".build-*"):
        shutil.rmtree(stale)
    with tempfile.TemporaryDirectory(dir=images, prefix=".build-") as tmp:
        work = Path(tmp)
        debs = _download(d, {p: inputs.versions[p] for p in inputs.downloads}, progress)
        kernel_root = Path("/")
        if not inputs.kernel_installed:
            kernel_root = work / "kernel"
            deb = debs.pop(f"linux-image-{release}")
            _run([_tool("dpkg-deb"), "-x", str(deb), str(kernel_root)])
        root = work / "root"
        _rootfs(root, work, inputs, list(debs.values()), kernel_root, client_pub, d, progress)
        out = work / "image"
        out.mkdir()
        progress("writing the initramfs")
        _write_cpio(root, out / "initramfs.cpio")
        progress("extracting vmlinux from vmlinuz")
        _extract_vmlinux(kernel_root / "boot" / f"vmlinuz-{release}", out / "vmlinux")
        meta = {"release": release, "versions": inputs.versions}
        (out / "image.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(out, image)
    for old in images.iterdir():
        if old != image and not old.name.startswith("."):
            shutil.rmtree(old)
    size = (image / "initramfs.cpio").stat().st_size / 2**20
    progress(f"guest image built in {time.monotonic() - t0:.1f} s (initramfs {size:.0f} MB)")
    return image


def _rootfs(root: Path, work: Path, inputs: _Inputs, debs: list[Path], kernel_root: Path,
            client_pub: str, d: Path, progress: Progress) -> None:
    """Lay out the guest's files: merged /usr like bookworm, packages, NIC driver, libraries."""
    for sub in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "proc", "sys", "dev", "tmp",
                "run", "var", "etc/dropbear", "root/.ssh"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "sbin", "lib", "lib64"):
        (root / link).symlink_to(f"usr/{link}")
    (root / "var" / "run").symlink_to("../run")
    progress(f"copying {', '.join(inputs.copied)} from this machine")
    for pkg in inputs.copied:
        for line in _run([_tool("dpkg-query"), "-L", pkg]).splitlines():
            if line.startswith("/") and line != "/." and not line.startswith("/etc/"):
                try:
                    _copy(Path(line), root, line)
                except PermissionError as e:  # staprun is setuid and not world-readable
                    if pkg not in OPTIONAL_PACKAGES:
                        raise LabError(f"cannot read {line} ({e.strerror}): run as root") from None
                    progress(f"left out {line}: {e.strerror}")
    for deb in debs:
        tree = work / "deb" / deb.stem
        tree.mkdir(parents=True)
        _run([_tool("dpkg-deb"), "-x", str(deb), str(tree)])
        for src in sorted(tree.rglob("*")):
            _copy(src, root, "/" + str(src.relative_to(tree)))
    modules = kernel_root / "lib" / "modules" / inputs.release
    nics = list((modules / "kernel").rglob("e1000.ko*"))
    if not nics:
        raise LabError(f"no e1000 module under {modules}: the guest would have no network")
    _copy(nics[0], root, "/" + str(nics[0].relative_to(kernel_root)))
    _run([_tool("depmod"), "-b", str(root), inputs.release])
    for applet in _run([_tool("busybox"), "--list-full"]).split():
        if not os.path.lexists(root / applet):
            (root / applet).symlink_to("/bin/busybox")
    (root / "usr/bin/python3").symlink_to(f"python{inputs.python}")
    if not os.path.lexists(root / "usr/lib/sftp-server"):  # the path dropbear runs for sftp
        (root / "usr/lib/sftp-server").symlink_to("openssh/sftp-server")
    for rel, text in ETC_FILES.items():
        (root / rel).write_text(text)
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    shutil.copyfile(d / "host_ed25519", root / "etc/dropbear/dropbear_ed25519_host_key")
    (root / "etc/dropbear/dropbear_ed25519_host_key").chmod(0o600)
    (root / "root/.ssh/authorized_keys").write_text(client_pub + " stapctl-lab\n")
    (root / "root/.ssh/authorized_keys").chmod(0o600)
    for sub in ("root", "root/.ssh"):
        (root / sub).chmod(0o700)
    _copy_libraries(root, progress)


def _copy(src: Path, root: Path, dest: str) -> None:
    """Copy a file, symlink or directory to the absolute path `dest` inside the rootfs."""
    rel = dest.lstrip("/")
    if any(rel.startswith(s) for s in SKIPPED_DIRS):
        return
    target = root / rel
    if src.is_symlink():
        if not os.path.lexists(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(os.readlink(src))
    elif src.is_dir():
        target.mkdir(parents=True, exist_ok=True)
    elif src.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def _copy_libraries(root: Path, progress: Progress) -> None:
    """Copy from this machine every shared library the guest's programs link (same distro)."""
    elves = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and _is_dynamic(p)]
    out = subprocess.run([_tool("ldd"), *map(str, elves)], capture_output=True, text=True,
                         check=False).stdout
    libs, missing = set(), set()
    for line in out.splitlines():
        match = re.match(r"\s+(?:\S+ => )?(/\S+) \(0x", line)
        if match:
            libs.add(match.group(1))
        elif "not found" in line:
            missing.add(line.split()[0])
    for lib in libs:
        _copy(Path(os.path.realpath(lib)), root, lib)
    if missing:
        progress(f"not on this machine, so not in the guest: {', '.join(sorted(missing))}")


def _is_dynamic(path: Path) -> bool:
    """An ELF executable or shared object (kernel modules are ET_REL and have no libraries)."""
    with path.open("rb") as f:
        head = f.read(18)
    return head[:4] == b"\x7fELF" and head[16] in (2, 3)


def _write_cpio(root: Path, out: Path) -> None:
    """Write a newc archive ourselves: every file owned by root whoever builds it, plus the
    /dev/console node the kernel needs before init, which only root could mknod. Left
    uncompressed: under TCG, gzip costs the guest seconds at each boot."""
    paths = []
    for top, dirs, files in os.walk(root):
        paths += [Path(top) / n for n in dirs + files]
    ino = 0
    with out.open("wb") as f:

        def entry(name: str, mode: int, mtime: int, data: bytes, rdev: int = 0) -> None:
            nonlocal ino
            ino += 1
            raw = name.encode() + b"\0"
            fields = (ino, mode, 0, 0, 1, mtime, len(data), 0, 0, os.major(rdev),
                      os.minor(rdev), len(raw), 0)
            f.write(b"070701" + b"".join(b"%08x" % v for v in fields) + raw)
            f.write(b"\0" * (-(110 + len(raw)) % 4) + data + b"\0" * (-len(data) % 4))

        for path in sorted(paths):
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                data = os.readlink(path).encode()
            elif stat.S_ISREG(st.st_mode):
                data = path.read_bytes()
            else:
                data = b""
            entry(str(path.relative_to(root)), st.st_mode, int(st.st_mtime), data)
        entry("dev/console", stat.S_IFCHR | 0o600, 0, b"", os.makedev(5, 1))
        entry("TRAILER!!!", 0, 0, b"")


def _extract_vmlinux(vmlinuz: Path, out: Path) -> None:
    """qemu boots the ELF vmlinux through its PVH entry, skipping the slow emulated
    decompressor; Debian's bzImage carries it as one XZ stream."""
    data = vmlinuz.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise LabError(f"{vmlinuz} holds no XZ-compressed kernel; the lab expects a Debian "
                       "amd64 kernel (linux-image-amd64)")
    try:
        elf = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data[start:])
    except lzma.LZMAError as e:
        raise LabError(f"cannot decompress {vmlinuz}: {e}") from None
    if not elf.startswith(b"\x7fELF"):
        raise LabError(f"{vmlinuz} does not hold an ELF vmlinux")
    out.write_bytes(elf)


# --- Debian packages ----------------------------------------------------------------------


def _installed(pkgs: list[str]) -> dict[str, tuple[str, str]]:
    """Installed packages among `pkgs`, as name -> (version, Depends)."""
    proc = subprocess.run(
        [_tool("dpkg-query"), "-W", "-f", "${Package}\t${db:Status-Status}\t${Version}\t"
         "${Depends}\n", *pkgs], capture_output=True, text=True, check=False)
    found = {}
    for line in proc.stdout.splitlines():
        name, state, version, depends = line.split("\t")
        if state == "installed":
            found[name] = (version, depends)
    return found


def _apt_show(pkgs: list[str]) -> dict[str, str]:
    """The records of the versions `apt-get download` would fetch, from the local lists."""
    out = _run([_tool("apt-cache"), "show", "--no-all-versions", *pkgs],
               hint="run apt-get update, then retry")
    records = {_field(r, "Package"): r for r in out.split("\n\n") if r.strip()}
    missing = [p for p in pkgs if p not in records]
    if missing:
        raise LabError(f"apt knows no {', '.join(missing)}: run apt-get update, then retry")
    return records


def _field(record: str, name: str) -> str:
    match = re.search(rf"^{name}: (\S+)", record, re.M)
    return match.group(1) if match else ""


def _download(d: Path, wanted: dict[str, str], progress: Progress) -> dict[str, Path]:
    """Fetch the guest-only packages once, with the configured apt sources; no install."""
    cache = d / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    debs = {p: cache / f"{p}_{v.replace(':', '%3a')}.deb" for p, v in wanted.items()}
    todo = [p for p, deb in debs.items() if not deb.exists()]
    if todo:
        progress(f"downloading {', '.join(todo)}")
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            _run([_tool("apt-get"), "download", *(f"{p}={wanted[p]}" for p in todo)], cwd=tmp,
                 hint="run apt-get update, then retry")
            for p in todo:
                (deb,) = Path(tmp).glob(f"{p}_*.deb")
                os.replace(deb, debs[p])
    for old in cache.glob("*.deb"):
        if old not in debs.values():
            old.unlink()
    return debs


def _tool(name: str) -> str:
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        raise LabError(f"{name} not found: apt-get install {INSTALL_HINTS.get(name, name)}")
    return path


def _run(cmd: list[str], hint: str = "", cwd: str | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise LabError(f"`{' '.join(cmd)}` failed:\n{tail}" + (f"\n{hint}" if hint else ""))
    return proc.stdout
