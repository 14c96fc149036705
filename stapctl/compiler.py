"""Run stap: one module's bytes from one ModuleSpec, with errors in the user's terms.

stap runs in its toolchain (the host, or a build root) and builds against the release's
headers tree there (or a symlinked copy of it holding the host's System.map, for
kprobe.function; a build root's stap also finds that map in a /boot of its own) and, when
the release needs runtime fixes, a patched copy of the runtime. Those copies live where
the toolchain's stap can read them (the cache for the host's, the root for the others),
and stap keeps its own cache (``SYSTEMTAP_DIR``) there too, so kernel feature probing
(15 s and more) is paid once per toolchain, not once per module.
"""

from __future__ import annotations

import hashlib
import platform
import re
import shutil
import subprocess
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path

from stapctl.cache import ModuleCache, replace_file
from stapctl.errors import CompileError, UsageError
from stapctl.models import ModuleSpec
from stapctl.runtime_fixes import fixes_named
from stapctl.toolchains import MODULES_ROOT, Toolchain

STDERR_TAIL_LINES = 30
# stap lines that say nothing about the user's script: distro boilerplate, and pass 1's
# complaint about a System.map it does not need
NOISE = ("Tip: ", "WARNING: Kernel function symbol table missing")
KPROBE_FUNCTION = re.compile(r"\bkprobe\s*\.\s*function\s*\(")


