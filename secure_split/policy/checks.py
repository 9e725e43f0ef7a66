"""Static checks of a policy, alone and against a deployment, and the startup gate.

- `check_policy(policy)`: what is wrong with the policy by itself: rules that would let an asset
  leave its owner, shadowed rules, guards switched off, the validity window.
- `check_deployment(policy, deployment)`: the policy's own findings plus: parties match the
  deployment's peers and fingerprints; assets sit where the deployment uses them (a loss computed
  at a peer that holds no labels means labels would have to leave their owner); every flow the
  deployment needs is allowed (naming the edge and the rule that denies it); required protections
  are configured.
- `check_startup(policy, deployment)`: all of the above that prevents a start, plus the validity
  window and every party's signature; raises `PolicyError` listing them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from secure_split.config import Deployment, peer_fingerprint
from secure_split.errors import ConfigError, PolicyError
from secure_split.policy.kinds import WILDCARD
from secure_split.policy.model import EdgeRequirement, Policy, Rule
from secure_split.policy.schema import ASSET_KIND_NAMES, load_policy
from secure_split.policy.signatures import signature_problems
from secure_split.policy.topology import he_key_holder, he_merge_owners, required_flows

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One result of a check.

    Attributes:
        severity: "error" (the deployment must not start / `policy check` exits 1) or "warning".
        rule: the rule id involved, or the check's name ("parties", "asset:labels",
            "require:nopeek_alpha", "validity", "signature", ...).
        message: what is wrong and what to do.
        edge: the edge concerned, if any.
        line: the line in the policy file, if known.
    """

    severity: Severity
    rule: str
    message: str
    edge: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = f" edge {self.edge}:" if self.edge else ""
        line = f" (policy line {self.line})" if self.line is not None else ""
        return f"{self.severity}: [{self.rule}]{where} {self.message}{line}"


def _covers(outer: frozenset[str] | None, inner: frozenset[str] | None) -> bool:
    return outer is None or (inner is not None and inner <= outer)


def _shadowed_by(allow: Rule, deny: Rule) -> bool:
    return (
        _covers(deny.senders, allow.senders)
        and _covers(deny.receivers, allow.receivers)
        and allow.kinds <= deny.kinds
        and _covers(deny.edges, allow.edges)
    )


def _asset_findings(policy: Policy) -> list[Finding]:
    out: list[Finding] = []
    for rule in policy.allow:
        for name in rule.kind_names:
            asset = ASSET_KIND_NAMES.get(name)
            if asset is not None:
                out.append(
                    Finding(
                        "error",
                        f"asset:{asset}",
                        f"rule '{rule.id}' tries to allow '{name}' to flow: {asset.replace('_', ' ')} never "
                        "leave their owner and no message kind carries them; remove it",
                        line=rule.line,
                    )
                )
        if WILDCARD in rule.kind_names:
            out.append(
                Finding(
                    "error",
                    "asset:*",
                    f"rule '{rule.id}' allows every message kind ('*'), including encrypted_weights and any "
                    "kind added later; list the kinds it needs",
                    line=rule.line,
                )
            )
        if "encrypted_weights" in rule.kinds:
            if rule.senders is None or rule.receivers is None:
                out.append(
                    Finding(
                        "error",
                        "asset:weights",
                        f"rule '{rule.id}' allows encrypted_weights from or to any party ('*'); "
                        "segment weights may only move between named owners of the same model",
                        line=rule.line,
                    )
                )
                continue
            for s in sorted(rule.senders):
                for r in sorted(rule.receivers):
                    problem = policy.weights_transfer_problem(s, r) if s != r else None
                    if problem is not None:
                        out.append(
                            Finding(
                                "error",
                                "asset:weights",
                                f"rule '{rule.id}' allows encrypted_weights {s} -> {r}, but {problem}; "
                                "segment weights never leave their owners (the engine denies it anyway)",
                                line=rule.line,
                            )
                        )
    for party in policy.parties.values():
        if party.aggregates and party.assets.ckks_secret_key:
            out.append(
                Finding(
                    "error",
                    "asset:ckks_secret_key",
                    f"party '{party.name}' aggregates {list(party.aggregates)} and holds a CKKS secret key: "
                    "it could decrypt the weights it averages",
                    line=policy.line_of("parties", party.name, "aggregates"),
                )
            )
    return out


