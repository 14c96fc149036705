"""The lab's guests run the kernel stap builds for, reachable like any managed host."""

from __future__ import annotations

import paramiko
import pytest
import yaml

from stapctl.lab import GuestState, Lab, LabStatus, guest_release

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
