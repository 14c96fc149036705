"""Compile rendered scripts into kernel modules, once per distinct ModuleSpec.

Modules land in a content-addressed cache (``<cache>/modules/<key>/``) so a second apply
compiles nothing. Two applies sharing the cache at once are safe: a per-key lock file
serialises compiles of the same key, and a finished entry appears by one atomic rename.

stap itself keeps its own cache (``SYSTEMTAP_DIR``) under ours, so kernel feature probing
(15 s and more) is paid once per machine, not once per module.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from stapctl.errors import CompileError
from stapctl.models import ModuleArtifact, ModuleSpec

STDERR_TAIL_LINES = 30
# stap lines that say nothing about the user's script: distro boilerplate, and pass 1's
# complaint about a System.map it does not need
NOISE = ("Tip: ", "WARNING: Kernel function symbol table missing")


def cache_dir() -> Path:
    """The module cache: ``$STAPCTL_CACHE_DIR``, else the user's cache directory."""
    configured = os.environ.get("STAPCTL_CACHE_DIR")
    return Path(configured) if configured else Path(platformdirs.user_cache_dir("stapctl"))


def headers_dir(release: str) -> Path:
    return Path("/lib/modules") / release / "build"


@dataclass(frozen=True)
class RuntimeFix:
    """A known mismatch between an installed systemtap runtime and a newer kernel.

    ``applies`` looks at the kernel headers and the pristine runtime; ``apply`` edits a
    private copy of the runtime, which is then passed to stap with ``-R``.
    """

    name: str
    applies: Callable[[str, Path], bool]
    apply: Callable[[Path], None]


def _header_text(release: str, relative: str) -> str:
    """A kernel header's text, looking in the build tree and then the source tree.

    Debian splits headers into an arch package (``build``) and a common one (``source``).
    """
    for root in (headers_dir(release), Path("/lib/modules") / release / "source"):
        path = root / relative
        if path.is_file():
            return path.read_text(errors="replace")
    return ""


def _task_work_cancel_func_applies(release: str, runtime: Path) -> bool:
    # 6.1.1xx stable kernels made task_work_cancel() take a callback_head and moved the
    # old meaning to task_work_cancel_func(); systemtap 4.8 still uses the old one.
    header = _header_text(release, "include/linux/task_work.h")
    source = runtime / "stp_task_work.c"
    return (
        "task_work_cancel_func" in header
        and source.is_file()
        and "task_work_cancel_func" not in source.read_text()
    )


def _task_work_cancel_func_apply(runtime: Path) -> None:
    source = runtime / "stp_task_work.c"
    text = source.read_text()
    text = text.replace("typeof(&task_work_cancel)", "typeof(&task_work_cancel_func)")
    text = text.replace(
        'kallsyms_lookup_name("task_work_cancel")', 'kallsyms_lookup_name("task_work_cancel_func")'
    )
    source.write_text(text)


FIRST_RESERVE = re.compile(
    r"(bytes_reserved = _stp_data_write_reserve\(hlen\+len,\s*&entry\);)")
HEADER_RETRY = """
        /* stapctl: a header that does not fit the sub-buffer's end is not split; pad the
           tail with zeros and reserve again at the start of the next sub-buffer */
        if (bytes_reserved > 0 && bytes_reserved <= hlen) {
                memset(_stp_data_entry_data(entry), 0, bytes_reserved);
                bytes_reserved = _stp_data_write_reserve(hlen+len, &entry);
        }"""


def _relay_header_split_applies(release: str, runtime: Path) -> bool:
    # systemtap before 5.1 drops a record whose 8-byte header lands across a relay
    # sub-buffer's end, and leaves stale bytes that desync every reader (fixed upstream
    # in 5.1); seen here as lost lines and "transport failures" under bursts of output.
    source = runtime / "print_flush.c"
    if not source.is_file():
        return False
    text = source.read_text()
    return FIRST_RESERVE.search(text) is not None and "bytes_reserved <= hlen" not in text


