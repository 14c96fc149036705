"""`become`: sudo -n for a login user that is not root, against the loopback sshd; and the
local connection, which needs no SSH at all."""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from stapctl.agent import AgentHost, AgentRequest
from stapctl.connection import ConnectOptions, LocalConnection, connect
from stapctl.models import Host, Manifest, Probe
from stapctl.session import Session

from .conftest import Sshd

pytestmark = pytest.mark.integration

USER = "stapctl-it"
SUDOERS = Path("/etc/sudoers.d/stapctl-it")


@pytest.fixture(scope="module")
def plain_user(sshd: Sshd) -> str:
    """A login user that is not root, created once, who logs in with the test key."""
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True)
    # "!" (useradd's default) is a locked account, which sshd refuses; "*" only means
    # there is no password
    subprocess.run(["usermod", "--password", "*", USER], check=True)
    account = pwd.getpwnam(USER)
    ssh_dir = Path(account.pw_dir) / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    keys = ssh_dir / "authorized_keys"
    keys.write_text(sshd.client_key.with_suffix(".pub").read_text())
    for path in (ssh_dir, keys):
        os.chown(path, account.pw_uid, account.pw_gid)
    return USER


@pytest.fixture
def passwordless_sudo(plain_user: str) -> Iterator[None]:
    SUDOERS.write_text(f"{plain_user} ALL=(root) NOPASSWD: ALL\n")
    SUDOERS.chmod(0o440)
    try:
        yield
    finally:
        SUDOERS.unlink()


def manifest(tmp_path: Path, become: bool) -> Manifest:
    probe = Probe(name="p", template="probe oneshot {}", origin="t.yaml", first_line=1)
    return Manifest(path=tmp_path / "t.yaml", name="t", probes=(probe,), become=become)


def user_host(sshd: Sshd, user: str) -> Host:
    return Host(name="plain", address="127.0.0.1", port=sshd.port, user=user,
                key_file=str(sshd.client_key), known_hosts=str(sshd.known_hosts))


def test_sudo_that_would_prompt_fails_the_host_clearly(sshd: Sshd, plain_user: str,
                                                       tmp_path: Path) -> None:
    assert not SUDOERS.exists()
    session = Session(manifest(tmp_path, become=True), [user_host(sshd, plain_user)],
                      record=False)
    try:
        assert session.connect() == {}
    finally:
        session.finish()
    [outcome] = session.outcomes
    assert outcome.status == "failed"
    assert "sudo would ask for a password" in outcome.message


def test_passwordless_sudo_runs_the_agent_as_root(sshd: Sshd, plain_user: str,
                                                  passwordless_sudo: None) -> None:
    connection = connect(user_host(sshd, plain_user), ConnectOptions(become=True))
    try:
        agent = AgentHost(connection)
        agent.prepare()
        assert agent.workdir.startswith(pwd.getpwnam(plain_user).pw_dir)
        result = agent.call(AgentRequest("facts"))
        assert result.facts["euid"] == 0
    finally:
        connection.close()


def test_without_become_the_agent_runs_as_the_login_user(sshd: Sshd, plain_user: str) -> None:
    connection = connect(user_host(sshd, plain_user), ConnectOptions(become=False))
    try:
        agent = AgentHost(connection)
        agent.prepare()
        result = agent.call(AgentRequest("facts"))
        assert result.facts["euid"] == pwd.getpwnam(plain_user).pw_uid
    finally:
        connection.close()


def test_local_connection_gathers_this_machines_facts(tmp_path: Path) -> None:
    host = Host(name="here", address="local")
    session = Session(manifest(tmp_path, become=False), [host], record=False)
    try:
        connected = session.connect()
    finally:
        session.finish()
    _, facts = connected["here"]
    assert facts.release == os.uname().release and facts.arch == os.uname().machine
    agent = AgentHost(LocalConnection(host, ConnectOptions()))
    agent.prepare()
    assert agent.call(AgentRequest("facts")).facts["release"] == os.uname().release
