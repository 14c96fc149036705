"""Rollout batches, exit codes and reports: pure code."""

from __future__ import annotations

import json

import pytest

from stapctl import report
from stapctl.execute import batches
from stapctl.models import BatchSize, Event, HostOutcome, Percent, Run

pytestmark = pytest.mark.unit

HOSTS = [f"h{i}" for i in range(10)]


@pytest.mark.parametrize(("serial", "sizes"), [
    ([Percent(100)], [10]),
    ([1, Percent(100)], [1, 9]),
    ([3], [3, 3, 3, 1]),
    ([1, Percent(25), Percent(100)], [1, 2, 7]),
    ([Percent(1)], [1] * 10),
    ([], [10]),
])
def test_serial_batches_follow_ansible(serial: list[BatchSize], sizes: list[int]) -> None:
    got = list(batches(HOSTS, serial))
    assert [len(b) for b in got] == sizes
    assert [h for b in got for h in b] == HOSTS


def outcome(host: str, status: str, kind: str | None = None) -> HostOutcome:
    return HostOutcome(host=host, probe="p", status=status, kind=kind)  # type: ignore[arg-type]


@pytest.mark.parametrize(("outcomes", "interrupted", "code"), [
    ([outcome("a", "ok"), outcome("b", "ok")], False, 0),
    ([outcome("a", "ok"), outcome("b", "failed", "runtime-error")], False, 3),
    ([outcome("a", "unreachable", "unreachable")], False, 1),
    ([outcome("a", "ok")], True, 130),
    ([outcome("a", "failed", "compile-failed")], False, 2),
    ([outcome("a", "failed", "compile-failed"), outcome("b", "unreachable", "unreachable")],
     False, 1),
    ([outcome("a", "failed", "compile-failed"), outcome("b", "ok")], False, 3),
])
def test_exit_codes(outcomes: list[HostOutcome], interrupted: bool, code: int) -> None:
    assert Run("r", tuple(outcomes), interrupted).exit_code == code


def test_json_lines_parse_and_carry_the_schema_version() -> None:
    line = report.event_json(Event("a", "output", "p", "hello", 1.5))
    assert json.loads(line) == {"v": 1, "type": "event", "host": "a", "kind": "output",
                                "probe": "p", "text": "hello", "time": 1.5}
    summary = json.loads(report.summary_json(Run("r", (outcome("a", "ok"),))))
    assert summary["exit_code"] == 0 and summary["outcomes"][0]["host"] == "a"


def test_summary_counts_by_reason() -> None:
    outcomes = [outcome("a", "ok"), outcome("b", "failed", "runtime-error"),
                outcome("c", "unreachable", "unreachable")]
    assert report.summary_counts(outcomes) == "1 ok, 1 runtime-error, 1 unreachable"
    assert report.summary_rows(outcomes)[-1][0] == "a"


def test_the_agents_failure_kinds_are_the_first_failure_kinds() -> None:
    from stapctl.runtime import stapctl_agent as wire

    from stapctl.models import FailureKind

    assert tuple(kind.value for kind in FailureKind)[:len(wire.KINDS)] == wire.KINDS
    assert FailureKind.from_agent("no such kind") is FailureKind.AGENT_ERROR
