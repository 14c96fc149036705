"""Toolchains: the systemtaps stapctl compiles with, one per kernel line it serves.

The controller's own systemtap is one toolchain (``host``). The others are build roots,
one per Debian suite, made on demand with mmdebstrap from the apt sources configured on
this machine and kept in the cache (``toolchains/SUITE/root``), with their stap caches
inside them, so roots are reused across applies. A root holds the suite's systemtap, gcc,
make and current kernel headers (whose package brings the matching kernel image, which
the lab boots); other releases' headers are fetched into it the first time they are
needed.

A target kernel is served by the toolchain of the Debian release its name carries
(``6.12.117+deb13-amd64`` is trixie's), else by the toolchain whose kernel line is the
target's, else by the nearest newer line: a systemtap builds for the kernel line it was
released with and the older ones. ``plan`` shows the choice; none is made silently.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from stapctl.cache import ModuleCache
from stapctl.errors import CompileError, UsageError
from stapctl.facts import SAFE_FACT_RULE, is_safe_fact, shown

Progress = Callable[[str], None]

HOST = "host"
# the packages a root needs to build modules; linux-headers-amd64 names the suite's kernel
ROOT_PACKAGES = ("systemtap", "linux-headers-amd64", "gcc", "make", "kmod")
# Debian's kernels carry their release's number (+deb13); 12 and older carry none
DEBIAN_SUITES = {"11": "bullseye", "12": "bookworm", "13": "trixie", "14": "forky"}
DEBIAN_MARK = re.compile(r"\+deb(\d+)")
KERNEL_LINE = re.compile(r"(\d+)\.(\d+)")
SUITE_NAME = re.compile(r"[a-z][a-z0-9-]{1,31}")
SCRATCH = "var/cache/stapctl"  # inside a root: stap's cache, work dirs, runtime copies
STEP_TIMEOUT = 1800  # seconds for one mmdebstrap or apt-get run


def _suite_of_release(release: str) -> str:
    """The Debian suite a kernel release names (+debNN), or ""."""
    match = DEBIAN_MARK.search(release)
    return DEBIAN_SUITES.get(match.group(1), "") if match else ""


def kernel_line(release: str) -> tuple[int, int]:
    """(major, minor) of a kernel release; (0, 0) when it names none."""
    match = KERNEL_LINE.match(release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


MODULES_ROOT = Path("/lib/modules")  # the host's kernel trees


@dataclass(frozen=True)
class Toolchain:
    """One systemtap and the tree it runs in: ``/`` for the host's, else a build root."""

    stap: str  # the program, as the tree names it
    stap_version: str
    runtime: Path  # the pristine systemtap runtime, as seen from this machine
    name: str = HOST
    root: Path = Path("/")
    suite: str = ""  # the Debian suite its systemtap comes from
    kernel_release: str = ""  # the suite's current kernel (what linux-headers-amd64 names)

    @classmethod
    def in_root(cls, name: str, root: Path, stap_version: str,
                kernel_release: str) -> Toolchain:
        return cls(stap="stap", stap_version=stap_version,
                   runtime=root / "usr/share/systemtap/runtime", name=name, root=root,
                   suite=name, kernel_release=kernel_release)

    @property
    def line(self) -> tuple[int, int]:
        return kernel_line(self.kernel_release)

    @property
    def is_host(self) -> bool:
        return self.name == HOST

    def host_path(self, inside: str) -> Path:
        """A path of the toolchain's tree as seen from this machine; symbolic links are
        followed inside the tree, so an absolute link never escapes a root."""
        if self.is_host:
            return Path(inside)
        resolved = Path("/")
        parts = list(Path(inside).parts[1:])
        for _ in range(64 + len(parts)):
            if not parts:
                return self.root / resolved.relative_to("/")
            part = parts.pop(0)
            candidate = resolved / part if part != ".." else resolved.parent
            host = self.root / candidate.relative_to("/")
            if host.is_symlink():
                target = Path(os.readlink(host))
                parts = list(target.parts[1:] if target.is_absolute() else target.parts) + parts
                resolved = Path("/") if target.is_absolute() else resolved
            else:
                resolved = candidate
        raise CompileError(f"too many symbolic links under {self.root}{inside}")

    def inside(self, path: Path) -> str:
        """A path of this machine as the toolchain's stap sees it (it must be in its tree)."""
        if self.is_host:
            return str(path)
        return "/" + str(path.relative_to(self.root))

    def headers(self, release: str, tree: str = "build") -> Path:
        """The release's kernel ``build`` tree (or, Debian's common half, ``source``) in
        this toolchain, as seen from this machine.

        Every path made from a release starts here, so a release that could leave
        /lib/modules or read as an option is refused here, whoever passed it.
        """
        if not is_safe_fact(release):
            raise CompileError(f"refusing to build for kernel release {shown(release)}: "
                               f"a release must be {SAFE_FACT_RULE}")
        if self.is_host:
            return MODULES_ROOT / release / tree
        return self.host_path(f"/lib/modules/{release}/{tree}")

    def scratch(self, cache: ModuleCache, name: str) -> Path:
        """A private directory for the compiler's files (``stap``, ``work``, ``trees``,
        ``boot``, ``runtime``) where this toolchain's stap can read them."""
        if self.is_host:
            return cache.directory(name)
        path = self.root / SCRATCH / name
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    def command(self, argv: list[str], cwd: Path | None = None,
                env: dict[str, str] | None = None, boot: Path | None = None) -> list[str]:
        """The command line that runs ``argv`` (a program of the tree) in the toolchain.

        A root runs in a mount namespace of its own with /proc, /sys and /dev bound, and
        ``boot`` (a directory of the root) bound over its /boot, so nothing stays mounted
        when the command ends and concurrent commands each see their own /boot.
        """
        settings = [f"{name}={value}" for name, value in (env or {}).items()]
        if self.is_host:
            return ["env", *(["-C", str(cwd)] if cwd else []), *settings, *argv]
        inner = ["env", *(["-C", self.inside(cwd)] if cwd else []), *settings, *argv]
        script = ('r=$1; b=$2; shift 2; mount -t proc proc "$r/proc" '
                  '&& mount --rbind /sys "$r/sys" && mount --rbind /dev "$r/dev" '
                  '&& { [ -z "$b" ] || mount --bind "$b" "$r/boot"; } && exec chroot "$r" "$@"')
        return [*_as_root(), "unshare", "--mount", "--propagation", "private",
                "sh", "-c", script, "sh", str(self.root), str(boot or ""), *inner]

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "stap_version": self.stap_version, "suite": self.suite,
                "kernel_release": self.kernel_release, "root": str(self.root)}


