"""Inventories read as Ansible reads them, host patterns, and variable precedence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from stapctl.errors import ManifestError
from stapctl.inventory import (
    Inventory,
    address_problem,
    expand_host_pattern,
    host_vars,
    load_inventory,
)
from stapctl.manifest import load_manifest
from stapctl.models import Manifest
from stapctl.yamldoc import Document

pytestmark = pytest.mark.unit

INI = """\
# the fleet
bastion ansible_host=192.0.2.1 ansible_user=admin

[web]
web[01:03].example.com
canary ansible_port=2222 level=5   # inline vars win over group vars

[db]
db1:2200 ansible_become=yes ansible_python_interpreter=/usr/bin/python3.11

[prod:children]
web
db

[prod:vars]
level=100
motd = "hello world"

[web:vars]
level=50

[all:vars]
level=1
ansible_user=ops
"""

YAML = """\
all:
  vars:
    level: 1
    ansible_user: ops
  hosts:
    bastion: {ansible_host: 192.0.2.1, ansible_user: admin}
  children:
    prod:
      vars: {level: 100, motd: hello world}
      children:
        web:
          vars: {level: 50}
          hosts:
            web[01:03].example.com:
            canary: {ansible_port: 2222, level: 5}
        db:
          hosts:
            db1:2200: {ansible_become: yes, ansible_python_interpreter: /usr/bin/python3.11}
