"""Probe discovery: one stap listing per (release, symbol map), merged per probe point,
kept in the cache; stap's complaints as one line (a stap test double answers)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from stapctl.build import Builder
from stapctl.errors import UsageError
from stapctl.models import Host, HostFacts
from stapctl.probes import check_pattern, list_probes
from stapctl.toolchains import MODULES_ROOT, Toolchain

pytestmark = pytest.mark.unit

OLD, NEW = "6.1.0-56-amd64", "6.1.0-57-amd64"

# test double for stap -l/-L: logs its argv, answers from a table of release → lines
# (the release is the -r argument, or the tree's name before its symbol map's digest);
# a pattern with an unbalanced '(' is a parse error, as stap says it
FAKE_STAP = """#!{python}
import json, sys
argv = sys.argv[1:]
with open({log!r}, "a") as log:
    log.write(json.dumps(argv) + "\\n")
pattern, tree = argv[1], argv[argv.index("-r") + 1]
if pattern.count("(") != pattern.count(")"):
    sys.stderr.write("parse error: expected literal string or number\\n"
                     "        saw: operator '{{{{' at <input>:1:14\\n"
                     "1 parse error.\\n"
                     "Tip: /usr/share/doc/systemtap/README.Debian should help you.\\n")
    sys.exit(1)
answers = json.loads({answers!r})
release = next(name for name in answers if tree.rsplit("/", 1)[-1].startswith(name))
lines = answers[release]
if not lines:
    sys.stderr.write("Tip: /usr/share/doc/systemtap/README.Debian should help you.\\n")
    sys.exit(1)
for line in lines:
    print(line + ("  $fd:long" if argv[0] == "-L" else ""))
