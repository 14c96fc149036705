"""Run records: a folder per apply, and its row in the run history (stapctl.history).

A run folder holds what is needed to understand the run later without the controller:
the manifest as given, the rendered scripts, the plan, every event (JSON lines), each
host's output, and the summary. Records are written as events arrive, so an interrupted
or crashed controller still leaves what it gathered.

Recording never fails the run: a write that fails (disk full, permissions, too many open
files) becomes a warning, and the rest of the record is still written. Run records hold
whatever the probes printed, so they are private to their owner (folders 0700, files
0600), written through the run folder's descriptor, and never follow a symlink.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import suppress
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import platformdirs

from stapctl import report
from stapctl.aggregate import aggregates_json
from stapctl.errors import HistoryError, StapctlError
from stapctl.models import ENDING_EVENT, DetachedProbe, Difference, Event, Host, Manifest, Run
from stapctl.plan import Plan

DIR_MODE = 0o700
FILE_MODE = 0o600
OPEN_HOST_LOGS = 32  # host logs kept open at once; the others are reopened when they print
DIFFERENCE_FILE = "difference.json"  # a run's difference from its baseline
DIFFERENCE_VERSION = 1
DIFF_LINES = 100_000  # lines of one output compared by --diff (both sides are in memory)
MAX_NAME = 100  # characters of a name kept in a file name (file names stop at 255 bytes)
_WRITE = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def data_dir() -> Path:
    return Path(platformdirs.user_data_dir("stapctl"))


HISTORY_FILE = "history.sqlite"  # the default history, in the data folder
LISTING_DELAY = 2.0  # seconds into a run when its row is added to the history
# the events of a (host, probe) whose probe ended: it stops, or it ended some other way
PROBE_ENDED = frozenset({"stopping", *ENDING_EVENT.values()})


def own_data_dir() -> Path:
    """stapctl's data dir, created private, and made private if an older stapctl left it
    readable by others: it holds every run's output."""
    path = data_dir()
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != DIR_MODE:
        path.chmod(DIR_MODE)
    return path


def controller_name() -> str:
    """This controller, as the history rows it records name it."""
    return socket.gethostname()


def run_folder(row: dict[str, Any]) -> Path:
    """A run's folder, if it is on this machine; else a clear error saying where it is
    (a history shared by several controllers lists the runs of all)."""
    folder = Path(row["dir"])
    if folder.is_dir():
        return folder
    if row["controller"] not in ("", controller_name()):
        raise StapctlError(f"run {row['id']} was recorded by the controller "
                           f"{row['controller']}: its folder {folder} is on that machine, "
                           "not on this one")
    raise StapctlError(f"run {row['id']}'s folder {folder} is gone (removed or moved)")


def adhoc_manifest_dir() -> Path:
    """Where the manifests of ad-hoc runs (`stapctl run`) are written, each under its
    content's digest: the history names them as it names any manifest."""
    path = own_data_dir() / "adhoc"
    path.mkdir(mode=DIR_MODE, exist_ok=True)
    return path


