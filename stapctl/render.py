"""Render probe scripts from their jinja2 templates.

Templates run in jinja2's sandbox (a manifest is data, not code to trust) with strict
undefined variables, so a typo fails loudly instead of compiling an empty threshold into
a probe. Every template problem becomes a ManifestError pointing at the user's own file
and line: the template's line plus where the script starts in that file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from stapctl.errors import Issue, ManifestError
from stapctl.models import Probe
from stapctl.yamldoc import UnreadableFile, parse_yaml, read_text

MAX_SCRIPT_BYTES = 1 << 20  # the most text a template may write, or build in one value
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TEMPLATE_MARKS = ("{{", "{%", "{#")


def is_plain(template: str) -> bool:
    """A template jinja2 would render as itself: no template syntax, no carriage return
    (jinja2 turns them into newlines), within the size a render may write."""
    return (len(template) <= MAX_SCRIPT_BYTES and "\r" not in template
            and not any(mark in template for mark in _TEMPLATE_MARKS))


def check_template(probe: Probe) -> None:
    """Raise ManifestError if the probe's template does not parse (no variables needed)."""
    if not is_plain(probe.template):
        from stapctl import sandbox  # jinja2 only for templates that use it

        sandbox.check(probe)


def render_script(probe: Probe, variables: Mapping[str, Any]) -> str:
    """The probe's script with ``variables`` filled in; ManifestError on any template error."""
    if is_plain(probe.template):
        return probe.template
    from stapctl import sandbox  # jinja2 only for templates that use it

    return sandbox.render(probe, variables)


def parse_extra_vars(items: Iterable[str]) -> dict[str, Any]:
    """``-e KEY=VALUE`` and ``-e @FILE`` arguments as variables, later ones winning, as
    in Ansible. A value is read as a YAML scalar (``5`` → 5, ``true`` → True, ``abc`` →
    'abc'), anything else is kept as the text given; a file is a YAML mapping."""
    variables: dict[str, Any] = {}
    issues: list[Issue] = []
    for item in items:
        name, equals, text = item.partition("=")
        name = name.strip()
        if item.startswith("@"):
            variables.update(_variables_file(Path(item[1:]), issues))
        elif not equals or not _IDENTIFIER.fullmatch(name):
            issues.append(Issue("-e", None, None, item, "expected KEY=VALUE, with KEY made of "
                                "letters, digits and '_', not starting with a digit"))
        else:
            variables[name] = _yaml_scalar(text)
    if issues:
        raise ManifestError(issues)
    return variables


def _variables_file(path: Path, issues: list[Issue]) -> dict[str, Any]:
    """The variables of ``-e @FILE``; its problems go to ``issues`` with file and line."""
    try:
        doc = parse_yaml(read_text(path), str(path))
    except UnreadableFile as error:
        issues.append(Issue(str(path), error.line, None, "", f"-e @{path}: {error}"))
        return {}
    issues.extend(doc.issues)
    if doc.data is None or doc.issues:
        return {}
    if not isinstance(doc.data, dict):
        issues.append(Issue(str(path), 1, 1, "", "-e @FILE takes a YAML mapping of "
                            "NAME: VALUE"))
        return {}
    for name in doc.data:
        if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
            line, column = doc.position((name,), of_key=True) or (None, None)
            issues.append(Issue(str(path), line, column, str(name), "a variable name is "
                                "made of letters, digits and '_', not starting with a digit"))
    return dict(doc.data)


def _yaml_scalar(text: str) -> Any:
    if not text.strip():
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if value is None or isinstance(value, str | int | float | bool) else text
