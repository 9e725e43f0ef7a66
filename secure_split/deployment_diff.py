"""Which part of two deployment files differs: section digests, field-level diffs, mismatch advice.

Peers agree on one deployment hash (the canonical JSON of the whole file, `Deployment.hash`).
When two hashes differ, the hash alone says nothing about where. Here:

- `deployment_section_digests(deployment)`: a short digest per top-level section and per peer and
  segment ("training", "peers.hospital_b"); small enough for a HELLO, so peers can name the
  sections that differ without sending each other the file.
- `explain_deployment_mismatch(ours, their_digests, peer)`: the error a peer shows on a hash
  mismatch: who, which sections, and what to run.
- `diff_deployments(a, b)`: every field that differs between two files (`secure-split deployment
  diff A B`), and whether they differ in meaning or only in how they are written.

Torch-free and transport-free: the CLI, the peer and auditors' tools import it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from secure_split.canonical import digest_of
from secure_split.config import Deployment, DeploymentSpec

SECTION_DIGEST_HEX = 16
"""Digits of each section digest: enough to tell sections apart, short enough for a HELLO and a
phone call. They name differences; the full hash is what peers agree on."""

MAX_SECTIONS = 4096
"""A HELLO's section table may not list more (a deployment of 2,000 peers and segments fits)."""

_SECTION_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,160}$")
_DIGEST = re.compile(rf"^[0-9a-f]{{{SECTION_DIGEST_HEX}}}$")
# Sections whose entries get digests of their own: a differing peer or segment is named.
_PER_ENTRY = ("peers", "segments")


def section_digests_of(raw: Mapping[str, Any]) -> dict[str, str]:
    """Section digests of a deployment's raw mapping (see `deployment_section_digests`)."""
    out: dict[str, str] = {}
    for key, value in raw.items():
        out[str(key)] = digest_of(value)[:SECTION_DIGEST_HEX]
        if key in _PER_ENTRY and isinstance(value, Mapping):
            for name, entry in value.items():
                out[f"{key}.{name}"] = digest_of(entry)[:SECTION_DIGEST_HEX]
    return dict(sorted(out.items()))


def deployment_section_digests(deployment: Deployment) -> dict[str, str]:
    """A short digest of each top-level section of the deployment file, and of each peer and segment.

    Keys are "version", "name", "coordinator", "policy", "peers", "segments", "edges",
    "training", "limits" (those the file writes; a section left to its defaults has no entry),
    plus "peers.NAME" and "segments.NAME" for each entry. Values are the first 16 hex digits of
    the SHA-256 of the section's canonical JSON, computed over what the file writes, as the
    deployment hash is.

    Args:
        deployment: a loaded deployment.

    Returns:
        section -> 16 lowercase hex digits, sorted by section name.
    """
    return section_digests_of(deployment.raw)


def valid_section_digests(value: object) -> dict[str, str] | None:
    """A section table received from another peer, if well-formed; None otherwise.

    Well-formed: a mapping of at most `MAX_SECTIONS` section names (letters, digits, `_.-`, at most
    160 characters) to 16 lowercase hex digits. Anything else is ignored rather than trusted.
    """
    if not isinstance(value, Mapping) or len(value) > MAX_SECTIONS:
        return None
    out: dict[str, str] = {}
    for key, digest in value.items():
        if not (isinstance(key, str) and _SECTION_NAME.match(key) and isinstance(digest, str) and _DIGEST.match(digest)):
            return None
        out[key] = digest
    return out


def differing_sections(ours: Mapping[str, str], theirs: Mapping[str, str]) -> list[str]:
    """Sections whose digests differ or that only one side writes, most specific first.

    A top-level section is left out when an entry of it ("peers.hospital_b") already names the
    difference and no other part of it differs.
    """
    names = sorted(set(ours) | set(theirs))
    differ = [n for n in names if ours.get(n) != theirs.get(n)]
    out = []
    for name in differ:
        # Both sides write the section and named entries of it differ: those entries say it all.
        named = any(d.startswith(name + ".") for d in differ)
        if name in _PER_ENTRY and named and name in ours and name in theirs:
            continue
        out.append(name)
    return out