class RunRecorder:
    """Writes one run's folder as it happens, and its row in the history.

    Failures to write become `warnings` (each distinct message once) and the run goes on.
    A file that failed once is not written again, so what it holds is whole lines, in
    order, up to the failure.
    """

    def __init__(self, run_id: str, manifest: Manifest,
                 history: str | Path | None = None) -> None:
        if file_name(run_id) != run_id:
            raise StapctlError(f"{run_id!r} is not a valid run id: use letters, digits, "
                               "'-', '_' and '.'")
        base = manifest.output.dir or data_dir() / "runs"
        self.dir = base / run_id
        self.run_id = run_id
        self.history = history
        self.warnings: list[str] = []
        self._manifest = manifest
        self._started = time.time()
        self._many_probes = manifest.labels_output
        self._dir_fd: int | None = None  # the run folder; None: it could not be made
        self._events_fd: int | None = None
        self._host_logs: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._failed_logs: set[str] = set()
        folder_made = self._attempt("create the run folder", self._create_folder)
        if folder_made:
            self._attempt("copy the manifest", self._copy_manifest)
            self._attempt("write events.jsonl", self._open_events)
        self._listed = False
        # a shared history's driver (psycopg) takes a third of a second of CPU to import,
        # and its server a round trip: the row is added in the background two seconds
        # into the run (or at its end, if sooner), off the connects and a short run's
        # lines (on 3 emulated guests sharing 2 cores, a second in was still mid-run), and
        # waited for before it is finished; the driver is imported as soon as every probe
        # of the plan has ended, while a short run waits on its targets (the modules' exit
        # and unload), not while another host's probe is still loading or printing
        self._list_now = threading.Event()
        self._probes_ended = threading.Event()
        self._unended: set[tuple[str, str]] | None = None  # (host, probe): None, no plan yet
        self._listing = threading.Thread(target=self._list, name="stapctl-history",
                                         daemon=True)
        self._listing.start()
        if not folder_made and not self.listed():
            raise StapctlError("cannot record this run: " + "; ".join(self.warnings)
                               + " (free some disk space or fix the permissions)")

    def event(self, event: Event) -> None:
        self.events([event])

    def events(self, events: Sequence[Event]) -> None:
        """Record events delivered together: one write to events.jsonl and one to each
        host's log for the lot, so a controller killed mid-run leaves whole lines, every
        one it had delivered."""
        if (events_fd := self._events_fd) is not None:
            data = "".join(json.dumps(vars(event)) + "\n" for event in events).encode()
            if not self._attempt("write events.jsonl", lambda: _write_all(events_fd, data)):
                self._close_events()
        outputs: dict[str, list[str]] = {}
        for event in events:
            if event.kind in PROBE_ENDED:
                self._probe_ended(event.host, event.probe)
            elif event.kind == "output":
                prefix = f"[{event.probe}] " if self._many_probes else ""
                outputs.setdefault(event.host, []).append(prefix + event.text + "\n")
        for host, lines in outputs.items():
            self._write_output(host, "".join(lines).encode("utf-8", "replace"))

    def plan(self, plan: Plan) -> None:
        """Record the plan (a streamed run's, once every host has ended): its probes are
        those whose ends the history's import waits for."""
        self._attempt("write the scripts and plan.json", lambda: self._write_plan(plan))
        self._unended = {(host, job.probe.name) for job in plan.jobs for host in job.hosts}

    def _probe_ended(self, host: str, probe: str) -> None:
        if self._unended is not None:
            self._unended.discard((host, probe))
            if not self._unended:
                self._probes_ended.set()

    def detached(self, probes: Iterable[DetachedProbe]) -> None:
        """detached.json: where each probe started detached runs, for the commands that
        reach it later (runs show, attach, collect, stop)."""
        data = json.dumps([asdict(probe) for probe in probes], indent=2, default=str)
        self._attempt("write detached.json",
                      lambda: self._replace_file("detached.json", data.encode()))

    def finish(self, run: Run) -> None:
        """Close the record: summary.json and the history row are each written even if
        the other cannot be."""
        self._close_events()
        for host in list(self._host_logs):
            self._attempt("write the output of hosts", partial(self._close_log, host))
        if (dir_fd := self._dir_fd) is not None:
            summary = json.dumps({
                "run": run.id, "exit_code": run.exit_code, "interrupted": run.interrupted,
                "outcomes": [asdict(o) for o in run.outcomes],
                "retry_hosts": list(run.retry_hosts),
                "warnings": list(run.warnings),
            }, indent=2)
            self._attempt("write summary.json",
                          lambda: self._replace_file("summary.json", summary.encode()))
            if run.aggregates:
                aggregates = json.dumps(aggregates_json(run.aggregates), indent=2)
                self._attempt("write aggregates.json", lambda: self._replace_file(
                    "aggregates.json", aggregates.encode()))
            if (difference := run.difference) is not None:
                self._attempt("write difference.json", lambda: self._replace_file(
                    DIFFERENCE_FILE, difference_json(difference).encode()))
            self._dir_fd = None
            self._attempt("close the run folder", lambda: os.close(dir_fd))
        self._attempt("finish the run in the history", lambda: self._finish_history(run))

    # -- the folder ----------------------------------------------------------------------
    def _create_folder(self) -> None:
        if self._manifest.output.dir is None:
            own_data_dir()
        self.dir.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.mkdir(self.dir, DIR_MODE)  # fails on anything already there, a symlink included
        dir_fd = os.open(self.dir, _READ | os.O_DIRECTORY)
        try:
            os.mkdir("hosts", DIR_MODE, dir_fd=dir_fd)
        except OSError:
            os.close(dir_fd)
            raise
        self._dir_fd = dir_fd

    def _open(self, name: str, flags: int = os.O_TRUNC) -> int:
        """A file of the run folder, opened for writing; never through a symlink."""
        assert self._dir_fd is not None
        return os.open(name, _WRITE | flags, FILE_MODE, dir_fd=self._dir_fd)

    def _copy_manifest(self) -> None:
        with open(self._manifest.path, "rb") as source, \
                os.fdopen(self._open("manifest.yaml"), "wb") as target:
            shutil.copyfileobj(source, target)

    def _open_events(self) -> None:
        # one write per line: a controller killed mid-run leaves every line it had received
        self._events_fd = self._open("events.jsonl", os.O_APPEND)

    def _close_events(self) -> None:
        if self._events_fd is not None:
            events_fd, self._events_fd = self._events_fd, None
            self._attempt("write events.jsonl", lambda: os.close(events_fd))

    def _write_output(self, host: str, data: bytes) -> None:
        if self._dir_fd is None or host in self._failed_logs:
            return
        if not self._attempt("write the output of hosts",
                             lambda: _write_all(self._host_log(host), data)):
            self._failed_logs.add(host)
            self._attempt("write the output of hosts", lambda: self._close_log(host))

    def _host_log(self, host: str) -> int:
        """The host's log, open; at most OPEN_HOST_LOGS are, so any number of hosts fit
        in the usual limit of open files."""
        log = self._host_logs.get(host)
        if log is not None:
            self._host_logs.move_to_end(host)
            return log
        while len(self._host_logs) >= OPEN_HOST_LOGS:
            self._close_log(next(iter(self._host_logs)))
        log = self._host_logs[host] = self._open(_host_log_name(host), os.O_APPEND)
        return log

    def _close_log(self, host: str) -> None:
        log = self._host_logs.pop(host, None)
        if log is not None:
            os.close(log)

    def _write_plan(self, plan: Plan) -> None:
        if self._dir_fd is None:
            return
        with suppress(FileExistsError):
            os.mkdir("scripts", DIR_MODE, dir_fd=self._dir_fd)
        for job in plan.jobs:
            script = f"scripts/{file_name(job.probe.name)}-{job.spec.key[:12]}.stp"
            with os.fdopen(self._open(script), "wb") as stream:
                stream.write(job.spec.script.encode("utf-8", "replace"))
        self._replace_file("plan.json", json.dumps([
            {"probe": job.probe.name, "module": job.spec.key, "release": job.spec.release,
             "arch": job.spec.arch, "hosts": list(job.hosts), "cached": job.cached,
             "error": job.error}
            for job in plan.jobs
        ], indent=2).encode())

    def _replace_file(self, name: str, data: bytes) -> None:
        """Write-then-rename: a reader sees the old file or the whole new one."""
        temporary = f".{name}.tmp"
        try:
            with os.fdopen(self._open(temporary), "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        except OSError:
            with suppress(OSError):
                os.unlink(temporary, dir_fd=self._dir_fd)
            raise

    # -- the history ---------------------------------------------------------------------
    def listed(self) -> bool:
        """Whether the run's row is in the history (waiting for it to be added)."""
        self._list_now.set()
        self._probes_ended.set()
        self._listing.join()
        return self._listed

    def _list(self) -> None:
        listing_time = time.monotonic() + LISTING_DELAY
        self._probes_ended.wait(LISTING_DELAY)
        from stapctl import history
        history.import_driver(self.history)
        self._list_now.wait(max(0.0, listing_time - time.monotonic()))
        self._listed = self._attempt("add the run to the history", self._add_to_history)

    def _add_to_history(self) -> None:
        from stapctl import history
        history.add_run(self.history, self.run_id, self._manifest.name, self._manifest.path,
                        self.dir, self._started)

    def _finish_history(self, run: Run) -> None:
        """Finish the run's row, adding it if it could not be added at the start."""
        from stapctl import history
        listed = self.listed()
        hosts = {o.host for o in run.outcomes}
        failed = {o.host for o in run.failed}
        history.finish_run(self.history, self.run_id, listed, {
            "name": self._manifest.name, "manifest": str(self._manifest.path),
            "dir": str(self.dir), "started": self._started, "finished": time.time(),
            "exit_code": run.exit_code, "hosts": len(hosts), "ok": len(hosts - failed),
            "failed": len(failed)}, run.retry_hosts)

    # -- failures ------------------------------------------------------------------------
    def _attempt(self, what: str, action: Callable[[], object]) -> bool:
        """Run one recording step; a failure becomes a warning. True if it worked."""
        try:
            action()
        except (OSError, HistoryError) as error:
            warning = f"run record {self.dir} is incomplete: cannot {what}: {_reason(error)}"
            if warning not in self.warnings:
                self.warnings.append(warning)
            return False
        return True


def _reason(error: OSError | HistoryError) -> str:
    """What went wrong, without the errno number and file name a message already has."""
    if isinstance(error, HistoryError):
        return error.reason
    return error.strerror or str(error)


def _write_all(fd: int, data: bytes) -> None:
    """Append all of data, or nothing: a line cut by a full disk is taken back out."""
    written = 0
    try:
        while written < len(data):
            written += os.write(fd, data[written:])
    except OSError:
        if written:
            with suppress(OSError):
                os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_END) - written)
        raise


