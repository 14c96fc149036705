"""Render every probe for every host and group the results into modules to build.

Hosts whose rendered script, kernel release, arch and stap options agree share one
ModuleSpec, hence one compile; a fleet of 1000 hosts on 3 kernels costs 3 compiles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from stapctl.build import Builder, compiles_at_once
from stapctl.compiler import check_syntax, needs_symbol_map
from stapctl.errors import StapctlError
from stapctl.inventory import host_vars
from stapctl.models import Host, HostFacts, Manifest, ModuleArtifact, ModuleSpec, Probe
from stapctl.render import render_script


@dataclass(frozen=True)
class ModuleJob:
    """One module to build, and the hosts that will run it."""

    probe: Probe
    spec: ModuleSpec
    hosts: tuple[str, ...]
    artifact: ModuleArtifact | None = None
    error: str = ""

    @property
    def cached(self) -> bool:
        return self.artifact is not None and not self.error


@dataclass(frozen=True)
class Plan:
    jobs: tuple[ModuleJob, ...]

    @property
    def unservable(self) -> dict[str, str]:
        """Hosts for which a module could not be made, with stap's reason."""
        return {host: job.error for job in self.jobs if job.error for host in job.hosts}

    def jobs_for(self, host: str) -> tuple[ModuleJob, ...]:
        return tuple(job for job in self.jobs if host in job.hosts)


def template_vars(manifest: Manifest, host: Host, facts: HostFacts,
                  extra_vars: Mapping[str, Any]) -> dict[str, Any]:
    """Variables a probe template sees: inventory.host_vars' precedence, plus the facts."""
    return {
        **host_vars(host, manifest.vars, extra_vars),
        "kernel_release": facts.release,
        "arch": facts.arch,
    }


KALLSYMS_LIMIT = 64 << 20


def gather_symbol_maps(manifest: Manifest, hosts: Mapping[str, tuple[Host, HostFacts]],
                       read_file: Callable[[str, str, int], bytes],
                       builder: Builder) -> dict[str, tuple[Host, HostFacts]]:
    """Fetch each host's /proc/kallsyms, only when some probe may need it.

    ``read_file(host, path, limit)`` reads a host's file. A host whose symbols cannot be
    read keeps an empty symbol_map; make_plan then says
    exactly why its kprobe.function probes cannot be built.
    """
    if not any(needs_symbol_map(probe.template) for probe in manifest.probes):
        return dict(hosts)

    def fetch(name: str) -> tuple[str, tuple[Host, HostFacts]]:
        host, facts = hosts[name]
        try:
            kallsyms = read_file(name, "/proc/kallsyms", KALLSYMS_LIMIT)
            facts = replace(facts, symbol_map=builder.store_symbol_map(kallsyms))
        except StapctlError as exc:
            facts = replace(facts, symbol_map_error=str(exc))
        return name, (host, facts)

    with ThreadPoolExecutor(max_workers=max(1, manifest.strategy.forks)) as pool:
        return dict(pool.map(fetch, hosts))


def make_plan(manifest: Manifest, hosts: Mapping[str, tuple[Host, HostFacts]],
              builder: Builder, extra_vars: Mapping[str, Any], look_up: bool = True) -> Plan:
    """Group (probe, host) pairs by ModuleSpec; note which are already in the cache
    (unless not ``look_up``: a caller planning host by host looks each module up once).

    Hosts that cannot be served are grouped by their reason too, so each is told its own.
    Template errors are user errors: render_script raises ManifestError for the run.
    """
    # keyed by (probe name, spec key, why its hosts cannot be served or "")
    groups: dict[tuple[str, str, str], list[str]] = {}
    specs: dict[tuple[str, str, str], tuple[Probe, ModuleSpec]] = {}
    for probe in manifest.probes:
        for name, (host, facts) in hosts.items():
            script = render_script(probe, template_vars(manifest, host, facts, extra_vars))
            error = ""
            try:
                spec = builder.spec(script, facts.release, facts.arch, probe.stap_options,
                                    facts.symbol_map, probe.origin, probe.first_line,
                                    probe.args)
            except StapctlError as exc:  # no toolchain can serve this kernel
                spec = ModuleSpec(script=script, release=facts.release, arch=facts.arch,
                                  options=probe.stap_options, origin=probe.origin,
                                  first_line=probe.first_line, args=probe.args)
                error = str(exc)
            if not error and needs_symbol_map(script) and not facts.symbol_map:
                reason = facts.symbol_map_error or "its symbols were not gathered"
                error = f"kprobe.function needs the host's kernel symbols: {reason}"
            key = (probe.name, spec.key, error)
            specs[key] = (probe, spec)
            groups.setdefault(key, []).append(name)
    jobs = tuple(
        ModuleJob(probe=probe, spec=spec, hosts=tuple(groups[key]),
                  artifact=builder.cached(spec) if look_up and not key[2] else None,
                  error=key[2])
        for key, (probe, spec) in specs.items()
    )
    return Plan(jobs=jobs)


def check_scripts(manifest: Manifest, hosts: Sequence[Host],
                  extra_vars: Mapping[str, Any]) -> int:
    """Render every probe for every host and run stap's parser on each distinct script.

    No host is contacted, so facts are blank; returns how many scripts were parsed.
    """
    blank = HostFacts(release="", arch="")
    targets = list(hosts) or [Host(name="validate", address="validate")]
    seen: set[tuple[str, str]] = set()
    for probe in manifest.probes:
        for host in targets:
            script = render_script(probe, template_vars(manifest, host, blank, extra_vars))
            if (probe.name, script) not in seen:
                seen.add((probe.name, script))
                check_syntax(script, probe.origin, probe.first_line, probe.args)
    return len(seen)


Progress = Callable[[ModuleJob, str], None]


def build_job(job: ModuleJob, builder: Builder, on_progress: Progress) -> ModuleJob:
    """The job with its module compiled, unless cached; a failed compile is attached to
    the job (and so to its hosts) with stap's message."""
    if job.cached or job.error:
        return job
    on_progress(job, "building")
    try:
        artifact = builder.build(job.spec)
    except StapctlError as exc:
        on_progress(job, "failed")
        return replace(job, error=str(exc))
    on_progress(job, "built")
    return replace(job, artifact=artifact)


def build_plan(plan: Plan, builder: Builder,
               on_progress: Progress = lambda job, state: None) -> Plan:
    """Compile every module not yet cached, in parallel up to the machine's cores; the
    other jobs go on past a failed one."""
    with ThreadPoolExecutor(max_workers=compiles_at_once()) as pool:
        jobs = tuple(pool.map(lambda job: build_job(job, builder, on_progress), plan.jobs))
    return replace(plan, jobs=jobs)


def merge_plans(plans: Iterable[Plan]) -> Plan:
    """One plan of several (each host's, when hosts are planned one by one): the hosts
    of one module, probe and reason together, as make_plan groups them."""
    jobs: dict[tuple[str, str, str], tuple[ModuleJob, list[str]]] = {}
    for plan in plans:
        for job in plan.jobs:
            jobs.setdefault((job.probe.name, job.spec.key, job.error), (job, []))[1].extend(
                job.hosts)
    return Plan(jobs=tuple(replace(job, hosts=tuple(hosts)) for job, hosts in jobs.values()))
