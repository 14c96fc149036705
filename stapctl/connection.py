"""Connections to targets: SSH (paramiko) and local, behind one small interface.

This is the only module that touches paramiko and sockets; their exceptions are
translated here into ConnectError / AuthError / HostKeyError with a reason a user can
act on. Commands are argv lists; a shell line is built only with ``shlex.join``.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, cast

import paramiko

from stapctl.errors import AuthError, ConnectError, HostKeyError
from stapctl.models import Host

STDERR_TAIL_BYTES = 64 * 1024


@dataclass(frozen=True)
class ConnectOptions:
    connect_timeout: float = 10.0
    accept_new_host_keys: bool = False  # like OpenSSH's StrictHostKeyChecking=accept-new
    become: bool = False  # use `sudo -n` when the login user is not root
    ssh_config: Path | None = Path("~/.ssh/config")  # None: read no ssh_config


MAX_JUMPS = 4


def with_ssh_config(host: Host, config_path: Path | None) -> tuple[Host, str | None]:
    """Fill what the inventory left unset from ssh_config (HostName, Port, User,
    IdentityFile) and return the host with its ProxyJump, if any.

    As with Ansible, inventory variables win; ssh_config is matched on the address.
    """
    if config_path is None or not config_path.expanduser().is_file():
        return host, None
    try:
        found = paramiko.SSHConfig.from_path(str(config_path.expanduser())).lookup(host.address)
    except (OSError, paramiko.SSHException) as exc:
        raise ConnectError(f"cannot read {config_path}: {exc}") from exc
    identity = found.get("identityfile")
    host = replace(
        host,
        address=found.get("hostname", host.address),
        port=int(found["port"]) if host.port == 22 and "port" in found else host.port,
        user=host.user or found.get("user"),
        key_file=host.key_file or (os.path.expanduser(identity[0]) if identity else None),
    )
    return host, found.get("proxyjump")


def jump_host(spec: str, template: Host) -> Host:
    """A host from one ProxyJump hop, `[user@]host[:port]`."""
    user, _, rest = spec.rpartition("@")
    address, _, port = rest.partition(":")
    return Host(name=f"jump:{address}", address=address, port=int(port or 22),
                user=user or None, known_hosts=template.known_hosts)


def _partial_name(remote: str) -> str:
    """Where an upload goes before its atomic rename: its own name, so two controllers
    shipping the same file to one host at once do not write into each other's."""
    return f"{remote}.{secrets.token_hex(4)}.part"


class Process(Protocol):
    """A command running on a target, with its stdin, stdout and stderr as streams."""

    def send(self, data: bytes) -> None: ...
    def close_stdin(self) -> None: ...
    def recv(self, size: int) -> bytes: ...  # b"" at EOF
    def stderr_tail(self) -> str: ...
    def wait(self) -> int: ...
    def kill(self) -> None: ...


class Connection(Protocol):
    host: Host

    def home(self) -> str: ...
    def ensure_private_dir(self, path: str) -> None: ...
    def exists(self, path: str, size: int) -> bool: ...
    def put(self, local: Path, remote: str) -> None: ...
    def read_file(self, path: str, limit: int) -> bytes: ...
    def start(self, argv: Sequence[str]) -> Process: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Completed:
    status: int
    stdout: bytes
    stderr: str  # the tail only


def run_command(connection: Connection, argv: Sequence[str], stdin: bytes = b"") -> Completed:
    """Run a short command to its end: the one way to run something that is not the agent."""
    process = connection.start(argv)
    if stdin:
        process.send(stdin)
    process.close_stdin()
    chunks = []
    while chunk := process.recv(65536):
        chunks.append(chunk)
    status = process.wait()
    return Completed(status, b"".join(chunks), process.stderr_tail())


def privileged(argv: Sequence[str], user_is_root: bool, become: bool) -> list[str]:
    """Prefix argv with a non-interactive sudo when the login user is not root."""
    if user_is_root or not become:
        return list(argv)
    return ["sudo", "-n", "--", *argv]


