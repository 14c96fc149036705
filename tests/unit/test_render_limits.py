"""Templates cannot be used to exhaust the controller's memory or CPU.

Each attack is run under tracemalloc: it must be refused, quickly, at its line, having
allocated far less than what it asked for (the unbounded forms reach gigabytes).
"""

from __future__ import annotations

import time
import tracemalloc

import pytest

from stapctl.errors import ManifestError
from stapctl.models import Probe
from stapctl.render import MAX_SCRIPT_BYTES, render_script

pytestmark = pytest.mark.unit

PEAK_LIMIT = 100 * 2**20  # bytes; every attack below asks for at least 1 GB unbounded
BIG = "{% set big = 'a' * 1000000 %}"

ATTACKS = {
    "percent width": "{{ '%999999999s' % 1 }}",
    "percent precision": "{{ '%.999999999f' % 1.0 }}",
    "percent star width": "{{ '%*s' % (999999999, 1) }}",
    "percent on bytes": "{{ '%999999999s'.encode() % 1 }}",
    "format filter": "{{ '%999999999s'|format(1) }}",
    "center filter": "{{ 'a'|center(999999999) }}",
    "center method": "{{ 'a'.center(999999999) }}",
    "ljust": "{{ 'a'.ljust(999999999) }}",
    "rjust": "{{ 'a'.rjust(999999999) }}",
    "zfill": "{{ 'a'.zfill(999999999) }}",
    "expandtabs": "{{ ('\t' * 1000).expandtabs(999999) }}",
    "str.format width": "{{ '{:>999999999}'.format(1) }}",
    "str.format nested width": "{{ '{:{}}'.format(1, 999999999) }}",
    "str.format_map": "{{ '{0:>999999999}'.format_map({}) }}",
    "indent width": "{{ 'a'|indent(999999999, true) }}",
    "indent many lines": "{{ ('a\\n' * 500000)|indent(1000) }}",
    "wordwrap": "{{ ('a ' * 500000)|wordwrap(1, wrapstring='x' * 1000) }}",
    "join filter": BIG + "{{ [big, big, big]|join }}",
    "join separator": "{{ range(100000)|join('x' * 1000) }}",
    "join method": "{{ 'x'.join(['a' * 1000] * 2000) }}",
    "replace filter": "{{ ('a' * 1000000)|replace('a', 'bbbb') }}",
    "replace method": "{{ ('a' * 1000000).replace('', 'bbbb') }}",
    "translate": "{{ ('a' * 1000000).translate({97: 'b' * 1000}) }}",
    "batch fill": "{{ [1]|batch(999999999, 'x')|list }}",
    "lazy items kept": "{{ range(100000)|map('center', 100000)|list }}",
    "lazy items sorted": "{{ range(100000)|map('center', 100000)|sort }}",
    "repetition": "{{ 'a' * 10**9 }}",
    "list repetition": "{{ [1] * 10**8 }}",
    "repeated references": BIG + "{{ [big] * 1000 }}",
    "nested references": BIG + "{{ [[big]] * 1000 }}",
    "namespace references": BIG + "{% set ns = namespace(x=big) %}{{ [ns] * 1000 }}",
    "doubling with ~": "{% set ns = namespace(s='a') %}{% for i in range(40) %}"
                       "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "doubling with +": "{% set ns = namespace(s='a') %}{% for i in range(40) %}"
                       "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "squaring a number": "{% set ns = namespace(n=3) %}{% for i in range(40) %}"
                         "{% set ns.n = ns.n * ns.n %}{% endfor %}{{ ns.n > 1 }}",
    "power": "{{ 2 ** 100000000 }}",
    "appending in a loop": "{% set l = [] %}{% for i in range(100000) %}"
                           "{{ l.append('a' * 1000000) }}{% endfor %}",
    "writing in a loop": "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
    "text in a loop": "{% for i in range(100000) %}" + "x" * 100 + "{% endfor %}",
    "macro buffer": "{% macro m() %}{% for i in range(100000) %}{{ 'a' * 100000 }}"
                    "{% endfor %}{% endmacro %}{{ m()|length }}",
    "set block buffer": "{% set x %}{% for i in range(100000) %}" + "x" * 100
                        + "{% endfor %}{% endset %}{{ x|length }}",
    "recursive macro": "{% macro r(n) %}{% if n %}{{ r(n - 1) }}{{ r(n - 1) }}{% else %}"
                       "xxxxxxxx{% endif %}{% endmacro %}{{ r(40)|length }}",
    "lipsum": "{{ lipsum(1000000) }}",
}


