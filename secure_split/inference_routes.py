"""Which peers, segments and flows one split prediction request uses (torch-free: the policy
derives its serving flows from here, the peer runs its requests from here).

A request is a forward pass of the trained topology, run by the party that wants the output
(`secure-split predict`, the **requester**) with the others serving (`secure-split serve`):

- the requester names the ids; it reads its own rows where it owns an input segment;
- **sync** deployments (vanilla, U-shaped, multi-hop, multi-task, vertical, vertical-HE): the
  request runs the requester's output segments and everything they need, or, for a requester
  that holds no output, every output its input segments reach (multi-task: every head). Every
  input segment it needs runs at its owner, on that owner's rows for the requested ids (a
  vertical hospital serves its columns);
- **horizontal** deployments (sequential, splitfed): only a data owner asks; its input segments
  and what they reach outside the other owners run (its bottom and the shared top, or its head,
  the shared middle and its tail).

Where the request's rows live at parties other than the requester (`row_holders`), the ids are
aligned by PSI among the requester and those parties (`psi_parties`): each learns which of its
own ids are requested and held by all, nothing of ids it does not hold. Elsewhere the servers
see batch positions only, never ids.

The flows of a request (`RequestRoutes.flows`): handshake, refusals and signed heads between the
requester and every server; a `barrier` that opens the request and a `barrier_ack` per server;
`step_begin` with the ids to each row holder; `psi` among the PSI parties; the cut activations
of the request's edges (ciphertexts into an HE merge, whose CKKS context and masked decryption
flow as in training); `prediction` from the holder of each output to the requester where they
differ, on the requester's own edge into that output, or on no edge where it has none (a chain).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from secure_split.config import Deployment
from secure_split.errors import ConfigError, ConfigProblem
from secure_split.topology import Topology

__all__ = ["RequestFlow", "RequestRoutes", "request_routes", "requesters"]

_SESSION_KINDS = ("hello", "refuse", "error", "audit_receipt")


@dataclass(frozen=True)
class RequestFlow:
    """One route a request uses: sender -> receiver, kind, edge (None for none), and why."""

    sender: str
    receiver: str
    kind: str
    edge: str | None
    why: str


@dataclass(frozen=True)
class RequestRoutes:
    """Who and what one requester's prediction request involves (see the module docstring).

    Attributes:
        requester: the party that asks (runs `predict`).
        peers: every party of the request, sorted (requester included).
        segments: the segments that run, in topological order.
        edges: the edges that carry activations (both ends run), in deployment order.
        outputs: the segments whose argmax is the prediction.
        row_holders: the parties whose input segments run (they read rows for the ids), sorted.
        he_merges: HE merge segment of the request -> the peer that holds its CKKS secret key.
        owners: segment -> its peer, for the segments that run.
    """

    requester: str
    peers: tuple[str, ...]
    segments: tuple[str, ...]
    edges: tuple[str, ...]
    outputs: tuple[str, ...]
    row_holders: tuple[str, ...]
    he_merges: Mapping[str, str]
    owners: Mapping[str, str] = field(repr=False)
    _edge_ends: Mapping[str, tuple[str, str]] = field(repr=False)
    _he_feeders: Mapping[str, tuple[str, ...]] = field(repr=False)

    @property
    def servers(self) -> tuple[str, ...]:
        """The parties other than the requester (they run `serve`)."""
        return tuple(p for p in self.peers if p != self.requester)

    @property
    def psi_parties(self) -> tuple[str, ...]:
        """The parties of the request's PSI, requester first; empty where only the requester
        holds rows (the servers then see batch positions, never ids)."""
        others = [p for p in self.row_holders if p != self.requester]
        return (self.requester, *others) if others else ()

    def output_peer(self, output: str) -> str:
        """The peer that computes `output`."""
        return self.owners[output]

    def prediction_edge(self, output: str) -> str | None:
        """The edge the prediction of `output` travels on: the requester's own edge into it, or
        None where it has none (the prediction of a chain's top)."""
        for e in self.edges:
            a, b = self._edge_ends[e]
            if b == output and self.owners[a] == self.requester:
                return e
        return None

    def local_outputs(self, peer: str) -> tuple[str, ...]:
        """The outputs `peer` computes."""
        return tuple(o for o in self.outputs if self.owners[o] == peer)

    def flows(self) -> list[RequestFlow]:
        """Every route the request uses, without duplicates, in a stable order."""
        out: dict[tuple[str, str, str, str | None], str] = {}

        def add(a: str, b: str, kind: str, edge: str | None, why: str) -> None:
            if a != b:
                out.setdefault((a, b, kind, edge), why)

        r = self.requester
        for s in self.servers:
            why = f"serving: {r} opens its prediction request at {s}"
            add(r, s, "barrier", None, why)
            add(s, r, "barrier_ack", None, why)
        for s in self.row_holders:
            add(r, s, "step_begin", None, f"serving: {r} names the ids of each batch to {s}, which reads its rows")
        for e in self.edges:
            a, b = (self.owners[x] for x in self._edge_ends[e])
            target = self._edge_ends[e][1]
            if target in self.he_merges:
                add(a, b, "encrypted_activation", e, f"serving: edge {e} enters HE merge '{target}'")
            else:
                add(a, b, "activation", e, f"serving: edge {e} carries '{self._edge_ends[e][0]}' outputs forward")
        parties = self.psi_parties
        for a in parties:
            for b in parties:
                add(a, b, "psi", None, f"serving: {', '.join(parties)} align the requested ids by PSI")
        for seg, kh in self.he_merges.items():
            holder = self.owners[seg]
            for q in sorted({holder, *self._he_feeders[seg]} - {kh}):
                add(kh, q, "he_context", None, f"serving: {kh} holds the CKKS secret key for merge '{seg}'")
            why = f"serving: {holder} masks the encrypted sum at merge '{seg}' for {kh} to decrypt"
            add(holder, kh, "masked_aggregate", None, why)
            add(kh, holder, "masked_aggregate", None, why)
        for o in self.outputs:
            holder = self.owners[o]
            add(holder, r, "prediction", self.prediction_edge(o),
                f"serving: {holder} returns the predictions of '{o}' to {r}, which asked for them")
        pairs = sorted({tuple(sorted((a, b))) for (a, b, _, _) in out})
        for a, b in pairs:
            for kind in _SESSION_KINDS:
                add(a, b, kind, None, f"serving: {a} and {b} hold a session for {r}'s requests")
                add(b, a, kind, None, f"serving: {a} and {b} hold a session for {r}'s requests")
        return [RequestFlow(a, b, k, e, why) for (a, b, k, e), why in out.items()]

    def links(self, peer: str) -> tuple[str, ...]:
        """The parties `peer` exchanges messages with in this request, sorted (its signed heads
        go to each of them when the request closes)."""
        got = {f.receiver if f.sender == peer else f.sender for f in self.flows() if peer in (f.sender, f.receiver)}
        got.discard(peer)
        return tuple(sorted(got))


def request_routes(deployment: Deployment, requester: str, key_holders: Mapping[str, str | None], *,
                   topology: Topology | None = None) -> RequestRoutes:
    """The routes of `requester`'s prediction request (see the module docstring).

    Args:
        deployment: the trained deployment.
        requester: the party that asks.
        key_holders: HE merge segment -> the peer that holds its CKKS secret key (from the
            policy: `policy.he_key_holder`).
        topology: the deployment's topology, where the caller has it already.

    Raises:
        ConfigError: `requester` cannot ask (it holds no input and no output, or a horizontal
            deployment's non-owner), or a party of the request would hold a segment the request
            does not reach; every reason listed.
    """
    topo = topology or Topology.from_deployment(deployment)
    where = str(deployment.path)
    spec = deployment.spec
    if requester not in spec.peers:
        raise ConfigError(ConfigProblem(where, "peers", f"'{requester}' is not a peer of this deployment"))
    horizontal = spec.training.schedule in ("sequential", "splitfed")
    mine = topo.local_segments(requester)
    inputs = [s for s in mine if topo.segments[s].input == "features"]
    outputs_here = [s for s in mine if not topo.out_edges[s]]
    if horizontal:
        if not inputs:
            raise ConfigError(ConfigProblem(where, "segments", (
                f"'{requester}' owns no segment that reads features: in a {spec.training.schedule} deployment only "
                "a data owner asks for predictions, of its own rows")))
        owners = {topo.peer_of(s) for s in topo.input_segments}
        allowed = {s for s in topo.order if topo.peer_of(s) == requester or topo.peer_of(s) not in owners}
        run = _reach(topo, inputs, allowed)
    else:
        if not inputs and not outputs_here:
            raise ConfigError(ConfigProblem(where, "segments", (
                f"'{requester}' owns neither a segment that reads features nor an output segment, so it has no "
                "rows to predict and no prediction to receive: a data owner or a holder of an output asks")))
        targets = outputs_here or [s for s in _reach(topo, inputs, set(topo.order)) if not topo.out_edges[s]]
        run = _ancestors(topo, targets)
    segments = tuple(s for s in topo.order if s in run)
    edges = tuple(e for e in topo.edges if topo.edges[e].from_ in run and topo.edges[e].to in run)
    feeding = {topo.edges[e].from_ for e in edges}
    outputs = tuple(s for s in segments if s not in feeding)
    problems: list[str] = []
    he: dict[str, str] = {}
    for s in segments:
        if topo.segments[s].he:
            kh = key_holders.get(s)
            if kh is None:
                problems.append(f"HE merge '{s}' has no CKKS key holder")
            else:
                he[s] = kh
    computing = {topo.peer_of(s) for s in segments}
    for p in sorted(computing):
        idle = [s for s in topo.local_segments(p) if s not in run]
        if idle and not horizontal:
            problems.append(f"'{p}' also holds {idle}, which a request of '{requester}' does not reach: a party "
                            "runs all its segments or none")
    if problems:
        raise ConfigError([ConfigProblem(where, "segments", f"split inference for '{requester}': {p}") for p in problems])
    peers = tuple(sorted(computing | {requester} | set(he.values())))
    rows = tuple(sorted({topo.peer_of(s) for s in segments if topo.segments[s].input == "features"}))
    return RequestRoutes(
        requester=requester, peers=peers, segments=segments, edges=edges, outputs=outputs, row_holders=rows,
        he_merges=he, owners={s: topo.peer_of(s) for s in segments},
        _edge_ends={e: topo.endpoints(e) for e in edges},
        _he_feeders={s: topo.he_feeders(s) for s in he},
    )


def requesters(deployment: Deployment, key_holders: Mapping[str, str | None]) -> dict[str, RequestRoutes]:
    """Every party that can ask for predictions, with its request's routes, by name."""
    out = {}
    topo = Topology.from_deployment(deployment)
    for peer in sorted(deployment.spec.peers):
        try:
            out[peer] = request_routes(deployment, peer, key_holders, topology=topo)
        except ConfigError:
            continue
    return out


def _reach(topo: Topology, start: list[str], allowed: set[str]) -> set[str]:
    """`start` and every segment reachable from it through segments in `allowed`."""
    seen = set(start)
    for s in topo.order:
        if s in seen:
            continue
        if s in allowed and any(topo.edges[e].from_ in seen for e in topo.in_edges[s]):
            seen.add(s)
    return seen


def _ancestors(topo: Topology, targets: list[str]) -> set[str]:
    """`targets` and every segment any of them depends on."""
    seen = set(targets)
    for s in reversed(topo.order):
        if s in seen:
            seen.update(topo.edges[e].from_ for e in topo.in_edges[s])
    return seen
