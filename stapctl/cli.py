"""The command line: it parses options and calls the session; nothing more.

Probe output goes to stdout; progress, warnings and the summary go to stderr
(stapctl.display). A StapctlError becomes one clean message and its exit code, never a
traceback.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from stapctl import report, schedule, toolchains
from stapctl.adhoc import AdhocRun, adhoc_manifest, adhoc_target
from stapctl.cache import ModuleCache, cache_dir
from stapctl.config import load_config
from stapctl.detach import DetachedRun, Fetched, ProbeState, host_state
from stapctl.difference import (
    compare,
    difference_lines,
    read_difference,
    recorded_hosts,
    recorded_many_probes,
)
from stapctl.display import Display, err, message, signals_to
from stapctl.errors import HistoryError, StapctlError, UsageError
from stapctl.execute import RunOptions
from stapctl.manifest import explain as explain_key
from stapctl.manifest import load_diff_spec, load_manifest, parse_duration, parse_period, parse_size
from stapctl.models import DetachSpec, Difference, Host, HostOutcome, Manifest, Run
from stapctl.plan import Plan
from stapctl.probes import check_pattern
from stapctl.render import parse_extra_vars
from stapctl.session import NothingToRetry, Session, detached_run, select_hosts
from stapctl.store import (
    diff_output,
    difference_json,
    file_name,
    host_log_path,
    merged_output,
    prune_runs,
    read_detached,
    read_summary,
    run_folder,
    run_json,
)

if TYPE_CHECKING:
    from stapctl.engine import CeleryEngine
    from stapctl.lab import Lab, LabStatus

F = TypeVar("F", bound=Callable[..., Any])


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        message("interrupted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except StapctlError as exc:
        err.print(Text.assemble(("error:", "bold red"), " ", report.printable(str(exc))))
        sys.exit(exc.exit_code)


@click.group()
@click.version_option(package_name="stapctl")
def cli() -> None:
    """Compile SystemTap probes once, run them on many hosts over SSH."""


LIST_HOSTS = "stapctl.list_hosts"


def remember_list_hosts(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    ctx.meta[LIST_HOSTS] = value


def target_options(command: F) -> F:
    """-i, --limit, -e and --list-hosts: how apply, plan and validate choose hosts and
    variables. A command takes its hosts from `target_hosts`, which honours --list-hosts."""
    for option in reversed([
        click.option("-i", "--inventory", type=click.Path(path_type=Path),
                     help="Inventory: a file, an executable script, a directory of them, "
                          "or a comma list (web1,web2,); overrides the manifest's "
                          "`inventory:`."),
        click.option("--limit", help="Further limit the hosts (Ansible pattern), or "
                                     "@RUN:failed / @last:failed: the hosts that run "
                                     "failed on or could not reach."),
        click.option("-e", "--extra-vars", "extra", multiple=True, metavar="KEY=VALUE|@FILE",
                     help="Template variable, or a YAML file of them; wins over every "
                          "other source."),
        click.option("--list-hosts", is_flag=True, expose_value=False,
                     callback=remember_list_hosts,
                     help="Print the matched hosts, one a line, and connect to nothing."),
    ]):
        command = option(command)
    return command


def target_hosts(manifest: Manifest, inventory: Path | None, limit: str | None) -> list[Host]:
    """The hosts a command works on (see `select_hosts`). With --list-hosts it prints
    their names and exits; a retry with nothing to retry says so and exits 0."""
    try:
        hosts = select_hosts(manifest, inventory, limit)
    except NothingToRetry as exc:
        message(str(exc))
        sys.exit(0)
    if click.get_current_context().meta.get(LIST_HOSTS):
        for host in hosts:
            click.echo(report.printable(host.name))
        sys.exit(0)
    return hosts


def run_options(command: F) -> F:
    """--format, --live, --diff and --check: how apply and run show and run the probes."""
    for option in reversed([
        click.option("--format", "fmt", type=click.Choice(["prefix", "merged", "json"])),
        click.option("--live", is_flag=True, help="With --format merged: group identical "
                     "lines across hosts as they come."),
        click.option("--diff", is_flag=True, help="After the run, only the hosts whose "
                     "output differs from the majority's, as a unified diff against it."),
        click.option("--check", is_flag=True,
                     help="Connect, upload and run the preflight; load nothing."),
        click.option("--engine", metavar="celery+redis://HOST:PORT/DB",
                     help="Fan the run out over `stapctl worker` processes on this broker "
                          "(default: $STAPCTL_ENGINE, the config's `engine`, else here)."),
        click.option("--slices", type=click.IntRange(1), help="With an engine: split the "
                     "hosts into this many tasks (default: one per --forks hosts)."),
    ]):
        command = option(command)
    return command


def fan_out_engine(engine: str | None, slices: int | None) -> CeleryEngine | None:
    """The engine a run goes through: --engine, else the configured one, else none (this
    process fans out; the engine's module, a tenth of the start-up, is not imported)."""
    config = load_config()
    chosen = engine or config.engine
    if chosen is None:
        if slices is not None:
            raise UsageError("--slices splits a run over an engine's workers: add "
                             "--engine celery+redis://HOST:PORT/DB")
        return None
    from stapctl.engine import CeleryEngine, broker_url
    return CeleryEngine(broker_url(chosen), config.secret(), slices)


accept_new_host_keys_option = click.option(
    "--accept-new-host-keys", is_flag=True,
    help="Trust and remember hosts whose key is not yet known (a changed key still fails).")


def detach_options(command: F) -> F:
    """--detach and the bound of a detached run: apply and plan take them."""
    for option in reversed([
        click.option("--detach", is_flag=True,
                     help="Run detached on the hosts: return at once; see `runs show`, "
                          "`attach`, `collect`, `stop`."),
        click.option("--max-duration", help="A detached probe stops after this long "
                                            "(default 24h)."),
        click.option("--max-disk", help="A detached probe stops after writing this much "
                                        "output on a host (default 1GiB)."),
    ]):
        command = option(command)
    return command


def with_detach(manifest: Manifest, detach: bool, max_duration: str | None,
                max_disk: str | None) -> Manifest:
    """The manifest's `detach:`, turned on by --detach, its bound changed by the options."""
    spec = manifest.detach
    if spec is None and (detach or max_duration or max_disk):
        if not detach:
            raise click.UsageError("--max-duration and --max-disk bound a detached run: "
                                   "add --detach (or `detach:` in the manifest)")
        spec = DetachSpec()
    if spec is None:
        return manifest
    try:
        if max_duration:
            spec = replace(spec, max_duration=parse_duration(max_duration))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-duration") from None
    try:
        if max_disk:
            spec = replace(spec, max_disk=parse_size(max_disk))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-disk") from None
    return replace(manifest, detach=spec)


def with_overrides(manifest: Manifest, forks: int | None, fmt: str | None) -> Manifest:
    if forks is not None:
        manifest = replace(manifest, strategy=replace(manifest.strategy, forks=forks))
    if fmt is not None:
        manifest = replace(manifest, output=replace(manifest.output, format=fmt))  # type: ignore[arg-type]
    return manifest


# -- apply -------------------------------------------------------------------------------
@cli.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@target_options
@click.option("--forks", type=click.IntRange(1, 10000), help="Hosts worked on at once.")
@click.option("--duration", help="Override every probe's duration (e.g. 30s).")
@run_options
@click.option("--baseline", metavar="RUN|last",
              help="Compare the output with this run of the same manifest ('last': the "
              "newest) and record the difference with the run.")
@accept_new_host_keys_option
@detach_options
def apply(manifest: Path, inventory: Path | None, limit: str | None, extra: tuple[str, ...],
          forks: int | None, duration: str | None, fmt: str | None, live: bool, diff: bool,
          check: bool, engine: str | None, slices: int | None,
          baseline: str | None, accept_new_host_keys: bool, detach: bool,
          max_duration: str | None, max_disk: str | None) -> None:
    """Compile the manifest's probes and run them on its hosts.

    With --detach (or `detach:` in the manifest) each host runs them as a background
    process of its own and apply returns once they run; the run id is the last line on
    stdout.
    """
    try:
        seconds = parse_duration(duration) if duration else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--duration") from None
    loaded = with_detach(with_overrides(load_manifest(manifest), forks, fmt), detach,
                         max_duration, max_disk)
    extra_vars = parse_extra_vars(list(extra))
    fan_out = fan_out_engine(engine, slices)
    if fan_out is not None and loaded.detach is not None:
        raise UsageError("--detach runs on the hosts without the controller: it does not "
                         "go through an engine (leave out --engine / STAPCTL_ENGINE)")
    hosts = target_hosts(loaded, inventory, limit)
    options = RunOptions(duration=seconds, check=check,
                         accept_new_host_keys=accept_new_host_keys)
    run, session, display = apply_and_report(loaded, hosts, extra_vars, options, live,
                                             diff, baseline, fan_out)
    if loaded.detach is not None and session.fleet.detached:
        message(f"detached: `stapctl runs show {run.id}`, `stapctl attach {run.id}`, "
                f"`stapctl collect {run.id}`, `stapctl stop {run.id}`")
        display.out(run.id)
    sys.exit(run.exit_code)


def check_views(manifest: Manifest, live: bool, diff: bool) -> None:
    """--live and --diff against the format they go with: one clear line, exit 2."""
    fmt = manifest.output.format
    if live and fmt != "merged":
        raise UsageError(f"--live groups lines of the merged format: add --format merged "
                         f"(the format is {fmt})")
    if diff and fmt == "json":
        raise UsageError("--diff is for a person: use --format prefix or merged, not json")


def apply_and_report(manifest: Manifest, hosts: list[Host], extra_vars: dict[str, Any],
                     options: RunOptions, live: bool = False, diff: bool = False,
                     baseline: str | None = None, engine: CeleryEngine | None = None,
                     ) -> tuple[Run, Session, Display]:
    """Apply the manifest through the Session with the live display, then report it."""
    check_views(manifest, live, diff)
    display = Display(manifest, [host.name for host in hosts], live=live, diff=diff)
    session = Session(manifest, hosts, extra_vars=extra_vars, options=options,
                      listener=display, baseline=baseline, engine=engine)
    with display, signals_to(session):
        run = session.apply()
    report_run(run, session, display)
    return run, session, display


# -- run ---------------------------------------------------------------------------------
@cli.command(name="run")
@click.argument("pattern")
@click.argument("words", nargs=-1, metavar="[SCRIPT] [ARG]...")
@click.option("-e", "script", metavar="SCRIPT",
              help="The script itself, as stap -e takes it; every ARG is then the script's.")
@click.option("-i", "--inventory", type=click.Path(path_type=Path),
              help="Inventory: a file, an executable script, a directory of them, or a "
                   "comma list (web1,web2,); default the lab's.")
@click.option("--limit", help="Further limit the hosts (Ansible pattern), or @RUN:failed / "
                              "@last:failed.")
@click.option("--list-hosts", is_flag=True, expose_value=False, callback=remember_list_hosts,
              help="Print the matched hosts, one a line, and connect to nothing.")
@click.option("--var", "variables", multiple=True, metavar="KEY=VALUE",
              help="Template variable of the script (the manifest's `vars:`).")
@click.option("--forks", type=click.IntRange(1, 1000), help="Hosts worked on at once.")
@click.option("--duration", help="Stop the script after this long (e.g. 30s).")
@run_options
@click.option("-x", "pid", type=click.IntRange(1), metavar="PID",
              help="target() is this process on every host (stap -x).")
@click.option("-c", "command", metavar="CMD",
              help="Run CMD on every host, held until the probe has started; target() is "
                   "it and the run ends when it exits (stap -c).")
@click.option("--process", metavar="NAME",
              help="target() is the process with this name (comm) on each host; the "
                   "oldest when several match.")
@click.option("--each", is_flag=True,
              help="With --process: one run per process of that name, each its own "
                   "outcome (PROBE[pid N]).")
@accept_new_host_keys_option
def run_command(pattern: str, words: tuple[str, ...], script: str | None,
                inventory: Path | None, limit: str | None, variables: tuple[str, ...],
                forks: int | None, duration: str | None, fmt: str | None, live: bool,
                diff: bool, check: bool, engine: str | None, slices: int | None,
                pid: int | None, command: str | None,
                process: str | None, each: bool, accept_new_host_keys: bool) -> None:
    """Run one script on the hosts PATTERN matches, as stap does on one:

    \b
      stapctl run web -e 'probe syscall.openat { printf("%s\\n", execname()) }'
      stapctl run web script.stp [ARG]...   ($1, @1: the script's arguments)
      stapctl run web --process nginx -e 'probe syscall.* { if (pid() == target()) … }'

    Recorded as an apply of the manifest it amounts to: `stapctl runs export RUN` prints
    it. Put `--` before script arguments that start with '-'.
    """
    if duration is not None:
        try:
            parse_duration(duration)
        except ValueError as exc:
            raise UsageError(f"--duration: {exc}") from None
    if script is None and not words:
        raise UsageError("no script: give one with -e 'probe …' or as a file "
                         "(stapctl run PATTERN script.stp [ARG]…)")
    script_file = None if script is not None else Path(words[0])
    manifest = adhoc_manifest(AdhocRun(
        hosts=pattern, script=script, script_file=script_file,
        args=words if script is not None else words[1:],
        variables=parse_extra_vars(list(variables)), duration=duration, forks=forks,
        format=fmt, inventory=inventory, target=adhoc_target(pid, command, process, each)))
    fan_out = fan_out_engine(engine, slices)
    hosts = target_hosts(manifest, inventory, limit)
    options = RunOptions(check=check, accept_new_host_keys=accept_new_host_keys)
    run, _, _ = apply_and_report(manifest, hosts, {}, options, live, diff, engine=fan_out)
    sys.exit(run.exit_code)


# -- worker ------------------------------------------------------------------------------
@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--engine", metavar="celery+redis://HOST:PORT/DB",
              help="The broker to serve (default: $STAPCTL_ENGINE, else the config's "
                   "`engine`).")
