"""The build stage: ModuleSpecs in, cached ModuleArtifacts out, one compile per key.

The cache (stapctl.cache) answers first; the compiler (stapctl.compiler) runs stap only
for what it does not hold, under the key's lock so that two applies sharing the cache
compile each module once. Runtime fixes (stapctl.runtime_fixes) are decided here, per
release, as they are part of the spec.
"""

from __future__ import annotations

from pathlib import Path

from stapctl.cache import ModuleCache, cache_dir
from stapctl.compiler import Compiler, Toolchain, needs_symbol_map
from stapctl.models import ModuleArtifact, ModuleSpec
from stapctl.runtime_fixes import RuntimeFix, fixes_needed


class Builder:
    """Turns ModuleSpecs into cached ModuleArtifacts."""

    def __init__(self, root: Path | None = None, toolchain: Toolchain | None = None) -> None:
        self.toolchain = toolchain or Toolchain.find()
        self.cache = ModuleCache(root or cache_dir())
        self.compiler = Compiler(self.cache, self.toolchain)
        self._fixes: dict[str, tuple[RuntimeFix, ...]] = {}

    def fixes_for(self, release: str) -> tuple[RuntimeFix, ...]:
        """The fixes a release needs, decided once per release: planning asks for every
        host, and each decision reads header and runtime files."""
        if release not in self._fixes:
            self._fixes[release] = fixes_needed(release, self.toolchain.runtime)
        return self._fixes[release]

    def spec(self, script: str, release: str, arch: str, options: tuple[str, ...],
             symbol_map: str = "", origin: str = "", first_line: int = 1,
             args: tuple[str, ...] = ()) -> ModuleSpec:
        """The spec for ``script``; ``symbol_map`` only matters to scripts that need it.

        ``origin`` and ``first_line`` say where the script starts in the user's file, so
        that errors stap and the module report name that file and line; ``args`` are the
        script's arguments ($1, @1), which stap compiles in.
        """
        fixes = ",".join(fix.name for fix in self.fixes_for(release))
        return ModuleSpec(script=script, release=release, arch=arch, options=options,
                          stap_version=self.toolchain.version, runtime_fix=fixes,
                          symbol_map=symbol_map if needs_symbol_map(script) else "",
                          origin=origin, first_line=first_line, args=args)

    def store_symbol_map(self, kallsyms: bytes) -> str:
        """Keep a System.map made from a host's /proc/kallsyms; returns its sha256."""
        return self.compiler.store_symbol_map(kallsyms)

    def cached(self, spec: ModuleSpec) -> ModuleArtifact | None:
        """The module for ``spec`` if the cache holds an intact one."""
        return self.cache.lookup(spec)

    def build(self, spec: ModuleSpec) -> ModuleArtifact:
        """Return the cached module for ``spec``, compiling it first if needed."""
        found = self.cache.lookup(spec)
        if found:
            return found
        with self.cache.locked(spec.key):
            found = self.cache.lookup(spec)
            if found:
                return found
            return self.cache.store(spec, self.compiler.compile(spec))
