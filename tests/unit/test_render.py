"""Rendering probe templates and reading -e variables."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stapctl import sandbox
from stapctl.errors import ManifestError
from stapctl.models import Probe
from stapctl.render import check_template, is_plain, parse_extra_vars, render_script

pytestmark = pytest.mark.unit


def probe(template: str, first_line: int = 10) -> Probe:
    return Probe(name="p", template=template, origin="trace.yaml", first_line=first_line)


def test_variables_are_filled_in_and_the_last_newline_kept() -> None:
    text = "probe timer.s({{ every }}) {\n{% for n in names %}  print(\"{{ n }}\")\n{% endfor %}}\n"
    assert render_script(probe(text), {"every": 5, "names": ["a", "b"]}) == (
        'probe timer.s(5) {\n  print("a")\n  print("b")\n}\n')


def test_an_undefined_variable_points_at_its_line_in_the_users_file() -> None:
    with pytest.raises(ManifestError) as caught:
        render_script(probe("probe begin {\n\n  if (x > {{ limt }}) exit()\n}\n"), {"limit": 1})
    (issue,) = caught.value.issues
    assert (issue.file, issue.line) == ("trace.yaml", 12)
    assert "undefined variable 'limt'" in issue.message


def test_a_missing_attribute_is_an_error_not_an_empty_string() -> None:
    with pytest.raises(ManifestError, match="has no attribute 'port'"):
        render_script(probe("{{ host.port }}"), {"host": {}})


def test_a_syntax_error_points_at_its_line() -> None:
    with pytest.raises(ManifestError) as caught:
        check_template(probe("probe begin {\n  {{ x + }}\n}\n", first_line=1))
    (issue,) = caught.value.issues
    assert issue.line == 2 and "template syntax error" in issue.message


def test_errors_raised_by_expressions_are_bad_input() -> None:
    with pytest.raises(ManifestError, match="ZeroDivisionError"):
        render_script(probe("{{ 1 // n }}"), {"n": 0})


def test_the_sandbox_refuses_python_internals() -> None:
    with pytest.raises(ManifestError, match="not allowed in a template"):
        render_script(probe("{{ x.__class__.__subclasses__() }}"), {"x": 1})


@pytest.mark.parametrize(("item", "name", "value"), [
    ("n=5", "n", 5), ("flag=true", "flag", True), ("ratio=0.5", "ratio", 0.5),
    ("who=alice", "who", "alice"), ("empty=", "empty", ""), ("eq=a=b", "eq", "a=b"),
    ("list=[1, 2]", "list", "[1, 2]"), ("nothing=null", "nothing", None),
    ("quoted='5'", "quoted", "5"), ("day=2024-01-01", "day", "2024-01-01"),
])
def test_extra_vars(item: str, name: str, value: Any) -> None:
    assert parse_extra_vars([item]) == {name: value}


def test_later_extra_vars_win() -> None:
    assert parse_extra_vars(["a=1", "a=2"]) == {"a": 2}


def test_every_bad_extra_var_is_reported() -> None:
    with pytest.raises(ManifestError) as caught:
        parse_extra_vars(["novalue", "1x=2", "@no-such-vars.yaml", "ok=1", "=3"])
    assert [(issue.file, issue.path) for issue in caught.value.issues] == [
        ("-e", "novalue"), ("-e", "1x=2"), ("no-such-vars.yaml", ""), ("-e", "=3")]
    assert caught.value.exit_code == 2


@given(st.text(alphabet=st.sampled_from(list("{}#%\r\n \t$ab\u2028é")), max_size=40))
def test_a_plain_script_is_rendered_as_jinja2_would_without_it(text: str) -> None:
    """The fast path for scripts without template syntax (no jinja2 import) gives exactly
    what the sandbox gives them."""
    if is_plain(text):
        assert render_script(probe(text), {}) == sandbox.render(probe(text), {}) == text
