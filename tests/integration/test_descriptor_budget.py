"""A fleet larger than the descriptor limit allows: hosts beyond the budget are connected
for their facts, closed, and opened again at their turn, so every host still ends with an
outcome and the open connections never pass the limit (real sshd on loopback)."""

from __future__ import annotations

import hashlib
import os
import resource
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from stapctl.connection import Connection, ConnectOptions, connect
from stapctl.execute import RESERVED_DESCRIPTORS, Fleet, RunOptions
from stapctl.models import (
    FailureKind,
    Host,
    Manifest,
    ModuleArtifact,
    ModuleSpec,
    Probe,
    Strategy,
)
from stapctl.plan import ModuleJob, Plan

from .conftest import Sshd, host_for

pytestmark = pytest.mark.integration

HOSTS = 6
BUDGET = 3  # connections the lowered descriptor limit leaves room for


@pytest.fixture
def low_descriptor_limit() -> Iterator[None]:
    """The soft RLIMIT_NOFILE lowered so that connection_budget() is BUDGET."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    if in_use >= RESERVED_DESCRIPTORS:
        pytest.fail(f"{in_use} descriptors already open: more than the reserve")
    resource.setrlimit(resource.RLIMIT_NOFILE, (RESERVED_DESCRIPTORS + BUDGET, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Watched:
    """Real SSH connections, counted while they are open."""

    def __init__(self) -> None:
        self.open = 0
        self.most = 0
        self.opened = 0
        self.lock = threading.Lock()

    def connect(self, host: Host, options: ConnectOptions) -> Connection:
        connection = connect(host, options)
        with self.lock:
            self.open += 1
            self.opened += 1
            self.most = max(self.most, self.open)
        close = connection.close
        closed = threading.Event()

        def counted_close() -> None:
            with self.lock:
                if not closed.is_set():
                    self.open -= 1
                closed.set()
            close()

        connection.close = counted_close  # type: ignore[method-assign]
        return connection


def test_a_fleet_beyond_the_budget_runs_every_host_within_it(
        sshd: Sshd, tmp_path: Path, low_descriptor_limit: None) -> None:
    probe = Probe(name="budget", template="", origin="budget", first_line=1)
    manifest = Manifest(path=Path("budget.yaml"), name="budget", probes=(probe,),
                        strategy=Strategy(forks=2, connect_timeout=30))
    hosts = [host_for(sshd, name=f"h{i}") for i in range(HOSTS)]
    module = tmp_path / "budget.ko"
    module.write_bytes(os.urandom(4096))
    sha256 = hashlib.sha256(module.read_bytes()).hexdigest()
    spec = ModuleSpec(script="budget", release="budget", arch="x86_64")
    plan = Plan(jobs=(ModuleJob(probe=probe, spec=spec, hosts=tuple(h.name for h in hosts),
                                artifact=ModuleArtifact(spec.key, module, sha256,
                                                        "stapctl_budget")),))
    watched = Watched()
    fleet = Fleet(manifest, RunOptions(check=True), lambda event: None,
                  connector=watched.connect)
    try:
        connected = fleet.connect(hosts)
        fleet.run(plan)
    finally:
        fleet.close()
    assert sorted(connected) == sorted(h.name for h in hosts)
    assert watched.most <= BUDGET
    assert watched.opened > HOSTS  # parked hosts were opened a second time
    assert watched.open == 0
    assert sorted(o.host for o in fleet.outcomes) == sorted(h.name for h in hosts)
    # this machine may or may not load modules; the fake module never loads either way
    assert {o.kind for o in fleet.outcomes} <= {None, FailureKind.PREFLIGHT_REFUSED}, \
        [o.message for o in fleet.outcomes]