def safe_name(name: str) -> str:
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in name)


def file_name(name: str) -> str:
    """A file name for `name`: safe, stable, and unique. A short plain name is kept as it
    is; any other gets its safe form plus a hash of the real name, after a '~' that no
    plain name has."""
    safe = safe_name(name)[:MAX_NAME]
    if safe == name and name not in ("", ".", ".."):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{safe}~{digest[:12]}"


def difference_json(difference: Difference) -> str:
    """difference.json: the difference as recorded with its run."""
    return json.dumps({"v": DIFFERENCE_VERSION, **asdict(difference)}, indent=2)


def _host_log_name(host: str) -> str:
    return f"hosts/{file_name(host)}.log"


def host_log_path(run_folder: Path, host: str) -> Path:
    """Where a run folder keeps a host's output (the file exists if the host printed)."""
    return run_folder / _host_log_name(host)


def merged_output(run_folder: Path, hosts: Iterable[str], many_probes: bool) -> Iterator[str]:
    """The `merged` report (as `report.merged`) of a run, read from its host logs.

    Hosts are grouped by a hash of what each printed, per probe; each group's output is
    then streamed from one of its logs, so a run's output is never all in memory. Groups
    with the same hosts (one per probe) come in the order the probes first printed.
    """
    groups: dict[tuple[str, bytes], list[str]] = {}
    for host in dict.fromkeys(hosts):
        digests: dict[str, hashlib._Hash] = {}
        for probe, line in read_log(run_folder, host, many_probes):
            digest = digests.get(probe)
            if digest is None:
                digest = digests[probe] = hashlib.sha256()
            digest.update(line + b"\n")
        for probe, digest in digests.items():
            groups.setdefault((probe, digest.digest()), []).append(host)
    for (probe, _), members in sorted(groups.items(), key=lambda group: sorted(group[1])):
        yield from report.merged_heading(members, probe, many_probes)
        for line_probe, line in read_log(run_folder, min(members), many_probes):
            if line_probe == probe:
                yield line.decode("utf-8", "replace")


