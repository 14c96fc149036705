"""Templates cannot be used to exhaust the controller's memory or CPU."""

from __future__ import annotations

import time

import pytest

from stapctl.errors import ManifestError
from stapctl.models import Probe
from stapctl.render import render_script

pytestmark = pytest.mark.unit


def probe(template: str) -> Probe:
    return Probe(name="p", template=template, origin="trace.yaml", first_line=10)


@pytest.mark.parametrize("template", [
    "{{ 'a' * 10**9 }}",
    "{{ 10 * 'a' * 10**6 }}",
    "{{ [1] * 10**8 }}",
    "{{ 2 ** 100000000 }}",
    "{% for i in range(90000) %}{{ 'x' * 100 }}{% endfor %}",
])
def test_hostile_templates_are_refused_quickly(template: str) -> None:
    started = time.monotonic()
    with pytest.raises(ManifestError) as caught:
        render_script(probe(template), {})
    assert time.monotonic() - started < 5
    assert str(caught.value).startswith("trace.yaml")


def test_ordinary_arithmetic_still_works() -> None:
    assert render_script(probe("{{ 'ab' * 3 }} {{ 2 ** 10 }} {{ t * 2 }}"), {"t": 21}) == \
        "ababab 1024 42"
