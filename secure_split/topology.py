"""The DAG of segments and edges of a deployment, and who owns what (no torch: config, policy,
peer and engine all read the topology from here).

`load_deployment` has already checked that every reference resolves and that there is no cycle;
this module only derives views of it: a topological order, per-segment in/out edges (in the order
the deployment lists them: that order is the concat order of a merge), per-peer segments and
neighbours, the peers at both ends of each edge, the HE merge points and who feeds them, and the
task name of each loss segment. Nobody else parses an edge id ("FROM->TO").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from secure_split.config import Deployment, EdgeSpec, SegmentSpec

__all__ = ["Topology"]


@dataclass(frozen=True)
class Topology:
    """A deployment's segments and edges, with derived views. Build with `from_deployment`.

    Attributes:
        order: every segment, in a topological order (ties broken by the deployment's order).
        segments: segment name -> its spec.
        edges: edge id ("FROM->TO") -> its spec.
        in_edges: segment -> ids of the edges entering it, in deployment order.
        out_edges: segment -> ids of the edges leaving it, in deployment order.
        tasks: task name -> loss segment. The task name is the segment's `labels` column, or the
            segment's name when several loss segments use the same column.
    """

    order: tuple[str, ...]
    segments: Mapping[str, SegmentSpec]
    edges: Mapping[str, EdgeSpec]
    in_edges: Mapping[str, tuple[str, ...]]
    out_edges: Mapping[str, tuple[str, ...]]
    tasks: Mapping[str, str]

    @classmethod
    def from_deployment(cls, dep: Deployment) -> Topology:
        """Derive the topology of a loaded (validated) deployment.

        Raises:
            ValueError: if the edges form a cycle (only possible for an unvalidated spec).
        """
        spec = dep.spec
        names = list(spec.segments)
        edges = {e.name: e for e in spec.edges}
        ins: dict[str, list[str]] = {s: [] for s in names}
        outs: dict[str, list[str]] = {s: [] for s in names}
        for e in spec.edges:
            outs[e.from_].append(e.name)
            ins[e.to].append(e.name)
        # Kahn's algorithm, always taking the first ready segment in deployment order, so the
        # order is the same at every party.
        pending = {s: len(ins[s]) for s in names}
        order: list[str] = []
        while len(order) < len(names):
            ready = [s for s in names if pending[s] == 0 and s not in order]
            if not ready:
                raise ValueError("the edges form a cycle; the topology must be a DAG")
            s = ready[0]
            order.append(s)
            for eid in outs[s]:
                pending[edges[eid].to] -= 1
        loss_segments = [s for s in order if spec.segments[s].loss is not None]
        columns = [spec.segments[s].labels for s in loss_segments]
        tasks = {
            (spec.segments[s].labels if columns.count(spec.segments[s].labels) == 1 else s): s
            for s in loss_segments
        }
        return cls(
            order=tuple(order),
            segments=dict(spec.segments),
            edges=edges,
            in_edges={s: tuple(v) for s, v in ins.items()},
            out_edges={s: tuple(v) for s, v in outs.items()},
            tasks=tasks,
        )

    # --- ownership -----------------------------------------------------------------------

    @property
    def peers(self) -> tuple[str, ...]:
        """Every peer that owns at least one segment, in order of first segment."""
        return tuple(dict.fromkeys(self.segments[s].peer for s in self.order))

    def peer_of(self, segment: str) -> str:
        """The peer that owns `segment`. Raises KeyError for an unknown segment."""
        return self.segments[segment].peer

    def overlap_peers(self) -> frozenset[str]:
        """The peers that may begin training steps ahead under `training.pipeline_depth` (and
        `training.overlap`, depth 2): no loss and no HE merge among their segments, and every edge
        into them comes from such a peer (so the next step's inputs can arrive early). The data owner of a vanilla split, every peer of a
        chain but the label holder; nobody in U-shaped (the owner holds the loss, so the server's
        inputs never come early)."""
        able = set(self.peers)
        changed = True
        while changed:
            changed = False
            for peer in sorted(able):
                for s in self.local_segments(peer):
                    spec = self.segments[s]
                    upstream = {self.peer_of(self.edges[e].from_) for e in self.in_edges[s]}
                    if spec.loss is not None or spec.he or not upstream <= able:
                        able.discard(peer)
                        changed = True
                        break
        return frozenset(able)

    def local_segments(self, peer: str) -> tuple[str, ...]:
        """The segments `peer` owns, in topological order (empty for a peer with none)."""
        return tuple(s for s in self.order if self.segments[s].peer == peer)

    def endpoints(self, edge: str) -> tuple[str, str]:
        """(from segment, to segment) of an edge. Raises KeyError for an unknown edge."""
        e = self.edges[edge]
        return e.from_, e.to

    def is_remote(self, edge: str) -> bool:
        """True when the two ends of `edge` belong to different peers (it crosses the wire)."""
        a, b = self.endpoints(edge)
        return self.peer_of(a) != self.peer_of(b)

    def edge_peers(self, edge: str) -> tuple[str, str]:
        """(peer of the `from` segment, peer of the `to` segment). Raises KeyError for an unknown edge."""
        a, b = self.endpoints(edge)
        return self.peer_of(a), self.peer_of(b)

    def neighbours(self, peer: str) -> set[str]:
        """The other peers that share at least one edge with `peer`."""
        out: set[str] = set()
        for eid in self.edges:
            a, b = (self.peer_of(s) for s in self.endpoints(eid))
            if a == peer and b != peer:
                out.add(b)
            elif b == peer and a != peer:
                out.add(a)
        return out

    @property
    def he_segments(self) -> tuple[str, ...]:
        """Merge segments that add their inputs under CKKS (`he: true`), in topological order."""
        return tuple(s for s in self.order if self.segments[s].he)

    def he_feeders(self, segment: str) -> tuple[str, ...]:
        """The peers (other than its holder) whose segments feed merge `segment`, sorted."""
        holder = self.peer_of(segment)
        return tuple(sorted({self.peer_of(self.edges[e].from_) for e in self.in_edges[segment]} - {holder}))

    # --- roles -------------------------------------------------------------------------------

    @property
    def loss_segments(self) -> tuple[str, ...]:
        """Segments that compute a loss, in topological order."""
        return tuple(s for s in self.order if self.segments[s].loss is not None)

    @property
    def input_segments(self) -> tuple[str, ...]:
        """Segments that read their peer's raw features, in topological order."""
        return tuple(s for s in self.order if self.segments[s].input == "features")

    def task_of(self, segment: str) -> str:
        """The task name of a loss segment. Raises KeyError if it computes no loss."""
        for task, seg in self.tasks.items():
            if seg == segment:
                return task
        raise KeyError(f"segment {segment!r} computes no loss")

    @property
    def output_segments(self) -> tuple[str, ...]:
        """Segments with no out-edges (their outputs are the network's predictions)."""
        return tuple(s for s in self.order if not self.out_edges[s])
