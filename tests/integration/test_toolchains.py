"""Toolchains that cannot serve, with the real trixie build root (made by the first test
that needs it, in the tests' own cache) and the real archive behind this machine's apt
sources: each host gets its own reason and what to do, and the others are planned."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stapctl.build import Builder
from stapctl.errors import CompileError
from stapctl.manifest import load_manifest
from stapctl.models import Host, HostFacts
from stapctl.plan import make_plan

pytestmark = pytest.mark.integration

GONE = "6.12.1+deb13-amd64"  # a trixie release the archive never had, or no longer has


def stapctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stapctl", *args], capture_output=True,
                          text=True, timeout=1800, check=False)


def test_headers_the_archive_no_longer_has() -> None:
    builder = Builder()
    with pytest.raises(CompileError) as caught:
        builder.toolchain_for(GONE)
    assert f"the trixie archive no longer has linux-headers-{GONE}" in str(caught.value)
    assert "upgrade that host to a kernel the archive still ships" in str(caught.value)


def test_headers_of_another_release_are_fetched_into_its_root_once() -> None:
    builder = Builder()
    trixie = builder.toolchain_for("6.12.117+deb13-amd64")  # makes the root if missing
    listed = subprocess.run(trixie.command(
        ["apt-cache", "search", "--names-only", r"^linux-headers-[0-9.]+\+deb13-amd64$"]),
        capture_output=True, text=True, check=True).stdout
    others = sorted((line.split()[0].removeprefix("linux-headers-")
                     for line in listed.splitlines()), key=kernel_line_and_build)
    older = [release for release in others
             if kernel_line_and_build(release) < kernel_line_and_build(trixie.kernel_release)]
    assert older, f"the archive holds no older trixie kernel than {trixie.kernel_release}"
    release = older[-1]
    assert Builder().toolchain_for(release).name == "trixie"
    assert trixie.headers(release).is_dir()
    spec = Builder().spec("probe oneshot { exit() }", release, "x86_64", ())
    assert (spec.toolchain, spec.stap_version) == ("trixie", trixie.stap_version)


def kernel_line_and_build(release: str) -> tuple[int, ...]:
    """6.12.107+deb13-amd64 → (6, 12, 107): the order of a suite's kernel releases."""
    return tuple(int(part) for part in release.split("+")[0].split("."))


def test_each_host_its_own_outcome_and_the_others_are_planned(tmp_path: Path) -> None:
    builder = Builder()
    host = builder.toolchains.host()
    assert host is not None
    manifest_path = tmp_path / "hello.yaml"
    manifest_path.write_text("apiVersion: stapctl/v1\nkind: Trace\nname: hello\nprobes:\n"
                             "  - name: hello\n    script: 'probe oneshot { exit() }'\n")
    facts = {"bookworm": host.kernel_release, "future": "7.1.0-1-amd64", "gone": GONE}
    hosts = {name: (Host(name=name, address=name), HostFacts(release=release, arch="x86_64"))
             for name, release in facts.items()}
    plan = make_plan(load_manifest(manifest_path), hosts, builder, {})
    assert sorted(plan.unservable) == ["future", "gone"]
    assert "no toolchain supports kernel '7.1.0-1-amd64'" in plan.unservable["future"]
    assert f"archive no longer has linux-headers-{GONE}" in plan.unservable["gone"]
    (served,) = plan.jobs_for("bookworm")
    assert not served.error and served.spec.stap_version == host.stap_version


def test_toolchain_commands() -> None:
    Builder().toolchain_for("6.12.117+deb13-amd64")  # makes the trixie root if missing
    listed = stapctl("toolchain", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    by_name = {t["name"]: t for t in json.loads(listed.stdout)["toolchains"]}
    assert by_name["host"]["stap_version"] == "4.8"
    assert by_name["trixie"]["stap_version"] == "5.1"
    assert by_name["trixie"]["kernel_release"].startswith("6.12.")
    refused = stapctl("toolchain", "remove", "host")
    assert refused.returncode == 2 and "controller's own systemtap" in refused.stderr
    bad = stapctl("toolchain", "add", "no-such-suite")  # the real archive has no such suite
    assert bad.returncode == 2, bad.stderr
    assert "mmdebstrap could not make the no-such-suite build root" in bad.stderr
    assert "Traceback" not in bad.stderr
