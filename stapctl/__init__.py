"""stapctl: compile SystemTap probes once, run them on many hosts over SSH."""

import importlib
import importlib.util
import sys
import types
from typing import Any

__version__ = "0.1.0"


class _ImportedWhenUsed(types.ModuleType):
    """Stands in for a module until something asks it for an attribute: then the real
    module is imported and answers."""

    def __getattr__(self, attribute: str) -> Any:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attribute)


def _import_when_used(name: str) -> None:
    if name not in sys.modules and importlib.util.find_spec(name) is not None:
        sys.modules[name] = _ImportedWhenUsed(name)


# paramiko imports invoke, and with it asyncio and unittest.mock (a third of paramiko's
# import time, on every start), only to run an ssh_config `Match exec` command
_import_when_used("invoke")
