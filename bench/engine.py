"""The Celery engine's overhead: one 300-target apply run locally, then through 1, 2 and 3
`stapctl worker` processes on this machine, at equal total forks.

Targets are loopback sshd processes (25 host names each), every host's agent a test
double that starts, prints a line, waits ``--pause`` seconds and ends ok
(tests/engine_fleet.py); the module is the real one stap compiled for the hello script
(cached after the first round). The broker is a real redis-server on a loopback port.

At equal total forks F: locally one Fleet with F threads; with N workers each runs one
slice at a time (``--concurrency 1``) of F/N forks, and the run is cut into N slices
(``--slices-per-worker`` times N), so N·(F/N) = F hosts are worked on at once either way.

Where the time goes: each run's stages (connect: SSH, agent, facts — locally on the
controller, through an engine on the workers, with the slices handed out and the facts
sent back; build: plan and the cached compile; run: the fan-out — through an engine the
modules stored, the plan published and each worker's module fetched, then the batches
released; finish: the record), and within the run stage the time to the first host's
upload and to the last host's end; the CPU time the controller and the workers spent.
And how many workers' messages per second one controller takes (the engine's limit on
a fleet's event rate).
Prints a table; writes bench/results/engine.json. Needs root (sshd logs in as root) and
redis-server.

    python bench/engine.py [--hosts 300] [--forks 60] [--workers 1,2,3] [--pause 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/
from measure import process_cpu  # noqa: E402

from stapctl.config import load_config  # noqa: E402
from stapctl.engine import (  # noqa: E402
    BATCH,
    CeleryEngine,
    RunKeys,
    broker,
    broker_url,
    checked,
    signature,
)
from stapctl.manifest import load_manifest  # noqa: E402
from stapctl.models import Event, Manifest, Run, Strategy  # noqa: E402
from stapctl.session import Session, Silent, select_hosts  # noqa: E402
from stapctl.store import RunRecorder  # noqa: E402
from tests.engine_fleet import (  # noqa: E402
    Targets,
    Workers,
    make_targets,
    start_broker,
    start_workers,
    write_secret,
)

STAGES = ("connect", "build", "run", "finish")


@dataclass
class Timeline(Silent):
    """When each host's upload and end arrived, relative to the run stage's start."""

    run_started: float = 0.0
    uploads: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)

    def event(self, event: Event) -> None:
        now = time.perf_counter() - self.run_started
        if event.kind == "uploaded":
            self.uploads.append(now)
        elif event.kind in ("finished", "failed", "unreachable", "skipped"):
            self.ends.append(now)


def one_apply(targets: Targets, forks: int, engine: CeleryEngine | None,
              workers: Workers | None = None) -> dict[str, object]:
    manifest = replace(load_manifest(targets.manifest),
                       strategy=Strategy(forks=forks, connect_timeout=60))
    timeline = Timeline()
    session = Session(manifest, select_hosts(manifest, targets.inventory), listener=timeline,
                      record=False, engine=engine)
    times: dict[str, float] = {}
    worker_pids = [p.pid for p in workers.processes.values()] if workers else []
    worker_cpu = sum(process_cpu(pid) for pid in worker_pids)
    controller_cpu = process_cpu(os.getpid())
    started = time.perf_counter()
    connected = session.connect()
    times["connect"] = time.perf_counter() - started
    mark = time.perf_counter()
    plan = session.build(session.plan(connected))
    times["build"] = time.perf_counter() - mark
    mark = timeline.run_started = time.perf_counter()
    session.run(plan)
    times["run"] = time.perf_counter() - mark
    mark = time.perf_counter()
    run = session.finish()
    times["finish"] = time.perf_counter() - mark
    ok = sum(outcome.ok for outcome in run.outcomes)
    if ok != len(targets.names):
        raise SystemExit(f"only {ok} of {len(targets.names)} hosts ended ok: "
                         f"{[o for o in run.outcomes if not o.ok][:3]}")
    return {"total_s": time.perf_counter() - started, "stages_s": times,
            "controller_cpu_s": process_cpu(os.getpid()) - controller_cpu,
            "workers_cpu_s": sum(process_cpu(pid) for pid in worker_pids) - worker_cpu,
            "first_upload_s": min(timeline.uploads), "last_end_s": max(timeline.ends),
            "served_by": sorted({o.worker.split("@")[0] for o in run.outcomes if o.worker})}


def ingest_rate(engine: str, secret: bytes, count: int = 50_000) -> dict[str, float]:
    """How fast one controller takes workers' messages: ``count`` signed output events
    written to a run's stream (pipelined, as a worker's Publisher sends them), then read
    back, checked, decoded and written to a run folder's events.jsonl (RunRecorder), as
    the controller's Dispatch and Session do. Messages per second, each way."""
    client = broker(broker_url(engine))
    keys = RunKeys("ingest")
    started = time.perf_counter()
    for first in range(0, count, BATCH):
        pipe = client.pipeline(transaction=False)
        for index in range(first, min(count, first + BATCH)):
            data = json.dumps({"t": "event", "host": f"h{index % 300:03d}", "kind": "output",
                               "probe": "p", "text": f"line {index}",
                               "time": time.time()}).encode()
            pipe.xadd(keys.stream, {"m": data, "s": signature(secret, data)})
        pipe.execute()
    written = time.perf_counter() - started
    manifest = Manifest(path=Path("ingest.yaml"), name="ingest", probes=())
    recorder = RunRecorder("ingest-run", manifest)
    started, last, taken = time.perf_counter(), "0-0", 0
    while taken < count:
        replies: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] = \
            client.xread({keys.stream: last}, count=BATCH)  # type: ignore[assignment]
        for _, messages in replies:
            for message_id, fields in messages:
                last = message_id.decode()
                message = json.loads(checked(secret, fields[b"m"], fields[b"s"].decode()))
                recorder.event(Event(host=message["host"], kind="output",
                                     probe=message["probe"], text=message["text"],
                                     time=message["time"]))
                taken += 1
        client.xtrim(keys.stream, minid=last)
    read = time.perf_counter() - started
    recorder.finish(Run(id="ingest-run", outcomes=()))
    client.delete(keys.stream)
    return {"messages": count, "written_per_s": count / written, "taken_per_s": count / read}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=300)
    parser.add_argument("--forks", type=int, default=60)
    parser.add_argument("--workers", default="1,2,3")
    parser.add_argument("--pause", type=float, default=1.0)
    parser.add_argument("--slices-per-worker", type=int, default=1)
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="stapctl-engine-") as tmp:
        work = Path(tmp)
        os.environ["XDG_DATA_HOME"] = str(work / "data")
        os.environ["STAPCTL_SECRET_FILE"] = str(write_secret(work))
        (work / "fleet").mkdir()
        (work / "redis").mkdir()
        targets = make_targets(work / "fleet", args.hosts, headers_release(), args.pause)
        broker = start_broker(work / "redis")
        try:
            ingest = ingest_rate(broker.engine, load_config().secret())
            one_apply(targets, args.forks, None)  # agents shipped, module compiled: warm
            local = one_apply(targets, args.forks, None)
            rows.append({"workers": 0, **local})
            for count in counts:
                engine = CeleryEngine(broker_url(broker.engine), load_config().secret(),
                                      slices=args.slices_per_worker * count)
                forks = max(1, args.forks // count)
                for workers in start_workers(work / f"workers-{count}", broker.engine,
                                             dict(os.environ), count, concurrency=1):
                    one_apply(targets, forks, engine)  # each worker's module cache: warm
                    rows.append({"workers": count,
                                 **one_apply(targets, forks, engine, workers)})
                    workers.stop()
        finally:
            broker.stop()
            targets.sshds.stop()
    base = float(rows[0]["total_s"])  # type: ignore[arg-type]
    print(f"controller ingest: {ingest['written_per_s']:,.0f} messages/s written to the "
          f"stream, {ingest['taken_per_s']:,.0f}/s read, checked and recorded")
    print(f"{args.hosts} hosts, {args.forks} forks in all, agent pause {args.pause:g}s")
    print("workers  total    ratio  connect  build   run    first-upload  last-end  finish"
          "  cpu: controller  workers")
    for row in rows:
        stages = row["stages_s"]
        assert isinstance(stages, dict)
        row["ratio"] = float(row["total_s"]) / base  # type: ignore[arg-type]
        print(f"{row['workers'] or 'local':>7}  {row['total_s']:6.2f}s  {row['ratio']:5.2f}x  "
              f"{stages['connect']:6.2f}s  {stages['build']:5.2f}s  {stages['run']:5.2f}s  "
              f"{row['first_upload_s']:11.2f}s  {row['last_end_s']:7.2f}s  "
              f"{stages['finish']:5.2f}s  {row['controller_cpu_s']:14.2f}s  "
              f"{row['workers_cpu_s']:6.2f}s")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    path = out / "engine.json"
    path.write_text(json.dumps({"hosts": args.hosts, "forks": args.forks,
                                "pause_s": args.pause, "ingest": ingest, "rows": rows},
                               indent=2))
    print(f"written: {path}")


def headers_release() -> str:
    """A kernel whose headers are here: the targets say they run it, so stap can build."""
    releases = sorted(p.parent.name for p in Path("/lib/modules").glob("*/build"))
    if not releases:
        raise SystemExit("no kernel headers installed: run scripts/install.sh")
    return releases[-1]


if __name__ == "__main__":
    main()
