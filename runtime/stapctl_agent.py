"""stapctl's target agent: loads one SystemTap module and runs it, as staprun + stapio do.

Uploaded to each target and run by import (stapctl.agent.BOOTSTRAP: its bytecode is then
cached); it needs nothing but Python 3.6+ and the kernel. It speaks the stapctl agent
protocol (docs/agent-protocol.md) on stdin/stdout and SystemTap's control protocol (as
systemtap's runtime/transport and staprun speak it; the layouts are the constants below)
with the module. The controller imports it too, for the frame codec and constants, so
importing it has no side effects.

What only some runs need (ctypes for a load, subprocess for a script's command, traceback
for an error, threading for a run whose output is large, re for a pattern or a warning)
is imported where it is used (ctypes before the request when the command line says
`load`): every import is paid in the target's CPU at each start, and a facts or
preflight request needs none of them. For the same reason the agent imports none of the
modules that bring in enum, functools and collections (more CPU than the interpreter's
own start on an emulated target: bench/RESULTS.md): `_json` and `_signal`, the C halves
of json and signal, stand in for them, and names are checked without re.
"""

import _signal
import codecs
import errno
import fcntl
import heapq
import os
import select
import stat
import struct
import sys
import time

try:  # a Python built without zlib still runs: it sends plain OUTPUT frames
    import zlib
except ImportError:  # pragma: no cover
    zlib = None
try:
    import _json
except ImportError:  # pragma: no cover - a Python built without it: json's Python half
    _json = None

PROTOCOL_VERSION = 1
AGENT_VERSION = "0.1.0"

# Frames of the agent -> controller stream: struct ">BI" (type, length), then the payload.
FRAME_HELLO = "H"
FRAME_OUTPUT = "O"
FRAME_EVENT = "E"
FRAME_RESULT = "R"
FRAME_ZOUTPUT = "Z"  # OUTPUT as the next piece of the run's one zlib stream
FRAME_TYPES = (FRAME_HELLO, FRAME_OUTPUT, FRAME_EVENT, FRAME_RESULT, FRAME_ZOUTPUT)
FRAME_HEADER = struct.Struct(">BI")
MAX_FRAME = 64 << 20
MAX_OUTPUT_FRAME = 4 << 20  # output bytes one OUTPUT or Z frame carries, before compression
MAX_FRAME_OUTPUT = 16 << 20  # what OutputInflater lets one Z frame inflate to (4x the above)
HEARTBEAT_INTERVAL = 5.0  # seconds without any frame after which a running agent sends one

KINDS = ("preflight-refused", "insmod-refused", "start-failed", "runtime-error", "timed-out",
         "stopped", "transport-lost", "agent-error")

# SystemTap control messages, numbered as in 4.x; 5.0 added 80 to every number.
MESSAGES = {
    "START": 0, "EXIT": 1, "OOB_DATA": 2, "SYSTEM": 3, "TRANSPORT": 4, "BULK": 7,
    "READY": 8, "RELOCATION": 9, "REQUEST_EXIT": 13, "TZINFO": 14,
    "PRIVILEGE_CREDENTIALS": 15, "REMOTE_ID": 16, "NAMESPACES_PID": 18,
}
MESSAGE_NAMES = dict((number, name) for name, number in MESSAGES.items())
GENERATION_OFFSET = {4: 0, 5: 80}
PRIVILEGE_ALL = 0xE  # stapusr | stapsys | stapdev: what staprun sends for root
CTL_READ_SIZE = 65536  # the kernel drops a message larger than the read buffer

RELOCATION = struct.Struct("=128s128sQ")
TZINFO = struct.Struct("=q64s")
START = struct.Struct("=ii")
REMOTE_ID = struct.Struct("=i128s")
PRIVILEGE = struct.Struct("=i")

TRACE_MAGIC = b"\xf0\x9f\xa9\xba"  # 5.x relay record header starts with it
TRACE_HEADER = struct.Struct("=II")  # sequence, length
MAX_RECORD = 128 * 1024
RELAY_READ_SIZE = 1 << 18  # bytes a relay file read asks for
RELAY_READS = 16  # reads of one relay file in a row, at most (4 MiB)
RESYNC_WINDOW = 1 << 20  # how far a 4.x header's sequence may be from the last one
WAIT = -1  # RecordParser: decide when more data has arrived
SIGNATURE_MARK = b"~Module signature appended~\n"
TRANSPORT_FAILURES = r"There were (\d+) transport failures"  # a warning's pattern (re)
SYMBOLS_FILE = "kernel-symbols.json"  # KERNEL_SYMBOLS' addresses for one boot
KERNEL_SYMBOLS = ("_stext", "kallsyms_lookup_name", "kallsyms_on_each_symbol",
                  "module_kallsyms_on_each_symbol")
EKEYREJECTED = getattr(errno, "EKEYREJECTED", 129)


DIGITS = "0123456789"
HEX_DIGITS = "0123456789abcdef"
WORD = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_"


def made_of(text, characters, at_most=None):
    """Whether ``text`` is one or more (up to ``at_most``) of ``characters``."""
    return 0 < len(text) <= (at_most or len(text)) and all(c in characters for c in text)


def is_param_name(name):
    """A C identifier, as module parameter names are: [A-Za-z_][A-Za-z0-9_]*."""
    return made_of(name, WORD) and name[0] not in DIGITS


def log(message):
    """Diagnostics go to stderr only; the controller never parses them."""
    try:
        sys.stderr.write("stapctl-agent: %s\n" % message)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


# ---------------------------------------------------------------- agent protocol frames

def encode_frame(ftype, payload):
    """One frame: a type letter (FRAME_*) and raw bytes."""
    return FRAME_HEADER.pack(ord(ftype), len(payload)) + bytes(payload)


def encode_json_frame(ftype, obj):
    return encode_frame(ftype, json_dumps(obj).encode("utf-8"))


class JsonOptions(object):
    """What json's scanner asks of its decoder: json.loads's defaults, with NaN and the
    infinities refused (they are not JSON)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name):
        raise ValueError("%s is not JSON" % name)


if _json is not None:
    json_string = _json.encode_basestring_ascii
    scan_json = _json.make_scanner(JsonOptions())
else:  # pragma: no cover - json's pure-Python half, at the cost of importing it
    import json.decoder
    import json.encoder

    json_string = json.encoder.py_encode_basestring_ascii
    scan_json = json.decoder.JSONDecoder(parse_constant=JsonOptions.parse_constant).scan_once


def json_loads(text):
    """json.loads for the protocol's lines and files: one value, JSON whitespace around
    it, NaN and infinities refused; ValueError otherwise."""
    text = text.strip(" \t\n\r")
    try:
        value, end = scan_json(text, 0)
    except StopIteration:
        raise ValueError("no JSON value") from None
    if end != len(text):
        raise ValueError("extra data after the JSON value, at character %d" % end)
    return value


def json_dumps(value):
    """json.dumps(value, sort_keys=True), and like it ASCII only; NaN and infinities
    are refused, as json_loads refuses them."""
    if isinstance(value, str):
        return json_string(value)
    if isinstance(value, dict):
        return "{%s}" % ", ".join("%s: %s" % (json_string(json_key(key)), json_dumps(value[key]))
                                  for key in sorted(value))
    if isinstance(value, (list, tuple)):
        return "[%s]" % ", ".join(json_dumps(item) for item in value)
    return json_scalar(value)


def json_key(key):
    """An object key as json.dumps writes it: strings as they are, other scalars as
    their JSON text."""
    return key if isinstance(key, str) else json_scalar(key)


def json_scalar(value):
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("%r is not JSON" % value)
        return float.__repr__(value)
    raise TypeError("%r is not JSON serializable" % (value,))


class FrameReader(object):
    """Splits the agent's stdout into frames, whatever the chunking of the bytes fed."""

    def __init__(self, max_frame=MAX_FRAME):
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data):
        """Returns the frames completed by ``data`` as (type letter, payload bytes)."""
        buf = self._buf
        buf += data
        frames = []
        start = 0
        with memoryview(buf) as view:  # one copy of each payload, one trim of the buffer
            while len(buf) - start >= FRAME_HEADER.size:
                code, length = FRAME_HEADER.unpack_from(buf, start)
                ftype = chr(code)
                if ftype not in FRAME_TYPES or length > self.max_frame:
                    raise ValueError("corrupt agent stream: frame type %r, length %d"
                                     % (ftype, length))
                end = start + FRAME_HEADER.size + length
                if len(buf) < end:
                    break
                frames.append((ftype, bytes(view[start + FRAME_HEADER.size:end])))
                start = end
        del buf[:start]
        return frames

    @property
    def pending(self):
        """Bytes of an unfinished frame: non-zero at EOF means the stream was cut."""
        return len(self._buf)


class OutputDeflater(object):
    """The agent's side of FRAME_ZOUTPUT: one zlib stream per run, each frame's payload
    ends on a Z_SYNC_FLUSH, so all the output given so far decodes from what was sent."""

    TRIAL = 1 << 20  # output judged before deciding whether compressing pays
    MIN_RATIO = 2.0
    # zlib's hash table, 2**(MEM_LEVEL + 7) entries, is rewritten whole each time the
    # window slides (every 32 KiB in): at 6 rather than the default 8, a quarter of the
    # work, for output that compresses within 1-4% as well. Seen in an emulated guest at
    # level 1: 50 MB/s of repeated lines against 36, 38 against 30 for syscall-like text.
    MEM_LEVEL = 6

    def __init__(self, level):
        self._z = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS, self.MEM_LEVEL)
        self.consumed = 0
        self.produced = 0

    @property
    def worthwhile(self):
        """Whether to go on compressing: output that shrinks less than MIN_RATIO costs
        the target's CPU more than it saves the link (seen in an emulated guest: half the
        throughput of plain frames for random hex)."""
        return self.consumed < self.TRIAL or self.produced * self.MIN_RATIO <= self.consumed

    def encode(self, pieces):
        """``pieces`` (bytes-like) as one frame's payload: each goes to zlib as it is, so
        they are never joined (in an emulated guest a copy costs 10 ns a byte)."""
        z = self._z
        parts = [z.compress(piece) for piece in pieces]
        parts.append(z.flush(zlib.Z_SYNC_FLUSH))
        out = b"".join(parts)
        self.consumed += sum(len(piece) for piece in pieces)
        self.produced += len(out)
        return out


class OutputInflater(object):
    """The controller's side: the payloads of one stream's Z frames, in order, in;
    the output bytes out, in pieces of at most ``piece`` bytes.

    zlib inflates up to ~1000:1, so one 2 MB frame could become 2 GB: a frame is inflated
    a piece at a time and refused once it passes ``max_frame_output`` bytes (the agent
    never puts more than MAX_OUTPUT_FRAME bytes into one frame).
    """

    def __init__(self, piece=1 << 20, max_frame_output=MAX_FRAME_OUTPUT):
        self.piece = piece
        self.max_frame_output = max_frame_output
        self._z = zlib.decompressobj()

    def feed(self, payload):
        """An iterator over the output one Z frame carries; use it up before the next
        frame. It raises ValueError if the stream is corrupt or inflates too far."""
        data = payload
        total = 0
        while True:
            room = min(self.piece, self.max_frame_output + 1 - total)
            try:
                piece = self._z.decompress(data, room)
            except zlib.error as e:
                raise ValueError("corrupt compressed output: %s" % e) from None
            total += len(piece)
            if total > self.max_frame_output:
                raise ValueError("compressed output frame inflates past %d bytes"
                                 % self.max_frame_output)
            if piece:
                yield piece
            data = self._z.unconsumed_tail
            if not data and len(piece) < room:  # a full piece may leave output in zlib
                break
        if self._z.eof:
            raise ValueError("corrupt compressed output: the zlib stream ended")


def compress_level(request):
    """The zlib level the request asks OUTPUT to be sent with, 0 for plain frames."""
    level = request.get("compress") if isinstance(request, dict) else None
    if zlib is None or isinstance(level, bool) or not isinstance(level, int):
        return 0
    return level if 0 <= level <= 9 else 0


# ---------------------------------------------------------------- SystemTap control messages

def message_type(name, generation):
    return MESSAGES[name] + GENERATION_OFFSET[generation]


def generation_of(mtype):
    """4 or 5 from any message number (5.0 renumbered them all by +80), None if unknown."""
    for generation, offset in GENERATION_OFFSET.items():
        if mtype - offset in MESSAGE_NAMES:
            return generation
    return None


def encode_message(generation, name, payload=b""):
    return struct.pack("=I", message_type(name, generation)) + payload


def decode_message(data, generation):
    """(name, payload) of one message read from .cmd; name is None for unknown or short ones."""
    if len(data) < 4:
        return None, bytes(data)
    mtype = struct.unpack_from("=I", data)[0]
    name = MESSAGE_NAMES.get(mtype - GENERATION_OFFSET[generation])
    return name, bytes(data[4:])


