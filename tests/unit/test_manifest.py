"""Good paths of manifest loading, and the pieces it is made of."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from stapctl import schema as schema_module
from stapctl.errors import ManifestError
from stapctl.manifest import (
    check_stap_option,
    explain,
    load_manifest,
    parse_duration,
    parse_percentage,
)
from stapctl.models import InlineGroup, InlineInventory, Percent, Strategy
from stapctl.render import render_script
from stapctl.schema import load_schema
from stapctl.yamldoc import parse_yaml

pytestmark = pytest.mark.unit

PLAYBOOKS = Path(__file__).parents[2] / "playbooks"

CONTRACT_EXAMPLE = """\
apiVersion: stapctl/v1
kind: Trace
name: openat-latency
description: Slow openat calls

inventory: inventory.ini
hosts: webservers:!canary

vars:
  threshold_us: 500

probes:
  - name: slow-openat
    script: |
      global t
      probe syscall.openat { t[tid()] = gettimeofday_us() }
      probe syscall.openat.return {
        d = gettimeofday_us() - t[tid()]; delete t[tid()]
        if (d > {{ threshold_us }}) printf("%s %d\\n", execname(), d)
      }
    duration: 30s
    params: {limit: 100}
    stap_options: ["-DMAXACTION=20000"]
    guru: false

strategy:
  forks: 50
  serial: [1, "25%", "100%"]
  max_fail_percentage: 20
  connect_timeout: 10s
  timeout: 5m

become: true

output:
  format: prefix
  dir: runs
"""

MINIMAL = """\
apiVersion: stapctl/v1
kind: Trace
name: tiny
probes:
  - name: p
    script: probe oneshot { exit() }
