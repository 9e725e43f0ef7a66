"""Tools of an insider who holds its own signing key: rewrite its log and re-sign it consistently."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from secure_split.audit.encoding import encode_entry, parse
from secure_split.audit.format import genesis_hash, head_message
from secure_split.audit.synthetic import SyntheticRun
from secure_split.canonical import sha256_hex

from .conftest import lines_of, write_lines

Encoder = Callable[[dict[str, Any]], bytes]


def resign(run: SyntheticRun, peer: str, entries: list[dict[str, Any]], encode: Encoder = encode_entry) -> None:
    """Renumber, re-chain and re-sign `entries` with `peer`'s own key, and write them as its log."""
    write_lines(run, peer, resigned_lines(run, peer, entries, encode))


def resigned_lines(run: SyntheticRun, peer: str, entries: list[dict[str, Any]],
                   encode: Encoder = encode_entry) -> list[bytes]:
    """The lines of `entries` renumbered, re-chained and re-signed with `peer`'s own key."""
    ident = run.identities[peer]
    nonce = run_id = ""
    head = ""
    out = []
    for i, e in enumerate(entries):
        e = dict(e)
        e.pop("sig", None)
        e["seq"] = i
        data = e.get("data") if isinstance(e.get("data"), dict) else {}
        if e["event"] == "run_start":
            nonce, run_id = data.get("nonce"), ""
            if i == 0:
                head = genesis_hash(peer, run.deployment_hash, nonce)
        if e["event"] == "run_bound":
            run_id = data.get("run_id")
        e["prev"] = head
        body = encode(e)
        head = sha256_hex(body)
        if e["event"] == "checkpoint":
            sig = ident.sign(head_message(peer, i, head, run.deployment_hash, run=run_id, nonce=nonce)).hex()
            e["sig"] = {"key": ident.sign_key_hex, "signature": sig}
            body = encode(e)
        out.append(body)
    return out


def entries_of(run: SyntheticRun, peer: str) -> list[dict[str, Any]]:
    """The parsed entries of a peer's log."""
    return [parse(line) for line in lines_of(run, peer)]


def index_of(entries: list[dict[str, Any]], pred: Callable[[dict[str, Any]], bool], nth: int = 0) -> int:
    """Position of the nth entry matching `pred` (negative nth counts from the end)."""
    hits = [i for i, e in enumerate(entries) if pred(e)]
    return hits[nth]


def event(name: str, **data: Any) -> Callable[[dict[str, Any]], bool]:
    """A predicate: the entry's event is `name` and its data has these values."""
    return lambda e: e["event"] == name and all(e["data"].get(k) == v for k, v in data.items())