def _cstring(text, size):
    raw = text.encode("utf-8") if not isinstance(text, bytes) else text
    if len(raw) >= size:
        raise ValueError("%r does not fit in %d bytes" % (text, size))
    return raw


def pack_relocation(module, reloc, address):
    return RELOCATION.pack(_cstring(module, 128), _cstring(reloc, 128), address)


def pack_tzinfo(utc_offset, name):
    """``utc_offset`` is seconds east of UTC (tm_gmtoff); the module wants seconds west."""
    return TZINFO.pack(-int(utc_offset), _cstring(name, 64))


def pack_start(target_pid=0, res=0):
    return START.pack(target_pid, res)


def unpack_start(payload):
    """(target_pid, res) of a START reply; ValueError when it is too short."""
    if len(payload) < START.size:
        raise ValueError("START reply of %d bytes" % len(payload))
    return START.unpack_from(payload)


def pack_privilege(mask=PRIVILEGE_ALL):
    return PRIVILEGE.pack(mask)


def pack_remote_id(remote_id, uri):
    return REMOTE_ID.pack(remote_id, _cstring(uri, 128))


def message_text(payload):
    """OOB_DATA and SYSTEM carry text, sometimes NUL-terminated."""
    return payload.split(b"\0", 1)[0].decode("utf-8", "replace").rstrip()


# ---------------------------------------------------------------- relay records

class RecordParser(object):
    """Splits one CPU's relay stream into (sequence, data) records.

    Records may span reads. A header with length 0 or over 128 KiB means the stream lost
    its framing (4.8 leaves stale bytes where it drops a record): skip forward until a
    plausible header, counting what was skipped. Parsing moves an offset through what was
    read, and each record is a memoryview of it: no record is copied (in an emulated
    guest a copy costs 10 ns a byte), and a read is copied only to join a record that
    spans it.
    """

    def __init__(self, generation):
        self.magic = TRACE_MAGIC if generation >= 5 else b""
        self.header_size = len(self.magic) + TRACE_HEADER.size
        self.buf = b""  # what was read and not yet parsed, from pos on
        self.pos = 0
        self.last_seq = 0
        self.resyncing = False
        self.desyncs = 0
        self.lost_bytes = 0

    def feed(self, data):
        """The records ``data`` (bytes) completes, as (sequence, bytes-like)."""
        records, start = [], 0
        if self.pos < len(self.buf):  # a record the last read cut
            cut = self._cut_record(data)
            if cut is None:  # anything unusual: the general parse, over both joined
                data = self.buf[self.pos:] + data
            else:
                seq, record, start = cut
                records.append((seq, record))
                self.last_seq, self.resyncing = seq, False
        self.buf, self.pos = data, start
        return records + self._records(final=False)

    def _cut_record(self, data):
        """The record a read cut, if it is the usual kind, taken as the general parse
        would take it (a sane header where the unparsed bytes start, its record whole
        with ``data``, and on 4.x a near sequence and another header right after):
        (sequence, its bytes, where ``data`` goes on); else None. Only that record is
        joined: in an emulated guest, copying a whole read costs more than parsing it."""
        size, magic = self.header_size, self.magic
        rest = self.buf[self.pos:]
        head = rest[:size] if len(rest) >= size else rest + data[:size - len(rest)]
        if len(head) < size or not head.startswith(magic):
            return None
        seq, length = TRACE_HEADER.unpack_from(head, len(magic))
        end = size + length - len(rest)  # where the record ends in data
        if not 0 < length <= MAX_RECORD or end <= 0 or len(data) < end + TRACE_HEADER.size:
            return None
        if not magic and not self._usual_4x(seq, length, data, end):
            return None
        return seq, (rest + data[:end])[size:], end

    def _usual_4x(self, seq, length, buf, after):
        """Whether a 4.x header (seq, length) is the usual kind, which _header_at's search
        would take at once: a plausible length, a near sequence, and another plausible
        header right after the record, at ``after`` in ``buf``."""
        if not (0 < length <= MAX_RECORD and self.last_seq < seq <= self.last_seq + RESYNC_WINDOW
                and len(buf) >= after + TRACE_HEADER.size):
            return False
        next_seq, next_length = TRACE_HEADER.unpack_from(buf, after)
        return seq < next_seq <= seq + RESYNC_WINDOW and 0 < next_length <= MAX_RECORD

    def finish(self):
        """At the end of the stream: the remaining records, then what a cut one carried."""
        records = self._records(final=True)
        buf, pos = self.buf, self.pos
        if len(buf) - pos >= self.header_size:
            seq, length = TRACE_HEADER.unpack_from(buf, pos + len(self.magic))
            data = buf[pos + self.header_size:]
            self._desync(length - len(data))
            records.append((seq, data))
        else:
            self._skip(len(buf) - pos)
        self.buf, self.pos = b"", 0
        return records

    def _records(self, final):
        records = []
        view = memoryview(self.buf)
        while True:
            record = self._next(view, final)
            if record is None:
                return records
            records.append(record)

    def _next(self, view, final):
        buf = self.buf
        magic = self.magic
        while len(buf) - self.pos >= self.header_size:
            pos = self.pos
            if magic and not buf.startswith(magic, pos):
                found = buf.find(magic, pos)
                self._skip(found - pos if found > pos else len(buf) - pos - len(magic) + 1)
                continue
            if magic:
                length = TRACE_HEADER.unpack_from(buf, pos + len(magic))[1]
                at = 0 if 0 < length <= MAX_RECORD else None
            else:
                at = self._header_at(buf, pos, final)
            if at is None:
                self._skip(1)
                continue
            if at == WAIT:
                return None
            if at:
                self._skip(at)  # stale bytes where 4.x dropped a record
            pos = self.pos
            seq, length = TRACE_HEADER.unpack_from(buf, pos + len(magic))
            end = pos + self.header_size + length
            if len(buf) < end:
                if final and self.resyncing:  # a guess no more data can confirm
                    self._skip(1)
                    continue
                return None
            data = view[pos + self.header_size:end]
            self.pos = end
            self.resyncing = False
            self.last_seq = seq
            return seq, data
        return None

    def _header_at(self, buf, pos, final):
        """4.x: where the next header starts (0 to 8 bytes past ``pos``), None if nowhere
        near, or WAIT to decide once more data has arrived.

        4.x has no magic to find headers by. When a record's header does not fit in what
        is left of a sub-buffer, 4.x drops the record and leaves those (up to 8) bytes
        stale; the next header follows them. So the candidates at offsets 0..8 are
        weighed: a CPU's sequence numbers only grow, mostly by little, and a real header
        is followed by another one (perhaps after stale bytes). The first candidate so
        confirmed wins; else, of those whose follower has not arrived yet and the one at
        offset 0 if its number is near (a record followed by corruption), the smallest
        number wins. After corruption, only near and unrefuted candidates count.
        """
        seq, length = TRACE_HEADER.unpack_from(buf, pos)
        if self._usual_4x(seq, length, buf, pos + TRACE_HEADER.size + length):
            return 0  # as the search below would decide, without it (a record in a flood)
        best = None
        for offset in range(TRACE_HEADER.size + 1):
            if len(buf) < pos + offset + TRACE_HEADER.size:
                break
            seq, length = TRACE_HEADER.unpack_from(buf, pos + offset)
            if not (0 < length <= MAX_RECORD and seq > self.last_seq):
                continue
            near = seq <= self.last_seq + RESYNC_WINDOW
            followed = self._followed(buf, pos + offset, seq, length, final)
            if followed and (near or not self.resyncing):
                return offset
            unrefuted = followed is None and (near or not self.resyncing)
            if unrefuted or (near and offset == 0 and not self.resyncing):
                if best is None or seq < best[0]:
                    best = (seq, offset, followed)
        if best is None:
            return None
        _seq, offset, followed = best
        return WAIT if offset and followed is None and not final else offset

    @staticmethod
    def _followed(buf, at, seq, length, final):
        """True if another header follows the record at ``at``, False if not, None if
        the bytes to tell have not arrived (at the stream's end: never will)."""
        after = at + TRACE_HEADER.size + length
        for gap in range(TRACE_HEADER.size + 1):
            if len(buf) < after + gap + TRACE_HEADER.size:
                return False if final and len(buf) < after else None
            next_seq, next_length = TRACE_HEADER.unpack_from(buf, after + gap)
            if seq < next_seq <= seq + RESYNC_WINDOW and 0 < next_length <= MAX_RECORD:
                return True
        return False

    def _skip(self, count):
        if count <= 0:
            return
        end = self.pos + count
        lost = count - self.buf.count(b"\0", self.pos, end)  # zero padding is not data
        self.pos = end
        if lost:
            self._desync(lost)

    def _desync(self, lost):
        if not self.resyncing:
            self.desyncs += 1
            self.resyncing = True
        self.lost_bytes += lost


class Merger(object):
    """Orders records from every CPU by sequence number, waiting a bounded time for a gap."""

    def __init__(self, gap_wait=1.0):
        self.gap_wait = gap_wait
        self.heap = []
        self.last = 0
        self.lost = 0
        self._count = 0

    def add(self, seq, data, now):
        heapq.heappush(self.heap, (seq, now, self._count, data))
        self._count += 1

    def pop(self, now, final=False):
        """Data ready to print, in order; records after a gap wait up to gap_wait."""
        ready = []
        while self.heap:
            seq, arrived = self.heap[0][:2]
            if seq > self.last + 1 and not final and now - arrived < self.gap_wait:
                break
            data = heapq.heappop(self.heap)[3]
            if seq > self.last + 1:
                self.lost += seq - self.last - 1
            self.last = max(self.last, seq)
            ready.append(data)
        return ready


# ---------------------------------------------------------------- kernel module images

def elf_sections(image):
    """Section name -> (offset, size) of an ELF file (32/64-bit, either byte order)."""
    if len(image) < 52 or bytes(image[:4]) != b"\x7fELF":
        raise ValueError("not an ELF file")
    order = "<" if image[5] == 1 else ">"
    if image[4] == 2:
        shoff = struct.unpack_from(order + "Q", image, 0x28)[0]
        entsize, count, strndx = struct.unpack_from(order + "HHH", image, 0x3A)
        header = struct.Struct(order + "IIQQQQ")
    else:
        shoff = struct.unpack_from(order + "I", image, 0x20)[0]
        entsize, count, strndx = struct.unpack_from(order + "HHH", image, 0x2E)
        header = struct.Struct(order + "IIIIII")
    if count == 0 or strndx >= count or shoff + count * entsize > len(image):
        raise ValueError("truncated ELF section table")
    headers = [header.unpack_from(image, shoff + i * entsize) for i in range(count)]
    for _name, stype, _flags, _addr, offset, size in headers:
        if stype != 8 and offset + size > len(image):  # 8: SHT_NOBITS has no file bytes
            raise ValueError("truncated ELF section")
    names_at = headers[strndx][4]
    sections = {}
    for name, _stype, _flags, _addr, offset, size in headers:
        start = names_at + name
        end = image.find(b"\0", start)
        sections[bytes(image[start:end]).decode("utf-8", "replace")] = (offset, size)
    return sections


def section_bytes(image, name):
    sections = elf_sections(image)
    if name not in sections:
        raise ValueError("no %s section" % name)
    offset, size = sections[name]
    return bytes(image[offset:offset + size])


def modinfo(image):
    """The key=value strings of .modinfo (vermagic, name, ...); the first of each key wins."""
    info = {}
    for item in section_bytes(image, ".modinfo").split(b"\0"):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep and key not in info:
            info[key] = value
    return info


def is_signed(image):
    return bytes(image[-len(SIGNATURE_MARK):]) == SIGNATURE_MARK


def _name_offset(image, name):
    """Offset in the image of the module name inside .gnu.linkonce.this_module, or None."""
    offset, size = elf_sections(image).get(".gnu.linkonce.this_module", (0, 0))
    data = bytes(image[offset:offset + size])
    raw = name.encode("utf-8") + b"\0"
    at = data.find(raw)
    while at > 0 and data[at - 1] != 0:  # a longer name ending in ours is not ours
        at = data.find(raw, at + 1)
    return None if at < 0 else offset + at


def runtime_name(name, tag):
    """staprun -R's scheme: ``<head>_<tag>``, as long as the original name."""
    head = len(name) - len(tag) - 1
    return name[:head] + "_" + tag if head >= 1 else None