"""


def write(directory: Path, text: str, name: str = "trace.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_the_contract_example_loads(tmp_path: Path) -> None:
    (tmp_path / "inventory.ini").write_text("[webservers]\nweb1\n")
    manifest = load_manifest(write(tmp_path, CONTRACT_EXAMPLE))
    assert manifest.name == "openat-latency"
    assert manifest.description == "Slow openat calls"
    assert manifest.inventory == tmp_path / "inventory.ini"
    assert manifest.hosts == "webservers:!canary"
    assert manifest.vars == {"threshold_us": 500}
    assert manifest.become is True
    assert manifest.strategy == Strategy(forks=50, serial=(1, Percent(25), Percent(100)),
                                         max_fail_percentage=20, connect_timeout=10.0,
                                         timeout=300.0)
    assert manifest.output.format == "prefix"
    assert manifest.output.dir == tmp_path / "runs"
    (probe,) = manifest.probes
    assert probe.name == "slow-openat"
    assert probe.template.startswith("global t\nprobe syscall.openat")
    assert probe.origin == str(tmp_path / "trace.yaml")
    assert probe.first_line == 15  # the line after `script: |`
    assert probe.duration == 30.0
    assert probe.params == {"limit": 100}
    assert probe.stap_options == ("-DMAXACTION=20000",)
    assert probe.guru is False


def test_defaults_of_a_minimal_manifest(tmp_path: Path) -> None:
    manifest = load_manifest(write(tmp_path, MINIMAL))
    assert manifest.inventory is None
    assert manifest.hosts == "all"
    assert manifest.vars == {}
    assert manifest.strategy == Strategy()
    assert manifest.become is False
    assert manifest.output.format == "prefix" and manifest.output.dir is None
    assert manifest.probes[0].first_line == 6  # a plain scalar starts on its key's line
    assert manifest.probes[0].duration is None


def test_a_script_file_is_read_relative_to_the_manifest(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "count.stp").write_text("probe begin { exit() }\n")
    text = MINIMAL.replace("script: probe oneshot { exit() }", "file: scripts/count.stp")
    manifest = load_manifest(write(tmp_path, text))
    probe = manifest.probes[0]
    assert probe.template == "probe begin { exit() }\n"
    assert probe.origin == str(tmp_path / "scripts" / "count.stp")
    assert probe.first_line == 1


def test_an_inline_inventory_becomes_a_typed_value(tmp_path: Path) -> None:
    text = MINIMAL + ("inventory:\n  hosts: {web1: {address: 10.0.0.5, port: 2222}}\n"
                      "  groups: {web: {hosts: [web1]}}\n  vars: {x: 1}\n")
    manifest = load_manifest(write(tmp_path, text))
    assert isinstance(manifest.inventory, InlineInventory)
    assert manifest.inventory.hosts == {"web1": {"ansible_host": "10.0.0.5",
                                                 "ansible_port": 2222}}
    assert manifest.inventory.groups["web"] == InlineGroup(hosts=("web1",))
    assert manifest.inventory.groups["all"].vars == {"x": 1}


def test_the_manifest_keeps_the_document_it_was_read_from(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    manifest = load_manifest(path)
    assert manifest.document is not None and manifest.document.file == str(path)
    assert manifest.document.values[("name",)] == (3, 7)
    path.unlink()  # nothing reads the file again to locate a problem
    assert manifest.document.position(("probes", 0, "name")) is not None
    assert manifest == load_manifest(write(tmp_path, MINIMAL + "\n"))  # not compared


def test_a_single_serial_value_becomes_one_batch_size(tmp_path: Path) -> None:
    manifest = load_manifest(write(tmp_path, MINIMAL + "strategy:\n  serial: 30%\n"))
    assert manifest.strategy.serial == (Percent(30),)
    assert manifest.strategy.serial[0].of(10) == 3


def test_keys_are_kept_as_written(tmp_path: Path) -> None:
    manifest = load_manifest(write(tmp_path, MINIMAL + "vars:\n  on: 1\n  'no': 2\n"))
    assert manifest.vars == {"on": 1, "no": 2}


def test_positions_of_keys_and_values() -> None:
    doc = parse_yaml("a:\n  b: [1, {c: x}]\n  d: |\n    text\n", "f.yaml")
    assert doc.position(("a", "b", 1, "c")) == (2, 14)
    assert doc.position(("a", "b", 1, "c"), of_key=True) == (2, 11)
    assert doc.position(("a", "missing")) == (2, 3)  # the nearest written parent
    assert doc.block_starts[("a", "d")] == 4


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30.0), ("500ms", 0.5), ("5m", 300.0), ("1h", 3600.0), ("10", 10.0),
    ("1.5s", 1.5), (2, 2.0), (0.25, 0.25),
])
def test_durations(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "-1s", "1d", "30 s", "0", 0, "0ms", True, None,
                                  float("inf"), float("nan"), [1]])
def test_bad_durations(text: Any) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_the_schema_and_the_parser_agree_on_durations() -> None:
    pattern = load_schema("manifest.schema.json")["$defs"]["duration"]["pattern"]
    for text in ["30s", "500ms", "5m", "1h", "10", "1.5s", "1d", "s", "1.s", "30 s"]:
        try:
            parse_duration(text)
            parsed = True
        except ValueError:
            parsed = False
        assert parsed == bool(re.fullmatch(pattern, text)), text


@pytest.mark.parametrize(("text", "percent"), [("25%", 25.0), ("100%", 100.0), ("0.5%", 0.5)])
def test_percentages(text: str, percent: float) -> None:
    assert parse_percentage(text) == Percent(percent)


@pytest.mark.parametrize("text", ["0%", "101%", "25", "%", "-5%", "abc%"])
def test_bad_percentages(text: str) -> None:
    with pytest.raises(ValueError, match="percentage"):
        parse_percentage(text)


@pytest.mark.parametrize(("option", "argv_item"), [
    ("-DMAXACTION=20000", "-DMAXACTION=20000"),
    ("-D MAXACTION=20000", "-DMAXACTION=20000"),
    ("-DSTP_NO_OVERLOAD", "-DSTP_NO_OVERLOAD"),
    ("-DMAXSKIPPED=-1", "-DMAXSKIPPED=-1"),
    ("-b", "-b"), ("-t", "-t"), ("-u", "-u"), ("-w", "-w"), ("--skip-badvars", "--skip-badvars"),
    ("--suppress-handler-errors", "--suppress-handler-errors"),
    ("--suppress-time-limits", "--suppress-time-limits"),
])
def test_allowed_stap_options(option: str, argv_item: str) -> None:
    assert check_stap_option(option, guru=False) == argv_item


@pytest.mark.parametrize("option", ["-o", "-ofile", "-e", "-R", "-r6.1", "-p4", "-m", "-c",
                                    "-x", "--remote", "-B", "-I", "-S", "-D", "-DX=a b",
                                    "-DX=`id`", "-b -o x", "-t;id", "--vp=00001", "", "-g"])
def test_refused_stap_options(option: str) -> None:
    with pytest.raises(ValueError):
        check_stap_option(option, guru=False)


def test_guru_mode_must_be_asked_for() -> None:
    assert check_stap_option("-g", guru=True) == "-g"


def test_explain_a_nested_key() -> None:
    text = explain("strategy.serial")
    assert text.startswith("strategy.serial: Rolling batches")


def test_explain_a_probe_key_with_or_without_an_index() -> None:
    assert explain("probes.duration") == explain("probes.0.duration")
    assert "after this long" in explain("probes.duration")


def test_explain_lists_the_keys_below() -> None:
    text = explain("strategy")
    for key in ("forks", "serial", "max_fail_percentage", "connect_timeout", "timeout"):
        assert f"\n  {key}: " in text


def test_explain_follows_into_the_inline_inventory() -> None:
    assert "SSH port" in explain("inventory.hosts.web1.port")
    assert "\n  children: " in explain("inventory.groups.web")


def test_explain_an_unknown_key_suggests_one() -> None:
    with pytest.raises(ManifestError, match="did you mean 'serial'"):
        explain("strategy.seriall")


def _object_schemas(node: Any, where: str) -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        if "properties" in node:
            found.append((where, node))
        for key, value in node.items():
            found += _object_schemas(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _object_schemas(value, f"{where}/{index}")
    return found


@pytest.mark.parametrize("name", ["manifest.schema.json", "inventory.schema.json"])
def test_schemas_are_strict_and_describe_every_key(name: str) -> None:
    for where, schema in _object_schemas(load_schema(name), name):
        assert schema.get("additionalProperties") is False, where
        for key, value in schema["properties"].items():
            assert value.get("description"), f"{where}/{key}"


def test_the_hello_playbook_is_the_seed() -> None:
    manifest = load_manifest(PLAYBOOKS / "hello.yaml")
    assert manifest.name == "hello" and manifest.inventory is None
    (probe,) = manifest.probes
    assert probe.name == "hello"
    assert render_script(probe, manifest.vars).strip() == (
        'probe oneshot { printf("hello, world!\\n") }')


@pytest.mark.parametrize("path", sorted(PLAYBOOKS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_playbook_loads_and_renders(path: Path) -> None:
    manifest = load_manifest(path)
    for probe in manifest.probes:
        script = render_script(probe, manifest.vars)
        assert "{{" not in script and "probe " in script


def test_a_manifest_found_valid_is_not_checked_again_until_it_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAPCTL_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "trace.yaml"
    path.write_text((PLAYBOOKS / "hello.yaml").read_text())
    load_manifest(path)
    assert len(list((tmp_path / "cache" / "schema-valid").iterdir())) == 1
    validator = schema_module.schema_validator

    def checked_again(name: str, definition: str | None = None) -> Any:
        raise AssertionError(f"{name} checked again")  # fault injection

    monkeypatch.setattr(schema_module, "schema_validator", checked_again)
    load_manifest(path)  # the same data: its verdict stands
    path.write_text(path.read_text() + "strategy: {seriall: 1}\n")
    with pytest.raises(AssertionError, match="checked again"):
        load_manifest(path)
    monkeypatch.setattr(schema_module, "schema_validator", validator)
    for _ in range(2):  # a violation is never kept as a verdict
        with pytest.raises(ManifestError, match="did you mean 'serial'"):
            load_manifest(path)
    assert len(list((tmp_path / "cache" / "schema-valid").iterdir())) == 1
