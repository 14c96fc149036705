"""This machine's programs as the lab uses them: found with an install hint, run with a
short error, and files replaced atomically."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from stapctl.errors import LabError

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
    "zstd": "zstd",
}


def tool(name: str) -> str:
    """A program's path; its Debian package is named when it is missing."""
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        raise LabError(f"{name} not found: apt-get install {INSTALL_HINTS.get(name, name)}")
    return path


def run(cmd: list[str], hint: str = "", cwd: str | None = None) -> str:
    """Stdout of a command that must succeed; else its last lines of output and the hint."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise LabError(f"`{' '.join(cmd)}` failed:\n{tail}" + (f"\n{hint}" if hint else ""))
    return proc.stdout


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Atomic replace, so a reader (status, another test session) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
