"""Planning: specs carry the user's file and line, and a host whose symbols could not be
read gets that reason on its kprobe.function jobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from stapctl.build import Builder
from stapctl.models import Host, HostFacts, Manifest, Probe
from stapctl.plan import make_plan
from stapctl.toolchains import Toolchain

pytestmark = pytest.mark.unit


def manifest(script: str) -> Manifest:
    probe = Probe(name="p", template=script, origin="/srv/trace.yaml", first_line=7)
    return Manifest(path=Path("/srv/trace.yaml"), name="m", probes=(probe,))


def test_jobs_group_hosts_and_carry_the_probes_origin(tmp_path: Path) -> None:
    builder = Builder(tmp_path, Toolchain("stap", "4.8", tmp_path))
    hosts = {name: (Host(name=name, address=name), HostFacts(release=release, arch="x86_64"))
             for name, release in (("a", "6.1.0-1"), ("b", "6.1.0-1"), ("c", "6.1.0-2"))}
    plan = make_plan(manifest("probe oneshot { exit() }"), hosts, builder, {})
    assert sorted(job.hosts for job in plan.jobs) == [("a", "b"), ("c",)]
    assert {(job.spec.origin, job.spec.first_line) for job in plan.jobs} == \
        {("/srv/trace.yaml", 7)}
    assert not any(job.cached or job.error for job in plan.jobs)


def test_a_host_without_symbols_is_told_why(tmp_path: Path) -> None:
    builder = Builder(tmp_path, Toolchain("stap", "4.8", tmp_path))
    facts = HostFacts(release="6.1.0-1", arch="x86_64",
                      symbol_map_error="/proc/kallsyms: permission denied")
    hosts = {"a": (Host(name="a", address="a"), facts),
             "b": (Host(name="b", address="b"), HostFacts(release="6.1.0-1", arch="x86_64"))}
    plan = make_plan(manifest('probe kprobe.function("vfs_read") { exit() }'), hosts,
                     builder, {})
    assert plan.unservable == {
        "a": "kprobe.function needs the host's kernel symbols: "
             "/proc/kallsyms: permission denied",
        "b": "kprobe.function needs the host's kernel symbols: its symbols were not gathered",
    }
