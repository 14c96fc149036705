"""Known mismatches between the installed systemtap runtime and newer kernels.

Each fix is detected from the kernel headers and the pristine runtime, and applied to a
private copy of the runtime that stap is then given with ``-R``; the names of the fixes
a module needed are part of its cache key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stapctl.errors import CompileError
from stapctl.facts import SAFE_FACT_RULE, is_safe_fact, shown

MODULES_ROOT = Path("/lib/modules")


def headers_dir(release: str) -> Path:
    """The release's kernel build tree.

    Every path made from a release starts here, so a release that could leave
    /lib/modules or read as an option is refused here, whoever passed it.
    """
    if not is_safe_fact(release):
        raise CompileError(f"refusing to build for kernel release {shown(release)}: "
                           f"a release must be {SAFE_FACT_RULE}")
    return MODULES_ROOT / release / "build"


@dataclass(frozen=True)
class RuntimeFix:
    """A known mismatch between an installed systemtap runtime and a newer kernel.

    ``applies`` looks at the kernel headers and the pristine runtime; ``apply`` edits a
    private copy of the runtime.
    """

    name: str
    applies: Callable[[str, Path], bool]
    apply: Callable[[Path], None]


def header_text(release: str, relative: str) -> str:
    """A kernel header's text, looking in the build tree and then the source tree.

    Debian splits headers into an arch package (``build``) and a common one (``source``).
    """
    build = headers_dir(release)
    for root in (build, build.parent / "source"):
        path = root / relative
        if path.is_file():
            return path.read_text(errors="replace")
    return ""


def _task_work_cancel_func_applies(release: str, runtime: Path) -> bool:
    # 6.1.1xx stable kernels made task_work_cancel() take a callback_head and moved the
    # old meaning to task_work_cancel_func(); systemtap 4.8 still uses the old one.
    header = header_text(release, "include/linux/task_work.h")
    source = runtime / "stp_task_work.c"
    return (
        "task_work_cancel_func" in header
        and source.is_file()
        and "task_work_cancel_func" not in source.read_text()
    )


def _task_work_cancel_func_apply(runtime: Path) -> None:
    source = runtime / "stp_task_work.c"
    text = source.read_text()
    text = text.replace("typeof(&task_work_cancel)", "typeof(&task_work_cancel_func)")
    text = text.replace(
        'kallsyms_lookup_name("task_work_cancel")', 'kallsyms_lookup_name("task_work_cancel_func")'
    )
    source.write_text(text)


FIRST_RESERVE = re.compile(
    r"(bytes_reserved = _stp_data_write_reserve\(hlen\+len,\s*&entry\);)")
HEADER_RETRY = """
        /* stapctl: a header that does not fit the sub-buffer's end is not split; pad the
           tail with zeros and reserve again at the start of the next sub-buffer */
        if (bytes_reserved > 0 && bytes_reserved <= hlen) {
                memset(_stp_data_entry_data(entry), 0, bytes_reserved);
                bytes_reserved = _stp_data_write_reserve(hlen+len, &entry);
        }"""


def _relay_header_split_applies(release: str, runtime: Path) -> bool:
    # systemtap before 5.1 drops a record whose 8-byte header lands across a relay
    # sub-buffer's end, and leaves stale bytes that desync every reader (fixed upstream
    # in 5.1); seen here as lost lines and "transport failures" under bursts of output.
    source = runtime / "print_flush.c"
    if not source.is_file():
        return False
    text = source.read_text()
    return FIRST_RESERVE.search(text) is not None and "bytes_reserved <= hlen" not in text


def _relay_header_split_apply(runtime: Path) -> None:
    source = runtime / "print_flush.c"
    text = source.read_text()
    source.write_text(FIRST_RESERVE.sub(lambda m: m.group(1) + HEADER_RETRY, text, count=1))


RUNTIME_FIXES = (
    RuntimeFix("task_work_cancel_func", _task_work_cancel_func_applies,
               _task_work_cancel_func_apply),
    RuntimeFix("relay_header_split", _relay_header_split_applies, _relay_header_split_apply),
)


def fixes_needed(release: str, runtime: Path) -> tuple[RuntimeFix, ...]:
    """The fixes the runtime at ``runtime`` needs to build for ``release``."""
    return tuple(fix for fix in RUNTIME_FIXES if fix.applies(release, runtime))


def fixes_named(names: str) -> tuple[RuntimeFix, ...]:
    """The fixes a ModuleSpec's ``runtime_fix`` (comma-separated names) stands for."""
    wanted = names.split(",")
    return tuple(fix for fix in RUNTIME_FIXES if fix.name in wanted)
