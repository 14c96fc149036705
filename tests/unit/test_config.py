"""The controller's settings: file, environment, and the engine's secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from stapctl.config import Config, config_path, load_config
from stapctl.errors import ManifestError


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config.yaml"
    monkeypatch.setenv("STAPCTL_CONFIG", str(path))
    return path


def test_no_file_means_the_defaults() -> None:
    assert not config_path().exists()
    assert load_config() == Config()


def test_the_file_sets_and_the_environment_overrides(config_file: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    config_file.write_text("history: postgresql://db/stapctl\nengine: celery+redis://a:1/0\n"
                           "secret_file: secret\n")
    monkeypatch.setenv("STAPCTL_ENGINE", "celery+redis://b:2/0")
    config = load_config()
    assert config.history == "postgresql://db/stapctl"
    assert config.engine == "celery+redis://b:2/0"
    assert config.secret_file == config_file.parent / "secret"


def test_unknown_and_mistyped_settings_are_reported_at_their_lines(config_file: Path) -> None:
    config_file.write_text("history: x\nengin: celery+redis://a:1/0\nsecret_file: [a]\n")
    with pytest.raises(ManifestError) as raised:
        load_config()
    lines = [(issue.line, issue.path) for issue in raised.value.issues]
    assert lines == [(2, "engin"), (3, "secret_file")]
    assert "unknown setting" in str(raised.value)


def test_a_named_file_that_is_missing_is_an_error(config_file: Path) -> None:
    with pytest.raises(ManifestError, match="file not found"):
        load_config()


def test_the_secret_must_be_private_and_not_empty(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"  s3cret\n")
    secret.chmod(0o644)
    config = Config(secret_file=secret)
    with pytest.raises(ManifestError, match="chmod 600"):
        config.secret()
    secret.chmod(0o600)
    assert config.secret() == b"s3cret"
    secret.write_bytes(b"\n")
    with pytest.raises(ManifestError, match="1 to 4096 bytes"):
        config.secret()
    with pytest.raises(ManifestError, match="needs a shared secret"):
        Config().secret()
