"""`stapctl validate`: every kind of problem is exit 2 with a file:line, no host touched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

HEADER = "apiVersion: stapctl/v1\nkind: Trace\nname: t\n"


def validate(tmp_path: Path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "trace.yaml"
    path.write_text(text)
    return subprocess.run([sys.executable, "-m", "stapctl", "validate", *args, str(path)],
                          capture_output=True, text=True, check=False, timeout=120)


def test_a_good_manifest_with_an_inventory_renders_for_each_host(tmp_path: Path) -> None:
    (tmp_path / "hosts.ini").write_text("[web]\nw1 limit=5\nw2 limit=7\n")
    result = validate(tmp_path, HEADER + "inventory: hosts.ini\nhosts: web\nprobes:\n"
                      "  - name: p\n    script: |\n"
                      "      probe oneshot { printf(\"%d\\n\", {{ limit }}) }\n")
    assert result.returncode == 0, result.stderr
    assert "2 host(s), 2 distinct script(s) parsed" in result.stderr


def test_a_script_stap_cannot_parse_points_at_the_manifest_line(tmp_path: Path) -> None:
    result = validate(tmp_path, HEADER + "probes:\n  - name: p\n    script: |\n"
                      "      probe oneshot {\n        printf(\"x\"\n      }\n")
    assert result.returncode == 2
    assert "trace.yaml:9:1" in result.stderr and "parse error" in result.stderr
    assert "Traceback" not in result.stderr and "Tip:" not in result.stderr


def test_an_undefined_host_variable_is_caught_per_host(tmp_path: Path) -> None:
    (tmp_path / "hosts.ini").write_text("[web]\nw1 limit=5\nw2\n")
    result = validate(tmp_path, HEADER + "inventory: hosts.ini\nprobes:\n"
                      "  - name: p\n    script: |\n"
                      "      probe oneshot { printf(\"%d\\n\", {{ limit }}) }\n")
    assert result.returncode == 2
    assert "trace.yaml:" in result.stderr and "limit" in result.stderr
