"""The connection package's own logic: ProxyJump specs, known_hosts files, the local
connection and run_command's silence timeout. No SSH server here (see integration)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import paramiko
import pytest

from stapctl.connection import ConnectOptions, LocalConnection, SSHConnection, run_command
from stapctl.connection.known_hosts import KnownHosts, load_known_hosts
from stapctl.connection.ssh import jump_chain, parse_jump
from stapctl.errors import ConnectError, HostKeyError
from stapctl.models import Host

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("spec", "expected"), [
    ("bastion", (None, "bastion", 22)),
    ("admin@bastion:2200", ("admin", "bastion", 2200)),
    ("[::1]:2222", (None, "::1", 2222)),
    ("user@[::1]:2222", ("user", "::1", 2222)),
    ("[fe80::1]", (None, "fe80::1", 22)),
    ("ssh://ops@10.0.0.1:22", ("ops", "10.0.0.1", 22)),
])
def test_jump_specs(spec: str, expected: tuple[str | None, str, int]) -> None:
    assert parse_jump(spec) == expected


@pytest.mark.parametrize("spec", [
    "", "@", "::1", "[::1", "[::1]2222", "host:", "host:port", "host:0", "host:70000",
    "user@[]:22", "a b",
])
def test_bad_jump_specs_are_connect_errors(spec: str) -> None:
    with pytest.raises(ConnectError, match="ProxyJump"):
        parse_jump(spec)


def test_jump_chains() -> None:
    assert jump_chain(None) == [] and jump_chain("none") == [] and jump_chain("None") == []
    assert jump_chain("a, b:2") == ["a", "b:2"]
    with pytest.raises(ConnectError, match="more than 4 hops"):
        jump_chain("a,b,c,d,e")
    with pytest.raises(ConnectError, match="ProxyJump"):
        jump_chain("a,,b")


def new_key() -> paramiko.PKey:
    return paramiko.ECDSAKey.generate()


def test_accepted_keys_are_saved_in_a_private_file(tmp_path: Path) -> None:
    known = KnownHosts(tmp_path / "home" / ".ssh" / "known_hosts", tmp_path / "global")
    key = new_key()
    known.remember("[10.0.0.1]:2222", key)
    assert (known.in_use.parent.stat().st_mode & 0o777) == 0o700
    assert (known.in_use.stat().st_mode & 0o777) == 0o600
    saved = load_known_hosts(paramiko.HostKeys(), known.in_use)
    assert saved.lookup("[10.0.0.1]:2222")[key.get_name()] == key  # type: ignore[index]
    known.remember("[10.0.0.1]:2222", key)  # known by now: not written twice
    assert len(known.in_use.read_text().splitlines()) == 1
    with pytest.raises(HostKeyError, match="CHANGED"):
        known.remember("[10.0.0.1]:2222", new_key())


def test_a_hundred_threads_accepting_keys_at_once(tmp_path: Path) -> None:
    known = KnownHosts(tmp_path / "known_hosts", tmp_path / "global")
    keys = {f"host{index}.example": new_key() for index in range(100)}
    start = threading.Barrier(100)

    def accept(name: str) -> None:
        start.wait()
        known.remember(name, keys[name])

    threads = [threading.Thread(target=accept, args=(name,)) for name in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = known.in_use.read_text().splitlines()
    assert len(lines) == 100
    saved = load_known_hosts(paramiko.HostKeys(), known.in_use)
    for name, key in keys.items():
        assert saved.lookup(name)[key.get_name()] == key  # type: ignore[index]


def test_a_line_is_never_glued_to_a_hand_edited_last_line(tmp_path: Path) -> None:
    known = KnownHosts(tmp_path / "known_hosts", tmp_path / "global")
    first, second = new_key(), new_key()
    known.in_use.write_text(f"one {first.get_name()} {first.get_base64()}")  # no newline
    known.remember("two", second)
    saved = load_known_hosts(paramiko.HostKeys(), known.in_use)
    assert saved.lookup("one") is not None and saved.lookup("two") is not None


def test_hashed_names_are_honoured(tmp_path: Path) -> None:
    key = new_key()
    path = tmp_path / "known_hosts"
    path.write_text(f"[192.0.2.7]:2222 {key.get_name()} {key.get_base64()}\n")
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(path)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert path.read_text().startswith("|1|")
    saved = load_known_hosts(paramiko.HostKeys(), path)
    assert saved.lookup("[192.0.2.7]:2222")[key.get_name()] == key  # type: ignore[index]
    assert saved.lookup("[192.0.2.8]:2222") is None


def test_a_corrupt_known_hosts_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text("# comment\n\nhost ssh-ed25519 AAAA!!!notbase64=\n")
    with pytest.raises(HostKeyError, match=r"known_hosts:3: not a valid known_hosts line"):
        load_known_hosts(paramiko.HostKeys(), path)


def test_building_an_ssh_connection_does_no_io(tmp_path: Path) -> None:
    """Test double: a listener that records whether anyone connected."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.3)
        config = tmp_path / "missing" / "ssh_config"  # read by open(), not before
        host = Host(name="h", address="127.0.0.1", port=listener.getsockname()[1])
        connection = SSHConnection(host, ConnectOptions(ssh_config=config))
        with pytest.raises(TimeoutError):
            listener.accept()
        with pytest.raises(ConnectError, match="h: connection not opened yet"):
            connection.start(["true"])
        connection.close()
        connection.close()  # idempotent
        with pytest.raises(ConnectError, match="opened only once"):
            connection.open()