class _StderrCollector:
    """Drains a stream in a thread, keeping the last STDERR_TAIL_BYTES.

    Reading stderr as it comes keeps a chatty remote from filling the SSH window and
    blocking the stdout we actually care about.
    """

    def __init__(self, read: object) -> None:
        self._read = read
        self._tail = bytearray()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        read = self._read
        assert callable(read)
        while True:
            try:
                chunk = read(4096)
            except (OSError, EOFError, paramiko.SSHException):
                return
            if not chunk:
                return
            self._tail += chunk
            del self._tail[:-STDERR_TAIL_BYTES]

    def text(self) -> str:
        self._thread.join(timeout=2)
        return self._tail.decode(errors="replace")


class _SSHProcess:
    def __init__(self, channel: paramiko.Channel) -> None:
        self._channel = channel
        self._stderr = _StderrCollector(channel.recv_stderr)

    def send(self, data: bytes) -> None:
        try:
            self._channel.sendall(data)
        except (OSError, paramiko.SSHException) as exc:
            raise ConnectError(f"connection lost while writing: {exc}") from exc

    def close_stdin(self) -> None:
        with contextlib.suppress(OSError, paramiko.SSHException, EOFError):
            self._channel.shutdown_write()

    def recv(self, size: int) -> bytes:
        """Bytes, or b"" at the command's end of output; ConnectError when the channel
        closed without the end-of-output a running server sends (the host or the
        connection died)."""
        try:
            data = bytes(self._channel.recv(size))
        except (OSError, paramiko.SSHException) as exc:
            raise ConnectError(f"connection lost: {exc}") from exc
        if not data and not self._channel.eof_received:
            raise ConnectError("connection lost: the SSH connection closed")
        return data

    def stderr_tail(self) -> str:
        return self._stderr.text()

    def wait(self) -> int:
        return int(self._channel.recv_exit_status())

    def kill(self) -> None:
        self._channel.close()


