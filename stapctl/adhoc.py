"""An ad-hoc run (`stapctl run PATTERN -e SCRIPT` or `PATTERN script.stp ARG…`): the
manifest a one-liner amounts to.

It is written as YAML and read back through the manifest loader, so every check of a
manifest applies; the run records it like any manifest, and `stapctl runs export` gives
it back as a manifest to keep: the script inline, the options as manifest keys.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stapctl.cache import replace_file
from stapctl.errors import UsageError
from stapctl.manifest import check_script_args, load_manifest
from stapctl.models import Manifest, Target
from stapctl.store import adhoc_manifest_dir
from stapctl.yamldoc import UnreadableFile, read_text

DEFAULT_NAME = "adhoc"
COMM_LENGTH = 15  # the kernel's TASK_COMM_LEN, less its NUL


@dataclass(frozen=True)
class AdhocRun:
    """What `stapctl run` was given; ``script`` (-e) or ``script_file``, not both."""

    hosts: str
    script: str | None = None
    script_file: Path | None = None
    args: Sequence[str] = ()
    variables: Mapping[str, Any] = field(default_factory=dict)
    duration: str | None = None
    forks: int | None = None
    format: str | None = None
    inventory: Path | None = None
    target: Target | None = None


def adhoc_manifest(run: AdhocRun) -> Manifest:
    """The manifest of ``run``, written under its digest and loaded; bad input is a
    UsageError (or the loader's ManifestError) saying what to change."""
    name, text = _script(run)
    try:
        args = check_script_args(run.args)
    except ValueError as error:
        raise UsageError(str(error)) from None
    probe: dict[str, Any] = {"name": name, "script": text}
    if args:
        probe["args"] = list(args)
    if run.duration is not None:
        probe["duration"] = run.duration
    if run.target is not None:
        probe["target"] = run.target.manifest_entry()
    data: dict[str, Any] = {"apiVersion": "stapctl/v1", "kind": "Trace", "name": name,
                            "description": "made by `stapctl run`", "hosts": run.hosts}
    if run.inventory is not None and run.inventory.is_file():
        data["inventory"] = str(run.inventory.resolve())
    if run.variables:
        data["vars"] = dict(run.variables)
    if run.forks is not None:
        data["strategy"] = {"forks": run.forks}
    if run.format is not None:
        data["output"] = {"format": run.format}
    data["probes"] = [probe]
    return load_manifest(_write(yaml.dump(data, Dumper=_Dumper, sort_keys=False,
                                          allow_unicode=True)))


def adhoc_target(pid: int | None, command: str | None, process: str | None,
                 each: bool = False) -> Target | None:
    """The target of `run -x PID`, `-c CMD` or `--process NAME` (`--each`: one run per
    process of that name): at most one of them."""
    given = [option for option, value in (("-x", pid), ("-c", command), ("--process", process))
             if value is not None]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)}: give one target, as stap takes one")
    if command is not None and not command.strip():
        raise UsageError("-c: the command is empty: give one, e.g. -c 'ls /tmp'")
    if process is not None and not 1 <= len(process) <= COMM_LENGTH:
        raise UsageError(f"--process: {process!r} cannot be a process name: a name (comm) is "
                         f"1 to {COMM_LENGTH} characters, as /proc/PID/comm shows it")
    if each and process is None:
        raise UsageError("--each: one run per match needs --process NAME to match, "
                         "e.g. --process nginx --each")
    if not given:
        return None
    return Target(pid=pid, command=command, process=process, each=each)


def _script(run: AdhocRun) -> tuple[str, str]:
    """(probe and manifest name, script text)."""
    if run.script is not None:
        if not run.script.strip():
            raise UsageError("-e: the script is empty: give the probe, e.g. "
                             "-e 'probe oneshot { println(\"hi\") }'")
        return DEFAULT_NAME, run.script
    if run.script_file is None:
        raise UsageError("no script: give one with -e 'probe …' or as a file "
                         "(stapctl run PATTERN script.stp [ARG]…)")
    try:
        text = read_text(run.script_file)
    except UnreadableFile as error:
        raise UsageError(f"script file '{run.script_file}': {error}") from None
    if not text.strip():
        raise UsageError(f"script file '{run.script_file}' is empty")
    # named after the file, within the rule for names: 1 to 40 of [a-z0-9-], no '-' first
    name = re.sub(r"[^a-z0-9-]+", "-", run.script_file.stem.lower()).lstrip("-")[:40]
    return name or DEFAULT_NAME, text


def _write(text: str) -> Path:
    """The manifest's file, named by its content: the same run given again is the same
    manifest (and `--baseline last` compares like with like)."""
    path = adhoc_manifest_dir() / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    if not path.exists():
        replace_file(path, text.encode())
    return path


class _Dumper(yaml.SafeDumper):
    """Multi-line scripts as literal blocks, so the exported manifest reads as written."""


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value.rstrip("\n") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _string)
