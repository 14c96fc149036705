"""One error tree for everything stapctl raises on purpose.

Every error says what went wrong and what to do next. Third-party exceptions
(paramiko, socket, yaml, jsonschema) are translated where they enter: the CLI
prints ``StapctlError`` as one clean message and never shows a traceback for them.

    StapctlError                 exit code
    ├── ManifestError(issues)    2  manifest, inventory, template or CLI input is wrong
    ├── PlanError                2  no host can be served / nothing to run
    │   └── CompileError         2  stap could not build a module (stderr tail)
    ├── LabError                 1  the local lab could not be built or booted
    ├── CacheError               1  the module cache is not safe to use, or not writable
    ├── ConnectError             -  a host cannot be reached (a HostOutcome, not fatal)
    │   ├── AuthError
    │   └── HostKeyError
    ├── AgentError               -  the agent on a host broke (remote traceback as text)
    │   ├── ProtocolError             its stream was malformed or oversized
    │   ├── OutputLimitError          it sent more output than a run allows
    │   ├── UnresponsiveError         it fell silent, heartbeats included
    │   └── BadFactsError             it reported a fact stapctl will not use
"""

from __future__ import annotations

from dataclasses import dataclass

from stapctl.models import FailureKind


class StapctlError(Exception):
    """Root of all errors stapctl raises on purpose; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class HistoryError(StapctlError):
    """The run history cannot be reached or used; ``reason`` says why, without where."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"cannot use the run history {where}: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class Issue:
    """One problem found in user input, located as precisely as we can."""

    file: str
    line: int | None
    column: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        key = f" {self.path}:" if self.path else ""
        return f"{where}:{key} {self.message}"


class ManifestError(StapctlError):
    """Bad user input: every problem found, not just the first."""

    exit_code = 2

    def __init__(self, issues: list[Issue] | Issue) -> None:
        self.issues = [issues] if isinstance(issues, Issue) else list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


class UsageError(StapctlError):
    """A command-line argument that cannot be used (a run that does not exist, runs of
    different manifests): bad input, exit 2, as diff(1)'s trouble."""

    exit_code = 2


class PlanError(StapctlError):
    exit_code = 2


class CompileError(PlanError):
    """stap failed; ``stderr`` is the tail of its output, already mapped to the user's file."""

    def __init__(self, message: str, stderr: str = "") -> None:
        self.stderr = stderr
        super().__init__(message + (f"\n{stderr}" if stderr else ""))


class LabError(StapctlError):
    exit_code = 1


class CacheError(StapctlError):
    """The module cache cannot be trusted (not the user's own, or writable by others) or
    cannot be written; modules from it would be shipped to every host."""

    exit_code = 1


class ConnectError(StapctlError):
    pass


class AuthError(ConnectError):
    pass


class HostKeyError(ConnectError):
    pass


class AgentError(StapctlError):
    """The agent failed in a way it could not report as a result; ``kind`` is the
    failure kind the host's outcome gets."""

    kind = FailureKind.AGENT_ERROR

    def __init__(self, message: str, remote_traceback: str = "") -> None:
        self.remote_traceback = remote_traceback
        super().__init__(message)


class ProtocolError(AgentError):
    """What the agent sent is not the protocol: corrupt, oversized or out of place."""

    kind = FailureKind.PROTOCOL_ERROR


class OutputLimitError(AgentError):
    """The probe's output passed the run's limit; the agent was stopped cleanly."""

    kind = FailureKind.OUTPUT_LIMIT


class UnresponsiveError(AgentError):
    """The agent stopped sending anything, heartbeats included."""

    kind = FailureKind.UNRESPONSIVE


class BadFactsError(AgentError):
    """A host reported a fact (kernel release, arch) that is not a plain name.

    Facts become paths and arguments on this machine (``stap -r RELEASE``, cache paths),
    so a release like ``../../x`` or ``-x`` is refused where it is read, and the host
    fails instead of steering stap and make into a directory it chose.
    """

    kind = FailureKind.BAD_FACTS
