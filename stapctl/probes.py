"""Probe discovery (`stapctl probes PATTERN`): stap's ``-l``/``-L`` asked once per
distinct kernel among the hosts, the answers merged into one list saying on which
kernels each probe point exists.

Without debuginfo stap still knows tracepoints and syscalls from the headers, and
``kprobe.function`` from a System.map, which the hosts' /proc/kallsyms gives (as for a
build). stap takes seconds to answer, so each answer is kept in the cache, keyed by
everything it depends on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from stapctl.build import Builder, compiles_at_once
from stapctl.cache import replace_file
from stapctl.compiler import check_syntax, needs_symbol_map
from stapctl.errors import CompileError, UsageError
from stapctl.models import Host, HostFacts

PATTERN_LIMIT = 1000


@dataclass(frozen=True)
class ProbePoint:
    """One probe point (with its variables under --vars) and the kernels that have it."""

    name: str
    kernels: tuple[str, ...]


@dataclass(frozen=True)
class ProbeListing:
    """What `stapctl probes` prints: probe points, the kernels asked (with their hosts),
    and the hosts that could not be asked, with why."""

    pattern: str
    points: tuple[ProbePoint, ...]
    kernels: Mapping[str, tuple[str, ...]]
    skipped: Mapping[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        return {"pattern": self.pattern,
                "probes": [{"probe": p.name, "kernels": list(p.kernels)} for p in self.points],
                "kernels": {release: list(hosts) for release, hosts in self.kernels.items()},
                "skipped": dict(self.skipped)}


def check_pattern(pattern: str) -> str:
    """A probe point pattern fit to be put after `probe` in a script, or a UsageError
    with stap's first complaint."""
    if not pattern.strip():
        raise UsageError("the probe pattern is empty: give one, e.g. 'syscall.open*'")
    if len(pattern) > PATTERN_LIMIT or any(c in pattern for c in "{}\n\r"):
        raise UsageError(f"not a probe point pattern: {pattern[:60]!r} (give one probe "
                         "point such as 'kernel.trace(\"sched:*\")', without braces)")
    try:  # stap's parser alone, so a typo is told before any host is contacted
        check_syntax(f"probe {pattern} {{}}", "pattern", 1)
    except CompileError as error:
        raise UsageError(f"stap cannot parse the probe pattern {pattern!r}: "
                         f"{error.stderr.splitlines()[0] if error.stderr else error}") from None
    return pattern.strip()


def list_probes(pattern: str, hosts: Mapping[str, tuple[Host, HostFacts]],
                builder: Builder, with_vars: bool) -> ProbeListing:
    """Ask stap once per distinct (release, symbol map) among ``hosts``, in parallel up
    to the machine's cores. Hosts are skipped, with why, when a kprobe.function pattern
    needs their symbols and they could not be read, or when their kernel cannot be asked
    (no headers here); a pattern stap rejects raises UsageError."""
    symbols = needs_symbol_map(f"probe {pattern} {{}}")
    groups: dict[tuple[str, str], list[str]] = {}
    skipped: dict[str, str] = {}
    for name, (_, facts) in hosts.items():
        if symbols and not facts.symbol_map:
            reason = facts.symbol_map_error or "its symbols were not gathered"
            skipped[name] = f"kprobe.function needs the host's kernel symbols: {reason}"
            continue
        groups.setdefault((facts.release, facts.symbol_map if symbols else ""), []).append(name)

    def listing(group: tuple[str, str]) -> list[str] | CompileError:
        try:
            return _listing(builder, pattern, *group, with_vars)
        except CompileError as error:  # this kernel only, e.g. its headers are missing
            return error

    found: dict[str, set[str]] = {}
    kernels: dict[str, list[str]] = {}
    with ThreadPoolExecutor(max_workers=compiles_at_once()) as pool:
        answers = dict(zip(groups, pool.map(listing, groups), strict=True))
    for group, names in sorted(groups.items()):
        answer = answers[group]
        if isinstance(answer, CompileError):
            skipped.update((name, str(answer)) for name in names)
            continue
        release = group[0]
        kernels.setdefault(release, []).extend(names)
        for point in answer:
            found.setdefault(point, set()).add(release)
    points = tuple(ProbePoint(name, tuple(sorted(releases)))
                   for name, releases in sorted(found.items()))
    return ProbeListing(pattern=pattern, points=points,
                        kernels={release: tuple(names) for release, names in kernels.items()},
                        skipped=skipped)


def _listing(builder: Builder, pattern: str, release: str, symbol_map: str,
             with_vars: bool) -> list[str]:
    """stap's answer from the cache, else from stap (and then kept)."""
    toolchain = builder.toolchain_for(release)
    key = hashlib.sha256(json.dumps(
        [toolchain.stap_version, release, pattern, symbol_map, with_vars]
        + ([] if toolchain.is_host else [toolchain.name])).encode()
    ).hexdigest()
    path = builder.cache.directory("listings") / f"{key}.json"
    try:
        cached = json.loads(path.read_text())
        if isinstance(cached, list) and all(isinstance(line, str) for line in cached):
            return cached
    except (OSError, ValueError):
        pass
    lines = builder.compiler(toolchain).list_probes(pattern, release, symbol_map, with_vars)
    replace_file(path, json.dumps(lines).encode())
    return lines
