"""Toolchains: which one serves a kernel, paths inside a root, the apt sources read, the
runtime fixes per systemtap generation, and one root made once for concurrent applies."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from stapctl import toolchains
from stapctl.cache import ModuleCache
from stapctl.errors import CompileError
from stapctl.runtime_fixes import fixes_named, fixes_needed
from stapctl.toolchains import Toolchain, Toolchains, _source_entries, kernel_line

pytestmark = pytest.mark.unit

TRIXIE = "6.12.117+deb13-amd64"


def fake_root(cache: Path, name: str, release: str, *headers: str) -> Path:
    """A build root as `toolchain add` leaves it, holding only header directories."""
    home = cache / "toolchains" / name
    for each in (release, *headers):
        (home / "root" / "lib/modules" / each / "build").mkdir(parents=True)
    (home / "toolchain.json").write_text(json.dumps(
        {"name": name, "stap_version": "5.1", "suite": name, "kernel_release": release}))
    return home / "root"


@pytest.fixture
def cache(tmp_path: Path) -> ModuleCache:
    return ModuleCache(tmp_path / "cache")


def test_kernel_lines_are_compared_as_numbers() -> None:
    assert kernel_line("6.12.117+deb13-amd64") == (6, 12)
    assert kernel_line("6.1.0-57-amd64") < kernel_line("6.12.1") < kernel_line("7.0")
    assert kernel_line("weird") == (0, 0)


def test_each_kernel_gets_the_toolchain_of_its_line(cache: ModuleCache) -> None:
    fake_root(cache.root, "trixie", TRIXIE, "6.10.3-amd64")
    chosen = Toolchains(cache)
    host = chosen.host()
    assert host is not None and host.is_host
    assert chosen.for_release(TRIXIE).name == "trixie"  # by the suite its name carries
    assert chosen.for_release(host.kernel_release).name == "host"  # by its line
    assert chosen.for_release("6.10.3-amd64").name == "trixie"  # the nearest newer line
    with pytest.raises(CompileError, match="no toolchain supports kernel '7.1.0-1-amd64'") as e:
        chosen.for_release("7.1.0-1-amd64")
    assert "stapctl toolchain add" in str(e.value)


def test_a_release_unfit_for_a_path_is_refused_in_a_root_too(cache: ModuleCache) -> None:
    root = fake_root(cache.root, "trixie", TRIXIE)
    toolchain = Toolchain.in_root("trixie", root, "5.1", TRIXIE)
    with pytest.raises(CompileError, match="refusing to build for kernel release"):
        toolchain.headers("../../../etc")


def test_links_in_a_root_are_followed_inside_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/src/linux-headers-x").mkdir(parents=True)
    (root / "lib/modules/x").mkdir(parents=True)
    (root / "lib/modules/x/build").symlink_to("../../../usr/src/linux-headers-x")
    (root / "lib/modules/x/source").symlink_to("/usr/src/linux-headers-x")  # absolute
    (root / "lib/modules/x/escape").symlink_to("../../../../../../../../outside")
    toolchain = Toolchain.in_root("t", root, "5.1", "x")
    assert toolchain.headers("x") == root / "usr/src/linux-headers-x"
    assert toolchain.headers("x", "source") == root / "usr/src/linux-headers-x"
    assert toolchain.host_path("/lib/modules/x/escape") == root / "outside"
    assert toolchain.inside(root / "usr/src") == "/usr/src"


def test_the_archive_is_read_from_both_apt_source_forms() -> None:
    deb822 = ("Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm "
              "bookworm-updates\nComponents: main\n\nTypes: deb-src\nURIs: http://src.example\n"
              "Suites: bookworm\n")
    assert list(_source_entries(deb822, deb822=True)) == [
        ("http://mirror.example/debian", ["bookworm", "bookworm-updates"])]
    one_line = ("# a comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian "
                "bookworm main\ndeb-src http://m.example/debian bookworm main\n")
    assert list(_source_entries(one_line, deb822=False)) == [
        ("http://m.example/debian", ["bookworm"])]


def runtime_with(tmp_path: Path, transport: str, print_flush: str = "") -> Path:
    runtime = tmp_path / "runtime"
    (runtime / "transport").mkdir(parents=True)
    (runtime / "transport" / "transport.c").write_text(transport)
    if print_flush:
        (runtime / "print_flush.c").write_text(print_flush)
    return runtime


LOOKUP_51 = ('        kallsyms_uprobe_unregister = (void*) kallsyms_lookup_name '
             '("uprobe_unregister");\n')
RESERVE_51 = ("bytes_reserved = _stp_data_write_reserve(hlen+len,\n &entry);\n"
              "if (bytes_reserved > 0 && bytes_reserved < hlen){\n")


def host_with(tmp_path: Path, runtime: Path, uprobes_h: str,
              monkeypatch: pytest.MonkeyPatch) -> Toolchain:
    modules = tmp_path / "modules"
    header = modules / "6.12.1" / "build" / "include/linux/uprobes.h"
    header.parent.mkdir(parents=True)
    header.write_text(uprobes_h)
    monkeypatch.setattr(toolchains, "MODULES_ROOT", modules)
    return Toolchain("stap", "5.1", runtime)


def test_uprobe_unregister_fix_for_51_on_612(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = runtime_with(tmp_path, LOOKUP_51, RESERVE_51)
    toolchain = host_with(tmp_path, runtime,
                          "extern void uprobe_unregister_nosync(struct uprobe *u);",
                          monkeypatch)
    # 5.1's print_flush.c handles a split header already: only the uprobe fix applies
    assert [fix.name for fix in fixes_needed(toolchain, "6.12.1")] == ["uprobe_unregister"]
    copy = tmp_path / "copy"
    shutil.copytree(runtime, copy)
    for fix in fixes_named("uprobe_unregister"):
        fix.apply(copy)
    text = (copy / "transport" / "transport.c").read_text()
    assert text.index('"uprobe_unregister"') < text.index('"uprobe_unregister_nosync"')
    assert "if (kallsyms_uprobe_unregister == NULL)" in text
    # a runtime that knows the new name already, or older headers, need nothing
    assert fixes_needed(Toolchain("stap", "5.6", copy), "6.12.1") == ()


def test_no_uprobe_fix_for_headers_without_the_split(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    toolchain = host_with(tmp_path, runtime_with(tmp_path, LOOKUP_51),
                          "extern void uprobe_unregister(struct inode *i);", monkeypatch)
    assert fixes_needed(toolchain, "6.12.1") == ()


MMDEBSTRAP_DOUBLE = """#!/bin/sh
# recording test double for mmdebstrap: a minimal root (busybox as sh and env, a stap that
# only answers -V, a dpkg status naming the suite's kernel), made slowly
echo "$@" >> "{log}"
sleep 1
root="$4"
mkdir -p "$root/bin" "$root/usr/bin" "$root/proc" "$root/sys" "$root/dev" "$root/var/lib/dpkg"
cp "{busybox}" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
ln -s ../../bin/busybox "$root/usr/bin/env"
printf '#!/bin/sh\\necho "Systemtap translator/driver (version 9.9/0.1)" >&2\\n' \\
  > "$root/usr/bin/stap"