def rename_module(image, old, new):
    """A copy of ``image`` whose embedded module name is ``new`` (same length as ``old``).

    The kernel names a module after struct module's name in .gnu.linkonce.this_module;
    staprun -R rewrites only that, and so do we: the module's /proc/systemtap/<name>
    directory follows, so two runs of one .ko can coexist.
    """
    if len(new) != len(old):
        raise ValueError("new module name must be as long as the old one")
    at = _name_offset(image, old)
    if at is None:
        raise ValueError("module name %r not found in .gnu.linkonce.this_module" % old)
    renamed = bytearray(image)
    renamed[at:at + len(old)] = new.encode("utf-8")
    return renamed


def module_params(params, bufsize_mb=0):
    """The init_module parameter string: ``_stp_bufsize=N`` then the script's globals.

    Values with blanks are double-quoted for the kernel's parser; values it cannot carry
    are refused rather than mangled (param_problem).
    """
    if isinstance(bufsize_mb, bool) or not isinstance(bufsize_mb, int) or bufsize_mb < 0:
        raise ValueError("bufsize_mb must be a non-negative integer, not %r" % (bufsize_mb,))
    parts = ["_stp_bufsize=%d" % bufsize_mb]
    for name in sorted(params):
        value = params[name]
        if not is_param_name(name):
            raise ValueError("parameter name %r is not an identifier" % (name,))
        if name.startswith("_stp_"):
            raise ValueError("parameter %s is reserved for the SystemTap runtime" % name)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError("parameter %s must be a string or an integer, not %s"
                             % (name, type(value).__name__))
        text = str(value)
        problem = param_problem(text)
        if problem:
            raise ValueError("parameter %s contains %s, which the kernel cannot pass"
                             % (name, problem))
        if not text or any(c.isspace() for c in text):
            text = '"%s"' % text
        parts.append("%s=%s" % (name, text))
    return " ".join(parts)


def param_problem(text):
    """What in ``text`` the kernel's parameter parser would misread, or None.

    Its parser splits on isspace() outside double quotes, and the kernel's ctype
    (lib/ctype.c) counts 0xA0 as a space: unquoted, the A0 inside UTF-8 text such as
    "\u00e0" would end the value and start another parameter (``_stp_*`` ones too).
    Control bytes and 0xA0 are refused outright, quotes could not be escaped anyway.
    """
    for bad, what in (('"', "a double quote"), ("\0", "a NUL"), ("\n", "a newline")):
        if bad in text:
            return what
    try:
        raw = bytearray(text.encode("utf-8"))
    except UnicodeEncodeError:
        return "text that is not valid UTF-8"
    for byte in raw:
        if byte < 0x20 or byte == 0x7F:
            return "the control byte 0x%02x" % byte
        if byte == 0xA0:
            return "the byte 0xa0 (in UTF-8 letters such as \u00e0), a blank to the kernel"
    return None


def insmod_message(err, name):
    """What an init_module errno means for a SystemTap module, in the user's terms."""
    meanings = {
        errno.ENOEXEC: "invalid module format: it was built for another kernel (see dmesg)",
        errno.ENOENT: "unknown symbol in module: the kernel's configuration differs from "
                      "the headers it was built against (see dmesg)",
        errno.EEXIST: "a module named %s is already loaded" % name,
        EKEYREJECTED: "the kernel rejected the module's signature",
        errno.EPERM: "operation not permitted: the kernel wants signed modules (Secure Boot "
                     "or lockdown), or the SystemTap runtime refused to start (see dmesg)",
        errno.ESRCH: "module has wrong symbol version (see dmesg)",
        errno.EINVAL: "invalid module parameters (see dmesg)",
        errno.ENOMEM: "not enough kernel memory to load the module",
    }
    text = meanings.get(err.errno, os.strerror(err.errno) if err.errno else str(err))
    return "insmod %s failed (%s): %s" % (name, errno.errorcode.get(err.errno, err.errno), text)


# ---------------------------------------------------------------- the kernel

class AddressesVisible(object):
    """Sets kptr_restrict to 1 for a ``with`` block, then restores it.

    staprun sets kptr_restrict to 1 (it shows root real addresses on every kernel,
    where 0 hashes sysfs section addresses on 4.15+ and 2 hides them). An flock
    keeps concurrent agents from restoring it under each other's feet.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.path = kernel.proc_path("sys", "kernel", "kptr_restrict")
        self.lock = None
        self.old = None

    def __enter__(self):
        try:
            self.lock = os.open(self.path, os.O_RDONLY)
        except OSError:
            return self
        try:
            try:
                fcntl.flock(self.lock, fcntl.LOCK_EX)
            except OSError:
                pass
            value = (self.kernel.read(self.path) or "").strip()
            if value and value != "1":
                try:
                    self.kernel.write_text(self.path, "1")
                    self.old = value
                except OSError as e:
                    log("cannot set kptr_restrict: %s" % e)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_exception):
        if self.old is not None:
            try:
                self.kernel.write_text(self.path, self.old)
            except OSError as e:
                log("cannot restore kptr_restrict to %s: %s" % (self.old, e))
            self.old = None
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


class Kernel(object):
    """Every contact with the kernel, so that tests can put a double in its place."""

    def __init__(self, proc="/proc", sys_root="/sys"):
        self.proc = proc
        self.sys = sys_root
        self._libc = None
        self._errno = None

    def proc_path(self, *parts):
        return os.path.join(self.proc, *parts)

    def sys_path(self, *parts):
        return os.path.join(self.sys, *parts)

    def read(self, path):
        """A small text file, or None when it cannot be read."""
        try:
            with open(path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except (OSError, IOError):
            return None

    def uname(self):
        u = os.uname()
        return u.release, u.machine

    def euid(self):
        return os.geteuid()

    def libc(self):
        if self._libc is None:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.init_module.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
            libc.delete_module.argtypes = [ctypes.c_char_p, ctypes.c_uint]
            self._libc, self._errno = libc, ctypes.get_errno
        return self._libc

    def load(self, image, params):
        """init_module(2); OSError with the kernel's errno on failure."""
        image = bytes(image)
        if self.libc().init_module(image, len(image), params.encode("utf-8")) != 0:
            code = self._errno()
            raise OSError(code, os.strerror(code))

    def unload(self, name):
        """delete_module(2) with O_NONBLOCK, as rmmod; OSError (EAGAIN while in use)."""
        if self.libc().delete_module(name.encode("utf-8"), os.O_NONBLOCK) != 0:
            code = self._errno()
            raise OSError(code, os.strerror(code))

    def control_dir(self, name):
        return self.proc_path("systemtap", name)

    def open_control(self, name):
        """The module's .cmd, non-blocking: reads give EAGAIN when nothing is queued."""
        return os.open(os.path.join(self.control_dir(name), ".cmd"), os.O_RDWR | os.O_NONBLOCK)

    def open_relays(self, name):
        """The module's relay files: (N, fd of traceN) for each CPU N, in CPU order."""
        directory = self.control_dir(name)
        cpus = sorted(int(n[5:]) for n in os.listdir(directory)
                      if n.startswith("trace") and made_of(n[5:], DIGITS))
        return [(cpu, os.open(os.path.join(directory, "trace%d" % cpu),
                              os.O_RDONLY | os.O_NONBLOCK)) for cpu in cpus]

    def cpus(self):
        """The CPUs this thread may run on."""
        return os.sched_getaffinity(0)

    def run_on(self, cpus):
        """Moves this thread onto ``cpus``; False when refused (offline CPU, cpuset)."""
        try:
            os.sched_setaffinity(0, cpus)
            return True
        except OSError:
            return False

    def addresses_visible(self):
        """Let root read real addresses in kallsyms and sysfs while the ``with`` lasts
        (AddressesVisible)."""
        return AddressesVisible(self)

    def write_text(self, path, text):
        with open(path, "w") as f:
            f.write(text)

    def kernel_symbols(self, names=KERNEL_SYMBOLS):
        """Addresses of the kernel's own symbols among ``names``, from /proc/kallsyms."""
        wanted = set(names)
        found = {}
        try:
            with open(self.proc_path("kallsyms"), "rb") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) != 3:  # module symbols carry a 4th field: [module]
                        continue
                    symbol = fields[2].decode("utf-8", "replace")
                    if symbol in wanted and symbol not in found:
                        found[symbol] = int(fields[0], 16)
                        if len(found) == len(wanted):
                            break
        except (OSError, IOError, ValueError) as e:
            log("cannot read kallsyms: %s" % e)
        return found

    def module_sections(self):
        """(module, section, address) of every /sys/module/*/sections/*, as staprun sends."""
        result = []
        root = self.sys_path("module")
        try:
            modules = sorted(os.listdir(root))
        except OSError:
            return result
        for module in modules:
            directory = os.path.join(root, module, "sections")
            try:
                sections = sorted(os.listdir(directory))
            except OSError:
                continue
            for section in sections:
                text = self.read(os.path.join(directory, section)) or ""
                try:
                    address = int(text.strip(), 16)
                except ValueError:
                    continue
                if "init." in section:  # unloaded init sections keep stale addresses
                    address = 0
                result.append((module, section, address))
        return result

    def has_build_id_note(self):
        return os.access(self.sys_path("kernel", "notes"), os.R_OK)


def bracketed_word(text):
    """The first ``[word]`` in ``text``: the mode in use, in /sys/kernel/security/lockdown."""
    for piece in text.split("[")[1:]:
        word, closed, _rest = piece.partition("]")
        if closed and made_of(word, WORD):
            return word
    return None


def mem_available_kb(meminfo):
    """/proc/meminfo's MemAvailable, in kB; None where the kernel has none."""
    for line in meminfo.splitlines():
        name, _, rest = line.partition(":")
        if name == "MemAvailable":
            figures = rest.split()
            return int(figures[0]) if figures and made_of(figures[0], DIGITS) else None
    return None


def collect_facts(kernel):
    """What the controller needs to know about a host before anything is loaded."""
    def number(path):
        text = kernel.read(path)
        try:
            return int(text.strip()) if text is not None else None
        except ValueError:
            return None

    release, machine = kernel.uname()
    lockdown_text = kernel.read(kernel.sys_path("kernel", "security", "lockdown"))
    sig_enforce = kernel.read(kernel.sys_path("module", "module", "parameters", "sig_enforce"))
    modules_text = kernel.read(kernel.proc_path("modules"))
    loaded = [line.split()[0] for line in (modules_text or "").splitlines()
              if line.startswith(("stap_", "stapctl_"))]
    return {
        "release": release,
        "arch": machine,
        "python": "%d.%d.%d" % tuple(sys.version_info[:3]),
        "euid": kernel.euid(),
        "module_support": modules_text is not None,
        "modules_disabled": number(kernel.proc_path("sys", "kernel", "modules_disabled")) == 1,
        "lockdown": bracketed_word(lockdown_text or ""),
        "sig_enforce": (sig_enforce or "").strip() in ("Y", "1"),
        "fips": number(kernel.proc_path("sys", "crypto", "fips_enabled")) == 1,
        "procfs": os.path.isdir(kernel.proc_path("sys")),
        "kptr_restrict": number(kernel.proc_path("sys", "kernel", "kptr_restrict")),
        "mem_available_kb": mem_available_kb(kernel.read(kernel.proc_path("meminfo")) or ""),
        "loaded_stap_modules": loaded,
    }


# ---------------------------------------------------------------- the agent

class Failure(Exception):
    """Ends an action early with a failure kind from the protocol's taxonomy."""

    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind
        self.message = message


def enlarge_pipe(fd, size):
    """Lets the pipe ``fd`` (the SSH server's, on stdout) hold ``size`` bytes rather than 64
    KiB, so a batch of output goes in one write and the server reads on while the agent
    reads the relay files: in an emulated guest, 5% more output per second. A quota or a
    kernel that refuses leaves the pipe as it was; not a pipe, nothing to do."""
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except OSError:
        pass


