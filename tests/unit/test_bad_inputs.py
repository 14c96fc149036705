"""The bad-input corpus: every file under bad/ must be refused as bad input (exit 2) with
a message containing its ``# expect:`` fragment, located at a file and line.

Files named ``inventory-*`` are inventories read on their own; every other file is a
manifest taken through what ``stapctl validate`` does: load it, load its inventory,
select its hosts and render every probe for every host.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stapctl.errors import ManifestError
from stapctl.inventory import load_inventory
from stapctl.manifest import load_manifest
from stapctl.session import Session, select_hosts
from stapctl.yamldoc import MAX_FILE_BYTES, MAX_VALUES, Document

pytestmark = pytest.mark.unit

BAD = Path(__file__).parent / "bad"
CASES = sorted(path for path in BAD.iterdir() if path.is_file())


def validate(path: Path) -> None:
    """Everything `stapctl validate` checks, through the session, without touching a host."""
    if path.name.startswith("inventory-"):
        load_inventory(path, origin=Document(str(path), None)).select("all")
        return
    manifest = load_manifest(path)
    hosts = select_hosts(manifest) if manifest.inventory is not None else []
    Session(manifest, hosts, record=False).validate()


def expected_fragment(path: Path) -> str:
    first_line = path.read_bytes().split(b"\n", 1)[0].decode("utf-8")
    assert first_line.startswith("# expect: "), f"{path.name} needs a '# expect:' first line"
    return first_line.removeprefix("# expect: ")


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("path", CASES, ids=[path.name for path in CASES])
def test_bad_input_is_refused_with_its_location(path: Path) -> None:
    fragment = expected_fragment(path)
    with pytest.raises(ManifestError) as caught:
        validate(path)
    error = caught.value
    assert error.exit_code == 2
    matching = [issue for issue in error.issues if fragment in issue.message]
    assert matching, f"expected {fragment!r} in:\n{error}"
    issue = matching[0]
    assert issue.line is not None, f"no line in: {issue}"
    assert Path(issue.file).is_file(), f"not a file: {issue.file}"
    assert f"{issue.file}:{issue.line}" in str(issue)


def test_a_huge_manifest_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text("apiVersion: stapctl/v1\n" + "# padding\n" * (MAX_FILE_BYTES // 10 + 1))
    with pytest.raises(ManifestError, match="larger than 1024 KiB") as caught:
        load_manifest(path)
    assert caught.value.issues[0].file == str(path)


def test_too_many_values_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "many.yaml"
    path.write_text("vars:\n  many: [" + "1," * MAX_VALUES + "1]\n")
    with pytest.raises(ManifestError, match=f"more than {MAX_VALUES} YAML values"):
        load_manifest(path)


def test_a_missing_manifest_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="file not found") as caught:
        load_manifest(tmp_path / "nope.yaml")
    assert caught.value.issues[0].file == str(tmp_path / "nope.yaml")


def test_a_missing_inventory_file_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="inventory: file not found"):
        load_inventory(tmp_path / "hosts.ini", origin=Document("trace.yaml", None))


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = (BAD / "unknown-top-key.yaml").read_text()
    path = tmp_path / "several-problems.yaml"
    path.write_text(text.replace("name: bad", "name: Bad") + "become: 1\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    messages = "\n".join(issue.message for issue in caught.value.issues)
    assert "did you mean 'probes'" in messages
    assert "lowercase letters" in messages
    assert "expected true or false" in messages
