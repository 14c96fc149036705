"""The session-wide lab: one set of qemu guests shared by every e2e test."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator

import pytest

from stapctl import lab as stapctl_lab

GUESTS = 3  # fleet tests need several hosts; booting is the expensive part, so all share


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: real kernels in lab guests (boots qemu)")


@pytest.fixture(scope="session")
def lab() -> Iterator[stapctl_lab.LabStatus]:
    """GUESTS guests, lab-1 first. Reuse a running lab (developers share one); stop only a
    lab this session started, unless STAPCTL_KEEP_LAB=1 keeps it for the next run."""
    if shutil.which("qemu-system-x86_64") is None:  # never skip: scripts/install.sh has it
        pytest.fail("qemu-system-x86_64 not found: run scripts/install.sh")
    was_running = any(g.state != "stopped" for g in stapctl_lab.status().guests)
    progress = logging.getLogger("stapctl.lab").info  # pytest shows it when a test fails
    yield stapctl_lab.up(GUESTS, progress)
    if not was_running and os.environ.get("STAPCTL_KEEP_LAB") != "1":
        stapctl_lab.down(progress)


@pytest.fixture
def fleet_lab(lab: stapctl_lab.LabStatus) -> stapctl_lab.LabStatus:
    """The session's lab as it is now: a guest a test killed is booted again (on a new
    port, which the lab's inventory then names)."""
    return stapctl_lab.up(GUESTS, logging.getLogger("stapctl.lab").info)
