"""Planning cost: N hosts over K kernel releases, cold and warm module cache.

The claim under test: the work grows with K (one compile per distinct module), not with
N (hosts only cost a render and a dictionary insert). Facts are supplied, so no host is
contacted.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from pathlib import Path

from stapctl.build import Builder
from stapctl.manifest import load_manifest
from stapctl.models import Host, HostFacts
from stapctl.session import Session

SCRIPT = """\
apiVersion: stapctl/v1
kind: Trace
name: bench
probes:
  - name: opens
    script: |
      probe syscall.openat { if (pid() == {{ watched_pid }}) printf("%s\\n", filename) }
      probe oneshot { printf("TOKEN\\n") }
vars: {watched_pid: 1}
"""


def releases() -> list[str]:
    return sorted(p.parent.name for p in Path("/lib/modules").glob("*/build"))


def measure(counts: list[int]) -> list[dict[str, object]]:
    """For K = 1 … every installed kernel, a new script planned and built for each N:
    the first N is the cold build, the others are warm."""
    kernels = releases()
    builder = Builder()
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest_path = Path(tmp) / "bench.yaml"
        for k in range(1, len(kernels) + 1):
            token = secrets.token_hex(4)  # new script text: the first build is truly cold
            manifest_path.write_text(SCRIPT.replace("TOKEN", token))
            manifest = load_manifest(manifest_path)
            for n in counts:
                hosts = {
                    f"h{i}": (Host(name=f"h{i}", address=f"h{i}"),
                              HostFacts(release=kernels[i % k], arch="x86_64"))
                    for i in range(n)
                }
                session = Session(manifest, [host for host, _ in hosts.values()],
                                  builder=builder, record=False)
                started = time.perf_counter()
                plan = session.plan(hosts)
                planned = time.perf_counter() - started
                cold = not any(job.cached for job in plan.jobs)
                started = time.perf_counter()
                built = session.build(plan)
                build_time = time.perf_counter() - started
                errors = [job.error for job in built.jobs if job.error]
                rows.append({"hosts": n, "kernels": k, "modules": len(plan.jobs),
                             "cache": "cold" if cold else "warm",
                             "plan_s": round(planned, 3), "build_s": round(build_time, 2),
                             "errors": errors})
    return rows
