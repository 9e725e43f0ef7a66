"""The flows a deployment needs: what its topology will send, derived from the deployment alone.

At startup every peer checks each of these against the policy (`check_deployment`), so a run
never starts only to be refused on its first step. The rules, one per kind of traffic:

- a cut edge whose segments run on different peers: `activation` FROM -> TO and `gradient`
  TO -> FROM on that edge; if the edge enters a merge segment with `he: true`, instead
  `encrypted_activation` forward and `aggregate_gradient` back (plain activations would show
  each owner's values to the merge holder);
- the coordinator and every other peer: all control kinds, both ways;
- every pair of peers that exchange anything: `hello`, `refuse`, `error`,
  `audit_receipt`, both ways;
- serving (split inference, `secure-split serve` / `predict`): for every party that can ask for
  predictions, the flows of its request (`secure_split.inference_routes`): a session, a
  `barrier` that opens the request and its `barrier_ack` between the requester and each server,
  `step_begin` with the ids to each party that reads rows for them, `psi` among those parties
  and the requester, the request's cut activations (and HE merge flows), and `prediction` from
  the holder of each output to the requester. Those that training does not use already have
  `serving=True`: a training run does not need them, so the startup check and the peers a
  training run talks to leave them out, and a training-only policy may deny them;
- each HE merge point: the CKKS key holder sends `he_context` (public context) to the merge
  holder and the other owners; `masked_aggregate` both ways between merge holder and key holder;
- vertical training (schedule `sync`) with two or more peers reading raw features: `psi`
  between the coordinator and every such peer, both ways (private set intersection of ids);
- horizontal training (schedule `sequential` or `splitfed`; owners per
  `config.horizontal_owners`): owners' weights travel as `encrypted_weights`, sealed to the
  receiving owner, between every two owners (`handoff: direct`) or to and from the coordinator,
  which relays what it cannot open (`handoff: relay`); with `splitfed` and `average: he`
  instead to and from the coordinator, which adds CKKS ciphertexts, and the first owner (the
  CKKS key holder) sends `he_context`: public to the coordinator, secret sealed to each other
  owner (relayed by the coordinator or direct, per `handoff`). Where the coordinator holds
  labels, `psi` both ways with each owner (which labelled ids the owner holds).
"""

from __future__ import annotations

from dataclasses import dataclass

from secure_split.canonical import digest_of
from secure_split.config import Deployment, horizontal_owners
from secure_split.inference_routes import requesters
from secure_split.policy.kinds import CONTROL_KINDS, KINDS, SESSION_KINDS
from secure_split.policy.model import Policy


@dataclass(frozen=True)
class RequiredFlow:
    """One route a deployment needs: sender -> receiver, kind, edge (None for no edge), and why.

    `serving` marks a route only split inference uses (a `prediction`, a requester's session with
    a peer it never talks to in training), not training.
    """

    sender: str
    receiver: str
    kind: str
    edge: str | None
    why: str
    serving: bool = False


def he_merge_owners(deployment: Deployment, merge_segment: str) -> list[str]:
    """Peers (other than the merge holder) whose segments feed `merge_segment`, sorted."""
    spec = deployment.spec
    holder = spec.segments[merge_segment].peer
    return sorted(
        {
            spec.segments[e.from_].peer
            for e in spec.edges
            if e.to == merge_segment and e.from_ in spec.segments
        }
        - {holder}
    )


def he_key_holder(deployment: Deployment, merge_segment: str, policy: Policy | None = None) -> str | None:
    """The peer that holds the CKKS secret key for an HE merge point.

    The policy decides: a peer other than the merge holder whose party has
    `assets.ckks_secret_key: true` (owners feeding the merge first). Without one, the first
    owner (by name) that feeds the merge. Never the merge holder itself.

    Returns:
        The peer name, or None if no other peer feeds the merge.
    """
    spec = deployment.spec
    holder = spec.segments[merge_segment].peer
    owners = he_merge_owners(deployment, merge_segment)
    if policy is not None:
        named = sorted(policy.ckks_key_holders() & set(spec.peers) - {holder})
        preferred = [p for p in named if p in owners] or named
        if preferred:
            return preferred[0]
    return owners[0] if owners else None


def psi_parties(deployment: Deployment) -> list[str]:
    """The parties of the ID-alignment PSI, coordinator first; empty when none is needed.

    Vertical training (schedule `sync` with two or more peers reading raw features) aligns the
    sample ids of the coordinator and every feature owner before the first step.
    """
    spec = deployment.spec
    feature_peers = sorted({seg.peer for seg in spec.segments.values() if seg.input == "features"})
    if spec.training.schedule != "sync" or len(feature_peers) < 2:
        return []
    return [spec.coordinator, *[p for p in feature_peers if p != spec.coordinator]]


def shared_models(deployment: Deployment) -> dict[str, list[str]]:
    """Segments reading raw features that have the same model at two or more peers.

    Returns:
        Shared model name ("shared_" + first segment name) -> the segments, sorted.
    """
    spec = deployment.spec
    groups: dict[str, list[str]] = {}
    for sname, seg in sorted(spec.segments.items()):
        if seg.input == "features":
            groups.setdefault(digest_of([seg.model, seg.commitment, seg.parameters]), []).append(sname)
    out: dict[str, list[str]] = {}
    for segs in groups.values():
        if len({spec.segments[s].peer for s in segs}) >= 2:
            out[("shared_" + segs[0])[:63]] = segs
    return out


