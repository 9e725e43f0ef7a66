"""The policy as the engine sees it: parties and their assets, rules, flows and decisions.

`Policy.decide(flow)` is the one question the gate asks, on every send and every receive. The
order of evaluation is fixed and documented in docs/policy-language.md:

1. outside the validity window -> deny (rule `validity`);
2. sender or receiver is not a party -> deny (`unknown-party`); a kind the protocol does not
   have -> deny (`unknown-kind`);
3. the asset guard: `encrypted_weights` only between owners of the same model, or to an
   aggregator that cannot decrypt -> else deny (`asset:weights`), whatever the rules say;
4. the first matching deny rule -> deny (deny overrides allow);
5. the first matching allow rule whose constraints hold -> allow; if allow rules match but none
   has its constraints met -> deny naming the first of them and the constraint that failed;
6. nothing matches -> deny (`default-deny`).

Decisions are deterministic in `allowed` and `rule_id` for the same flow and time; only the
`decision_id` is fresh for every call, so each audit entry can be referred to.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from secure_split.crypto.ckks_params import (
    DEFAULT_COEFF_MOD_BIT_SIZES,
    DEFAULT_POLY_MODULUS_DEGREE,
    DEFAULT_SCALE_BITS,
    CkksParams,
)
from secure_split.policy.kinds import KIND_SET

RULE_DEFAULT_DENY = "default-deny"
RULE_VALIDITY = "validity"
RULE_UNKNOWN_PARTY = "unknown-party"
RULE_UNKNOWN_KIND = "unknown-kind"
RULE_ASSET_WEIGHTS = "asset:weights"


@dataclass(frozen=True)
class Assets:
    """What a party owns and never gives away.

    Attributes:
        features: the party holds raw features (segments with `input: features` may run there).
        labels: the party holds labels (segments with `loss:` may run there).
        weights: names of the models whose weights the party owns: its segments' names, plus any
            shared model name that co-owners list too (horizontal hand-off).
        ckks_secret_key: the party holds the CKKS secret key (it can decrypt).
    """

    features: bool = False
    labels: bool = False
    weights: tuple[str, ...] = ()
    ckks_secret_key: bool = False


@dataclass(frozen=True)
class Party:
    """One signatory of the policy: its peer name, key fingerprint and assets.

    `aggregates` names models whose encrypted weights this party may receive to average them
    homomorphically without being able to decrypt them (SplitFed with HE averaging). `relays`
    names models whose weights this party may carry between their owners, sealed end to end to
    the receiving owner (it cannot open them).
    """

    name: str
    fingerprint: str
    assets: Assets = Assets()
    aggregates: tuple[str, ...] = ()
    description: str | None = None
    relays: tuple[str, ...] = ()


@dataclass(frozen=True)
class Constraints:
    """Limits an allow rule puts on the flows it allows. `None` means no limit."""

    max_bytes: int | None = None
    min_batch: int | None = None
    dtypes: frozenset[str] | None = None
    shape: tuple[int | None, ...] | None = None
    compression: bool = False
    max_distance_correlation: float | None = None

    def describe(self) -> str:
        """The constraints in one line, for `policy explain`."""
        parts = []
        if self.max_bytes is not None:
            parts.append(f"max_bytes={self.max_bytes}")
        if self.min_batch is not None:
            parts.append(f"min_batch={self.min_batch}")
        if self.dtypes is not None:
            parts.append("dtype=" + "|".join(sorted(self.dtypes)))
        if self.shape is not None:
            parts.append("shape=[" + ", ".join("*" if d is None else str(d) for d in self.shape) + "]")
        parts.append(f"compression={'allowed' if self.compression else 'not allowed'}")
        if self.max_distance_correlation is not None:
            parts.append(f"max_distance_correlation={self.max_distance_correlation}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Rule:
    """One allow or deny rule. `None` selectors match anything (`*` or omitted).

    Attributes:
        id: the rule's id from the YAML.
        action: "allow" or "deny".
        senders, receivers: party names, or None for any party.
        kinds: the message kinds matched (groups and `*` already expanded).
        kind_names: the kinds as written in the file (to flag `*` and groups).
        edges: edge ids ("FROM->TO"), or None for any edge and for messages without an edge.
        constraints: limits on allowed flows (allow rules only).
        line: line of the rule in the policy file, if known.
    """

    id: str
    action: Literal["allow", "deny"]
    senders: frozenset[str] | None
    receivers: frozenset[str] | None
    kinds: frozenset[str]
    kind_names: tuple[str, ...]
    edges: frozenset[str] | None = None
    constraints: Constraints = Constraints()
    description: str | None = None
    line: int | None = None

    def matches(self, sender: str, receiver: str, kind: str, edge: str | None) -> bool:
        """Whether this rule's selectors (from, to, kinds, edges) cover the route."""
        return (
            (self.senders is None or sender in self.senders)
            and (self.receivers is None or receiver in self.receivers)
            and kind in self.kinds
            and (self.edges is None or (edge is not None and edge in self.edges))
        )


