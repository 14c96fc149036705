"""Render probe scripts from their jinja2 templates.

Templates run in jinja2's sandbox (a manifest is data, not code to trust) with strict
undefined variables, so a typo fails loudly instead of compiling an empty threshold into
a probe. Every template problem becomes a ManifestError pointing at the user's own file
and line: the template's line plus where the script starts in that file.
"""

from __future__ import annotations

import functools
import re
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

import jinja2
import yaml
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from stapctl.errors import Issue, ManifestError
from stapctl.models import Probe

MAX_SCRIPT_BYTES = 1 << 20  # a rendered script larger than this is refused


class _BoundedEnvironment(SandboxedEnvironment):
    """jinja2's sandbox, plus caps on what `*` and `**` can build, so that a manifest
    cannot exhaust the controller's memory (`{{ 'a' * 10**9 }}`)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > 256:
            raise SecurityError(f"exponent {right} is too large for a template")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int) \
                        and len(seq) * times > MAX_SCRIPT_BYTES:
                    raise SecurityError("repetition would build more than 1 MiB")
        return super().call_binop(context, operator, left, right)


_ENVIRONMENT = _BoundedEnvironment(
    undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
)
_TEMPLATE_FILENAME = "<template>"  # what jinja2 names a template compiled from a string
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UNDEFINED_NAME = re.compile(r"^'([A-Za-z_][A-Za-z0-9_]*)' is undefined$")

# What a template can raise while it runs: jinja2's own errors and the Python errors of
# the expressions it evaluates (1/0, a missing key, a bad filter argument).
_TEMPLATE_RUNTIME_ERRORS = (
    jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError, AttributeError,
)


def check_template(probe: Probe) -> None:
    """Raise ManifestError if the probe's template does not parse (no variables needed)."""
    _compile(probe)


def render_script(probe: Probe, variables: Mapping[str, Any]) -> str:
    """The probe's script with ``variables`` filled in; ManifestError on any template error."""
    template = _compile(probe)
    try:
        script = template.render(variables)
    except _TEMPLATE_RUNTIME_ERRORS as error:
        raise ManifestError(_issue(probe, _failing_line(error), _explain(error))) from error
    if len(script) > MAX_SCRIPT_BYTES:
        raise ManifestError(_issue(probe, None, "the rendered script is larger than 1 MiB"))
    return script


def parse_extra_vars(items: Iterable[str]) -> dict[str, Any]:
    """``-e KEY=VALUE`` arguments as variables; each value is read as a YAML scalar
    (``5`` → 5, ``true`` → True, ``abc`` → 'abc'); anything else is kept as the text given."""
    variables: dict[str, Any] = {}
    issues: list[Issue] = []
    for item in items:
        name, equals, text = item.partition("=")
        name = name.strip()
        if item.startswith("@"):
            issues.append(Issue("-e", None, None, item, "variables from a file (-e @FILE) are "
                                "not supported: give each one as -e KEY=VALUE"))
        elif not equals or not _IDENTIFIER.fullmatch(name):
            issues.append(Issue("-e", None, None, item, "expected KEY=VALUE, with KEY made of "
                                "letters, digits and '_', not starting with a digit"))
        else:
            variables[name] = _yaml_scalar(text)
    if issues:
        raise ManifestError(issues)
    return variables


def _yaml_scalar(text: str) -> Any:
    if not text.strip():
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if value is None or isinstance(value, str | int | float | bool) else text


@functools.lru_cache(maxsize=256)
def _template(source: str) -> jinja2.Template:
    """Compiled once per template text: planning renders each probe for every host."""
    return _ENVIRONMENT.from_string(source)


def _compile(probe: Probe) -> jinja2.Template:
    try:
        return _template(probe.template)
    except jinja2.TemplateSyntaxError as error:
        message = f"template syntax error: {error.message}"
        raise ManifestError(_issue(probe, error.lineno, message)) from error


def _failing_line(error: BaseException) -> int | None:
    """The template line that raised: jinja2 rewrites the traceback so the template's
    frames carry template line numbers."""
    line = None
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        if frame.f_code.co_filename == _TEMPLATE_FILENAME:
            line = lineno
    return line


def _explain(error: BaseException) -> str:
    if isinstance(error, jinja2.UndefinedError):
        match = _UNDEFINED_NAME.match(str(error.message))
        if match:
            name = match.group(1)
            return (f"undefined variable '{name}': define it under vars, in the inventory, "
                    f"or with -e {name}=VALUE")
        return f"undefined value: {error.message}"
    if isinstance(error, jinja2.exceptions.SecurityError):
        return f"not allowed in a template: {error}"
    if isinstance(error, jinja2.TemplateError):
        return f"template error: {error.message}"
    return f"template error: {type(error).__name__}: {error}"


def _issue(probe: Probe, template_line: int | None, message: str) -> Issue:
    line = None if template_line is None else probe.first_line + template_line - 1
    return Issue(probe.origin, line, None, f"probe {probe.name}", message)
