"""Differential results: what a run's hosts printed that a baseline run of the same
manifest did not, and the other way round, after the manifest's normalisation (``diff:``).

Lines are compared as sets per host (and per probe when the manifest has several), as
osquery's differential results are: a line printed twice is one line. Both runs are read
from their folders, one host at a time, so a comparison never holds a whole run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from stapctl.errors import StapctlError
from stapctl.models import Difference, DiffSpec, HostDifference
from stapctl.store import DIFFERENCE_FILE, read_log

MAX_DIFFERENCE_LINES = 10_000  # lines kept per host and direction; the totals count all


def compare(run: str, folder: Path, baseline: str, baseline_folder: Path,
            hosts: Iterable[str], spec: DiffSpec, many_probes: bool) -> Difference:
    """The difference of ``run`` from ``baseline`` on ``hosts`` (those of either run)."""
    changed: list[HostDifference] = []
    for host in sorted(set(hosts)):
        now = _normalised_lines(folder, host, spec, many_probes)
        before = _normalised_lines(baseline_folder, host, spec, many_probes)
        added, removed = sorted(now - before), sorted(before - now)
        if added or removed:
            changed.append(HostDifference(
                host, tuple(added[:MAX_DIFFERENCE_LINES]), tuple(removed[:MAX_DIFFERENCE_LINES]),
                added_total=len(added), removed_total=len(removed)))
    return Difference(run=run, baseline=baseline, hosts=tuple(changed))


def _normalised_lines(folder: Path, host: str, spec: DiffSpec, many_probes: bool) -> set[str]:
    lines: set[str] = set()
    for probe, raw in read_log(folder, host, many_probes):
        line = spec.normalise(raw.decode("utf-8", "replace"))
        lines.add(f"[{probe}] {line}" if many_probes else line)
    return lines


def recorded_hosts(folder: Path) -> list[str]:
    """The hosts a finished run had (its summary.json); none if it has no summary."""
    return sorted({str(o["host"]) for o in _read_json(folder / "summary.json",
                                                        {}).get("outcomes", [])})


def recorded_many_probes(folder: Path) -> bool:
    """Whether a run's host logs prefix each line with its probe (several probes)."""
    return len({str(job["probe"]) for job in _read_json(folder / "plan.json", [])}) > 1


def read_difference(folder: Path) -> Difference | None:
    """The difference recorded with a run (apply --baseline), if there is one."""
    data = _read_json(folder / DIFFERENCE_FILE, None)
    if data is None:
        return None
    try:
        return Difference(run=str(data["run"]), baseline=str(data["baseline"]), hosts=tuple(
            HostDifference(host=str(h["host"]), added=tuple(map(str, h["added"])),
                           removed=tuple(map(str, h["removed"])),
                           added_total=int(h["added_total"]),
                           removed_total=int(h["removed_total"]))
            for h in data["hosts"]))
    except (KeyError, TypeError, ValueError):
        raise StapctlError(f"{folder / DIFFERENCE_FILE} is not a difference stapctl "
                           "wrote; remove it") from None


def difference_lines(difference: Difference) -> Iterator[str]:
    """diff(1)-like text: each changed host, then its lines with '+' or '-'."""
    for host in difference.hosts:
        yield f"--- {host.host}"
        for sign, lines, total in (("+", host.added, host.added_total),
                                   ("-", host.removed, host.removed_total)):
            for line in lines:
                yield f"{sign} {line}"
            if total > len(lines):
                yield f"{sign} … {total - len(lines)} more line(s) not recorded"


def _read_json(path: Path, missing: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return missing
    except (OSError, ValueError) as error:
        raise StapctlError(f"cannot read {path}: {error}") from None
