"""A test double for the kernel side of a SystemTap run, and a harness to drive the agent.

FakeKernel replaces the agent's Kernel: init_module/delete_module are bookkeeping, /proc
and /sys are a temporary tree, and each loaded module is a FakeModule thread that plays
the module's side of the control channel on a SOCK_SEQPACKET socketpair (one message per
read and per write, like /proc/systemtap/<name>/.cmd) and writes relay records into one
pipe per CPU (the trace<N> files). Scenarios are lists of actions the module performs.
"""

import errno
import hashlib
import json
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypedDict, overload

from stapctl.runtime import stapctl_agent as agent

RELEASE = "6.1.0-test-amd64"
ADDRESSES = {"_stext": 0xFFFFFFFF81000000, "kallsyms_lookup_name": 0xFFFFFFFF81123450,
             "kallsyms_on_each_symbol": 0xFFFFFFFF81123000,
             "module_kallsyms_on_each_symbol": 0xFFFFFFFF81124000}

Action = tuple[Any, ...]  # one step of a Scenario: ("print", cpu, bytes), ("sleep", 0.1), ...


class Actions(TypedDict, total=False):
    """A Scenario's lists of actions, kept to be given as ``Scenario(**actions)``."""

    begin: list[Action]
    running: list[Action]
    end: list[Action]


def make_ko(name: str, vermagic: str = RELEASE + " SMP preempt mod_unload modversions ",
            signed: bool = False) -> bytes:
    """A minimal ELF64 relocatable with the sections the agent reads."""
    modinfo = f"license=GPL\0name={name}\0vermagic={vermagic}\0".encode()
    this_module = bytes(24) + name.encode().ljust(56, b"\0") + bytes(944)
    shstrtab = b"\0.modinfo\0.gnu.linkonce.this_module\0.shstrtab\0"
    body = bytearray(64)
    offsets = []
    for data in (modinfo, this_module, shstrtab):
        offsets.append(len(body))
        body += data
    while len(body) % 8:
        body += b"\0"
    shoff = len(body)
    section = struct.Struct("<IIQQQQIIQQ")
    body += bytes(section.size)
    for name_at, stype, offset, data in ((1, 1, offsets[0], modinfo),
                                         (10, 1, offsets[1], this_module),
                                         (36, 3, offsets[2], shstrtab)):
        body += section.pack(name_at, stype, 0, 0, offset, len(data), 0, 0, 1, 0)
    struct.pack_into("<16sHHIQQQIHHHHHH", body, 0, b"\x7fELF\x02\x01\x01", 1, 62, 1, 0, 0,
                     shoff, 0, 64, 0, 0, section.size, 4, 3)
    if signed:
        body += b"\0" * 16 + agent.SIGNATURE_MARK
    return bytes(body)


def embedded_name(image: bytes) -> str:
    offset, _size = agent.elf_sections(image)[".gnu.linkonce.this_module"]
    return image[offset + 24:offset + 80].split(b"\0")[0].decode()


class Scenario:
    """What the fake module does. Actions are tuples:

    ("print", cpu, bytes)    one relay record with the next sequence number
    ("skip_seq",)            a sequence number whose record never arrives
    ("raw", cpu, bytes)      bytes written into a relay file as they are
    ("oob", text)            OOB_DATA (text starts with "WARNING: " or "ERROR: ")
    ("system", command)      SYSTEM
    ("ctl", bytes)           a raw control message (garbage, short, unknown type)
    ("request_exit",)        REQUEST_EXIT, as the script's exit() does
    ("sleep", seconds)
    """

    def __init__(self, generation: int = 5, cpus: int = 2, begin: Iterable[Action] = (),
                 running: Iterable[Action] = (), end: Iterable[Action] = (), start_res: int = 0,
                 answer_exit: bool = True, ebusy_opens: int = 0, busy_unloads: int = 0,
                 load_errno: int | None = None) -> None:
        self.generation = generation
        self.cpus = cpus
        self.begin = list(begin)  # before START's reply, as begin probes
        self.running = list(running)  # after START's reply, from another thread
        self.end = list(end)  # inside EXIT, as end probes
        self.start_res = start_res
        self.answer_exit = answer_exit
        self.ebusy_opens = ebusy_opens
        self.busy_unloads = busy_unloads
        self.load_errno = load_errno


