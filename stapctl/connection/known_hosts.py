"""Host keys: which are trusted, and how a newly accepted one is remembered.

Trusted keys come from the global known_hosts (read only) and the known_hosts file in use
(a host's own, else the user's). With --accept-new-host-keys an unknown host's key is
appended to the file in use, so the next run checks it like any other: a changed key
fails on every run, not only on the first.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import paramiko
from paramiko.hostkeys import HostKeyEntry, InvalidHostKey

from stapctl.errors import HostKeyError

Entries = list[tuple[str, paramiko.PKey]]
# each file's entries as last read, by its (inode, mtime, size) then: a fleet's hosts
# share one or two files, which would otherwise be parsed again for every connection
_parsed: dict[Path, tuple[tuple[int, int, int], Entries]] = {}


def load_known_hosts(keys: paramiko.HostKeys, *paths: Path) -> paramiko.HostKeys:
    """Add to ``keys`` those of known_hosts files (a missing file has none), hashed names
    included.

    A line that does not parse is an error, not a line skipped: a key silently dropped
    would make its host "unknown", and so open to --accept-new-host-keys.
    """
    for path in paths:
        for name, key in _read_entries(path):
            keys.add(name, key.get_name(), key)
    return keys


def _read_entries(path: Path) -> Entries:
    try:
        stat = path.stat()  # before the read: a change after it is seen next time
        version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        cached = _parsed.get(path)
        if cached is not None and cached[0] == version:
            return cached[1]
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise HostKeyError(f"cannot read known_hosts {path}: {exc.strerror or exc}") from exc
    entries: Entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", "@")):  # @cert-authority, @revoked: not used
            continue
        try:
            entry = HostKeyEntry.from_line(line, number)
        except (InvalidHostKey, paramiko.SSHException, ValueError) as exc:
            raise HostKeyError(f"{path}:{number}: not a valid known_hosts line ({exc}); "
                               "fix or remove it") from exc
        if entry is not None:  # None: too few fields, or a key type paramiko does not know
            entries += [(name, entry.key) for name in entry.hostnames]
    _parsed[path] = (version, entries)
    return entries


def entry_line(name: str, key: paramiko.PKey) -> str:
    """One known_hosts line, as OpenSSH writes it."""
    return f"{name} {key.get_name()} {key.get_base64()}\n"


@dataclass(frozen=True)
class KnownHosts:
    """The known_hosts files one connection checks against."""

    in_use: Path  # read, and appended to when a new key is accepted
    global_file: Path  # read only

    def trust_in(self, client: paramiko.SSHClient, accept_new: bool) -> None:
        """Make ``client`` check host keys against these files."""
        load_known_hosts(client.get_host_keys(), self.global_file, self.in_use)
        client.set_missing_host_key_policy(KnownHostsPolicy(self, accept_new))

    def remember(self, name: str, key: paramiko.PKey) -> None:
        """Append ``name``'s key to the file in use, unless it is there by now.

        Many connections (threads or processes) may accept keys at once: the file is
        locked while it is checked and the line appended in one write, and a key for the
        same name that another one saved meanwhile is checked like any known key.
        """
        path = self.in_use
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise HostKeyError(f"cannot save the host key of {name} in {path}: "
                               f"{exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            saved = load_known_hosts(paramiko.HostKeys(), path).lookup(name)
            if saved is not None:
                if saved.get(key.get_name()) != key:
                    raise changed_key_error(name, key, path)
                return
            line = entry_line(name, key).encode()
            if os.fstat(fd).st_size and not path.read_bytes().endswith(b"\n"):
                line = b"\n" + line  # a hand-edited file may lack its last newline
            if os.write(fd, line) != len(line):
                raise OSError(f"short write to {path}")
        except OSError as exc:
            raise HostKeyError(f"cannot save the host key of {name} in {path}: "
                               f"{exc.strerror or exc}") from exc
        finally:
            os.close(fd)  # releases the lock


def known_hosts_name(address: str, port: int) -> str:
    """A host's name in known_hosts, as OpenSSH writes it."""
    return address if port == 22 else f"[{address}]:{port}"


def fingerprint(key: paramiko.PKey) -> str:
    """As `ssh-keygen -l` shows it."""
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).rstrip(b"=")
    return f"SHA256:{digest.decode()}"


def changed_key_error(name: str, key: paramiko.PKey, path: Path) -> HostKeyError:
    return HostKeyError(
        f"{name}: host key CHANGED (now {key.get_name()} {fingerprint(key)}); if the host "
        f"was reinstalled, remove the old key: ssh-keygen -R '{name}' -f {path}")


class KnownHostsPolicy(paramiko.MissingHostKeyPolicy):
    """What to do with a host whose key is not known: refuse it, or accept and save it."""

    def __init__(self, known: KnownHosts, accept_new: bool) -> None:
        self.known = known
        self.accept_new = accept_new

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        if not self.accept_new:
            raise HostKeyError(f"{hostname}: unknown host key; add it to {self.known.in_use} "
                               "(ssh-keyscan) or pass --accept-new-host-keys")
        self.known.remember(hostname, key)
