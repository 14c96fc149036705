"""kprobe.function without kernel debuginfo: built against the target's own symbols."""

from __future__ import annotations

from pathlib import Path

import pytest

from stapctl.lab import LabStatus

from .helpers import apply, stap_modules_loaded, write_manifest

pytestmark = pytest.mark.e2e


def test_kprobe_function_resolves_from_the_targets_kallsyms(lab: LabStatus,
                                                            tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, "kprobe", """
        probe kprobe.function("vfs_read") {
          printf("vfs_read seen\\n")
          exit()
        }
    """)
    result = apply(lab, manifest, "--limit", "lab-1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["lab-1: vfs_read seen"]
    assert stap_modules_loaded(lab) == ""


def test_a_function_the_kernel_lacks_is_a_clear_compile_error(lab: LabStatus,
                                                              tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, "nosuch", """
        probe kprobe.function("no_such_function_in_this_kernel") { exit() }
    """)
    result = apply(lab, manifest, "--limit", "lab-1")
    assert result.returncode == 2, result.stderr  # bad input: nothing could be built
    assert "no_such_function_in_this_kernel" in result.stderr
    assert f"{manifest}:" in result.stderr  # stap's message points into the user's file
    assert "Traceback" not in result.stderr
