"""A module sent with its request (AgentRequest.module_data): what goes on the wire, and
how the call's watch treats a request that takes a while to go out. The agents here are
test doubles over socketpairs (tests/fleet_double.SocketProcess)."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time

import pytest

from stapctl.agent import AgentHost, AgentRequest, Timing
from stapctl.connection import ConnectOptions, LocalConnection
from stapctl.models import Host
from tests.fleet_double import SocketProcess

pytestmark = pytest.mark.unit


def frame(kind: str, value: dict[str, object]) -> bytes:
    payload = json.dumps(value).encode()
    return struct.pack(">BI", ord(kind), len(payload)) + payload


def test_the_module_follows_the_request_line_and_its_size_is_in_it() -> None:
    request = AgentRequest(action="run", module="/w/m.ko", sha256="0" * 64,
                           module_data=b"\x7fELF\n\x00module")
    line, _, rest = request.encode().partition(b"\n")
    fields = json.loads(line)
    assert fields["module_size"] == len(b"\x7fELF\n\x00module") and rest == b"\x7fELF\n\x00module"
    assert "module_data" not in fields
    assert "module_size" not in json.loads(AgentRequest(action="run").encode())


class SlowReader(SocketProcess):
    """A test double agent on a slow link: says hello, reads its request in small pieces
    with a pause between them, keeps what it was sent, and answers once it has it all
    and a little more (the pings that came after it)."""

    def __init__(self, piece: int, pause: float) -> None:
        super().__init__()
        self.received = bytearray()
        self.stdin_theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        self.stdin_ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        self.thread = threading.Thread(target=self._serve, args=(piece, pause), daemon=True)
        self.thread.start()

    def _serve(self, piece: int, pause: float) -> None:
        try:
            self.stdout_theirs.sendall(frame("H", {"protocol": 1, "agent": "slow", "pid": 1}))
            while b"\n" not in self.received:
                self.received += self.stdin_theirs.recv(piece)
            size = json.loads(self.received.partition(b"\n")[0])["module_size"]
            header = self.received.index(b"\n") + 1
            while len(self.received) < header + size:
                time.sleep(pause)
                data = self.stdin_theirs.recv(piece)
                if not data:
                    return
                self.received += data
            listen_until = time.monotonic() + 0.15
            while (left := listen_until - time.monotonic()) > 0:
                self.stdin_theirs.settimeout(left)
                try:
                    self.received += self.stdin_theirs.recv(piece)
                except TimeoutError:
                    break
            self.stdout_theirs.sendall(frame("R", {"status": "ok", "kind": None,
                                                   "message": "done", "stats": {}}))
        except OSError:
            pass
        finally:
            self.stdout_theirs.close()
            self.done.set()


def test_a_module_going_out_slowly_is_no_silence_and_no_ping_lands_inside_it(
        tmp_path: os.PathLike[str]) -> None:
    module = os.urandom(2 << 20)
    request = AgentRequest(action="run", module="/w/m.ko", sha256="0" * 64,
                           module_data=module)
    slow = SlowReader(piece=64 << 10, pause=0.02)  # 2 MiB at about 3 MiB/s: 0.7 s
    agent = AgentHost(LocalConnection(Host(name="h", address="local"), ConnectOptions()))
    timing = Timing(ping=0.05, silence=0.3, startup=0.3)
    result = agent._call(slow, request, lambda _: None, None, None, timing, 1 << 20)

    assert result.ok, result.message  # not cut off as silent while it read
    sent = bytes(slow.received)
    assert sent.startswith(request.encode())  # whole, nothing inside it
    after = sent[len(request.encode()):]
    assert after and set(after.splitlines()) == {b'{"op": "ping"}'}  # then the pings
