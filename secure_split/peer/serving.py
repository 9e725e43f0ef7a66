"""Which peers and segments a split prediction involves, and where predictions are written.

Topologies served: every segment a request reaches is at the owner or fed directly by it or by
the server itself, and every output segment is at the owner or fed directly by the owner
(vanilla, U-shaped, multi-task, horizontal owners). Multi-hop chains (a prediction would pass
peers that hold no session with the owner) and vertical merges (one owner cannot feed a merge of
several owners) are refused with a configuration error.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from secure_split.config import Deployment
from secure_split.errors import ConfigError, ConfigProblem
from secure_split.topology import Topology

__all__ = ["InferencePlan", "inference_clients", "inference_plan", "prediction_edge", "write_predictions"]


@dataclass(frozen=True)
class InferencePlan:
    """What one owner's prediction request involves.

    Attributes:
        owner: the data owner asking.
        servers: the other peers whose segments the request runs through.
        local_outputs: output segments at the owner (U-shaped tail): predicted here.
        remote_outputs: output segment -> (its peer, the owner's edge into it): that peer returns
            a `prediction` message on that edge.
    """

    owner: str
    servers: tuple[str, ...]
    local_outputs: tuple[str, ...]
    remote_outputs: Mapping[str, tuple[str, str]]

    @property
    def outputs(self) -> tuple[str, ...]:
        """Every output segment, local first."""
        return (*self.local_outputs, *self.remote_outputs)


def inference_plan(deployment: Deployment, owner: str) -> InferencePlan:
    """Which segments and peers a prediction request of `owner` runs through.

    Raises:
        ConfigError: `owner` reads no features, or the topology cannot be served to it (see the
            module docstring), listing every reason.
    """
    topo = Topology.from_deployment(deployment)
    where = str(deployment.path)
    reached = {s for s in topo.order if topo.segments[s].input == "features" and topo.peer_of(s) == owner}
    if not reached:
        raise ConfigError(ConfigProblem(where, "segments", (
            f"peer '{owner}' owns no segment that reads features: only a data owner can ask for predictions")))
    problems: list[str] = []
    for seg in topo.order:
        ins = [e for e in topo.in_edges[seg] if topo.edges[e].from_ in reached]
        if seg in reached or not ins:
            continue
        spec = topo.segments[seg]
        if spec.merge is not None and len(ins) < len(topo.in_edges[seg]):
            others = sorted({topo.peer_of(topo.edges[e].from_) for e in topo.in_edges[seg] if e not in ins})
            problems.append(f"segment '{seg}' merges ({spec.merge}) inputs from {others} too, which one owner's "
                            "request cannot give")
        reached.add(seg)
    for eid, e in topo.edges.items():
        a, b = topo.peer_of(e.from_), topo.peer_of(e.to)
        if e.from_ in reached and a != b and owner not in (a, b):
            problems.append(f"edge {eid} runs from {a} to {b}: the request would pass peers that hold no session "
                            f"with {owner} (multi-hop chains are not served)")
    local: list[str] = []
    remote: dict[str, tuple[str, str]] = {}
    for seg in (s for s in topo.order if s in reached and not topo.out_edges[s]):
        peer = topo.peer_of(seg)
        if peer == owner:
            local.append(seg)
            continue
        edge = prediction_edge(topo, seg, owner)
        if edge is None:
            problems.append(f"output segment '{seg}' at {peer} is not fed directly by {owner}, so its "
                            "prediction could not come back")
        else:
            remote[seg] = (peer, edge)
    if problems:
        raise ConfigError([ConfigProblem(where, "edges", f"split inference for '{owner}': {p}") for p in problems])
    servers = tuple(sorted({topo.peer_of(s) for s in reached} - {owner}))
    return InferencePlan(owner, servers, tuple(local), remote)


def prediction_edge(topo: Topology, segment: str, owner: str) -> str | None:
    """The edge from one of `owner`'s segments into output `segment`: the route of its prediction."""
    return next((e for e in topo.in_edges[segment] if topo.peer_of(topo.edges[e].from_) == owner), None)


def inference_clients(deployment: Deployment, server: str) -> list[str]:
    """The data owners whose prediction requests run through `server`, sorted."""
    owners = sorted({seg.peer for seg in deployment.spec.segments.values() if seg.input == "features"} - {server})
    out = []
    for o in owners:
        try:
            if server in inference_plan(deployment, o).servers:
                out.append(o)
        except ConfigError:
            continue
    return out


def write_predictions(path: str | Path, ids: np.ndarray, predictions: Mapping[str, np.ndarray]) -> Path:
    """Write predictions as CSV (`id,prediction`; one `prediction_SEGMENT` column per output with
    several outputs) or, for a name ending in .json, a JSON list of such rows. The file is
    private to the owner (mode 0600), written whole or not at all.

    Returns:
        The path written.
    """
    p = Path(path)
    columns = ["prediction"] if len(predictions) == 1 else [f"prediction_{s}" for s in predictions]
    values = [np.asarray(v).tolist() for v in predictions.values()]
    rows = [[int(i), *(int(col[k]) for col in values)] for k, i in enumerate(np.asarray(ids).tolist())]
    if p.suffix.lower() == ".json":
        lines = [json.dumps(dict(zip(["id", *columns], r, strict=True))) for r in rows]
        text = "[\n" + ",\n".join(lines) + "\n]\n"  # one sample per line
    else:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["id", *columns])
        writer.writerows(rows)
        text = buf.getvalue()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, p)
    return p

