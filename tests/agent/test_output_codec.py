"""Compressed output (Z frames): the agent's codec and the controller's decoding of it."""

import fcntl
import os
import select
import threading
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from stapctl.runtime import stapctl_agent as agent

from stapctl.agent import read_frames
from stapctl.errors import AgentError

pytestmark = pytest.mark.unit


def compressed_stream() -> tuple[bytes, bytes]:
    """HELLO, output as Z and O frames mixed (an empty piece too), RESULT; and its output."""
    deflater = agent.OutputDeflater(1)
    pieces = [b"%08d %s\n" % (i, b"x" * 70) for i in range(500)]
    stream = agent.encode_json_frame(agent.FRAME_HELLO, {"protocol": 1})
    for i in range(0, len(pieces), 50):
        data = b"".join(pieces[i:i + 50])
        if i % 150 == 100:  # an older agent's frame, or system() output
            stream += agent.encode_frame(agent.FRAME_OUTPUT, data)
        else:
            stream += agent.encode_frame(agent.FRAME_ZOUTPUT, deflater.encode([data]))
    stream += agent.encode_frame(agent.FRAME_ZOUTPUT, deflater.encode([b""]))
    stream += agent.encode_json_frame(agent.FRAME_RESULT, {"status": "ok"})
    return stream, b"".join(pieces)


def decode_output(stream: bytes, step: int) -> tuple[list[str], bytes]:
    reader, inflater, output = agent.FrameReader(), agent.OutputInflater(piece=1000), b""
    types: list[str] = []
    for i in range(0, len(stream), step):
        for ftype, payload in reader.feed(stream[i:i + step]):
            types.append(ftype)
            if ftype == agent.FRAME_ZOUTPUT:
                pieces = list(inflater.feed(payload))
                assert all(0 < len(p) <= 1000 for p in pieces)
                output += b"".join(pieces)
            elif ftype == agent.FRAME_OUTPUT:
                output += payload
    assert reader.pending == 0
    return types, output


@pytest.mark.parametrize("step", [1, 7, 4096, 1 << 20])
def test_compressed_output_decodes_whatever_the_chunking(step: int) -> None:
    stream, expected = compressed_stream()
    types, output = decode_output(stream, step)
    assert output == expected
    assert types[0] == "H" and types[-1] == "R" and "O" in types and "Z" in types


def test_each_compressed_frame_decodes_on_its_own_arrival() -> None:
    # Z_SYNC_FLUSH: nothing given to the deflater waits for a later frame
    deflater, inflater = agent.OutputDeflater(9), agent.OutputInflater()
    for text in (b"one\n", b"two\n", b"", b"three\n" * 1000):
        assert b"".join(inflater.feed(deflater.encode([text]))) == text


def test_a_frame_of_several_pieces_decodes_to_them_joined() -> None:
    # the stdout thread hands the deflater a batch's pieces (memoryviews of the relay
    # reads among them) as they are, never joined
    deflater, inflater = agent.OutputDeflater(1), agent.OutputInflater()
    read = b"%08d record\n" * 3 % (1, 2, 3)
    pieces = [memoryview(read)[:16], memoryview(read)[16:], b"", b"tail\n"]
    assert b"".join(inflater.feed(deflater.encode(pieces))) == read + b"tail\n"
    assert deflater.consumed == len(read) + 5


def test_a_corrupt_compressed_frame_is_an_error() -> None:
    with pytest.raises(ValueError, match="corrupt compressed output"):
        list(agent.OutputInflater().feed(b"\x00not zlib"))
    finished = zlib.compress(b"done")  # a stream that ends: no agent sends that
    with pytest.raises(ValueError, match="ended"):
        list(agent.OutputInflater().feed(finished))


def test_the_controller_presents_compressed_output_as_output_frames() -> None:
    stream, expected = compressed_stream()
    chunks = [stream[i:i + 333] for i in range(0, len(stream), 333)]
    frames = list(read_frames(lambda size: chunks.pop(0) if chunks else b""))
    assert {f.kind for f in frames} == {"hello", "output", "result"}
    assert b"".join(f.data for f in frames if f.kind == "output") == expected


def test_the_controller_rejects_corrupt_compressed_output() -> None:
    chunks = [agent.encode_frame(agent.FRAME_ZOUTPUT, b"garbage")]
    with pytest.raises(AgentError, match="corrupt"):
        list(read_frames(lambda size: chunks.pop(0) if chunks else b""))


@pytest.mark.parametrize("request_, level", [
    ({"compress": 1}, 1), ({"compress": 9}, 9), ({}, 0), ({"compress": 0}, 0),
    ({"compress": True}, 0), ({"compress": "1"}, 0), ({"compress": 10}, 0), (None, 0)])
def test_the_compress_level_asked_for(request_: dict[str, Any] | None, level: int) -> None:
    assert agent.compress_level(request_) == level


def test_compression_stops_when_it_does_not_pay() -> None:
    """After a trial megabyte, output that shrinks less than 2:1 goes plain."""
    text = agent.OutputDeflater(1)
    noise = agent.OutputDeflater(1)
    for _ in range(20):
        text.encode([b"%08d %s\n" % (1, b"x" * 70) * 1000])
        noise.encode([os.urandom(40000).hex().encode()])
    assert text.consumed >= text.TRIAL and text.worthwhile
    assert noise.consumed >= noise.TRIAL and not noise.worthwhile
    assert agent.OutputDeflater(1).worthwhile  # undecided until the trial is done