def _relay_header_split_apply(runtime: Path) -> None:
    source = runtime / "print_flush.c"
    text = source.read_text()
    source.write_text(FIRST_RESERVE.sub(lambda m: m.group(1) + HEADER_RETRY, text, count=1))


RUNTIME_FIXES = (
    RuntimeFix("task_work_cancel_func", _task_work_cancel_func_applies,
               _task_work_cancel_func_apply),
    RuntimeFix("relay_header_split", _relay_header_split_applies, _relay_header_split_apply),
)


@dataclass(frozen=True)
class Toolchain:
    """The local stap: its version, and where its pristine runtime lives."""

    stap: str
    version: str
    runtime: Path

    @classmethod
    def find(cls) -> Toolchain:
        stap = shutil.which("stap")
        if stap is None:
            raise CompileError("stap not found: install systemtap (apt-get install systemtap)")
        try:
            proc = subprocess.run(
                [stap, "-V"], capture_output=True, text=True, timeout=30, check=False
            )
            first = (proc.stderr + proc.stdout).splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired) as exc:
            raise CompileError(f"cannot run {stap} -V: {exc}") from exc
        match = re.search(r"version ([^\s,]+)", first)
        version = match.group(1) if match else first
        runtime = Path(stap).resolve().parent.parent / "share" / "systemtap" / "runtime"
        return cls(stap=stap, version=version, runtime=runtime)


