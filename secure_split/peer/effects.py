"""What the sans-IO parts of a peer ask the node to do: send a message, write an audit entry.

The sub-protocols (`peer/rounds/`) and the step runner never touch the gate, the audit log or a
socket. They return `Effect`s; the node carries them out in order (a `Send` goes through the
gate: policy, egress guards, audit, transport). Tests collect them instead, and deliver the
`Send`s to the other parties in any order they like.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np

from secure_split.protocol import Kind, WireTensor

__all__ = ["Effect", "Record", "Send"]


@dataclass(frozen=True, eq=False)
class Send:
    """One message to send through the gate.

    Attributes:
        to: the receiving peer.
        kind: the message kind.
        step: the step (or barrier/round number) the message belongs to.
        edge: the cut edge ("" for none).
        meta: plain values (checked against the kind's rule when bound).
        tensors: the tensors.
        blob: opaque bytes (ciphertexts, sealed boxes, PSI points).
        raw: a data owner's raw feature batch the tensor was computed from (the policy's egress
            leakage guards compare against it; it is never sent).
    """

    to: str
    kind: Kind
    step: int = 0
    edge: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)
    tensors: tuple[WireTensor, ...] = ()
    blob: bytes = b""
    raw: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"Send({self.kind.value} -> {self.to}, step {self.step}{', ' + self.edge if self.edge else ''})"


@dataclass(frozen=True)
class Record:
    """One entry for this peer's audit log (`event` with `fields`)."""

    event: str
    fields: Mapping[str, Any] = field(default_factory=dict)


Effect: TypeAlias = Send | Record
"""Anything a sans-IO part of a peer asks the node to do."""
