"""The agent's codecs against the byte layouts of SystemTap's control protocol (as
systemtap's runtime/transport and staprun define them), and its portability."""

import ast
import errno
import glob
import importlib.util
import os
import random
import shutil
import struct
import subprocess
import sys

import pytest
from stapctl.runtime import stapctl_agent as agent

from tests.agent.fakekernel import make_ko

pytestmark = pytest.mark.unit

AGENT_FILE = agent.__file__


# ---------------------------------------------------------------- frames

def test_frames_round_trip_whatever_the_chunking() -> None:
    stream = (agent.encode_json_frame(agent.FRAME_HELLO, {"protocol": 1})
              + agent.encode_frame(agent.FRAME_OUTPUT, b"\x00raw\xff")
              + agent.encode_frame(agent.FRAME_OUTPUT, b"")
              + agent.encode_json_frame(agent.FRAME_RESULT, {"status": "ok"}))
    reader = agent.FrameReader()
    frames = []
    for i in range(len(stream)):
        frames += reader.feed(stream[i:i + 1])
    assert frames == [("H", b'{"protocol": 1}'), ("O", b"\x00raw\xff"), ("O", b""),
                      ("R", b'{"status": "ok"}')]
    assert reader.pending == 0


def test_a_frame_header_is_type_byte_and_big_endian_length() -> None:
    assert agent.encode_frame("E", b"abc") == b"E\x00\x00\x00\x03abc"


def test_a_cut_or_corrupt_stream_is_detected() -> None:
    reader = agent.FrameReader()
    assert reader.feed(agent.encode_frame("O", b"hello")[:-2]) == []
    assert reader.pending == 8
    with pytest.raises(ValueError):
        agent.FrameReader().feed(b"X\x00\x00\x00\x01a")
    with pytest.raises(ValueError):
        agent.FrameReader(max_frame=10).feed(b"O\x00\x00\x01\x00")


# ---------------------------------------------------------------- control messages

@pytest.mark.parametrize("name, old, new", [
    ("START", 0, 80), ("EXIT", 1, 81), ("OOB_DATA", 2, 82), ("SYSTEM", 3, 83),
    ("TRANSPORT", 4, 84), ("BULK", 7, 87), ("READY", 8, 88), ("RELOCATION", 9, 89),
    ("REQUEST_EXIT", 13, 93), ("TZINFO", 14, 94), ("PRIVILEGE_CREDENTIALS", 15, 95),
    ("REMOTE_ID", 16, 96), ("NAMESPACES_PID", 18, 98)])
def test_message_numbers_of_both_generations(name: str, old: int, new: int) -> None:
    assert agent.message_type(name, 4) == old
    assert agent.message_type(name, 5) == new
    assert agent.generation_of(old) == 4 and agent.generation_of(new) == 5


def test_unknown_numbers_have_no_generation() -> None:
    assert agent.generation_of(999) is None and agent.generation_of(50) is None


def test_messages_are_a_native_u32_type_then_the_payload() -> None:
    assert agent.encode_message(5, "EXIT") == struct.pack("=I", 81)
    assert agent.encode_message(4, "START", agent.pack_start()) == struct.pack("=Iii", 0, 0, 0)
    assert agent.decode_message(struct.pack("=I", 93), 5) == ("REQUEST_EXIT", b"")
    assert agent.decode_message(struct.pack("=I", 93), 4) == (None, b"")
    assert agent.decode_message(b"\x01", 5) == (None, b"\x01")


def test_relocation_is_264_bytes() -> None:
    payload = agent.pack_relocation("kernel", "kallsyms_lookup_name", 0xFFFFFFFF81123450)
    assert len(payload) == 264
    module, reloc, address = struct.unpack("<128s128sQ", payload)
    assert module.rstrip(b"\0") == b"kernel" and reloc.rstrip(b"\0") == b"kallsyms_lookup_name"
    assert address == 0xFFFFFFFF81123450
    with pytest.raises(ValueError):
        agent.pack_relocation("m" * 128, "x", 0)


def test_tzinfo_sends_seconds_west_of_utc() -> None:
    payload = agent.pack_tzinfo(3600, "CET")  # CET is one hour east
    assert len(payload) == 72
    gmtoff, name = struct.unpack("<q64s", payload)
    assert gmtoff == -3600 and name.rstrip(b"\0") == b"CET"


def test_start_privilege_and_remote_id_layouts() -> None:
    assert agent.pack_start(1234, 0) == struct.pack("<ii", 1234, 0)
    assert agent.unpack_start(struct.pack("<ii", 0, -1)) == (0, -1)
    with pytest.raises(ValueError):
        agent.unpack_start(b"\x00\x00")
    assert agent.pack_privilege() == struct.pack("<i", 0xE)
    remote = agent.pack_remote_id(3, "ssh://host")
    assert len(remote) == 132
    assert struct.unpack("<i128s", remote)[0] == 3


def test_message_text_stops_at_nul() -> None:
    assert agent.message_text(b"WARNING: careful\n\0junk") == "WARNING: careful"


