"""Each inventory form Ansible users have, taken through `select_hosts` to a real sshd:
the connection settings it gives (aliases, group_vars/host_vars, script hostvars) are
the ones that log in."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from stapctl.connection import ConnectOptions, connect, run_command
from stapctl.manifest import load_manifest
from stapctl.models import Host
from stapctl.session import select_hosts

from .conftest import Sshd

pytestmark = pytest.mark.integration


def manifest(tmp_path: Path, hosts: str = "all") -> Path:
    path = tmp_path / "trace.yaml"
    path.write_text(f"apiVersion: stapctl/v1\nkind: Trace\nname: t\nhosts: '{hosts}'\n"
                    "probes:\n  - name: p\n    script: probe oneshot { println(1) }\n")
    return path


def logs_in(host: Host) -> str:
    connection = connect(host, ConnectOptions())
    try:
        return run_command(connection, ["echo", "logged in"]).stdout.decode().strip()
    finally:
        connection.close()


def test_aliases_and_vars_directories_reach_the_sshd(sshd: Sshd, tmp_path: Path) -> None:
    (tmp_path / "hosts").write_text("[loop]\nloop1 ansible_ssh_host=127.0.0.1\nloop2\n")
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "loop.yml").write_text(
        f"ansible_ssh_user: root\nansible_private_key_file: {sshd.client_key}\n"
        f"stapctl_known_hosts: {sshd.known_hosts}\nansible_ssh_port: 1\n")
    (tmp_path / "host_vars" / "loop2").mkdir(parents=True)
    (tmp_path / "host_vars" / "loop2" / "net.yml").write_text(
        f"ansible_ssh_host: 127.0.0.1\nansible_ssh_port: {sshd.port}\n")
    (loop2,) = select_hosts(load_manifest(manifest(tmp_path, "loop[-1]")), tmp_path / "hosts")
    assert loop2.name == "loop2"
    assert logs_in(loop2) == "logged in"


def test_an_executable_inventory_reaches_the_sshd(sshd: Sshd, tmp_path: Path) -> None:
    script = tmp_path / "cloud.py"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json
        print(json.dumps({{"loop": ["cloud1"], "_meta": {{"hostvars": {{"cloud1": {{
            "ansible_ssh_host": "127.0.0.1", "ansible_ssh_port": {sshd.port},
            "ansible_user": "root", "ansible_ssh_private_key_file": "{sshd.client_key}",
            "stapctl_known_hosts": "{sshd.known_hosts}"}}}}}}}}))
        """))
    script.chmod(0o755)
    (host,) = select_hosts(load_manifest(manifest(tmp_path)), script)
    assert logs_in(host) == "logged in"


def test_a_comma_list_in_a_directory_of_vars_reaches_the_sshd(
        sshd: Sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "inventory" / "group_vars").mkdir(parents=True)
    (tmp_path / "inventory" / "hosts.yml").write_text(
        f"all:\n  hosts:\n    '127.0.0.1:{sshd.port}':\n")
    (tmp_path / "inventory" / "group_vars" / "all").write_text(
        f"ansible_user: root\nansible_ssh_private_key_file: {sshd.client_key}\n"
        f"stapctl_known_hosts: {sshd.known_hosts}\n")
    (host,) = select_hosts(load_manifest(manifest(tmp_path)), tmp_path / "inventory")
    assert logs_in(host) == "logged in"
    monkeypatch.chdir(tmp_path)
    (listed,) = select_hosts(load_manifest(manifest(tmp_path)), Path(f"127.0.0.1:{sshd.port},"))
    assert logs_in(Host(name=listed.name, address=listed.address, port=listed.port,
                        user="root", key_file=str(sshd.client_key),
                        known_hosts=str(sshd.known_hosts))) == "logged in"