@click.argument("celery_options", nargs=-1, type=click.UNPROCESSED)
def worker(engine: str | None, celery_options: tuple[str, ...]) -> None:
    """Serve the slices of runs fanned out over ENGINE: Celery's worker, with its
    options (e.g. -n NAME@%h --concurrency 4 --pool threads).

    It needs the controllers' shared secret (secret_file in the config, or
    $STAPCTL_SECRET_FILE), and SSH access to the hosts it is sent.
    """
    config = load_config()
    chosen = engine or config.engine
    if chosen is None:
        raise UsageError("no engine to serve: pass --engine celery+redis://HOST:PORT/DB or "
                         "set STAPCTL_ENGINE")
    from stapctl.engine import broker_url, start_worker
    url = broker_url(chosen)
    config.secret()  # a worker without the secret could only refuse every task
    start_worker(url, list(celery_options))


def report_run(run: Run, session: Session, display: Display) -> None:
    """What follows a run: merged output or the diff, the json summary, the summary on
    stderr."""
    hosts = [host.name for host in session.hosts]
    if display.diff and session.recorder is not None:
        for line in diff_output(session.recorder.dir, hosts, display.many):
            display.out(line)
    elif (session.manifest.output.format == "merged" and display.groups is None
          and session.recorder is not None):
        for line in merged_output(session.recorder.dir, hosts, display.many):
            display.out(report.printable(line))
    if session.manifest.output.format == "json":
        if run.aggregates:
            display.out(report.aggregates_line(run.aggregates))
        display.out(report.summary_json(run))
    else:
        for line in report.aggregate_lines(run.aggregates):
            display.out(line)
    if run.failed:
        err.print(outcomes_table(run.outcomes, f"run {run.id}"))
    if run.difference is not None:
        show_difference(run.difference)
    message(f"{report.summary_counts(run.outcomes)}  (run {run.id})")


