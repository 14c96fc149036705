"""SSH connections (paramiko): handshake, host keys, ProxyJump, SFTP, commands.

paramiko's and the socket's exceptions are translated here into ConnectError / AuthError /
HostKeyError with a reason a user can act on. Every wait on the target is bounded: the
handshake by ``connect_timeout``, SFTP requests by ``io_timeout``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import paramiko

from stapctl.clock import CLOCK
from stapctl.connection.base import (
    ConnectOptions,
    Process,
    StderrCollector,
    partial_name,
    sudo_prefix,
)
from stapctl.connection.known_hosts import KnownHosts, changed_key_error, known_hosts_name
from stapctl.errors import AuthError, ConnectError, StapctlError
from stapctl.models import Host

MAX_JUMPS = 4
IDLE_WAKE = 1.0  # seconds between an idle connection's checks for its own close
T = TypeVar("T")


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
    port = host.port
    if host.port == 22 and "port" in found:
        port = _port(found["port"], f"{config_path}: Port for {host.address}")
    identity = found.get("identityfile")
    host = replace(
        host,
        address=found.get("hostname", host.address),
        port=port,
        user=host.user or found.get("user"),
        key_file=host.key_file or (os.path.expanduser(identity[0]) if identity else None),
    )
    return host, found.get("proxyjump")


def _port(text: str, where: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConnectError(f"{where}: {text!r} is not a port number (1-65535)")
    return int(text)


def parse_jump(spec: str) -> tuple[str | None, str, int]:
    """(user, address, port) of one ProxyJump hop: `[user@]host[:port]`, an IPv6 address
    in brackets (`[::1]:2222`), optionally as `ssh://...`."""
    where = f"ProxyJump {spec!r}"
    text = spec.strip().removeprefix("ssh://")
    user, _, rest = text.rpartition("@")
    if rest.startswith("["):
        address, bracket, after = rest[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise ConnectError(f"{where}: write an IPv6 hop as [address]:port")
        port = after[1:] if after else "22"
    elif rest.count(":") > 1:
        raise ConnectError(f"{where}: put an IPv6 address in brackets: [address]:port")
    else:
        address, colon, port = rest.partition(":")
        port = port if colon else "22"
    if not address or any(char.isspace() or char in "[]@/" for char in address):
        raise ConnectError(f"{where}: no valid host name in it")
    return user or None, address, _port(port, where)


def jump_chain(spec: str | None) -> list[str]:
    """The hops of a ProxyJump value, the first one dialled first; none for `none`."""
    if not spec or spec.strip().lower() == "none":
        return []
    hops = [hop.strip() for hop in spec.split(",")]
    for hop in hops:
        parse_jump(hop)
    if len(hops) > MAX_JUMPS:
        raise ConnectError(f"ProxyJump {spec!r}: more than {MAX_JUMPS} hops")
    return hops


def jump_host(spec: str, known_hosts: str | None) -> Host:
    """A host from one ProxyJump hop, trusting the same known_hosts as the target."""
    user, address, port = parse_jump(spec)
    return Host(name=f"jump:{address}", address=address, port=port, user=user,
                known_hosts=known_hosts)


_GatewayKey = tuple[tuple[str, ...], str | None, ConnectOptions]


@dataclass
class _Gateway:
    """A jump host's connection and the number of targets reaching through it."""

    key: _GatewayKey
    connection: SSHConnection
    users: int = 0
    opened: bool = False
    error: StapctlError | None = None
    opening: threading.Lock = field(default_factory=threading.Lock)


