"""The module cache trusts neither its directory nor its meta files on their word."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from stapctl.cache import ModuleCache, replace_file
from stapctl.cli import cli
from stapctl.errors import CacheError
from stapctl.models import ModuleSpec

pytestmark = pytest.mark.unit

SPEC = ModuleSpec("probe oneshot {}", "6.1.0-28-amd64", "x86_64", origin="t.yaml")


def test_a_missing_cache_is_created_private(tmp_path: Path) -> None:
    cache = ModuleCache(tmp_path / "a" / "cache")
    assert (cache.root.stat().st_mode & 0o777) == 0o700
    assert (cache.directory("stap").stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777])
def test_a_cache_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    root.chmod(mode)
    with pytest.raises(CacheError, match=f"writable by others .mode {mode:04o}.*chmod -R go-w"):
        ModuleCache(root)


def test_a_subdirectory_others_can_write_is_refused(tmp_path: Path) -> None:
    cache = ModuleCache(tmp_path / "cache")
    (cache.root / "modules").mkdir(mode=0o700)
    (cache.root / "modules").chmod(0o777)
    with pytest.raises(CacheError) as caught:
        cache.store(SPEC, b"module")
    assert str(caught.value).startswith(f"{cache.root}/modules is writable by others")
    assert str(caught.value).endswith(f"chmod -R go-w {cache.root}")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")
def test_a_cache_someone_else_owns_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    os.chown(root, 4321, 4321)
    with pytest.raises(CacheError, match="belongs to uid 4321, not to you .* STAPCTL_CACHE_DIR"):
        ModuleCache(root)


def test_a_file_where_the_cache_should_be_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cache").write_text("")
    with pytest.raises(CacheError, match="cache"):
        ModuleCache(tmp_path / "cache")


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


@pytest.mark.parametrize("change", [
    lambda meta: {**meta, "sha256": "0" * 64},  # the module does not match
    lambda meta: {**meta, "sha256": "../../x"},
    lambda meta: {**meta, "sha256": 7},
    lambda meta: {**meta, "module_name": "other"},
    lambda meta: {k: v for k, v in meta.items() if k != "sha256"},
    lambda meta: ["not", "a", "mapping"],
])
def test_an_entry_whose_meta_does_not_hold_is_not_used(
        tmp_path: Path, change: Callable[[dict[str, Any]], object]) -> None:
    cache = ModuleCache(tmp_path)
    cache.store(SPEC, b"module")
    meta = json.loads(meta_path(cache).read_text())
    meta_path(cache).write_text(json.dumps(change(meta)))
    assert cache.lookup(SPEC) is None


def test_an_entry_with_broken_meta_or_no_module_is_not_used(tmp_path: Path) -> None:
    cache = ModuleCache(tmp_path)
    stored = cache.store(SPEC, b"module")
    stored.path.unlink()
    assert cache.lookup(SPEC) is None
    cache.store(SPEC, b"module")
    meta_path(cache).write_text("{broken")
    assert cache.lookup(SPEC) is None


def test_a_new_store_replaces_an_entry_that_failed_its_check(tmp_path: Path) -> None:
    cache = ModuleCache(tmp_path)
    stored = cache.store(SPEC, b"module")
    stored.path.write_bytes(b"planted")
    assert cache.lookup(SPEC) is None
    again = cache.store(SPEC, b"module")
    assert cache.lookup(SPEC) == again and again.path.read_bytes() == b"module"


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


def test_cache_commands_refuse_a_cache_others_can_write(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    root.chmod(0o777)
    done = subprocess.run([sys.executable, "-m", "stapctl", "cache", "prune"],
                          env={**os.environ, "STAPCTL_CACHE_DIR": str(root)},
                          capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert f"chmod -R go-w {root}" in done.stderr


def test_threads_writing_one_file_at_once_each_replace_it_whole(tmp_path: Path) -> None:
    """Workers of one process reading the same kernel's symbols store the same file at
    once: no writer renames another's partial file, and the file is always one whole."""
    target = tmp_path / "symbols.map"
    payloads = [bytes([65 + n]) * 200_000 for n in range(8)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(payloads))

    def write(data: bytes) -> None:
        start.wait()
        try:
            for _ in range(30):
                replace_file(target, data)
        except BaseException as error:  # noqa: BLE001 - the test's finding
            errors.append(error)

    threads = [threading.Thread(target=write, args=(data,)) for data in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["symbols.map"]  # no partial file left