class FrameWriter(object):
    """Writes frames to stdout; once the controller is gone it drops them, so cleanup goes on.

    With compression on, once a run's output passes ``inline_output`` bytes a thread
    compresses and writes, in order, what send() and output() queue, so the agent reads
    the relay files while zlib works (zlib lets go of the GIL): output queued meanwhile
    goes in one piece. At most ``queue_limit`` bytes wait; past that the caller waits, as
    it would on a full stdout. Less output is compressed and written as it comes, sparing
    a short run threading's import. Call close() last.
    """

    inline_output = 1 << 20
    queue_limit = 4 << 20
    batch_bytes = 1 << 20  # a piece this big is sent without waiting for more
    linger = 0.02  # seconds output may wait for more to go with it, while it streams
    pipe_size = 1 << 20  # stdout's, when a pipe: /proc/sys/fs/pipe-max-size's default

    def __init__(self, fd, stall_timeout=60.0):
        self.fd = fd
        self.stall_timeout = stall_timeout
        self.broken = False
        self.deflater = None
        self.last_frame = time.monotonic()  # when the last frame was handed over
        self.poller = select.poll()
        self.poller.register(fd, select.POLLOUT)
        self._queue = []  # (type, payload); FRAME_ZOUTPUT payloads still uncompressed
        self._queued = 0
        self._output = 0  # bytes output() was given
        self._cond = None  # with the thread: guards the queue
        self._thread = None
        self._closing = False
        self._output_written = float("-inf")  # when the stdout thread last wrote output
        enlarge_pipe(fd, self.pipe_size)
        try:  # a write then takes what fits, however big, and never blocks past the stall
            os.set_blocking(fd, False)
        except OSError as e:
            log("stdout stays blocking: %s" % e)

    def send(self, ftype, payload):
        self.last_frame = time.monotonic()
        if self._thread is not None:
            self._put(ftype, payload)
        else:
            self._write(*self._encoded(ftype, [payload]))

    def _encoded(self, ftype, pieces):
        """One frame as it goes out, from the pieces of its payload: Z payloads
        compressed, or sent as plain OUTPUT once compressing no longer pays; the
        controller takes both."""
        if ftype == FRAME_ZOUTPUT and not self.broken:
            if self.deflater.worthwhile:
                return ftype, self.deflater.encode(pieces)
            ftype = FRAME_OUTPUT
        return ftype, b"".join(pieces)  # one bytes piece is returned as it is, uncopied

    def _write(self, ftype, payload):
        if self.broken:
            return
        header = FRAME_HEADER.pack(ord(ftype), len(payload))
        # a big payload goes after its header as it is: no copy of it to join them
        pieces = (header, payload) if len(payload) > 65536 else (header + payload,)
        try:
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    try:
                        view = view[os.write(self.fd, view):]
                    except BlockingIOError:
                        if not self.poller.poll(self.stall_timeout * 1000):
                            raise OSError(errno.ETIMEDOUT, "stdout accepted nothing for %.0f s"
                                          % self.stall_timeout) from None
        except OSError as e:
            log("stdout is gone (%s); carrying on to clean up" % e)
            self.broken = True

    def json(self, ftype, obj):
        self.send(ftype, json_dumps(obj).encode("utf-8"))

    def event(self, name, **fields):
        fields["event"] = name
        self.json(FRAME_EVENT, fields)

    def compress(self, level):
        """From now on, output goes as FRAME_ZOUTPUT pieces of one zlib stream."""
        if level and self.deflater is None:
            self.deflater = OutputDeflater(level)

    def output(self, data):
        """Probe output: OUTPUT frames, or Z frames once compress() was asked for, of at
        most MAX_OUTPUT_FRAME bytes each."""
        ftype = FRAME_OUTPUT if self.deflater is None else FRAME_ZOUTPUT
        self._output += len(data)
        if ftype == FRAME_ZOUTPUT and self._thread is None and \
                self._output > self.inline_output:
            self._start_thread()
        for start in range(0, len(data), MAX_OUTPUT_FRAME):
            self.send(ftype, data[start:start + MAX_OUTPUT_FRAME])

    def _start_thread(self):
        import threading

        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._drain, name="stdout")
        self._thread.daemon = True
        self._thread.start()

    def _put(self, ftype, payload):
        with self._cond:
            while self._queued > self.queue_limit and not self.broken:
                self._cond.wait(0.1)
            if self.broken:
                return
            self._queue.append((ftype, payload))
            self._queued += len(payload)
            self._cond.notify_all()

    def _drain(self):
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                # while output streams, a moment for more: bigger pieces compress
                # better, and cost the SSH server and the controller fewer packets;
                # otherwise (an event, a line now and then) it goes at once
                now = time.monotonic()
                streaming = now - self._output_written < self.linger
                deadline = now + self.linger if streaming else now
                while self._queued < self.batch_bytes and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch, self._queue, self._queued = self._queue, [], 0
                self._cond.notify_all()
            try:
                for ftype, pieces in self._coalesce(batch):
                    ftype, payload = self._encoded(ftype, pieces)
                    self._write(ftype, payload)
                    if ftype in (FRAME_OUTPUT, FRAME_ZOUTPUT):
                        self._output_written = time.monotonic()
            except Exception:  # e.g. MemoryError: never leave send() waiting for room
                log("the stdout thread failed: %s" % error_trace())
                self.broken = True

    @staticmethod
    def _coalesce(batch):
        """Consecutive output pieces as one frame's (one flush, not many), up to
        MAX_OUTPUT_FRAME bytes: (type, pieces) for each frame."""
        merged = []  # [type, pieces, size]
        for ftype, payload in batch:
            if ftype == FRAME_ZOUTPUT and merged and merged[-1][0] == FRAME_ZOUTPUT and \
                    merged[-1][2] + len(payload) <= MAX_OUTPUT_FRAME:
                merged[-1][1].append(payload)
                merged[-1][2] += len(payload)
            else:
                merged.append([ftype, [payload], len(payload)])
        return [(ftype, pieces) for ftype, pieces, _size in merged]

    def close(self):
        """Writes what is queued (unless stdout is gone) and stops the thread."""
        if self._thread is None:
            return
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        while self._thread.is_alive():  # in steps, so signals are still handled
            self._thread.join(0.1)
        self._thread = None


class LineReader(object):
    """Reads JSON lines from the controller without ever blocking the agent."""

    def __init__(self, fd):
        self.fd = fd
        self.buf = b""
        self.eof = False
        self.last_line = time.monotonic()

    def fill(self):
        """Reads what is there; call only when poll says the fd is readable."""
        try:
            data = os.read(self.fd, 65536)
        except OSError as e:
            log("stdin: %s" % e)
            data = b""
        if not data:
            self.eof = True
        self.buf += data

    def next_line(self):
        """The next complete line, or None."""
        line, sep, rest = self.buf.partition(b"\n")
        if not sep:
            return None
        self.buf = rest
        self.last_line = time.monotonic()
        return line

    def exactly(self, size, timeout):
        """The ``size`` bytes after the request line (a module sent with it), waiting at
        most ``timeout`` seconds for them; read in pieces joined once, not appended."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        pieces, have = [self.buf[:size]], min(len(self.buf), size)
        self.buf = self.buf[size:]
        while have < size:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise Failure("agent-error", "the module's %d bytes did not arrive within "
                              "%.0f s" % (size, timeout))
            try:
                data = os.read(self.fd, min(size - have, 1 << 20))
            except OSError as e:
                log("stdin: %s" % e)
                data = b""
            if not data:
                raise Failure("agent-error", "stdin closed after %d of the module's %d bytes"
                              % (have, size))
            pieces.append(data)
            have += len(data)
        return b"".join(pieces)

    def first_line(self, timeout):
        """The request line, waiting at most ``timeout`` seconds for it."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while True:
            line = self.next_line()
            if line is not None:
                return line
            if self.eof:
                raise Failure("agent-error", "stdin closed before a request arrived")
            if len(self.buf) > 1 << 20:
                raise Failure("agent-error", "request line longer than 1 MiB")
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise Failure("agent-error", "no request arrived on stdin within %.0f s" % timeout)
            self.fill()


# The control channel's one state: START not yet answered, then the probe runs, then EXIT
# is sent and the module runs its end probes, then it has answered EXIT.
STARTING, RUNNING, STOPPING, EXITED = "starting", "running", "stopping", "exited"


class ControlChannel(object):
    """The module's .cmd: the SystemTap control protocol, and where the run stands in it.

    What the module says goes to ``listener``: on_started(), on_text(text) for
    OOB_DATA and on_system(command) for SYSTEM. REQUEST_EXIT (the script's exit()) may
    come before START's reply, so it is only noted in ``exit_requested``.
    """

    open_retry = 2.0  # seconds to retry .cmd's EBUSY (a previous opener closing)

    def __init__(self, fd, listener):
        self.fd = fd
        self.listener = listener
        self.state = STARTING
        self.generation = None  # 4 or 5, told by TRANSPORT's number
        self.start_res = None  # START's reply: 0 when the module started
        self.exit_requested = False
        self.exit_sent = None  # when EXIT was written (time.monotonic())

    @classmethod
    def open(cls, kernel, module, listener):
        deadline = time.monotonic() + cls.open_retry
        while True:
            try:
                return cls(kernel.open_control(module), listener)
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise Failure("start-failed", "cannot open the control channel of %s: %s"
                                  % (module, e.strerror)) from None
                time.sleep(0.05)

    def watched(self):
        return [] if self.fd is None else [self.fd]

    def on_ready(self, _fd, _events):
        self.pump()

    def pump(self):
        """Handles every message queued on .cmd."""
        while self.fd is not None:
            try:
                data = os.read(self.fd, CTL_READ_SIZE)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EINTR):
                    log("reading the control channel: %s" % e)
                return
            if not data:
                return
            self._on_message(data)

    def _on_message(self, data):
        if len(data) < 4:
            log("ignoring a %d-byte control message" % len(data))
            return
        mtype = struct.unpack_from("=I", data)[0]
        if self.generation is None:
            generation = generation_of(mtype)
            if generation is None or mtype != message_type("TRANSPORT", generation):
                log("ignoring control message of type %d before TRANSPORT" % mtype)
                return
            self.generation = generation
        name, payload = decode_message(data, self.generation)
        if name == "TRANSPORT":
            pass
        elif name == "START" and self.state == STARTING and self.start_res is None:
            try:
                self.start_res = unpack_start(payload)[1]
            except ValueError as e:
                log("ignoring a malformed START reply: %s" % e)
                return
            if self.start_res == 0:  # now, before the messages queued after it
                self.state = RUNNING
                self.listener.on_started()
        elif name == "OOB_DATA":
            self.listener.on_text(message_text(payload))
        elif name == "SYSTEM":
            self.listener.on_system(payload.split(b"\0", 1)[0])
        elif name == "REQUEST_EXIT":
            self.exit_requested = True
        elif name == "EXIT":
            self.state = EXITED
        else:
            log("ignoring control message %s (type %d)" % (name, mtype))

    def send(self, name, payload=b"", required=True):
        """Writes one control message; a failure of a required one fails the start."""
        message = encode_message(self.generation, name, payload)
        deadline = time.monotonic() + 1.0
        while True:
            try:
                written = os.write(self.fd, message)
                problem = None if written > 0 else "the module accepted 0 bytes"
            except OSError as e:
                problem = e.strerror
                if e.errno == errno.EAGAIN and time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
            break
        if problem and required:
            raise Failure("start-failed", "cannot send %s: %s" % (name, problem))
        if problem:
            log("%s not accepted: %s" % (name, problem))
        return problem is None

    def send_exit(self):
        """Asks the module to stop (its end probes run before it answers); False if the
        module refused the message."""
        self.state = STOPPING
        self.exit_sent = time.monotonic()
        return self.send("EXIT", required=False)

    def close(self):
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


class RelaySet(object):
    """The module's relay files, one per CPU, read on their CPU and merged in order.

    Relay files are read as soon as they have data, as stapio does: a CPU's buffer read
    early has its records start sub-buffers afresh, so 4.x drops fewer of them (a record
    whose header does not fit at a sub-buffer's end is lost). A finalized relay file
    polls POLLERR for ever, so it is no longer watched from then on.
    """

    def __init__(self, kernel, opened, generation, gap_wait):
        self.kernel = kernel
        self.relays = dict((fd, (cpu, RecordParser(generation))) for cpu, fd in opened)
        self.live = set(self.relays)  # not finalized: waited on for data
        self.merger = Merger(gap_wait)
        self.home_cpus = kernel.cpus()  # where this thread runs when not reading a relay
        self.unpinned = set()  # CPUs whose relay file had to be read from elsewhere

    def watched(self):
        return list(self.live)

    def on_ready(self, fd, events):
        if events & (select.POLLERR | select.POLLHUP):
            self.live.discard(fd)
        self.read(fd)

    def read(self, fd):
        """Reads one relay file until it has nothing more; True if anything arrived.

        A CPU's file is read on that CPU, as stapio's per-CPU threads do: a read closes
        the buffer's current sub-buffer, and from another CPU that races with the CPU's
        own writer (seen on 6.1 with 4.8: records cut short, transport failures).
        """
        cpu, parser = self.relays[fd]
        moved = self.kernel.run_on([cpu])
        if not moved and cpu not in self.unpinned:
            self.unpinned.add(cpu)
            log("cannot run on CPU %d: reading its relay file from another CPU" % cpu)
        chunks = []
        for _ in range(RELAY_READS):  # bounded, so .cmd is served even under a flood
            try:
                data = os.read(fd, RELAY_READ_SIZE)
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.EAGAIN, errno.EINTR):
                    log("reading relay file: %s" % e)
                break
            if not data:
                break
            chunks.append(data)
        if moved:
            self.kernel.run_on(self.home_cpus)
        # parsed after the move back: the CPU's probes get it back as soon as it is read
        now = time.monotonic()
        for data in chunks:
            for seq, record in parser.feed(data):
                self.merger.add(seq, record, now)
        return bool(chunks)

    def read_all(self):
        """Reads every relay file that has data, finalized or not; True if any had.
        Polling (unlike reading) changes nothing, so it picks the files worth a move."""
        poller = select.poll()
        for fd in self.relays:
            poller.register(fd, select.POLLIN)
        return [self.read(fd) for fd, _events in poller.poll(0)].count(True) > 0

    def finish(self, now):
        """At the end: what the parsers still hold, cut records included."""
        for _cpu, parser in self.relays.values():
            for seq, record in parser.finish():
                self.merger.add(seq, record, now)

    def close(self, stats):
        """Closes every relay file and adds what was skipped or lost to ``stats``."""
        for fd, (_cpu, parser) in self.relays.items():
            stats["desyncs"] += parser.desyncs
            stats["lost_bytes"] += parser.lost_bytes
            try:
                os.close(fd)
            except OSError:
                pass
        stats["lost_records"] = self.merger.lost
        self.relays = {}
        self.live = set()


