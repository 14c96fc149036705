"""Every ready playbook, as it is, on a real kernel in a lab guest: each runs for a few
seconds while a workload in the guest does what its header says it answers, and what
the header promises must appear in its output."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stapctl.connection import ConnectOptions, connect
from stapctl.lab import LabStatus

from .helpers import guest_host, guest_run

pytestmark = pytest.mark.e2e

PLAYBOOKS = Path(__file__).resolve().parents[2] / "playbooks"
NULL_BLK = "drivers/block/null_blk/null_blk.ko"
CONFIGFS = "fs/configfs/configfs.ko"  # null_blk needs it


def apply_with_workload(lab: LabStatus, playbook: str, workload: str | None,
                        *args: str, duration: str = "6s") -> list[dict[str, Any]]:
    """`stapctl apply --format json` of a playbook on lab-1; the workload runs in the guest
    as soon as the probe has started (after any compile). Returns the JSON lines."""
    command = [sys.executable, "-m", "stapctl", "apply", "-i", str(lab.inventory),
               "--limit", "lab-1", "--format", "json", "--duration", duration, *args,
               str(PLAYBOOKS / f"{playbook}.yaml")]
    return _run(lab, command, workload)


def _run(lab: LabStatus, command: list[str], workload: str | None) -> list[dict[str, Any]]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(process.stderr or []), daemon=True)
    reader.start()
    records: list[dict[str, Any]] = []
    worker: threading.Thread | None = None
    for line in process.stdout or []:
        record = json.loads(line)
        records.append(record)
        if record.get("kind") == "started" and workload is not None and worker is None:
            worker = threading.Thread(target=guest_run, args=(lab, workload), daemon=True)
            worker.start()
    assert process.wait(timeout=900) == 0, "".join(stderr)
    if worker is not None:
        worker.join(60)
    assert workload is None or worker is not None, "the probe never started"
    return records


def output(records: list[dict[str, Any]]) -> list[str]:
    return [r["text"] for r in records if r.get("type") == "event" and r["kind"] == "output"]


def kernel_module(lab: LabStatus, relative: str) -> Path:
    """A module of the guests' kernel, from this machine's /lib/modules if the kernel
    package is installed, else from the package the lab downloaded."""
    release = lab.guests[0].release
    installed = Path("/lib/modules") / release / "kernel" / relative
    if installed.exists():
        return installed
    lab_dir = Path(os.environ["STAPCTL_LAB_DIR"])
    [deb] = (lab_dir / "cache").glob(f"linux-image-{release}_*.deb")
    target = lab_dir / "modules" / release / relative
    if not target.exists():
        data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True,
                              capture_output=True).stdout
        target.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            member = archive.extractfile(f"./lib/modules/{release}/kernel/{relative}")
            assert member is not None
            target.write_bytes(member.read())
    return target


@pytest.fixture(scope="module")
def null_blk_files(lab: LabStatus) -> Iterator[None]:
    """configfs.ko and null_blk.ko copied into lab-1 (the module-loads workload loads
    them, bio-latency reads the disk null_blk makes); unloaded at the end."""
    connection = connect(guest_host(lab), ConnectOptions())
    try:
        for relative in (CONFIGFS, NULL_BLK):
            connection.put(kernel_module(lab, relative), f"/tmp/{Path(relative).name}")
    finally:
        connection.close()
    yield
    guest_run(lab, "rmmod null_blk configfs 2>/dev/null; rm -f /tmp/*.ko; true")


def test_hello(lab: LabStatus) -> None:
    assert output(apply_with_workload(lab, "hello", None)) == ["hello, world!"]


def test_syscall_top_names_the_busiest_process(lab: LabStatus) -> None:
    workload = ("ln -sf /usr/bin/python3 /tmp/syscallhog && /tmp/syscallhog -c '"
                "import os, time\nend = time.time() + 4\nwhile time.time() < end: os.getppid()'")
    lines = output(apply_with_workload(lab, "syscall-top", workload, "-e", "interval_s=1"))
    tops = [re.fullmatch(r"(\S+) +(\d+)", line) for line in lines]
    assert any(line.startswith("--- busiest processes") for line in lines), lines
    busiest = [m[1] for i, m in enumerate(tops) if m and lines[i - 1].startswith("---")]
    assert "syscallhog" in busiest, lines


def test_openat_slow_shows_process_time_and_path(lab: LabStatus) -> None:
    workload = "echo x >/tmp/opened; for i in 1 2 3 4 5; do cat /tmp/opened >/dev/null; done"
    lines = output(apply_with_workload(lab, "openat-slow", workload, "-e", "threshold_us=0"))
    assert any(re.fullmatch(r'cat\[\d+\] \d+us "/tmp/opened" = \d+', line)
               for line in lines), [line for line in lines if "opened" in line]


def test_exec_audit_shows_user_parent_and_arguments(lab: LabStatus) -> None:
    workload = "sh -c 'busybox true audit-marker-4711'"
    lines = output(apply_with_workload(lab, "exec-audit", workload))
    # busybox's sh runs its applets through /proc/self/exe
    assert any(re.search(r' uid=0 ppid=\d+ sh\[\d+\] exec "\S+" '
                         r'\["busybox", "true", "audit-marker-4711"\]$', line)
               for line in lines), lines


def test_sensitive_files_shows_shadow_and_ssh_opens(lab: LabStatus) -> None:
    workload = "cat /etc/shadow /root/.ssh/authorized_keys /etc/hostname >/dev/null 2>&1"
    lines = output(apply_with_workload(lab, "sensitive-files", workload))
    assert any(re.search(r'uid=0 cat\[\d+\] ppid=\d+ opened "/etc/shadow" = -2 \(ENOENT\)$',
                         line) for line in lines), lines  # the guest has no shadow file
    assert any(re.search(r'cat\[\d+\] ppid=\d+ opened "/root/\.ssh/authorized_keys" = \d+$',
                         line) for line in lines), lines
    assert not any("/etc/hostname" in line for line in lines)


def test_tcp_connect_shows_destinations(lab: LabStatus) -> None:
    workload = """python3 -c '
