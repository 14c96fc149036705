"""Connections to targets: SSH (paramiko) and local, behind one small interface.

This package is the only place that touches paramiko and sockets; their exceptions are
translated here into ConnectError / AuthError / HostKeyError with a reason a user can
act on. Commands are argv lists; a shell line is built only with ``shlex.join``.

    base         the Connection / Process interface, ConnectOptions, run_command
    ssh          SSHConnection: handshake, ProxyJump gateways, SFTP, commands
    known_hosts  which host keys are trusted; accepted ones saved for the next run
    local        LocalConnection: this machine, without SSH
"""

from __future__ import annotations

from stapctl.connection.base import (
    Completed,
    Connection,
    ConnectOptions,
    Process,
    run_command,
    sudo_prefix,
)
from stapctl.connection.local import LocalConnection
from stapctl.connection.ssh import SSHConnection
from stapctl.models import Host

__all__ = ["Completed", "ConnectOptions", "Connection", "LocalConnection", "Process",
           "SSHConnection", "connect", "sudo_prefix", "run_command"]


def connect(host: Host, options: ConnectOptions) -> Connection:
    """Open the right kind of connection for ``host``: the one call that builds and opens."""
    connection: Connection = (LocalConnection(host, options) if host.address == "local"
                              else SSHConnection(host, options))
    connection.open()
    return connection
