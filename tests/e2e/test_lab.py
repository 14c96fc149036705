"""The lab's guests run the kernel stap builds for, reachable like any managed host."""

from __future__ import annotations

import paramiko
import pytest
import yaml

from stapctl.build import Builder
from stapctl.lab import GuestState, Lab, LabStatus, guest_release

from .helpers import stap_module_names, unload_stap_modules

pytestmark = pytest.mark.e2e


def _connect(status: LabStatus) -> paramiko.SSHClient:
    guest = next(g for g in status.guests if g.name == "lab-1")
    client = paramiko.SSHClient()
    client.load_host_keys(str(status.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(guest.host, port=guest.port, username=guest.user, key_filename=guest.key,
                   look_for_keys=False, allow_agent=False, timeout=30)
    return client


def _run(client: paramiko.SSHClient, command: str) -> str:
    _, out, err = client.exec_command(command, timeout=120)
    assert out.channel.recv_exit_status() == 0, err.read().decode()
    return out.read().decode().strip()


def test_guest_runs_the_release_and_python_the_agent_needs(lab: LabStatus) -> None:
    with _connect(lab) as client:
        assert _run(client, "uname -r") == guest_release()
        assert _run(client, "python3 -I -c 'import json,ctypes; print(1)'") == "1"


def test_sftp_uploads_reach_the_guest(lab: LabStatus) -> None:
    with _connect(lab) as client, client.open_sftp() as sftp:
        with sftp.file("/tmp/stapctl-lab-test", "w") as f:
            f.write(b"hello")
        assert _run(client, "cat /tmp/stapctl-lab-test") == "hello"


def test_up_again_keeps_the_guest_and_its_inventory(lab: LabStatus) -> None:
    again = Lab.default().up(1)
    first = again.guests[0]
    assert (first.name, first.pid, first.port, first.state) == (
        "lab-1", lab.guests[0].pid, lab.guests[0].port, GuestState.RUNNING)
    host = yaml.safe_load(again.inventory.read_text())["all"]["hosts"]["lab-1"]
    assert host["ansible_port"] == first.port
    assert host["stapctl_known_hosts"] == str(again.known_hosts)
    assert f"[127.0.0.1]:{first.port} ssh-ed25519 " in again.known_hosts.read_text()


def test_a_module_left_loaded_and_held_open_is_unloaded(lab: LabStatus) -> None:
    """What the e2e conftest does after a test that left a module behind: kill its holder,
    then rmmod."""
    builder = Builder()
    script = 'probe timer.s(1) { printf("left behind\\n") }'
    artifact = builder.build(builder.spec(script, guest_release(), "x86_64", (), origin="test_lab"))
    name = artifact.module_name
    with _connect(lab) as client:
        with client.open_sftp() as sftp:
            sftp.put(str(artifact.path), f"/tmp/{name}.ko")
        _run(client, f"insmod /tmp/{name}.ko && rm /tmp/{name}.ko")
        holder = _run(client, f"sleep 600 < /proc/systemtap/{name}/.cmd >/dev/null 2>&1 & "
                              "echo $!")
        _, out, _ = client.exec_command(f"rmmod {name}", timeout=120)
        assert out.channel.recv_exit_status() != 0  # held open, a plain rmmod fails
        assert name in stap_module_names(lab)

        assert unload_stap_modules(lab, {name}) == set()
        assert name not in stap_module_names(lab)
        assert _run(client, f"kill -0 {holder} 2>/dev/null || echo gone") == "gone"