class FakeModule:
    """One loaded module: its control channel, its relay files and the thread behind them."""

    def __init__(self, name: str, scenario: Scenario) -> None:
        self.name = name
        self.scenario = scenario
        self.generation = scenario.generation
        # (name, payload) of every message the agent wrote
        self.received: list[tuple[str, bytes]] = []
        self.seq = 0
        self.cmd_handed = False  # the agent holds .cmd (a module reference)
        self.relays_handed = False
        self.agent_end, self.module_end = socket.socketpair(socket.AF_UNIX,
                                                            socket.SOCK_SEQPACKET)
        self.relays = [os.pipe() for _ in range(scenario.cpus)]
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.send("TRANSPORT")  # queued at module init, as _stp_transport_init does
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def send(self, name: str, payload: bytes = b"") -> None:
        self.module_end.send(agent.encode_message(self.generation, name, payload))

    def record(self, cpu: int, data: bytes, seq: int | None = None) -> None:
        with self.lock:
            if seq is None:
                self.seq += 1
                seq = self.seq
        magic = agent.TRACE_MAGIC if self.generation >= 5 else b""
        os.write(self.relays[cpu][1], magic + struct.pack("=II", seq, len(data)) + data)

    def perform(self, actions: Iterable[Action]) -> None:
        for action in actions:
            what = action[0]
            if what == "print":
                self.record(action[1], action[2])
            elif what == "skip_seq":
                with self.lock:
                    self.seq += 1
            elif what == "raw":
                os.write(self.relays[action[1]][1], action[2])
            elif what == "oob":
                self.send("OOB_DATA", action[1].encode() + b"\0")
            elif what == "system":
                self.send("SYSTEM", action[1].encode() + b"\0")
            elif what == "ctl":
                self.module_end.send(action[1])
            elif what == "request_exit":
                self.send("REQUEST_EXIT")
            elif what == "sleep":
                time.sleep(action[1])
            else:
                raise ValueError(action)

    def serve(self) -> None:
        """The kernel side of .cmd: handle each message the agent writes."""
        self.module_end.settimeout(0.05)
        while not self.stopped.is_set():
            try:
                data = self.module_end.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:  # the agent closed .cmd
                self.stopped.wait()
                return
            name, payload = agent.decode_message(data, self.generation)
            self.received.append((name, payload))
            if name == "START":
                self.perform(self.scenario.begin)
                if self.scenario.start_res:
                    self.send("START", agent.pack_start(0, self.scenario.start_res))
                else:
                    self.send("START", agent.pack_start(0, 0))
                    threading.Thread(target=self.perform, args=(self.scenario.running,),
                                     daemon=True).start()
            elif name == "EXIT" and self.scenario.answer_exit:
                self.perform(self.scenario.end)
                self.send("EXIT")

    def agent_attached(self) -> bool:
        """Whether the agent still holds .cmd or a relay file open (a module reference)."""
        fds = [self.module_end.fileno()] if self.cmd_handed else []
        if self.relays_handed:
            fds += [write for _read, write in self.relays]
        poller = select.poll()
        for fd in fds:
            poller.register(fd, 0)  # a closed peer shows as POLLHUP or POLLERR
        hung_up = [fd for fd, events in poller.poll(0)
                   if events & (select.POLLHUP | select.POLLERR)]
        return len(hung_up) < len(fds)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(2)
        self.module_end.close()
        if not self.cmd_handed:
            self.agent_end.close()
        for read, write in self.relays:
            os.close(write)
            if not self.relays_handed:
                os.close(read)