def _static_findings(policy: Policy) -> list[Finding]:
    out = _asset_findings(policy)
    for rule in policy.allow:
        for deny in policy.deny:
            if _shadowed_by(rule, deny):
                out.append(
                    Finding(
                        "warning",
                        rule.id,
                        f"allow rule '{rule.id}' never applies: deny rule '{deny.id}' covers every "
                        "flow it allows",
                        line=rule.line,
                    )
                )
                break
        if rule.kinds & {"activation", "gradient"} and (rule.constraints.min_batch or 1) < 2:
            out.append(
                Finding(
                    "warning",
                    rule.id,
                    f"rule '{rule.id}' allows activations or gradients of a batch of one, which describe a "
                    "single record; set min_batch",
                    line=rule.line,
                )
            )
    if not policy.egress.refuse_raw_shape:
        out.append(
            Finding(
                "warning",
                "guard:raw_shape",
                "egress.refuse_raw_shape is off: a tensor shaped like the raw input may leave a data owner",
                line=policy.line_of("egress", "refuse_raw_shape"),
            )
        )
    if not policy.egress.refuse_raw_rows:
        out.append(
            Finding(
                "warning",
                "guard:raw_row",
                "egress.refuse_raw_rows is off: a tensor containing raw rows may leave a data owner",
                line=policy.line_of("egress", "refuse_raw_rows"),
            )
        )
    return out


def _validity_findings(policy: Policy, now: datetime | None) -> list[Finding]:
    t = now or datetime.now(UTC)
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    line = policy.line_of("valid")
    if policy.not_after is not None and t > policy.not_after:
        return [
            Finding("error", "validity", f"the policy expired at {policy.not_after.isoformat()}", line=line)
        ]
    if policy.not_before is not None and t < policy.not_before:
        return [
            Finding(
                "error",
                "validity",
                f"the policy is not valid before {policy.not_before.isoformat()}",
                line=line,
            )
        ]
    if policy.not_after is None:
        return [Finding("warning", "validity", "the policy never expires; set valid.not_after", line=line)]
    return []


def check_policy(policy: Policy, *, now: datetime | None = None) -> list[Finding]:
    """Findings about the policy by itself (no deployment), including its validity at `now`.

    Returns:
        Errors (assets that could leave their owner, expired or not yet valid) and warnings.
    """
    return _validity_findings(policy, now) + _static_findings(policy)


def _inside_window(policy: Policy) -> datetime | None:
    return policy.not_before or policy.not_after


def _party_findings(policy: Policy, deployment: Deployment) -> list[Finding]:
    out: list[Finding] = []
    peers = deployment.spec.peers
    for name, peer in sorted(peers.items()):
        fp = peer_fingerprint(peer.sign_key, peer.transport_key)
        party = policy.parties.get(name)
        if party is None:
            out.append(
                Finding(
                    "error",
                    "parties",
                    f"deployment peer '{name}' is not a party of the policy; add it with fingerprint {fp}",
                )
            )
        elif party.fingerprint != fp:
            out.append(
                Finding(
                    "error",
                    "parties",
                    _fingerprint_mismatch(policy, deployment, name, fp),
                    line=policy.line_of("parties", name, "fingerprint"),
                )
            )
    for name in sorted(set(policy.parties) - set(peers)):
        out.append(
            Finding(
                "error",
                "parties",
                f"party '{name}' of the policy is not a peer of deployment '{deployment.spec.name}'",
                line=policy.line_of("parties", name),
            )
        )
    return out


def _fingerprint_mismatch(policy: Policy, deployment: Deployment, name: str, fp: str) -> str:
    """Say whose key went where when a party's fingerprint does not match its deployment keys."""
    dep_file = deployment.path.name
    pol_file = policy.path.name
    listed = policy.parties[name].fingerprint
    dep_fps = {
        other: peer_fingerprint(p.sign_key, p.transport_key) for other, p in deployment.spec.peers.items()
    }
    for other, party in sorted(policy.parties.items()):
        if other != name and party.fingerprint == fp:
            line = policy.line_of("parties", other, "fingerprint")
            return (
                f"the key for {name} in {dep_file} is {other}'s: {name}'s keys there give fingerprint {fp}, "
                f"which {pol_file} lists for {other}{f' (line {line})' if line else ''}; paste {name}'s own keys "
                f"(`secure-split keys show {name}.pub`) into peers.{name} of {dep_file} (if those are "
                f"{name}'s keys, the fingerprint for {other} in {pol_file} is the one pasted wrong)"
            )
    for other, other_fp in sorted(dep_fps.items()):
        if other != name and other_fp == listed:
            return (
                f"the fingerprint for {name} in {pol_file} is {other}'s: it matches {other}'s keys in "
                f"{dep_file}; put {name}'s fingerprint there ({fp}, if {dep_file} is right; if the policy is "
                f"right, the keys for {other} in {dep_file} are {name}'s)"
            )
    return (
        f"party '{name}' has fingerprint {listed} in the policy, but its sign_key and transport_key in "
        f"{dep_file} give {fp}: one of the two keys was pasted wrong, or the policy was written for other "
        f"keys; `secure-split keys show {name}.pub` prints {name}'s keys and fingerprint to compare"
    )