class Children(object):
    """The script's system() commands, whose output we forward."""

    def __init__(self, out):
        self.out = out
        self.running = {}  # stdout fd -> Popen

    def start(self, command):
        """Runs ``command`` by sh without waiting, as stapio does; None, or why it could
        not start.

        It gets neither our stdin (the controller's channel) nor our descriptors (an
        inherited .cmd would keep the module loaded).
        """
        import subprocess

        try:
            child = subprocess.Popen([b"sh", b"-c", command], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     close_fds=True)
        except OSError as e:
            return str(e)
        os.set_blocking(child.stdout.fileno(), False)
        self.running[child.stdout.fileno()] = child
        return None

    def watched(self):
        return list(self.running)

    def on_ready(self, fd, _events):
        """Forwards what the child wrote; at its EOF, forgets it."""
        try:
            data = os.read(fd, 65536)
        except OSError:  # EAGAIN: nothing yet
            return
        if data:
            self.out.output(data)
        else:
            child = self.running.pop(fd)
            child.stdout.close()
            child.poll()

    def forward_available(self):
        for fd in list(self.running):
            self.on_ready(fd, 0)

    def abandon(self):
        """Stops listening to the commands still running; they run on by themselves."""
        for child in self.running.values():
            child.stdout.close()
        self.running = {}


# ---------------------------------------------------------------- the target process

def process_table(kernel):
    """[(start time in ticks, pid, comm, command line)] of every process but ours."""
    table = []
    own = os.getpid()
    for entry in os.listdir(kernel.proc_path()):
        if not entry.isdigit() or int(entry) == own:
            continue
        try:
            stat = kernel.read(kernel.proc_path(entry, "stat"))
            with open(kernel.proc_path(entry, "cmdline"), "rb") as f:
                cmdline = f.read(65536)
        except (IOError, OSError):  # it ended while we looked
            continue
        # comm is between the first '(' and the last ')': it may hold either
        head, _, rest = stat.rpartition(")")
        fields = rest.split()
        if "(" not in head or len(fields) < 20 or not fields[19].isdigit():
            continue
        comm = head.split("(", 1)[1]
        args = cmdline.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
        table.append((int(fields[19]), int(entry), comm, args))
    return table


def matching_pids(kernel, target):
    """([PID], description) of the processes a ``target`` (pid, process by comm, or
    cmdline pattern) names, oldest first; Failure no-target when nothing matches."""
    if not isinstance(target, dict):
        raise Failure("agent-error", "target must be an object")
    if "pid" in target:
        pid = target["pid"]
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise Failure("agent-error", "target pid must be a positive integer")
        if not os.path.isdir(kernel.proc_path(str(pid))):
            raise Failure("no-target", "no process with PID %d" % pid)
        return [pid], "with PID %d" % pid
    if "process" in target:
        name = str(target["process"])
        matches = [row for row in process_table(kernel) if row[2] == name]
        what = "named %r" % name
    elif "cmdline" in target:
        import re

        try:
            pattern = re.compile(str(target["cmdline"]))
        except re.error as e:
            raise Failure("agent-error", "bad cmdline pattern: %s" % e) from None
        matches = [row for row in process_table(kernel) if pattern.search(row[3])]
        what = "whose command line matches %r" % target["cmdline"]
    else:
        raise Failure("agent-error", "target needs pid, process or cmdline (a run: or command)")
    if not matches:
        raise Failure("no-target", "no process %s" % what)
    matches.sort()
    return [row[1] for row in matches], what


def resolve_target(kernel, target, warn):
    """The PID a run's ``target`` names: the oldest match, with a warning when several."""
    pids, what = matching_pids(kernel, target)
    if len(pids) > 1:
        warn("%d processes %s: aiming at the oldest, PID %d" % (len(pids), what, pids[0]))
    return pids[0]


class TargetCommand(object):
    """The run's ``command`` (stap -c): started held, released once the module has
    started; its stdout and stderr go to the controller as ``command-output`` events."""

    def __init__(self, out, command):
        self.out = out
        release_read, self.release = os.pipe()
        # sh blocks reading the pipe (its stdin), then execs the command in the same
        # process, stdin from /dev/null: the PID the module is given is the command's.
        # The pipe closed without a line (the module never started) runs nothing.
        script = 'read -r _ && exec /bin/sh -c "$1" </dev/null'
        import subprocess

        try:
            self.child = subprocess.Popen(["/bin/sh", "-c", script, "sh", command],
                                          stdin=release_read, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT)
        except OSError as e:
            os.close(self.release)
            raise Failure("no-target", "the command could not start: %s" % e) from None
        finally:
            os.close(release_read)
        self.pid = self.child.pid
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")  # whole characters
        self.fd = self.child.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.open = True

    def start(self):
        """Lets the held command run."""
        try:
            os.write(self.release, b"go\n")
        except OSError:  # it is gone already: its exit ends the run
            pass
        os.close(self.release)
        self.release = None

    def watched(self):
        return [self.fd] if self.open else []

    def on_ready(self, _fd, _events):
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EAGAIN: nothing yet
            return
        text = self.decoder.decode(data, final=not data)
        if text:
            self.out.event("command-output", text=text)
        if not data:
            self.open = False

    def exited(self):
        return self.child.poll() is not None

    def end(self, wait):
        """Forwards what is left; a command still running after ``wait`` s is killed.
        One never released ends at the closing of its pipe, without running."""
        if self.release is not None:
            os.close(self.release)
            self.release = None
        deadline = time.monotonic() + wait
        while self.open and time.monotonic() < deadline:
            select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            self.on_ready(self.fd, 0)
        if self.child.poll() is None:
            self.child.kill()
        self.child.wait()
        self.child.stdout.close()
        self.open = False


def new_stats():
    return {"bytes": 0, "records": 0, "lost_records": 0, "transport_failures": 0,
            "warnings": 0, "desyncs": 0, "lost_bytes": 0}