class FakeKernel(agent.Kernel):
    """The agent's Kernel with a temporary /proc and /sys and fake modules."""

    def __init__(self, root: str | os.PathLike[str], scenario: Scenario | None = None,
                 euid: int = 0, lockdown: str = "none", modules_disabled: int = 0,
                 sig_enforce: str = "N", kptr_restrict: int = 0) -> None:
        self.root = str(root)
        agent.Kernel.__init__(self, os.path.join(self.root, "proc"),
                              os.path.join(self.root, "sys"))
        self.scenario = scenario or Scenario()
        self._euid = euid
        self.modules: dict[str, FakeModule] = {}  # loaded: name -> FakeModule
        self.history: list[FakeModule] = []  # every FakeModule ever loaded
        self.loads: list[tuple[str, str]] = []  # (name, params) of every init_module call
        self.unload_calls = 0
        self.placements: list[set[int]] = []  # every CPU set the agent moved itself to
        files = {
            "proc/sys/kernel/modules_disabled": f"{modules_disabled}\n",
            "proc/sys/kernel/kptr_restrict": f"{kptr_restrict}\n",
            "proc/sys/crypto/fips_enabled": "0\n",
            "proc/meminfo": "MemTotal: 1000000 kB\nMemAvailable:     523456 kB\n",
            "proc/modules": "e1000 151552 0 - Live 0x0000000000000000\n"
                            "stap_old 1000 0 - Live 0x0000000000000000\n",
            "proc/kallsyms": "".join(f"{a:016x} T {s}\n" for s, a in ADDRESSES.items())
                             + "ffffffffc0000000 t e1000_probe\t[e1000]\n",
            "sys/module/module/parameters/sig_enforce": sig_enforce + "\n",
            "sys/kernel/security/lockdown": " ".join(
                f"[{mode}]" if mode == lockdown else mode
                for mode in ("none", "integrity", "confidentiality")) + "\n",
            "sys/module/e1000/sections/.text": "0xffffffffc0001000\n",
            "sys/module/e1000/sections/.init.text": "0xffffffffc0009000\n",
            "sys/kernel/notes": "",
        }
        for path, text in files.items():
            path = os.path.join(self.root, path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)

    def uname(self) -> tuple[str, str]:
        return RELEASE, "x86_64"

    def euid(self) -> int:
        return self._euid

    def load(self, image: bytes | bytearray, params: str) -> None:
        name = embedded_name(bytes(image))
        self.loads.append((name, params))
        if self.scenario.load_errno:
            raise OSError(self.scenario.load_errno, os.strerror(self.scenario.load_errno))
        if name in self.modules:
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
        module = FakeModule(name, self.scenario)
        self.modules[name] = module
        self.history.append(module)

    def unload(self, name: str) -> None:
        self.unload_calls += 1
        module = self.modules.get(name)
        if module is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        if self.scenario.busy_unloads > 0:
            self.scenario.busy_unloads -= 1
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        if module.agent_attached():
            raise OSError(errno.EAGAIN, "module in use: a descriptor is still open")
        module.close()
        del self.modules[name]

    def open_control(self, name: str) -> int:
        module = self.modules[name]
        if self.scenario.ebusy_opens > 0:
            self.scenario.ebusy_opens -= 1
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        if module.cmd_handed:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        module.cmd_handed = True
        fd = module.agent_end.detach()
        os.set_blocking(fd, False)
        return fd

    def open_relays(self, name: str) -> list[tuple[int, int]]:
        module = self.modules[name]
        module.relays_handed = True
        fds = [read for read, _write in module.relays]
        for fd in fds:
            os.set_blocking(fd, False)
        return list(enumerate(fds))

    def cpus(self) -> set[int]:
        return set(range(self.scenario.cpus))

    def run_on(self, cpus: Iterable[int]) -> bool:
        """Records where the agent asked to run (the test machine's CPUs are not used)."""
        self.placements.append(set(cpus))
        return True


def add_process(proc: str, pid: int, comm: str, cmdline: str, start_ticks: int) -> None:
    """A process in a fake /proc (the folder ``proc``), as its stat and cmdline show it."""
    folder = os.path.join(proc, str(pid))
    os.makedirs(folder)
    fields = ["S"] + ["0"] * 18 + [str(start_ticks)] + ["0"] * 10
    with open(os.path.join(folder, "stat"), "w") as f:
        f.write(f"{pid} ({comm}) {' '.join(fields)}\n")
    with open(os.path.join(folder, "cmdline"), "wb") as f:
        f.write(cmdline.replace(" ", "\0").encode() + b"\0")