def show_difference(difference: Difference) -> None:
    """The difference from the baseline, on stderr after the run."""
    if not difference.changed:
        message(f"no change from run {difference.baseline}")
        return
    message(f"changed from run {difference.baseline}: {len(difference.hosts)} host(s)",
            "yellow")
    for line in difference_lines(difference):
        err.print(Text(report.printable(line)))


def outcomes_table(outcomes: Sequence[HostOutcome], title: str = "") -> Table:
    table = Table(title=title or None, title_justify="left")
    for column in ("host", "probe", "result", "detail"):
        table.add_column(column, overflow="fold")
    for row in report.summary_rows(outcomes):
        table.add_row(*(Text(cell) for cell in row))
    return table


# -- runs --------------------------------------------------------------------------------
@cli.group()
def runs() -> None:
    """Past applies: their outcomes and output."""


@runs.command(name="list")
@click.option("-n", "limit", type=click.IntRange(1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="A JSON array, newest first.")
def runs_list(limit: int, as_json: bool) -> None:
    from stapctl import history
    rows = history.list_runs(limit)
    if as_json:
        click.echo(json.dumps([run_json(row) for row in rows]))
        return
    table = Table()
    for column in ("run", "started", "exit", "hosts", "ok", "failed", "controller"):
        table.add_column(column)
    for row in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["started"]))
        exit_code = "-" if row["exit_code"] is None else str(row["exit_code"])  # unfinished
        table.add_row(row["id"], started, exit_code, str(row["hosts"]),
                      str(row["ok"]), str(row["failed"]), row["controller"])
    # a pipe or file gets whole run ids, however long: they are what people copy
    (Console() if sys.stdout.isatty() else Console(width=1000)).print(table)


