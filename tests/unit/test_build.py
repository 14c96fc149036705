"""The module cache and the runtime-fix machinery, without running stap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stapctl import build
from stapctl.build import Builder, Toolchain, _user_facing_stderr
from stapctl.models import ModuleSpec

pytestmark = pytest.mark.unit


def fake_runtime(tmp_path: Path, fixed: bool) -> Path:
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    name = "task_work_cancel_func" if fixed else "task_work_cancel"
    (runtime / "stp_task_work.c").write_text(
        f"typedef typeof(&{name}) task_work_cancel_fn;\n"
        f'x = kallsyms_lookup_name("{name}");\n'
    )
    return runtime


@pytest.fixture
def headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "modules"
    monkeypatch.setattr(build, "_header_text",
                        lambda release, rel: (root / release / rel).read_text()
                        if (root / release / rel).exists() else "")
    return root


def declare(headers: Path, release: str, text: str) -> None:
    path = headers / release / "include/linux/task_work.h"
    path.parent.mkdir(parents=True)
    path.write_text(text)


def test_fix_applies_only_when_headers_have_the_new_function(tmp_path: Path,
                                                            headers: Path) -> None:
    runtime = fake_runtime(tmp_path, fixed=False)
    builder = Builder(tmp_path / "cache", Toolchain("stap", "4.8/0.188", runtime))
    declare(headers, "6.1.0-new", "struct callback_head *task_work_cancel_func(void);")
    declare(headers, "6.1.0-old", "struct callback_head *task_work_cancel(void);")
    assert [f.name for f in builder.fixes_for("6.1.0-new")] == ["task_work_cancel_func"]
    assert builder.fixes_for("6.1.0-old") == ()
    new = builder.spec("probe oneshot {}", "6.1.0-new", "x86_64", ())
    old = builder.spec("probe oneshot {}", "6.1.0-old", "x86_64", ())
    assert new.runtime_fix == "task_work_cancel_func" and old.runtime_fix == ""


def test_fix_is_not_applied_to_a_runtime_that_already_has_it(tmp_path: Path,
                                                             headers: Path) -> None:
    runtime = fake_runtime(tmp_path, fixed=True)
    builder = Builder(tmp_path / "cache", Toolchain("stap", "5.1", runtime))
    declare(headers, "6.1.0-new", "task_work_cancel_func(")
    assert builder.fixes_for("6.1.0-new") == ()


def test_patched_runtime_copy_names_the_new_function(tmp_path: Path, headers: Path) -> None:
    runtime = fake_runtime(tmp_path, fixed=False)
    builder = Builder(tmp_path / "cache", Toolchain("stap", "4.8/0.188", runtime))
    declare(headers, "r", "task_work_cancel_func(")
    copy = builder._runtime(builder.spec("s", "r", "x86_64", ()))
    assert copy is not None
    text = (copy / "stp_task_work.c").read_text()
    assert "typeof(&task_work_cancel_func)" in text
    assert 'kallsyms_lookup_name("task_work_cancel_func")' in text
    assert "task_work_cancel)" not in text  # the pristine runtime is untouched
    assert "task_work_cancel_func" not in (runtime / "stp_task_work.c").read_text()


def test_spec_key_changes_with_everything_that_changes_the_module() -> None:
    base = ModuleSpec("s", "r", "x86_64", ("-DX=1",), "4.8", "")
    variants = [
        ModuleSpec("s2", "r", "x86_64", ("-DX=1",), "4.8", ""),
        ModuleSpec("s", "r2", "x86_64", ("-DX=1",), "4.8", ""),
        ModuleSpec("s", "r", "aarch64", ("-DX=1",), "4.8", ""),
        ModuleSpec("s", "r", "x86_64", ("-DX=2",), "4.8", ""),
        ModuleSpec("s", "r", "x86_64", ("-DX=1",), "5.0", ""),
        ModuleSpec("s", "r", "x86_64", ("-DX=1",), "4.8", "fix"),
    ]
    assert len({base.key, *(v.key for v in variants)}) == 7
    assert base.key == ModuleSpec("s", "r", "x86_64", ("-DX=1",), "4.8", "").key


def test_cached_entry_is_found_and_a_broken_one_is_not(tmp_path: Path) -> None:
    builder = Builder(tmp_path, Toolchain("stap", "4.8", tmp_path))
    spec = ModuleSpec("s", "r", "x86_64")
    entry = tmp_path / "modules" / spec.key
    entry.mkdir(parents=True)
    (entry / "meta.json").write_text(json.dumps({"sha256": "ab", "module_name": "stapctl_x"}))
    assert builder.cached(spec) is None  # no module file yet
    (entry / "module.ko").write_bytes(b"\x7fELF")
    found = builder.cached(spec)
    assert found is not None and found.sha256 == "ab" and found.module_name == "stapctl_x"
    (entry / "meta.json").write_text("{broken")
    assert builder.cached(spec) is None


def test_stap_errors_point_into_the_users_file() -> None:
    script = "/tmp/build-x/probe.stp"
    stderr = ("parse error: expected statement\n"
              "\tat: identifier 'oops' at /tmp/build-x/probe.stp:3:5\n"
              "\tsource: oops\n\n1 parse error.\n")
    text = _user_facing_stderr(stderr, script, "trace.yaml", 12)
    assert "trace.yaml:14:5" in text
    assert "/tmp/build-x" not in text


def test_foreign_arch_is_refused_before_compiling(tmp_path: Path) -> None:
    builder = Builder(tmp_path, Toolchain("stap", "4.8", tmp_path))
    spec = ModuleSpec("s", "r", "riscv64")
    with pytest.raises(build.CompileError, match="cannot build for riscv64"):
        builder.build(spec, "trace.yaml", 1)


def test_syntax_check_points_at_the_users_line() -> None:
    build.check_syntax('probe oneshot { printf("ok\\n") }', "trace.yaml", 9)
    with pytest.raises(build.CompileError) as caught:
        build.check_syntax('probe oneshot {\n  printf("x\\n"\n}', "trace.yaml", 9)
    assert "trace.yaml:11:1" in str(caught.value)
    assert "parse error" in str(caught.value)


FAKE_STAP = """#!/bin/sh
# test double for stap: records each compile, takes a while, writes NAME.ko
echo "$@" >> "{log}"
sleep 1
while [ $# -gt 0 ]; do
  if [ "$1" = "-m" ]; then name="$2"; fi
  shift
done
printf 'fake module' > "$name.ko"
"""


def test_two_applies_sharing_the_cache_compile_once(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    log = tmp_path / "compiles.log"
    stap = tmp_path / "stap"
    stap.write_text(FAKE_STAP.format(log=log))
    stap.chmod(0o755)
    monkeypatch.setattr(build, "headers_dir", lambda release: tmp_path)
    toolchain = Toolchain(str(stap), "4.8", tmp_path / "no-runtime")
    spec = ModuleSpec("probe oneshot {}", "r", build.platform.machine(), (), "4.8")
    results = []

    def apply_once() -> None:  # each "apply" has its own Builder, as separate runs would
        results.append(Builder(tmp_path / "cache", toolchain).build(spec, "t.yaml", 1))

    threads = [threading.Thread(target=apply_once) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(log.read_text().splitlines()) == 1
    assert len({(r.path, r.sha256) for r in results}) == 1
    assert results[0].path.read_bytes() == b"fake module"
