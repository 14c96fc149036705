"""What the controller imports at its start, and what it leaves until it is used."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit


def test_the_cli_starts_without_what_paramiko_needs_only_for_match_exec() -> None:
    code = "import sys, stapctl.cli; print(sorted({'asyncio', 'unittest.mock'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_an_ssh_config_match_exec_still_runs_its_command(tmp_path: Path) -> None:
    """(In a process of its own: invoke runs the command with the process's stdin.)"""
    ran = tmp_path / "ran"
    config = tmp_path / "config"
    config.write_text(f'Match exec "touch {ran}"\n  Port 2222\n')
    code = ("import sys; from pathlib import Path; from stapctl.models import Host; "
            "from stapctl.connection.ssh import with_ssh_config; "
            "host = Host(name='h', address='192.0.2.1'); "
            "print(with_ssh_config(host, Path(sys.argv[1]))[0].port)")
    out = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True,
                         text=True, check=True, stdin=subprocess.DEVNULL).stdout
    assert out.strip() == "2222" and ran.exists()