class _Gateways:
    """One connection per jump host (with the hops before it and the options), shared
    by every target behind it and closed when the last of them lets go."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[_GatewayKey, _Gateway] = {}

    def acquire(self, chain: list[str], known_hosts: str | None,
                options: ConnectOptions) -> _Gateway:
        """The open gateway to the last hop of ``chain``; ``release`` it when done."""
        options = replace(options, become=False)  # a jump host runs no command
        key = (tuple(chain), known_hosts, options)
        with self._lock:
            gateway = self._open.get(key)
            if gateway is None:
                *before, last = chain
                hop = SSHConnection(jump_host(last, known_hosts), options,
                                    via=",".join(before) or "none")
                gateway = self._open[key] = _Gateway(key, hop)
            gateway.users += 1
        with gateway.opening:  # the first user opens it, those behind wait for it
            if not gateway.opened and gateway.error is None:
                try:
                    gateway.connection.open()
                    gateway.opened = True
                except StapctlError as exc:
                    gateway.error = exc  # the others waiting get the same answer
        if gateway.error is not None:
            self.release(gateway)
            raise type(gateway.error)(f"jump host {chain[-1]}: {gateway.error}")
        return gateway

    def release(self, gateway: _Gateway) -> None:
        with self._lock:
            gateway.users -= 1
            last = gateway.users == 0
            if last:
                del self._open[gateway.key]
        if last:
            gateway.connection.close()

    def count(self) -> int:
        """How many jump host connections are held (for tests and diagnostics)."""
        with self._lock:
            return len(self._open)


GATEWAYS = _Gateways()


def _answered_within(seconds: float, channel: paramiko.Channel,
                     request: Callable[[], None]) -> None:
    """Run a channel request (exec, subsystem), whose answer paramiko waits for without
    a limit; past ``seconds`` the channel is closed, and that is a TimeoutError."""
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        channel.close()

    alarm = CLOCK.after(seconds, expire)
    try:
        request()
    except (OSError, paramiko.SSHException, EOFError) as exc:
        if expired.is_set():
            raise TimeoutError from exc
        raise
    finally:
        alarm.cancel()


class _SSHProcess:
    def __init__(self, channel: paramiko.Channel) -> None:
        self._channel = channel
        self._stderr = StderrCollector(channel.recv_stderr)

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
        """Cut the channel: sshd closes the command's pipes (the agent then cleans up and
        ends). No signal: OpenSSH refuses "signal" requests in root sessions."""
        self._channel.close()


class SSHConnection:
    """One SSH connection per host, reused for facts, uploads and runs.

    Building it does no I/O; ``open`` reads ssh_config and known_hosts and does the
    handshake. ``close`` may come at any time from any thread, and more than once.
    """

    def __init__(self, host: Host, options: ConnectOptions, via: str | None = None) -> None:
        """``via`` is a ProxyJump chain that overrides ssh_config's (`none` for direct).
        ``host`` is as the inventory gives it; after ``open``, as ssh_config filled it."""
        self.host = host
        self.options = options
        self._via = via
        self._client = paramiko.SSHClient()
        self._known: KnownHosts | None = None
        self._lock = threading.Lock()  # guards what close() takes away
        self._opened = False
        self._closed = False
        self._sock: socket.socket | paramiko.Channel | None = None
        self._gateway: _Gateway | None = None
        self._sftp_lock = threading.Lock()  # one SFTP session is opened, not two
        self._sftp: paramiko.SFTPClient | None = None

    # -- open and close -------------------------------------------------------------------
    def open(self) -> None:
        """Connect and authenticate; on failure everything opened so far is closed."""
        with self._lock:
            if self._opened or self._closed:
                raise ConnectError(f"{self.host.name}: a connection is opened only once")
            self._opened = True
        try:
            self._handshake()
        except BaseException:
            self.close()
            raise

    def _handshake(self) -> None:
        host, options = self.host, self.options
        host, proxy_jump = with_ssh_config(host, options.ssh_config)
        self.host = host
        chain = jump_chain(self._via if self._via is not None else proxy_jump)
        self._known = KnownHosts(Path(host.known_hosts or options.user_known_hosts).expanduser(),
                                 options.global_known_hosts)
        self._known.trust_in(self._client, options.accept_new_host_keys)
        if chain:
            gateway = GATEWAYS.acquire(chain, host.known_hosts, options)
            with self._lock:
                if not self._closed:
                    self._gateway = gateway
            if self._gateway is not gateway:
                GATEWAYS.release(gateway)
                raise self._closed_error()
        sock = self._open_socket()
        with self._lock:
            if not self._closed:
                self._sock = sock
        if self._sock is not sock:
            sock.close()
            raise self._closed_error()
        where = f"{host.address}:{host.port}"
        try:
            self._client.connect(
                host.address, port=host.port, username=host.user or "root",
                key_filename=host.key_file, sock=sock, timeout=options.connect_timeout,
                banner_timeout=options.connect_timeout, auth_timeout=options.connect_timeout,
                allow_agent=True, look_for_keys=host.key_file is None,
            )
        except (paramiko.SSHException, OSError, EOFError) as exc:
            if self._closed:
                raise self._closed_error() from exc
            raise self._handshake_error(where, exc) from exc
        if self._closed:
            raise self._closed_error()
        # paramiko's transport thread wakes every 0.1 s to see whether it was closed; close()
        # shuts the socket down, which wakes it at once, so an idle host held open from its
        # facts to its run need not cost ten wake-ups a second (a thousand hosts: 10,000)
        sock.settimeout(IDLE_WAKE)

    def _tunnel(self, address: str, port: int) -> paramiko.Channel:
        """A TCP stream to (address, port) opened from this host: a ProxyJump hop."""
        return self._transport().open_channel("direct-tcpip", (address, port),
                                              ("127.0.0.1", 0),
                                              timeout=self.options.connect_timeout)

    def _closed_error(self) -> ConnectError:
        return ConnectError(f"{self.host.name}: connection closed")

    def _open_socket(self) -> socket.socket | paramiko.Channel:
        host, options = self.host, self.options
        where = f"{host.address}:{host.port}"
        if self._gateway is not None:
            try:
                return self._gateway.connection._tunnel(host.address, host.port)
            except (OSError, paramiko.SSHException, EOFError, ConnectError) as exc:
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

    def _handshake_error(self, where: str, exc: Exception) -> ConnectError:
        """paramiko's and the socket's failures, as errors that say what to do."""
        if isinstance(exc, paramiko.BadHostKeyException):
            assert self._known is not None
            name = known_hosts_name(self.host.address, self.host.port)
            return changed_key_error(name, exc.key, self._known.in_use)
        if isinstance(exc, paramiko.AuthenticationException):
            return AuthError(f"{where}: authentication failed as {self.host.user or 'root'}: "
                             f"{exc}")
        if isinstance(exc, paramiko.SSHException):
            return ConnectError(f"{where}: SSH failed: {exc}")
        return ConnectError(f"{where}: SSH handshake failed: {exc or 'timed out'}")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sftp, sock, gateway = self._sftp, self._sock, self._gateway
            self._sftp = self._sock = self._gateway = None
        if sftp is not None:
            with contextlib.suppress(OSError, paramiko.SSHException, EOFError):
                sftp.close()
        self._client.close()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a handshake blocked on it
        if sock is not None:
            sock.close()
        if gateway is not None:
            GATEWAYS.release(gateway)

    @property
    def user_is_root(self) -> bool:
        return (self.host.user or "root") == "root"

    def _transport(self) -> paramiko.Transport:
        if not self._opened:
            raise ConnectError(f"{self.host.name}: connection not opened yet")
        transport = self._client.get_transport()
        if self._closed or transport is None or not transport.is_active():
            raise ConnectError(f"{self.host.name}: connection closed")
        return transport

    # -- SFTP -----------------------------------------------------------------------------
    def _sftp_client(self) -> paramiko.SFTPClient:
        with self._sftp_lock:
            if self._sftp is not None:
                return self._sftp
            timeout = self.options.io_timeout
            channel = None
            try:
                channel = self._transport().open_session(timeout=self.options.connect_timeout)
                channel.settimeout(timeout)  # every SFTP request waits this long at most
                _answered_within(timeout, channel, lambda: channel.invoke_subsystem("sftp"))
                sftp = paramiko.SFTPClient(channel)
            except (OSError, paramiko.SSHException, EOFError) as exc:
                if channel is not None:
                    channel.close()
                if isinstance(exc, TimeoutError):
                    raise ConnectError(f"{self.host.name}: SFTP: no answer within "
                                       f"{timeout:g}s") from exc
                raise ConnectError(f"{self.host.name}: SFTP is not available: {exc}") from exc
            with self._lock:
                if not self._closed:
                    self._sftp = sftp
            if self._sftp is not sftp:
                sftp.close()
                raise self._closed_error()
            return sftp

    def _sftp_call(self, what: str, call: Callable[[paramiko.SFTPClient], T]) -> T:
        """``call`` with the SFTP session, its failures as ConnectErrors. A session that
        timed out is dropped: an answer may still come, and the next call opens another."""
        sftp = self._sftp_client()
        try:
            return call(sftp)
        except TimeoutError as exc:
            with self._sftp_lock, self._lock:
                if self._sftp is sftp:
                    self._sftp = None
            sftp.close()
            raise ConnectError(f"{self.host.name}: {what}: no answer within "
                               f"{self.options.io_timeout:g}s") from exc
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise ConnectError(f"{self.host.name}: {what}: {exc}") from exc

    def put(self, local: Path, remote: str) -> None:
        """Upload to a partial file renamed into place; a failed upload leaves nothing."""
        partial = partial_name(remote)

        def upload(sftp: paramiko.SFTPClient) -> None:
            sftp.put(str(local), partial)
            sftp.chmod(partial, 0o600)
            sftp.posix_rename(partial, remote)

        try:
            self._sftp_call(f"upload of {local.name} failed", upload)
        except BaseException:
            with contextlib.suppress(ConnectError):
                self._sftp_call("cleanup", lambda sftp: _remove_if_there(sftp, partial))
            raise

    def read_file(self, path: str, limit: int) -> bytes:
        """A remote file's bytes (procfs files too, whose size reads as 0), up to ``limit``."""

        def read(sftp: paramiko.SFTPClient) -> bytes:
            with sftp.open(path, "rb") as remote:
                return bytes(remote.read(limit + 1))

        data = self._sftp_call(f"cannot read {path}", read)
        if len(data) > limit:
            raise ConnectError(f"{self.host.name}: {path} is larger than {limit} bytes")
        return data

    # -- commands -------------------------------------------------------------------------
    def sudo(self) -> list[str]:
        return sudo_prefix(self.user_is_root, self.options.become)

    def start(self, argv: Sequence[str], become: bool = True) -> Process:
        command = shlex.join([*self.sudo(), *argv] if become else argv)
        timeout = self.options.connect_timeout
        try:
            channel = self._transport().open_session(timeout=timeout)
            _answered_within(timeout, channel, lambda: channel.exec_command(command))
        except TimeoutError as exc:
            raise ConnectError(f"{self.host.name}: cannot start {argv[0]}: no answer within "
                               f"{timeout:g}s") from exc
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise ConnectError(f"{self.host.name}: cannot start {argv[0]}: {exc}") from exc
        return _SSHProcess(channel)


def _remove_if_there(sftp: paramiko.SFTPClient, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        sftp.remove(path)