def probe(template: str, first_line: int = 10) -> Probe:
    return Probe(name="p", template=template, origin="trace.yaml", first_line=first_line)


@pytest.mark.parametrize("template", list(ATTACKS.values()), ids=list(ATTACKS))
def test_hostile_templates_are_refused_at_their_line_in_bounded_memory(template: str) -> None:
    text = "probe begin {\n  " + template + "\n}\n"  # the attack is on the template's line 2
    tracemalloc.start()
    started = time.process_time()  # the work done: a busy machine does not stretch it
    try:
        with pytest.raises(ManifestError) as caught:
            render_script(probe(text), {})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.process_time() - started < 10
    assert peak < PEAK_LIMIT, f"peak {peak / 2**20:.0f} MiB"
    (issue,) = caught.value.issues
    assert (issue.file, issue.line) == ("trace.yaml", 11)


def test_the_cap_is_on_what_is_written_not_on_each_piece() -> None:
    exactly = "{% for i in range(1024) %}" + "x" * 1023 + "\n{% endfor %}"
    assert len(render_script(probe(exactly), {})) == MAX_SCRIPT_BYTES
    with pytest.raises(ManifestError, match="writes more than 1 MiB") as caught:
        render_script(probe(exactly + "!"), {})
    assert caught.value.issues[0].line == 10


def test_each_render_has_the_whole_budget() -> None:
    half = probe("{{ 'x' * 600000 }}")
    for _ in range(3):
        assert len(render_script(half, {})) == 600000


@pytest.mark.parametrize(("template", "expected"), [
    ("{{ 'ab' * 3 }} {{ 2 ** 10 }} {{ t * 2 }} {{ 1 + 2 }} {{ 'a' + 'b' }}",
     "ababab 1024 42 3 ab"),
    ("{{ '%5s|%-4d|%.2f|%%' % ('ab', 7, 1.5) }}", "   ab|7   |1.50|%"),
    ("{{ '%(a)s' % {'a': 1} }} {{ '%s-%s'|format(1, 2) }}", "1 1-2"),
    ("{{ '{:>4}|{}'.format(1, t) }} {{ '{x}'.format_map({'x': 2}) }}", "   1|21 2"),
    ("{{ 'a'|center(5) }}|{{ 'a'.ljust(3) }}|{{ 'a'.rjust(3) }}|{{ '7'.zfill(3) }}",
     "  a  |a  |  a|007"),
    ("{{ ['a', 'b']|join(', ') }} {{ '-'.join(['a', 'b']) }} {{ range(3)|join }}",
     "a, b a-b 012"),
    ("{{ 'a\nb'|indent(2, true) }}|{{ 'aaa bbb'|wordwrap(3) }}", "  a\n  b|aaa\nbbb"),
    ("{{ 'aXa'|replace('a', 'bb') }} {{ 'aXa'.replace('a', 'b', 1) }} {{ 'abc'|reverse }}",
     "bbXbb bXa cba"),
    ("{{ [3, 1, 2]|sort|list }} {{ [1, 1, 2]|unique|list }} {{ [1, 2]|sum }}",
     "[1, 2, 3] [1, 2] 3"),
    ("{{ range(5)|batch(2, 0)|list }} {{ t ~ '!' ~ t }}", "[[0, 1], [2, 3], [4, 0]] 21!21"),
    ("{% macro m(x) %}<{{ x }}>{% endmacro %}{{ m(1) }}{% set b %}B{% endset %}{{ b }}",
     "<1>B"),
    ("{% set ns = namespace(n=0) %}{% for i in range(4) %}{% set ns.n = ns.n + i %}"
     "{% endfor %}{{ ns.n }}", "6"),
])
def test_ordinary_templates_still_work(template: str, expected: str) -> None:
    assert render_script(probe(template), {"t": 21}) == expected
