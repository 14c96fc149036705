"""Incident response on three real kernels: one-liners with `stapctl run`, a script file
with arguments, each host telling itself apart, and the run kept as a manifest."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from stapctl.lab import LabStatus

pytestmark = pytest.mark.e2e


def stapctl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a user types it; no -i, so the lab's inventory."""
    return subprocess.run([sys.executable, "-m", "stapctl", *args], capture_output=True,
                          text=True, timeout=900, check=False, cwd=cwd)


def run_id(result: subprocess.CompletedProcess[str]) -> str:
    match = re.search(r"\(run (\S+)\)", result.stderr)
    assert match, result.stderr
    return match.group(1)


def test_one_liner_tells_each_host_apart(fleet_lab: LabStatus) -> None:
    result = stapctl("run", "all", "-e",
                     r'probe oneshot { printf("%d %s %s\n", remote_id(), remote_uri(), @1) }',
                     "--", "hello")
    assert result.returncode == 0, result.stderr
    expected = {f"{guest.name}: {index} ssh://{guest.user}@{guest.host}:{guest.port} hello"
                for index, guest in enumerate(fleet_lab.guests)}
    assert len(expected) == 3
    assert set(result.stdout.splitlines()) == expected


def test_script_file_with_arguments_is_kept_as_a_manifest(lab: LabStatus,
                                                          tmp_path: Path) -> None:
    script = tmp_path / "double.stp"
    script.write_text('probe oneshot { printf("%s doubled is %d\\n", @1, $1 * 2) }\n')
    result = stapctl("run", "all", str(script), "21", "--forks", "2")
    assert result.returncode == 0, result.stderr
    names = [guest.name for guest in lab.guests]
    assert sorted(result.stdout.splitlines()) == [f"{name}: 21 doubled is 42" for name in names]

    exported = stapctl("runs", "export", run_id(result))
    assert exported.returncode == 0, exported.stderr
    trace = tmp_path / "keep" / "trace.yaml"
    trace.parent.mkdir()
    trace.write_text(exported.stdout)
    assert "args:" in exported.stdout and "double" in exported.stdout
    script.unlink()  # the kept manifest holds the script itself

    validated = stapctl("validate", str(trace))
    assert validated.returncode == 0, validated.stderr
    applied = stapctl("apply", str(trace))
    assert applied.returncode == 0, applied.stderr
    assert sorted(applied.stdout.splitlines()) == sorted(result.stdout.splitlines())
