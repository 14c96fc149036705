"""The module cache: entries stored, found, listed and pruned."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from stapctl.cache import ModuleCache
from stapctl.cli import cli
from stapctl.models import ModuleSpec

pytestmark = pytest.mark.unit

SPEC = ModuleSpec("probe oneshot {}", "6.1.0-28-amd64", "x86_64", origin="t.yaml")


def test_a_missing_cache_is_created_private(tmp_path: Path) -> None:
    cache = ModuleCache(tmp_path / "a" / "cache")
    assert (cache.root.stat().st_mode & 0o777) == 0o700
    assert (cache.directory("stap").stat().st_mode & 0o777) == 0o700


def test_a_stored_module_is_found_with_its_hash(tmp_path: Path) -> None:
    cache = ModuleCache(tmp_path)
    assert cache.lookup(SPEC) is None
    stored = cache.store(SPEC, b"\x7fELF module")
    assert stored.sha256 == hashlib.sha256(b"\x7fELF module").hexdigest()
    assert stored.module_name == SPEC.module_name
    assert cache.lookup(SPEC) == stored
    assert (stored.path.parent / "script.stp").read_text() == SPEC.script


def meta_path(cache: ModuleCache) -> Path:
    return cache.root / "modules" / SPEC.key / "meta.json"


def test_an_entry_with_broken_meta_or_no_module_is_not_used(tmp_path: Path) -> None:
    cache = ModuleCache(tmp_path)
    stored = cache.store(SPEC, b"module")
    stored.path.unlink()
    assert cache.lookup(SPEC) is None
    cache.store(SPEC, b"module")
    meta_path(cache).write_text("{broken")
    assert cache.lookup(SPEC) is None


def test_entries_are_listed_newest_first_and_pruned(tmp_path: Path) -> None:
    cache = ModuleCache(tmp_path)
    specs = [ModuleSpec(f"probe oneshot {{ /* {n} */ }}", "r", "x86_64") for n in range(3)]
    for age, spec in enumerate(specs):
        stored = cache.store(spec, b"m" * (2048 * (age + 1)))
        os.utime(stored.path.parent, (1000 - age, 1000 - age))
    (cache.root / "modules" / ".new-partial").mkdir()  # a store under way: not an entry
    rows = cache.entries()
    assert [row.key for row in rows] == [spec.key for spec in specs]
    assert [row.size for row in rows] == [2048, 4096, 6144]
    assert rows[0].release == "r" and rows[0].module_name == specs[0].module_name
    assert cache.prune(keep=1) == 2
    assert [row.key for row in cache.entries()] == [specs[0].key]
    assert (cache.root / "modules" / ".new-partial").exists()


def test_cache_list_shows_a_broken_entry_without_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAPCTL_CACHE_DIR", str(tmp_path / "cache"))
    cache = ModuleCache(tmp_path / "cache")
    cache.store(SPEC, b"module")
    meta_path(cache).write_text('{"release": "[bold]x"}')
    result = CliRunner().invoke(cli, ["cache", "list"])
    assert result.exit_code == 0, result.output
    assert SPEC.key[:12] in result.output and "[bold]x" in result.output
    result = CliRunner().invoke(cli, ["cache", "prune"])
    assert result.exit_code == 0 and cache.entries() == []