class Run(object):
    """One run of one module: load, attach, run, stop, drain, unload.

    One poll loop (step) serves the parts: each ready descriptor goes to the part that
    watches it (the control channel, the relay files, the system() commands, stdin).
    """

    startup_timeout = 15.0  # for TRANSPORT and START's reply
    unload_retry = 3.0  # seconds to retry delete_module while the module is in use
    drain_timeout = 5.0
    children_wait = 5.0  # for system() commands still running when the module is gone
    settle_time = 0.3  # to collect the module's ERROR text after a failed START
    tick = 0.1  # the steady state's longest sleep: timers are checked at least this often

    def __init__(self, agent, request, gap_wait):
        self.agent = agent
        self.kernel = agent.kernel
        self.out = agent.out
        self.stdin = agent.stdin
        self.request = request
        self.gap_wait = gap_wait
        self.stats = new_stats()
        self.module = None
        self.channel = None
        self.relays = None
        self.children = Children(self.out)
        self.started = None  # when START's reply came
        self.target_pid = 0  # target() in the script: 0 for none
        self.command = None  # the TargetCommand of a ``command`` target
        self.stop_reason = None
        self.exit_problem = None
        self.unload_problem = None
        self.errors = []
        self.seen_warnings = set()

    def execute(self):
        """The run's result; Failure when it ends before the module starts."""
        request = self.request
        self.out.compress(compress_level(request))
        facts = collect_facts(self.kernel)
        self.out.event("facts", facts=facts)
        image, name, params = preflight(request, facts, self.agent.module_image)
        touch(request["module"])
        try:
            self.aim(request.get("target"))
            return self.load_and_run(image, name, params)
        finally:
            if self.command is not None:
                self.command.end(self.children_wait if self.stop_reason == "command-exited"
                                 else 0.0)

    def aim(self, target):
        """Resolves the request's target (nothing, when it has none) before any load."""
        if target is None:
            return
        if not isinstance(target, dict):
            raise Failure("agent-error", "target must be an object")
        if "command" in target:
            self.command = TargetCommand(self.out, str(target["command"]))
            self.target_pid = self.command.pid
        else:
            self.target_pid = resolve_target(
                self.kernel, target, lambda text: self.out.event("warning", text=text))
        self.out.event("target", pid=self.target_pid)

    def load_and_run(self, image, name, params):
        loaded_name = runtime_name(name, str(os.getpid()))
        if loaded_name is None or is_signed(image):
            # Renaming would break a signature; a name this short cannot take a tag.
            self.out.event("warning", text="module %s is loaded under its own name: a second "
                                           "run of it on this host will fail with EEXIST" % name)
            loaded_name = name
        else:
            image = rename_module(image, name, loaded_name)
        try:
            self.kernel.load(image, params)
        except OSError as e:
            raise Failure("insmod-refused", insmod_message(e, loaded_name)) from None
        self.module = loaded_name
        self.out.event("loaded", module=loaded_name)
        try:
            self.attach()
            self.steady_state()
            self.drain()
        finally:
            self.teardown()
            self.finish_children()
        return self.outcome()

    # -- the loop

    def step(self, timeout, listen=False):
        """Waits up to ``timeout`` seconds and hands each ready descriptor to its part
        (stdin too if ``listen``); then a heartbeat if no frame went out for a while."""
        handlers = {}
        for part in (self.channel, self.relays, self.children, self.command):
            if part is not None:
                for fd in part.watched():
                    handlers[fd] = part.on_ready
        if listen and self.stdin is not None and not self.stdin.eof:
            handlers[self.stdin.fd] = self.on_stdin
        poller = select.poll()
        for fd in handlers:
            poller.register(fd, select.POLLIN)
        for fd, events in poller.poll(timeout * 1000):
            handlers[fd](fd, events)
        if time.monotonic() - self.out.last_frame >= HEARTBEAT_INTERVAL:
            self.out.event("heartbeat")

    def wait_for(self, condition, what):
        """Runs the loop until ``condition()``; False after startup_timeout."""
        deadline = time.monotonic() + self.startup_timeout
        while not condition():
            if self.agent.signalled:
                raise Failure("stopped", "stopped by signal %d while waiting for %s"
                              % (self.agent.signalled, what))
            if time.monotonic() > deadline:
                return False
            self.step(0.05)
        return True

    # -- what the parts report

    def on_stdin(self, _fd, _events):
        """The controller's lines: ping keeps the dead-man quiet, stop stops."""
        self.stdin.fill()
        while True:
            line = self.stdin.next_line()
            if line is None:
                break
            try:
                op = json_loads(line.decode("utf-8")).get("op")
            except (ValueError, AttributeError):
                log("ignoring a line on stdin that is not a JSON object")
                continue
            if op == "stop":
                self.stop("stop")
            elif op != "ping":
                log("ignoring unknown op %r" % (op,))
        if self.stdin.eof:
            self.stop("controller-gone")

    def on_started(self):
        self.started = time.monotonic()
        self.out.event("started")

    def on_text(self, text):
        """OOB_DATA: errors fail the run; warnings are counted and shown once each."""
        if text.startswith("ERROR: "):
            text = text[7:]
            if len(self.errors) < 100:
                self.errors.append(text)
            self.out.event("error", text=text)
            return
        if text.startswith("WARNING: "):
            text = text[9:]
        self.stats["warnings"] += 1
        if "transport failures" in text:
            import re

            failures = re.search(TRANSPORT_FAILURES, text)
            if failures:
                self.stats["transport_failures"] += int(failures.group(1))
        if text not in self.seen_warnings and len(self.seen_warnings) < 1024:
            self.seen_warnings.add(text)
            self.out.event("warning", text=text)

    def on_system(self, command):
        """The script's system(): its output joins the probe output."""
        if not command:
            return
        problem = self.children.start(command)
        if problem:
            self.on_text("WARNING: system(%s) could not start: %s"
                         % (command.decode("utf-8", "replace"), problem))

    def stop(self, reason):
        if self.stop_reason is None:
            self.stop_reason = reason
            self.out.event("stopping", reason=reason)

    # -- the phases

    def attach(self):
        """staprun's and stapio's startup: handshake, relocations, relay files, START.

        TRANSPORT is queued by the module's init, so it is read first: its number tells
        4.x from 5.x before anything is written.
        """
        channel = self.channel = ControlChannel.open(self.kernel, self.module, self)
        if not self.wait_for(lambda: channel.generation is not None, "TRANSPORT"):
            raise Failure("start-failed", "the module sent no TRANSPORT message within %.0f s"
                          % self.startup_timeout)
        channel.send("PRIVILEGE_CREDENTIALS", pack_privilege(), required=False)
        self.send_relocations()
        now = time.localtime()
        channel.send("TZINFO", pack_tzinfo(now.tm_gmtoff, (now.tm_zone or "UTC")[:63]),
                     required=False)
        request = self.request
        if isinstance(request.get("remote_id"), int):
            channel.send("REMOTE_ID", pack_remote_id(request["remote_id"],
                                                     str(request.get("remote_uri", ""))[:127]),
                         required=False)
        channel.send("READY", required=False)
        self.relays = RelaySet(self.kernel, self.kernel.open_relays(self.module),
                               channel.generation, self.gap_wait)
        channel.send("START", pack_start(self.target_pid, 0))  # begin probes run in it
        if not self.wait_for(lambda: channel.start_res is not None, "START's reply"):
            raise Failure("start-failed", "the module did not answer START within %.0f s"
                          % self.startup_timeout)
        if channel.start_res != 0:
            deadline = time.monotonic() + self.settle_time
            while time.monotonic() < deadline:
                self.step(0.05)
            raise Failure("start-failed", self.errors[0] if self.errors else
                          "the module's initialization returned %d" % channel.start_res)
        if self.command is not None:
            self.command.start()

    def send_relocations(self):
        """The kernel's own addresses (6.x exports no kallsyms_lookup_name) and sections."""
        with self.kernel.addresses_visible():
            symbols = boot_symbols(self.kernel, os.path.dirname(os.path.abspath(
                self.request["module"])))
            sections = self.kernel.module_sections()
        relocations = [("kernel", symbol, symbols[symbol])
                       for symbol in KERNEL_SYMBOLS if symbol in symbols]
        if "_stext" in symbols and self.kernel.has_build_id_note():
            relocations.append(("kernel", ".note.gnu.build-id", 2))
        relocations += [(module, section, address) for module, section, address in sections
                        if len(module) < 127 and len(section) < 127]
        for module, section, address in relocations:
            self.channel.send("RELOCATION", pack_relocation(module, section, address),
                              required=False)

    def steady_state(self):
        """Runs until EXIT's reply, sending EXIT when a reason to stop comes up."""
        exit_timeout = float(self.request.get("exit_timeout") or 10.0)
        self.out.stall_timeout = float(self.request.get("deadman", 30.0) or 60.0)
        channel = self.channel
        self.emit_output(time.monotonic())  # what came while the module started
        while True:
            self.step(self.tick, listen=channel.state == RUNNING)
            now = time.monotonic()
            self.emit_output(now)
            if channel.state == EXITED:
                return
            if self.stop_reason is None:
                reason = self.reason_to_stop(now)
                if reason:
                    self.stop(reason)
            if channel.state == RUNNING and self.stop_reason is not None:
                if not channel.send_exit():
                    self.exit_problem = "the module refused EXIT"
                    return
            elif channel.state == STOPPING and now - channel.exit_sent > exit_timeout:
                self.exit_problem = "the module did not answer EXIT within %.0f s" % exit_timeout
                return

    def reason_to_stop(self, now):
        duration = self.request.get("duration")
        deadman = self.request.get("deadman", 30.0)
        if self.channel.exit_requested:
            return "error" if self.errors else "exit()"
        if self.agent.signalled:
            return "signal"
        if self.command is not None and self.command.exited():
            return "command-exited"
        if duration is not None and now - self.started >= duration:
            return "duration"
        if deadman and now - self.stdin.last_line > deadman:
            return "deadman"
        return None

    def emit_output(self, now, final=False):
        ready = self.relays.merger.pop(now, final)
        if ready:
            data = b"".join(ready)
            self.stats["records"] += len(ready)
            self.stats["bytes"] += len(data)
            self.out.output(data)

    def drain(self):
        """After EXIT's reply: read the relays dry, then the last control messages.

        The module writes nothing after that reply, so what is left is finite (a full
        buffer takes a while over a slow link); without the reply, drain_timeout bounds it.
        """
        deadline = time.monotonic() + self.drain_timeout
        while self.relays.read_all() and (self.channel.state == EXITED or
                                          time.monotonic() < deadline):
            self.emit_output(time.monotonic())
        self.channel.pump()
        now = time.monotonic()
        self.relays.finish(now)
        self.emit_output(now, final=True)
        self.children.forward_available()

    def teardown(self):
        """Close every descriptor, then rmmod: whatever happened before, never raising."""
        if self.relays is not None:
            self.relays.close(self.stats)
        if self.channel is not None:
            self.channel.close()
        deadline = time.monotonic() + self.unload_retry
        while True:
            try:
                self.kernel.unload(self.module)
                break
            except OSError as e:
                if e.errno == errno.ENOENT:
                    break
                if e.errno in (errno.EAGAIN, errno.EBUSY, errno.EINTR) and \
                        time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                self.unload_problem = "module %s is still loaded: delete_module failed: %s" \
                                      % (self.module, e.strerror)
                log(self.unload_problem)
                return
            except Exception as e:
                self.unload_problem = "module %s may still be loaded: %r" % (self.module, e)
                return
        self.out.event("unloaded", module=self.module)

    def finish_children(self):
        """After the unload: the output of system() commands still running is the
        script's output too (stapio's children write to its terminal even after it
        ends), so it is forwarded until they end or children_wait has passed."""
        deadline = time.monotonic() + self.children_wait
        while self.children.running:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.step(min(self.tick, left))
        self.children.abandon()

    def outcome(self):
        request = self.request
        messages = {
            "exit()": "the script called exit()",
            "error": "the script stopped on an error",
            "duration": "the duration of %s s was reached" % request.get("duration"),
            "stop": "stopped by the controller",
            "command-exited": "the command exited with status %s"
                              % (self.command.child.returncode if self.command else None),
            "signal": "stopped by signal %s" % self.agent.signalled,
            "controller-gone": "stdin closed: the controller is gone",
            "deadman": "no word from the controller for %s s" % request.get("deadman", 30.0),
            "max-duration": "its maximum duration of %s s was reached"
                            % request.get("max_duration"),
            "max-disk": "its disk bound of %s bytes was reached" % request.get("max_disk"),
        }
        message = messages.get(self.stop_reason, "stopped (%s)" % self.stop_reason)
        if self.exit_problem:
            message += "; %s, so it was detached and unloaded (its end probes ran in rmmod)" \
                       % self.exit_problem
        if self.errors:
            more = len(self.errors) - 1
            return self.agent.result("runtime-error", self.errors[0] + (
                " (and %d more errors)" % more if more else ""))
        if self.exit_problem:
            return self.agent.result("timed-out", message)
        kind = {"stop": "stopped", "signal": "stopped", "controller-gone": "transport-lost",
                "deadman": "transport-lost"}.get(self.stop_reason)
        return self.agent.result(kind, message)


# ---------------------------------------------------------------- preflight and files

def preflight(request, facts, image=None):
    """Every check that must pass before insmod: (image, module name, params string).
    ``image``: the module's bytes as they came with the request (receive_module stored
    them); None: read from its file.

    A module file whose sha256 is not the request's is deleted before the refusal, so
    the controller sends it again with its next request.
    """
    if facts["euid"] != 0:
        raise refused("the agent runs as uid %d, not root: loading a kernel module needs "
                      "root (use become)" % facts["euid"])
    if not facts["module_support"]:
        raise refused("this kernel has no loadable module support (no /proc/modules)")
    if facts["modules_disabled"]:
        raise refused("/proc/sys/kernel/modules_disabled is 1: this kernel accepts no "
                      "modules until it reboots")
    if not facts["procfs"]:
        raise refused("/proc is not mounted: the module's control channel lives there")
    path = request.get("module")
    if not path or not isinstance(path, str):
        raise refused("the request names no module file")
    if image is None:  # one that came with the request, receive_module has checked
        image = module_from_file(path, request.get("sha256"))
    try:
        info = modinfo(image)
    except ValueError as e:
        raise refused("%s is not a kernel module: %s" % (path, e)) from None
    built_for = (info.get("vermagic") or "").split()
    if not built_for:
        raise refused("%s has no vermagic: not a kernel module" % path)
    if built_for[0] != facts["release"]:
        raise refused("module %s was built for kernel %s, but this host runs %s"
                      % (path, built_for[0], facts["release"]))
    name = request.get("module_name") or info.get("name")
    if not name or _name_offset(image, name) is None:
        raise refused("module name %r is not the name embedded in %s" % (name, path))
    strict = facts["sig_enforce"] or facts["lockdown"] in ("integrity", "confidentiality")
    if strict and not is_signed(image):
        raise refused("this kernel only loads signed modules (sig_enforce=%s, lockdown=%s) "
                      "and %s is unsigned" % (facts["sig_enforce"], facts["lockdown"], path))
    params = request.get("params") or {}
    if not isinstance(params, dict):
        raise refused("params must be a JSON object of name: value")
    try:
        params = module_params(params, request.get("bufsize_mb") or 0)
    except ValueError as e:
        raise refused(str(e)) from None
    return image, name, params


def refused(message):
    """A preflight refusal: nothing was loaded."""
    return Failure("preflight-refused", message)


def module_from_file(path, sha256):
    """The module file's bytes, if they are the module ``sha256`` names; a file that is
    not is deleted, so that the controller sends it again (preflight-refused)."""
    try:
        with open(path, "rb") as f:
            image = f.read()
    except (OSError, IOError) as e:
        if e.errno == errno.ENOENT:  # the controller sends it and asks again
            raise refused("module %s is not on this host" % path) from None
        raise refused("cannot read module %s: %s" % (path, e.strerror)) from None
    digest = sha256_hex(image)
    if digest != sha256:
        remove_file(path)
        raise refused("module %s: sha256 mismatch (%s, expected %s): the upload is corrupt or "
                      "stale, so it was deleted" % (path, digest, sha256))
    return image


MAX_MODULE = 256 << 20  # bytes of a module sent with a request


def receive_module(request, image):
    """Keep a module sent with the request where it names it, an absolute
    ``.../<sha256>.ko`` (write-then-rename), after checking it is that module; returns it.
    One that does not match is refused as a corrupt upload, which the controller sends
    again."""
    path, digest = request.get("module"), sha256_hex(image)
    if not isinstance(path, str) or not os.path.isabs(path) or \
            os.path.basename(path) != "%s.ko" % request.get("sha256"):
        raise Failure("agent-error", "a module sent with a request is kept only as an "
                      "absolute path ending in <sha256>.ko, not as %r" % (path,))
    if digest != request.get("sha256"):
        raise refused("module %s: sha256 mismatch (%s, expected %s): the upload is corrupt"
                      % (path, digest, request.get("sha256")))
    try:
        write_file(path, image)
    except (OSError, IOError) as e:
        log("cannot keep the module in %s: %s" % (path, e))  # it still runs, from memory
    return image


def sha256_hex(data):
    """hashlib's sha256, without hashlib's OpenSSL import (tens of milliseconds on a slow
    target, before the load) where the interpreter has its own."""
    try:
        from _sha256 import sha256  # Python 3.6 to 3.11
    except ImportError:
        from hashlib import sha256
    return sha256(data).hexdigest()


def error_trace():
    """The exception being handled, with its traceback, for the log and an agent-error."""
    import traceback

    return traceback.format_exc()


def remove_file(path):
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log("cannot remove %s: %s" % (path, e))


def touch(path):
    """Marks a file as in use, so that remove_stale_files spares it."""
    try:
        os.utime(path, None)
    except OSError as e:
        log("cannot touch %s: %s" % (path, e))


STALE_AGE = 7 * 86400  # seconds since a module or agent file was last used
STALE_PART_AGE = 3600  # seconds since an unfinished upload was last written


def is_uploaded(name):
    """A module (``<sha256>.ko``) or an agent (``agent-<hex>.py``) the controller sent."""
    if name.endswith(".ko"):
        return len(name) == 67 and made_of(name[:64], HEX_DIGITS)
    return name.startswith("agent-") and name.endswith(".py") and made_of(name[6:-3], HEX_DIGITS)


