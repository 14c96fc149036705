"""Which kernel each lab guest boots, from ``lab up --release``: suite names (bookworm,
trixie) or exact kernel releases, a comma list assigned to the guests in order.

The host's suite and the releases whose headers this machine has boot this machine's
kernels; any other comes from the build root of its suite (stapctl.toolchains), made on
demand, which holds that kernel's headers, image and modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stapctl.cache import ModuleCache, cache_dir
from stapctl.errors import LabError, StapctlError
from stapctl.lab.image import Progress, guest_release
from stapctl.toolchains import SUITE_NAME, Toolchains


@dataclass(frozen=True)
class GuestKernel:
    release: str
    tree: Path  # where boot/vmlinuz-RELEASE and lib/modules/RELEASE are: / or a build root


def guest_kernels(releases: str | None, count: int, progress: Progress) -> list[GuestKernel]:
    """One kernel per guest, lab-1 first; a list shorter than ``count`` repeats its last."""
    items = [item.strip() for item in (releases or "").split(",")] if releases else [""]
    if "" in items and releases:
        raise LabError(f"--release {releases!r} has an empty item: write e.g. bookworm,trixie")
    if len(items) > count:
        raise LabError(f"--release names {len(items)} kernels for {count} guest(s): "
                       f"use --hosts {len(items)}")
    kernels: dict[str, GuestKernel] = {}
    for item in items:
        if item not in kernels:
            kernels[item] = _guest_kernel(item, progress)
    return [kernels[items[min(i, len(items) - 1)]] for i in range(count)]


def _guest_kernel(item: str, progress: Progress) -> GuestKernel:
    if not item:
        return GuestKernel(guest_release(), Path("/"))
    if Path(f"/lib/modules/{item}/build").is_dir():  # a release this machine has
        return GuestKernel(item, Path("/"))
    try:
        toolchains = Toolchains(ModuleCache(cache_dir()), progress)
        if SUITE_NAME.fullmatch(item):
            host = toolchains.host()
            if host is not None and host.suite == item:
                return GuestKernel(guest_release(), Path("/"))
            toolchain = toolchains.add(item)
            return GuestKernel(toolchain.kernel_release, toolchain.root)
        # the root of the release's suite, with its headers (and so its image) fetched
        return GuestKernel(item, toolchains.for_release(item).root)
    except StapctlError as exc:
        raise LabError(f"cannot boot {item}: {exc}") from None
