"""The suite works in folders of its own, and so do the CLI processes it starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stapctl.cache import cache_dir
from stapctl.lab import Lab
from stapctl.store import data_dir
from tests.conftest import STATE

pytestmark = pytest.mark.unit

CHILD = """
import json, os
from stapctl.build import cache_dir
from stapctl.lab import Lab
from stapctl.store import data_dir
print(json.dumps({"lab": str(Lab.default().directory), "cache": str(cache_dir()),
                  "data": str(data_dir()), "term": os.environ.get("TERM"),
                  "columns": os.environ.get("COLUMNS")}))
"""


def test_lab_and_module_cache_are_the_suites_and_persist_between_runs() -> None:
    assert Lab.default().directory == STATE / "lab"
    assert cache_dir() == STATE / "cache"


def test_run_records_go_to_a_temporary_folder_of_this_test(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    assert data_dir().is_relative_to(tmp_path_factory.getbasetemp())


def test_a_cli_child_inherits_the_folders_and_a_plain_terminal() -> None:
    child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                           check=True)
    seen = json.loads(child.stdout)
    assert seen == {"lab": str(STATE / "lab"), "cache": str(STATE / "cache"),
                    "data": str(data_dir()), "term": "dumb", "columns": None}
