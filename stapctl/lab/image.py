"""The guests' image: this machine's Debian kernel as an ELF vmlinux, and an initramfs
with busybox, dropbear, kmod and python3 from this machine's own packages.

The image is cached under the lab folder, named by the versions of everything in it, and
rebuilt only when one of them changes.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import platform
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stapctl.errors import LabError
from stapctl.lab.system import INSTALL_HINTS, run, tool

Progress = Callable[[str], None]

IMAGE_FORMAT = 2  # bump when the image recipe changes, so cached images are rebuilt
HOST_PACKAGES = ("busybox-static", "dropbear-bin", "kmod")
# staprun/stapio/stapsh, to compare with the native tools; `stap --remote=ssh://` starts
# stapsh through /bin/bash (`type -P stapsh`), else falls back to one ssh per step
OPTIONAL_PACKAGES = ("systemtap-runtime", "bash")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
SKIPPED_DIRS = ("usr/share/", "etc/init.d/")  # docs and service scripts a guest never runs

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
class Keys:
    """The SSH keys an image bakes in: the client key root accepts, and the host key."""

    client_pub: str  # "type base64"
    host_key: Path  # dropbear's private key file
    host_pub: str  # "type base64"


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


def preflight(release: str, kernel_tree: Path = Path("/")) -> None:
    """Fail early, with what to install, on a machine that cannot build or boot a guest.

    A kernel from a build root (``kernel_tree``) has its headers there."""
    if platform.machine() != "x86_64":
        raise LabError(f"the lab boots amd64 Debian kernels; this machine is {platform.machine()}")
    for name in INSTALL_HINTS:
        tool(name)
    if kernel_tree == Path("/") and not Path(f"/lib/modules/{release}/build").is_dir():
        raise LabError(f"the headers of {release} are missing (stap compiles against them): "
                       f"apt-get install linux-headers-{release}")


def guest_image(folder: Path, release: str, keys: Keys, progress: Progress,
                kernel_tree: Path = Path("/")) -> Path:
    """The guest's vmlinux + initramfs in FOLDER/images, rebuilt only when an input package
    version or a key changes; downloaded packages are kept in FOLDER/cache.

    The kernel and its modules come from ``kernel_tree``: this machine, or the build root
    of another Debian suite (stapctl.toolchains); the userland is this machine's."""
    inputs = _inputs(release, kernel_tree)
    recipe = [IMAGE_FORMAT, release, sorted(inputs.versions.items()), keys.client_pub,
              keys.host_pub, INIT, ETC_FILES]
    if kernel_tree != Path("/"):
        recipe.append(str(kernel_tree))
    key = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]
    images = folder / "images"
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
        debs = _download(folder / "cache", {p: inputs.versions[p] for p in inputs.downloads},
                         progress)
        kernel_root = kernel_tree
        if not inputs.kernel_installed:
            kernel_root = work / "kernel"
            deb = debs.pop(f"linux-image-{release}")
            run([tool("dpkg-deb"), "-x", str(deb), str(kernel_root)])
        root = work / "root"
        _rootfs(root, work, inputs, list(debs.values()), kernel_root, keys, progress)
        out = work / "image"
        out.mkdir()
        progress("writing the initramfs")
        _write_cpio(root, out / "initramfs.cpio")
        progress("extracting vmlinux from vmlinuz")
        _extract_vmlinux(kernel_root / "boot" / f"vmlinuz-{release}", out / "vmlinux")
        meta = {"release": release, "versions": inputs.versions}
        (out / "image.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(out, image)
    for old in images.iterdir():  # older images of this release; other releases' stay
        if old != image and not old.name.startswith(".") and _image_release(old) == release:
            shutil.rmtree(old)
    size = (image / "initramfs.cpio").stat().st_size / 2**20
    progress(f"guest image built in {time.monotonic() - t0:.1f} s (initramfs {size:.0f} MB)")
    return image


def _image_release(image: Path) -> str:
    try:
        return str(json.loads((image / "image.json").read_text())["release"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


@dataclass(frozen=True)
class _Inputs:
    """What goes into the image, and the package versions that name it in the cache."""

    release: str
    python: str  # "3.11"
    copied: tuple[str, ...]  # packages whose files are copied from this machine
    downloads: tuple[str, ...]  # guest-only packages fetched with apt-get download
    kernel_installed: bool  # else linux-image-RELEASE is downloaded too
    versions: dict[str, str]


def _inputs(release: str, kernel_tree: Path) -> _Inputs:
    kernel_pkg = f"linux-image-{release}"
    installed = _installed([kernel_pkg, *HOST_PACKAGES, *OPTIONAL_PACKAGES])
    for pkg in HOST_PACKAGES:
        if pkg not in installed:
            raise LabError(f"{pkg} is not installed: apt-get install {pkg}")
    copied = [p for p in (*HOST_PACKAGES, *OPTIONAL_PACKAGES) if p in installed]
    versions = {p: installed[p][0] for p in copied}
    if kernel_tree != Path("/"):
        installed = _installed([kernel_pkg], kernel_tree)
        if kernel_pkg not in installed:
            raise LabError(f"{kernel_tree} holds no {kernel_pkg}: `stapctl toolchain remove` "
                           "its toolchain and let stapctl make it again")
    kernel_installed = (kernel_pkg in installed
                        and (kernel_tree / f"boot/vmlinuz-{release}").exists()
                        and (kernel_tree / f"lib/modules/{release}/kernel").is_dir())
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


def _rootfs(root: Path, work: Path, inputs: _Inputs, debs: list[Path], kernel_root: Path,
            keys: Keys, progress: Progress) -> None:
    """Lay out the guest's files: merged /usr like bookworm, packages, NIC driver, libraries."""
    for sub in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "proc", "sys", "dev", "tmp",
                "run", "var", "etc/dropbear", "root/.ssh"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "sbin", "lib", "lib64"):
        (root / link).symlink_to(f"usr/{link}")
    (root / "var" / "run").symlink_to("../run")
    progress(f"copying {', '.join(inputs.copied)} from this machine")
    for pkg in inputs.copied:
        for line in run([tool("dpkg-query"), "-L", pkg]).splitlines():
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
        run([tool("dpkg-deb"), "-x", str(deb), str(tree)])
        for src in sorted(tree.rglob("*")):
            _copy(src, root, "/" + str(src.relative_to(tree)))
    modules = kernel_root / "lib" / "modules" / inputs.release
    nics = list((modules / "kernel").rglob("e1000.ko*"))
    if not nics:
        raise LabError(f"no e1000 module under {modules}: the guest would have no network")
    _copy(nics[0], root, "/" + str(nics[0].relative_to(kernel_root)))
    run([tool("depmod"), "-b", str(root), inputs.release])
    for applet in run([tool("busybox"), "--list-full"]).split():
        if not os.path.lexists(root / applet):
            (root / applet).symlink_to("/bin/busybox")
    (root / "usr/bin/python3").symlink_to(f"python{inputs.python}")
    if (root / "usr/lib/systemtap/stapsh").exists():  # Debian keeps it off PATH
        (root / "usr/bin/stapsh").symlink_to("../lib/systemtap/stapsh")
    if not os.path.lexists(root / "usr/lib/sftp-server"):  # the path dropbear runs for sftp
        (root / "usr/lib/sftp-server").symlink_to("openssh/sftp-server")
    for rel, text in ETC_FILES.items():
        (root / rel).write_text(text)
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    shutil.copyfile(keys.host_key, root / "etc/dropbear/dropbear_ed25519_host_key")
    (root / "etc/dropbear/dropbear_ed25519_host_key").chmod(0o600)
    (root / "root/.ssh/authorized_keys").write_text(keys.client_pub + " stapctl-lab\n")
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
    out = subprocess.run([tool("ldd"), *map(str, elves)], capture_output=True, text=True,
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
    decompressor; Debian's bzImage carries it as one XZ (12) or zstd (13) stream."""
    data = vmlinuz.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        elf = _zstd_payload(vmlinuz, data)
    else:
        try:
            elf = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data[start:])
        except lzma.LZMAError as e:
            raise LabError(f"cannot decompress {vmlinuz}: {e}") from None
    if not elf.startswith(b"\x7fELF"):
        raise LabError(f"{vmlinuz} does not hold an ELF vmlinux")
    out.write_bytes(elf)


def _zstd_payload(vmlinuz: Path, data: bytes) -> bytes:
    """The kernel a bzImage holds as zstd: its boot header says where the payload is, and
    the payload ends with the 4-byte size the kernel's build appends."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        raise LabError(f"{vmlinuz} is not a bzImage; the lab expects a Debian amd64 kernel")
    setup_sectors = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sectors + 1) * 512 + offset
    payload = data[start:start + length]
    if not payload.startswith(ZSTD_MAGIC):
        raise LabError(f"{vmlinuz} holds neither an XZ- nor a zstd-compressed kernel")
    proc = subprocess.run([tool("zstd"), "-dc"], input=payload[:-4], capture_output=True,
                          check=False)
    if proc.returncode != 0:
        raise LabError(f"cannot decompress {vmlinuz}: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


# --- Debian packages ----------------------------------------------------------------------


def _installed(pkgs: list[str], tree: Path = Path("/")) -> dict[str, tuple[str, str]]:
    """Installed packages among `pkgs` (in the system at `tree`), as name -> (version,
    Depends)."""
    admin = [f"--admindir={tree / 'var/lib/dpkg'}"] if tree != Path("/") else []
    proc = subprocess.run(
        [tool("dpkg-query"), *admin, "-W", "-f", "${Package}\t${db:Status-Status}\t"
         "${Version}\t${Depends}\n", *pkgs], capture_output=True, text=True, check=False)
    found = {}
    for line in proc.stdout.splitlines():
        name, state, version, depends = line.split("\t")
        if state == "installed":
            found[name] = (version, depends)
    return found


def _apt_show(pkgs: list[str]) -> dict[str, str]:
    """The records of the versions `apt-get download` would fetch, from the local lists."""
    out = run([tool("apt-cache"), "show", "--no-all-versions", *pkgs],
              hint="run apt-get update, then retry")
    records = {_field(r, "Package"): r for r in out.split("\n\n") if r.strip()}
    missing = [p for p in pkgs if p not in records]
    if missing:
        raise LabError(f"apt knows no {', '.join(missing)}: run apt-get update, then retry")
    return records


def _field(record: str, name: str) -> str:
    match = re.search(rf"^{name}: (\S+)", record, re.M)
    return match.group(1) if match else ""


def _download(cache: Path, wanted: dict[str, str], progress: Progress) -> dict[str, Path]:
    """Fetch the guest-only packages once, with the configured apt sources; no install."""
    cache.mkdir(parents=True, exist_ok=True)
    debs = {p: cache / f"{p}_{v.replace(':', '%3a')}.deb" for p, v in wanted.items()}
    todo = [p for p, deb in debs.items() if not deb.exists()]
    if todo:
        progress(f"downloading {', '.join(todo)}")
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            run([tool("apt-get"), "download", *(f"{p}={wanted[p]}" for p in todo)], cwd=tmp,
                hint="run apt-get update, then retry")
            for p in todo:
                (deb,) = Path(tmp).glob(f"{p}_*.deb")
                os.replace(deb, debs[p])
    for old in cache.glob("*.deb"):
        if old not in debs.values():
            old.unlink()
    return debs
