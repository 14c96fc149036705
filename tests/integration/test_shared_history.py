"""A history shared in a real PostgreSQL server: several controllers (processes with host
names and data folders of their own) applying at once against real loopback sshd
targets, `runs list/show/diff` from another machine's point of view, and a server that
is down or refuses the login."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from stapctl import history
from tests.loopback_sshd import Sshds, free_port, start_sshds
from tests.postgres_server import PASSWORD, PostgresServer

pytestmark = pytest.mark.integration

CONTROLLERS = 4
RUNS_EACH = 2


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshds]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("the controllers get host names of their own (unshare --uts): as root")
    servers = start_sshds(tmp_path_factory.mktemp("sshd"), 2)
    yield servers
    servers.stop()


def write_fleet(folder: Path, sshds: Sshds) -> tuple[Path, Path]:
    """An inventory of two real sshd targets and one that refuses, and a manifest whose
    probe fails to compile on any machine: each run connects, then fails quickly."""
    hosts: dict[str, dict[str, object]] = {
        f"ssh-{index}": {"ansible_host": "127.0.0.1", "ansible_port": port,
                         "ansible_user": "root",
                         "ansible_ssh_private_key_file": str(sshds.client_key)}
        for index, port in enumerate(sshds.ports)}
    hosts["refused"] = {"ansible_host": "127.0.0.1", "ansible_port": 1}
    inventory = folder / "hosts.yaml"
    inventory.write_text(yaml.safe_dump({"all": {"hosts": hosts}}))
    manifest = folder / "audit.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "stapctl/v1", "kind": "Trace", "name": "shared-audit",
        "probes": [{"name": "hello", "script": 'probe oneshot { println("unclosed" }'}]}))
    return inventory, manifest


def stapctl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stapctl", *args], capture_output=True,
                          text=True, check=False, env=env, timeout=300)


def controller_env(folder: Path, url: str) -> dict[str, str]:
    return {**os.environ, "XDG_DATA_HOME": str(folder / "data"), "STAPCTL_HISTORY": url}


def test_controllers_record_concurrently_into_one_history(
        tmp_path: Path, targets: Sshds, postgres: PostgresServer) -> None:
    url = postgres.new_database()  # empty: the controllers race to create the schema too
    inventory, manifest = write_fleet(tmp_path, targets)
    applies = " ; ".join(
        f"{sys.executable} -m stapctl apply --check --accept-new-host-keys --baseline last "
        f"-i {inventory} {manifest} >/dev/null 2>&1" for _ in range(RUNS_EACH))
    controllers = {f"controller-{number}": tmp_path / f"controller-{number}"
                   for number in range(CONTROLLERS)}
    processes = [
        subprocess.Popen(["unshare", "--uts", "sh", "-c", f'hostname "$0" && {applies}', name],
                         env=controller_env(folder, url))
        for name, folder in controllers.items()]
    codes = [process.wait(timeout=600) for process in processes]
    assert codes == [1] * CONTROLLERS  # each one's last apply: every host failed

    rows = history.list_runs(100, url)
    assert len(rows) == CONTROLLERS * RUNS_EACH
    assert {name: sum(row["controller"] == name for row in rows) for name in controllers} == \
        dict.fromkeys(controllers, RUNS_EACH)
    for row in rows:
        folder = Path(row["dir"])
        assert folder.is_relative_to(controllers[row["controller"]])
        summary = json.loads((folder / "summary.json").read_text())
        assert (row["exit_code"], row["hosts"], row["ok"], row["failed"]) == (
            summary["exit_code"], 3, 0, 3)
        assert history.failed_hosts(row["id"], "shared-audit", url) == (
            row["id"], summary["retry_hosts"])
        assert sorted(summary["retry_hosts"]) == ["refused", "ssh-0", "ssh-1"]

    # from this machine: every controller's runs, by the same commands
    here = controller_env(tmp_path / "here", url)
    listed = stapctl("runs", "list", "-n", "100", "--json", env=here)
    assert listed.returncode == 0, listed.stderr
    assert sorted(run["id"] for run in json.loads(listed.stdout)) == sorted(
        row["id"] for row in rows)
    table = stapctl("runs", "list", "-n", "100", env=here)
    assert all(name in table.stdout for name in controllers)

    mine = sorted((row for row in rows if row["controller"] == "controller-0"),
                  key=lambda row: row["started"])
    shown = stapctl("runs", "show", mine[0]["id"], env=here)
    assert shown.returncode == 0 and "hello" in shown.stdout  # its folder is reachable
    compared = stapctl("runs", "diff", mine[0]["id"], mine[1]["id"], env=here)
    assert compared.returncode == 0, compared.stderr  # both failed alike: no difference

    shutil.rmtree(controllers["controller-0"])  # as if it were another machine's disk
    remote = stapctl("runs", "show", mine[0]["id"], env=here)
    assert remote.returncode == 0, remote.stderr
    assert f"exit {mine[0]['exit_code']}  hosts 3  ok 0  failed 3" in remote.stderr
    assert (f"recorded by the controller controller-0: its folder {mine[0]['dir']} is on "
            "that machine, not on this one") in remote.stderr
    for command in (("runs", "show", mine[0]["id"], "--host", "ssh-0"),
                    ("runs", "diff", mine[0]["id"], mine[1]["id"]),
                    ("runs", "export", mine[0]["id"])):
        refused = stapctl(*command, env=here)
        assert refused.returncode == 2, command
        assert "controller-0" in refused.stderr and "Traceback" not in refused.stderr, command
    as_json = json.loads(stapctl("runs", "show", mine[0]["id"], "--json", env=here).stdout)
    assert (as_json["controller"], as_json["exit_code"]) == ("controller-0",
                                                            mine[0]["exit_code"])

    pruned = stapctl("runs", "prune", "--keep", "0", env=here)  # none of them is this one's
    assert pruned.returncode == 0 and "removed 0 run(s)" in pruned.stderr
    assert len(history.list_runs(100, url)) == CONTROLLERS * RUNS_EACH


@pytest.mark.parametrize("trouble", ["server down", "wrong password"])
def test_an_unusable_history_is_a_clear_error_and_never_fails_a_run(
        tmp_path: Path, targets: Sshds, postgres: PostgresServer, trouble: str) -> None:
    if trouble == "server down":
        url = f"postgresql://stapctl:{PASSWORD}@127.0.0.1:{free_port()}/history"
        reason = "Connection refused"
    else:
        url = postgres.new_database().replace(PASSWORD, "not-the-password")
        reason = 'password authentication failed for user "stapctl"'
    env = controller_env(tmp_path, url)

    listed = stapctl("runs", "list", env=env)
    assert listed.returncode == 1 and "Traceback" not in listed.stderr
    assert listed.stderr.startswith("error: cannot use the run history postgresql://stapctl:"
                                    "***@127.0.0.1:"), listed.stderr
    assert reason in listed.stderr and len(listed.stderr.strip().splitlines()) == 1
    assert "not-the-password" not in listed.stderr and PASSWORD not in listed.stderr

    inventory, manifest = write_fleet(tmp_path, targets)
    applied = stapctl("apply", "--check", "--accept-new-host-keys", "--baseline", "last",
                      "-i", str(inventory), str(manifest), env=env)
    assert applied.returncode == 1 and "Traceback" not in applied.stderr  # as with a history
    assert "not compared with a baseline: cannot use the run history" in applied.stderr
    for step in ("add the run to", "finish the run in"):
        [warning] = [line for line in applied.stderr.splitlines()
                     if f"cannot {step} the history: " in line]
        assert reason in warning
    [folder] = (tmp_path / "data" / "stapctl" / "runs").iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["exit_code"] == 1 and len(summary["outcomes"]) == 3
