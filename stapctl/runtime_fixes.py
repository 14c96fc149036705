"""Known mismatches between a toolchain's systemtap runtime and newer kernels.

Each fix is detected from the kernel headers and the pristine runtime, so the set is
chosen per (systemtap version, kernel headers): 4.8 on 6.1.1xx stable kernels needs
``task_work_cancel_func`` and ``relay_header_split``, 5.1 on 6.12 ``uprobe_unregister``.
Fixes are applied to a private copy of the runtime that stap is then given with ``-R``;
the names of the fixes a module needed are part of its cache key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stapctl.toolchains import Toolchain


@dataclass(frozen=True)
class RuntimeFix:
    """A known mismatch between a systemtap runtime and a newer kernel.

    ``applies`` looks at the kernel headers (a function from a header's path to its text)
    and the pristine runtime; ``apply`` edits a private copy of the runtime.
    ``stap_options`` are added to stap's command line, ``{runtime}`` standing for where
    stap sees that copy.
    """

    name: str
    applies: Callable[[Callable[[str], str], Path], bool]
    apply: Callable[[Path], None]
    stap_options: tuple[str, ...] = ()


def header_text(toolchain: Toolchain, release: str, relative: str) -> str:
    """A kernel header's text, looking in the build tree and then the source tree.

    Debian splits headers into an arch package (``build``) and a common one (``source``).
    """
    for tree in ("build", "source"):
        path = toolchain.headers(release, tree) / relative
        if path.is_file():
            return path.read_text(errors="replace")
    return ""


def _task_work_cancel_func_applies(header_text: Callable[[str], str], runtime: Path) -> bool:
    # 6.1.1xx stable kernels made task_work_cancel() take a callback_head and moved the
    # old meaning to task_work_cancel_func(); systemtap 4.8 still uses the old one.
    header = header_text("include/linux/task_work.h")
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
HEADER_RETRIED = re.compile(r"bytes_reserved <=? hlen")  # ours, or upstream's since 5.1
HEADER_RETRY = """
        /* stapctl: a header that does not fit the sub-buffer's end is not split; pad the
           tail with zeros and reserve again at the start of the next sub-buffer */
        if (bytes_reserved > 0 && bytes_reserved <= hlen) {
                memset(_stp_data_entry_data(entry), 0, bytes_reserved);
                bytes_reserved = _stp_data_write_reserve(hlen+len, &entry);
        }"""


def _relay_header_split_applies(header_text: Callable[[str], str], runtime: Path) -> bool:
    # systemtap before 5.1 drops a record whose 8-byte header lands across a relay
    # sub-buffer's end, and leaves stale bytes that desync every reader (fixed upstream
    # in 5.1); seen here as lost lines and "transport failures" under bursts of output.
    source = runtime / "print_flush.c"
    if not source.is_file():
        return False
    text = source.read_text()
    return FIRST_RESERVE.search(text) is not None and HEADER_RETRIED.search(text) is None


def _relay_header_split_apply(runtime: Path) -> None:
    source = runtime / "print_flush.c"
    text = source.read_text()
    source.write_text(FIRST_RESERVE.sub(lambda m: m.group(1) + HEADER_RETRY, text, count=1))


UNREGISTER_LOOKUP = 'kallsyms_lookup_name ("uprobe_unregister");'
UNREGISTER_FALLBACK = """kallsyms_lookup_name ("uprobe_unregister");
        /* stapctl: 6.12 split it into uprobe_unregister_nosync and _sync; only uprobe
           probes call it, and this systemtap cannot build those for such a kernel */
        if (kallsyms_uprobe_unregister == NULL)
                kallsyms_uprobe_unregister =
                        (void*) kallsyms_lookup_name ("uprobe_unregister_nosync");"""


def _uprobe_unregister_applies(header_text: Callable[[str], str], runtime: Path) -> bool:
    # Every module's start looks uprobe_unregister up and fails without it ("Can't resolve
    # uprobe_unregister!"), probes on processes or not; 6.12 renamed it. Fixed upstream
    # after 5.1 (PR32194).
    source = runtime / "transport" / "transport.c"
    return (
        "uprobe_unregister_nosync" in header_text("include/linux/uprobes.h")
        and source.is_file()
        and UNREGISTER_LOOKUP in source.read_text()
        and "uprobe_unregister_nosync" not in source.read_text()
    )


def _uprobe_unregister_apply(runtime: Path) -> None:
    source = runtime / "transport" / "transport.c"
    source.write_text(source.read_text().replace(UNREGISTER_LOOKUP, UNREGISTER_FALLBACK, 1))


# systemtap 5.1 defines COUNT_ARGS in the C it writes to find tracepoints' arguments, and
# builds it with -Werror; kernels since 6.7 define it too (linux/args.h), so every query
# fails and no kernel.trace probe (nor syscall probe, which falls back on sys_enter)
# resolves. The compiler stap uses drops -Werror (warnings stay warnings).
STAP_COUNT_ARGS = b"#define COUNT_ARGS(X...) __COUNT_ARGS(, ##X, 12,"
COMPILER_WRAPPER = "stapctl-cc"
COMPILER_WRAPPER_TEXT = """#!/bin/sh
# stapctl: gcc without -Werror, for systemtap's tracepoint queries (see runtime_fixes.py)
for arg do
  shift
  [ "$arg" = -Werror ] || set -- "$@" "$arg"
done
exec gcc "$@"
"""


def _tracequery_count_args_applies(header_text: Callable[[str], str], runtime: Path) -> bool:
    stap = runtime.parents[2] / "bin" / "stap"  # runtime is PREFIX/share/systemtap/runtime
    if "define COUNT_ARGS" not in header_text("include/linux/args.h"):
        return False
    try:
        return STAP_COUNT_ARGS in stap.read_bytes()
    except OSError:
        return False


def _tracequery_count_args_apply(runtime: Path) -> None:
    wrapper = runtime / COMPILER_WRAPPER
    wrapper.write_text(COMPILER_WRAPPER_TEXT)
    wrapper.chmod(0o755)


RUNTIME_FIXES = (
    RuntimeFix("task_work_cancel_func", _task_work_cancel_func_applies,
               _task_work_cancel_func_apply),
    RuntimeFix("relay_header_split", _relay_header_split_applies, _relay_header_split_apply),
    RuntimeFix("uprobe_unregister", _uprobe_unregister_applies, _uprobe_unregister_apply),
    RuntimeFix("tracequery_count_args", _tracequery_count_args_applies,
               _tracequery_count_args_apply,
               stap_options=("-B", "CC={runtime}/" + COMPILER_WRAPPER)),
)


def fixes_needed(toolchain: Toolchain, release: str) -> tuple[RuntimeFix, ...]:
    """The fixes the toolchain's runtime needs to build for ``release``."""

    def header(relative: str) -> str:
        return header_text(toolchain, release, relative)

    return tuple(fix for fix in RUNTIME_FIXES if fix.applies(header, toolchain.runtime))


def fixes_named(names: str) -> tuple[RuntimeFix, ...]:
    """The fixes a ModuleSpec's ``runtime_fix`` (comma-separated names) stands for."""
    wanted = names.split(",")
    return tuple(fix for fix in RUNTIME_FIXES if fix.name in wanted)