def _as_root() -> list[str]:
    """mmdebstrap, chroot and mount need root: sudo when stapctl runs as a user."""
    return [] if os.geteuid() == 0 else ["sudo", "-n"]


class Toolchains:
    """The toolchains in a cache, and the choice of one per kernel release."""

    def __init__(self, cache: ModuleCache, progress: Progress = lambda text: None) -> None:
        self.cache = cache
        self.directory = cache.root / "toolchains"  # made with the first root
        self.progress = progress
        self._host: Toolchain | None = None

    # -- what there is ---------------------------------------------------------------------
    def host(self) -> Toolchain | None:
        """The controller's own systemtap, if it has one."""
        stap = shutil.which("stap")
        if self._host is None and stap is not None:
            runtime = Path(stap).resolve().parent.parent / "share" / "systemtap" / "runtime"
            self._host = Toolchain(stap=stap, stap_version=_stap_version([stap, "-V"]),
                                   runtime=runtime, suite=_host_suite(),
                                   kernel_release=_meta_release(Path("/")))
        return self._host

    def roots(self) -> list[Toolchain]:
        """The build roots made so far, by suite."""
        found = []
        for meta in sorted(self.directory.glob("*/toolchain.json")):
            try:
                data = json.loads(meta.read_text())
                found.append(Toolchain.in_root(data["name"], meta.parent / "root",
                                               data["stap_version"], data["kernel_release"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # half made or damaged: `toolchain add` makes it again
        return found

    def all(self) -> list[Toolchain]:
        host = self.host()
        return ([host] if host else []) + self.roots()

    def named(self, name: str) -> Toolchain:
        found = next((t for t in self.all() if t.name == name), None)
        if found is None:
            raise UsageError(f"no toolchain {name!r}: `stapctl toolchain list` shows them, "
                             f"`stapctl toolchain add SUITE` makes one")
        return found

    # -- the choice ------------------------------------------------------------------------
    def for_release(self, release: str) -> Toolchain:
        """The toolchain that builds for ``release``, made first when the release names a
        Debian suite with no toolchain yet; raises CompileError when none can serve."""
        suite = _suite_of_release(release)
        toolchains = self.all()
        chosen = next((t for t in toolchains if suite and t.suite == suite), None)
        if chosen is None and suite:
            chosen = self.add(suite)
        if chosen is None:
            line = kernel_line(release)
            serving = sorted((t for t in toolchains if t.line >= line and line != (0, 0)),
                             key=lambda t: (t.line, not t.is_host))
            if not serving:
                have = ", ".join(f"{t.name} (systemtap {t.stap_version}, kernel "
                                 f"{t.kernel_release})" for t in toolchains) or "none"
                raise CompileError(
                    f"no toolchain supports kernel {shown(release)} (toolchains: {have}): "
                    "add one whose suite ships this kernel line, e.g. "
                    "`stapctl toolchain add trixie`")
            chosen = serving[0]
        self.fetch_headers(chosen, release)
        return chosen

    def fetch_headers(self, toolchain: Toolchain, release: str) -> None:
        """Install linux-headers-RELEASE into a root that lacks them (once, locked)."""
        if toolchain.headers(release).is_dir():
            return
        if toolchain.is_host:
            raise CompileError(f"no kernel headers for {release} on this machine: install "
                               f"them (apt-get install linux-headers-{release})")
        with self.cache.locked(f"toolchain-{toolchain.name}"):
            if toolchain.headers(release).is_dir():
                return
            self.progress(f"fetching linux-headers-{release} into the {toolchain.name} root")
            package = f"linux-headers-{release}"
            proc = _run(toolchain.command(
                ["sh", "-c", "apt-get update -qq && apt-get install -y -qq "
                 "--no-install-recommends \"$1\" && apt-get clean", "sh", package],
                env={"DEBIAN_FRONTEND": "noninteractive"}))
            _drop_system_map_stubs(toolchain.root)
            if proc.returncode != 0 or not toolchain.headers(release).is_dir():
                missing = "Unable to locate package" in proc.stdout + proc.stderr
                why = (f"the {toolchain.suite} archive no longer has {package}" if missing
                       else f"apt-get could not install {package}:\n{_tail(proc)}")
                raise CompileError(
                    f"no kernel headers for {release}: {why}; upgrade that host to a kernel "
                    f"the archive still ships, or install {package} into "
                    f"{toolchain.root} yourself")

    # -- management ------------------------------------------------------------------------
    def add(self, suite: str) -> Toolchain:
        """The root of ``suite``, made with mmdebstrap unless it exists; several applies
        asking at once make it once."""
        if SUITE_NAME.fullmatch(suite) is None:
            raise UsageError(f"{suite!r} is not a Debian suite name (e.g. trixie, forky)")
        if suite == HOST:
            raise UsageError("`host` is the controller's own systemtap; it cannot be added")
        with self.cache.locked(f"toolchain-{suite}"):
            existing = next((t for t in self.roots() if t.name == suite), None)
            if existing is not None:
                return existing
            return self._make(suite)

    def remove(self, name: str) -> Toolchain:
        toolchain = self.named(name)
        if toolchain.is_host:
            raise UsageError("`host` is the controller's own systemtap: remove the "
                             "systemtap package to stop using it")
        with self.cache.locked(f"toolchain-{name}"):
            _remove_tree(toolchain.root.parent)
        return toolchain

    def _make(self, suite: str) -> Toolchain:
        home = self.cache.directory("toolchains") / suite
        _remove_tree(home)  # a root left half made by an interrupted run
        root = home / "root"
        home.mkdir(mode=0o700)
        mirror = archive_mirror()
        self.progress(f"making the {suite} build root with mmdebstrap (a minute or more)")
        started = time.monotonic()
        mmdebstrap = shutil.which("mmdebstrap", path=os.environ.get("PATH", "") + ":/usr/bin")
        if mmdebstrap is None:
            raise CompileError("mmdebstrap not found: apt-get install mmdebstrap (it makes "
                               f"the {suite} build root)")
        proc = _run([*_as_root(), mmdebstrap, "--variant=apt", "--include="
                     + ",".join(ROOT_PACKAGES), suite, str(root), mirror])
        if proc.returncode != 0:
            _remove_tree(home)
            raise CompileError(f"mmdebstrap could not make the {suite} build root from "
                               f"{mirror}:\n{_tail(proc)}\ncheck that the archive serves "
                               f"{suite} (apt sources of this machine), then retry")
        _drop_system_map_stubs(root)
        unknown = Toolchain.in_root(suite, root, "", "")
        toolchain = Toolchain.in_root(suite, root,
                                      _stap_version(unknown.command(["stap", "-V"])),
                                      _meta_release(root))
        (home / "toolchain.json").write_text(json.dumps(toolchain.describe(), indent=2))
        self.progress(f"the {suite} build root took {time.monotonic() - started:.0f} s")
        return toolchain


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False,
                              timeout=STEP_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CompileError(f"cannot run {argv[0]}: {exc}") from exc


def _tail(proc: subprocess.CompletedProcess[str], lines: int = 8) -> str:
    return "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-lines:])


def _remove_tree(path: Path) -> None:
    """Remove a root (its files belong to root, hence sudo when run as a user)."""
    if path.exists():
        subprocess.run([*_as_root(), "rm", "-rf", "--one-file-system", str(path)],
                       check=False, capture_output=True)


def _drop_system_map_stubs(root: Path) -> None:
    """Delete the one-line /boot/System.map stubs Debian's kernel images install: stap
    reads kernel symbols there first, and finds no kernel function in a stub."""
    subprocess.run([*_as_root(), "find", str(root / "boot"), "-maxdepth", "1", "-name",
                    "System.map-*", "-size", "-2k", "-delete"], check=False, capture_output=True)


def _stap_version(argv: list[str]) -> str:
    """The version `stap -V` (``argv``) reports, e.g. 5.1."""
    proc = _run(argv)
    text = (proc.stderr + proc.stdout).strip()
    match = re.search(r"version ([^\s,/]+)", text)
    if match is None:
        raise CompileError(f"cannot tell systemtap's version from `stap -V`: "
                           f"{text.splitlines()[0] if text else 'no output'}")
    return match.group(1)


def _meta_release(root: Path) -> str:
    """The kernel release the tree's linux-headers-amd64 names (its suite's current one),
    read from the tree's dpkg status; "" when it has none."""
    status = root / "var/lib/dpkg/status"
    try:
        text = status.read_text(errors="replace")
    except OSError:
        return ""
    for record in text.split("\n\n"):
        if re.search(r"^Package: linux-headers-amd64$", record, re.M) and \
                re.search(r"^Status: install ok installed$", record, re.M):
            match = re.search(r"^Depends:.*?\blinux-headers-(\S+?)(?:\s|,|$)", record, re.M)
            if match:
                return match.group(1)
    return ""


def _host_suite() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return ""
    match = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", text, re.M)
    return match.group(1) if match else ""


def archive_mirror() -> str:
    """The Debian archive this machine's apt sources name (one-line or deb822 form)."""
    sources = [Path("/etc/apt/sources.list"),
               *sorted(Path("/etc/apt/sources.list.d").glob("*.list")),
               *sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    suite = _host_suite()
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for uri, suites in _source_entries(text, path.suffix == ".sources"):
            if suite in suites or not suite:
                return uri
    raise CompileError("no Debian archive in this machine's apt sources (/etc/apt/sources.list"
                       "[.d]): add one, then retry")


def _source_entries(text: str, deb822: bool) -> Iterator[tuple[str, list[str]]]:
    """(URI, suites) of each `deb` entry of an apt sources file."""
    if deb822:
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                for uri in fields.get("URIs", "").split():
                    yield uri, fields.get("Suites", "").split()
        return
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb":
            yield words[1], [words[2]]
