"""Every error secure_split raises, and the exit-code registry of the CLI.

Errors say whose fault it is and what to do. Each class carries the exit code the CLI uses
when it reaches the top level.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ExitCode(enum.IntEnum):
    """Exit codes of every `secure-split` command, with the help text `--help` prints."""

    OK = 0
    FAILED = 1  # the command ran and found a problem (verification failed, a peer was refused, ...)
    BAD_CONFIG = 2  # a file could not be read or is invalid; nothing was started
    PEER_TIMEOUT = 3  # a peer did not answer in time
    POLICY_DENIED = 4  # the policy refused a flow the run needed
    PROTOCOL = 5  # a peer broke the protocol (bad frame, replay, wrong deployment hash)
    INTERRUPTED = 130


EXIT_CODE_HELP: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.FAILED: "the command ran and found a problem (see its output)",
    ExitCode.BAD_CONFIG: "a configuration, key or policy file is missing or invalid; fix it and rerun",
    ExitCode.PEER_TIMEOUT: "a peer did not answer in time; check that it runs and its endpoint is reachable",
    ExitCode.POLICY_DENIED: "the policy forbids a flow this deployment needs; fix the policy or deployment",
    ExitCode.PROTOCOL: "a peer sent something the protocol forbids; see the audit log for the entry",
    ExitCode.INTERRUPTED: "interrupted by the user",
}


class SecureSplitError(Exception):
    """Base of every error this package raises on purpose.

    `peer` names the counterparty whose message caused it, where one did (the gate sets it on
    what it refuses, so the node can count the refusal against that peer).
    """

    exit_code: ExitCode = ExitCode.FAILED
    peer: str | None = None


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in one configuration file: where it is and what was expected."""

    file: str
    key: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.key}: {self.message}"


class ConfigError(SecureSplitError):
    """A configuration file is missing or invalid. Carries *all* problems found at once."""

    exit_code = ExitCode.BAD_CONFIG

    def __init__(self, problems: list[ConfigProblem] | ConfigProblem | str) -> None:
        if isinstance(problems, str):
            problems = [ConfigProblem(file="-", key="-", message=problems)]
        elif isinstance(problems, ConfigProblem):
            problems = [problems]
        self.problems: list[ConfigProblem] = list(problems)
        n = len(self.problems)
        head = f"{n} configuration problem{'s' if n != 1 else ''}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


class KeyFileError(ConfigError):
    """A key file is missing, malformed, or readable by group/others."""


class CryptoError(SecureSplitError):
    """Verification or decryption failed: the data is not what its sender signed or sealed."""

    exit_code = ExitCode.PROTOCOL


class ProtocolError(SecureSplitError):
    """Base of protocol violations."""

    exit_code = ExitCode.PROTOCOL


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids (malformed frame, replay, wrong binding).

    `code` is the refusal code of the `error` the refusing peer answers with ("protocol" unless
    the raiser names a more precise one, e.g. "not_served", "bad_tensor", "busy").
    """

    def __init__(self, *args: object, code: str = "protocol") -> None:
        super().__init__(*args)
        self.code = code


class CodecError(RemoteProtocolError):
    """Bytes could not be decoded into a message. The only error the codec raises on bad input."""


class ReplayError(RemoteProtocolError):
    """A message was replayed or arrived out of order."""


class ViolationLimit(SecureSplitError):
    """A counterparty sent more refused messages than `limits.max_violations` within the window:
    the run stops, naming it. Not a `RemoteProtocolError`, so code that refuses one bad message
    and keeps serving does not swallow it.

    Exit code 4 when every counted violation was a policy denial, else 5.
    """

    def __init__(self, message: str, *, policy_denials_only: bool = False) -> None:
        super().__init__(message)
        self.exit_code = ExitCode.POLICY_DENIED if policy_denials_only else ExitCode.PROTOCOL


class HandshakeRefused(RemoteProtocolError):
    """The handshake failed: different deployment/policy hash or protocol version."""


class TransportError(SecureSplitError):
    """The transport could not move frames."""


class PeerTimeout(TransportError):
    """A named peer did not answer within its deadline."""

    exit_code = ExitCode.PEER_TIMEOUT

    def __init__(self, peer: str, waited_s: float, doing: str = "") -> None:
        self.peer = peer
        self.waited_s = waited_s
        what = f" while {doing}" if doing else ""
        super().__init__(
            f"peer '{peer}' did not answer within {waited_s:.1f} s{what}; "
            f"check that '{peer}' is running and its endpoint in deployment.yaml is reachable"
        )


class PolicyError(SecureSplitError):
    """A policy-level failure (invalid, unsigned, expired, inconsistent with the deployment)."""

    exit_code = ExitCode.POLICY_DENIED


class PolicyDenied(PolicyError):
    """A flow was refused by the policy. `decision` holds the decision record."""

    def __init__(self, message: str, decision: object | None = None) -> None:
        self.decision = decision
        super().__init__(message)


class AuditError(SecureSplitError):
    """The audit log could not be written or read."""


class TrainingError(SecureSplitError):
    """Training could not proceed (a peer failed, a refusal stopped the schedule)."""
