"""Shared steps of the end-to-end tests: run the real CLI, look inside a guest."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from stapctl.connection import ConnectOptions, connect, run_command
from stapctl.lab import LabStatus
from stapctl.models import Host


def write_manifest(directory: Path, name: str, script: str, **probe: object) -> Path:
    path = directory / f"{name}.yaml"
    document = {
        "apiVersion": "stapctl/v1", "kind": "Trace", "name": name,
        "probes": [{"name": name, "script": textwrap.dedent(script), **probe}],
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def apply(lab: LabStatus, manifest: Path, *args: str,
          timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """`stapctl apply` as a user runs it, against the lab's inventory."""
    return subprocess.run(
        [sys.executable, "-m", "stapctl", "apply", "-i", str(lab.inventory), *args,
         str(manifest)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def guest_host(lab: LabStatus, index: int = 0) -> Host:
    return lab.host(lab.guests[index].name)


def write_inventory(path: Path, hosts: dict[str, Host]) -> Path:
    """An Ansible inventory of guests from several labs, as a user would write it."""
    path.write_text(yaml.safe_dump({"all": {"hosts": {
        name: {"ansible_host": h.address, "ansible_port": h.port, "ansible_user": h.user,
               "ansible_ssh_private_key_file": h.key_file,
               "stapctl_known_hosts": h.known_hosts}
        for name, h in hosts.items()}}}))
    return path


def guest_run(lab: LabStatus, command: str, index: int = 0) -> str:
    """Run a shell command in a guest and return its stdout."""
    connection = connect(guest_host(lab, index), ConnectOptions())
    try:
        return run_command(connection, ["sh", "-c", command]).stdout.decode()
    finally:
        connection.close()


def stap_modules_loaded(lab: LabStatus, index: int = 0) -> str:
    """Any stapctl module still loaded, and anything left under /proc/systemtap."""
    return guest_run(
        lab, "grep -E '^(stapctl|stap)_' /proc/modules; ls -A /proc/systemtap 2>/dev/null; true",
        index,
    ).strip()


def stap_module_names(lab: LabStatus, index: int = 0) -> set[str]:
    """The names of the SystemTap modules loaded in a guest."""
    return set(guest_run(
        lab, "grep -oE '^(stapctl|stap)_[A-Za-z0-9_]+' /proc/modules; true", index).split())


def unload_stap_modules(lab: LabStatus, names: set[str], index: int = 0) -> set[str]:
    """Kill whatever holds each module's /proc/systemtap files open (an agent, stapio), then
    rmmod it; returns those still loaded."""
    script = "".join(f"""
        for fd in /proc/[0-9]*/fd/*; do
          case "$(readlink "$fd" 2>/dev/null)" in
            /proc/systemtap/{name}/*) pid=${{fd#/proc/}}; kill -KILL "${{pid%%/*}}" ;;
          esac
        done
        for try in 1 2 3 4 5; do rmmod {name} 2>/dev/null && break; sleep 1; done
        """ for name in sorted(names) if re.fullmatch(r"\w+", name))
    guest_run(lab, script, index)
    return stap_module_names(lab, index) & names