@dataclass(frozen=True)
class Flow:
    """One message the gate is about to send or has begun to receive.

    Attributes:
        sender, receiver: peer names.
        kind: the message kind (a `secure_split.protocol.Kind` works too: it is a str).
        edge: the edge id "FROM->TO", or None (control messages; "" counts as None).
        direction: "send" at the sender's gate, "receive" at the receiver's.
        nbytes: the message size on the wire.
        dtype, shape, batch_size: of the (first) tensor, or None if the message carries none.
        compressed: whether the payload is compressed.
    """

    sender: str
    receiver: str
    kind: str
    edge: str | None
    direction: Literal["send", "receive"]
    nbytes: int
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    batch_size: int | None = None
    compressed: bool = False


@dataclass(frozen=True)
class Decision:
    """The policy's answer about one flow, as recorded in the audit log.

    Attributes:
        allowed: whether the flow may proceed.
        decision_id: unique per decision ("d-" + 16 random hex digits).
        rule_id: the YAML id of the deciding rule, or "default-deny", "validity", "unknown-party",
            "unknown-kind", "asset:weights", "guard:raw_shape", "guard:raw_row", "guard:dcor".
        policy_hash: hash of the policy that decided.
        reason: one sentence a human understands.
    """

    allowed: bool
    decision_id: str
    rule_id: str
    policy_hash: str
    reason: str

    def to_record(self) -> dict[str, Any]:
        """The decision as a JSON-able mapping for the audit log."""
        return {
            "allowed": self.allowed,
            "decision_id": self.decision_id,
            "rule_id": self.rule_id,
            "policy_hash": self.policy_hash,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class EdgeRequirement:
    """Protections the policy requires on an edge (or on every cross-peer edge for `*`)."""

    edge: str
    nopeek_alpha: float | None = None
    activation_noise_std: float | None = None
    gradient_noise_std: float | None = None
    gradient_clip_norm: float | None = None
    label_defence: frozenset[str] | None = None
    line: int | None = None


@dataclass(frozen=True)
class CkksRequirement:
    """The CKKS parameters every context of the deployment uses (the key holder creates its
    context with exactly these; every party refuses a context with other ones), checked against
    the 128-bit table when the policy loads."""

    min_poly_modulus_degree: int = DEFAULT_POLY_MODULUS_DEGREE
    coeff_mod_bit_sizes: tuple[int, ...] = DEFAULT_COEFF_MOD_BIT_SIZES
    security_bits: int = 128
    scale_bits: int = DEFAULT_SCALE_BITS

    def params(self) -> CkksParams:
        """The agreed parameters, as the crypto layer takes them."""
        return CkksParams(self.min_poly_modulus_degree, self.coeff_mod_bit_sizes, self.scale_bits)


@dataclass(frozen=True)
class Requirements:
    """The `require:` section: protections a deployment must configure to start."""

    edges: tuple[EdgeRequirement, ...] = ()
    he_merge: frozenset[str] | None = frozenset()  # None = every sum/mean merge fed by ≥2 peers
    ckks: CkksRequirement = CkksRequirement()
    ckks_given: bool = False
    public_architecture: frozenset[str] | None = frozenset()  # None = every segment


@dataclass(frozen=True)
class EgressGuards:
    """The `egress:` section: leakage guards at a data owner's egress."""

    refuse_raw_shape: bool = True
    refuse_raw_rows: bool = True
    row_tolerance: float = 1e-3


def _now_utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)


def _kind_name(kind: object) -> str:
    value = getattr(kind, "value", kind)
    return value if isinstance(value, str) else str(value)


def _fmt_time(t: datetime | None) -> str:
    return t.isoformat() if t is not None else "-"