# ---------------------------------------------------------------- relay records

def record(generation: int, seq: int, data: bytes) -> bytes:
    magic = agent.TRACE_MAGIC if generation >= 5 else b""
    return magic + struct.pack("=II", seq, len(data)) + data


@pytest.mark.parametrize("generation", [4, 5])
def test_records_split_across_reads(generation: int) -> None:
    stream = record(generation, 1, b"first\n") + record(generation, 2, b"second\n")
    parser = agent.RecordParser(generation)
    records: list[tuple[int, bytes]] = []
    for i in range(0, len(stream), 3):
        records += parser.feed(stream[i:i + 3])
    assert records == [(1, b"first\n"), (2, b"second\n")]
    assert parser.desyncs == 0 and parser.lost_bytes == 0 and parser.finish() == []


@pytest.mark.parametrize("generation", [4, 5])
@pytest.mark.parametrize("bad_length", [0, agent.MAX_RECORD + 1])
def test_a_bad_length_resyncs_to_the_next_record(generation: int, bad_length: int) -> None:
    magic = agent.TRACE_MAGIC if generation >= 5 else b""
    stream = (record(generation, 1, b"ok\n") + magic + struct.pack("=II", 2, bad_length)
              + b"leftover text" + record(generation, 3, b"next\n"))
    parser = agent.RecordParser(generation)
    records = parser.feed(stream) + parser.finish()
    assert records == [(1, b"ok\n"), (3, b"next\n")]
    assert parser.desyncs == 1 and parser.lost_bytes > 0


def test_5x_skips_to_the_magic() -> None:
    parser = agent.RecordParser(5)
    assert parser.feed(b"garbage" + record(5, 1, b"x")) == [(1, b"x")]
    assert parser.lost_bytes == 7


def test_zero_padding_is_not_counted_as_lost() -> None:
    parser = agent.RecordParser(5)
    assert parser.feed(bytes(20) + record(5, 1, b"x")) == [(1, b"x")]
    assert parser.lost_bytes == 0


def test_4x_resync_rejects_headers_found_inside_text() -> None:
    # After corruption, a 4.x header must carry a sequence near the last one.
    parser = agent.RecordParser(4)
    stream = (record(4, 5, b"a") + struct.pack("=II", 6, 0) + b"\xff\xff\xff\x00\x10\x00\x00"
              + record(4, 6, b"b"))
    assert parser.feed(stream) + parser.finish() == [(5, b"a"), (6, b"b")]


def test_a_record_cut_at_the_end_gives_what_arrived() -> None:
    parser = agent.RecordParser(4)
    assert parser.feed(record(4, 1, b"complete")[:-3]) == []
    assert parser.finish() == [(1, b"compl")]
    assert parser.lost_bytes == 3


@pytest.mark.parametrize("generation", [4, 5])
def test_records_are_the_same_however_the_reads_cut_them(generation: int) -> None:
    # a record a read cuts is joined alone (RecordParser._cut_record); the rest are views
    # of the reads
    rng = random.Random(generation)
    expected = [(seq, bytes(rng.randrange(256) for _ in range(rng.choice([1, 80, 8000]))))
                for seq in range(1, 400)]
    stream = b"".join(record(generation, seq, data) for seq, data in expected)
    for largest in (3, 100, 10_000, 300_000):
        parser = agent.RecordParser(generation)
        got: list[tuple[int, bytes]] = []
        start = 0
        while start < len(stream):
            end = start + rng.randint(1, largest)
            got += [(seq, bytes(data)) for seq, data in parser.feed(stream[start:end])]
            start = end
        got += [(seq, bytes(data)) for seq, data in parser.finish()]
        assert got == expected and parser.desyncs == 0 and parser.lost_bytes == 0


def test_stale_bytes_are_skipped_wherever_a_read_ends() -> None:
    # 4.x left a dropped record's first bytes: every split of the stream gives what the
    # whole stream gives
    stale = struct.pack("=II", 2, 1000)[:5]
    stream = record(4, 1, b"before\n") + stale + record(4, 3, b"after\n" * 50) + \
        record(4, 4, b"last\n")
    whole = agent.RecordParser(4)
    want = [(seq, bytes(data)) for seq, data in whole.feed(stream) + whole.finish()]
    assert [seq for seq, _ in want] == [1, 3, 4]
    assert whole.lost_bytes == 2  # 5 stale bytes, 3 of them zeros (not counted as data)
    for cut in range(1, len(stream)):
        parser = agent.RecordParser(4)
        got = parser.feed(stream[:cut]) + parser.feed(stream[cut:]) + parser.finish()
        assert [(seq, bytes(data)) for seq, data in got] == want, cut
        assert (parser.desyncs, parser.lost_bytes) == (whole.desyncs, whole.lost_bytes), cut