def test_local_process_stdin_closed_is_a_connect_error() -> None:
    process = LocalConnection(Host(name="here", address="local"), ConnectOptions()) \
        .start(["cat"])
    process.send(b"ping\n")
    process.close_stdin()
    process.close_stdin()  # idempotent
    with pytest.raises(ConnectError, match="local agent gone"):
        process.send(b"ping\n")
    assert process.recv(100) == b"ping\n"
    assert process.wait() == 0


def test_local_process_gone_is_a_connect_error() -> None:
    process = LocalConnection(Host(name="here", address="local"), ConnectOptions()) \
        .start(["true"])
    process.wait()
    with pytest.raises(ConnectError, match="local agent gone"):
        for _ in range(100):  # the pipe's buffer may take the first writes
            process.send(b"x" * 65536)


def sleepers(tag: str) -> list[int]:
    """PIDs of this test's own `sleep` processes, told apart by their argument."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[:2] == [b"sleep", tag.encode()]:
            found.append(int(entry.name))
    return found


def test_a_silent_local_command_is_killed_after_its_timeout() -> None:
    connection = LocalConnection(Host(name="here", address="local"), ConnectOptions())
    tag = f"{30 + os.getpid() % 1000 / 1000:.3f}"
    started = time.monotonic()
    with pytest.raises(ConnectError, match=r"here: sleep: no answer within 0.5s"):
        run_command(connection, ["sleep", tag], timeout=0.5)
    assert time.monotonic() - started < 5
    assert sleepers(tag) == []


def test_a_command_that_keeps_talking_is_not_cut_off() -> None:
    connection = LocalConnection(Host(name="here", address="local"), ConnectOptions())
    script = "for i in 1 2 3 4 5; do echo $i; sleep 0.2; done"
    done = run_command(connection, ["sh", "-c", script], timeout=0.6)
    assert done.status == 0 and done.stdout.split() == [b"1", b"2", b"3", b"4", b"5"]


def test_a_failed_local_upload_leaves_no_partial_file(tmp_path: Path) -> None:
    connection = LocalConnection(Host(name="here", address="local"), ConnectOptions())
    source = tmp_path / "module.ko"
    source.write_bytes(b"x" * 1000)
    target = tmp_path / "work" / "m.ko"
    target.mkdir(parents=True)
    (target / "keep").write_text("a directory is in the way")
    with pytest.raises(ConnectError, match="copy of module.ko"):
        connection.put(source, str(target))
    assert sorted(path.name for path in target.parent.iterdir()) == ["m.ko"]
    connection.put(source, str(tmp_path / "work" / "n.ko"))
    assert (tmp_path / "work" / "n.ko").read_bytes() == source.read_bytes()
    assert sorted(path.name for path in target.parent.iterdir()) == ["m.ko", "n.ko"]
