"""Schedules: a manifest applied by a systemd timer, the ecosystem's scheduler.

`stapctl schedule add` writes two units, ``stapctl-NAME.timer`` and
``stapctl-NAME.service``, into the system's (or with ``--user`` the user's) unit folder;
the service runs ``stapctl apply --baseline last`` with absolute paths, so each run is
compared with the one before and recorded in the same history as a manual apply. The
unit files are the only state: `list`, `remove` and `run` read them, so a unit edited by
hand is what runs.

Quoting follows systemd.service(5): a word with anything but plain characters is
double-quoted with ``\\`` and ``"`` escaped, ``%`` is written ``%%`` and ``$`` ``$$``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

from stapctl.config import config_path
from stapctl.errors import StapctlError, UsageError
from stapctl.models import Manifest
from stapctl.store import data_dir

UNIT_PREFIX = "stapctl-"
MARK = "# Written by `stapctl schedule add`; `stapctl schedule remove {name}` removes it."
STOP_TIMEOUT = 120  # seconds systemd waits after SIGTERM: agents stop, drain and unload
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_@+=:,./-]+")
# where stapctl keeps state, and its settings: a schedule records into the same history
_PASSED_ENVIRONMENT = ("STAPCTL_CACHE_DIR", "STAPCTL_LAB_DIR", "STAPCTL_CONFIG",
                       "STAPCTL_HISTORY")


def unit_dir(user: bool, override: Path | None = None) -> Path:
    """Where units go: ``--unit-dir``, else $STAPCTL_UNIT_DIR, else systemd's folder for
    the administrator's units (or the user's, with ``--user``)."""
    if override is not None:
        return override
    if configured := os.environ.get("STAPCTL_UNIT_DIR"):
        return Path(configured)
    if user:
        config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
        return Path(config) / "systemd" / "user"
    return Path("/etc/systemd/system")


@dataclass(frozen=True)
class Schedule:
    """A schedule as its unit files say."""

    name: str
    timer: Path
    service: Path
    when: str  # "every 3600s" or "on-calendar hourly", from the timer
    command: tuple[str, ...]  # the service's ExecStart
    after: tuple[tuple[str, ...], ...] = ()  # its ExecStopPost: the retention
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def retention(self) -> str:
        """The options of its `runs prune` (--keep, --older-than), or "-"."""
        prunes = [command[command.index("prune") + 1:] for command in self.after
                  if "prune" in command]
        return "; ".join(" ".join(words) for words in prunes) or "-"


def add(manifest: Manifest, directory: Path, *, name: str | None = None,
        every: float | None = None, on_calendar: str | None = None, user: bool = False,
        inventory: Path | None = None, keep: int | None = None,
        older_than: float | None = None) -> Schedule:
    """Write the timer and the service of a new schedule; UsageError if it exists or an
    argument cannot be used."""
    name = name or manifest.name
    if not _NAME.fullmatch(name):
        raise UsageError(f"schedule name {name!r}: use 1 to 40 lowercase letters, digits or "
                         "'-', not starting with '-'")
    if (every is None) == (on_calendar is None):
        raise UsageError("say when: --every 1h or --on-calendar SPEC (one of them)")
    if on_calendar is not None:
        _check_calendar(on_calendar)
    if urlsplit(os.environ.get("STAPCTL_HISTORY", "")).password is not None:
        raise UsageError("STAPCTL_HISTORY holds a password, which the schedule's unit would "
                         "show to every user: put the history's URL in the settings file "
                         f"{config_path()}, and the password there or in ~/.pgpass")
    timer, service = _units(directory, name)
    if timer.exists() or service.exists():
        raise UsageError(f"schedule {name} exists ({timer}): `stapctl schedule remove "
                         f"{name}` first, or give --name")
    stapctl = stapctl_command()
    apply = [*stapctl, "apply", "--baseline", "last"]
    if inventory is not None:
        apply += ["-i", str(inventory.resolve())]
    apply.append(str(manifest.path.resolve()))
    prune = [*stapctl, "runs", "prune", "--manifest", manifest.name]
    if keep is not None:
        prune += ["--keep", str(keep)]
    if older_than is not None:
        prune += ["--older-than", f"{older_than:g}s"]
    environment = {"XDG_DATA_HOME": str(data_dir().parent)}  # the history of manual runs
    environment |= {key: os.environ[key] for key in _PASSED_ENVIRONMENT if key in os.environ}
    when = (f"OnCalendar={_escape_specifiers(on_calendar)}\nPersistent=true"
            if on_calendar is not None else f"OnBootSec={every:g}s\nOnUnitActiveSec={every:g}s")
    network = "" if user else "Wants=network-online.target\nAfter=network-online.target\n"
    retention = (f"ExecStopPost={_quote_command(prune)}\n"
                 if keep is not None or older_than is not None else "")
    _write(service, (
        f"{MARK.format(name=name)}\n[Unit]\n"
        f"Description=stapctl apply {_escape_specifiers(manifest.name)} (schedule {name})\n"
        f"{network}\n[Service]\nType=oneshot\n"
        + "".join(f"Environment={_quote_word(f'{key}={value}', dollar=False)}\n"
                  for key, value in environment.items())
        + f"ExecStart={_quote_command(apply)}\n{retention}"
        f"KillMode=mixed\nKillSignal=SIGTERM\nTimeoutStopSec={STOP_TIMEOUT}\n"
        "SuccessExitStatus=143\n"))
    _write(timer, (
        f"{MARK.format(name=name)}\n[Unit]\nDescription=stapctl schedule {name}\n\n"
        f"[Timer]\n{when}\nUnit={service.name}\n\n[Install]\nWantedBy=timers.target\n"))
    return read(directory, name)


def stapctl_command() -> list[str]:
    """This stapctl by its absolute path: the console script beside this Python (a
    venv's bin), else this Python running the package."""
    script = Path(sys.executable).parent / "stapctl"
    if os.access(script, os.X_OK):
        return [str(script.absolute())]
    return [str(Path(sys.executable).absolute()), "-m", "stapctl"]


def list_schedules(directory: Path) -> list[Schedule]:
    if not directory.is_dir():
        return []
    names = sorted(path.name[len(UNIT_PREFIX):-len(".timer")]
                   for path in directory.glob(f"{UNIT_PREFIX}*.timer"))
    return [read(directory, name) for name in names if _is_ours(directory / f"{UNIT_PREFIX}"
                                                                 f"{name}.timer")]


def read(directory: Path, name: str) -> Schedule:
    """A schedule from its unit files; UsageError if there is none or it is unreadable."""
    timer, service = _units(directory, name)
    if not timer.is_file() or not service.is_file():
        raise UsageError(f"no schedule {name} in {directory} (`stapctl schedule list` shows "
                         "them; --user for user units)")
    timer_keys = _unit_keys(timer)
    service_keys = _unit_keys(service)
    if timer_keys.get("OnCalendar"):
        when = "on-calendar " + _unescape(timer_keys["OnCalendar"][-1], service, dollar=False)
    else:
        when = "every " + (timer_keys.get("OnUnitActiveSec") or ["?"])[-1]
    commands = service_keys.get("ExecStart") or []
    if len(commands) != 1:
        raise UsageError(f"{service}: expected one ExecStart=, found {len(commands)}")
    environment: dict[str, str] = {}
    for line in service_keys.get("Environment", []):
        for word in _split(line, service, dollar=False):
            key, _, value = word.partition("=")
            environment[key] = value
    return Schedule(name=name, timer=timer, service=service, when=when,
                    command=_split(commands[0], service),
                    after=tuple(_split(line, service)
                                for line in service_keys.get("ExecStopPost", [])),
                    environment=environment)


def remove(directory: Path, name: str) -> None:
    """Remove both units, whatever their commands say, if stapctl wrote them."""
    units = _units(directory, name)
    if not any(path.is_file() for path in units):
        raise UsageError(f"no schedule {name} in {directory} (`stapctl schedule list` shows "
                         "them; --user for user units)")
    for path in units:
        if path.is_file() and not _is_ours(path):
            raise UsageError(f"{path} was not written by stapctl: remove it yourself")
    for path in units:
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            raise StapctlError(f"cannot remove {path}: {error.strerror} (as root, or --user "
                               "for user units)") from None


def run_now(schedule: Schedule) -> int:
    """The service's command in the foreground, as systemd would run it, then its
    ExecStopPost (the retention); returns the command's exit code.

    SIGTERM and SIGHUP are passed on to the command (it stops its probes cleanly);
    Ctrl-C reaches it from the terminal directly, so here SIGINT is only waited out."""
    environment = {**os.environ, **schedule.environment}
    try:
        process = subprocess.Popen(schedule.command, env=environment)
    except OSError as error:
        raise StapctlError(f"{schedule.service}: cannot run {schedule.command[0]}: "
                           f"{error.strerror}") from None

    def pass_on(signum: int, frame: FrameType | None) -> None:
        process.send_signal(signum)

    previous = {signum: signal.signal(signum, pass_on)
                for signum in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for command in schedule.after:
        subprocess.run(command, env=environment, check=False)
    return code if code >= 0 else 128 - code


# -- unit files ---------------------------------------------------------------------------
def _units(directory: Path, name: str) -> tuple[Path, Path]:
    return (directory / f"{UNIT_PREFIX}{name}.timer",
            directory / f"{UNIT_PREFIX}{name}.service")


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as error:
        raise StapctlError(f"cannot write {path}: {error.strerror} (as root, or --user for "
                           "user units, or --unit-dir)") from None


def _is_ours(path: Path) -> bool:
    with path.open(errors="replace") as stream:
        return stream.readline().startswith(MARK.split(";")[0])


def _unit_keys(path: Path) -> dict[str, list[str]]:
    """Key → its values in order, of every section (the keys read here are unique to
    theirs); comments and blank lines skipped, continuation lines joined."""
    keys: dict[str, list[str]] = {}
    for line in _logical_lines(path):
        if line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def _logical_lines(path: Path) -> Iterator[str]:
    pending = ""
    for raw in path.read_text(errors="replace").splitlines():
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        yield (pending + raw).strip()
        pending = ""
    if pending:
        yield pending.strip()


def _quote_command(argv: Sequence[str]) -> str:
    return " ".join(_quote_word(word) for word in argv)


def _quote_word(word: str, dollar: bool = True) -> str:
    if any(ord(c) < 0x20 or ord(c) == 0x7f for c in word):
        raise UsageError(f"{word!r} has a control character: it cannot go in a unit file")
    word = _escape_specifiers(word)
    if dollar:
        word = word.replace("$", "$$")
    if _PLAIN_WORD.fullmatch(word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _escape_specifiers(text: str) -> str:
    return text.replace("%", "%%")


def _split(value: str, path: Path, dollar: bool = True) -> tuple[str, ...]:
    """A command line (or Environment=) of a unit as argv; the ``-+!:`` prefixes of
    Exec lines are dropped."""
    value = value.lstrip("-+!:")
    try:
        words = shlex.split(value)
    except ValueError as error:
        raise UsageError(f"{path}: cannot read {value!r}: {error}") from None
    if not words:
        raise UsageError(f"{path}: an empty command")
    return tuple(_unescape(word, path, dollar) for word in words)


def _unescape(word: str, path: Path, dollar: bool = True) -> str:
    """``%%`` → ``%`` and ``$$`` → ``$``; any other specifier or variable is systemd's
    to expand, not ours."""
    special = "%$" if dollar else "%"
    out: list[str] = []
    index = 0
    while index < len(word):
        char = word[index]
        if char in special:
            if word[index + 1:index + 2] != char:
                raise UsageError(f"{path}: {word!r} uses a systemd specifier or variable "
                                 "stapctl does not expand: run it with systemctl start")
            index += 1
        out.append(char)
        index += 1
    return "".join(out)


def _check_calendar(spec: str) -> None:
    """systemd's own check of an OnCalendar= expression, where systemd is installed."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    result = subprocess.run([analyze, "calendar", spec], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["not a calendar expression"])[-1]
        raise UsageError(f"--on-calendar {spec!r}: {reason} (see systemd.time(7), e.g. "
                         "'hourly', '*-*-* 02:00:00', 'Mon..Fri 09:00')")