def test_merger_orders_by_sequence_and_waits_for_gaps() -> None:
    merger = agent.Merger(gap_wait=1.0)
    merger.add(2, b"b", now=0.0)
    assert merger.pop(now=0.5) == []  # waiting for 1
    merger.add(1, b"a", now=0.6)
    merger.add(4, b"d", now=0.6)
    assert merger.pop(now=0.7) == [b"a", b"b"]  # 3 is missing: d waits
    assert merger.pop(now=1.7) == [b"d"]
    assert merger.lost == 1


def test_merger_final_flush_takes_everything() -> None:
    merger = agent.Merger(gap_wait=10)
    merger.add(3, b"c", now=0)
    merger.add(5, b"e", now=0)
    assert merger.pop(now=0, final=True) == [b"c", b"e"]
    assert merger.lost == 3


# ---------------------------------------------------------------- module images

def test_modinfo_and_sections_of_a_module() -> None:
    image = make_ko("stap_abc_123456", vermagic="6.1.0-56-amd64 SMP mod_unload ")
    info = agent.modinfo(image)
    assert info["vermagic"] == "6.1.0-56-amd64 SMP mod_unload "
    assert info["name"] == "stap_abc_123456"
    assert set(agent.elf_sections(image)) >= {".modinfo", ".gnu.linkonce.this_module"}
    with pytest.raises(ValueError):
        agent.elf_sections(b"not an elf file at all, not at all, no no no no no no")


def test_rename_keeps_the_length_and_touches_only_this_module() -> None:
    image = make_ko("stapctl_0123456789abcdef")
    new = agent.runtime_name("stapctl_0123456789abcdef", "4242")
    assert new == "stapctl_0123456789a_4242" and len(new) == 24
    renamed = agent.rename_module(image, "stapctl_0123456789abcdef", new)
    assert len(renamed) == len(image)
    changed = [i for i in range(len(image)) if image[i] != renamed[i]]
    offset, size = agent.elf_sections(image)[".gnu.linkonce.this_module"]
    assert changed and all(offset <= i < offset + size for i in changed)
    assert agent.modinfo(renamed)["name"] == "stapctl_0123456789abcdef"  # as staprun -R
    with pytest.raises(ValueError):
        agent.rename_module(image, "stapctl_other_name_xxxxx", new)
    assert agent.runtime_name("ab", "4242") is None


def test_a_signed_module_is_recognised() -> None:
    assert agent.is_signed(make_ko("stap_x", signed=True))
    assert not agent.is_signed(make_ko("stap_x"))


def test_module_params_quote_blanks_and_refuse_what_the_kernel_cannot_carry() -> None:
    assert agent.module_params({}) == "_stp_bufsize=0"
    assert agent.module_params({"b": "two words", "a": -3, "c": ""}, 8) == \
        '_stp_bufsize=8 a=-3 b="two words" c=""'
    for bad in ({"9x": 1}, {"x": True}, {"x": 'q"'}, {"x": "a\0"}, {"x": "a\nb"},
                {"_stp_bufsize": 1}):
        with pytest.raises(ValueError):
            agent.module_params(bad)
    with pytest.raises(ValueError):
        agent.module_params({}, -1)


def test_insmod_errors_name_their_cause() -> None:
    message = agent.insmod_message(OSError(errno.ENOEXEC, "x"), "stap_m")
    assert "ENOEXEC" in message and "another kernel" in message
    assert "stap_m" in agent.insmod_message(OSError(errno.EEXIST, "x"), "stap_m")


# ---------------------------------------------------------------- portability

def test_the_agent_is_python_3_6_compatible() -> None:
    if importlib.util.find_spec("vermin") is None:
        pytest.skip("vermin is not installed (pip install vermin)")
    command = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())",
               "-t=3.6-", "--no-tips", "--violations", AGENT_FILE]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_agent_compiles_under_a_real_python_3_6_when_there_is_one() -> None:
    candidates = glob.glob(os.path.expanduser("~/.pyenv/versions/3.6*/bin/python3.6")) + [
        shutil.which("python3.6")]
    python = next((c for c in candidates if c and subprocess.run(
        [c, "--version"], capture_output=True).returncode == 0), None)
    if python is None:
        pytest.skip("no Python 3.6 interpreter here")
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(AGENT_FILE)!r}); "
            "import stapctl_agent as a; "
            "assert a.FrameReader().feed(a.encode_frame('O', b'x')) == [('O', b'x')]")
    done = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_agent_imports_only_the_standard_library() -> None:
    tree = ast.parse(open(AGENT_FILE).read())
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            assert node.module is not None  # always named at level 0
            modules.add(node.module.split(".")[0])
    assert modules and modules <= sys.stdlib_module_names, modules - sys.stdlib_module_names
    assert "__future__" not in modules


def test_importing_the_agent_has_no_side_effects() -> None:
    code = ("import sys, signal; before = signal.getsignal(signal.SIGTERM); "
            "sys.path.insert(0, %r); import stapctl_agent; "
            "assert signal.getsignal(signal.SIGTERM) == before")
    done = subprocess.run([sys.executable, "-I", "-c", code % os.path.dirname(AGENT_FILE)],
                          capture_output=True, text=True, input="")
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr
