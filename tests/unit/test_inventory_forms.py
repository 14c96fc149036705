"""Inventories as Ansible users have them: host subscripts, group_vars/ and host_vars/,
the ansible_ssh_* aliases, executable inventories, inventory directories and comma
lists, -e @FILE, and --list-hosts."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stapctl import inventory as inventory_module
from stapctl.errors import ManifestError
from stapctl.inventory import Inventory, load_inventory
from stapctl.render import parse_extra_vars
from stapctl.yamldoc import Document

pytestmark = pytest.mark.unit

WEB = "[web]\nweb1\nweb2\nweb3\nweb4\n[db]\ndb1\ndb2\n"


def load(source: Path) -> Inventory:
    return load_inventory(source, Document(str(source), None))


def names(inventory: Inventory, pattern: str) -> list[str]:
    return [host.name for host in inventory.select(pattern)]


def write(path: Path, text: str, executable: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    path.chmod(0o755 if executable else 0o644)
    return path


# -- subscripts --------------------------------------------------------------------------
@pytest.mark.parametrize(("pattern", "expected"), [
    ("web[0]", ["web1"]),
    ("web[-1]", ["web4"]),
    ("web[0:2]", ["web1", "web2", "web3"]),  # both ends included, as Ansible slices
    ("web[2:]", ["web3", "web4"]),
    ("web[0:1]:db[1]", ["web1", "web2", "db2"]),
    ("web[1],db[0]", ["web2", "db1"]),
    ("all:!web[0:2]", ["web4", "db1", "db2"]),
    ("web:&all[0:1]", ["web1", "web2"]),
])
def test_a_subscript_slices_a_group_as_ansible_does(tmp_path: Path, pattern: str,
                                                    expected: list[str]) -> None:
    inventory = load(write(tmp_path / "hosts", WEB))
    assert names(inventory, pattern) == expected


@pytest.mark.parametrize(("pattern", "message"), [
    ("web[4]", "index 4 is past the 4 host(s) of 'web'"),
    ("web[-5]", "index -5 is past"),
    ("web[5:]", "selects none of the 4 host(s) of 'web'"),
    ("web[2:1]", "selects none"),
    ("nosuch[0]", "'nosuch' matches no host or group"),
])
def test_a_subscript_out_of_range_is_one_clear_error(tmp_path: Path, pattern: str,
                                                     message: str) -> None:
    inventory = load(write(tmp_path / "hosts", WEB))
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        inventory.select(pattern)


# -- group_vars / host_vars --------------------------------------------------------------
def test_vars_directories_beside_the_inventory_follow_ansibles_precedence(
        tmp_path: Path) -> None:
    write(tmp_path / "hosts", """\
        [web]
        web1 from_host=inventory
        web2
        [prod:children]
        web
        [all:vars]
        level=inventory-all
        from_all=inventory-all
        [web:vars]
        level=inventory-web
        """)
    write(tmp_path / "group_vars" / "all.yml", "level: files-all\nfrom_all: files-all\n")
    write(tmp_path / "group_vars" / "prod", "level: files-prod\nprod_only: 1\n")
    write(tmp_path / "group_vars" / "web" / "10-first.yaml", "level: files-web\n")
    write(tmp_path / "group_vars" / "web" / "20-second.yml", "second: yes\n")
    write(tmp_path / "group_vars" / "web" / ".hidden.yml", "level: hidden\n")
    write(tmp_path / "group_vars" / "web" / "notes.txt", "level: notes\n")
    write(tmp_path / "group_vars" / "nosuchgroup.yml", "level: ignored\n")
    write(tmp_path / "host_vars" / "web1.yml", "from_host: files\nansible_port: 2201\n")
    inventory = load(tmp_path / "hosts")
    web1, web2 = inventory.select("web")

    # the inventory's own group vars lose to every group_vars file; a child's file wins
    assert web1.vars["level"] == web2.vars["level"] == "files-web"
    assert web1.vars["from_all"] == "files-all"  # group_vars/all beats [all:vars]
    assert web1.vars["prod_only"] == 1 and web1.vars["second"] is True
    assert web1.vars["from_host"] == "files" and web1.port == 2201  # host_vars wins
    assert web2.port == 22


@pytest.mark.parametrize(("text", "message", "line"), [
    ("- a\n- b\n", "a variables file holds a mapping", 1),
    ("fine: 1\nansible_port: 99999\n", "expected a port number", 2),
    ("a: [1,\n", "", None),
])
def test_a_bad_vars_file_is_refused_at_its_line(tmp_path: Path, text: str, message: str,
                                                line: int | None) -> None:
    write(tmp_path / "hosts", "[web]\nweb1\n")
    bad = write(tmp_path / "host_vars" / "web1.yml", text)
    with pytest.raises(ManifestError) as caught:
        load(tmp_path / "hosts")
    (issue,) = caught.value.issues
    assert issue.file == str(bad)
    assert message in issue.message
    assert issue.line is not None and (line is None or issue.line == line)


# -- ansible_ssh_* aliases ---------------------------------------------------------------
def test_the_ansible_ssh_aliases_set_the_connection_and_win_as_in_ansible(
        tmp_path: Path) -> None:
    write(tmp_path / "hosts",
          "old ansible_ssh_host=192.0.2.7 ansible_ssh_port=2207 ansible_ssh_user=deploy "
          "ansible_private_key_file=/k/old\n"
          "both ansible_host=192.0.2.8 ansible_ssh_host=192.0.2.9 ansible_port=1 "
          "ansible_ssh_port=2209\n")
    old, both = load(tmp_path / "hosts").select("all")
    assert (old.address, old.port, old.user, old.key_file) == ("192.0.2.7", 2207, "deploy",
                                                               "/k/old")
    assert (both.address, both.port) == ("192.0.2.9", 2209)  # the ssh_ name is the last


def test_a_bad_alias_value_is_refused_where_it_is_written(tmp_path: Path) -> None:
    path = write(tmp_path / "hosts", "[web]\nweb1 ansible_ssh_port=70000\n")
    with pytest.raises(ManifestError, match="expected a port number") as caught:
        load(path)
    assert caught.value.issues[0].line == 2


# -- executable inventories --------------------------------------------------------------
SCRIPT = """\
    #!{python}
    import json, sys
    if sys.argv[1:] == ["--list"]:
        print(json.dumps({{
            "web": {{"hosts": ["web1", "web2"], "vars": {{"tier": "front"}}}},
            "prod": {{"children": ["web"]}},
            "db": ["db1"],
            {meta}
        }}))
    elif sys.argv[1:2] == ["--host"]:
        print(json.dumps({{"ansible_port": 2200, "asked": sys.argv[2]}}))
    else:
        sys.exit("bad arguments")
    """


@pytest.mark.parametrize("with_meta", [True, False])
def test_an_executable_inventory_is_run_as_ansibles_script_plugin_runs_it(
        tmp_path: Path, with_meta: bool) -> None:
    meta = '"_meta": {"hostvars": {"web1": {"ansible_port": 2201}}}' if with_meta else ""
    script = write(tmp_path / "inventory.py",
                   SCRIPT.format(python=sys.executable, meta=meta), executable=True)
    inventory = load(script)
    assert names(inventory, "prod") == ["web1", "web2"]
    assert names(inventory, "db") == ["db1"]
    web1 = inventory.host("web1")
    assert web1.vars["tier"] == "front"
    if with_meta:
        assert web1.port == 2201 and inventory.host("web2").port == 22
    else:  # asked host by host
        assert web1.port == 2200 and web1.vars["asked"] == "web1"


@pytest.mark.parametrize(("body", "message"), [
    ("print('not json')", "did not print JSON"),
    ("sys.exit('no credentials for the cloud')",
     "failed with exit code 1: no credentials for the cloud"),
    ("print(json.dumps([1, 2]))", "must print a JSON object of groups"),
    ("print(json.dumps({'web': {'hosts': 'web1'}}))", "group 'web' must be a list"),
    ("print(json.dumps({'web': ['web1'], '_meta': []}))", '"_meta" must be'),
    ("import time; time.sleep(5)", "gave no answer within 1s"),
])
def test_a_failing_inventory_script_is_one_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, message: str) -> None:
    monkeypatch.setattr(inventory_module, "SCRIPT_TIMEOUT", 1)
    script = write(tmp_path / "inventory.py",
                   f"#!{sys.executable}\nimport json, sys\n{body}\n", executable=True)
    with pytest.raises(ManifestError) as caught:
        load(script)
    (issue,) = caught.value.issues
    assert issue.file == str(script)
    assert message in issue.message
    assert "inventory script `inventory.py --list`" in issue.message


# -- directories and comma lists ---------------------------------------------------------
def test_an_inventory_directory_merges_every_inventory_in_it(tmp_path: Path) -> None:
    folder = tmp_path / "inventory"
    write(folder / "01-web.ini", "[web]\nweb1\nweb2 role=a\n")
    write(folder / "02-more.yml", "all:\n  children:\n    web:\n      hosts:\n"
                                  "        web2:\n          role: b\n        web3:\n")
    write(folder / "cloud" / "script", SCRIPT.format(python=sys.executable, meta=""),
          executable=True)
    write(folder / "README.md", "# not an inventory [web\n")
    write(folder / "old.bak", "[broken\n")
    write(folder / ".hidden", "[broken\n")
    write(folder / "group_vars" / "web.yml", "tier: from-dir\n")
    inventory = load(folder)
    assert names(inventory, "web") == ["web1", "web2", "web3"]
    assert names(inventory, "db") == ["db1"]
    assert inventory.host("web2").vars["role"] == "b"  # a later file wins
    assert inventory.host("web3").vars["tier"] == "from-dir"


def test_a_bad_file_in_an_inventory_directory_is_located_in_that_file(tmp_path: Path) -> None:
    folder = tmp_path / "inventory"
    write(folder / "a.ini", "[web]\nweb1\n")
    bad = write(folder / "b", "[web]\nweb2 ansible_port=0\n")
    with pytest.raises(ManifestError) as caught:
        load(folder)
    (issue,) = caught.value.issues
    assert (issue.file, issue.line) == (str(bad), 2)


def test_a_comma_list_is_an_inventory_of_ungrouped_hosts(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    inventory = load(Path("web1,192.0.2.5:2222,db[1:2],"))
    assert names(inventory, "ungrouped") == ["web1", "192.0.2.5", "db1", "db2"]
    assert inventory.host("192.0.2.5").port == 2222
    with pytest.raises(ManifestError, match="not a host name"):
        load(Path("web1,bad host,"))
    with pytest.raises(ManifestError, match="is not from 1 to 65535"):
        load(Path("web1:0,"))


# -- -e @FILE ----------------------------------------------------------------------------
def test_extra_vars_from_a_file_mix_with_key_value_in_order(tmp_path: Path) -> None:
    path = write(tmp_path / "vars.yml", "threshold: 5\nname: from-file\nlist: [1, 2]\n")
    assert parse_extra_vars([f"@{path}", "name=later"]) == {
        "threshold": 5, "name": "later", "list": [1, 2]}
    assert parse_extra_vars(["name=earlier", f"@{path}"])["name"] == "from-file"


@pytest.mark.parametrize(("text", "message", "line"), [
    ("- 1\n", "takes a YAML mapping", 1),
    ("good: 1\n2bad: 3\n", "a variable name is made of letters", 2),
    ("a: [\n", "", None),
])
def test_a_bad_extra_vars_file_is_refused_at_its_line(tmp_path: Path, text: str,
                                                      message: str, line: int | None) -> None:
    path = write(tmp_path / "vars.yml", text)
    with pytest.raises(ManifestError) as caught:
        parse_extra_vars([f"@{path}"])
    (issue,) = caught.value.issues
    assert issue.file == str(path) and message in issue.message
    assert issue.line is not None and (line is None or issue.line == line)


def test_a_missing_extra_vars_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="-e @.*nosuch.yml"):
        parse_extra_vars([f"@{tmp_path / 'nosuch.yml'}"])


# -- --list-hosts ------------------------------------------------------------------------
def stapctl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stapctl", *args], capture_output=True,
                          text=True, check=False, timeout=120, cwd=cwd)


@pytest.mark.parametrize("command", ["apply", "plan", "validate"])
def test_list_hosts_prints_the_matched_hosts_and_connects_to_nothing(
        tmp_path: Path, command: str) -> None:
    # unroutable addresses: a connection attempt would hang, not list
    write(tmp_path / "hosts", "[web]\nweb[1:3] ansible_host=192.0.2.1\n[db]\ndb1 "
                              "ansible_host=192.0.2.2\n")
    write(tmp_path / "trace.yaml", """\
        apiVersion: stapctl/v1
        kind: Trace
        name: t
        hosts: web
        probes:
          - name: p
            script: probe oneshot { println(1) }
        """)
    listed = stapctl(command, "-i", "hosts", "--limit", "web[1:]", "--list-hosts",
                     "trace.yaml", cwd=tmp_path)
    assert (listed.returncode, listed.stdout) == (0, "web2\nweb3\n"), listed.stderr
    everything = stapctl(command, "-i", "web9,db9,", "--list-hosts", "trace.yaml",
                         cwd=tmp_path)
    assert everything.returncode == 2  # the manifest's 'web' is no group of the list
    assert "'web' matches no host or group" in everything.stderr
    assert "Traceback" not in everything.stderr


def test_a_host_name_that_is_no_address_is_located_in_its_own_file(tmp_path: Path) -> None:
    folder = tmp_path / "inventory"
    write(folder / "a.ini", "[web]\nweb1\n")
    bad = write(folder / "b.ini", "[db]\n\ndb_1\n")  # '_' is not in a host name
    with pytest.raises(ManifestError, match="has no ansible_host") as caught:
        load(folder)
    (issue,) = caught.value.issues
    assert (issue.file, issue.line) == (str(bad), 3)


def test_a_script_in_a_directory_is_asked_only_about_its_own_hosts(tmp_path: Path) -> None:
    folder = tmp_path / "inventory"
    write(folder / "a.ini", "[web]\nweb9 ansible_port=2209\n")
    write(folder / "b.py", SCRIPT.format(python=sys.executable, meta=""), executable=True)
    inventory = load(folder)
    assert inventory.host("web9").port == 2209 and "asked" not in inventory.host("web9").vars
    assert inventory.host("web1").vars["asked"] == "web1"