def required_flows(deployment: Deployment, *, policy: Policy | None = None) -> list[RequiredFlow]:
    """Every route the deployment's topology and schedule will use (see the module docstring).

    Args:
        deployment: the validated deployment.
        policy: only used to learn who holds the CKKS secret key at HE merge points.

    Returns:
        Required flows without duplicates, in a stable order.
    """
    spec = deployment.spec
    seg_peer = {s: seg.peer for s, seg in spec.segments.items()}
    flows: dict[tuple[str, str, str, str | None], str] = {}

    def add(sender: str, receiver: str, kind: str, edge: str | None, why: str) -> None:
        if sender != receiver:
            flows.setdefault((sender, receiver, kind, edge), why)

    for e in spec.edges:
        pf, pt = seg_peer.get(e.from_), seg_peer.get(e.to)
        if pf is None or pt is None or pf == pt:
            continue
        if spec.segments[e.to].he:
            why = f"edge {e.name} enters merge '{e.to}', which aggregates under HE"
            add(pf, pt, "encrypted_activation", e.name, why)
            add(pt, pf, "aggregate_gradient", e.name, why)
        else:
            add(pf, pt, "activation", e.name, f"edge {e.name} carries '{e.from_}' outputs forward")
            add(pt, pf, "gradient", e.name, f"edge {e.name} carries gradients back to '{e.from_}'")

    for sname, seg in sorted(spec.segments.items()):
        if not seg.he:
            continue
        holder = seg.peer
        key_holder = he_key_holder(deployment, sname, policy)
        if key_holder is None:
            continue
        for q in sorted({*he_merge_owners(deployment, sname), holder} - {key_holder}):
            add(
                key_holder,
                q,
                "he_context",
                None,
                f"{key_holder} holds the CKKS secret key for merge '{sname}'",
            )
        why = f"{holder} masks the encrypted sum at merge '{sname}' for {key_holder} to decrypt"
        add(holder, key_holder, "masked_aggregate", None, why)
        add(key_holder, holder, "masked_aggregate", None, why)

    coordinator = spec.coordinator
    parties = psi_parties(deployment)
    # The multi-party PSI passes blinded sets around a ring of all parties, so every pair talks.
    for a in parties:
        for b in parties:
            add(a, b, "psi", None, f"vertical training: {', '.join(parties)} align sample ids by PSI")
    owners = list(horizontal_owners(spec))
    if len(owners) >= 2:
        training = spec.training
        relay = training.handoff == "relay"
        if training.schedule == "splitfed" and training.average == "he":
            why = f"splitfed schedule averages the owners' weights at {coordinator} under HE"
            for a in owners:
                add(a, coordinator, "encrypted_weights", None, why)
                add(coordinator, a, "encrypted_weights", None, why)
            key_holder = owners[0]
            add(key_holder, coordinator, "he_context", None,
                f"{key_holder} holds the CKKS secret key for weight averaging ({coordinator} gets the public context)")
            for o in owners[1:]:
                why = f"{key_holder} shares the CKKS secret context with {o}, sealed to it"
                if relay:
                    add(key_holder, coordinator, "he_context", None, why + f" and relayed by {coordinator}")
                    add(coordinator, o, "he_context", None, why + f" and relayed by {coordinator}")
                else:
                    add(key_holder, o, "he_context", None, why)
        else:
            what = ("hands the owners' weights from owner to owner" if training.schedule == "sequential"
                    else "averages the owners' weights among the owners")
            why = f"{training.schedule} schedule {what}, sealed to the receiving owner"
            for a in owners:
                if relay:
                    add(a, coordinator, "encrypted_weights", None, why + f" and relayed by {coordinator}")
                    add(coordinator, a, "encrypted_weights", None, why + f" and relayed by {coordinator}")
                else:
                    for b in owners:
                        add(a, b, "encrypted_weights", None, why)
        if any(spec.segments[s].peer == coordinator and spec.segments[s].loss for s in spec.segments):
            for o in owners:
                why = f"{coordinator} learns which of its labelled ids {o} holds by two-party PSI"
                add(coordinator, o, "psi", None, why)
                add(o, coordinator, "psi", None, why)

    for peer in sorted(spec.peers):
        if peer == coordinator:
            continue
        for kind in KINDS:
            if kind in CONTROL_KINDS:
                add(coordinator, peer, kind, None, f"{coordinator} coordinates the run")
                add(peer, coordinator, kind, None, f"{coordinator} coordinates the run")

    pairs = sorted({tuple(sorted((s, r))) for (s, r, _, _) in flows})
    for a, b in pairs:
        for kind in SESSION_KINDS:
            add(a, b, kind, None, f"{a} and {b} hold a session")
            add(b, a, kind, None, f"{a} and {b} hold a session")

    training_flows = set(flows)
    key_holders = {s: he_key_holder(deployment, s, policy) for s, seg in spec.segments.items() if seg.he}
    for routes in requesters(deployment, key_holders).values():
        for f in routes.flows():
            add(f.sender, f.receiver, f.kind, f.edge, f.why)
    return [RequiredFlow(s, r, k, e, why, serving=(s, r, k, e) not in training_flows)
            for (s, r, k, e), why in flows.items()]