import socket
server = socket.socket(); server.bind(("127.0.0.1", 4711)); server.listen()
socket.create_connection(("127.0.0.1", 4711)).close()
try:
    socket.create_connection(("::1", 4712), timeout=2).close()
except OSError:
    pass  # nothing listens there: the connect is what is traced
'"""
    lines = output(apply_with_workload(lab, "tcp-connect", workload))
    assert any(re.search(r"uid=0 python3\[\d+\] connect 127\.0\.0\.1:4711$", line)
               for line in lines), lines
    ipv6_loopback = ":".join(["0000"] * 7 + ["0001"])  # as the kernel's %pI6 prints ::1
    assert any(re.search(rf"python3\[\d+\] connect \[{ipv6_loopback}\]:4712$", line)
               for line in lines), lines


@pytest.mark.usefixtures("null_blk_files")
def test_module_loads_names_the_module_and_the_loader(lab: LabStatus) -> None:
    workload = "rmmod null_blk configfs 2>/dev/null; insmod /tmp/configfs.ko && " \
               "insmod /tmp/null_blk.ko"
    lines = output(apply_with_workload(lab, "module-loads", workload))
    for module in ("configfs", "null_blk"):
        assert any(re.search(rf"uid=0 insmod\[\d+\] ppid=\d+ loaded module {module}$", line)
                   for line in lines), lines


def test_privilege_changes_shows_setuid_setgid_and_capset(lab: LabStatus) -> None:
    workload = """python3 -c '
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
header = (ctypes.c_uint32 * 2)(0x20080522, 0)
data = (ctypes.c_uint32 * 6)()
assert libc.syscall(125, header, data) == 0  # capget
assert libc.syscall(126, header, data) == 0  # capset: the same sets again
os.setgid(0)
os.setresuid(0, 0, 0)
os.setuid(0)
'"""
    lines = output(apply_with_workload(lab, "privilege-changes", workload))
    for call in (r"capset\(0x[0-9a-f]+, 0x[0-9a-f]+\)", r"setgid\(0\)", r"setresuid\(0, 0, 0\)",
                 r"setuid\(0\)"):
        assert any(re.search(rf"uid=0 euid=0 python3\[\d+\] ppid=\d+ {call} = 0$", line)
                   for line in lines), (call, lines)


@pytest.mark.usefixtures("null_blk_files")
def test_bio_latency_draws_a_histogram_of_block_requests(lab: LabStatus) -> None:
    workload = "lsmod | grep -q '^null_blk' || { insmod /tmp/configfs.ko; " \
               "insmod /tmp/null_blk.ko; }; " \
               "dd if=/dev/nullb0 of=/dev/null bs=4096 count=300 iflag=direct 2>/dev/null"
    records = apply_with_workload(lab, "bio-latency", workload)
    lines = output(records)
    summary = next(m for line in lines if (m := re.fullmatch(
        r"(\d+) block requests, average (\d+) us", line)))
    assert int(summary[1]) >= 300, lines
    [aggregates] = [r for r in records if r.get("type") == "aggregates"]
    [histogram] = aggregates["histograms"]
    assert histogram["name"] == "bio_latency_us" and histogram["kind"] == "log"
    assert sum(b["count"] for b in histogram["buckets"]) == int(summary[1])


def test_fleet_syscalls_merges_every_host_s_records(lab: LabStatus, tmp_path: Path) -> None:
    """On every guest: the fleet's totals are the sums of what each host printed,
    computed here from the events, line by line."""
    command = [sys.executable, "-m", "stapctl", "apply", "-i", str(lab.inventory),
               "--format", "json", "--duration", "5s", str(PLAYBOOKS / "fleet-syscalls.yaml")]
    records = _run(lab, command, None)
    events = [r for r in records if r.get("type") == "event" and r["kind"] == "output"]
    hosts = {e["host"] for e in events}
    assert len(hosts) == len(lab.guests) >= 2
    expected: Counter[str] = Counter()
    for event in events:
        if match := re.fullmatch(r"@agg count syscalls (\d+) (.*)", event["text"]):
            expected[match[2]] += int(match[1])
    [aggregates] = [r for r in records if r.get("type") == "aggregates"]
    [count] = aggregates["counts"]
    assert sorted(count["hosts"]) == sorted(hosts)
    assert {t["key"]: t["value"] for t in count["totals"]} == dict(expected)
    assert [t["value"] for t in count["totals"]] == sorted(expected.values(), reverse=True)

    per_host_buckets: Counter[str] = Counter()
    rows = _histogram_rows(events)
    for host_rows in rows.values():
        per_host_buckets.update(host_rows)
    [histogram] = aggregates["histograms"]
    assert {str(b["value"]): b["count"] for b in histogram["buckets"]} == \
        {value: per_host_buckets[value] for value in per_host_buckets}
    assert len(rows) == len(hosts)


def _histogram_rows(events: list[dict[str, Any]]) -> dict[str, Counter[str]]:
    """Each host's histogram rows (value → count), read here with a plain regex."""
    rows: dict[str, Counter[str]] = {}
    for event in events:
        if match := re.fullmatch(r" *(-?\d+) \|@* +(\d+)", event["text"]):
            rows.setdefault(event["host"], Counter())[match[1]] += int(match[2])
    return rows