"""

INLINE: dict[str, Any] = {
    "vars": {"level": 1, "ansible_user": "ops"},
    "hosts": {
        "bastion": {"address": "192.0.2.1", "user": "admin"},
        "web01.example.com": None, "web02.example.com": None, "web03.example.com": None,
        "canary": {"port": 2222, "vars": {"level": 5}},
        "db1": {"port": 2200, "become": True, "python": "/usr/bin/python3.11"},
    },
    "groups": {
        "prod": {"children": ["web", "db"], "vars": {"level": 100, "motd": "hello world"}},
        "web": {"hosts": ["web01.example.com", "web02.example.com", "web03.example.com",
                          "canary"], "vars": {"level": 50}},
        "db": {"hosts": ["db1"]},
    },
}

ORIGIN = Document("trace.yaml", None)  # a manifest to serve, with nothing to locate in it


def inline_manifest(tmp_path: Path, inventory: dict[str, Any], hosts: str = "all") -> Manifest:
    """A manifest with ``inventory`` as its inline inventory, loaded as stapctl loads it."""
    path = tmp_path / "trace.yaml"
    path.write_text(yaml.safe_dump({
        "apiVersion": "stapctl/v1", "kind": "Trace", "name": "t", "hosts": hosts,
        "probes": [{"name": "p", "script": "probe oneshot { exit() }"}],
        "inventory": inventory}, sort_keys=False))
    return load_manifest(path)


def load_inline(tmp_path: Path, inventory: dict[str, Any], hosts: str = "all") -> Inventory:
    manifest = inline_manifest(tmp_path, inventory, hosts)
    assert manifest.inventory is not None and manifest.document is not None
    return load_inventory(manifest.inventory, origin=manifest.document)


ALL_HOSTS = ["bastion", "web01.example.com", "web02.example.com", "web03.example.com",
             "canary", "db1"]


@pytest.fixture(params=["ini", "yaml", "inline"])
def inventory(request: pytest.FixtureRequest, tmp_path: Path) -> Inventory:
    """The same fleet, written in each of the three formats."""
    if request.param == "inline":
        return load_inline(tmp_path, INLINE)
    path = tmp_path / f"hosts.{request.param}"
    path.write_text(INI if request.param == "ini" else YAML)
    return load_inventory(path, origin=ORIGIN)


def names(inventory: Inventory, pattern: str, limit: str | None = None) -> list[str]:
    return [host.name for host in inventory.select(pattern, limit)]


def test_every_format_reads_the_same_hosts_and_groups(inventory: Inventory) -> None:
    assert names(inventory, "all") == ALL_HOSTS
    assert sorted(inventory.groups) == ["all", "db", "prod", "ungrouped", "web"]
    assert inventory.groups["ungrouped"].hosts == ["bastion"]
    assert inventory.groups["prod"].children == ["web", "db"]


def test_connection_variables_become_host_fields(inventory: Inventory) -> None:
    hosts = {host.name: host for host in inventory.select("all")}
    assert (hosts["bastion"].address, hosts["bastion"].user) == ("192.0.2.1", "admin")
    assert (hosts["canary"].address, hosts["canary"].port) == ("canary", 2222)
    assert hosts["canary"].user == "ops"  # from all's vars
    assert hosts["db1"].port == 2200 and hosts["db1"].become is True
    assert hosts["db1"].python == "/usr/bin/python3.11"
    assert hosts["web01.example.com"].become is None  # the manifest decides
    assert hosts["web01.example.com"].python == "python3"


def test_vars_merge_all_then_parents_then_children_then_host(inventory: Inventory) -> None:
    level = {host.name: host.vars["level"] for host in inventory.select("all")}
    assert level == {"bastion": 1, "web01.example.com": 50, "web02.example.com": 50,
                     "web03.example.com": 50, "canary": 5, "db1": 100}
    assert inventory.host("db1").vars["motd"] == "hello world"


def test_magic_variables(inventory: Inventory) -> None:
    canary = inventory.host("canary")
    assert canary.vars["inventory_hostname"] == "canary"
    assert canary.vars["group_names"] == ["prod", "web"]


@pytest.mark.parametrize(("pattern", "expected"), [
    ("all", ALL_HOSTS),
    ("*", ALL_HOSTS),
    ("web", ["web01.example.com", "web02.example.com", "web03.example.com", "canary"]),
    ("prod:!canary", ["web01.example.com", "web02.example.com", "web03.example.com", "db1"]),
    ("web:&prod", ["web01.example.com", "web02.example.com", "web03.example.com", "canary"]),
    ("db:bastion", ["bastion", "db1"]),
    ("db,bastion", ["bastion", "db1"]),
    ("web0*", ["web01.example.com", "web02.example.com", "web03.example.com"]),
    ("*.example.com:!web02*", ["web01.example.com", "web03.example.com"]),
    ("~web0[13]", ["web01.example.com", "web03.example.com"]),
    ("!web", ["bastion", "db1"]),
    ("ungrouped", ["bastion"]),
    ("d?", ["db1"]),
])
def test_host_patterns(inventory: Inventory, pattern: str, expected: list[str]) -> None:
    assert names(inventory, pattern) == expected


def test_limit_narrows_the_pattern(inventory: Inventory) -> None:
    assert names(inventory, "prod", limit="db:canary") == ["canary", "db1"]


@pytest.mark.parametrize(("pattern", "message"), [
    ("webz", "'webz' matches no host or group"),
    ("prod:!canery", "'canery' matches no host or group"),
    ("web:&db", "selects no host"),
    (" , ", "empty host pattern"),
])
def test_patterns_that_select_nothing(inventory: Inventory, pattern: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message) as caught:
        inventory.select(pattern)
    if "no host or group" in message:
        assert "its groups: all, db, prod, ungrouped, web" in str(caught.value)


def test_a_limit_matching_nothing_names_the_limit(inventory: Inventory) -> None:
    with pytest.raises(ManifestError) as caught:
        inventory.select("all", limit="nothere")
    assert str(caught.value).startswith("--limit: ")


def test_pattern_errors_point_at_the_manifests_hosts_key(tmp_path: Path) -> None:
    inventory = load_inline(tmp_path, {"hosts": {"web1": None}}, hosts="webz")
    with pytest.raises(ManifestError) as caught:
        inventory.select("webz")
    (issue,) = caught.value.issues
    assert (issue.file, issue.line, issue.path) == (str(tmp_path / "trace.yaml"), 4, "hosts")


def test_host_vars_precedence(tmp_path: Path) -> None:
    inventory = load_inline(tmp_path, {"vars": {"a": "group", "b": "group"},
                                       "hosts": {"h": {"vars": {"b": "host", "c": "host"}}}})
    (host,) = inventory.select("all")
    merged = host_vars(host, {"a": "manifest", "b": "manifest", "c": "manifest",
                              "d": "manifest", "e": "manifest"}, {"e": "extra"})
    assert {key: merged[key] for key in "abcde"} == {
        "a": "group", "b": "host", "c": "host", "d": "manifest", "e": "extra"}


def test_group_priority_orders_sibling_groups(tmp_path: Path) -> None:
    path = tmp_path / "hosts.ini"
    path.write_text("[a]\nh\n[b]\nh\n[a:vars]\nx=a\nansible_group_priority=10\n[b:vars]\nx=b\n")
    assert load_inventory(path, origin=ORIGIN).host("h").vars["x"] == "a"
    path.write_text("[a]\nh\n[b]\nh\n[a:vars]\nx=a\n[b:vars]\nx=b\n")
    assert load_inventory(path, origin=ORIGIN).host("h").vars["x"] == "b"


def test_ini_values_are_python_literals_when_they_parse(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("[g]\nh n=5 s=abc q=\"a b\" l=[1,2] t=True\n[g:vars]\nv = 7 # note\n")
    variables = load_inventory(path, origin=ORIGIN).host("h").vars
    assert (variables["n"], variables["s"], variables["q"], variables["l"]) == (5, "abc", "a b",
                                                                                [1, 2])
    assert variables["t"] is True and variables["v"] == 7


@pytest.mark.parametrize(("first_line", "kind"), [("all:", "yaml"), ("[web]", "ini"),
                                                  ("web1 ansible_port=22", "ini")])
def test_files_without_a_suffix_are_recognised(tmp_path: Path, first_line: str, kind: str) -> None:
    path = tmp_path / "hosts"
    path.write_text("# comment\n" + first_line + ("\n  hosts: {web1: }\n" if kind == "yaml"
                                                  else "\nweb1\n"))
    assert names(load_inventory(path, origin=ORIGIN), "all") == ["web1"]


def test_become_words_as_ansible_reads_them(tmp_path: Path) -> None:
    path = tmp_path / "hosts.ini"
    path.write_text("a ansible_become=yes\nb ansible_become=False\nc ansible_become=0\n")
    inventory = load_inventory(path, origin=ORIGIN)
    assert [host.become for host in inventory.select("all")] == [True, False, False]


def test_python_discovery_means_python3(tmp_path: Path) -> None:
    path = tmp_path / "hosts.ini"
    path.write_text("a ansible_python_interpreter=auto_silent\n")
    assert load_inventory(path, origin=ORIGIN).host("a").python == "python3"


def test_known_hosts_and_key_file(tmp_path: Path) -> None:
    path = tmp_path / "hosts.ini"
    path.write_text("a stapctl_known_hosts=/lab/known_hosts ansible_ssh_private_key_file=/k\n")
    host = load_inventory(path, origin=ORIGIN).host("a")
    assert (host.known_hosts, host.key_file) == ("/lab/known_hosts", "/k")


@pytest.mark.parametrize(("entry", "hosts", "port"), [
    ("web1", ["web1"], None),
    ("web1:2222", ["web1"], 2222),
    ("web[1:3]", ["web1", "web2", "web3"], None),
    ("web[01:03]:22", ["web01", "web02", "web03"], 22),
    ("web[0:6:3]", ["web0", "web3", "web6"], None),
    ("db-[a:c]", ["db-a", "db-b", "db-c"], None),
    ("r[1:2]-n[1:2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"], None),
    ("[:3]", ["0", "1", "2", "3"], None),
    ("2001:db8::1", ["2001:db8::1"], None),
    ("[2001:db8::1]:2222", ["2001:db8::1"], 2222),
])
def test_host_entries_expand(entry: str, hosts: list[str], port: int | None) -> None:
    assert expand_host_pattern(entry) == (hosts, port)


@pytest.mark.parametrize("entry", ["web[1:2", "web]", "web[3:1]", "web[01:100]", "h:0"])
def test_bad_host_entries(entry: str) -> None:
    with pytest.raises(ValueError):
        expand_host_pattern(entry)


def test_ranges_are_counted_before_they_are_expanded() -> None:
    with pytest.raises(ValueError, match="more than 10000 hosts"):
        expand_host_pattern("h" + "[0:1]" * 40)
    with pytest.raises(ValueError, match="more than 10000 hosts"):
        expand_host_pattern("h[0:99999999999999]")


def test_long_chains_of_groups_need_no_recursion(tmp_path: Path) -> None:
    count = 5000
    path = tmp_path / "hosts.ini"
    path.write_text("".join(f"[g{n}:children]\ng{n + 1}\n" for n in range(count))
                    + f"[g{count}]\nh x=1\n")
    inventory = load_inventory(path, origin=ORIGIN)
    assert names(inventory, "g0") == ["h"]
    assert inventory.groups_of("h")[-1] == f"g{count}"
    path.write_text(path.read_text() + f"[g{count}:children]\ng0\n")
    with pytest.raises(ManifestError, match="is its own ancestor"):
        load_inventory(path, origin=ORIGIN)


def test_a_cycle_is_found_from_a_group_below_it(tmp_path: Path) -> None:
    path = tmp_path / "hosts.ini"
    path.write_text("[c]\nh\n[b]\n[a]\n[a:children]\nb\n[b:children]\nc\na\n")
    with pytest.raises(ManifestError) as caught:
        load_inventory(path, origin=ORIGIN)
    (issue,) = caught.value.issues
    assert issue.line == 9 and "b → a → b" in issue.message


def test_pattern_errors_have_no_line_when_the_origin_has_no_hosts_key(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text("all:\n  hosts:\n    web1:\n")
    with pytest.raises(ManifestError) as caught:
        load_inventory(path, origin=Document(str(path), None)).select("db")
    (issue,) = caught.value.issues
    assert (issue.file, issue.line, issue.path) == (str(path), None, "hosts")


@pytest.mark.parametrize("address", [
    "web1", "web-1.example.com", "WEB1.Example.COM", "xn--bcher-kva.example", "10.0.0.5",
    "::1", "[::1]", "2001:db8::7", "[2001:db8::7]", "fe80::1%eth0", "local", "a" * 63,
])
def test_addresses_that_are_accepted(address: str) -> None:
    assert address_problem(address) is None


@pytest.mark.parametrize("address", [
    "127.0.0.1;reboot", "-oProxyCommand=x", "web1 -p 2222", "", "web_1", "[10.0.0.1]",
    "10.0.0.999", "a..b", "-web", "web-", "a" * 64, "fe80::1%;reboot", "web1:22",
    "root@web1", "$(reboot)", "web1\n", "[::1", "::1]", "localhost.", ".web1",
    ".".join(["a" * 63] * 4) + ".b",
])
def test_addresses_that_are_refused(address: str) -> None:
    problem = address_problem(address)
    assert problem is not None and "is not a host name" in problem


def test_a_bracketed_ipv6_address_is_connected_to_without_brackets(tmp_path: Path) -> None:
    path = tmp_path / "hosts.ini"
    path.write_text("v6 ansible_host=[2001:db8::7]\nplain ansible_host=::1\n")
    hosts = {host.name: host for host in load_inventory(path, origin=ORIGIN).select("all")}
    assert (hosts["v6"].address, hosts["plain"].address) == ("2001:db8::7", "::1")


def test_a_name_that_is_no_address_is_fine_with_an_ansible_host(tmp_path: Path) -> None:
    path = tmp_path / "hosts.ini"
    path.write_text("[web]\nweb_1\n[web:vars]\nansible_host=10.0.0.5\n")
    (host,) = load_inventory(path, origin=ORIGIN).select("all")
    assert (host.name, host.address) == ("web_1", "10.0.0.5")


@pytest.mark.parametrize(("setting", "good", "bad"), [
    ("ansible_user", "deploy.bot_1-x", "-oProxyCommand=x"),
    ("ansible_user", "root", "root;id"),
    ("ansible_python_interpreter", "/usr/libexec/platform-python", "/usr/bin/env python3"),
    ("ansible_python_interpreter", "python3.11", "bin/python3"),
    ("ansible_python_interpreter", "auto_silent", "$(reboot)"),
    ("ansible_port", "65535", "65536"),
    ("ansible_port", "1", "0"),
])
def test_connection_settings_are_checked_where_written(tmp_path: Path, setting: str, good: str,
                                                       bad: str) -> None:
    path = tmp_path / "hosts.yaml"
    path.write_text(yaml.safe_dump({"all": {"hosts": {"h": {setting: good}}}}))
    load_inventory(path, origin=ORIGIN).select("all")
    path.write_text(f"all:\n  hosts:\n    h:\n      {setting}: {json.dumps(bad)}\n")
    with pytest.raises(ManifestError) as caught:
        load_inventory(path, origin=ORIGIN)
    (issue,) = caught.value.issues
    assert (issue.line, issue.path) == (3, f"all.hosts.h.{setting}")  # at the host