"""


@pytest.fixture(autouse=True)
def headers_installed() -> None:
    missing = [r for r in (OLD, NEW) if not (MODULES_ROOT / r / "build").exists()]
    if missing:
        pytest.fail(f"no headers for {missing}: run scripts/install.sh")


def builder(tmp_path: Path, answers: dict[str, list[str]]) -> Builder:
    stap = tmp_path / "stap"
    stap.write_text(FAKE_STAP.format(python=sys.executable, log=str(tmp_path / "stap.log"),
                                     answers=json.dumps(answers)))
    stap.chmod(0o755)
    return Builder(tmp_path / "cache", Toolchain(str(stap), "4.8", tmp_path))


def stap_calls(tmp_path: Path) -> list[list[str]]:
    log = tmp_path / "stap.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def hosts(**releases: str) -> dict[str, tuple[Host, HostFacts]]:
    return {name: (Host(name=name, address=name), HostFacts(release=release, arch="x86_64"))
            for name, release in releases.items()}


def test_one_listing_per_release_merged_per_probe_point(tmp_path: Path) -> None:
    stap = builder(tmp_path, {OLD: ["syscall.open", "syscall.openat"],
                              NEW: ["syscall.openat", "syscall.openat2"]})
    listing = list_probes("syscall.open*", hosts(a=OLD, b=NEW, c=NEW), stap, False)
    assert sorted(call[2:4] for call in stap_calls(tmp_path)) == [["-r", OLD], ["-r", NEW]]
    assert [(p.name, p.kernels) for p in listing.points] == [
        ("syscall.open", (OLD,)), ("syscall.openat", (OLD, NEW)), ("syscall.openat2", (NEW,))]
    assert listing.kernels == {OLD: ("a",), NEW: ("b", "c")}
    probes = listing.as_json()["probes"]
    assert isinstance(probes, list)
    assert probes[1] == {"probe": "syscall.openat", "kernels": [OLD, NEW]}


def test_a_second_listing_comes_from_the_cache(tmp_path: Path) -> None:
    stap = builder(tmp_path, {OLD: ["syscall.read"], NEW: ["syscall.read"]})
    first = list_probes("syscall.read", hosts(a=OLD, b=NEW), stap, False)
    again = list_probes("syscall.read", hosts(a=OLD, b=NEW), stap, False)
    assert again == first and len(stap_calls(tmp_path)) == 2
    with_vars = list_probes("syscall.read", hosts(a=OLD), stap, True)  # -L: its own entry
    assert [p.name for p in with_vars.points] == ["syscall.read  $fd:long"]
    assert stap_calls(tmp_path)[-1][:2] == ["-L", "syscall.read"]
    assert len(stap_calls(tmp_path)) == 3


def test_kprobe_function_is_listed_once_per_symbol_map(tmp_path: Path) -> None:
    stap = builder(tmp_path, {OLD: ['kprobe.function("vfs_read")'],
                              NEW: ['kprobe.function("vfs_read")']})
    one = stap.store_symbol_map(b"ffffffff81000000 T vfs_read\n")
    two = stap.store_symbol_map(b"ffffffff82000000 T vfs_read\n")  # another boot's KASLR
    fleet = hosts(a=OLD, b=OLD, c=NEW, d=NEW)
    fleet["a"] = (fleet["a"][0], HostFacts(OLD, "x86_64", symbol_map=one))
    fleet["b"] = (fleet["b"][0], HostFacts(OLD, "x86_64", symbol_map=one))
    fleet["c"] = (fleet["c"][0], HostFacts(NEW, "x86_64", symbol_map=two))
    fleet["d"] = (fleet["d"][0], HostFacts(NEW, "x86_64", symbol_map_error="kptr hidden"))
    listing = list_probes('kprobe.function("vfs_*")', fleet, stap, False)
    trees = sorted(call[3] for call in stap_calls(tmp_path))
    assert len(trees) == 2 and all((Path(t) / "System.map").is_file() for t in trees)
    assert [(p.name, p.kernels) for p in listing.points] == [
        ('kprobe.function("vfs_read")', (OLD, NEW))]
    assert listing.kernels == {OLD: ("a", "b"), NEW: ("c",)}
    assert "kptr hidden" in listing.skipped["d"]


def test_nothing_matching_is_an_empty_listing(tmp_path: Path) -> None:
    stap = builder(tmp_path, {OLD: [], NEW: []})
    listing = list_probes("nosuch.point", hosts(a=OLD), stap, False)
    assert listing.points == () and listing.kernels == {OLD: ("a",)}


def test_a_pattern_stap_rejects_is_one_line(tmp_path: Path) -> None:
    stap = builder(tmp_path, {OLD: ["x"]})
    with pytest.raises(UsageError) as error:
        list_probes('kernel.trace("sched:*"', hosts(a=OLD), stap, False)
    assert error.value.exit_code == 2
    assert str(error.value) == ("stap cannot list the probe pattern 'kernel.trace(\"sched:*\"':"
                                " parse error: expected literal string or number")
    assert not list((tmp_path / "cache" / "listings").glob("*.json"))  # nothing kept


@pytest.mark.parametrize("pattern", ["", "  ", "syscall.* { exit() }", "a\nb", "x" * 1001])
def test_what_is_not_one_probe_point_is_refused_before_any_host(pattern: str) -> None:
    with pytest.raises(UsageError):
        check_pattern(pattern)


def test_a_typo_in_the_pattern_is_told_by_stap_parser() -> None:
    """The real stap's parser (pass 1: no kernel, no host)."""
    with pytest.raises(UsageError) as error:
        check_pattern('kernel.trace("sched:*"')
    assert str(error.value) == ("stap cannot parse the probe pattern "
                                "'kernel.trace(\"sched:*\"': parse error: expected ')'")
    assert check_pattern(' kprobe.function("vfs_*") ') == 'kprobe.function("vfs_*")'


def test_a_kernel_without_headers_here_skips_its_hosts_only(tmp_path: Path) -> None:
    stap = builder(tmp_path, {OLD: ["syscall.read"]})
    listing = list_probes("syscall.read", hosts(a=OLD, b="9.9.9-nosuch"), stap, False)
    assert [(p.name, p.kernels) for p in listing.points] == [("syscall.read", (OLD,))]
    assert listing.kernels == {OLD: ("a",)}
    assert "no kernel headers for 9.9.9-nosuch" in listing.skipped["b"]
