"""The build stage: runtime fixes, spec keys, the compiler's mapping of stap's errors, and
the builder composing cache and compiler (with a fake stap where a real one is not needed).
"""

from __future__ import annotations

import platform
import threading
from pathlib import Path

import pytest

from stapctl import toolchains
from stapctl.build import Builder
from stapctl.compiler import _user_facing_stderr, check_syntax
from stapctl.errors import CompileError
from stapctl.models import ModuleSpec
from stapctl.toolchains import Toolchain

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
    """A /lib/modules of our own: header trees live under the returned directory."""
    root = tmp_path / "modules"
    root.mkdir()
    monkeypatch.setattr(toolchains, "MODULES_ROOT", root)
    return root


def declare(headers: Path, release: str, text: str) -> None:
    path = headers / release / "build" / "include/linux/task_work.h"
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


def test_fix_is_found_in_the_source_tree_too(tmp_path: Path, headers: Path) -> None:
    runtime = fake_runtime(tmp_path, fixed=False)
    header = headers / "6.1.0-split" / "source" / "include/linux/task_work.h"
    header.parent.mkdir(parents=True)
    header.write_text("task_work_cancel_func(")
    builder = Builder(tmp_path / "cache", Toolchain("stap", "4.8", runtime))
    assert [f.name for f in builder.fixes_for("6.1.0-split")] == ["task_work_cancel_func"]


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
    compiler = builder.compiler(builder.toolchain_for("r"))
    copy = compiler._runtime(builder.spec("s", "r", "x86_64", ()))
    assert copy is not None
    text = (copy / "stp_task_work.c").read_text()
    assert "typeof(&task_work_cancel_func)" in text
    assert 'kallsyms_lookup_name("task_work_cancel_func")' in text
    assert "task_work_cancel)" not in text  # the pristine runtime is untouched
    assert "task_work_cancel_func" not in (runtime / "stp_task_work.c").read_text()


def test_spec_key_changes_with_everything_that_changes_the_module() -> None:
    base = ModuleSpec("s", "r", "x86_64", ("-DX=1",), "4.8", "", "", "a/trace.yaml", 3)
    variants = [
        ModuleSpec("s2", "r", "x86_64", ("-DX=1",), "4.8", "", "", "a/trace.yaml", 3),
        ModuleSpec("s", "r2", "x86_64", ("-DX=1",), "4.8", "", "", "a/trace.yaml", 3),
        ModuleSpec("s", "r", "aarch64", ("-DX=1",), "4.8", "", "", "a/trace.yaml", 3),
        ModuleSpec("s", "r", "x86_64", ("-DX=2",), "4.8", "", "", "a/trace.yaml", 3),
        ModuleSpec("s", "r", "x86_64", ("-DX=1",), "5.0", "", "", "a/trace.yaml", 3),
        ModuleSpec("s", "r", "x86_64", ("-DX=1",), "4.8", "fix", "", "a/trace.yaml", 3),
        ModuleSpec("s", "r", "x86_64", ("-DX=1",), "4.8", "", "ab" * 32, "a/trace.yaml", 3),
        ModuleSpec("s", "r", "x86_64", ("-DX=1",), "4.8", "", "", "a/other.yaml", 3),
        ModuleSpec("s", "r", "x86_64", ("-DX=1",), "4.8", "", "", "a/trace.yaml", 4),
    ]
    assert len({base.key, *(v.key for v in variants)}) == len(variants) + 1
    # the module records the file's name, not its directory
    moved = ModuleSpec("s", "r", "x86_64", ("-DX=1",), "4.8", "", "", "/b/trace.yaml", 3)
    assert moved.key == base.key
    assert base.module_name == f"stapctl_{base.key[:16]}"


def test_spec_carries_the_users_file_and_line(tmp_path: Path, headers: Path) -> None:
    builder = Builder(tmp_path / "cache", Toolchain("stap", "4.8", tmp_path))
    spec = builder.spec("probe oneshot {}", "r", "x86_64", (), "", "dir/trace.yaml", 12)
    assert (spec.origin, spec.first_line) == ("dir/trace.yaml", 12)


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
    with pytest.raises(CompileError, match="cannot build for riscv64"):
        builder.build(spec)


def test_syntax_check_points_at_the_users_line() -> None:
    check_syntax('probe oneshot { printf("ok\\n") }', "trace.yaml", 9)
    with pytest.raises(CompileError) as caught:
        check_syntax('probe oneshot {\n  printf("x\\n"\n}', "trace.yaml", 9)
    assert "trace.yaml:11:1" in str(caught.value)
    assert "parse error" in str(caught.value)