class Compiler:
    """Compiles ModuleSpecs with one toolchain's stap, keeping its helper files where that
    stap can read them."""

    def __init__(self, cache: ModuleCache, toolchain: Toolchain) -> None:
        self.cache = cache
        self.toolchain = toolchain

    def compile(self, spec: ModuleSpec) -> bytes:
        """The module's bytes; stap's errors are raised as CompileError, pointing into
        ``spec.origin``."""
        headers = self.toolchain.headers(spec.release)  # refuses a release unfit for a path
        if spec.arch != platform.machine():
            raise CompileError(
                f"cannot build for {spec.arch} on this {platform.machine()} machine: "
                "run stapctl on a machine of the target's architecture"
            )
        if not headers.exists():
            raise CompileError(
                f"no kernel headers for {spec.release} on this machine: "
                f"install them (apt-get install linux-headers-{spec.release})"
            )
        argv = [self.toolchain.stap, "-p4", "-r", self.build_tree(spec.release, spec.symbol_map),
                "-m", spec.module_name]
        runtime = self._runtime(spec)
        if runtime is not None:
            seen = self.toolchain.inside(runtime)
            argv += ["-R", seen]
            for fix in fixes_named(spec.runtime_fix):
                argv += [option.format(runtime=seen) for option in fix.stap_options]
        with tempfile.TemporaryDirectory(dir=self._scratch("work"),
                                         ignore_cleanup_errors=True) as tmp:
            # named and padded like the user's file, so the line numbers stap puts in
            # compile errors and into the module itself are the user's own
            script = Path(tmp) / _script_name(Path(spec.origin).name)
            script.write_text("\n" * (spec.first_line - 1) + spec.script)
            # `--`: an argument such as '-5' is the script's, never an option of stap's
            proc = self._stap([*argv, *spec.options, "--", script.name, *spec.args],
                              Path(tmp), self._boot(spec.release, spec.symbol_map))
            module = Path(tmp) / f"{spec.module_name}.ko"
            origin = spec.origin or script.name
            if proc.returncode != 0 or not module.is_file():
                raise CompileError(
                    f"{origin}:{spec.first_line}: stap could not build this probe for "
                    f"{spec.release}",
                    _user_facing_stderr(proc.stderr, script.name, origin, 1),
                )
            return module.read_bytes()

    @staticmethod
    def store_symbol_map(cache: ModuleCache, kallsyms: bytes) -> str:
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
        target = cache.directory("symbols") / f"{digest}.map"
        if not target.exists():
            replace_file(target, data)
        return digest

    def list_probes(self, pattern: str, release: str, symbol_map: str,
                    with_vars: bool) -> list[str]:
        """stap's ``-l`` (``-L`` with ``with_vars``) answer for ``pattern`` on a release:
        one probe point a line; none when nothing matches. A pattern stap rejects is the
        user's error: one line with stap's first complaint."""
        if not self.toolchain.headers(release).exists():
            raise CompileError(
                f"no kernel headers for {release} on this machine: "
                f"install them (apt-get install linux-headers-{release})")
        argv = [self.toolchain.stap, "-L" if with_vars else "-l", pattern,
                "-r", self.build_tree(release, symbol_map)]
        with tempfile.TemporaryDirectory(dir=self._scratch("work"),
                                         ignore_cleanup_errors=True) as tmp:
            proc = self._stap(argv, Path(tmp), self._boot(release, symbol_map))
        complaint = _user_facing_stderr(proc.stderr, "<input>", "pattern", 1)
        if proc.returncode != 0 and complaint:
            raise UsageError(f"stap cannot list the probe pattern {pattern!r}: "
                             f"{complaint.splitlines()[0]}")
        return [line for line in proc.stdout.splitlines() if line.strip()]

    def build_tree(self, release: str, symbol_map: str) -> str:
        """What to pass to `stap -r`: the release, or a symlinked copy of its headers tree
        holding the host's System.map (``symbol_map``, its sha256)."""
        if not symbol_map:
            return release
        tree = self._scratch("trees") / f"{release}-{symbol_map[:16]}"
        if not (tree / ".complete").exists():
            with self._locked(f"tree-{tree.name}"):
                if not (tree / ".complete").exists():
                    shutil.rmtree(tree, ignore_errors=True)
                    headers = self.toolchain.inside(self.toolchain.headers(release).resolve()
                                                    if self.toolchain.is_host
                                                    else self.toolchain.headers(release))
                    # made by the toolchain, so its links point into the toolchain's tree
                    subprocess.run(self.toolchain.command(
                        ["cp", "-as", f"{headers}/.", self.toolchain.inside(tree)]),
                        check=True, capture_output=True)
                    shutil.copyfile(self.cache.directory("symbols") / f"{symbol_map}.map",
                                    tree / "System.map")
                    (tree / ".complete").touch()
        return self.toolchain.inside(tree)

    def _boot(self, release: str, symbol_map: str) -> Path | None:
        """For a build root's stap, a /boot holding the host's System.map (``symbol_map``,
        its sha256) as System.map-RELEASE: systemtap 5 reads kernel symbols only there
        (or in /usr/lib/debug/boot), never from the build tree."""
        if not symbol_map or self.toolchain.is_host:
            return None
        boot = self._scratch("boot") / f"{release}-{symbol_map[:16]}"
        target = boot / f"System.map-{release}"
        if not target.exists():
            boot.mkdir(exist_ok=True)
            replace_file(target, (self.cache.directory("symbols") / f"{symbol_map}.map")
                         .read_bytes())
        return boot

    def _runtime(self, spec: ModuleSpec) -> Path | None:
        """A patched runtime copy for the spec's fixes, made once and kept in the cache."""
        fixes = fixes_named(spec.runtime_fix)
        if not fixes:
            return None
        name = re.sub(r"[^A-Za-z0-9.+_-]", "_",
                      f"{self.toolchain.stap_version}-{spec.runtime_fix}")
        target = self._scratch("runtime") / name
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


    def _scratch(self, name: str) -> Path:
        return self.toolchain.scratch(self.cache, name)

    def _locked(self, name: str) -> AbstractContextManager[None]:
        """A lock of this toolchain's files (two toolchains may have a tree of one name)."""
        return self.cache.locked(name if self.toolchain.is_host
                                 else f"{self.toolchain.name}-{name}")

    def _stap(self, argv: list[str], cwd: Path,
              boot: Path | None) -> subprocess.CompletedProcess[str]:
        """Run the toolchain's stap in ``cwd`` with its own stap cache (and /boot)."""
        env = {"SYSTEMTAP_DIR": self.toolchain.inside(self._scratch("stap"))}
        return subprocess.run(self.toolchain.command(argv, cwd, env, boot),
                              capture_output=True, text=True, check=False)


def _script_name(name: str) -> str:
    """A safe file name for stap that keeps the user's file name recognisable."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".-")
    return safe or "probe.stp"


def needs_symbol_map(script: str) -> bool:
    """Whether a script probes kernel functions by name (see store_symbol_map)."""
    return KPROBE_FUNCTION.search(script) is not None


def check_syntax(script: str, origin: str, first_line: int, args: tuple[str, ...] = ()) -> None:
    """Run stap's parser (pass 1) on a rendered script; no kernel or headers involved."""
    stap = shutil.which("stap")
    # stap insists on some kernel's build tree even to parse; any installed one will do
    releases = sorted(p.parent.name for p in MODULES_ROOT.glob("*/build"))
    if stap is None or not releases:
        return
    with tempfile.TemporaryDirectory(prefix="stapctl-parse-") as tmp:
        path = Path(tmp) / "probe.stp"
        path.write_text(script)
        proc = subprocess.run([stap, "-p1", "-r", releases[-1], "--", str(path), *args],
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
