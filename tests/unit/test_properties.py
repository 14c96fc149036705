"""Whatever a manifest or inventory holds, loading it either works or raises ManifestError."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stapctl.errors import ManifestError
from stapctl.inventory import address_problem, host_vars, load_inventory
from stapctl.manifest import load_manifest
from stapctl.models import InlineInventory
from stapctl.render import render_script
from stapctl.yamldoc import Document

pytestmark = pytest.mark.unit

KEYS = ["apiVersion", "kind", "name", "description", "inventory", "hosts", "vars", "probes",
        "strategy", "become", "output", "script", "file", "duration", "params", "stap_options",
        "guru", "forks", "serial", "max_fail_percentage", "connect_timeout", "timeout",
        "format", "dir", "groups", "address", "port", "user", "children"]
SOME_VALUES = ["stapctl/v1", "Trace", "p", "30s", "25%", "-DX=1", "-g", "probe oneshot {}",
               "{{ x }}", "{% if %}", "prefix", ".", "..", "/", "nope.ini", "", "0s", "1e999"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(),
    st.sampled_from(SOME_VALUES), st.text(max_size=20),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=12))
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(keys, children, max_size=5)),
    max_leaves=25,
)
probe = st.fixed_dictionaries(
    {"name": st.one_of(st.just("p"), values)},
    optional={key: values for key in ["script", "file", "duration", "params", "stap_options",
                                      "guru"]},
)
host_names = st.one_of(st.sampled_from(["web1", "web2", "db1"]), st.text(max_size=6))
inventory = st.fixed_dictionaries({}, optional={
    "hosts": st.dictionaries(host_names, st.one_of(st.none(), st.dictionaries(keys, values))),
    "groups": st.dictionaries(host_names, st.one_of(st.none(), st.fixed_dictionaries(
        {}, optional={"hosts": st.lists(host_names, max_size=3),
                      "children": st.lists(host_names, max_size=3),
                      "vars": values}))),
    "vars": st.one_of(st.dictionaries(st.sampled_from(["ansible_port", "ansible_become",
                                                       "ansible_host", "x"]), values), values),
})
manifest = st.fixed_dictionaries(
    {"apiVersion": st.one_of(st.just("stapctl/v1"), values),
     "kind": st.one_of(st.just("Trace"), values),
     "name": st.one_of(st.just("t"), values),
     "probes": st.one_of(st.lists(probe, max_size=3), values),
     "inventory": st.one_of(inventory, values)},
    optional={key: values for key in ["description", "hosts", "vars", "strategy",
                                      "become", "output"]},
).flatmap(lambda fields: st.dictionaries(keys, values, max_size=2).map(
    lambda extra: {**extra, **fields}))

VALID = """\
apiVersion: stapctl/v1
kind: Trace
name: t
vars: {x: 1}
probes:
  - name: p
    script: |
      probe oneshot { print({{ x }}) }
    duration: 5s
strategy: {serial: [1, "50%"]}
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("manifests")


def load_only_manifest_errors(path: Path) -> None:
    """Load the manifest, its inline inventory and every host's scripts, as `validate` does."""
    try:
        loaded = load_manifest(path)
        if isinstance(loaded.inventory, InlineInventory) and loaded.document is not None:
            for host in load_inventory(loaded.inventory, loaded.document).select(loaded.hosts):
                for probe in loaded.probes:
                    render_script(probe, host_vars(host, loaded.vars, {}))
    except ManifestError as error:
        assert error.issues and all(issue.message for issue in error.issues)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=manifest)
def test_manifest_shaped_data(workdir: Path, data: dict[str, Any]) -> None:
    path = workdir / "trace.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    load_only_manifest_errors(path)


@settings(max_examples=300, deadline=None)
@given(position=st.integers(min_value=0, max_value=len(VALID)),
       cut=st.integers(min_value=0, max_value=20),
       insert=st.text(alphabet=":-[]{}&*!|>'\"#%@`\t\n ?,\\", max_size=5))
def test_damaged_text(workdir: Path, position: int, cut: int, insert: str) -> None:
    path = workdir / "damaged.yaml"
    path.write_text(VALID[:position] + insert + VALID[position + cut:])
    load_only_manifest_errors(path)


INVENTORY_INI = """\
bastion ansible_host=192.0.2.1
[web]
web[01:03] ansible_port=2222 level=5
[web:vars]
level=50
[prod:children]
web
"""
INVENTORY_YAML = """\
all:
  vars: {level: 1}
  children:
    web:
      hosts:
        web[01:03]: {ansible_port: 2222}
"""


@settings(max_examples=300, deadline=None)
@given(original=st.sampled_from([("hosts.ini", INVENTORY_INI), ("hosts.yaml", INVENTORY_YAML)]),
       position=st.integers(min_value=0, max_value=len(INVENTORY_INI)),
       cut=st.integers(min_value=0, max_value=10),
       insert=st.text(alphabet="[]:=!&*~,#;'\"\t\n {}-0123456789az", max_size=6),
       pattern=st.sampled_from(["all", "web:!web02", "prod:&web", "~w.*", "nothing"]))
def test_damaged_inventories(workdir: Path, original: tuple[str, str], position: int,
                             cut: int, insert: str, pattern: str) -> None:
    name, text = original
    path = workdir / name
    path.write_text(text[:position] + insert + text[position + cut:])
    try:
        load_inventory(path, origin=Document("trace.yaml", None)).select(pattern)
    except ManifestError as error:
        assert error.issues and all(issue.message for issue in error.issues)


@settings(max_examples=500, deadline=None)
@given(address=st.one_of(
    st.text(max_size=40),
    st.text(alphabet="abc019.-:[]%_;$ `'\"|&@/\n", max_size=20),
    st.ip_addresses().map(str),
))
def test_an_accepted_address_is_plain(address: str) -> None:
    """Nothing a shell, ssh or paramiko would read as more than an address gets through."""
    if address_problem(address) is None:
        assert re.fullmatch(r"[A-Za-z0-9.:%_\[\]-]+", address), address
        assert not address.startswith("-")


@settings(max_examples=300, deadline=None)
@given(address=st.ip_addresses())
def test_every_ip_address_is_accepted(address: Any) -> None:
    assert address_problem(str(address)) is None
    if address.version == 6:
        assert address_problem(f"[{address}]") is None
