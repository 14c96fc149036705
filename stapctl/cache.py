"""The content-addressed module cache: ``<root>/modules/<key>/`` holds ``module.ko``,
``meta.json`` and ``script.stp``.

Its modules are shipped to every host and loaded into their kernels, so nothing in it is
taken on its word: the cache must be the user's own and writable by no one else, and a
module is hashed again on every lookup and compared with the sha256 in its meta; an entry
that does not match counts as missing, so it is built again.

Two applies sharing the cache at once are safe: a per-key lock file serialises the
compiles of one key, and a finished entry appears by one atomic rename.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from stapctl.errors import CacheError
from stapctl.models import ModuleArtifact, ModuleSpec

SHA256 = re.compile(r"[0-9a-f]{64}")  # a sha256 as we write it; also the shape of a key


def cache_dir() -> Path:
    """The cache: ``$STAPCTL_CACHE_DIR``, else the user's cache directory."""
    configured = os.environ.get("STAPCTL_CACHE_DIR")
    return Path(configured) if configured else Path(platformdirs.user_cache_dir("stapctl"))


def replace_file(path: Path, data: bytes) -> None:
    """Write ``path`` whole by a rename: a reader sees the old file or the new one, and
    the partial file is this thread's own, so threads and processes writing the same path
    at once (workers reading one kernel's symbols) never rename each other's."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, or "" if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as data:
            while chunk := data.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return ""
    return digest.hexdigest()


def private_dir(path: Path, root: Path) -> Path:
    """``path`` (``root`` or a directory in it), created (0700) if missing, once it is
    known to be ours alone.

    A directory someone else owns or can write to may hold modules they planted, and
    stapctl would load those on every host.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
    except OSError as exc:
        raise CacheError(f"cannot use {path} for the module cache: {exc.strerror}: "
                         "set STAPCTL_CACHE_DIR to a directory of your own") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise CacheError(f"{path} is not a directory: remove it, or set STAPCTL_CACHE_DIR "
                         "to a directory of your own")
    if info.st_uid != os.geteuid():
        raise CacheError(f"{path} belongs to uid {info.st_uid}, not to you (uid "
                         f"{os.geteuid()}), so the modules in {root} cannot be trusted: "
                         f"run chown -R {os.geteuid()} {root}, or set STAPCTL_CACHE_DIR to "
                         "a directory of your own")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CacheError(f"{path} is writable by others (mode "
                         f"{stat.S_IMODE(info.st_mode):04o}), so the modules in {root} "
                         f"cannot be trusted: run chmod -R go-w {root}")
    return path


@dataclass(frozen=True)
class CachedModule:
    """One cache entry as `stapctl cache list` shows it."""

    key: str
    module_name: str
    release: str
    stap_version: str
    runtime_fix: str
    size: int  # bytes of the module file
    mtime: float


class ModuleCache:
    """The modules directory of a checked cache root, with locks and private subdirectories
    for the compiler's own files (stap's cache, runtime copies, header trees, symbols)."""

    def __init__(self, root: Path) -> None:
        self.root = private_dir(root, root)

    def directory(self, name: str) -> Path:
        """A private subdirectory of the cache, e.g. ``stap`` or ``trees``."""
        return private_dir(self.root / name, self.root)

    @contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Hold the lock called ``name`` (a key, or a compiler directory's name)."""
        with open(self.directory("locks") / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def lookup(self, spec: ModuleSpec) -> ModuleArtifact | None:
        """The cached module for ``spec``, if there is one whose bytes match its meta."""
        entry = self.root / "modules" / spec.key
        meta = _read_meta(entry / "meta.json")
        sha256 = meta.get("sha256")
        if (not isinstance(sha256, str) or SHA256.fullmatch(sha256) is None
                or meta.get("module_name") != spec.module_name):
            return None
        module = entry / "module.ko"
        if file_sha256(module) != sha256:
            return None  # changed after it was built: build it again
        return ModuleArtifact(key=spec.key, path=module, sha256=sha256,
                              module_name=spec.module_name)

    def store(self, spec: ModuleSpec, module: bytes) -> ModuleArtifact:
        """Add a freshly built module; the caller holds the key's lock."""
        modules = self.directory("modules")
        sha256 = hashlib.sha256(module).hexdigest()
        try:
            staging = Path(tempfile.mkdtemp(dir=modules, prefix=".new-"))
            try:
                (staging / "module.ko").write_bytes(module)
                (staging / "script.stp").write_text(spec.script)
                (staging / "meta.json").write_text(json.dumps({
                    "sha256": sha256,
                    "module_name": spec.module_name,
                    "release": spec.release,
                    "arch": spec.arch,
                    "options": list(spec.options),
                    "stap_version": spec.stap_version,
                    "runtime_fix": spec.runtime_fix,
                }))
                final = modules / spec.key
                shutil.rmtree(final, ignore_errors=True)  # an entry that failed its check
                os.rename(staging, final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        except OSError as exc:
            raise CacheError(f"cannot write to the module cache {modules}: {exc}") from exc
        return ModuleArtifact(key=spec.key, path=final / "module.ko", sha256=sha256,
                              module_name=spec.module_name)

    def entries(self) -> list[CachedModule]:
        """Every cached module, newest first."""
        rows: list[CachedModule] = []
        for entry in (self.root / "modules").glob("*"):
            if SHA256.fullmatch(entry.name) is None:
                continue  # an entry still being written, or something that is not ours
            meta = _read_meta(entry / "meta.json")
            module = entry / "module.ko"
            try:
                mtime = entry.stat().st_mtime
                size = module.stat().st_size if module.is_file() else 0
            except OSError:
                continue  # pruned meanwhile
            rows.append(CachedModule(
                key=entry.name, module_name=str(meta.get("module_name", "")),
                release=str(meta.get("release", "")),
                stap_version=str(meta.get("stap_version", "")),
                runtime_fix=str(meta.get("runtime_fix", "")),
                size=size, mtime=mtime))
        rows.sort(key=lambda row: row.mtime, reverse=True)
        return rows

    def prune(self, keep: int = 0) -> int:
        """Delete all but the ``keep`` newest cached modules; returns how many went."""
        removed = self.entries()[keep:]
        for row in removed:
            shutil.rmtree(self.root / "modules" / row.key, ignore_errors=True)
        return len(removed)


def _read_meta(path: Path) -> Mapping[str, Any]:
    """An entry's meta.json as a mapping; empty when it is missing or broken."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}