@runs.command(name="export")
@click.argument("run_id", metavar="RUN")
def runs_export(run_id: str) -> None:
    """Print the manifest a run applied, as recorded with it: for an ad-hoc run
    (`stapctl run`) a manifest to keep, which `stapctl apply` takes as it is."""
    from stapctl import history
    try:
        row = history.find_run(run_id)
    except HistoryError:
        raise
    except StapctlError as exc:
        raise UsageError(f"{exc} (`stapctl runs list` shows the runs)") from None
    try:
        recorded = run_folder(row) / "manifest.yaml"
        click.echo(recorded.read_text(), nl=False)
    except StapctlError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"run {row['id']} has no readable manifest.yaml in {row['dir']}: "
                         f"{exc.strerror}") from None


@runs.command(name="show")
@click.argument("run_id")
@click.option("--host", help="Print this host's output.")
@click.option("--html", "as_html", is_flag=True,
              help="One self-contained HTML page: summary, hosts, difference, aggregates.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.option("-i", "--inventory", type=click.Path(path_type=Path),
              help="Where a detached run's hosts are now (default: as at apply).")
def runs_show(run_id: str, host: str | None, as_html: bool, as_json: bool,
              inventory: Path | None) -> None:
    """A run's outcomes (and its difference from its baseline); a detached run's live
    state on each host."""
    row = known_run(run_id)
    if as_json:
        click.echo(json.dumps(run_show_json(row, inventory)))
        return
    try:
        folder = run_folder(row)
    except StapctlError as exc:
        if as_html or host is not None:
            raise UsageError(str(exc)) from None
        message(f"run {row['id']}  exit {row['exit_code']}  hosts {row['hosts']}  "
                f"ok {row['ok']}  failed {row['failed']}  (from the history: {exc})")
        return
    if as_html:
        from stapctl import html_report
        click.echo(html_report.render(row, folder), nl=False)
        return
    if host is not None:
        log = host_log_path(folder, host)
        collected = sorted((folder / "collected" / file_name(host)).glob("*.out"))
        if not log.exists() and not collected:
            raise click.BadParameter(f"run {row['id']} has no output from {host}",
                                     param_hint="--host")
        for path in [log] if log.exists() else collected:  # detached: what collect fetched
            with path.open(errors="replace") as lines:
                for line in lines:
                    click.echo(report.printable(line), nl=False)
        return
    summary = json.loads((folder / "summary.json").read_text()) \
        if (folder / "summary.json").exists() else {"outcomes": [], "exit_code": None}
    message(f"run {row['id']}  exit {summary['exit_code']}  folder {folder}")
    Console().print(outcomes_table([HostOutcome(**outcome) for outcome in summary["outcomes"]]))
    if (difference := read_difference(folder)) is not None:
        show_difference(difference)
    if read_detached(folder):
        Console().print(detached_table(detached_states(row["id"], inventory)))