def _placement_findings(policy: Policy, deployment: Deployment) -> list[Finding]:
    """Assets must sit where the deployment uses them; otherwise they would have to travel."""
    out: list[Finding] = []
    spec = deployment.spec
    parties = policy.parties
    label_holders = sorted(n for n, p in parties.items() if p.assets.labels)
    feature_holders = sorted(n for n, p in parties.items() if p.assets.features)
    peers_with_loss: set[str] = set()
    peers_with_features: set[str] = set()
    for sname, seg in sorted(spec.segments.items()):
        party = parties.get(seg.peer)
        if party is None:
            continue
        if seg.input == "features":
            peers_with_features.add(seg.peer)
            if not party.assets.features:
                out.append(
                    Finding(
                        "error",
                        "asset:features",
                        f"segment '{sname}' reads raw features at '{seg.peer}', but the policy gives "
                        f"raw features only to {feature_holders or 'no party'}: they would have to leave "
                        "their owner",
                        line=policy.line_of("parties", seg.peer, "assets"),
                    )
                )
        if seg.loss is not None:
            peers_with_loss.add(seg.peer)
            if not party.assets.labels:
                out.append(
                    Finding(
                        "error",
                        "asset:labels",
                        f"segment '{sname}' computes the loss at '{seg.peer}', which needs labels there, "
                        f"but the policy gives labels only to {label_holders or 'no party'}: labels never "
                        "leave their owner",
                        line=policy.line_of("parties", seg.peer, "assets"),
                    )
                )
    for name in label_holders:
        if name in spec.peers and name not in peers_with_loss:
            out.append(
                Finding(
                    "warning", "asset:labels", f"party '{name}' holds labels but no segment at it uses them"
                )
            )
    for name in feature_holders:
        if name in spec.peers and name not in peers_with_features:
            out.append(
                Finding(
                    "warning",
                    "asset:features",
                    f"party '{name}' holds raw features but no segment at it reads them",
                )
            )
    for name, party in sorted(parties.items()):
        for w in party.assets.weights:
            owner_seg = spec.segments.get(w)
            if owner_seg is not None and owner_seg.peer != name:
                out.append(
                    Finding(
                        "error",
                        "asset:weights",
                        f"party '{name}' lists the weights of segment '{w}', which runs at "
                        f"'{owner_seg.peer}'; a "
                        "segment's weights belong to the peer that runs it",
                        line=policy.line_of("parties", name, "assets", "weights"),
                    )
                )
    holders = policy.ckks_key_holders()
    for sname, seg in sorted(spec.segments.items()):
        if not seg.he:
            continue
        if seg.peer in holders:
            out.append(
                Finding(
                    "error",
                    "asset:ckks_secret_key",
                    f"'{seg.peer}' holds the CKKS secret key and the HE merge '{sname}': it could decrypt "
                    "every owner's activations; give the key to an owner that feeds the merge",
                    line=policy.line_of("parties", seg.peer, "assets", "ckks_secret_key"),
                )
            )
        elif not holders & set(spec.peers):
            kh = he_key_holder(deployment, sname, policy)
            out.append(
                Finding(
                    "warning",
                    "asset:ckks_secret_key",
                    f"no party holds ckks_secret_key; '{kh}' will hold the CKKS secret key for merge "
                    f"'{sname}' "
                    "by default; say so in the policy",
                )
            )
    return out


