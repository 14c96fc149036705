"""`stapctl run`: the manifest an ad-hoc run amounts to, its record and export, script
arguments in the module's cache key, and remote_id()/remote_uri() sent to each host (the
runs go through the Session against tests/fleet_double's fake hosts: test doubles, no SSH
or qemu)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from stapctl.runtime import stapctl_agent as agent

from stapctl.adhoc import AdhocRun, adhoc_manifest
from stapctl.agent import Timing
from stapctl.cli import cli
from stapctl.compiler import check_syntax
from stapctl.errors import CompileError, UsageError
from stapctl.execute import RunOptions, remote_uri
from stapctl.manifest import load_manifest
from stapctl.models import Host, HostFacts, ModuleSpec
from stapctl.plan import make_plan
from stapctl.session import Session
from tests.agent.fakekernel import Actions, Scenario
from tests.fleet_double import FakeBuilder, FakeFleet

pytestmark = pytest.mark.unit

HELLO_EXIT = Actions(begin=[("print", 0, b"hello\n")], running=[("request_exit",)])
ONE_LINER = 'probe oneshot { printf("%d %s\\n", remote_id(), @1) }'


@pytest.fixture(autouse=True)
def own_folders(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run records and ad-hoc manifests in the test's folder; the agent's waits short."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("STAPCTL_LAB_DIR", str(tmp_path / "lab"))
    monkeypatch.setattr(agent.Run, "startup_timeout", 2.0)
    monkeypatch.setattr(agent.ControlChannel, "open_retry", 0.2)


def test_the_manifest_of_a_one_liner_holds_every_option(tmp_path: Path) -> None:
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[web]\nweb1 ansible_host=192.0.2.1\n")
    manifest = adhoc_manifest(AdhocRun(
        hosts="web", script=ONE_LINER, args=("hello", "-5"), variables={"port": 80},
        duration="30s", forks=7, format="merged", inventory=inventory))

    assert manifest.name == "adhoc" and manifest.hosts == "web"
    assert manifest.inventory == inventory.resolve()
    assert manifest.vars == {"port": 80}
    assert manifest.strategy.forks == 7 and manifest.output.format == "merged"
    [probe] = manifest.probes
    assert probe.template == ONE_LINER and probe.args == ("hello", "-5")
    assert probe.duration == 30.0
    assert manifest.path.is_file() and manifest.path.is_relative_to(tmp_path / "data")
    assert load_manifest(manifest.path).probes == manifest.probes  # a manifest like any


def test_a_script_file_is_inlined_and_names_the_run(tmp_path: Path) -> None:
    script = tmp_path / "Slow_Opens.stp"
    script.write_text("probe oneshot {\n  println(@1)\n}\n")
    manifest = adhoc_manifest(AdhocRun(hosts="all", script_file=script, args=("x",)))
    assert manifest.name == "slow-opens"
    assert manifest.probes[0].template == script.read_text()
    assert "println(@1)" in manifest.path.read_text()


@pytest.mark.parametrize(("run", "fragment"), [
    (AdhocRun(hosts="all"), "no script: give one with -e"),
    (AdhocRun(hosts="all", script="  "), "the script is empty"),
    (AdhocRun(hosts="all", script_file=Path("/nonexistent/x.stp")), "file not found"),
    (AdhocRun(hosts="all", script=ONE_LINER, args=("a\nb",)), "NUL or a line break"),
    (AdhocRun(hosts="all", script=ONE_LINER, args=("a\0b",)), "NUL or a line break"),
    (AdhocRun(hosts="all", script=ONE_LINER, args=("x" * 1025,)), "at most 1024"),
    (AdhocRun(hosts="all", script=ONE_LINER, args=("1",) * 33), "at most 32"),
])
def test_bad_ad_hoc_input_is_refused(run: AdhocRun, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment) as caught:
        adhoc_manifest(run)
    assert caught.value.exit_code == 2


def stapctl(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"),
               STAPCTL_LAB_DIR=str(tmp_path / "lab"))
    return subprocess.run([sys.executable, "-m", "stapctl", *args], capture_output=True,
                          text=True, check=False, env=env)


@pytest.mark.parametrize(("args", "fragment"), [
    (["run", "all"], "error: no script: give one with -e"),
    (["run", "all", "missing.stp"], "error: script file 'missing.stp': file not found"),
    (["run", "all", "-e", ONE_LINER, "--", "a\nb"], "script argument 1 contains a NUL"),
    (["run", "all", "-e", ONE_LINER, "--var", "no-equals"], "expected KEY=VALUE"),
    (["run", "all", "-e", ONE_LINER, "--duration", "soon"], "expected a duration"),
    (["run", "all", "-e", ONE_LINER], "no inventory: pass -i INVENTORY"),
])
def test_bad_command_lines_are_one_line_and_exit_2(tmp_path: Path, args: list[str],
                                                   fragment: str) -> None:
    result = stapctl(tmp_path, *args)
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def run_adhoc(tmp_path: Path, fleet: FakeFleet, run: AdhocRun) -> Session:
    session = Session(adhoc_manifest(run), fleet.hosts(),
                      options=RunOptions(timing=Timing(exit_timeout=1.0)),
                      builder=FakeBuilder(tmp_path / "cache"), connector=fleet.connect)
    session.apply()
    return session


def test_an_ad_hoc_run_is_recorded_and_exported_as_a_manifest_apply_takes(
        tmp_path: Path) -> None:
    fleet = FakeFleet(tmp_path / "fleet", {"h0": Scenario(**HELLO_EXIT)})
    session = run_adhoc(tmp_path, fleet, AdhocRun(hosts="all", script=ONE_LINER,
                                                  args=("hello",), duration="5s"))
    assert [o.ok for o in session.outcomes] == [True]
    assert session.recorder is not None
    recorded = session.recorder.dir / "manifest.yaml"
    assert recorded.read_text() == session.manifest.path.read_text()

    exported = CliRunner().invoke(cli, ["runs", "export", session.run_id])
    assert exported.exit_code == 0, exported.output
    kept = tmp_path / "elsewhere" / "trace.yaml"
    kept.parent.mkdir()
    kept.write_text(exported.output)
    again = load_manifest(kept)
    assert again.probes[0].template == ONE_LINER
    assert again.probes[0].args == ("hello",) and again.probes[0].duration == 5.0
    assert again.name == session.manifest.name


def test_runs_export_of_an_unknown_run_is_one_line(tmp_path: Path) -> None:
    result = stapctl(tmp_path, "runs", "export", "nosuchrun")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_script_arguments_are_part_of_the_cache_key(tmp_path: Path) -> None:
    plain = ModuleSpec(script="probe oneshot { println(@1) }", release="6.1", arch="x86_64")
    with_args = ModuleSpec(script=plain.script, release="6.1", arch="x86_64", args=("a",))
    other = ModuleSpec(script=plain.script, release="6.1", arch="x86_64", args=("b",))
    split = ModuleSpec(script=plain.script, release="6.1", arch="x86_64", args=("a", "b"))
    assert len({plain.key, with_args.key, other.key, split.key}) == 4

    builder = FakeBuilder(tmp_path / "cache")
    hosts = {"h0": (Host(name="h0", address="h0"), HostFacts(release="6.1", arch="x86_64"))}
    keys = set()
    for args in (("a",), ("b",)):
        manifest = adhoc_manifest(AdhocRun(hosts="all", script=plain.script, args=args))
        [job] = make_plan(manifest, hosts, builder, {}).jobs
        assert job.spec.args == args
        keys.add(job.spec.key)
    assert len(keys) == 2


def test_stap_is_given_the_script_arguments() -> None:
    script = "probe oneshot { printf(\"%s %d\\n\", @1, $2) }"
    with pytest.raises(CompileError, match="cannot parse"):
        check_syntax(script, "x.stp", 1)
    check_syntax(script, "x.stp", 1, ("-hello", "-5"))  # after `--`: the script's own


def test_each_host_is_sent_its_index_and_uri(tmp_path: Path) -> None:
    names = ["h0", "h1", "h2"]
    fleet = FakeFleet(tmp_path / "fleet", {name: Scenario(**HELLO_EXIT) for name in names})
    session = run_adhoc(tmp_path, fleet, AdhocRun(hosts="all", script=ONE_LINER,
                                                  args=("x",)))
    assert all(o.ok for o in session.outcomes)
    for index, name in enumerate(names):
        [module] = fleet.kernels[name].history
        sent = [payload for kind, payload in module.received if kind == "REMOTE_ID"]
        assert len(sent) == 1, module.received
        remote_id, uri = agent.REMOTE_ID.unpack(sent[0])
        assert remote_id == index
        assert uri.rstrip(b"\0").decode() == f"ssh://{name}:22"


def test_remote_uri_names_the_user_port_and_local_hosts() -> None:
    assert remote_uri(Host(name="a", address="10.0.0.1", port=2222, user="ops")) \
        == "ssh://ops@10.0.0.1:2222"
    assert remote_uri(Host(name="b", address="::1")) == "ssh://[::1]:22"
    assert remote_uri(Host(name="c", address="local")) == "local://"
