"""The session-wide lab: one set of qemu guests shared by every e2e test, and a check after
each test that it left no SystemTap module loaded in them."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator

import pytest

from stapctl.lab import GuestState, Lab, LabStatus

from .helpers import stap_module_names, unload_stap_modules

GUESTS = 3  # fleet tests need several hosts; booting is the expensive part, so all share


def progress(text: str) -> None:
    logging.getLogger("stapctl.lab").info(text)  # pytest shows it when a test fails


@pytest.fixture(scope="session")
def lab() -> Iterator[LabStatus]:
    """GUESTS guests, lab-1 first. Reuse a running lab (test sessions share the tests' lab);
    stop only a lab this session started, unless STAPCTL_KEEP_LAB=1 keeps it for the next
    run."""
    if shutil.which("qemu-system-x86_64") is None:  # never skip: scripts/install.sh has it
        pytest.fail("qemu-system-x86_64 not found: run scripts/install.sh")
    tests_lab = Lab.default()
    was_running = any(g.state is not GuestState.STOPPED for g in tests_lab.status().guests)
    yield tests_lab.up(GUESTS, progress)
    if not was_running and os.environ.get("STAPCTL_KEEP_LAB") != "1":
        tests_lab.down(progress)


@pytest.fixture
def fleet_lab(lab: LabStatus) -> LabStatus:
    """The session's lab as it is now: a guest a test killed is booted again (on a new
    port, which the lab's inventory then names)."""
    return Lab.default().up(GUESTS, progress)


def loaded_modules(status: LabStatus) -> dict[str, set[str]]:
    """Each running guest's loaded SystemTap modules."""
    return {g.name: stap_module_names(status, index) for index, g in enumerate(status.guests)
            if g.state is GuestState.RUNNING}


@pytest.fixture(autouse=True)
def no_module_left_loaded(lab: LabStatus) -> Iterator[None]:
    """A module a test leaves loaded fails that test, and is unloaded so the next test starts
    clean. Modules loaded before the test began are not its own: another session may share
    the lab."""
    before = loaded_modules(Lab.default().status())
    yield
    status = Lab.default().status()  # a guest the test killed may run again on a new port
    index = {g.name: i for i, g in enumerate(status.guests)}
    problems = []
    for guest, names in loaded_modules(status).items():
        left = names - before.get(guest, set())
        if left:
            stuck = unload_stap_modules(status, left, index[guest])
            problems.append(f"{guest}: {', '.join(sorted(left))} "
                            + (f"(rmmod failed for {', '.join(sorted(stuck))})" if stuck
                               else "(now unloaded)"))
    if problems:
        pytest.fail("the test left modules loaded: " + "; ".join(problems), pytrace=False)
