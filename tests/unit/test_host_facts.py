"""What a target reports is hostile: facts that are not plain names are refused where they
are read, and a module is hashed again before it is shipped.

The target is this machine through the real LocalConnection, with a test double for
`uname` put first on PATH so that it can report what a hostile host would.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from stapctl.agent import AGENT_FILE, AgentHost
from stapctl.connection import ConnectOptions, LocalConnection
from stapctl.errors import AgentError, BadFactsError
from stapctl.facts import is_safe_fact, shown
from stapctl.models import Host

pytestmark = pytest.mark.unit

FAKE_UNAME = """#!/bin/sh
# test double for uname: reports the release and machine the test chose
case "$1" in
  -r) printf '%s\\n' "$FAKE_RELEASE" ;;
  -m) printf '%s\\n' "$FAKE_ARCH" ;;
  -rm) printf '%s %s\\n' "$FAKE_RELEASE" "$FAKE_ARCH" ;;
esac
"""


@pytest.fixture
def target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AgentHost:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "uname").write_text(FAKE_UNAME)
    (bin_dir / "uname").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("FAKE_RELEASE", "6.1.0-28-amd64")
    monkeypatch.setenv("FAKE_ARCH", "x86_64")
    host = Host(name="local", address="local")
    return AgentHost(LocalConnection(host, ConnectOptions()))


@pytest.mark.parametrize("release", ["6.1.0-28-amd64", "5.14.0-427.13.1.el9_4.x86_64",
                                     "6.9.0-060900rc1-generic", "4.19.0+"])
def test_real_releases_are_accepted(target: AgentHost, monkeypatch: pytest.MonkeyPatch,
                                    release: str) -> None:
    monkeypatch.setenv("FAKE_RELEASE", release)
    facts = target.prepare()
    assert (facts.release, facts.arch) == (release, "x86_64")


@pytest.mark.parametrize("release", ["../../x", "/x", "-x", ".x", "a b", "a;b", "x" * 65,
                                     "6.1\x1b[31m", "6.1\u202e"])
def test_a_release_unfit_for_a_path_is_refused(target: AgentHost,
                                               monkeypatch: pytest.MonkeyPatch,
                                               release: str) -> None:
    monkeypatch.setenv("FAKE_RELEASE", release)
    with pytest.raises(BadFactsError, match="kernel release") as caught:
        target.prepare()
    message = str(caught.value)
    assert shown(release) in message
    assert message.isascii() and message.isprintable()


@pytest.mark.parametrize("arch", ["-x86_64", "../x", ""])
def test_an_arch_unfit_for_a_path_is_refused(target: AgentHost,
                                             monkeypatch: pytest.MonkeyPatch,
                                             arch: str) -> None:
    monkeypatch.setenv("FAKE_ARCH", arch)
    with pytest.raises(AgentError):  # an empty line is a bad fact or a short answer
        target.prepare()


def test_a_long_hostile_release_is_shown_cut_short(target: AgentHost,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_RELEASE", "../" * 1000)
    with pytest.raises(BadFactsError) as caught:
        target.prepare()
    assert len(str(caught.value)) < 300
    assert "'../../" in str(caught.value)


def test_the_work_directory_is_made_private_and_the_agent_sent_once(
        target: AgentHost, tmp_path: Path) -> None:
    target.prepare()
    workdir = tmp_path / "home" / ".cache" / "stapctl-agent"
    assert target.workdir == str(workdir) and target.modules == set()
    assert workdir.stat().st_mode & 0o777 == 0o700
    assert Path(target.path).read_bytes() == AGENT_FILE.read_bytes()
    sent = Path(target.path).stat().st_mtime_ns
    (workdir / f"{'0' * 64}.ko").write_bytes(b"m")
    (workdir / f"{'1' * 64}.ko").symlink_to(workdir / f"{'0' * 64}.ko")
    again = AgentHost(target.connection)
    again.prepare()
    assert again.path == target.path and Path(target.path).stat().st_mtime_ns == sent
    assert again.modules == {f"{'0' * 64}.ko"}  # a symlink is no module


@pytest.mark.parametrize("mode", [0o755, 0o710, 0o701])
def test_a_work_directory_others_can_enter_is_refused(target: AgentHost, tmp_path: Path,
                                                      mode: int) -> None:
    workdir = tmp_path / "home" / ".cache" / "stapctl-agent"
    workdir.mkdir(parents=True)
    workdir.chmod(mode)
    with pytest.raises(AgentError, match="must be a private directory") as caught:
        target.prepare()
    assert str(workdir) in str(caught.value)
    assert list(workdir.iterdir()) == []  # no agent sent into it


def test_a_work_directory_that_is_a_symlink_is_refused(target: AgentHost,
                                                       tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "home" / ".cache").mkdir()
    (tmp_path / "home" / ".cache" / "stapctl-agent").symlink_to(elsewhere)
    with pytest.raises(AgentError, match="must be a private directory"):
        target.prepare()
    assert list(elsewhere.iterdir()) == []


def test_the_rule() -> None:
    assert is_safe_fact("x86_64") and is_safe_fact("a" * 64)
    assert not is_safe_fact("a" * 65) and not is_safe_fact("6.1\n")
    assert not is_safe_fact("６.1")  # non-ASCII digits are not digits here
    assert shown("a\nb") == "'a\\nb'"
    assert len(shown("x" * 1000)) == 80


def test_a_module_that_changed_since_it_was_built_is_not_sent(
        target: AgentHost, tmp_path: Path) -> None:
    target.prepare()
    module = tmp_path / "module.ko"
    module.write_bytes(b"built module")
    sha256 = hashlib.sha256(b"built module").hexdigest()
    module.write_bytes(b"planted module")
    with pytest.raises(AgentError, match="changed after it was built"):
        target.module(module, sha256)
    module.write_bytes(b"built module")
    remote, data = target.module(module, sha256)
    assert (remote, data) == (f"{target.workdir}/{sha256}.ko", b"built module")
    # sent once: the next job on the host finds it there, unless it is to be sent again
    assert target.module(module, sha256) == (remote, b"")
    assert target.module(module, sha256, again=True) == (remote, b"built module")


def test_a_module_the_host_holds_is_not_sent(target: AgentHost, tmp_path: Path) -> None:
    module = tmp_path / "module.ko"
    module.write_bytes(b"built module")
    sha256 = hashlib.sha256(b"built module").hexdigest()
    target.prepare()
    Path(f"{target.workdir}/{sha256}.ko").write_bytes(b"built module")
    target.prepare()  # its listing names the module now
    assert target.module(module, sha256) == (f"{target.workdir}/{sha256}.ko", b"")


def test_a_sha256_that_is_no_file_name_is_refused(target: AgentHost, tmp_path: Path) -> None:
    target.prepare()
    module = tmp_path / "module.ko"
    module.write_bytes(b"m")
    with pytest.raises(AgentError, match="is not a sha256"):
        target.module(module, "../../etc/x")
    with pytest.raises(AgentError, match="cannot read the module"):
        target.module(tmp_path / "gone.ko", "0" * 64)