def diff_output(run_folder: Path, hosts: Iterable[str], many_probes: bool) -> Iterator[str]:
    """The `--diff` report of a run: per probe, each group of hosts whose output differs
    from the majority's (the largest group; a host that printed nothing counts as empty
    output), as a unified diff against it. Output past DIFF_LINES is left out, and said."""
    probes: set[str] = set()
    outputs: dict[str, dict[str, bytes]] = {}
    for host in dict.fromkeys(hosts):
        digests: dict[str, hashlib._Hash] = {}
        for probe, line in read_log(run_folder, host, many_probes):
            digests.setdefault(probe, hashlib.sha256()).update(line + b"\n")
        outputs[host] = {probe: digest.digest() for probe, digest in digests.items()}
        probes.update(digests)
    empty = hashlib.sha256().digest()
    for probe in sorted(probes):
        groups: dict[bytes, list[str]] = {}
        for host, printed in outputs.items():
            groups.setdefault(printed.get(probe, empty), []).append(host)
        ranked = sorted(groups.values(), key=lambda members: (-len(members),
                                                                     sorted(members)))
        if len(ranked) == 1:
            continue
        label = f" [{probe}]" if many_probes else ""
        majority = _probe_lines(run_folder, min(ranked[0]), probe, many_probes)
        for members in ranked[1:]:
            lines = _probe_lines(run_folder, min(members), probe, many_probes)
            yield from report.diff_from_majority(
                majority, f"{report.fold_hosts(ranked[0])}{label}", lines,
                f"{report.fold_hosts(members)}{label}")