class Builder:
    """Turns ModuleSpecs into cached ModuleArtifacts."""

    def __init__(self, root: Path | None = None, toolchain: Toolchain | None = None) -> None:
        self.root = root or cache_dir()
        self.toolchain = toolchain or Toolchain.find()
        self._fixes: dict[str, tuple[RuntimeFix, ...]] = {}

    # -- specs -------------------------------------------------------------------------
    def fixes_for(self, release: str) -> tuple[RuntimeFix, ...]:
        """The fixes a release needs, decided once per release: planning asks for every
        host, and each decision reads header and runtime files."""
        if release not in self._fixes:
            self._fixes[release] = tuple(
                fix for fix in RUNTIME_FIXES if fix.applies(release, self.toolchain.runtime))
        return self._fixes[release]

    def spec(self, script: str, release: str, arch: str, options: tuple[str, ...],
             symbol_map: str = "", origin: str = "", first_line: int = 1) -> ModuleSpec:
        """The spec for ``script``; ``symbol_map`` only matters to scripts that need it.

        ``origin`` and ``first_line`` say where the script starts in the user's file, so
        that errors the module reports at run time name that file and line.
        """
        fixes = ",".join(fix.name for fix in self.fixes_for(release))
        source = f"{Path(origin).name}:{first_line}" if origin else ""
        return ModuleSpec(script=script, release=release, arch=arch, options=options,
                          stap_version=self.toolchain.version, runtime_fix=fixes,
                          symbol_map=symbol_map if needs_symbol_map(script) else "",
                          source=source)

    # -- symbols -----------------------------------------------------------------------
    def store_symbol_map(self, kallsyms: bytes) -> str:
        """Keep a System.map made from a host's /proc/kallsyms; returns its sha256.

        Debian ships no kernel debuginfo, so `kprobe.function("x")` finds nothing in the
        headers; stap resolves it from the System.map of the build tree it is given.
        """
        lines = [line for line in kallsyms.decode(errors="replace").splitlines()
                 if line and not line.endswith("]")]  # module symbols end in [module]
        if not lines or all(line.startswith("0000000000000000 ") for line in lines):
            raise CompileError(
                "the host's /proc/kallsyms shows no addresses (kernel.kptr_restrict hides "
                "them from this user): log in as root, or use become: true")
        data = ("\n".join(lines) + "\n").encode()
        digest = hashlib.sha256(data).hexdigest()
        target = self.root / "symbols" / f"{digest}.map"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(f".{os.getpid()}.part")
            partial.write_bytes(data)
            os.replace(partial, target)
        return digest

    def _build_tree(self, spec: ModuleSpec) -> str:
        """What to pass to `stap -r`: the release, or a symlinked copy of its headers tree
        holding the host's System.map."""
        if not spec.symbol_map:
            return spec.release
        tree = self.root / "trees" / f"{spec.release}-{spec.symbol_map[:16]}"
        if (tree / ".complete").exists():
            return str(tree)
        with self._locked(f"tree-{tree.name}"):
            if not (tree / ".complete").exists():
                shutil.rmtree(tree, ignore_errors=True)
                tree.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run(["cp", "-as", f"{headers_dir(spec.release).resolve()}/.",
                                str(tree)], check=True)
                shutil.copyfile(self.root / "symbols" / f"{spec.symbol_map}.map",
                                tree / "System.map")
                (tree / ".complete").touch()
        return str(tree)

    # -- cache -------------------------------------------------------------------------
    def _entry(self, key: str) -> Path:
        return self.root / "modules" / key

    def cached(self, spec: ModuleSpec) -> ModuleArtifact | None:
        meta_path = self._entry(spec.key) / "meta.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        ko = self._entry(spec.key) / "module.ko"
        return ModuleArtifact(key=spec.key, path=ko, sha256=meta["sha256"],
                              module_name=meta["module_name"]) if ko.is_file() else None

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # -- compile -----------------------------------------------------------------------
    def _runtime(self, spec: ModuleSpec) -> Path | None:
        """A patched runtime copy for this release, made once and kept beside the cache."""
        fixes = self.fixes_for(spec.release)
        if not fixes:
            return None
        name = re.sub(r"[^A-Za-z0-9.+_-]", "_", f"{self.toolchain.version}-{spec.runtime_fix}")
        target = self.root / "runtime" / name
        if (target / ".complete").exists():
            return target
        with self._locked(f"runtime-{name}"):
            if not (target / ".complete").exists():
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(self.toolchain.runtime, target)
                for fix in fixes:
                    fix.apply(target)
                (target / ".complete").touch()
        return target

    def build(self, spec: ModuleSpec, origin: str, first_line: int) -> ModuleArtifact:
        """Return the cached module for ``spec``, compiling it first if needed.

        ``origin`` and ``first_line`` say where the script came from, so stap's errors
        point into the user's file rather than into a temporary copy.
        """
        found = self.cached(spec)
        if found:
            return found
        if spec.arch != platform.machine():
            raise CompileError(
                f"cannot build for {spec.arch} on this {platform.machine()} machine: "
                "run stapctl on a machine of the target's architecture"
            )
        if not headers_dir(spec.release).exists():
            raise CompileError(
                f"no kernel headers for {spec.release} on this machine: "
                f"install them (apt-get install linux-headers-{spec.release})"
            )
        with self._locked(spec.key):
            found = self.cached(spec)
            if found:
                return found
            return self._compile(spec, origin, first_line)

    def _compile(self, spec: ModuleSpec, origin: str, first_line: int) -> ModuleArtifact:
        module_name = f"stapctl_{spec.key[:16]}"
        entries = self.root / "modules"
        entries.mkdir(parents=True, exist_ok=True)
        stap_dir = self.root / "stap"
        stap_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=entries, prefix=".build-",
                                         ignore_cleanup_errors=True) as tmp:
            work = Path(tmp)
            # named and padded like the user's file, so the line numbers stap puts in
            # compile errors and into the module itself are the user's own
            name, _, line = spec.source.rpartition(":")
            script = work / _script_name(name)
            script.write_text("\n" * (int(line or 1) - 1) + spec.script)
            argv = [self.toolchain.stap, "-p4", "-r", self._build_tree(spec), "-m", module_name]
            runtime = self._runtime(spec)
            if runtime is not None:
                argv += ["-R", str(runtime)]
            argv += [*spec.options, script.name]
            env = dict(os.environ, SYSTEMTAP_DIR=str(stap_dir))
            proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True,
                                  check=False)
            ko = work / f"{module_name}.ko"
            if proc.returncode != 0 or not ko.is_file():
                raise CompileError(
                    f"{origin}:{first_line}: stap could not build this probe for "
                    f"{spec.release}",
                    _user_facing_stderr(proc.stderr, script.name, origin,
                                        1 if spec.source else first_line),
                )
            data = ko.read_bytes()
            (work / "meta.json").write_text(json.dumps({
                "sha256": hashlib.sha256(data).hexdigest(),
                "module_name": module_name,
                "release": spec.release,
                "arch": spec.arch,
                "options": list(spec.options),
                "stap_version": spec.stap_version,
                "runtime_fix": spec.runtime_fix,
            }))
            ko.rename(work / "module.ko")
            (work / "script.stp").write_text(spec.script)
            script.unlink()
            final = self._entry(spec.key)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(work, final)
        artifact = self.cached(spec)
        assert artifact is not None
        return artifact


