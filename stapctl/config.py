"""The controller's settings that no manifest carries: where the run history lives, which
engine fans runs out, and the file holding the engine's shared secret.

They come from one small YAML file, ``$STAPCTL_CONFIG`` or ``config.yaml`` in stapctl's
user config folder, and each can be set for one process by an environment variable,
which wins over the file. No file means the defaults: the SQLite history in the data
folder, and runs fanned out by the controller itself.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from stapctl.errors import Issue, ManifestError
from stapctl.yamldoc import read_yaml

ENVIRONMENT = {  # key → the variable that overrides it
    "history": "STAPCTL_HISTORY",
    "engine": "STAPCTL_ENGINE",
    "secret_file": "STAPCTL_SECRET_FILE",
}
MAX_SECRET_BYTES = 4096


@dataclass(frozen=True)
class Config:
    history: str | None = None  # None: SQLite in the data folder; else a path or a URL
    engine: str | None = None  # None: this process fans out; else e.g. celery+redis://…
    secret_file: Path | None = None  # the engine's shared secret

    def secret(self) -> bytes:
        """The engine's shared secret, from a private file: anyone who can read it can
        have workers run modules as root on the fleet."""
        where = f"{ENVIRONMENT['secret_file']} or secret_file in {config_path()}"
        if self.secret_file is None:
            raise ManifestError(Issue(str(config_path()), None, None, "secret_file",
                                      f"an engine needs a shared secret: set {where}"))
        try:
            with self.secret_file.open("rb") as stream:
                mode = os.fstat(stream.fileno()).st_mode
                data = stream.read(MAX_SECRET_BYTES + 1).strip()
        except OSError as error:
            raise ManifestError(Issue(str(self.secret_file), None, None, "",
                                      f"cannot read the secret: {error.strerror}")) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            problem = "readable by others: `chmod 600` it"
        elif not data or len(data) > MAX_SECRET_BYTES:
            problem = f"must hold 1 to {MAX_SECRET_BYTES} bytes"
        else:
            return data
        raise ManifestError(Issue(str(self.secret_file), None, None, "",
                                  f"the engine's secret is {problem}"))


def config_path() -> Path:
    named = os.environ.get("STAPCTL_CONFIG")
    if named:
        return Path(named)
    return Path(platformdirs.user_config_dir("stapctl")) / "config.yaml"


def load_config() -> Config:
    """The settings in effect: the environment over the file over the defaults."""
    path = config_path()
    values = _read_file(path) if path.is_file() or "STAPCTL_CONFIG" in os.environ else {}
    if "secret_file" in values:  # the file's relative paths are relative to the file
        values["secret_file"] = str(path.parent / Path(values["secret_file"]).expanduser())
    for key, variable in ENVIRONMENT.items():
        if os.environ.get(variable):
            values[key] = os.environ[variable]
    secret_file = values.get("secret_file")
    return Config(history=values.get("history"), engine=values.get("engine"),
                  secret_file=Path(secret_file).expanduser() if secret_file else None)


def _read_file(path: Path) -> dict[str, str]:
    document = read_yaml(path)
    if document.data is None:
        return {}
    if not isinstance(document.data, dict):
        raise ManifestError(document.issue((), "must be a mapping of settings"))
    issues = []
    for key, value in document.data.items():
        if key not in ENVIRONMENT:
            known = ", ".join(ENVIRONMENT)
            issues.append(document.issue((key,), f"unknown setting (known: {known})",
                                         of_key=True))
        elif not isinstance(value, str) or not value:
            issues.append(document.issue((key,), "must be a non-empty string"))
    if issues:
        raise ManifestError(issues)
    return dict(document.data)
