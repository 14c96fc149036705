"""The rule a target's facts must pass before they become a path or an argument here.

Everything a target sends is hostile input. Its ``uname -r`` goes into ``stap -r``, into
``/lib/modules/RELEASE`` and into cache paths: a release of ``/x`` or ``../../x`` would
make stap run make in a directory the target chose, and ``-x`` would read as an option.
"""

from __future__ import annotations

import re

SAFE_FACT = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9._+-]{0,63}")
SAFE_FACT_RULE = "1 to 64 letters, digits, '.', '_', '+' or '-', not starting with '.' or '-'"
SHOWN_LIMIT = 80


def is_safe_fact(value: str) -> bool:
    """Whether ``value`` can be used as one path component or one argument as it is."""
    return SAFE_FACT.fullmatch(value) is not None


def shown(value: str) -> str:
    """A hostile value made safe to print: quoted, escaped to ASCII, and cut short."""
    text = ascii(value)
    return text if len(text) <= SHOWN_LIMIT else text[:SHOWN_LIMIT - 3] + "..."
