"""The two kinds of configuration file: the shared deployment and the private peer config.

`deployment.yaml` is public and identical at every party: peers (endpoint, public keys),
segments (owner peer, model, role), edges, training settings, limits and the policy file. Its
canonical hash is agreed in the handshake. `peers/NAME.yaml` is private to one organisation:
its secret key file, its data, checkpoint and audit folders. It is never hashed or shared.

Both are validated when loaded; every problem is reported at once with file, key and line.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator

from secure_split.architecture import SALT_RE, deployment_model_problems, model_problems
from secure_split.canonical import digest_of
from secure_split.data_source import DataSource, DataSourceSpec, data_source_problems, resolve_data_source
from secure_split.errors import ConfigError, ConfigProblem
from secure_split.yamlfile import KeyPath, YamlDocument, read_yaml

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
DEVICE_RE = re.compile(r"^(cpu|auto|cuda(:[0-9]{1,2})?)$")
ENDPOINT_RE = re.compile(r"^tcp://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):[0-9]{1,5}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PeerSpec(_Strict):
    """One party: where it listens and its public keys."""

    endpoint: str = Field(description="tcp://HOST:PORT this peer binds and others connect to")
    sign_key: str = Field(description="Ed25519 public key, 64 hex characters")
    transport_key: str = Field(description="Curve25519 public key, 40 Z85 characters")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not ENDPOINT_RE.match(v):
            raise ValueError("expected tcp://HOST:PORT, e.g. tcp://127.0.0.1:5601")
        return v

    @field_validator("sign_key")
    @classmethod
    def _sign_key(cls, v: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("expected 64 lowercase hex characters (the Ed25519 public key)")
        return v

    @field_validator("transport_key")
    @classmethod
    def _transport_key(cls, v: str) -> str:
        if len(v) != 40:
            raise ValueError("expected 40 Z85 characters (the Curve25519 public key)")
        return v


class ProtectionSpec(_Strict):
    """Privacy defences configured on an edge; the policy may require minimums."""

    nopeek_alpha: float = Field(0.0, ge=0.0, description="weight of DCOR(raw, activations) in the owner's loss")
    activation_noise_std: float = Field(0.0, ge=0.0, description="Gaussian noise on activations at the owner")
    gradient_noise_std: float = Field(0.0, ge=0.0, description="Gaussian noise on returned gradients")
    gradient_clip_norm: float | None = Field(None, gt=0.0, description="per-sample L2 clip of returned gradients")
    label_defence: Literal["none", "max_norm", "marvell"] = "none"


class SegmentSpec(_Strict):
    """A torch module owned by exactly one peer."""

    peer: str
    model: list[dict[str, Any]] | dict[str, Any] | None = Field(
        None, description="public model: a layer list, e.g. [{linear: {in: 64, out: 32}}, {relu: {}}], or a "
        "torchvision preset {torchvision: resnet18, cut_after: layer1}; absent for a private model",
    )
    commitment: str | None = Field(
        None, description="private model: sha256:HEX of its architecture document (docs/models.md)"
    )
    parameters: int | None = Field(None, ge=1, le=2**40, description="private model: its parameter count")
    input: Literal["features"] | None = Field(
        None, description="'features' if this segment reads its peer's raw features"
    )
    loss: Literal["cross_entropy"] | None = Field(None, description="loss computed here from the peer's labels")
    labels: str = Field("labels", description="which label column of the peer's data file the loss uses")
    merge: Literal["concat", "sum", "mean"] | None = Field(
        None, description="how several incoming edges are combined"
    )
    he: bool = Field(False, description="aggregate a sum/mean merge under CKKS encryption")


class InterfaceSpec(_Strict):
    """What crosses an edge, agreed by both sides: per-sample shape, wire dtype, value bounds."""

    shape: list[int] = Field(min_length=1, max_length=8, description="per-sample shape (batch dimension excluded)")
    # No bfloat16: numpy has none, so the owner's egress leakage guards could not inspect such a tensor.
    dtype: Literal["float32", "float16"] = Field(
        "float32", description="dtype of the activations and gradients on the wire"
    )
    bounds: tuple[float, float] | None = Field(None, description="[low, high]: every activation value lies within")

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: list[int]) -> list[int]:
        if not all(1 <= d <= 2**24 for d in v):
            raise ValueError("expected sizes from 1 to 16777216")
        return v

    @field_validator("bounds")
    @classmethod
    def _bounds(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not (math.isfinite(v[0]) and math.isfinite(v[1]) and v[0] < v[1]):
            raise ValueError("expected [low, high], finite, low < high")
        return v


class EdgeSpec(_Strict):
    """A cut between two segments: activations forward, gradients back."""

    from_: str = Field(alias="from")
    to: str
    protections: ProtectionSpec = ProtectionSpec()
    interface: InterfaceSpec | None = Field(
        None, description="the cut's agreed shape, dtype and bounds; required where a side is private"
    )

    @property
    def name(self) -> str:
        """The edge id used in messages, policy and audit: 'from->to'."""
        return f"{self.from_}->{self.to}"


class OptimizerSpec(_Strict):
    type: Literal["sgd", "adam"] = "adam"
    lr: float = Field(0.001, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)


class TrainingSpec(_Strict):
    seed: int = 0
    epochs: int = Field(3, ge=0, le=100_000)
    batch_size: int = Field(64, ge=1, le=1_000_000)
    test_fraction: float = Field(
        0.2, gt=0.0, lt=1.0,
        description="share of the aligned sample ids held out for evaluation (`split_train_test` with `seed`); "
        "the rest are the training rows, on which each peer also fits its preprocessing",
    )
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: Literal["sync", "sequential", "splitfed"] = "sync"
    handoff: Literal["relay", "direct"] = Field(
        "relay",
        description="sequential/splitfed: sealed owner weights travel through the coordinator (relay, "
        "which cannot open them) or peer to peer (direct)",
    )
    average: Literal["sealed", "he"] = Field(
        "sealed",
        description="splitfed: owners average their weights among themselves from sealed copies "
        "(sealed), or the coordinator adds CKKS ciphertexts it cannot decrypt (he)",
    )
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap steps per epoch (tests, quick runs)")
    overlap: bool = Field(
        False,
        description="a data owner whose segments all read raw features runs the next training batch's "
        "forward pass while the previous batch's gradient is on its way; that batch then uses weights one "
        "update older (each backward still runs on the weights of its own forward), so training is not the "
        "same as local training",
    )
    pipeline_depth: int = Field(
        1, ge=1, le=64,
        description="training steps a data owner (and each hop of a chain) may have in flight: it begins the next "
        "batches' forward passes while earlier batches' gradients are on their way; each batch runs on the weights "
        "from before the last pipeline_depth - 1 updates (PipeDream-style weight stashing; the result does not depend "
        "on message timing). 1: strictly sequential, the same as local training; 2: the same as overlap: true. "
        "Needs limits.step_window >= pipeline_depth - 1 and room in limits.max_queued_messages "
        "(and limits.max_pending_he_rounds >= pipeline_depth with an HE merge)",
    )

    @property
    def depth(self) -> int:
        """The training steps a pipelining peer may have in flight: `pipeline_depth`, or 2 with
        `overlap: true`."""
        return max(self.pipeline_depth, 2 if self.overlap else 1)


class LimitsSpec(_Strict):
    """Every bound a remote party meets at this peer (SECURITY.md, "Bounds", lists each with what
    happens beyond it). The defaults are safe; a deployment may tighten or loosen them, and every
    party runs the same values (they are part of the deployment hash)."""

    max_message_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, le=2**31,
        description="largest message (all frames together); larger ones are refused before allocation",
    )
    handshake_timeout_s: float = Field(30.0, gt=0.0, description="how long a peer waits for every counterparty's HELLO")
    peer_timeout_s: float = Field(60.0, gt=0.0, description="silence after which a counterparty counts as lost")
    heartbeat_s: float = Field(1.0, gt=0.0, le=2000.0, description="transport heartbeat interval")
    # -- listed peers: what one counterparty can make this peer hold ----------------------------
    step_window: int = Field(
        2, ge=1, le=64,
        description="steps ahead of the current one a counterparty may send for; further ones are refused",
    )
    max_queued_messages: int = Field(
        64, ge=4, le=65536, description="messages held per counterparty for steps not yet running",
    )
    max_pending_he_rounds: int = Field(
        2, ge=1, le=64, description="HE merge rounds (step, segment) open at once; more are refused",
    )
    max_psi_points: int = Field(
        1_000_000, ge=1, le=100_000_000, description="ids in one PSI set, ours or a party's; larger sets are refused",
    )
    max_rejoins: int = Field(
        10, ge=0, le=10_000, description="times one counterparty may restart and open a new session in one run",
    )
    max_violations: int = Field(
        20, ge=1, le=100_000,
        description="refused messages from one counterparty within violation_window_s that stop the run",
    )
    violation_window_s: float = Field(60.0, gt=0.0, le=86_400.0, description="the window of max_violations")
    refusal_audit_per_s: float = Field(
        2.0, gt=0.0, le=10_000.0,
        description="refusals of one counterparty recorded one by one per second, on average; beyond it they are counted",
    )
    refusal_audit_burst: int = Field(20, ge=1, le=100_000, description="refusals recorded one by one in a burst")
    # -- outsiders: connections that have not authenticated ------------------------------------
    unauthenticated_timeout_s: float = Field(
        10.0, ge=0.1, le=600.0,
        description="a connection that has not completed its CURVE handshake in this time is closed",
    )
    max_unauthenticated: int = Field(
        16, ge=1, le=4096, description="connections not yet authenticated held at once; more are closed at once",
    )
    max_unauthenticated_per_source: int = Field(
        4, ge=1, le=4096, description="the same, per source address",
    )
    connections_per_peer: int = Field(
        2, ge=1, le=64, description="inbound connections one counterparty's key may hold (a restart briefly needs 2)",
    )
    inbound_queue_messages: int = Field(
        4, ge=1, le=1024, description="complete messages queued per inbound connection before the transport stops reading it",
    )
    rejoin_grace_s: float = Field(
        900.0, ge=0.0, le=7 * 86_400.0,
        description="once training runs, how long the others wait for a peer that went away to restart and "
        "rejoin (0: stop at once)",
    )
    close_timeout_s: float = Field(
        10.0, gt=0.0, le=3600.0,
        description="how long a peer waits at the end of a run for its counterparties' signed close heads",
    )


class RetiredKeySpec(_Strict):
    """A peer's former keys, kept so that they are refused from `retired_at` on, while audit entries
    signed before then still verify under them (`secure-split keys rotate` writes these)."""

    peer: str = Field(description="whose keys these were")
    sign_key: str = Field(description="the retired Ed25519 public key, 64 hex characters")
    transport_key: str = Field(description="the retired Curve25519 public key, 40 Z85 characters")
    retired_at: str = Field(description="when it stopped being valid: a quoted ISO time with timezone, "
                                        "e.g. \"2026-12-31T23:59:59Z\"")
    reason: str = Field("", max_length=200, description="why: scheduled, lost, leaked, ...")

    @field_validator("sign_key")
    @classmethod
    def _sign_key(cls, v: str) -> str:
        return PeerSpec._sign_key(v)

    @field_validator("transport_key")
    @classmethod
    def _transport_key(cls, v: str) -> str:
        return PeerSpec._transport_key(v)

    @field_validator("retired_at")
    @classmethod
    def _retired_at(cls, v: str) -> str:
        parse_retired_at(v)
        return v

    @property
    def retired_time(self) -> datetime:
        """`retired_at` as an aware UTC datetime."""
        return parse_retired_at(self.retired_at)


def parse_retired_at(text: str) -> datetime:
    """An ISO time with timezone (Z or +hh:mm) as an aware UTC datetime.

    Raises:
        ValueError: not an ISO time, or no timezone.
    """
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("expected an ISO time with timezone, e.g. \"2026-12-31T23:59:59Z\"") from None
    if t.tzinfo is None:
        raise ValueError("give the time a timezone, e.g. \"2026-12-31T23:59:59Z\"")
    return t.astimezone(UTC)


class DeploymentSpec(_Strict):
    """The shared, public deployment file."""

    version: Literal[1] = 1
    name: str
    coordinator: str
    policy: str = Field(description="policy file, relative to the deployment file")
    peers: dict[str, PeerSpec]
    segments: dict[str, SegmentSpec]
    edges: list[EdgeSpec]
    training: TrainingSpec = TrainingSpec()
    limits: LimitsSpec = LimitsSpec()
    retired_keys: list[RetiredKeySpec] = Field(default_factory=list, description="keys no peer may use any more")


class MetricsSpec(_Strict):
    """Where a peer serves its Prometheus metrics (see docs/operations.md for the list)."""

    host: str = Field("127.0.0.1", description="address to bind; localhost unless a Prometheus server elsewhere scrapes it")
    port: int = Field(ge=1, le=65535, description="TCP port of the metrics endpoint (http://HOST:PORT/metrics)")


def _data_form(value: Any) -> str | None:
    """Which form of `data:` a value is; the tags are union names `_pydantic_problems` drops."""
    if isinstance(value, str):
        return "str"
    if isinstance(value, dict | DataSourceSpec):
        return "dict"
    return None


DataSection = Annotated[
    Annotated[str, Tag("str")] | Annotated[DataSourceSpec, Tag("dict")],
    Discriminator(_data_form, custom_error_type="data_form",
                  custom_error_message="expected a safetensors file's path or a mapping {path, format, id_column, ...}"),
]


class PeerSegmentSpec(_Strict):
    """`segments.NAME` of a peer config: what only this organisation knows about one of its segments."""

    model: list[dict[str, Any]] | dict[str, Any] | None = Field(
        None, description="a private model: layer list, torchvision preset or {module: \"pkg.mod:factory\"}"
    )
    salt: str | None = Field(None, description="32-128 hex digits mixed into the private model's commitment")
    weights: str | None = Field(None, description="initial weights: a safetensors file, relative to this file")

    @field_validator("salt")
    @classmethod
    def _salt(cls, v: str | None) -> str | None:
        if v is not None and not SALT_RE.match(v):
            raise ValueError("expected 32 to 128 lowercase hex digits")
        return v


class PeerConfigSpec(_Strict):
    """One organisation's private peer config."""

    peer: str
    deployment: str = Field(description="the shared deployment file, relative to this file")
    secret_key: str = Field(description="this peer's secret key file (mode 0600)")
    data: DataSection | None = Field(
        None, description="this peer's data: a safetensors file (ids, features, labels.TASK), or a mapping "
        "{path, format, id_column, features, labels, categorical, impute, preprocess} (docs/data.md)")
    checkpoints: str = Field("checkpoints", description="folder for this peer's checkpoints")
    audit: str = Field("audit", description="folder for this peer's audit log")
    threads: int | Literal["auto"] = Field("auto", description="torch threads for this peer")
    metrics: MetricsSpec | None = Field(None, description="serve Prometheus metrics here (off when absent)")
    ops_log: str | None = Field(None, description="the operational JSON-lines log (default: AUDIT/PEER.ops.log)")
    device: str = Field("cpu", description="where this peer computes: cpu, cuda, cuda:N or auto")
    segments: dict[str, PeerSegmentSpec] = Field(
        default_factory=dict, description="this peer's private models and initial weights, per segment"
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE_RE.match(v):
            raise ValueError("expected cpu, cuda, cuda:N or auto")
        return v


_UNION_TAGS = ("int", "str", "float", "bool", "list", "dict", "none")


def _is_union_tag(part: object) -> bool:
    """pydantic names the member of a union it tried (`int`, `literal['auto']`) inside `loc`."""
    return isinstance(part, str) and (part in _UNION_TAGS or part.startswith(("literal[", "function-")))


def _pydantic_problems(doc: YamlDocument, exc: ValidationError) -> list[ConfigProblem]:
    merged: dict[KeyPath, list[str]] = {}
    for err in exc.errors():
        loc: KeyPath = tuple(x for x in err["loc"] if isinstance(x, str | int) and not _is_union_tag(x))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        elif err["type"] == "missing":
            msg = "required key is missing"
        msgs = merged.setdefault(loc, [])
        if msg not in msgs:
            msgs.append(msg)
    # One problem per key: the members of a union each add their own complaint.
    return [doc.problem(loc, " or ".join(msgs)) for loc, msgs in merged.items()]


@dataclass(frozen=True)
class Deployment:
    """A validated deployment with its file location and canonical hash."""

    spec: DeploymentSpec
    path: Path
    hash: str
    raw: dict[str, Any]

    @property
    def policy_path(self) -> Path:
        return (self.path.parent / self.spec.policy).resolve()

    def edge(self, name: str) -> EdgeSpec:
        for e in self.spec.edges:
            if e.name == name:
                return e
        raise KeyError(name)

    def segments_of(self, peer: str) -> list[str]:
        return [s for s, seg in self.spec.segments.items() if seg.peer == peer]


def horizontal_owners(spec: DeploymentSpec) -> dict[str, list[str]]:
    """The owners of a horizontal schedule (sequential, splitfed) and their segments.

    Owners are the peers, other than the coordinator, that own a segment reading raw features.
    Each owner's segments are listed in the deployment's order; position i of every owner is the
    same model (checked by `horizontal_problems`), so weights move between owners by position.

    Returns:
        owner -> its segments, owners in natural name order (owner_2 before owner_10); empty for
        the `sync` schedule. The first owner's segment names seed every owner's copies.
    """
    if spec.training.schedule not in ("sequential", "splitfed"):
        return {}
    owners = sorted(
        {seg.peer for seg in spec.segments.values() if seg.input == "features" and seg.peer != spec.coordinator},
        key=_natural_key,
    )
    return {o: [s for s, seg in spec.segments.items() if seg.peer == o] for o in owners}


def _natural_key(name: str) -> tuple[Any, ...]:
    """owner_2 before owner_10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _horizontal_problems(doc: YamlDocument, spec: DeploymentSpec) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    owners = horizontal_owners(spec)
    schedule = spec.training.schedule
    where = ("training", "schedule")
    if not owners:
        return [doc.problem(where, f"schedule '{schedule}' needs data owners: peers other than the coordinator "
                                   "that own a segment with input: features")]
    for peer in spec.peers:
        if peer != spec.coordinator and peer not in owners:
            problems.append(doc.problem(("peers", peer), f"schedule '{schedule}' runs a coordinator and data owners "
                                                         "only; this peer owns no input segment"))
    for sname, seg in spec.segments.items():
        if seg.input == "features" and seg.peer == spec.coordinator:
            problems.append(doc.problem(("segments", sname, "input"), f"in schedule '{schedule}' the coordinator "
                                                                       "reads no raw features; give this segment to an owner"))
        if seg.he:
            problems.append(doc.problem(("segments", sname, "he"), f"HE merges are for vertical training; in schedule "
                                                                   f"'{schedule}' set training.average: he instead"))
    first, *others = owners
    ref = owners[first]
    for o in others:
        segs = owners[o]
        same = len(segs) == len(ref) and all(
            _model_key(spec.segments[a]) == _model_key(spec.segments[b])
            for a, b in zip(ref, segs, strict=False)
        )
        if not same:
            problems.append(doc.problem(("segments",), f"owner '{o}' has segments {segs}, which are not the same models "
                                                       f"in the same order as '{first}' has ({ref}); every owner trains "
                                                       "a copy of one model"))
    seg_peer = {s: seg.peer for s, seg in spec.segments.items()}
    for i, e in enumerate(spec.edges):
        a, b = seg_peer.get(e.from_), seg_peer.get(e.to)
        if a is None or b is None or a == b:
            continue
        if spec.coordinator not in (a, b):
            problems.append(doc.problem(("edges", i), f"edge {e.name} joins two owners ('{a}', '{b}'); in schedule "
                                                      f"'{schedule}' owners exchange tensors with the coordinator only"))
    for sname, seg in spec.segments.items():
        senders = [seg_peer.get(e.from_) for e in spec.edges if e.to == sname]
        if seg.peer == spec.coordinator and len(senders) > 1:
            if len(set(senders)) != len(senders):
                problems.append(doc.problem(("segments", sname), "two edges from one owner enter this segment; "
                                                                 "each owner feeds it through one edge"))
            if seg.merge is not None:
                problems.append(doc.problem(("segments", sname, "merge"), f"in schedule '{schedule}' the owners' edges "
                                                                          "are alternatives (one owner per step); remove merge"))
    if spec.training.average == "he" and schedule != "splitfed":
        problems.append(doc.problem(("training", "average"), "average: he is for schedule: splitfed"))
    return problems


def _model_key(seg: SegmentSpec) -> tuple[Any, ...]:
    """What makes two segments the same model: public model or commitment, and their role."""
    return (seg.model, seg.commitment, seg.parameters, seg.input, seg.loss, seg.labels)


def _cross_check(doc: YamlDocument, spec: DeploymentSpec) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    peers = spec.peers
    for name in peers:
        if not NAME_RE.match(name):
            problems.append(doc.problem(("peers", name), "peer names are lowercase letters, digits and _"))
    if spec.coordinator not in peers:
        problems.append(doc.problem(("coordinator",), f"'{spec.coordinator}' is not one of the peers {sorted(peers)}"))
    endpoints: dict[str, str] = {}
    for name, p in peers.items():
        if p.endpoint in endpoints:
            problems.append(doc.problem(("peers", name, "endpoint"), f"same endpoint as peer '{endpoints[p.endpoint]}'"))
        endpoints[p.endpoint] = name
    problems += _pasted_key_problems(doc, spec)
    problems += _retired_key_problems(doc, spec)
    for sname, seg in spec.segments.items():
        if not NAME_RE.match(sname):
            problems.append(doc.problem(("segments", sname), "segment names are lowercase letters, digits and _"))
        if seg.peer not in peers:
            problems.append(doc.problem(("segments", sname, "peer"), f"'{seg.peer}' is not one of the peers {sorted(peers)}"))
        if seg.he and seg.merge not in ("sum", "mean"):
            problems.append(doc.problem(("segments", sname, "he"), "he: true needs merge: sum or mean"))
    problems.extend(deployment_model_problems(doc, spec))
    incoming: dict[str, int] = {s: 0 for s in spec.segments}
    seen_edges: set[str] = set()
    for i, e in enumerate(spec.edges):
        for end, key in ((e.from_, "from"), (e.to, "to")):
            if end not in spec.segments:
                problems.append(doc.problem(("edges", i, key), f"'{end}' is not one of the segments {sorted(spec.segments)}"))
        if e.name in seen_edges:
            problems.append(doc.problem(("edges", i), f"edge {e.name} appears twice"))
        seen_edges.add(e.name)
        if e.to in incoming:
            incoming[e.to] += 1
    horizontal = spec.training.schedule in ("sequential", "splitfed")
    for sname, seg in spec.segments.items():
        n_in = incoming.get(sname, 0)
        # In a horizontal schedule the edges from different owners into one segment are
        # alternatives (one owner per step), not inputs to merge.
        if n_in > 1 and seg.merge is None and not horizontal:
            problems.append(doc.problem(("segments", sname, "merge"), f"{n_in} edges enter this segment; set merge: concat, sum or mean"))
        if n_in == 0 and seg.input != "features":
            problems.append(doc.problem(("segments", sname, "input"), "no edge enters this segment; set input: features"))
        if n_in > 0 and seg.input == "features":
            problems.append(doc.problem(("segments", sname, "input"), "a segment fed by edges cannot also read raw features"))
    if not any(seg.loss for seg in spec.segments.values()):
        problems.append(doc.problem(("segments",), "no segment computes a loss; set loss: cross_entropy on the top segment"))
    # cycles
    adj: dict[str, list[str]] = {s: [] for s in spec.segments}
    for e in spec.edges:
        if e.from_ in adj and e.to in adj:
            adj[e.from_].append(e.to)
    state: dict[str, int] = {}

    def visit(n: str) -> bool:
        state[n] = 1
        for m in adj[n]:
            if state.get(m) == 1 or (m not in state and visit(m)):
                return True
        state[n] = 2
        return False

    if any(s not in state and visit(s) for s in adj):
        problems.append(doc.problem(("edges",), "the edges form a cycle; the topology must be a DAG"))
    if horizontal and not problems:
        problems.extend(_horizontal_problems(doc, spec))
    limits = spec.limits
    if limits.max_unauthenticated_per_source > limits.max_unauthenticated:
        problems.append(doc.problem(("limits", "max_unauthenticated_per_source"),
                                    f"is more than max_unauthenticated ({limits.max_unauthenticated}); "
                                    "lower it or raise max_unauthenticated"))
    problems.extend(_pipeline_problems(doc, spec, horizontal=horizontal))
    return problems


def _step_messages(spec: DeploymentSpec) -> int:
    """The most step-bound messages one peer sends one other peer in a training step: a
    `step_begin`, an activation (or ciphertext) on every edge between them one way and a
    gradient on every edge the other way, a `masked_aggregate` for every HE merge one of them
    holds and the other keys. What a peer may hold for one later step from one counterparty."""
    peer_of = {s: seg.peer for s, seg in spec.segments.items()}
    pairs: dict[frozenset[str], int] = {}
    for e in spec.edges:
        a, b = peer_of.get(e.from_), peer_of.get(e.to)
        if a is not None and b is not None and a != b:
            pairs[frozenset((a, b))] = pairs.get(frozenset((a, b)), 0) + 1
    he = [s for s, seg in spec.segments.items() if seg.he]
    return 1 + max(pairs.values(), default=0) + len(he)


def _pipeline_problems(doc: YamlDocument, spec: DeploymentSpec, *, horizontal: bool) -> list[ConfigProblem]:
    """`training.overlap` / `training.pipeline_depth`: where they apply, and the bounds that
    must carry k steps in flight."""
    training, limits = spec.training, spec.limits
    setting = "pipeline_depth" if training.pipeline_depth > 1 else "overlap"
    k = training.depth
    if k == 1:
        return []
    at = ("training", setting)
    what = f"pipeline_depth: {k}" if setting == "pipeline_depth" else "overlap (pipeline_depth: 2)"
    if training.overlap and training.pipeline_depth > 2:
        return [doc.problem(at, f"overlap: true is pipeline_depth: 2; remove overlap to run pipeline_depth: "
                                f"{training.pipeline_depth}")]
    if horizontal:
        return [doc.problem(at, f"{setting} is for schedule: sync")]
    problems: list[ConfigProblem] = []
    if limits.step_window < k - 1:
        problems.append(doc.problem(at, (
            f"{what} sends activations up to {k - 1} steps ahead of the receiver, beyond limits.step_window "
            f"({limits.step_window}), which would refuse them; raise limits.step_window to {k - 1} or lower {setting}")))
    per_step = _step_messages(spec)
    if limits.max_queued_messages < k * per_step:
        problems.append(doc.problem(at, (
            f"{what} may leave up to {k} steps of {per_step} messages from one peer waiting at another, more than "
            f"limits.max_queued_messages ({limits.max_queued_messages}) holds; raise limits.max_queued_messages to "
            f"{k * per_step} or lower {setting}")))
    he = sorted(s for s, seg in spec.segments.items() if seg.he)
    if he and limits.max_pending_he_rounds < k:
        problems.append(doc.problem(at, (
            f"{what} opens up to {k} HE merge rounds at once at {he}, more than limits.max_pending_he_rounds "
            f"({limits.max_pending_he_rounds}) allows; raise limits.max_pending_he_rounds to {k} or lower {setting}")))
    return problems


def _pasted_key_problems(doc: YamlDocument, spec: DeploymentSpec) -> list[ConfigProblem]:
    """A key listed for two peers: the later one was pasted from the earlier peer's `keys show`."""
    problems: list[ConfigProblem] = []
    owners: dict[tuple[str, str], str] = {}
    for name, p in spec.peers.items():
        for key in ("sign_key", "transport_key"):
            other = owners.setdefault((key, getattr(p, key)), name)
            if other != name:
                line = doc.line_of(("peers", other, key))
                problems.append(doc.problem(("peers", name, key), (
                    f"the key for {name} in {doc.path.name} is {other}'s (the same {key} as peers.{other}.{key}"
                    f"{f', line {line}' if line else ''}); each peer has its own keys: paste {name}'s from "
                    f"`secure-split keys show {name}.pub`"
                )))
    return problems


def _retired_key_problems(doc: YamlDocument, spec: DeploymentSpec) -> list[ConfigProblem]:
    """A peer listed with a key that was retired: refused (a lost or leaked key must stay out)."""
    retired: dict[str, tuple[int, RetiredKeySpec]] = {}
    for i, r in enumerate(spec.retired_keys):
        retired.setdefault(r.sign_key, (i, r))
        retired.setdefault(r.transport_key, (i, r))
    problems: list[ConfigProblem] = []
    for name, p in spec.peers.items():
        for key in ("sign_key", "transport_key"):
            hit = retired.get(getattr(p, key))
            if hit is not None:
                i, r = hit
                why = f", {r.reason}" if r.reason else ""
                problems.append(doc.problem(("peers", name, key), (
                    f"this {key} is {r.peer}'s retired key (retired_keys[{i}], retired at {r.retired_at}{why}); "
                    f"a retired key is never used again: list {name}'s current keys (`secure-split keys show {name}.pub`)"
                )))
    return problems


def sign_keys_valid_at(spec: DeploymentSpec, peer: str, when: datetime) -> list[str]:
    """The Ed25519 public keys under which `peer`'s signatures made at `when` verify.

    The current key always, plus every retired key of the peer whose `retired_at` is later than
    `when` (for the audit verifier: history stays verifiable under the key that signed it, and a
    retired key signs nothing after its retirement).

    Args:
        spec: the deployment.
        peer: the signer.
        when: the signature's time (aware; a naive time is taken as UTC).
    """
    t = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    current = [spec.peers[peer].sign_key] if peer in spec.peers else []
    return current + [r.sign_key for r in spec.retired_keys if r.peer == peer and t < r.retired_time]


def retired_transport_keys(spec: DeploymentSpec) -> dict[str, str]:
    """Retired transport keys -> whose they were and since when (for `Transport(retired_keys=...)`)."""
    return {r.transport_key: f"{r.peer}'s key, retired at {r.retired_at}" for r in spec.retired_keys}


def own_key_problems(
    deployment: Deployment, peer: str, sign_key_hex: str, transport_key_z85: str, key_file: str | Path
) -> list[ConfigProblem]:
    """Whether a peer's own key file holds the keys the deployment lists for it; if not, which key is wrong.

    Args:
        deployment: the loaded deployment.
        peer: this peer's name.
        sign_key_hex, transport_key_z85: the public halves of the key file the peer loaded.
        key_file: that key file (named in the problems).

    Returns:
        Empty when both keys match; otherwise one problem naming the key that differs, and whose
        it is when it belongs to another peer ("this key file holds hospital_a's keys"), with the
        deployment line to fix.
    """
    peers = deployment.spec.peers
    mine = peers.get(peer)
    if mine is None or (mine.sign_key, mine.transport_key) == (sign_key_hex, transport_key_z85):
        return []
    doc = read_yaml(deployment.path, "deployment")
    where = deployment.path.name

    def at(*key: str | int) -> str:
        line = doc.line_of(key)
        return f"{where}:{line}" if line else where

    for other, p in peers.items():
        if other != peer and (p.sign_key, p.transport_key) == (sign_key_hex, transport_key_z85):
            return [ConfigProblem(str(key_file), "-", (
                f"this secret key does not match the public keys of peer '{peer}' in {where}: this key file holds "
                f"{other}'s keys ({at('peers', other)} lists them for {other}), not {peer}'s; point secret_key in "
                f"{peer}'s peer config at {peer}'s own key file"
            ))]
    wrong = [k for k, mine_v, file_v in (("sign_key", mine.sign_key, sign_key_hex),
                                         ("transport_key", mine.transport_key, transport_key_z85)) if mine_v != file_v]
    parts = []
    for key in wrong:
        listed = getattr(mine, key)
        whose = next((o for o, p in peers.items() if o != peer and getattr(p, key) == listed), None)
        owner = f" (it is {whose}'s)" if whose else ""
        parts.append(f"the {key} for {peer} in {where} ({at('peers', peer, key)}) is not this key file's{owner}")
    return [ConfigProblem(str(key_file), "-", (
        f"this secret key does not match the public keys of peer '{peer}' in {where}: "
        + "; ".join(parts) + f": paste the output of `secure-split keys show {key_file}` into peers.{peer} of {where}, "
        "or use the key file generated for this peer"
    ))]


def load_deployment(path: str | Path) -> Deployment:
    """Load and validate a deployment file.

    Raises:
        ConfigError: with every problem found (unknown keys, wrong types, broken references).
    """
    doc = read_yaml(path, "deployment")
    try:
        spec = DeploymentSpec.model_validate(doc.data)
    except ValidationError as exc:
        raise ConfigError(_pydantic_problems(doc, exc)) from None
    problems = _cross_check(doc, spec)
    if problems:
        raise ConfigError(problems)
    return Deployment(spec=spec, path=doc.path.resolve(), hash=digest_of(doc.data), raw=doc.data)


@dataclass(frozen=True)
class PeerConfig:
    """A validated peer config with every path resolved against the config file's folder."""

    spec: PeerConfigSpec
    path: Path
    deployment_path: Path
    secret_key_path: Path
    data_path: Path | None
    checkpoints_dir: Path
    audit_dir: Path
    data_source: DataSource | None = None
    """The whole `data:` section (file, format, columns, preprocessing); `data_path` is its file."""
    ops_log_path: Path | None = None

    @property
    def name(self) -> str:
        return self.spec.peer

    @property
    def metrics_url(self) -> str | None:
        """http://HOST:PORT/metrics when the config serves metrics, else None."""
        m = self.spec.metrics
        if m is None:
            return None
        host = f"[{m.host}]" if ":" in m.host else m.host
        return f"http://{host}:{m.port}/metrics"


def load_peer_config(path: str | Path) -> PeerConfig:
    """Load and validate a peer config; relative paths are resolved against its folder.

    Raises:
        ConfigError: with every problem found.
    """
    doc = read_yaml(path, "peer config")
    try:
        spec = PeerConfigSpec.model_validate(doc.data)
    except ValidationError as exc:
        raise ConfigError(_pydantic_problems(doc, exc)) from None
    base = doc.path.resolve().parent
    problems = []
    if not NAME_RE.match(spec.peer):
        problems.append(doc.problem(("peer",), "peer names are lowercase letters, digits and _"))
    dep = (base / spec.deployment).resolve()
    if not dep.is_file():
        problems.append(doc.problem(("deployment",), f"deployment file {dep} not found"))
    key = (base / spec.secret_key).resolve()
    if not key.is_file():
        problems.append(doc.problem(("secret_key",), f"secret key file {key} not found; create it with `secure-split keys new`"))
    data_spec = DataSourceSpec(path=spec.data) if isinstance(spec.data, str) else spec.data
    data = (base / data_spec.path).resolve() if data_spec is not None else None
    if data is not None and not data.is_file():
        problems.append(doc.problem(("data",) if isinstance(spec.data, str) else ("data", "path"),
                                    f"data file {data} not found"))
    if isinstance(spec.data, DataSourceSpec):
        problems.extend(doc.problem(k, m) for k, m in data_source_problems(spec.data))
    elif isinstance(spec.data, str) and Path(spec.data).suffix.lower() in (".csv", ".tsv", ".parquet", ".pq", ".npy"):
        problems.append(doc.problem(("data",), "a csv, parquet or npy file needs the long form of data: "
                                               "{path, id_column, labels, ...} (see docs/data.md)"))
    for folder_key in ("checkpoints", "audit"):
        if (why := _folder_problem(base / getattr(spec, folder_key), spec.peer, folder_key)) is not None:
            problems.append(doc.problem((folder_key,), why))
    for sname, seg in spec.segments.items():
        where = ("segments", sname)
        if not NAME_RE.match(sname):
            problems.append(doc.problem(where, "segment names are lowercase letters, digits and _"))
        if seg.model is not None:
            problems.extend(doc.problem((*where, "model"), m) for m in model_problems(seg.model, in_deployment=False))
        if seg.weights is not None and not (base / seg.weights).is_file():
            problems.append(doc.problem((*where, "weights"), f"weights file {(base / seg.weights).resolve()} not found"))
    if problems:
        raise ConfigError(problems)
    return PeerConfig(
        spec=spec,
        path=doc.path.resolve(),
        deployment_path=dep,
        secret_key_path=key,
        data_path=data,
        checkpoints_dir=(base / spec.checkpoints).resolve(),
        audit_dir=(base / spec.audit).resolve(),
        data_source=resolve_data_source(spec.data, base, doc.path.resolve()) if spec.data is not None else None,
        # Next to the audit log, and not a *.jsonl: `audit verify` reads every *.jsonl in that folder.
        ops_log_path=(base / spec.ops_log).resolve() if spec.ops_log
        else (base / spec.audit).resolve() / f"{spec.peer}.ops.log",
    )


def _folder_problem(folder: Path, peer: str, key: str) -> str | None:
    """Why `folder` cannot be this peer's `key` folder (it or a parent is a file), or None."""
    target = folder.resolve()
    for path in (target, *target.parents):
        if path.exists():
            if path.is_dir():
                return None
            what = "is a file" if path == target else f"lies inside {path}, which is a file"
            log = f" (the audit log is written as {key}/{peer}.jsonl)" if key == "audit" else ""
            return f"{target} {what}; '{key}' names a folder{log}: give a folder, e.g. '{key}'"
    return None


def peer_fingerprint(sign_key_hex: str, transport_key_z85: str) -> str:
    """The short, stable fingerprint of a peer's public keys, as policies and logs name them.

    'sha256:' + the first 32 hex digits of SHA-256(sign key bytes || transport key text).
    """
    from secure_split.canonical import sha256_hex

    return "sha256:" + sha256_hex(bytes.fromhex(sign_key_hex) + transport_key_z85.encode("ascii"))[:32]