def _probe_lines(run_folder: Path, host: str, probe: str, many_probes: bool) -> list[str]:
    """A host's output of one probe, up to DIFF_LINES lines (then a line saying so)."""
    lines: list[str] = []
    for line_probe, line in read_log(run_folder, host, many_probes):
        if line_probe != probe:
            continue
        if len(lines) == DIFF_LINES:
            lines.append(f"… output past {DIFF_LINES} lines not compared")
            break
        lines.append(line.decode("utf-8", "replace"))
    return lines


def read_log(run_folder: Path, host: str, many_probes: bool) -> Iterator[tuple[str, bytes]]:
    """(probe, line) for each line of a host's log; nothing if the host printed nothing."""
    path = host_log_path(run_folder, host)
    try:
        stream = os.fdopen(os.open(path, _READ), "rb")
    except FileNotFoundError:
        return
    except OSError as error:
        raise StapctlError(f"cannot read {path}: {error.strerror}") from None
    with stream:
        for raw in stream:  # split at b"\n" only, as the lines were written
            line = raw[:-1] if raw.endswith(b"\n") else raw
            probe = ""
            if many_probes and line.startswith(b"[") and b"] " in line:
                name, line = line[1:].split(b"] ", 1)
                probe = name.decode("utf-8", "replace")
            yield probe, line


def prune_runs(keep: int | None = None, older_than: float | None = None,
               name: str | None = None, history: str | Path | None = None) -> list[str]:
    """Remove this controller's finished runs (folder and history row) beyond the newest
    ``keep``, or started more than ``older_than`` seconds ago, of the manifest ``name`` or
    of all; returns their ids. A run not finished (running now, or cut short) is never
    removed, nor one recorded by another controller sharing the history: its folder is
    on that machine."""
    from stapctl import history as runs_history
    rows = runs_history.prunable_runs(name, history)
    doomed = [row for index, row in enumerate(rows)
              if (keep is not None and index >= keep)
              or (older_than is not None and row["started"] < time.time() - older_than)]
    for row in doomed:
        _remove_run_folder(Path(row["dir"]))
        runs_history.forget_run(row["id"], history)
    return [row["id"] for row in doomed]


def _remove_run_folder(folder: Path) -> None:
    """A run folder and what it holds; a symlink in its place is only unlinked."""
    try:
        if folder.is_symlink():
            folder.unlink()
        else:
            shutil.rmtree(folder)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise StapctlError(f"cannot remove the run folder {folder}: {_reason(error)}") from None