def _flow_findings(policy: Policy, deployment: Deployment) -> list[Finding]:
    out: list[Finding] = []
    t = _inside_window(policy)
    denied: dict[tuple[str, str, str | None, str], list[str]] = {}
    reasons: dict[tuple[str, str, str | None, str], tuple[str, str]] = {}
    training = deployment.spec.training
    batch = training.batch_size
    for rf in required_flows(deployment, policy=policy):
        if rf.serving:
            continue  # split inference only: `predict` checks these before it sends anything
        d = policy.decide_route(rf.sender, rf.receiver, rf.kind, rf.edge, now=t)
        if not d.allowed:
            key = (rf.sender, rf.receiver, rf.edge, d.rule_id)
            denied.setdefault(key, []).append(rf.kind)
            reasons.setdefault(key, (rf.why, d.reason))
            continue
        rule = policy.rule(d.rule_id)
        if rule is not None and rule.constraints.min_batch is not None and rule.constraints.min_batch > batch:
            out.append(
                Finding(
                    "error",
                    rule.id,
                    f"rule '{rule.id}' requires batches of at least {rule.constraints.min_batch}, but "
                    f"the deployment sends batches of {batch} (training.batch_size) "
                    f"{rf.sender} -> {rf.receiver} kind '{rf.kind}'",
                    edge=rf.edge,
                    line=rule.line,
                )
            )
    for (sender, receiver, edge, rule_id), kinds in denied.items():
        why, reason = reasons[(sender, receiver, edge, rule_id)]
        listed = ", ".join(f"'{k}'" for k in kinds)
        rule = policy.rule(rule_id)
        out.append(
            Finding(
                "error",
                rule_id,
                f"the deployment needs {sender} -> {receiver} kind{'s' if len(kinds) > 1 else ''} {listed} "
                f"({why}), but the policy denies it: {reason}",
                edge=edge,
                line=rule.line if rule is not None else None,
            )
        )
    return out


def _edge_requirement_findings(req: EdgeRequirement, deployment: Deployment) -> list[Finding]:
    spec = deployment.spec
    seg_peer = {s: seg.peer for s, seg in spec.segments.items()}
    if req.edge == WILDCARD:
        edges = [e for e in spec.edges if seg_peer.get(e.from_) != seg_peer.get(e.to)]
    else:
        edges = [e for e in spec.edges if e.name == req.edge]
        if not edges:
            return [
                Finding(
                    "error",
                    "require:edges",
                    f"the policy requires protections on edge {req.edge}, which deployment "
                    f"'{spec.name}' does not have",
                    edge=req.edge,
                    line=req.line,
                )
            ]
    out: list[Finding] = []
    for e in edges:
        p = e.protections
        where = f"edges[{spec.edges.index(e)}].protections"
        for key, minimum, have in (
            ("nopeek_alpha", req.nopeek_alpha, p.nopeek_alpha),
            ("activation_noise_std", req.activation_noise_std, p.activation_noise_std),
            ("gradient_noise_std", req.gradient_noise_std, p.gradient_noise_std),
        ):
            if minimum is not None and have < minimum:
                out.append(
                    Finding(
                        "error",
                        f"require:{key}",
                        f"the policy requires {key} ≥ {minimum}; the deployment sets {have} ({where}.{key})",
                        edge=e.name,
                        line=req.line,
                    )
                )
        if req.gradient_clip_norm is not None and (
            p.gradient_clip_norm is None or p.gradient_clip_norm > req.gradient_clip_norm
        ):
            out.append(
                Finding(
                    "error",
                    "require:gradient_clip_norm",
                    f"the policy requires gradient_clip_norm ≤ {req.gradient_clip_norm}; the deployment sets "
                    f"{p.gradient_clip_norm} ({where}.gradient_clip_norm)",
                    edge=e.name,
                    line=req.line,
                )
            )
        if req.label_defence is not None and p.label_defence not in req.label_defence:
            out.append(
                Finding(
                    "error",
                    "require:label_defence",
                    f"the policy requires label_defence {' or '.join(sorted(req.label_defence))}; "
                    f"the deployment sets {p.label_defence} ({where}.label_defence)",
                    edge=e.name,
                    line=req.line,
                )
            )
    return out