class Outcome:
    """What the controller saw: frames in order, events, output bytes, the result."""

    def __init__(self, code: int, stream: bytes,
                 arrivals: Iterable[tuple[float, bytes]] = ()) -> None:
        self.code = code
        self.arrivals = list(arrivals)  # (time.monotonic(), bytes) as the reads returned them
        reader = agent.FrameReader()
        self.frames: list[tuple[str, bytes]] = [(ftype, payload)
                                                for ftype, payload in reader.feed(stream)]
        assert reader.pending == 0, "stream cut in the middle of a frame"
        self.types = [ftype for ftype, _ in self.frames]
        decoded = [(t, json.loads(p.decode())) for t, p in self.frames if t not in "OZ"]
        self.hello: dict[str, Any] = decoded[0][1]
        self.result: dict[str, Any] = decoded[-1][1]
        self.events: list[dict[str, Any]] = [obj for t, obj in decoded if t == agent.FRAME_EVENT]
        inflater = agent.OutputInflater()
        self.output = b"".join(b"".join(inflater.feed(p)) if t == agent.FRAME_ZOUTPUT else p
                               for t, p in self.frames if t in "OZ")

    def output_time(self, text: bytes) -> float | None:
        """When ``text`` had arrived in the output (a time.monotonic() value), or None."""
        reader, inflater, output = agent.FrameReader(), agent.OutputInflater(), b""
        for when, chunk in self.arrivals:
            for ftype, payload in reader.feed(chunk):
                if ftype == agent.FRAME_ZOUTPUT:
                    output += b"".join(inflater.feed(payload))
                elif ftype == agent.FRAME_OUTPUT:
                    output += payload
            if text in output:
                return when
        return None

    def event_names(self) -> list[str]:
        return [e["event"] for e in self.events]

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]


def module_file(tmp_path: Path, name: str = "stapctl_0123456789abcdef",
                **kwargs: Any) -> tuple[str, str, str]:
    image = make_ko(name, **kwargs)
    path = tmp_path / (name + ".ko")
    path.write_bytes(image)
    return str(path), hashlib.sha256(image).hexdigest(), name


def run_request(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """A run request for a fresh module file in tmp_path."""
    path, digest, name = module_file(tmp_path)
    request = {"protocol": 1, "action": "run", "module": path, "sha256": digest,
               "module_name": name, "params": {}, "bufsize_mb": 0, "duration": None,
               "exit_timeout": 2.0, "deadman": 30.0, "remove_files": [path]}
    request.update(overrides)
    return request


@overload
def drive(kernel: FakeKernel, request: dict[str, Any] | bytes,
          lines: Iterable[tuple[float, str]] = (), close_stdin_after: float | None = None,
          read_stdout: Literal[True] = True, gap_wait: float = 0.2) -> Outcome: ...


@overload
def drive(kernel: FakeKernel, request: dict[str, Any] | bytes,
          lines: Iterable[tuple[float, str]] = (), close_stdin_after: float | None = None,
          *, read_stdout: Literal[False], gap_wait: float = 0.2) -> int: ...


def drive(kernel: FakeKernel, request: dict[str, Any] | bytes,
          lines: Iterable[tuple[float, str]] = (), close_stdin_after: float | None = None,
          read_stdout: bool = True, gap_wait: float = 0.2) -> Outcome | int:
    """Runs the agent in this thread; another thread plays the controller.

    ``lines`` are (delay, JSON text) sent after the request; stdin is closed after
    ``close_stdin_after`` seconds (None: when the agent is done).
    """
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    chunks: list[tuple[float, bytes]] = []
    done = threading.Event()

    def controller() -> None:
        os.write(stdin_w, (json.dumps(request) + "\n").encode()
                 if isinstance(request, dict) else request)
        for delay, line in lines:
            time.sleep(delay)
            if done.is_set():
                break
            os.write(stdin_w, (line + "\n").encode())
        if close_stdin_after is not None:
            time.sleep(close_stdin_after)
            os.close(stdin_w)

    def reader() -> None:
        if not read_stdout:
            os.read(stdout_r, 65536)  # the HELLO, then the controller vanishes
            os.close(stdout_r)
            return
        while True:
            data = os.read(stdout_r, 65536)
            if not data:
                break
            chunks.append((time.monotonic(), data))

    threads = [threading.Thread(target=controller, daemon=True),
               threading.Thread(target=reader, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        code = agent.serve(kernel, stdin_r, stdout_w, gap_wait=gap_wait)
    finally:
        done.set()
        os.close(stdout_w)
        threads[1].join(5)
        os.close(stdin_r)
        if close_stdin_after is None:
            os.close(stdin_w)
        elif threads[0].is_alive():
            threads[0].join(5)
        if read_stdout:
            os.close(stdout_r)
    return Outcome(code, b"".join(c for _, c in chunks), chunks) if read_stdout else code
