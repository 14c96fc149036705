"""The planner across two kernel releases: one compile per release, in parallel, then none."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from stapctl.lab import Lab, LabStatus, guest_release
from stapctl.manifest import load_manifest
from stapctl.plan import ModuleJob
from stapctl.session import Session, Silent, select_hosts

from .helpers import guest_host, write_inventory, write_manifest

pytestmark = pytest.mark.e2e


def second_release() -> str:
    """A kernel release with installed headers other than the lab's default one."""
    default = guest_release()
    others = sorted(p.parent.name for p in Path("/lib/modules").glob("*/build")
                    if p.parent.name != default and p.parent.name.endswith("-amd64"))
    if not others:
        pytest.fail("no second kernel's headers are installed: run scripts/install.sh")
    return others[-1]


@pytest.fixture(scope="module")
def other_lab() -> Iterator[LabStatus]:
    """One guest booting the second release, in a lab folder of its own, stopped as soon as
    this module's tests are done."""
    release = second_release()
    other = Lab(Lab.default().directory.parent / f"lab-{release}")
    status = other.up(1, release=release)
    try:
        yield status
    finally:
        other.down()


def test_two_releases_two_parallel_compiles_then_none(
        lab: LabStatus, other_lab: LabStatus, tmp_path: Path) -> None:
    hosts = {"main": guest_host(lab), "other": guest_host(other_lab)}
    inventory = write_inventory(tmp_path / "inventory.yaml", hosts)
    token = secrets.token_hex(4)  # a script no cache has seen: the compiles are real
    script = 'probe oneshot { printf("TOKEN %s\\n", "{{ kernel_release }}") }'
    manifest_path = write_manifest(tmp_path, "kernels", script.replace("TOKEN", token))
    document = yaml.safe_load(manifest_path.read_text())
    document["inventory"] = str(inventory)
    manifest_path.write_text(yaml.safe_dump(document))

    manifest = load_manifest(manifest_path)
    times: dict[tuple[str, str], float] = {}

    class BuildTimes(Silent):
        def build(self, job: ModuleJob, state: str) -> None:
            times[(job.spec.release, state)] = time.monotonic()

    session = Session(manifest, select_hosts(manifest), listener=BuildTimes(), record=False)
    try:
        connected = session.connect()
    finally:
        session.finish()
    releases = {facts.release for _, facts in connected.values()}
    assert len(releases) == 2, releases

    plan = session.plan(connected)
    assert len(plan.jobs) == 2 and not any(job.cached for job in plan.jobs)
    built = session.build(plan)
    assert all(job.cached for job in built.jobs), [job.error for job in built.jobs]
    first, second = sorted(releases)
    # in parallel: each compile started before the other one finished
    assert times[(first, "building")] < times[(second, "built")]
    assert times[(second, "building")] < times[(first, "built")]

    result = subprocess.run([sys.executable, "-m", "stapctl", "apply", str(manifest_path)],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert "building" not in result.stderr  # the second apply compiled nothing
    assert sorted(result.stdout.splitlines()) == sorted(
        f"{name}: {token} {facts.release}" for name, (_, facts) in connected.items())