def _protection_findings(policy: Policy, deployment: Deployment) -> list[Finding]:
    out: list[Finding] = []
    for req in policy.requirements.edges:
        out += _edge_requirement_findings(req, deployment)
    spec = deployment.spec
    line = policy.line_of("require", "he_merge")
    wanted = policy.requirements.he_merge
    if wanted is None:
        for sname, seg in sorted(spec.segments.items()):
            owners = he_merge_owners(deployment, sname)
            if seg.merge is not None and len(owners) >= 2 and not seg.he:
                how = (
                    "set he: true" if seg.merge in ("sum", "mean") else "use merge: sum or mean with he: true"
                )
                out.append(
                    Finding(
                        "error",
                        "require:he_merge",
                        f"merge '{sname}' combines plain activations of {owners}; the policy requires HE "
                        f"aggregation at every merge point ({how})",
                        line=line,
                    )
                )
    else:
        for sname in sorted(wanted):
            merge_seg = spec.segments.get(sname)
            if merge_seg is None:
                out.append(
                    Finding(
                        "error",
                        "require:he_merge",
                        f"the policy requires HE aggregation at '{sname}', which is not a segment "
                        "of the deployment",
                        line=line,
                    )
                )
            elif not merge_seg.he:
                out.append(
                    Finding(
                        "error",
                        "require:he_merge",
                        f"the policy requires HE aggregation at merge '{sname}'; set he: true "
                        "(with merge: sum or mean) on that segment",
                        line=line,
                    )
                )
    return out


def _architecture_findings(policy: Policy, deployment: Deployment) -> list[Finding]:
    """`require.public_architecture`: these segments' models must be in the deployment, not only
    their commitments."""
    wanted = policy.requirements.public_architecture
    segments = deployment.spec.segments
    names = sorted(segments) if wanted is None else sorted(wanted)
    line = policy.line_of("require", "public_architecture")
    out = []
    for sname in names:
        seg = segments.get(sname)
        if seg is None:
            out.append(Finding("error", "require:public_architecture", f"the policy requires a public "
                               f"architecture for '{sname}', which is not a segment of the deployment", line=line))
        elif seg.model is None:
            out.append(Finding("error", "require:public_architecture", f"the policy requires a public architecture "
                               f"for segment '{sname}', but the deployment holds only its commitment: publish "
                               f"its model in the deployment (segments.{sname}.model), or change the policy",
                               line=line))
    return out


def check_deployment(policy: Policy, deployment: Deployment) -> list[Finding]:
    """Check a policy against a deployment (independent of the current time and of signatures).

    Returns:
        The policy's own findings plus: party/peer and fingerprint mismatches, assets placed where
        the deployment cannot use them without moving them, every required flow the policy denies
        (with the edge and the denying rule), constraints the deployment cannot meet (min_batch),
        and required protections it does not configure (HE merges, public architectures).
    """
    out: list[Finding] = []
    if policy.path.resolve() != deployment.policy_path:
        out.append(
            Finding(
                "warning",
                "path",
                f"deployment '{deployment.spec.name}' names policy {deployment.policy_path}, not "
                f"{policy.path}",
            )
        )
    out += _static_findings(policy)
    out += _party_findings(policy, deployment)
    out += _placement_findings(policy, deployment)
    out += _flow_findings(policy, deployment)
    out += _protection_findings(policy, deployment)
    out += _architecture_findings(policy, deployment)
    return out


def check_startup(
    policy: Policy | str | Path, deployment: Deployment, *, now: datetime | None = None
) -> None:
    """Refuse to start unless the policy is valid now, signed by every party, and fits the deployment.

    Args:
        policy: the loaded policy, or its path (loaded here).
        deployment: the validated deployment.
        now: the time to judge validity at (default: now).

    Raises:
        PolicyError: listing everything that prevents the start: an unreadable or invalid policy,
            expired or not yet valid, missing/invalid/stale signatures (a policy file changed after
            signing), flows the deployment needs that the policy denies (with edge and rule),
            required protections missing, assets that would leave their owner, unknown parties.
    """
    if not isinstance(policy, Policy):
        try:
            policy = load_policy(policy)
        except ConfigError as exc:
            raise PolicyError(f"the policy cannot be used:\n{exc}") from exc
    problems = [str(f) for f in _validity_findings(policy, now) if f.severity == "error"]
    problems += [str(f) for f in check_deployment(policy, deployment) if f.severity == "error"]
    problems += [f"error: [signature] {p.message}" for p in signature_problems(policy, deployment)]
    if problems:
        head = (
            f"deployment '{deployment.spec.name}' cannot start under policy '{policy.name}' "
            f"v{policy.version} "
            f"(hash {policy.hash[:16]}...): {len(problems)} problem{'s' if len(problems) != 1 else ''}"
        )
        raise PolicyError("\n".join([head, *(f"  - {p}" for p in problems)]))
