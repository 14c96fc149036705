"""The build stage: ModuleSpecs in, cached ModuleArtifacts out, one compile per key.

The cache (stapctl.cache) answers first; the compiler (stapctl.compiler) runs stap only
for what it does not hold, under the key's lock so that two applies sharing the cache
compile each module once. The toolchain (stapctl.toolchains) and the runtime fixes
(stapctl.runtime_fixes) are decided here, per release, as they are part of the spec.
"""

from __future__ import annotations

import os
from pathlib import Path

from stapctl.cache import ModuleCache, cache_dir
from stapctl.compiler import Compiler, needs_symbol_map
from stapctl.errors import StapctlError
from stapctl.models import ModuleArtifact, ModuleSpec
from stapctl.runtime_fixes import RuntimeFix, fixes_needed
from stapctl.toolchains import Progress, Toolchain, Toolchains


def compiles_at_once() -> int:
    """How many stap runs the controller has going at once: one per core, as each keeps
    a core busy (builds, and the listings of `stapctl probes`)."""
    return max(1, os.cpu_count() or 1)


class Builder:
    """Turns ModuleSpecs into cached ModuleArtifacts.

    ``toolchain`` pins one toolchain for every release; by default each release gets the
    one stapctl.toolchains chooses for it.
    """

    def __init__(self, root: Path | None = None, toolchain: Toolchain | None = None,
                 progress: Progress = lambda text: None) -> None:
        self.cache = ModuleCache(root or cache_dir())
        self.toolchains = Toolchains(self.cache, progress)
        self.pinned = toolchain
        self._chosen: dict[str, Toolchain | StapctlError] = {}
        self._fixes: dict[str, tuple[RuntimeFix, ...]] = {}
        self._compilers: dict[str, Compiler] = {}

    def toolchain_for(self, release: str) -> Toolchain:
        """The toolchain that builds for ``release``, chosen once per release (a refusal
        too: planning asks for every host)."""
        if release not in self._chosen:
            try:
                self._chosen[release] = self.pinned or self.toolchains.for_release(release)
            except StapctlError as exc:
                self._chosen[release] = exc
        chosen = self._chosen[release]
        if isinstance(chosen, StapctlError):
            raise chosen
        return chosen

    def compiler(self, toolchain: Toolchain) -> Compiler:
        if toolchain.name not in self._compilers:
            self._compilers[toolchain.name] = Compiler(self.cache, toolchain)
        return self._compilers[toolchain.name]

    def fixes_for(self, release: str) -> tuple[RuntimeFix, ...]:
        """The fixes a release needs with its toolchain, decided once per release: each
        decision reads header and runtime files."""
        if release not in self._fixes:
            self._fixes[release] = fixes_needed(self.toolchain_for(release), release)
        return self._fixes[release]

    def spec(self, script: str, release: str, arch: str, options: tuple[str, ...],
             symbol_map: str = "", origin: str = "", first_line: int = 1,
             args: tuple[str, ...] = ()) -> ModuleSpec:
        """The spec for ``script``; ``symbol_map`` only matters to scripts that need it.

        ``origin`` and ``first_line`` say where the script starts in the user's file, so
        that errors stap and the module report name that file and line; ``args`` are the
        script's arguments ($1, @1), which stap compiles in. Raises CompileError when no
        toolchain can build for ``release``.
        """
        toolchain = self.toolchain_for(release)
        fixes = ",".join(fix.name for fix in self.fixes_for(release))
        return ModuleSpec(script=script, release=release, arch=arch, options=options,
                          stap_version=toolchain.stap_version, runtime_fix=fixes,
                          symbol_map=symbol_map if needs_symbol_map(script) else "",
                          origin=origin, first_line=first_line, args=args,
                          toolchain="" if toolchain.is_host else toolchain.name)

    def store_symbol_map(self, kallsyms: bytes) -> str:
        """Keep a System.map made from a host's /proc/kallsyms; returns its sha256."""
        return Compiler.store_symbol_map(self.cache, kallsyms)

    def cached(self, spec: ModuleSpec) -> ModuleArtifact | None:
        """The module for ``spec`` if the cache holds an intact one."""
        return self.cache.lookup(spec)

    def build(self, spec: ModuleSpec) -> ModuleArtifact:
        """Return the cached module for ``spec``, compiling it first if needed."""
        found = self.cache.lookup(spec)
        if found:
            return found
        compiler = self.compiler(self.toolchain_for(spec.release))
        with self.cache.locked(spec.key):
            found = self.cache.lookup(spec)
            if found:
                return found
            return self.cache.store(spec, compiler.compile(spec))