@dataclass(frozen=True, eq=False)
class Policy:
    """A loaded, validated policy. Build it with `load_policy` or `policy_from_mapping`.

    Attributes:
        name, version: as in the file.
        path: the file it was read from.
        hash: `secure_split.canonical.digest_of` of the parsed mapping (dates as ISO strings).
        raw: that mapping.
        parties: name -> Party.
        allow, deny: the rules in file order.
        not_before, not_after: the validity window (timezone-aware), or None for open ends.
        requirements: the `require:` section.
        egress: the `egress:` section.
        lines: line numbers of keys in the file (key path -> line), for findings.
    """

    name: str
    version: int
    path: Path
    hash: str
    raw: Mapping[str, Any]
    parties: Mapping[str, Party]
    allow: tuple[Rule, ...]
    deny: tuple[Rule, ...]
    not_before: datetime | None = None
    not_after: datetime | None = None
    requirements: Requirements = Requirements()
    egress: EgressGuards = EgressGuards()
    description: str | None = None
    lines: Mapping[tuple[str | int, ...], int] = field(default_factory=dict, repr=False)

    # ---- queries -------------------------------------------------------------------------

    def rule(self, rule_id: str) -> Rule | None:
        """The allow or deny rule with this id, or None."""
        for r in (*self.allow, *self.deny):
            if r.id == rule_id:
                return r
        return None

    def line_of(self, *key_path: str | int) -> int | None:
        """Line of the deepest known prefix of `key_path` in the policy file."""
        p = tuple(key_path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return None

    def is_valid_at(self, now: datetime | None = None) -> bool:
        """Whether `now` (default: the current time) lies inside the validity window."""
        t = _now_utc(now)
        if self.not_before is not None and t < self.not_before:
            return False
        return not (self.not_after is not None and t > self.not_after)

    def model_owners(self) -> dict[str, frozenset[str]]:
        """Model name -> the parties that list it under `assets.weights`."""
        owners: dict[str, set[str]] = {}
        for p in self.parties.values():
            for m in p.assets.weights:
                owners.setdefault(m, set()).add(p.name)
        return {m: frozenset(v) for m, v in owners.items()}

    def ckks_key_holders(self) -> frozenset[str]:
        """Parties whose assets include the CKKS secret key."""
        return frozenset(p.name for p in self.parties.values() if p.assets.ckks_secret_key)

    def weights_transfer_problem(self, sender: str, receiver: str) -> str | None:
        """Why `encrypted_weights` may not go from `sender` to `receiver`, or None if it may.

        Weights travel only in relation to a model both ends are tied to: (a) between co-owners
        of a model (both list it under `assets.weights`); (b) from an owner of a model to a party
        that `aggregates` it, if that aggregator holds no CKKS secret key and an owner of the model
        does (homomorphic averaging: the aggregator cannot decrypt); (c) from such an aggregator
        back to an owner of the model; (d) between an owner of a model and a party that `relays`
        it (sealed to the final owner), both ways.
        """
        if sender not in self.parties or receiver not in self.parties:
            return "only parties of the policy may exchange weights"
        s = self.parties[sender]
        r = self.parties[receiver]
        if set(s.assets.weights) & set(r.assets.weights):
            return None
        owners = self.model_owners()
        holders = self.ckks_key_holders()
        to_aggregator = set(s.assets.weights) & set(r.aggregates)
        if to_aggregator:
            if r.assets.ckks_secret_key:
                return (
                    f"'{receiver}' aggregates {sorted(to_aggregator)} but holds a CKKS secret key, "
                    "so it could decrypt them"
                )
            if any(owners.get(m, frozenset()) & holders for m in to_aggregator):
                return None
            return (
                f"no owner of {sorted(to_aggregator)} holds a CKKS secret key, so '{receiver}' "
                "would not aggregate them under encryption"
            )
        if set(s.aggregates) & set(r.assets.weights):
            return None
        if set(s.assets.weights) & set(r.relays) or set(s.relays) & set(r.assets.weights):
            return None
        return (
            f"'{sender}' and '{receiver}' own no model in common (assets.weights) and neither "
            "aggregates a model of the other (aggregates)"
        )

    # ---- decisions -----------------------------------------------------------------------

    def decide(self, flow: Flow, *, now: datetime | None = None) -> Decision:
        """Decide whether `flow` may proceed: validity, parties, asset guard, deny, allow, default deny.

        Args:
            flow: the message as seen by the gate (on receive: from the decoded header).
            now: the time to judge validity at (default: now, UTC); naive times count as UTC.

        Returns:
            A Decision; `allowed` and `rule_id` depend only on the flow, the time and the policy.
        """
        return self._decide(flow, now=now, check_constraints=True)

    def decide_route(
        self, sender: str, receiver: str, kind: str, edge: str | None = None, *, now: datetime | None = None
    ) -> Decision:
        """Decide whether this kind may ever go from `sender` to `receiver` on `edge`.

        Like `decide`, but an allow rule's size, batch, dtype, shape and compression constraints
        are not checked (they depend on each message). Used for the topology check at startup and
        by `policy explain` when no message details are given.
        """
        flow = Flow(sender, receiver, kind, edge, "send", 0)
        return self._decide(flow, now=now, check_constraints=False)

    def new_decision(self, allowed: bool, rule_id: str, reason: str) -> Decision:
        """A Decision of this policy with a fresh decision id (for checks outside `decide`)."""
        return Decision(allowed, "d-" + secrets.token_hex(8), rule_id, self.hash, reason)

    def _decide(self, flow: Flow, *, now: datetime | None, check_constraints: bool) -> Decision:
        kind = _kind_name(flow.kind)
        edge = flow.edge or None
        route = f"{flow.sender} -> {flow.receiver}: kind '{kind}'" + (f" on edge {edge}" if edge else "")
        pol = f"policy '{self.name}' v{self.version}"
        t = _now_utc(now)
        if not self.is_valid_at(t):
            window = f"valid from {_fmt_time(self.not_before)} until {_fmt_time(self.not_after)}"
            return self.new_decision(
                False, RULE_VALIDITY, f"{route} is denied: {pol} is not valid at {t.isoformat()} ({window})"
            )
        for who in (flow.sender, flow.receiver):
            if who not in self.parties:
                return self.new_decision(
                    False, RULE_UNKNOWN_PARTY, f"{route} is denied: '{who}' is not a party of {pol}"
                )
        if kind not in KIND_SET:
            return self.new_decision(
                False, RULE_UNKNOWN_KIND, f"{route} is denied: '{kind}' is not a message kind {pol} knows"
            )
        if kind == "encrypted_weights":
            problem = self.weights_transfer_problem(flow.sender, flow.receiver)
            if problem is not None:
                return self.new_decision(
                    False,
                    RULE_ASSET_WEIGHTS,
                    f"{route} is denied by {pol}: segment weights never leave their owners; {problem} "
                    f"(rule: {RULE_ASSET_WEIGHTS})",
                )
        for rule in self.deny:
            if rule.matches(flow.sender, flow.receiver, kind, edge):
                return self.new_decision(False, rule.id, f"{route} is denied by {pol} (rule: {rule.id})")
        first_failure: tuple[Rule, str] | None = None
        for rule in self.allow:
            if not rule.matches(flow.sender, flow.receiver, kind, edge):
                continue
            failure = constraint_failure(rule.constraints, flow) if check_constraints else None
            if failure is None:
                return self.new_decision(True, rule.id, f"{route} is allowed by {pol} (rule: {rule.id})")
            if first_failure is None:
                first_failure = (rule, failure)
        if first_failure is not None:
            rule, failure = first_failure
            return self.new_decision(
                False, rule.id, f"{route} is denied by {pol}: {failure} (rule: {rule.id})"
            )
        return self.new_decision(
            False, RULE_DEFAULT_DENY, f"{route} is not allowed by {pol} (rule: default deny)"
        )


def constraint_failure(c: Constraints, flow: Flow) -> str | None:
    """The first constraint of an allow rule that `flow` breaks, as a phrase, or None.

    A constraint that needs a value the flow does not carry (no dtype, no shape, no batch size)
    fails: the gate must say what it sends for the rule to allow it.
    """
    if flow.compressed and not c.compression:
        return "compressed payloads are not allowed"
    if c.max_bytes is not None and flow.nbytes > c.max_bytes:
        return f"message of {flow.nbytes} bytes exceeds max_bytes {c.max_bytes}"
    if c.dtypes is not None:
        if flow.dtype is None:
            return f"the rule requires dtype {'|'.join(sorted(c.dtypes))} but the message carries no tensor"
        if flow.dtype not in c.dtypes:
            return f"dtype {flow.dtype} is not among {'|'.join(sorted(c.dtypes))}"
    if c.shape is not None:
        if flow.shape is None:
            return "the rule constrains the tensor shape but the message carries no tensor"
        want = c.shape
        got = tuple(flow.shape)
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got, strict=False)):
            pattern = "[" + ", ".join("*" if d is None else str(d) for d in want) + "]"
            return f"shape {list(got)} does not match {pattern}"
    if c.min_batch is not None:
        batch = flow.batch_size
        if batch is None and flow.shape:
            batch = flow.shape[0]
        if batch is None:
            return f"the rule requires batches of at least {c.min_batch} but the batch size is unknown"
        if batch < c.min_batch:
            return f"batch of {batch} is below min_batch {c.min_batch}"
    return None