# -- detached runs -----------------------------------------------------------------------
def read_detached(run_folder: Path) -> list[DetachedProbe]:
    """The probes a run started detached (none for an attached run)."""
    try:
        with os.fdopen(os.open(run_folder / "detached.json", _READ), "rb") as stream:
            entries = json.loads(stream.read())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as error:
        raise StapctlError(f"cannot read {run_folder / 'detached.json'}: {error}") from None
    return [DetachedProbe(host=Host(**entry["host"]), probe=entry["probe"],
                          name=entry["name"], workdir=entry["workdir"]) for entry in entries]


class CollectedOutput:
    """What `collect` fetched of a run's detached probes: per host and probe, the output's
    bytes in `collected/<host>/<probe>.out` and, in `collected/record.json`, the offset
    in the output the next collect starts from (rotation on the host may have skipped
    bytes, so it can be past the file's size) and, once its files were removed from the
    host, the probe's final state. Private, never through a symlink."""

    def __init__(self, run_folder: Path) -> None:
        self.dir = run_folder / "collected"
        try:
            record = json.loads((self.dir / "record.json").read_text())
        except FileNotFoundError:
            record = {}
        except (OSError, ValueError) as error:
            raise StapctlError(f"cannot read {self.dir / 'record.json'}: {error}") from None
        self.offsets: dict[str, int] = record.get("offsets", {})
        self.ended: dict[str, dict[str, Any]] = record.get("ended", {})

    def final_state(self, host: str, probe: str) -> dict[str, Any] | None:
        """The state a probe ended in, once its files are gone from its host."""
        return self.ended.get(f"{host}\0{probe}")

    def path(self, host: str, probe: str) -> Path:
        return self.dir / file_name(host) / f"{file_name(probe)}.out"

    def offset(self, host: str, probe: str) -> int:
        return self.offsets.get(f"{host}\0{probe}", 0)

    def append(self, host: str, probe: str, data: bytes) -> None:
        path = self.path(host, probe)
        path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        fd = os.open(path, _WRITE | os.O_APPEND, FILE_MODE)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)

    def done(self, host: str, probe: str, end: int,
             final_state: dict[str, Any] | None = None) -> None:
        """Record that the output up to ``end`` is here (written after the bytes, so a
        collect cut short fetches again what it had not recorded), and the final state
        of a probe whose files were removed from its host."""
        key = f"{host}\0{probe}"
        self.offsets[key] = end
        if final_state is not None:
            self.ended[key] = final_state
        self.dir.mkdir(mode=DIR_MODE, exist_ok=True)
        temporary = self.dir / ".record.json.tmp"
        fd = os.open(temporary, _WRITE | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "w") as stream:
            json.dump({"offsets": self.offsets, "ended": self.ended}, stream)
        os.replace(temporary, self.dir / "record.json")


def iso_time(timestamp: float | None) -> str | None:
    """An ISO 8601 UTC time, as the JSON forms of `runs` give times."""
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def read_summary(run_folder: Path) -> dict[str, Any] | None:
    """A finished run's summary.json, None while it is unfinished."""
    try:
        with os.fdopen(os.open(run_folder / "summary.json", _READ), "rb") as stream:
            summary = json.loads(stream.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise StapctlError(f"cannot read {run_folder / 'summary.json'}: {error}") from None
    return summary if isinstance(summary, dict) else None


def run_json(row: dict[str, Any]) -> dict[str, Any]:
    """A run of the history as `runs list --json` gives it."""
    summary = read_summary(Path(row["dir"])) or {}
    counts: dict[str, int] = {}
    for outcome in summary.get("outcomes", []):
        counts[outcome["status"]] = counts.get(outcome["status"], 0) + 1
    return {"id": row["id"], "name": row["name"], "started": iso_time(row["started"]),
            "finished": iso_time(row["finished"]), "exit_code": row["exit_code"],
            "hosts": row["hosts"], "outcomes": counts, "controller": row["controller"]}