def bytecode_agent(name):
    """The agent (``agent-<hex>``) whose cached bytecode ``name`` is
    (``agent-<hex>.<tag>.pyc`` in __pycache__), or None."""
    agent, dot, tag = name[:-4].partition(".") if name.endswith(".pyc") else ("", "", "")
    if dot and agent.startswith("agent-") and made_of(agent[6:], HEX_DIGITS) and \
            made_of(tag, WORD + ".-"):
        return agent
    return None


def remove_stale_files(directory, keep, now=None):
    """Removes from the agent's work directory the modules (``<sha256>.ko``) and agents
    (``agent-<hex>.py``) unused for STALE_AGE, and unfinished uploads (``*.part``)
    older than STALE_PART_AGE; never ``keep`` (this agent's own file)."""
    now = time.time() if now is None else now
    try:
        names = os.listdir(directory)
    except OSError as e:
        log("cannot list %s: %s" % (directory, e))
        return
    keep = os.path.realpath(keep)
    for name in names:
        if is_uploaded(name):
            age = STALE_AGE
        elif name.endswith(".part"):
            age = STALE_PART_AGE
        else:
            continue
        path = os.path.join(directory, name)
        try:
            stale = os.lstat(path).st_mtime < now - age
        except OSError:
            continue
        if stale and os.path.realpath(path) != keep:
            remove_file(path)
    remove_orphan_bytecode(directory)


def remove_orphan_bytecode(directory):
    """Removes the cached bytecode of agents whose file is gone (the controller runs the
    agent by import, so Python keeps it in ``__pycache__``)."""
    cache = os.path.join(directory, "__pycache__")
    try:
        names = os.listdir(cache)
    except OSError:
        return  # no agent has run by import here yet
    for name in names:
        agent = bytecode_agent(name)
        if agent and not os.path.exists(os.path.join(directory, agent + ".py")):
            remove_file(os.path.join(cache, name))


# ---------------------------------------------------------------- detached runs

DETACHED_DIR = "detached"  # under the work directory: one folder per detached run
MAX_EVENTS_FILE = 1 << 20  # bytes of events.jsonl a detached run writes at most
STATE_INTERVAL = HEARTBEAT_INTERVAL  # seconds between rewrites of a running run's state
RUNNING_STATES = ("starting", "running")


def is_run_name(name):
    """A detached run's name: up to 200 of [A-Za-z0-9_.~-], not starting with . ~ or -."""
    return made_of(name, WORD + ".~-", 200) and name[0] in WORD


def run_folder(request):
    """The folder of the detached run a request names: ``<workdir>/detached/<name>``."""
    workdir, name = request.get("workdir"), request.get("name")
    if not isinstance(workdir, str) or not os.path.isabs(workdir):
        raise Failure("agent-error", "the request names no absolute work directory")
    if not isinstance(name, str) or not is_run_name(name):
        raise Failure("agent-error", "%r is not a detached run's name" % (name,))
    return os.path.join(workdir, DETACHED_DIR, name)


def detach_limits(request):
    """The lifetime bound and rotation of a detach request, each a positive number."""
    limits = {}
    for key, kind in (("max_duration", (int, float)), ("max_disk", int), ("file_size", int),
                      ("file_count", int)):
        value = request.get(key)
        if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
            raise refused("a detached run needs %s, a positive number (got %r)"
                          % (key, value))
        limits[key] = value
    return limits


def boot_id(kernel):
    return (kernel.read(kernel.proc_path("sys", "kernel", "random", "boot_id")) or "").strip()


def boot_symbols(kernel, folder):
    """The kernel's own addresses (KERNEL_SYMBOLS), scanned from kallsyms once per boot
    and kept in ``folder`` (the agent's private one): the scan is a run's largest cost
    after the load on a slow target (about 30 ms emulated), and the addresses of this
    boot never change. Hidden (zero) addresses are not kept."""
    path = os.path.join(folder, SYMBOLS_FILE)
    boot = boot_id(kernel)
    saved = read_json(path)
    if boot and saved is not None and saved.get("boot_id") == boot:
        try:
            return dict((str(name), int(address)) for name, address in saved["symbols"].items())
        except (KeyError, TypeError, ValueError, AttributeError):
            pass  # scanned again, and written whole
    symbols = kernel.kernel_symbols()
    if boot and symbols and all(symbols.values()):
        try:
            write_json(path, {"boot_id": boot, "symbols": symbols})
        except (OSError, IOError) as e:
            log("cannot keep the kernel's addresses in %s: %s" % (folder, e))
    return symbols