def known_run(run_id: str) -> dict[str, Any]:
    from stapctl import history
    try:
        return history.find_run(run_id)
    except HistoryError:
        raise
    except StapctlError as exc:
        raise click.BadParameter(f"{exc} (`stapctl runs list` shows the runs)",
                                 param_hint="RUN") from None


def run_show_json(row: dict[str, Any], inventory: Path | None) -> dict[str, Any]:
    """`runs show --json`: the `runs list --json` fields, the folder, whether it was
    interrupted, each outcome, and for a detached run each host's live state."""
    folder = Path(row["dir"])
    summary = read_summary(folder) or {}
    shown: dict[str, Any] = {**run_json(row), "dir": str(folder),
                             "interrupted": summary.get("interrupted"),
                             "outcomes_detail": summary.get("outcomes", [])}
    if read_detached(folder):
        states: dict[str, list[str]] = {}
        for probe in detached_states(row["id"], inventory):
            states.setdefault(probe.host, []).append(probe.word)
        shown["detached"] = {host: host_state(words) for host, words in states.items()}
    return shown


# -- detached runs ------------------------------------------------------------------------
def open_detached(run_id: str, inventory: Path | None = None,
                  limit: str | None = None) -> DetachedRun:
    """A detached run by id; bad input is one line and exit 2."""
    try:
        return detached_run(run_id, inventory, limit)
    except StapctlError as exc:
        raise click.BadParameter(f"{exc} (`stapctl runs list` shows the runs)",
                                 param_hint="RUN") from None


@runs.command(name="diff")
@click.argument("run_a")
@click.argument("run_b")
@click.option("--json", "as_json", is_flag=True, help="The difference as one JSON object.")
def runs_diff(run_a: str, run_b: str, as_json: bool) -> None:
    """What each host printed in RUN_B and not in RUN_A (+), and the other way round (-),
    after the manifest's `diff:` normalisation. Exit 0 same, 1 different, 2 trouble."""
    before, after = known_run(run_a), known_run(run_b)
    if before["name"] != after["name"]:
        raise UsageError(f"runs {before['id']} and {after['id']} are of different manifests "
                         f"('{before['name']}', '{after['name']}'): compare runs of one")
    try:
        folder_a, folder_b = run_folder(before), run_folder(after)
        spec = load_diff_spec(folder_b / "manifest.yaml")
        difference = compare(
            after["id"], folder_b, before["id"], folder_a,
            set(recorded_hosts(folder_a)) | set(recorded_hosts(folder_b)), spec,
            recorded_many_probes(folder_a) or recorded_many_probes(folder_b))
    except StapctlError as exc:
        raise UsageError(str(exc)) from None
    if as_json:
        click.echo(difference_json(difference))
    else:
        for line in difference_lines(difference):
            click.echo(report.printable(line))
    sys.exit(1 if difference.changed else 0)


@runs.command(name="prune")
@click.option("--keep", type=click.IntRange(0), help="Keep the newest N runs.")
@click.option("--older-than", "older_than", metavar="AGE",
              help="Remove runs started longer ago than AGE (e.g. 30d, 12h).")
@click.option("--manifest", "name", metavar="NAME", help="Only runs of this manifest name.")
def runs_prune(keep: int | None, older_than: str | None, name: str | None) -> None:
    """Remove old runs: their folders and their rows in the history."""
    if keep is None and older_than is None:
        raise click.UsageError("say what to keep: --keep N and/or --older-than AGE")
    age = parse_period_option(older_than, "--older-than")
    removed = prune_runs(keep=keep, older_than=age, name=name)
    message(f"removed {len(removed)} run(s)")


