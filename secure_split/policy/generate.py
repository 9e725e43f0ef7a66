"""Write the tightest policy a deployment can run under: exactly its required flows, nothing more.

The demos call `policy_for_deployment`, dump the mapping to `policy.yaml` with `yaml.safe_dump`,
then sign it with every party's key (`sign_policy`). Privacy officers can start from the same
output and tighten it.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from secure_split.config import Deployment, horizontal_owners, peer_fingerprint
from secure_split.crypto.ckks_params import (
    DEFAULT_COEFF_MOD_BIT_SIZES,
    DEFAULT_POLY_MODULUS_DEGREE,
    DEFAULT_SCALE_BITS,
)
from secure_split.policy.kinds import CONTROL_KINDS, KINDS, SESSION_KINDS
from secure_split.policy.schema import LANGUAGE_VERSION
from secure_split.policy.topology import he_key_holder, required_flows, shared_models

DEFAULT_MIN_BATCH = 8
CONTROL_MAX_BYTES = 1024 * 1024
_TENSOR_KINDS = ("activation", "gradient", "aggregate_gradient")


def policy_for_deployment(
    deployment: Deployment,
    *,
    name: str,
    version: int = 1,
    not_after: datetime | date | str | None = None,
    not_before: datetime | date | str | None = None,
) -> dict[str, Any]:
    """A policy mapping that allows exactly the flows `deployment` requires.

    Each peer becomes a party with its fingerprint and the assets the deployment puts there
    (raw features where a segment reads them, labels where a loss is computed, the weights of
    its segments, the CKKS secret key at the HE key holder). Tensor flows get max_bytes from
    `limits.max_message_bytes`, min_batch min(8, micro-batch size) and dtype float32 (served
    predictions: dtype int64, see `required_flows`); control
    and session kinds one rule per ordered pair of peers, at most 1 MiB. Protections configured
    on the deployment's edges become requirements, so they cannot be dropped without re-signing.

    Args:
        deployment: the validated deployment.
        name: the policy name (lowercase letters, digits, . _ -).
        version: the policy version (≥ 1).
        not_after, not_before: the validity window; datetimes need a timezone.

    Returns:
        A mapping ready for `yaml.safe_dump` (and valid for `policy_from_mapping`).
    """
    spec = deployment.spec
    seg_peer = {s: seg.peer for s, seg in spec.segments.items()}
    holders: set[str] = set()
    for sname, seg in spec.segments.items():
        if seg.he:
            kh = he_key_holder(deployment, sname)
            if kh is not None:
                holders.add(kh)
    horizontal = spec.training.schedule in ("sequential", "splitfed")
    shared = shared_models(deployment) if horizontal else {}
    splitfed = spec.training.schedule == "splitfed"
    he_average = splitfed and spec.training.average == "he"
    relay = horizontal and spec.training.handoff == "relay" and not he_average
    if he_average and shared:
        owners = list(horizontal_owners(spec))
        if owners:
            holders.add(owners[0])  # the CKKS key holder; the others get its secret context

    parties: dict[str, Any] = {}
    for peer, pspec in sorted(spec.peers.items()):
        segs = sorted(deployment.segments_of(peer))
        weights = segs + sorted(m for m, ms in shared.items() if any(seg_peer[s] == peer for s in ms))
        party: dict[str, Any] = {
            "fingerprint": peer_fingerprint(pspec.sign_key, pspec.transport_key),
            "assets": {
                "features": any(spec.segments[s].input == "features" for s in segs),
                "labels": any(spec.segments[s].loss is not None for s in segs),
                "weights": weights,
                "ckks_secret_key": peer in holders,
            },
        }
        if (he_average or relay) and peer == spec.coordinator:
            carried = sorted(m for m, ms in shared.items() if all(seg_peer[s] != peer for s in ms))
            if carried:
                party["aggregates" if he_average else "relays"] = carried
        parties[peer] = party

    batch = spec.training.batch_size
    max_bytes = spec.limits.max_message_bytes
    allow: list[dict[str, Any]] = []
    control: dict[tuple[str, str], set[str]] = {}
    for rf in required_flows(deployment):
        if rf.kind in CONTROL_KINDS or rf.kind in SESSION_KINDS:
            control.setdefault((rf.sender, rf.receiver), set()).add(rf.kind)
            continue
        rule: dict[str, Any] = {
            "id": f"{rf.kind}@{rf.edge}" if rf.edge else f"{rf.kind}:{rf.sender}->{rf.receiver}",
            "description": rf.why,
            "from": rf.sender,
            "to": rf.receiver,
            "kinds": [rf.kind],
        }
        if rf.edge:
            rule["edges"] = [rf.edge]
        rule["max_bytes"] = max_bytes
        if rf.kind in _TENSOR_KINDS:
            rule["min_batch"] = min(DEFAULT_MIN_BATCH, batch)
            # The wire dtype the deployment pins for the edge (its interface), float32 by default.
            interface = deployment.edge(rf.edge).interface if rf.edge else None
            rule["dtype"] = interface.dtype if interface is not None else "float32"
        elif rf.kind == "prediction":
            rule["dtype"] = "int64"  # one argmax class per sample
        allow.append(rule)
    for (sender, receiver), kinds in sorted(control.items()):
        allow.append(
            {
                "id": f"control:{sender}->{receiver}",
                "description": f"session and control messages from {sender} to {receiver}",
                "from": sender,
                "to": receiver,
                "kinds": [k for k in KINDS if k in kinds],
                "max_bytes": min(max_bytes, CONTROL_MAX_BYTES),
            }
        )

    require: dict[str, Any] = {}
    edge_reqs: dict[str, Any] = {}
    for e in spec.edges:
        if seg_peer.get(e.from_) == seg_peer.get(e.to):
            continue
        p = e.protections
        req: dict[str, Any] = {
            k: v
            for k, v in (
                ("nopeek_alpha", p.nopeek_alpha),
                ("activation_noise_std", p.activation_noise_std),
                ("gradient_noise_std", p.gradient_noise_std),
            )
            if v > 0
        }
        if p.gradient_clip_norm is not None:
            req["gradient_clip_norm"] = p.gradient_clip_norm
        if p.label_defence != "none":
            req["label_defence"] = [p.label_defence]
        if req:
            edge_reqs[e.name] = req
    if edge_reqs:
        require["edges"] = edge_reqs
    he_segments = sorted(s for s, seg in spec.segments.items() if seg.he)
    if he_segments:
        require["he_merge"] = he_segments
    if he_segments or (he_average and shared):
        require["ckks"] = {
            "min_poly_modulus_degree": DEFAULT_POLY_MODULUS_DEGREE,
            "coeff_mod_bit_sizes": list(DEFAULT_COEFF_MOD_BIT_SIZES),
            "scale_bits": DEFAULT_SCALE_BITS,
        }

    out: dict[str, Any] = {
        "language": LANGUAGE_VERSION,
        "name": name,
        "version": version,
        "description": f"Generated for deployment '{spec.name}': allows exactly the flows it needs.",
    }
    valid = {
        k: (v.isoformat() if isinstance(v, datetime | date) else v)
        for k, v in (("not_before", not_before), ("not_after", not_after))
        if v is not None
    }
    if valid:
        out["valid"] = valid
    out["parties"] = parties
    out["allow"] = allow
    if require:
        out["require"] = require
    return out
