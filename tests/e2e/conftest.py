"""The session-wide lab: one set of qemu guests shared by every e2e test."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator

import pytest

from stapctl.lab import GuestState, Lab, LabStatus

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
