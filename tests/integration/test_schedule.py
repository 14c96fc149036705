"""Schedules through the real CLI: the units it writes are checked by Debian's
systemd-analyze, and `schedule run` runs the service's own command line, recording to the
same history as a manual apply."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stapctl import history, schedule

pytestmark = pytest.mark.integration

ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze (Debian's systemd package) is not installed")

# a host that refuses connections at once: a run that is quick, fails, and is recorded
MANIFEST = """\
apiVersion: stapctl/v1
kind: Trace
name: nightly-audit
inventory:
  hosts:
    refused: {address: 127.0.0.1, port: 1}
probes:
  - name: hello
    script: 'probe oneshot { println("hello") }'
"""


def stapctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stapctl", *args], capture_output=True,
                          text=True, check=False, env=env or os.environ, timeout=120)


def write_manifest(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "audit.yaml"
    path.write_text(MANIFEST)
    return path


def verify(units: Path, name: str, *scope: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    runtime = units.parent / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    return subprocess.run(
        [ANALYZE, *scope, "verify", str(units / f"stapctl-{name}.timer"),
         str(units / f"stapctl-{name}.service")],
        capture_output=True, text=True, check=False,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})


@needs_systemd_analyze
@pytest.mark.parametrize("scope", [(), ("--user",)], ids=["system", "user"])
def test_the_units_pass_systemd_analyze_verify(tmp_path: Path, scope: tuple[str, ...]) -> None:
    # a folder with a space, '%' and '$': systemd's quoting, specifiers and variables
    manifest = write_manifest(tmp_path / "odd 100% $HOME")
    units = tmp_path / "units"
    for args in (["--every", "1h"], ["--on-calendar", "*-*-* 02:00:00", "--name", "at-two",
                                     "--keep", "5", "--older-than", "30d"]):
        added = stapctl("schedule", "add", str(manifest), *args, *scope,
                        "--unit-dir", str(units))
        assert added.returncode == 0, added.stderr

    for name in ("nightly-audit", "at-two"):
        checked = verify(units, name, *scope)
        assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")
    service = (units / "stapctl-nightly-audit.service").read_text()
    assert "KillSignal=SIGTERM" in service and "SuccessExitStatus=143" in service
    assert ("Wants=network-online.target" in service) == (scope == ())
    timer = (units / "stapctl-at-two.timer").read_text()
    assert "OnCalendar=*-*-* 02:00:00" in timer and "Persistent=true" in timer

    read = schedule.read(units, "at-two")
    assert read.command == (*schedule.stapctl_command(), "apply", "--baseline", "last",
                            str(manifest.resolve()))
    assert read.retention == "--manifest nightly-audit --keep 5 --older-than 2.592e+06s"
    listed = stapctl("schedule", "list", "--unit-dir", str(units))
    assert listed.returncode == 0
    assert "at-two" in listed.stdout and "on-calendar *-*-* 02:00:00" in listed.stdout
    assert "every 3600s" in listed.stdout and str(manifest.resolve()) in listed.stdout


@needs_systemd_analyze
def test_a_broken_unit_fails_systemd_analyze(tmp_path: Path) -> None:
    """The check above can fail: a unit with a mistake in it is reported."""
    units = tmp_path / "units"
    assert stapctl("schedule", "add", str(write_manifest(tmp_path)), "--every", "1h",
                   "--unit-dir", str(units)).returncode == 0
    service = units / "stapctl-nightly-audit.service"
    service.write_text(service.read_text().replace("KillSignal=SIGTERM", "KillSignal=SIGNOPE"))
    checked = verify(units, "nightly-audit")
    assert "SIGNOPE" in checked.stderr


def test_schedule_run_records_to_the_history_and_keeps_its_retention(
        tmp_path: Path, history_where: str | Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = tmp_path / "config.yaml"  # the history as the settings file names it
    settings.write_text(f"history: {history_where}\n")
    monkeypatch.setenv("STAPCTL_CONFIG", str(settings))
    units = tmp_path / "units"
    manifest = write_manifest(tmp_path)
    assert stapctl("schedule", "add", str(manifest), "--every", "15m", "--keep", "2",
                   "--unit-dir", str(units)).returncode == 0
    # the service names this history; the run must land in it whatever the caller's is
    elsewhere = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "elsewhere")}
    codes = [stapctl("schedule", "run", "nightly-audit", "--unit-dir", str(units),
                     env=elsewhere).returncode for _ in range(3)]
    assert codes == [1, 1, 1]  # the one host refused the connection: "every host failed"

    runs = history.list_runs()
    assert len(runs) == 2 and {row["name"] for row in runs} == {"nightly-audit"}
    assert all(row["exit_code"] == 1 and row["failed"] == 1 for row in runs)
    assert not (tmp_path / "elsewhere").exists()
    manual = stapctl("apply", str(manifest))
    assert manual.returncode == 1
    assert len(history.list_runs()) == 3  # the manual run sits in the same history

    removed = stapctl("schedule", "remove", "nightly-audit", "--unit-dir", str(units))
    assert removed.returncode == 0 and list(units.iterdir()) == []
    gone = stapctl("schedule", "run", "nightly-audit", "--unit-dir", str(units))
    assert gone.returncode == 2 and "no schedule nightly-audit" in gone.stderr


def test_a_history_password_is_never_written_into_a_unit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAPCTL_HISTORY", "postgresql://stapctl:hunter2@db.invalid/history")
    added = stapctl("schedule", "add", str(write_manifest(tmp_path)), "--every", "1h",
                    "--unit-dir", str(tmp_path / "units"))
    assert added.returncode == 2 and "holds a password" in added.stderr
    assert "hunter2" not in added.stderr and not (tmp_path / "units").exists()


def test_bad_schedules_are_one_clear_line(tmp_path: Path) -> None:
    units = tmp_path / "units"
    manifest = str(write_manifest(tmp_path))
    for args, expected in [
        (["--every", "often"], "--every"),
        ([], "--every 1h or --on-calendar"),
        (["--every", "1h", "--on-calendar", "hourly"], "one of them"),
        (["--every", "1h", "--name", "Bad_Name"], "lowercase"),
    ] + ([(["--on-calendar", "when pigs fly"], "calendar")] if ANALYZE else []):
        result = stapctl("schedule", "add", manifest, *args, "--unit-dir", str(units))
        assert result.returncode == 2, (args, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr
    assert stapctl("schedule", "add", manifest, "--every", "1h", "--unit-dir",
                   str(units)).returncode == 0
    again = stapctl("schedule", "add", manifest, "--every", "1h", "--unit-dir", str(units))
    assert again.returncode == 2 and "exists" in again.stderr


def test_a_unit_edited_by_hand_is_what_runs_and_what_stapctl_cannot_expand_is_refused(
        tmp_path: Path) -> None:
    units = tmp_path / "units"
    assert stapctl("schedule", "add", str(write_manifest(tmp_path)), "--every", "1h",
                   "--unit-dir", str(units)).returncode == 0
    service = units / "stapctl-nightly-audit.service"
    text = service.read_text()
    marker = tmp_path / "ran it"
    edited = text.replace("\nExecStart=", f'\nExecStart=/usr/bin/touch "{marker}"\n#', 1)
    service.write_text(edited)
    ran = stapctl("schedule", "run", "nightly-audit", "--unit-dir", str(units))
    assert ran.returncode == 0 and marker.exists()

    service.write_text(text.replace("\nExecStart=", "\nExecStart=/usr/bin/touch %h/x\n#", 1))
    refused = stapctl("schedule", "run", "nightly-audit", "--unit-dir", str(units))
    assert refused.returncode == 2 and "systemd specifier" in refused.stderr

    timer = units / "stapctl-nightly-audit.timer"
    timer.write_text(timer.read_text().replace("# Written by", "# Mine, not", 1))
    kept = stapctl("schedule", "remove", "nightly-audit", "--unit-dir", str(units))
    assert kept.returncode == 2 and "not written by stapctl" in kept.stderr
    assert timer.exists() and service.exists()


def test_a_unit_folder_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    added = stapctl("schedule", "add", str(write_manifest(tmp_path)), "--every", "1h",
                    "--unit-dir", str(blocked / "units"))
    assert added.returncode == 1 and "cannot write" in added.stderr
    assert "Traceback" not in added.stderr and len(added.stderr.splitlines()) == 1
