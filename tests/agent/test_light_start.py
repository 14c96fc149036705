"""The agent's start stays light: what it imports, and the stdlib halves (json's, signal's)
and name checks that stand in for the modules it no longer imports."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from stapctl.runtime import stapctl_agent as agent

pytestmark = pytest.mark.agent

# modules that bring in enum, functools and collections, or are large themselves: a run
# that needs one imports it where it is used, a facts request needs none
HEAVY = ("re", "json", "enum", "functools", "collections", "threading", "contextlib",
         "signal", "hashlib", "ctypes", "subprocess", "traceback")

SERVE_AND_LIST = """import sys
sys.path.insert(0, sys.argv[1])
import stapctl_agent
status = stapctl_agent.serve()
heavy = sorted(m for m in sys.argv[2].split() if m in sys.modules)
sys.stderr.write("heavy: %s\\n" % " ".join(heavy))
sys.exit(status)
"""


def test_a_facts_request_imports_nothing_heavy() -> None:
    """The agent run as the controller runs it (-I -S), answering a real facts request
    on this machine's kernel."""
    request = json.dumps({"protocol": agent.PROTOCOL_VERSION, "action": "facts"}) + "\n"
    done = subprocess.run([sys.executable, "-I", "-S", "-c", SERVE_AND_LIST,
                           str(Path(agent.__file__).parent), " ".join(HEAVY)],
                          input=request.encode(), capture_output=True, timeout=60, check=False)
    frames = agent.FrameReader().feed(done.stdout)
    result = json.loads(frames[-1][1])
    assert frames[-1][0] == agent.FRAME_RESULT and result["status"] == "ok", done.stderr
    assert result["facts"]["release"]
    assert b"heavy: \n" in done.stderr, done.stderr.decode()


SAMPLES = [
    None, True, False, 0, -7, 2 ** 70, 0.1, -2.5e-300, 1e300, "", "plain", "é ünï €😀",
    "quote \" backslash \\ control \x00\x1f\n\t", [], {}, [1, [2, [3, {}]]],
    {"b": 1, "a": {"z": None, "y": [True, "x"]}, "": 0}, (1, "tuple"),
]


@pytest.mark.parametrize("value", SAMPLES)
def test_json_dumps_writes_what_json_writes(value: object) -> None:
    assert agent.json_dumps(value) == json.dumps(value, sort_keys=True)
    assert agent.json_loads(agent.json_dumps(value)) == json.loads(json.dumps(value))


def test_json_dumps_writes_keys_as_json_does() -> None:
    mixed = {1: "a", 2: "b"}
    assert agent.json_dumps(mixed) == json.dumps(mixed, sort_keys=True)
    assert agent.json_dumps({True: 1}) == json.dumps({True: 1}, sort_keys=True)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), object(),
                                   {"k": {1, 2}}])
def test_json_dumps_refuses_what_is_not_json(value: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        agent.json_dumps(value)


@pytest.mark.parametrize("text", [
    ' {"op": "stop"} ', '\t[1, 2]\r\n', "3", '"s"', "null", '{"a": {"b": [1.5, -0.0]}}',
])
def test_json_loads_reads_what_json_reads(text: str) -> None:
    assert agent.json_loads(text) == json.loads(text)


@pytest.mark.parametrize("text", [
    "", "   ", "{", "[1,]", '{"a": 1} trailing', "1 2", "NaN", "[Infinity]", '{"a": -Infinity}',
    '"unterminated', "{'single': 1}", "\ufeff{}",
])
def test_json_loads_refuses_what_is_not_one_json_value(text: str) -> None:
    with pytest.raises(ValueError):
        agent.json_loads(text)


# The patterns the name checks replace: on any ASCII name, the same answer.
OLD_PATTERNS = {
    "param": (agent.is_param_name, r"[A-Za-z_][A-Za-z0-9_]*"),
    "run": (agent.is_run_name, r"[A-Za-z0-9_][A-Za-z0-9_.~-]{0,199}"),
    "uploaded": (agent.is_uploaded, r"(?:[0-9a-f]{64}\.ko|agent-[0-9a-f]+\.py)"),
}
NAMES = [
    "", "a", "_", "9", "a9", "9a", "a-b", "a.b", "~a", ".a", "-a", "a~", "A_Z", "a b", "é",
    "x" * 200, "x" * 201, "a" * 64 + ".ko", "f" * 64 + ".ko", "F" * 64 + ".ko",
    "0" * 63 + ".ko", "0" * 65 + ".ko", "agent-abc.py", "agent-.py", "agent-abg.py",
    "agent-abc.pyc", "agent-abc.py.part", "x.ko", "run.1", "out.12",
]


@pytest.mark.parametrize("check", sorted(OLD_PATTERNS))
def test_name_checks_answer_as_the_patterns_they_replace(check: str) -> None:
    function, pattern = OLD_PATTERNS[check]
    for name in NAMES:
        assert function(name) == bool(re.fullmatch(pattern, name)), name


@pytest.mark.parametrize("name", [
    "agent-0123abcd.cpython-311.pyc", "agent-ab.cpython-36.opt-1.pyc", "agent-ab.x.pyc",
    "agent-ab.pyc", "agent-ab..pyc", "agent-AB.cpython-311.pyc", "agent-.x.pyc",
    "agent-ab.x y.pyc", "other-ab.x.pyc", "agent-ab.x.py",
])
def test_bytecode_agent_answers_as_the_pattern_it_replaces(name: str) -> None:
    match = re.fullmatch(r"(agent-[0-9a-f]+)\.[A-Za-z0-9_.-]+\.pyc", name)
    assert agent.bytecode_agent(name) == (match.group(1) if match else None)


@pytest.mark.parametrize("text, mode", [
    ("none [integrity] confidentiality\n", "integrity"), ("[none] integrity", "none"),
    ("none integrity", None), ("a[b c] [d]", "d"), ("[]", None), ("", None), ("[x", None),
])
def test_the_lockdown_mode_is_the_first_bracketed_word(text: str, mode: str | None) -> None:
    assert agent.bracketed_word(text) == mode


@pytest.mark.parametrize("text, kb", [
    ("MemTotal: 100 kB\nMemAvailable:    523456 kB\n", 523456), ("MemAvailable: x kB", None),
    ("MemFree: 5 kB\n", None), ("", None), ("MemAvailable:", None),
])
def test_mem_available_is_read_from_meminfo(text: str, kb: int | None) -> None:
    assert agent.mem_available_kb(text) == kb