class SSHConnection:
    """One SSH connection per host, reused for facts, uploads and runs."""

    def __init__(self, host: Host, options: ConnectOptions, via: str | None = None,
                 depth: int = 0) -> None:
        """``via`` is a ProxyJump chain that overrides ssh_config's (`none` for direct)."""
        self.host, proxy_jump = with_ssh_config(host, options.ssh_config)
        proxy_jump = via or proxy_jump
        self.options = options
        self._client = paramiko.SSHClient()
        self._sftp: paramiko.SFTPClient | None = None
        self._home: str | None = None
        self._jump: SSHConnection | None = None
        if proxy_jump and proxy_jump.lower() != "none":
            if depth >= MAX_JUMPS:
                raise ConnectError(f"{host.name}: more than {MAX_JUMPS} ProxyJump hops")
            *before, last = proxy_jump.split(",")
            # the last hop is the one that reaches us; it is reached through the others
            self._jump = SSHConnection(jump_host(last, self.host), options,
                                       ",".join(before) or "none", depth + 1)
        self._connect()

    def _open_socket(self) -> socket.socket | paramiko.Channel:
        host, options = self.host, self.options
        where = f"{host.address}:{host.port}"
        if self._jump is not None:
            transport = self._jump._client.get_transport()
            try:
                assert transport is not None
                return transport.open_channel("direct-tcpip", (host.address, host.port),
                                              ("127.0.0.1", 0),
                                              timeout=options.connect_timeout)
            except (OSError, paramiko.SSHException, AssertionError) as exc:
                raise ConnectError(f"{where}: the jump host could not reach it: {exc}") \
                    from exc
        try:
            sock = socket.create_connection((host.address, host.port),
                                            timeout=options.connect_timeout)
        except TimeoutError as exc:
            raise ConnectError(f"{where}: no answer within {options.connect_timeout:g}s") from exc
        except OSError as exc:
            raise ConnectError(f"{where}: {exc.strerror or exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _connect(self) -> None:
        host, options = self.host, self.options
        client = self._client
        try:
            if host.known_hosts:
                client.load_host_keys(host.known_hosts)
            else:
                client.load_system_host_keys()
        except OSError as exc:
            raise HostKeyError(f"cannot read known_hosts {host.known_hosts}: {exc}") from exc
        client.set_missing_host_key_policy(
            paramiko.AutoAddPolicy() if options.accept_new_host_keys else paramiko.RejectPolicy()
        )
        where = f"{host.address}:{host.port}"
        sock = self._open_socket()
        try:
            client.connect(
                host.address, port=host.port, username=host.user or "root",
                key_filename=host.key_file, sock=sock, timeout=options.connect_timeout,
                banner_timeout=options.connect_timeout, auth_timeout=options.connect_timeout,
                allow_agent=True, look_for_keys=host.key_file is None,
            )
        except (paramiko.SSHException, OSError, EOFError) as exc:
            sock.close()
            raise self._handshake_error(where, exc) from exc

    def _handshake_error(self, where: str, exc: Exception) -> ConnectError:
        """paramiko's and the socket's failures, as errors that say what to do."""
        if isinstance(exc, paramiko.BadHostKeyException):
            return HostKeyError(
                f"{where}: host key CHANGED (got {exc.key.get_name()} "
                f"{exc.key.get_fingerprint().hex()}); if this is expected, remove the old "
                "key from known_hosts")
        if isinstance(exc, paramiko.AuthenticationException):
            return AuthError(f"{where}: authentication failed as {self.host.user or 'root'}: "
                             f"{exc}")
        if isinstance(exc, paramiko.SSHException):
            if "not found in known_hosts" in str(exc):
                return HostKeyError(f"{where}: unknown host key; add it to known_hosts "
                                    "(ssh-keyscan) or pass --accept-new-host-keys")
            return ConnectError(f"{where}: SSH failed: {exc}")
        return ConnectError(f"{where}: SSH handshake failed: {exc or 'timed out'}")

    @property
    def user_is_root(self) -> bool:
        return (self.host.user or "root") == "root"

    def _sftp_client(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            try:
                self._sftp = self._client.open_sftp()
            except (OSError, paramiko.SSHException) as exc:
                raise ConnectError(f"{self.host.name}: SFTP is not available: {exc}") from exc
        return self._sftp

    def home(self) -> str:
        if self._home is None:
            try:
                self._home = self._sftp_client().normalize(".")
            except OSError as exc:
                raise ConnectError(f"{self.host.name}: cannot find the home directory: {exc}") \
                    from exc
        return self._home

    def ensure_private_dir(self, path: str) -> None:
        """Create ``path`` (0700) and its missing parents; one round trip when it exists."""
        sftp = self._sftp_client()
        try:
            attrs = sftp.lstat(path)
        except FileNotFoundError:
            attrs = self._make_dirs(path)
        except OSError as exc:
            raise ConnectError(f"{self.host.name}: cannot inspect {path}: {exc}") from exc
        mode = attrs.st_mode or 0
        if not stat.S_ISDIR(mode) or stat.S_IMODE(mode) & 0o077:
            raise ConnectError(
                f"{self.host.name}: {path} must be a private directory (0700); "
                "it is not: remove it or fix its mode"
            )

    def _make_dirs(self, path: str) -> paramiko.SFTPAttributes:
        """mkdir -p, the last one 0700; returns the attributes of ``path``."""
        sftp = self._sftp_client()
        parts = path.strip("/").split("/")
        current = ""
        for index, part in enumerate(parts):
            current += "/" + part
            try:
                attrs = sftp.lstat(current)
            except FileNotFoundError:
                try:
                    sftp.mkdir(current, 0o700 if index == len(parts) - 1 else 0o755)
                    attrs = sftp.lstat(current)
                except OSError as exc:
                    raise ConnectError(f"{self.host.name}: cannot create {current}: {exc}") \
                        from exc
            except OSError as exc:
                raise ConnectError(f"{self.host.name}: cannot inspect {current}: {exc}") from exc
        return attrs

    def exists(self, path: str, size: int) -> bool:
        try:
            return self._sftp_client().stat(path).st_size == size
        except OSError:
            return False

    def put(self, local: Path, remote: str) -> None:
        sftp = self._sftp_client()
        partial = _partial_name(remote)
        try:
            sftp.put(str(local), partial)
            sftp.chmod(partial, 0o600)
            sftp.posix_rename(partial, remote)
        except (OSError, paramiko.SSHException) as exc:
            raise ConnectError(f"{self.host.name}: upload of {local.name} failed: {exc}") from exc

    def read_file(self, path: str, limit: int) -> bytes:
        """A remote file's bytes (procfs files too, whose size reads as 0), up to ``limit``."""
        try:
            with self._sftp_client().open(path, "rb") as remote:
                data = remote.read(limit + 1)
        except (OSError, paramiko.SSHException) as exc:
            raise ConnectError(f"{self.host.name}: cannot read {path}: {exc}") from exc
        if len(data) > limit:
            raise ConnectError(f"{self.host.name}: {path} is larger than {limit} bytes")
        return bytes(data)

    def start(self, argv: Sequence[str]) -> Process:
        command = shlex.join(privileged(argv, self.user_is_root, self.options.become))
        try:
            transport = self._client.get_transport()
            if transport is None or not transport.is_active():
                raise ConnectError(f"{self.host.name}: connection closed")
            channel = transport.open_session(timeout=self.options.connect_timeout)
            channel.exec_command(command)
        except (OSError, paramiko.SSHException) as exc:
            raise ConnectError(f"{self.host.name}: cannot start {argv[0]}: {exc}") from exc
        return _SSHProcess(channel)

    def close(self) -> None:
        if self._sftp is not None:
            with contextlib.suppress(OSError, paramiko.SSHException):
                self._sftp.close()
        self._client.close()
        if self._jump is not None:
            self._jump.close()


class _LocalProcess:
    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        # Popen's pipes are BufferedReaders: read1 returns what is there, without waiting
        self._stdout = cast(io.BufferedReader, popen.stdout)
        self._stderr = _StderrCollector(cast(io.BufferedReader, popen.stderr).read1)

    def send(self, data: bytes) -> None:
        assert self._popen.stdin is not None
        try:
            self._popen.stdin.write(data)
            self._popen.stdin.flush()
        except OSError as exc:
            raise ConnectError(f"local agent gone: {exc}") from exc

    def close_stdin(self) -> None:
        assert self._popen.stdin is not None
        with contextlib.suppress(OSError):
            self._popen.stdin.close()

    def recv(self, size: int) -> bytes:
        return self._stdout.read1(size)

    def stderr_tail(self) -> str:
        return self._stderr.text()

    def wait(self) -> int:
        return self._popen.wait()

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self._popen.kill()


class LocalConnection:
    """Runs on this machine without SSH (host address `local`)."""

    def __init__(self, host: Host, options: ConnectOptions) -> None:
        self.host = host
        self.options = options

    def home(self) -> str:
        return str(Path.home())

    def ensure_private_dir(self, path: str) -> None:
        Path(path).mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = os.lstat(path).st_mode
        if not stat.S_ISDIR(mode) or stat.S_IMODE(mode) & 0o077:
            raise ConnectError(f"{path} must be a private directory (0700)")

    def exists(self, path: str, size: int) -> bool:
        return os.path.isfile(path) and os.path.getsize(path) == size

    def put(self, local: Path, remote: str) -> None:
        partial = _partial_name(remote)
        shutil.copyfile(local, partial)
        os.chmod(partial, 0o600)
        os.replace(partial, remote)

    def read_file(self, path: str, limit: int) -> bytes:
        with open(path, "rb") as local:
            data = local.read(limit + 1)
        if len(data) > limit:
            raise ConnectError(f"{path} is larger than {limit} bytes")
        return data

    def start(self, argv: Sequence[str]) -> Process:
        full = privileged(argv, os.geteuid() == 0, self.options.become)
        popen = subprocess.Popen(full, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        return _LocalProcess(popen)

    def close(self) -> None:
        return None


def connect(host: Host, options: ConnectOptions) -> Connection:
    """Open the right kind of connection for ``host``."""
    if host.address == "local":
        return LocalConnection(host, options)
    return SSHConnection(host, options)
