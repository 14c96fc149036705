"""The live fleet view: host sets folded, lines grouped as they come, the diff."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from stapctl import report
from stapctl.report import LineGroups, fold_hosts
from stapctl.store import diff_output, host_log_path


def expand(folded: str) -> set[str]:
    """The inverse of fold_hosts, as clush reads a node set (for the property test)."""
    hosts: set[str] = set()
    for part in re.findall(r"[^,\[]*\[[^\]]*\][^,\[]*|[^,\[]+", folded):
        match = re.fullmatch(r"(.*)\[(.*)\](.*)", part)
        if match is None:
            hosts.add(part)
            continue
        for span in match[2].split(","):
            first, _, last = span.partition("-")
            width = len(first) if first.startswith("0") and len(first) > 1 else 0
            for number in range(int(first), int(last or first) + 1):
                hosts.add(f"{match[1]}{str(number).zfill(width)}{match[3]}")
    return hosts


def test_folding_makes_ranges_of_consecutive_numbers() -> None:
    assert fold_hosts(["web3", "web1", "web2", "web7"]) == "web[1-3,7]"
    assert fold_hosts(["lab-1", "lab-2", "lab-3", "db"]) == "db,lab-[1-3]"
    assert fold_hosts(["web1"]) == "web1"
    assert fold_hosts(["web1", "web1"]) == "web1"


def test_folding_keeps_zero_padding_and_suffixes() -> None:
    assert fold_hosts(["web08", "web09", "web10"]) == "web[08-10]"
    assert fold_hosts(["web9", "web10", "web011"]) == "web[9-10,011]"
    assert fold_hosts(["n1.dc2", "n2.dc2", "n1.dc3"]) == "n1.dc[2-3],n2.dc2"
    assert fold_hosts(["a1b", "a2b", "a1c"]) == "a1c,a[1-2]b"


NAMES = st.text(alphabet="ab-.019", min_size=1, max_size=6)


@given(st.sets(NAMES, min_size=1, max_size=30))
def test_fold_then_expand_gives_the_same_hosts(hosts: set[str]) -> None:
    assert expand(fold_hosts(hosts)) == hosts


def test_a_line_printed_by_several_hosts_in_a_moment_is_shown_once() -> None:
    groups = LineGroups(window=1.0, room=100, hosts=["web1", "web2", "web3", "a", "b", "c"])
    assert groups.add("web1", "p", "GET /", 0.0) == []
    assert groups.add("web2", "p", "GET /", 0.3) == []
    assert groups.add("web3", "p", "POST /", 0.5) == []
    assert groups.due(0.9) == []
    assert groups.due(1.0) == [("web[1-2]", "p", "GET /")]
    assert groups.add("web3", "p", "GET /", 1.2) == []
    assert groups.due(1.5) == [("web3", "p", "POST /")]
    assert groups.flush() == [("web3", "p", "GET /")]


def test_each_host_keeps_the_order_of_its_lines() -> None:
    groups = LineGroups(window=1.0, room=100, hosts=["web1", "web2", "web3", "a", "b", "c"])
    groups.add("a", "p", "x", 0.0)
    groups.add("b", "p", "y", 0.1)
    groups.add("a", "p", "y", 0.2)  # joins b's y: held after a's x
    groups.add("b", "p", "x", 0.3)  # cannot join a's x: b's y is held after it
    groups.add("a", "p", "x", 0.4)  # a repeat: a line of its own
    assert groups.flush() == [("a", "p", "x"), ("a,b", "p", "y"), ("a,b", "p", "x")]


def test_a_line_every_running_host_printed_is_shown_at_once() -> None:
    groups = LineGroups(window=10.0, room=100, hosts=["a", "b", "c"])
    assert groups.add("a", "p", "x", 0.0) == []
    assert groups.add("b", "p", "x", 0.1) == []
    assert groups.add("c", "p", "x", 0.2) == [("a,b,c", "p", "x")]
    assert groups.add("a", "p", "y", 0.3) == []
    assert groups.add("b", "p", "y", 0.4) == []
    assert groups.ended("c", 0.5) == [("a,b", "p", "y")]  # c prints no more


def test_lines_of_other_probes_are_other_groups() -> None:
    groups = LineGroups(window=1.0, room=100, hosts=["web1", "web2", "web3", "a", "b", "c"])
    groups.add("a", "one", "x", 0.0)
    groups.add("b", "two", "x", 0.0)
    assert groups.flush() == [("a", "one", "x"), ("b", "two", "x")]


def test_held_lines_are_bounded() -> None:
    groups = LineGroups(window=60.0, room=3, hosts=["a", "b"])
    shown = [group for n in range(10) for group in groups.add("a", "p", str(n), 0.0)]
    assert [line for _, _, line in shown] == [str(n) for n in range(7)]
    assert len(groups.held) == 3
    assert len(groups.newest) == 3


def test_grouped_lines_are_escaped() -> None:
    line = report.grouped_line("web[1-2]", "p", "\x1b]0;owned\x07[bold]x", False)
    assert line == "web[1-2]: \\x1b]0;owned\\x07[bold]x"
    assert report.grouped_line("web1", "p", "x", True) == "web1 [p]: x"


def write_logs(folder: Path, outputs: dict[str, list[str]]) -> None:
    for host, lines in outputs.items():
        path = host_log_path(folder, host)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{line}\n" for line in lines))


def test_diff_shows_only_the_hosts_that_differ_from_the_majority(tmp_path: Path) -> None:
    same = ["start", "openat 12", "end"]
    write_logs(tmp_path, {"web1": same, "web2": same, "web3": same,
                          "web4": ["start", "openat 99", "end"], "web5": same})
    lines = list(diff_output(tmp_path, ["web1", "web2", "web3", "web4", "web5", "web6"],
                             False))
    assert lines[:2] == ["--- web[1-3,5]", "+++ web4"]
    assert "-openat 12" in lines and "+openat 99" in lines
    # web6 printed nothing: it differs too, as an empty output
    assert "+++ web6" in lines
    assert lines[lines.index("+++ web6") + 2:] == ["-start", "-openat 12", "-end"]


def test_diff_of_a_uniform_fleet_is_empty(tmp_path: Path) -> None:
    write_logs(tmp_path, {"a1": ["x"], "a2": ["x"]})
    assert list(diff_output(tmp_path, ["a1", "a2"], False)) == []


def test_diff_escapes_what_targets_printed(tmp_path: Path) -> None:
    write_logs(tmp_path, {"a1": ["x"], "a2": ["x"], "a3": ["\x1b[2Jevil"]})
    lines = list(diff_output(tmp_path, ["a1", "a2", "a3"], False))
    assert "+\\x1b[2Jevil" in lines
    assert not any("\x1b" in line for line in lines)