def zlib_bomb(megabytes: int) -> bytes:
    """One Z frame payload: ``megabytes`` MiB of zeros, compressed ~1000:1. Built from one
    full-flushed block repeated, so making it costs nothing like inflating it."""
    deflater = zlib.compressobj(9)
    zeros = bytes(1 << 20)
    first = deflater.compress(zeros) + deflater.flush(zlib.Z_FULL_FLUSH)
    block = deflater.compress(zeros) + deflater.flush(zlib.Z_FULL_FLUSH)
    return first + block * (megabytes - 1)


def peak_memory(action: Callable[[], None]) -> int:
    """The peak of Python allocations while ``action()`` runs, in bytes."""
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_zlib_bomb_is_refused_without_inflating_it() -> None:
    bomb = zlib_bomb(2000)  # 2 MB on the wire, 2000 MiB inflated
    assert len(bomb) < 3 << 20

    def inflate() -> None:
        with pytest.raises(ValueError, match="inflates past 16777216 bytes"):
            for piece in agent.OutputInflater().feed(bomb):
                assert len(piece) <= 1 << 20

    assert peak_memory(inflate) < 64 << 20


def test_the_controller_refuses_a_zlib_bomb_with_little_memory() -> None:
    frame = agent.encode_frame(agent.FRAME_ZOUTPUT, zlib_bomb(2000))
    chunks = [frame[i:i + 65536] for i in range(0, len(frame), 65536)]

    def read() -> None:
        with pytest.raises(AgentError, match="inflates past"):
            for _frame in read_frames(lambda size: chunks.pop(0) if chunks else b""):
                pass

    assert peak_memory(read) < 64 << 20


def test_a_frame_may_inflate_up_to_the_bound_and_no_further() -> None:
    deflater = agent.OutputDeflater(1)
    data = os.urandom(1000) * 100  # 100 kB
    exact = agent.OutputInflater(piece=4096, max_frame_output=len(data))
    assert b"".join(exact.feed(deflater.encode([data]))) == data
    assert b"".join(exact.feed(deflater.encode([data]))) == data  # the bound is per frame
    over = agent.OutputInflater(piece=4096, max_frame_output=len(data) - 1)
    with pytest.raises(ValueError, match="inflates past"):
        list(over.feed(agent.OutputDeflater(1).encode([data])))


def test_the_agent_never_puts_more_than_the_bound_into_one_frame() -> None:
    """However much output is ready at once, no frame carries more than MAX_OUTPUT_FRAME
    bytes, so no agent frame trips the controller's inflate bound."""
    assert agent.MAX_OUTPUT_FRAME * 4 <= agent.MAX_FRAME_OUTPUT
    read_fd, write_fd = os.pipe()
    frames: list[tuple[str, bytes]] = []
    reader = threading.Thread(target=lambda: frames.extend(read_all_frames(read_fd)))
    reader.start()
    writer = agent.FrameWriter(write_fd)
    writer.compress(1)
    big = b"%08d\n" % 7 * (3 * agent.MAX_OUTPUT_FRAME // 9 + 5)  # more than two frames' worth
    writer.output(big)
    writer.output(b"tail\n" * 1000)
    writer.close()
    os.close(write_fd)
    reader.join(30)
    os.close(read_fd)
    inflater, output = agent.OutputInflater(), b""
    for ftype, payload in frames:
        assert ftype == agent.FRAME_ZOUTPUT
        piece = b"".join(inflater.feed(payload))
        assert len(piece) <= agent.MAX_OUTPUT_FRAME
        output += piece
    assert output == big + b"tail\n" * 1000 and len(frames) >= 3


def test_only_streaming_output_waits_to_go_in_bigger_pieces() -> None:
    """An event, or output after a pause, goes at once; output that follows output by
    moments waits (up to `linger`) for more to go with it."""
    read_fd, write_fd = os.pipe()
    writer = agent.FrameWriter(write_fd)
    writer.linger = 60.0
    writer.inline_output = 0  # the thread from the first output on: it is what lingers
    writer.compress(1)
    frames = agent.FrameReader()

    def arrived(seconds: float) -> list[str]:
        if not select.select([read_fd], [], [], seconds)[0]:
            return []
        return [ftype for ftype, _ in frames.feed(os.read(read_fd, 1 << 20))]

    try:
        writer.event("started")
        assert arrived(20) == [agent.FRAME_EVENT]
        writer.output(b"first line\n")  # after an event: at once
        assert arrived(20) == [agent.FRAME_ZOUTPUT]
        writer.output(b"next line\n")  # right after output: it waits for more
        assert arrived(0.5) == []
        writer.close()  # which sends what waits
        assert arrived(20) == [agent.FRAME_ZOUTPUT]
    finally:
        writer.close()
        os.close(write_fd)
        os.close(read_fd)


def read_all_frames(fd: int) -> list[tuple[str, bytes]]:
    reader = agent.FrameReader()
    frames: list[tuple[str, bytes]] = []
    while True:
        data = os.read(fd, 1 << 20)
        if not data:
            return frames
        frames += reader.feed(data)


def test_the_agent_enlarges_its_stdout_pipe(tmp_path: Path) -> None:
    """The SSH server's pipe on stdout holds a whole output batch, not 64 KiB; anything
    else on stdout (a file here) is left alone without an error."""
    read_fd, write_fd = os.pipe()
    try:
        assert fcntl.fcntl(write_fd, fcntl.F_GETPIPE_SZ) < agent.FrameWriter.pipe_size
        writer = agent.FrameWriter(write_fd)
        writer.close()
        assert fcntl.fcntl(write_fd, fcntl.F_GETPIPE_SZ) == agent.FrameWriter.pipe_size
    finally:
        os.close(read_fd)
        os.close(write_fd)
    with open(tmp_path / "out", "wb") as f:
        writer = agent.FrameWriter(f.fileno())
        writer.event("heartbeat")
        writer.close()
    assert agent.FrameReader().feed((tmp_path / "out").read_bytes())