FAKE_STAP = """#!/bin/sh
# test double for stap: records each compile, takes a while, writes NAME.ko
echo "$@" >> "{log}"
sleep {delay}
while [ $# -gt 0 ]; do
  if [ "$1" = "-m" ]; then name="$2"; fi
  if [ "$1" = "--" ]; then script="$2"; break; fi  # then the script, then its arguments
  shift
done
if grep -q FAIL "$script"; then
  echo "semantic error: no match at $script:$(grep -n FAIL "$script" | cut -d: -f1):3" >&2
  exit 1
fi
printf 'fake module' > "$name.ko"
"""


def fake_stap(tmp_path: Path, delay: float = 0) -> Path:
    stap = tmp_path / "stap"
    stap.write_text(FAKE_STAP.format(log=tmp_path / "compiles.log", delay=delay))
    stap.chmod(0o755)
    return stap


def compiles(tmp_path: Path) -> list[str]:
    log = tmp_path / "compiles.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def any_headers(headers: Path) -> None:
    """Release "r" has an (empty) headers tree, so the fake stap gets to run."""
    (headers / "r" / "build").mkdir(parents=True)


@pytest.mark.parametrize("release", ["../../x", "/x", "-x", ".hidden", "a/b", "a b",
                                     "a\nb", "x" * 65, ""])
def test_a_release_unfit_for_a_path_is_refused_before_any_path_is_made(
        tmp_path: Path, headers: Path, release: str) -> None:
    stap = fake_stap(tmp_path)
    builder = Builder(tmp_path / "cache", Toolchain(str(stap), "4.8", tmp_path))
    with pytest.raises(CompileError, match="refusing to build for kernel release"):
        builder.spec("probe oneshot {}", release, platform.machine(), ())
    spec = ModuleSpec("probe oneshot {}", release, platform.machine(), origin="t.yaml")
    with pytest.raises(CompileError, match="refusing to build for kernel release") as caught:
        builder.build(spec)
    assert "\n" not in str(caught.value)  # shown escaped, on one line
    assert compiles(tmp_path) == []
    assert {path.name for path in (tmp_path / "cache").iterdir()} <= {"locks"}


def test_two_applies_sharing_the_cache_compile_once(tmp_path: Path, any_headers: None) -> None:
    toolchain = Toolchain(str(fake_stap(tmp_path, delay=1)), "4.8", tmp_path / "no-runtime")
    spec = ModuleSpec("probe oneshot {}", "r", platform.machine(), (), "4.8")
    results = []

    def apply_once() -> None:  # each "apply" has its own Builder, as separate runs would
        results.append(Builder(tmp_path / "cache", toolchain).build(spec))

    threads = [threading.Thread(target=apply_once) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(compiles(tmp_path)) == 1
    assert len({(r.path, r.sha256) for r in results}) == 1
    assert results[0].path.read_bytes() == b"fake module"


def test_stap_gets_the_users_file_name_and_lines(tmp_path: Path, any_headers: None) -> None:
    builder = Builder(tmp_path / "cache", Toolchain(str(fake_stap(tmp_path)), "4.8", tmp_path))
    spec = builder.spec("probe oneshot {\n FAIL\n}", "r", platform.machine(), ("-DX=1",),
                        "", "/home/me/-trace.yaml", 20, ("hello", "-5"))
    with pytest.raises(CompileError) as caught:
        builder.build(spec)
    message = str(caught.value)
    assert message.startswith("/home/me/-trace.yaml:20: stap could not build this probe")
    assert "/home/me/-trace.yaml:21:3" in message  # stap's line 21 is the user's line 21
    argv = compiles(tmp_path)[0].split()
    assert argv[:4] == ["-p4", "-r", "r", "-m"]
    # the script's arguments after it, and after `--`: '-5' is not an option of stap's
    assert argv[-5:] == ["-DX=1", "--", "trace.yaml", "hello", "-5"]
    assert builder.cached(spec) is None  # a failure is not cached


def test_a_tampered_module_is_built_again(tmp_path: Path, any_headers: None) -> None:
    builder = Builder(tmp_path / "cache", Toolchain(str(fake_stap(tmp_path)), "4.8", tmp_path))
    spec = ModuleSpec("probe oneshot {}", "r", platform.machine(), origin="t.yaml")
    first = builder.build(spec)
    assert builder.build(spec) == first and len(compiles(tmp_path)) == 1
    first.path.write_bytes(b"planted module")
    assert builder.cached(spec) is None
    again = builder.build(spec)
    assert len(compiles(tmp_path)) == 2
    assert again.path.read_bytes() == b"fake module" and again.sha256 == first.sha256