chmod 755 "$root/usr/bin/stap"
status="$root/var/lib/dpkg/status"
printf 'Package: linux-headers-amd64\\nStatus: install ok installed\\n' > "$status"
printf 'Depends: linux-headers-9.9.0-1-amd64\\n\\n' >> "$status"
"""

FAILING_MMDEBSTRAP = """#!/bin/sh
# fault-injection double for mmdebstrap: the archive does not serve the suite
echo "E: apt-get update failed: Release file for $3 not found" >&2
exit 1
"""


def double_on_path(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "mmdebstrap"
    busybox = shutil.which("busybox") or "/bin/busybox"
    program.write_text(text.format(log=tmp_path / "mmdebstrap.log", busybox=busybox))
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return tmp_path / "mmdebstrap.log"


def test_concurrent_applies_make_a_root_once(tmp_path: Path, cache: ModuleCache,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    log = double_on_path(tmp_path, MMDEBSTRAP_DOUBLE, monkeypatch)
    made: list[Toolchain] = []

    def apply_once() -> None:  # each "apply" has its own Toolchains, as separate runs would
        made.append(Toolchains(ModuleCache(cache.root)).add("testsuite"))

    threads = [threading.Thread(target=apply_once) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(log.read_text().splitlines()) == 1
    assert {(t.stap_version, t.kernel_release) for t in made} == {("9.9", "9.9.0-1-amd64")}
    assert [t.name for t in Toolchains(cache).roots()] == ["testsuite"]
    Toolchains(cache).remove("testsuite")
    assert Toolchains(cache).roots() == []


def test_a_failed_mmdebstrap_says_what_to_do_and_leaves_nothing(
        tmp_path: Path, cache: ModuleCache, monkeypatch: pytest.MonkeyPatch) -> None:
    double_on_path(tmp_path, FAILING_MMDEBSTRAP, monkeypatch)
    with pytest.raises(CompileError, match="mmdebstrap could not make the bullseye build root"
                       ) as caught:
        Toolchains(cache).for_release("5.10.0-1+deb11-amd64")
    assert "Release file for bullseye not found" in str(caught.value)
    assert "then retry" in str(caught.value)
    assert not (cache.root / "toolchains" / "bullseye").exists()


def test_tracepoint_queries_of_51_build_without_werror_on_kernels_with_args_h(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = tmp_path / "usr"
    runtime = prefix / "share/systemtap/runtime"
    runtime.mkdir(parents=True)
    (prefix / "bin").mkdir()
    stap = prefix / "bin" / "stap"
    stap.write_bytes(b"\0ELF...#define COUNT_ARGS(X...) __COUNT_ARGS(, ##X, 12, 11, 10\0")
    modules = tmp_path / "modules"
    for release, args_h in (("6.12.1", "#define COUNT_ARGS(X...) __COUNT_ARGS(, ##X, 15"),
                            ("6.1.1", "")):
        header = modules / release / "build" / "include/linux/args.h"
        header.parent.mkdir(parents=True)
        header.write_text(args_h)
    monkeypatch.setattr(toolchains, "MODULES_ROOT", modules)
    toolchain = Toolchain(str(stap), "5.1", runtime)
    assert [fix.name for fix in fixes_needed(toolchain, "6.12.1")] == ["tracequery_count_args"]
    assert fixes_needed(toolchain, "6.1.1") == ()  # no linux/args.h before 6.7
    (fix,) = fixes_named("tracequery_count_args")
    copy = tmp_path / "copy"
    copy.mkdir()
    fix.apply(copy)
    wrapper = copy / "stapctl-cc"
    assert os.access(wrapper, os.X_OK) and "-Werror" in wrapper.read_text()
    assert [o.format(runtime="/r") for o in fix.stap_options] == ["-B", "CC=/r/stapctl-cc"]
    stap.write_bytes(b"\0ELF...#undef COUNT_ARGS\0")  # a systemtap that does not clash
    assert fixes_needed(toolchain, "6.12.1") == ()