def read_json(path):
    """A JSON object file as a dict, or None when there is none (or it is not one)."""
    try:
        with open(path, "rb") as f:
            value = json_loads(f.read().decode("utf-8"))
    except (OSError, IOError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_json(path, value):
    write_file(path, json_dumps(value).encode("utf-8"))


def write_file(path, data):
    """Write-then-rename, so a reader sees the old file or the new one, whole; private
    (0600)."""
    temporary = "%s.%d.part" % (path, os.getpid())
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.rename(temporary, path)
    except (OSError, IOError):
        remove_file(temporary)
        raise


def read_state(folder):
    """A detached run's state file as a dict, or None when there is none."""
    return read_json(os.path.join(folder, "state.json"))


def write_state(folder, state):
    write_json(os.path.join(folder, "state.json"), state)


def output_files(folder):
    """{index: path} of a detached run's output files still on disk."""
    files = {}
    try:
        names = os.listdir(folder)
    except OSError:
        return files
    for name in names:
        if name.startswith("out.") and made_of(name[4:], DIGITS):
            files[int(name[4:])] = os.path.join(folder, name)
    return files


def output_end(folder, file_size):
    """The offset past the last byte written, from the files themselves."""
    files = output_files(folder)
    if not files:
        return 0
    last = max(files)
    try:
        return last * file_size + os.path.getsize(files[last])
    except OSError:
        return last * file_size


def read_output(folder, file_size, offset, limit):
    """(first offset read, bytes) from ``offset`` on, at most ``limit`` bytes. Bytes that
    rotation removed are skipped: the first offset read is then past ``offset``."""
    files = output_files(folder)
    if not files:
        return offset, b""
    first = min(files) * file_size
    offset = max(offset, first)
    index = offset // file_size
    path = files.get(index)
    if path is None:
        return offset, b""
    try:
        with open(path, "rb") as f:
            f.seek(offset - index * file_size)
            return offset, f.read(min(limit, file_size))
    except (OSError, IOError):
        return offset, b""


class RotatingOutput(object):
    """A detached run's place of FrameWriter: output into ``out.N`` files of ``file_size``
    bytes each (file N holds bytes N*file_size onwards), keeping the newest
    ``file_count``; never more than ``max_disk`` bytes of output in all. Events go to
    events.jsonl (bounded), and the state file is rewritten on each heartbeat."""

    stall_timeout = 0.0  # FrameWriter's, unused here

    def __init__(self, folder, limits, state):
        self.folder = folder
        self.file_size = limits["file_size"]
        self.file_count = limits["file_count"]
        self.max_disk = limits["max_disk"]
        self.state = state
        self.written = 0
        self.dropped = 0
        self.last_frame = time.monotonic()
        self._file = None  # (index, fd)
        self._events = os.open(os.path.join(folder, "events.jsonl"),
                               os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._events_written = 0

    @property
    def full(self):
        return self.written >= self.max_disk

    def output(self, data):
        data = data[:max(0, self.max_disk - self.written)]
        self.dropped += 0 if data else 1
        while data:
            index = self.written // self.file_size
            fd = self._open(index)
            room = (index + 1) * self.file_size - self.written
            count = os.write(fd, data[:room])
            self.written += count
            data = data[count:]

    def _open(self, index):
        if self._file is not None and self._file[0] == index:
            return self._file[1]
        if self._file is not None:
            os.close(self._file[1])
        fd = os.open(os.path.join(self.folder, "out.%d" % index),
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = (index, fd)
        remove_file(os.path.join(self.folder, "out.%d" % (index - self.file_count)))
        return fd

    def event(self, name, **fields):
        self.last_frame = time.monotonic()
        if name == "started":
            self.state.update(state="running", ran=True)
        elif name == "loaded":
            self.state["module"] = fields.get("module")
        if name != "heartbeat":
            fields.update(event=name, time=time.time())
            line = (json_dumps(fields) + "\n").encode("utf-8")
            if self._events_written + len(line) <= MAX_EVENTS_FILE:
                self._events_written += len(line)
                os.write(self._events, line)
        self.save()

    def save(self, **fields):
        self.state.update(fields, written=self.written, updated=time.time())
        try:
            write_state(self.folder, self.state)
        except (OSError, IOError) as e:
            log("cannot write the state of %s: %s" % (self.folder, e))

    def json(self, _ftype, _obj):
        pass

    def compress(self, _level):
        pass

    def close(self):
        for fd in ([self._file[1]] if self._file else []) + [self._events]:
            try:
                os.close(fd)
            except OSError:
                pass
        self._file = None


class DetachedRun(Run):
    """A run with no controller: output to rotated files, ended by its lifetime bound
    (max_duration, max_disk), the script, an error, or a stop request (a ``stop`` file in
    its folder, or SIGTERM); it never listens to stdin."""

    def __init__(self, agent, request, gap_wait, folder, limits, state):
        Run.__init__(self, agent, request, gap_wait)
        self.folder = folder
        self.limits = limits
        self.out = RotatingOutput(folder, limits, state)
        self.children = Children(self.out)
        self.stdin = None

    def reason_to_stop(self, now):
        if self.channel.exit_requested:
            return "error" if self.errors else "exit()"
        if self.agent.signalled or os.path.exists(os.path.join(self.folder, "stop")):
            return "stop"
        if now - self.started >= self.limits["max_duration"]:
            return "max-duration"
        if self.out.full:
            return "max-disk"
        return None

    def outcome(self):
        result = Run.outcome(self)
        if self.stop_reason == "stop" and not self.errors and not self.exit_problem:
            result.update(status="ok", kind=None, message="stopped on request")
        return result


def start_detached(agent, request):
    """``detach``: the checks and the load as ``run`` does them, in a process of its own
    (double fork, setsid: not tied to the SSH session) that outlives this one; this one
    answers once the module has started or failed to."""
    folder = run_folder(request)
    limits = detach_limits(request)
    facts = collect_facts(agent.kernel)
    preflight(request, facts, agent.module_image)  # refusals come back at once, unforked
    try:
        os.makedirs(os.path.dirname(folder), 0o700, exist_ok=True)
        os.mkdir(folder, 0o700)
    except OSError as e:
        raise refused("cannot create %s: %s" % (folder, e.strerror)) from None
    state = {"state": "starting", "name": request["name"], "boot_id": boot_id(agent.kernel),
             "agent": os.path.abspath(__file__), "started": time.time(),
             "file_size": limits["file_size"], "written": 0, "limits": limits}
    write_state(folder, state)
    agent.spawn(lambda: serve_detached(agent, request, folder, limits, state),
                os.path.join(folder, "agent.log"))
    deadline = time.monotonic() + 2 * Run.startup_timeout + 10
    while time.monotonic() < deadline:
        current = read_state(folder) or state
        if current.get("state") != "starting":
            return detached_result(agent, current)
        time.sleep(0.05)
        if time.monotonic() - agent.out.last_frame >= HEARTBEAT_INTERVAL:
            agent.out.event("heartbeat")
    with open(os.path.join(folder, "stop"), "w"):  # should it start after all, it stops
        pass
    return agent.result("start-failed", "the detached run did not start within %.0f s"
                        % (2 * Run.startup_timeout + 10), detached=state)


def serve_detached(agent, request, folder, limits, state):
    """The detached process's whole life: the run, then its final state."""
    run = agent.run = DetachedRun(agent, request, agent.gap_wait, folder, limits, state)
    state["pid"] = os.getpid()
    run.out.save()
    try:
        result = run.execute()
    except Failure as e:
        result = agent.result(e.kind, e.message)
    except Exception:
        log(error_trace())
        result = agent.result("agent-error", error_trace())
    if run.unload_problem:
        result.update(status="failed", kind=result["kind"] or "agent-error",
                      message="%s; %s" % (result["message"], run.unload_problem))
    run.out.save(state="finished", ended=time.time(), reason=run.stop_reason,
                 status=result["status"], kind=result["kind"], message=result["message"],
                 stats=result["stats"], dropped=run.out.dropped)
    run.out.close()


def detached_result(agent, state):
    """Failed if the run ended before its module started; else ok, whatever came next."""
    if state.get("state") == "finished" and not state.get("ran"):
        return agent.result(state.get("kind") or "agent-error", state.get("message", ""),
                            detached=state)
    return agent.result(None, "detached", detached=state)


def live_state(kernel, folder):
    """A detached run's state as it stands: running, finished or lost. A run whose
    process is gone without finishing (the host rebooted, the agent was killed) is lost,
    and a module it left loaded is unloaded now."""
    state = read_state(folder)
    if state is None:
        return {"state": "lost", "message": "no trace of the run on the host: it was "
                                            "rebooted, or its files were removed"}
    if state.get("state") not in RUNNING_STATES:
        return state
    pid = state.get("pid")
    same_boot = state.get("boot_id") == boot_id(kernel)
    if same_boot and isinstance(pid, int) and process_runs(kernel, pid, state.get("agent", "")):
        return state
    # it may have finished (and exited) since the state was read: it writes its end first
    state = read_state(folder) or state
    if state.get("state") not in RUNNING_STATES:
        return state
    if state.get("state") != "starting" or not same_boot or pid is not None:
        message = "the host was rebooted while it ran" if not same_boot else \
            "its agent process is gone (killed?)"
        module = state.get("module")
        if same_boot and module:
            try:
                kernel.unload(module)
                message += "; its module %s was unloaded now" % module
            except OSError:
                pass
        state.update(state="lost", message=message)
        try:
            write_state(folder, state)
        except (OSError, IOError) as e:
            log("cannot record that %s is lost: %s" % (folder, e))
    return state


def process_runs(kernel, pid, agent_file):
    """Whether ``pid`` is a live process running ``agent_file`` (the pid is not reused):
    an argument of its command line is that file, by the path it was started with (a
    spare agent's is relative to the home folder)."""
    cmdline = kernel.read(kernel.proc_path(str(pid), "cmdline"))
    name = "/" + os.path.basename(agent_file or "")
    return name != "/" and cmdline is not None and any(
        arg == agent_file or arg.endswith(name) for arg in cmdline.split("\0"))


def detached_status(agent, request):
    """``status``: {name: state} of the runs the request names."""
    names = request.get("names")
    if not isinstance(names, list):
        raise Failure("agent-error", "status needs the names of the runs")
    states = {}
    for name in names[:1000]:
        folder = run_folder(dict(request, name=name))
        states[name] = live_state(agent.kernel, folder)
    return agent.result(None, "status", detached=states)


def detached_collect(agent, request):
    """``collect``: the output from ``offset`` to what is written now, as OUTPUT frames;
    with ``remove``, the run's folder is removed once it has ended and all of it was
    sent."""
    folder = run_folder(request)
    state = live_state(agent.kernel, folder)
    offset = request.get("offset")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise Failure("agent-error", "collect needs an offset, a non-negative integer")
    size = state.get("file_size") or 1
    first, end = None, output_end(folder, size)
    while offset < end:
        at, data = read_output(folder, size, offset, MAX_OUTPUT_FRAME)
        if first is None:
            first = at
        if not data:
            break
        agent.out.output(data)
        offset = at + len(data)
    removed = False
    if request.get("remove") and state.get("state") not in RUNNING_STATES and \
            offset >= output_end(folder, size):
        remove_tree(folder)
        removed = True
    return agent.result(None, "collected", detached=state, first=offset if first is None
                        else first, end=offset, removed=removed)


def detached_tail(agent, request):
    """``tail``: output from ``offset`` (null: from the end), as it is written, until the
    run ends and all is sent, or the controller stops (``stop`` op, or EOF)."""
    folder = run_folder(request)
    state = live_state(agent.kernel, folder)
    size = state.get("file_size") or 1
    offset = request.get("offset")
    if offset is None:
        offset = output_end(folder, size)
    poller = select.poll()
    poller.register(agent.stdin.fd, select.POLLIN)
    checked = 0.0
    while True:
        at, data = read_output(folder, size, offset, MAX_OUTPUT_FRAME)
        if data:
            agent.out.output(data)
            offset = at + len(data)
            continue
        now = time.monotonic()
        if now - checked > 0.5:
            checked = now
            ended = state.get("state") not in RUNNING_STATES
            state = live_state(agent.kernel, folder)
            if ended:  # this read came after the end: nothing more will come
                break
        if poller.poll(100):
            agent.stdin.fill()
            lines = []
            while True:
                line = agent.stdin.next_line()
                if line is None:
                    break
                lines.append(line)
            if agent.stdin.eof or any(b'"stop"' in line for line in lines):
                break
        if agent.signalled:
            break
        if time.monotonic() - agent.out.last_frame >= HEARTBEAT_INTERVAL:
            agent.out.event("heartbeat")
    return agent.result(None, "tailed", detached=state, end=offset)


def detached_stop(agent, request):
    """``stop``: asks the run to stop (a ``stop`` file, then SIGTERM to its process) and
    waits up to ``timeout`` seconds for it to have ended (EXIT, drain, unload)."""
    folder = run_folder(request)
    state = live_state(agent.kernel, folder)
    if state.get("state") not in RUNNING_STATES:
        return agent.result(None, "not running", detached=state)
    with open(os.path.join(folder, "stop"), "w"):
        pass
    pid = state.get("pid")
    if isinstance(pid, int) and pid != os.getpid() and \
            process_runs(agent.kernel, pid, state.get("agent", "")):
        try:
            os.kill(pid, _signal.SIGTERM)
        except OSError as e:
            log("cannot signal %d: %s" % (pid, e))
    timeout = request.get("timeout")
    deadline = time.monotonic() + (timeout if isinstance(timeout, (int, float)) else 60.0)
    while time.monotonic() < deadline:
        state = live_state(agent.kernel, folder)
        if state.get("state") not in RUNNING_STATES:
            return agent.result(None, "stopped", detached=state)
        time.sleep(0.1)
        if time.monotonic() - agent.out.last_frame >= HEARTBEAT_INTERVAL:
            agent.out.event("heartbeat")
    return agent.result("timed-out", "the detached run did not end within %s s" % timeout,
                        detached=state)


def remove_tree(folder):
    try:
        names = os.listdir(folder)
    except OSError:  # gone already (a host rebooted with a fresh filesystem)
        return
    for name in names:
        remove_file(os.path.join(folder, name))
    try:
        os.rmdir(folder)
    except OSError as e:
        log("cannot remove %s: %s" % (folder, e))


def remove_stale_runs(workdir, now=None):
    """Removes the folders of detached runs that ended (or were lost) STALE_AGE ago."""
    now = time.time() if now is None else now
    root = os.path.join(workdir, DETACHED_DIR)
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        folder = os.path.join(root, name)
        state = read_state(folder)
        try:
            age = now - os.path.getmtime(os.path.join(folder, "state.json"))
        except OSError:
            continue
        if state is not None and state.get("state") not in RUNNING_STATES and age > STALE_AGE:
            remove_tree(folder)


def daemonize(target, log_path):
    """Runs ``target`` in a grandchild in a session of its own, its stdin and stdout
    /dev/null and its stderr ``log_path``; returns in the parent once the child has gone."""
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        os.chdir("/")  # pins no directory of the session it left (paths are absolute)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), 2)
        _signal.signal(_signal.SIGHUP, _signal.SIG_IGN)
        _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
        target()
    except BaseException:
        log(error_trace())
    finally:
        os._exit(0)


def where_it_runs(kernel, path):
    """What the controller needs to know of the host before its first request, said in
    HELLO (from a spare agent's, it needs no prepare command): the agent's folder and the
    size of its file (``path``), the kernel's release and machine, the module files
    (``*.ko``) there."""
    folder = os.path.dirname(os.path.abspath(path))
    release, machine = kernel.uname()
    try:
        size = os.lstat(path).st_size
        names = os.listdir(folder)
    except OSError:
        size, names = 0, []
    modules = []
    for name in names:
        if name.endswith(".ko") and not name.startswith("."):
            try:
                if stat.S_ISREG(os.lstat(os.path.join(folder, name)).st_mode):
                    modules.append(name)
            except OSError:
                pass
    return {"workdir": folder, "agent_size": size, "release": release, "arch": machine,
            "modules": sorted(modules)}


class Agent(object):
    """One request, one result: facts, preflight, or a whole run of one module."""

    request_timeout = 60.0

    def __init__(self, kernel=None, stdin_fd=0, stdout_fd=1, gap_wait=1.0, path=None):
        self.kernel = kernel or Kernel()
        self.path = path or __file__  # the agent's file; its folder is the work directory
        self.out = FrameWriter(stdout_fd)
        self.stdin = LineReader(stdin_fd)
        self.module_image = None  # the module's bytes, when they came with the request
        self.gap_wait = gap_wait
        self.signalled = None
        self.run = None
        self.spawn = daemonize  # (target, log path): how a detached run leaves this process

    def on_signal(self, signum, _frame):
        self.signalled = signum

    def serve(self, loads=False):
        """Answers one request; returns the process exit status (0 when the result is ok).
        ``loads``: the request will load a module, so the loader (ctypes, libc) is made
        ready before it is read, while a spare agent waits for it."""
        self.out.json(FRAME_HELLO, {"protocol": PROTOCOL_VERSION, "agent": AGENT_VERSION,
                                    "python": "%d.%d.%d" % tuple(sys.version_info[:3]),
                                    "pid": os.getpid(),
                                    "host": where_it_runs(self.kernel, self.path)})
        request = {}
        try:
            if loads:
                self.kernel.libc()
            request = self.read_request()
            result = self.handle(request)
        except Failure as e:
            result = self.result(e.kind, e.message)
        except Exception:
            log(error_trace())
            result = self.result("agent-error", error_trace())
        if self.run is not None and self.run.unload_problem:
            result["status"] = "failed"
            result["kind"] = result["kind"] or "agent-error"
            result["message"] = "%s; %s" % (result["message"], self.run.unload_problem)
        for path in request.get("remove_files") or ():
            remove_file(path)
        if request.get("action") in ("run", "detach") and \
                isinstance(request.get("module"), str):
            remove_stale_files(os.path.dirname(os.path.abspath(request["module"])),
                               os.path.abspath(__file__))
        if request.get("action") == "detach" and isinstance(request.get("workdir"), str):
            remove_stale_runs(request["workdir"])
        self.out.json(FRAME_RESULT, result)
        self.out.close()
        return 0 if result["status"] == "ok" else 1

    def read_request(self):
        line = self.stdin.first_line(self.request_timeout)
        try:
            request = json_loads(line.decode("utf-8"))
        except ValueError as e:
            raise Failure("agent-error", "the request is not JSON: %s" % e) from None
        if not isinstance(request, dict):
            raise Failure("agent-error", "the request is not a JSON object")
        if "module_size" in request:
            size = request["module_size"]
            if not isinstance(size, int) or isinstance(size, bool) or \
                    not 0 < size <= MAX_MODULE:
                raise Failure("agent-error", "module_size must be 1 to %d bytes" % MAX_MODULE)
            self.module_image = receive_module(request, self.stdin.exactly(
                size, self.request_timeout))
        return request

    def result(self, kind, message, **extra):
        stats = self.run.stats if self.run is not None else new_stats()
        extra.update({"status": "failed" if kind else "ok", "kind": kind, "message": message,
                      "stats": dict(stats)})
        return extra

    def handle(self, request):
        if request.get("protocol") != PROTOCOL_VERSION:
            raise Failure("agent-error", "protocol %r requested; this agent speaks %d"
                          % (request.get("protocol"), PROTOCOL_VERSION))
        action = request.get("action")
        if action == "facts":
            return self.result(None, "facts collected", facts=collect_facts(self.kernel))
        if action == "preflight":
            facts = collect_facts(self.kernel)
            try:
                _image, name, _params = preflight(request, facts, self.module_image)
            except Failure as e:
                return self.result(e.kind, e.message, facts=facts)
            return self.result(None, "module %s can be loaded" % name, facts=facts)
        if action == "targets":  # the PIDs a run's target names, for one run per match
            pids, what = matching_pids(self.kernel, request.get("target"))
            return self.result(None, "%d process(es) %s" % (len(pids), what), pids=pids)
        if action == "run":
            self.run = Run(self, request, self.gap_wait)
            return self.run.execute()
        detached = {"detach": start_detached, "status": detached_status,
                    "collect": detached_collect, "tail": detached_tail, "stop": detached_stop}
        if action in detached:
            return detached[action](self, request)
        raise Failure("agent-error", "unknown action %r" % (action,))


def serve(kernel=None, stdin_fd=0, stdout_fd=1, loads=False, **options):
    """Runs the agent on the given descriptors; signals are caught only in the main thread."""
    agent = Agent(kernel, stdin_fd, stdout_fd, **options)
    previous = {}
    for signum in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
        try:
            previous[signum] = _signal.signal(signum, agent.on_signal)
        except ValueError:  # not the main thread: signals are left as they are
            break
    try:
        return agent.serve(loads)
    finally:
        for signum, handler in previous.items():
            _signal.signal(signum, handler)


def main():
    """argv (after the agent's path): `load` when the request will load a module."""
    return serve(loads=sys.argv[2:] == ["load"])


if __name__ == "__main__":
    sys.exit(main())