def parse_period_option(text: str | None, option: str) -> float | None:
    if text is None:
        return None
    try:
        return parse_period(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


# -- schedule ----------------------------------------------------------------------------
@cli.group(name="schedule")
def schedule_group() -> None:
    """Apply a manifest on a timer (systemd units); each run is compared with the last."""


def unit_options(command: F) -> F:
    for option in reversed([
        click.option("--user", is_flag=True, help="User units (~/.config/systemd/user)."),
        click.option("--unit-dir", type=click.Path(path_type=Path),
                     help="Folder of the units; default /etc/systemd/system, with --user "
                     "~/.config/systemd/user ($STAPCTL_UNIT_DIR overrides both)."),
    ]):
        command = option(command)
    return command


@schedule_group.command(name="add")
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("--every", metavar="INTERVAL", help="Run every INTERVAL (e.g. 15m, 1h, 1d).")
@click.option("--on-calendar", metavar="SPEC",
              help="Run when systemd's calendar expression says (e.g. hourly, '*-*-* 02:00').")
@click.option("--name", help="Schedule name; default the manifest's name.")
@click.option("-i", "--inventory", type=click.Path(path_type=Path),
              help="Inventory file; overrides the manifest's `inventory:`.")
@click.option("--keep", type=click.IntRange(1), help="Retention: keep this manifest's newest "
              "N runs.")
@click.option("--older-than", "older_than", metavar="AGE",
              help="Retention: remove this manifest's runs older than AGE (e.g. 30d).")
@unit_options
def schedule_add(manifest: Path, every: str | None, on_calendar: str | None,
                 name: str | None, inventory: Path | None, keep: int | None,
                 older_than: str | None, user: bool, unit_dir: Path | None) -> None:
    """Write a timer and a service that apply MANIFEST with --baseline last."""
    loaded = load_manifest(manifest)
    interval = parse_period_option(every, "--every")
    added = schedule.add(loaded, schedule.unit_dir(user, unit_dir), name=name,
                         every=interval, on_calendar=on_calendar, user=user,
                         inventory=inventory, keep=keep,
                         older_than=parse_period_option(older_than, "--older-than"))
    scope = "--user " if user else ""
    message(f"wrote {added.timer} and {added.service}")
    message(f"start it: systemctl {scope}daemon-reload && systemctl {scope}enable --now "
            f"{added.timer.name}")


@schedule_group.command(name="list")
@unit_options
def schedule_list(user: bool, unit_dir: Path | None) -> None:
    """The schedules in the unit folder."""
    table = Table()
    for column in ("name", "when", "command", "retention"):
        table.add_column(column, overflow="fold")
    for entry in schedule.list_schedules(schedule.unit_dir(user, unit_dir)):
        table.add_row(Text(entry.name), Text(entry.when), Text(" ".join(entry.command)),
                      Text(entry.retention))
    (Console() if sys.stdout.isatty() else Console(width=1000)).print(table)


@schedule_group.command(name="remove")
@click.argument("name")
@unit_options
def schedule_remove(name: str, user: bool, unit_dir: Path | None) -> None:
    """Remove a schedule's timer and service (stop the timer with systemctl first)."""
    directory = schedule.unit_dir(user, unit_dir)
    schedule.remove(directory, name)
    message(f"removed {schedule.UNIT_PREFIX}{name}.timer and .service from {directory}")


@schedule_group.command(name="run")
@click.argument("name")
@unit_options
def schedule_run(name: str, user: bool, unit_dir: Path | None) -> None:
    """Run a schedule's service command now, in the foreground, then its retention."""
    entry = schedule.read(schedule.unit_dir(user, unit_dir), name)
    sys.exit(schedule.run_now(entry))


def detached_states(run_id: str, inventory: Path | None) -> list[ProbeState]:
    run = open_detached(run_id, inventory)
    with err.status(f"asking {len({p.host.name for p in run.probes})} host(s)…"):
        return run.status()


def detached_table(states: Sequence[ProbeState]) -> Table:
    table = Table(title="detached", title_justify="left")
    for column in ("host", "probe", "state", "written", "detail"):
        table.add_column(column, overflow="fold")
    for probe in sorted(states, key=lambda p: (p.host, p.probe)):
        state = probe.state
        detail = state["message"] or ""
        if state["state"] == "running" and state["module"]:
            detail = f"module {state['module']}, pid {state['pid']}"
        elif state["reason"]:
            detail = f"{state['reason']}: {detail}"
        table.add_row(Text(report.printable(probe.host)), Text(report.printable(probe.probe)),
                      probe.word, f"{state['written']} B", Text(report.printable(detail)))
    return table


run_option = click.argument("run_id", metavar="RUN")
detached_inventory_option = click.option(
    "-i", "--inventory", type=click.Path(path_type=Path),
    help="Where the run's hosts are now (default: the manifest's inventory, or the lab's).")


@cli.command()
@run_option
@detached_inventory_option
@click.option("--limit", help="Only these hosts (Ansible pattern).")
@click.option("--from-start", is_flag=True, help="From the start of the output, not from "
                                                 "where it stands.")
def attach(run_id: str, inventory: Path | None, limit: str | None, from_start: bool) -> None:
    """Stream a detached run's output until it ends; Ctrl-C leaves it running."""
    run = open_detached(run_id, inventory, limit)
    lock = threading.Lock()

    def on_line(host: str, probe: str, line: str) -> None:
        where = f"{host} [{probe}]" if len({p.probe for p in run.probes}) > 1 else host
        with lock:
            click.echo(f"{report.printable(where)}: {report.printable(line)}")

    message(f"attached to {len(run.probes)} probe(s) of {run.id}; Ctrl-C detaches")
    with signals_to(run):
        states = run.attach(on_line, from_start)
    err.print(detached_table(states))


@cli.command()
@run_option
@detached_inventory_option
def collect(run_id: str, inventory: Path | None) -> None:
    """Fetch what a detached run wrote so far into its run folder (only new bytes)."""
    run = open_detached(run_id, inventory)
    with err.status(f"collecting from {len({p.host.name for p in run.probes})} host(s)…"):
        fetched = run.collect()
    show_fetched(run, fetched)
    if any(f.state["state"] == "unreachable" for f in fetched):
        sys.exit(1)


@cli.command()
@run_option
@detached_inventory_option
def stop(run_id: str, inventory: Path | None) -> None:
    """Stop a detached run cleanly (EXIT, drain, unload), then collect the rest."""
    run = open_detached(run_id, inventory)
    with err.status(f"stopping on {len({p.host.name for p in run.probes})} host(s)…"):
        fetched = run.stop()
    show_fetched(run, fetched)
    if any(f.state["state"] in ("running", "starting", "unreachable") for f in fetched):
        sys.exit(1)


def show_fetched(run: DetachedRun, fetched: Sequence[Fetched]) -> None:
    for item in sorted(fetched, key=lambda f: (f.host, f.probe)):
        skipped = f", {item.skipped} bytes removed by rotation before" if item.skipped else ""
        message(report.printable(f"{item.host} [{item.probe}]: {item.new_bytes} new bytes"
                                 f"{skipped}; {item.state['state']}"))
    err.print(detached_table([ProbeState(f.host, f.probe, f.state) for f in fetched]))
    message(f"output in {run.folder / 'collected'}")


# -- validate / plan / explain -----------------------------------------------------------
@cli.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@target_options
def validate(manifest: Path, inventory: Path | None, limit: str | None,
             extra: tuple[str, ...]) -> None:
    """Check a manifest, its inventory, templates and scripts; touch no host.

    Each probe is rendered for each host and parsed by stap (when stap is installed).
    """
    loaded = load_manifest(manifest)
    hosts = []
    if (inventory is not None or loaded.inventory is not None
            or click.get_current_context().meta.get(LIST_HOSTS)):
        hosts = target_hosts(loaded, inventory, limit)
    parsed = Session(loaded, hosts, extra_vars=parse_extra_vars(list(extra))).validate()
    message(f"{manifest}: ok ({len(loaded.probes)} probe(s), {len(hosts)} host(s), "
            f"{parsed} distinct script(s) parsed)")


@cli.command(name="plan")
@click.argument("manifest", type=click.Path(path_type=Path))
@target_options
@click.option("--build", is_flag=True, help="Also compile what is not cached.")
@accept_new_host_keys_option
@detach_options
def plan_command(manifest: Path, inventory: Path | None, limit: str | None,
                 extra: tuple[str, ...], build: bool, accept_new_host_keys: bool,
                 detach: bool, max_duration: str | None, max_disk: str | None) -> None:
    """Connect for facts and show which module each host gets; build only with --build."""
    loaded = with_detach(load_manifest(manifest), detach, max_duration, max_disk)
    hosts = target_hosts(loaded, inventory, limit)
    display = Display(loaded, [host.name for host in hosts])
    session = Session(loaded, hosts, extra_vars=parse_extra_vars(list(extra)),
                      options=RunOptions(accept_new_host_keys=accept_new_host_keys),
                      listener=display, record=False)
    with signals_to(session):
        try:
            planned = session.plan(session.connect())
        finally:
            session.finish()
        if build and not session.interrupted:
            planned = session.build(planned)
    if session.interrupted:
        raise click.exceptions.Abort()
    print_plan(planned)
    if loaded.detach is not None:
        message(loaded.detach.describe())


@cli.command(name="probes")
@click.argument("pattern")
@target_options
@click.option("--vars", "with_vars", is_flag=True,
              help="Show each probe point's variables too (stap -L).")
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
@accept_new_host_keys_option
def probes_command(pattern: str, inventory: Path | None, limit: str | None,
                   extra: tuple[str, ...], with_vars: bool, as_json: bool,
                   accept_new_host_keys: bool) -> None:
    """List the probe points PATTERN matches on the hosts' kernels (stap -l / -L),
    asking stap once per kernel release, e.g.:

    \b
      stapctl probes 'syscall.open*'
      stapctl probes 'kernel.trace("sched:*")' --vars
      stapctl probes 'kprobe.function("vfs_*")' --limit web1

    Exit status 1 when nothing matches or some host could not be asked.
    """
    pattern = check_pattern(pattern)
    manifest = adhoc_manifest(AdhocRun(hosts="all", script=f"probe {pattern} {{}}",
                                       inventory=inventory))
    hosts = target_hosts(manifest, inventory, limit)
    display = Display(manifest, [host.name for host in hosts])
    session = Session(manifest, hosts, extra_vars=parse_extra_vars(list(extra)),
                      options=RunOptions(accept_new_host_keys=accept_new_host_keys),
                      listener=display, record=False)
    with display, signals_to(session):
        try:
            connected = session.connect()
        finally:
            run = session.finish()
        listing = session.list_probes(pattern, connected, with_vars)
    if session.interrupted:
        raise click.exceptions.Abort()
    if as_json:
        click.echo(json.dumps(listing.as_json(), indent=2))
    else:
        width = max((len(point.name) for point in listing.points), default=0)
        for point in listing.points:
            click.echo(f"{report.printable(point.name):<{width}}  "
                       f"[{report.printable(', '.join(point.kernels))}]")
    # every host ends "skipped" (nothing was run): only those not connected went wrong
    unreached = [o for o in run.outcomes if o.host not in connected]
    if unreached:
        err.print(outcomes_table(unreached, "not asked"))
    for host, reason in listing.skipped.items():
        message(f"{host}: not asked: {reason}", "red")
    if not listing.points and listing.kernels:
        message(f"no probe point matches {pattern} on "
                f"{', '.join(sorted(listing.kernels))}")
    sys.exit(1 if unreached or listing.skipped or not listing.points else 0)


def print_plan(plan: Plan) -> None:
    table = Table(title="plan", title_justify="left")
    for column in ("probe", "module", "kernel", "toolchain", "hosts", "state"):
        table.add_column(column, no_wrap=column == "toolchain")
    for job in plan.jobs:
        state = "failed" if job.error else ("cached" if job.cached else "to build")
        # its name and systemtap version
        toolchain = "-" if job.error else \
            f"{job.spec.toolchain or toolchains.HOST} {job.spec.stap_version}"
        table.add_row(Text(job.probe.name), job.spec.key[:12],
                      Text(report.printable(job.spec.release)), Text(toolchain),
                      Text(",".join(job.hosts)), state)
    err.print(table)
    for host, reason in plan.unservable.items():
        message(f"{host}: cannot be served: {reason}", "red")


@cli.command()
@click.argument("key")
def explain(key: str) -> None:
    """Describe a manifest key, e.g. `strategy.serial`."""
    click.echo(explain_key(key))


# -- cache -------------------------------------------------------------------------------
@cli.group(name="cache")
def cache_group() -> None:
    """The local module cache."""


@cache_group.command(name="list")
def cache_list() -> None:
    table = Table()
    for column in ("key", "module", "kernel", "size", "stap", "fix"):
        table.add_column(column)
    for row in ModuleCache(cache_dir()).entries():
        table.add_row(row.key[:12], Text(row.module_name), Text(row.release),
                      f"{row.size // 1024} KiB", Text(row.stap_version), Text(row.runtime_fix))
    Console().print(table)


@cache_group.command(name="prune")
@click.option("--keep", type=click.IntRange(0), default=0, help="Newest modules to keep.")
def cache_prune(keep: int) -> None:
    message(f"removed {ModuleCache(cache_dir()).prune(keep)} module(s)")


# -- toolchains --------------------------------------------------------------------------
@cli.group(name="toolchain")
def toolchain_group() -> None:
    """The systemtaps stapctl compiles with: the controller's own, and build roots."""


@toolchain_group.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def toolchain_list(as_json: bool) -> None:
    """Show each toolchain, its systemtap and the kernel line it was made for."""
    found = toolchains.Toolchains(ModuleCache(cache_dir())).all()
    if as_json:
        click.echo(json.dumps({"toolchains": [t.describe() for t in found]}))
        return
    table = Table()
    for column in ("name", "systemtap", "suite", "kernel", "root"):
        table.add_column(column)
    for t in found:
        table.add_row(t.name, t.stap_version, t.suite, t.kernel_release, str(t.root))
    Console().print(table)


@toolchain_group.command(name="add")
@click.argument("suite")
def toolchain_add(suite: str) -> None:
    """Make the build root of a Debian SUITE (e.g. trixie) with mmdebstrap."""
    with err.status("toolchain…") as status:
        made = toolchains.Toolchains(ModuleCache(cache_dir()),
                                     lambda text: status.update(text)).add(suite)
    message(f"{made.name}: systemtap {made.stap_version}, kernel {made.kernel_release}, "
            f"in {made.root}")


@toolchain_group.command(name="remove")
@click.argument("name")
def toolchain_remove(name: str) -> None:
    """Delete a build root (and its stap cache); the modules it built stay cached."""
    removed = toolchains.Toolchains(ModuleCache(cache_dir())).remove(name)
    message(f"removed the {removed.name} toolchain ({removed.root})")


# -- lab ---------------------------------------------------------------------------------
@cli.group(name="lab")
def lab_group() -> None:
    """Local qemu guests running real kernels, for trying stapctl and for its tests."""


def default_lab() -> Lab:
    """The user's lab, imported only by the commands that use it."""
    from stapctl.lab import Lab

    return Lab.default()


@lab_group.command()
@click.option("--hosts", "count", type=click.IntRange(1, 16), default=1, show_default=True)
@click.option("--release", help="Kernels to boot: Debian suite names (bookworm, trixie) or "
              "exact kernel releases, a comma list assigned to the guests in order (the last "
              "fills the rest); a suite other than this machine's boots its build root's "
              "kernel. Default: the one linux-headers-amd64 names.")
def up(count: int, release: str | None) -> None:
    """Build the guest image if needed and boot COUNT guests."""
    with err.status("lab…") as status:
        result = default_lab().up(count, progress=lambda text: status.update(text),
                                      release=release)
    show_lab(result, as_json=False)


@lab_group.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def status(as_json: bool) -> None:
    """Show each guest and the inventory path."""
    show_lab(default_lab().status(), as_json)


@lab_group.command()
def down() -> None:
    """Stop every guest the lab started."""
    with err.status("stopping guests…") as status:
        default_lab().down(progress=lambda text: status.update(text))
    err.print("lab is down")


def show_lab(result: LabStatus, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({
            "guests": [{"name": g.name, "host": g.host, "port": g.port, "user": g.user,
                        "key": g.key, "release": g.release, "pid": g.pid,
                        "state": g.state.value}
                       for g in result.guests],
            "inventory": str(result.inventory),
        }))
        return
    table = Table()
    for column in ("name", "ssh", "kernel", "pid", "state"):
        table.add_column(column)
    for g in result.guests:
        table.add_row(g.name, f"{g.user}@{g.host}:{g.port}", g.release, str(g.pid),
                      g.state.value)
    Console().print(table)
    click.echo(f"inventory: {result.inventory}")
