"""Retry the failed hosts: `--limit @RUN:failed` and `@last:failed` select the hosts a
run failed on or could not reach, kept in the run history (fake fleet, real agent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stapctl.runtime import stapctl_agent as agent

from stapctl.agent import Timing
from stapctl.errors import StapctlError, UsageError
from stapctl.execute import RunOptions
from stapctl.history import find_run
from stapctl.manifest import load_manifest
from stapctl.models import Manifest, Run
from stapctl.session import NothingToRetry, Session, select_hosts
from stapctl.store import prune_runs
from tests.agent.fakekernel import Actions, Scenario
from tests.fleet_double import FakeBuilder, FakeFleet

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("configured_history")]

HELLO_EXIT = Actions(begin=[("print", 0, b"hello\n")], running=[("request_exit",)])
HOSTS = ("good", "gone", "also-gone")


@pytest.fixture(autouse=True)
def quick_agent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(agent.Run, "startup_timeout", 2.0)
    monkeypatch.setattr(agent.ControlChannel, "open_retry", 0.2)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


def trace(tmp_path: Path, name: str = "trace") -> Manifest:
    (tmp_path / "hosts.ini").write_text("[fleet]\n" + "\n".join(HOSTS) + "\n")
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"apiVersion: stapctl/v1\nkind: Trace\nname: {name}\n"
                    "inventory: hosts.ini\nhosts: fleet\n"
                    "probes:\n  - name: p\n    script: probe oneshot { println(1) }\n")
    return load_manifest(path)


def apply(tmp_path: Path, manifest: Manifest, fleet: FakeFleet, limit: str | None = None) -> Run:
    hosts = select_hosts(manifest, limit=limit)
    return Session(manifest, hosts, options=RunOptions(timing=Timing(exit_timeout=1.0)),
                   builder=FakeBuilder(tmp_path / "cache"), connector=fleet.connect).apply()


def test_a_retry_runs_again_only_the_hosts_the_last_run_could_not_reach(
        tmp_path: Path) -> None:
    manifest = trace(tmp_path)
    fleet = FakeFleet(tmp_path, {host: Scenario(**HELLO_EXIT) for host in HOSTS},
                      unreachable=["gone", "also-gone"])
    first = apply(tmp_path, manifest, fleet)
    assert first.exit_code == 3
    summary = json.loads((Path(find_run(first.id)["dir"]) / "summary.json").read_text())
    assert summary["retry_hosts"] == ["gone", "also-gone"]

    fleet.unreachable = {"also-gone"}  # one of them is back
    second = apply(tmp_path, manifest, fleet, "@last:failed")
    assert sorted(o.host for o in second.outcomes) == ["also-gone", "gone"]
    assert {o.host: o.status for o in second.outcomes}["gone"] == "ok"
    assert fleet.order.count("good") == 1  # never connected again

    assert [h.name for h in select_hosts(manifest, limit="@last:failed")] == ["also-gone"]
    assert [h.name for h in select_hosts(manifest, limit=f"@{first.id}:failed")] == [
        "gone", "also-gone"]  # an older run by its id

    fleet.unreachable = set()
    third = apply(tmp_path, manifest, fleet, "@last:failed")
    assert [(o.host, o.status) for o in third.outcomes] == [("also-gone", "ok")]
    with pytest.raises(NothingToRetry, match=f"run {third.id} has no failed"):
        select_hosts(manifest, limit="@last:failed")
    assert NothingToRetry("").exit_code == 0


def test_last_is_the_newest_run_of_the_same_manifest(tmp_path: Path) -> None:
    manifest, other = trace(tmp_path), trace(tmp_path, "other")
    fleet = FakeFleet(tmp_path, {host: Scenario(**HELLO_EXIT) for host in HOSTS},
                      unreachable=["gone"])
    apply(tmp_path, manifest, fleet)
    fleet.unreachable = {"also-gone"}
    apply(tmp_path, other, fleet)
    assert [h.name for h in select_hosts(manifest, limit="@last:failed")] == ["gone"]
    assert [h.name for h in select_hosts(other, limit="@last:failed")] == ["also-gone"]


def test_a_retry_of_an_unknown_run_is_bad_input(tmp_path: Path) -> None:
    manifest = trace(tmp_path)
    with pytest.raises(UsageError, match="no finished run of manifest 'trace'") as caught:
        select_hosts(manifest, limit="@last:failed")
    assert caught.value.exit_code == 2
    with pytest.raises(UsageError, match="no run matches 'nosuch'"):
        select_hosts(manifest, limit="@nosuch:failed")


def test_a_failed_host_no_longer_in_the_inventory_is_named(tmp_path: Path) -> None:
    manifest = trace(tmp_path)
    fleet = FakeFleet(tmp_path, {host: Scenario(**HELLO_EXIT) for host in HOSTS},
                      unreachable=["gone"])
    first = apply(tmp_path, manifest, fleet)
    (tmp_path / "hosts.ini").write_text("[fleet]\ngood\n")
    with pytest.raises(UsageError, match=f"gone \\(failed in run {first.id}\\) is not in"):
        select_hosts(manifest, limit="@last:failed")


def test_pruning_a_run_forgets_its_failed_hosts(tmp_path: Path) -> None:
    manifest = trace(tmp_path)
    fleet = FakeFleet(tmp_path, {host: Scenario(**HELLO_EXIT) for host in HOSTS},
                      unreachable=["gone"])
    first = apply(tmp_path, manifest, fleet)
    assert prune_runs(keep=0) == [first.id]
    with pytest.raises(StapctlError, match="no finished run"):
        select_hosts(manifest, limit="@last:failed")