def explain_deployment_mismatch(
    ours: Deployment, their_digests: object, peer: str, *, their_hash: str | None = None
) -> str:
    """The error a peer reports when `peer`'s HELLO announces another deployment hash.

    Args:
        ours: our loaded deployment.
        their_digests: the section table from the peer's HELLO (any value; checked with
            `valid_section_digests`, ignored when missing or malformed, e.g. an older peer).
        peer: the other peer's name.
        their_hash: the hash the peer announced, to print (optional).

    Returns:
        A sentence naming the peer, the sections that differ (when known) and what to run.
    """
    theirs = valid_section_digests(their_digests)
    # Whole hashes: the operator compares them with what `secure-split deployment hash` prints.
    hashes = f"it runs deployment {their_hash}, we run {ours.hash}" if their_hash else f"ours hashes to {ours.hash}"
    head = f"peer '{peer}' runs a different deployment.yaml than {ours.path} ({hashes})"
    advice = (
        f"both parties must load the same deployment.yaml: run `secure-split deployment hash {ours.path.name}` at "
        f"both sites and compare, or `secure-split deployment diff {ours.path.name} THEIRS.yaml` on a copy of theirs"
    )
    if theirs is None:
        return f"{head}; {advice}"
    differ = differing_sections(deployment_section_digests(ours), theirs)
    if not differ:
        return f"{head}; every section digest matches, so the files differ in a way the digests do not show; {advice}"
    listed = ", ".join(differ[:12]) + (f" and {len(differ) - 12} more" if len(differ) > 12 else "")
    return f"{head}: the sections that differ are {listed}; {advice}"


@dataclass(frozen=True)
class FieldDifference:
    """One field that differs between deployment files A and B.

    Attributes:
        path: where, e.g. "peers.hospital_b.transport_key" or "edges[1].to".
        change: "changed", "only_in_a" or "only_in_b".
        a: the value in A (None when only in B).
        b: the value in B (None when only in A).
    """

    path: str
    change: Literal["changed", "only_in_a", "only_in_b"]
    a: Any = None
    b: Any = None

    def __str__(self) -> str:
        if self.change == "only_in_a":
            return f"{self.path}: only in A: {_show(self.a)}"
        if self.change == "only_in_b":
            return f"{self.path}: only in B: {_show(self.b)}"
        return f"{self.path}: A {_show(self.a)}  ->  B {_show(self.b)}"


def _show(value: Any, limit: int = 120) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def diff_values(a: Any, b: Any, path: str = "") -> list[FieldDifference]:
    """Every leaf that differs between two parsed YAML values, in document order of A then B.

    Mappings are compared key by key, lists index by index (extra items are only in one file),
    anything else by canonical value (so 1 and 1.0 are equal, as for the hash).
    """
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out: list[FieldDifference] = []
        for key in [*a, *(k for k in b if k not in a)]:
            where = _join(path, str(key))
            if key not in b:
                out.append(FieldDifference(where, "only_in_a", a=a[key]))
            elif key not in a:
                out.append(FieldDifference(where, "only_in_b", b=b[key]))
            else:
                out += diff_values(a[key], b[key], where)
        return out
    if isinstance(a, list) and isinstance(b, list):
        out = []
        for i in range(max(len(a), len(b))):
            where = _join(path, i)
            if i >= len(b):
                out.append(FieldDifference(where, "only_in_a", a=a[i]))
            elif i >= len(a):
                out.append(FieldDifference(where, "only_in_b", b=b[i]))
            else:
                out += diff_values(a[i], b[i], where)
        return out
    if _same(a, b):
        return []
    return [FieldDifference(path or "(whole file)", "changed", a=a, b=b)]


def _same(a: Any, b: Any) -> bool:
    try:
        return digest_of(a) == digest_of(b)
    except (TypeError, ValueError):
        return bool(a == b)


@dataclass(frozen=True)
class DeploymentDiff:
    """The result of comparing two deployment files.

    Attributes:
        hash_a, hash_b: the deployment hash of each file (what peers compare).
        differences: every differing field.
        same_meaning: True when both files validate to the same deployment (every difference is
            only in how it is written, e.g. a default spelled out in one file); None when either
            file does not validate.
    """

    hash_a: str
    hash_b: str
    differences: list[FieldDifference]
    same_meaning: bool | None


def diff_deployments(raw_a: Mapping[str, Any], raw_b: Mapping[str, Any]) -> DeploymentDiff:
    """Compare two deployment files' parsed contents (what `read_yaml(...).data` returns).

    Returns:
        The hashes, every differing field, and whether the two mean the same deployment.
    """
    try:
        meaning: bool | None = DeploymentSpec.model_validate(dict(raw_a)) == DeploymentSpec.model_validate(dict(raw_b))
    except ValidationError:
        meaning = None
    return DeploymentDiff(digest_of(dict(raw_a)), digest_of(dict(raw_b)), diff_values(raw_a, raw_b), meaning)
