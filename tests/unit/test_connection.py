"""The connection package's own logic: ProxyJump specs and known_hosts files."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import paramiko
import pytest

from stapctl.connection.known_hosts import KnownHosts, load_known_hosts
from stapctl.connection.ssh import jump_chain, parse_jump
from stapctl.errors import ConnectError, HostKeyError

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


def test_a_known_hosts_file_is_read_again_once_it_changes(tmp_path: Path) -> None:
    first, second = new_key(), new_key()
    path = tmp_path / "known_hosts"
    path.write_text(f"h1 {first.get_name()} {first.get_base64()}\n")
    assert load_known_hosts(paramiko.HostKeys(), path).lookup("h1") is not None
    path.write_text(f"h2 {second.get_name()} {second.get_base64()}\n")  # rewritten
    again = load_known_hosts(paramiko.HostKeys(), path)
    assert again.lookup("h1") is None
    assert again.lookup("h2")[second.get_name()] == second  # type: ignore[index]
    path.unlink()
    assert load_known_hosts(paramiko.HostKeys(), path).lookup("h2") is None