def _script_name(name: str) -> str:
    """A safe file name for stap that keeps the user's file name recognisable."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return safe or "probe.stp"


KPROBE_FUNCTION = re.compile(r"\bkprobe\s*\.\s*function\s*\(")


def needs_symbol_map(script: str) -> bool:
    """Whether a script probes kernel functions by name (see store_symbol_map)."""
    return KPROBE_FUNCTION.search(script) is not None


def check_syntax(script: str, origin: str, first_line: int) -> None:
    """Run stap's parser (pass 1) on a rendered script; no kernel or headers involved."""
    stap = shutil.which("stap")
    # stap insists on some kernel's build tree even to parse; any installed one will do
    releases = sorted(p.parent.name for p in Path("/lib/modules").glob("*/build"))
    if stap is None or not releases:
        return
    with tempfile.TemporaryDirectory(prefix="stapctl-parse-") as tmp:
        path = Path(tmp) / "probe.stp"
        path.write_text(script)
        proc = subprocess.run([stap, "-p1", "-r", releases[-1], str(path)],
                              capture_output=True, text=True, check=False, cwd=tmp)
        if proc.returncode != 0:
            raise CompileError(f"{origin}:{first_line}: stap cannot parse this probe",
                               _user_facing_stderr(proc.stderr, str(path), origin, first_line))


def _user_facing_stderr(stderr: str, shown: str, origin: str, first_line: int) -> str:
    """stap's message tail, with positions in our copy (named ``shown`` in stap's output)
    mapped to the user's file."""

    def relocate(match: re.Match[str]) -> str:
        line = int(match.group(1)) + first_line - 1
        return f"{origin}:{line}" + (match.group(2) or "")

    own_name = r"(?<![\w/.-])" + re.escape(shown)
    text = re.sub(own_name + r":(\d+)(:\d+)?", relocate, stderr)
    text = re.sub(own_name, lambda match: origin, text)
    lines = [line for line in text.splitlines()
             if line.strip() and not line.startswith(NOISE)]
    return "\n".join(lines[-STDERR_TAIL_LINES:])


def list_cached(root: Path | None = None) -> list[dict[str, object]]:
    """Every cached module with its metadata, newest first."""
    entries = (root or cache_dir()) / "modules"
    rows: list[dict[str, object]] = []
    for meta_path in entries.glob("*/meta.json"):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        ko = meta_path.parent / "module.ko"
        stat = ko.stat() if ko.exists() else meta_path.stat()
        rows.append({"key": meta_path.parent.name, "size": stat.st_size,
                     "mtime": stat.st_mtime, **meta})
    rows.sort(key=lambda row: float(str(row["mtime"])), reverse=True)
    return rows


def prune(root: Path | None = None, keep: int = 0) -> int:
    """Delete all but the ``keep`` newest cached modules; returns how many were removed."""
    base = root or cache_dir()
    removed = 0
    for row in list_cached(base)[keep:]:
        shutil.rmtree(base / "modules" / str(row["key"]), ignore_errors=True)
        removed += 1
    return removed
