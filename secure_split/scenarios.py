"""The demo scenarios: every configuration of the split-learning literature as one deployment on
bundled data, and the files each organisation would write by hand for it.

A scenario (`SCENARIOS[name](epochs, **options)`) is a `ScenarioPlan`: the peers and the only data
each holds, the segments and edges, the training settings, and what the centralised baseline
trains on. `generate(plan, workdir)` writes what the organisations would: one key pair per peer,
one data file per data owner (only its part), the shared deployment and the policy every party
signs, and one private peer config per organisation.

Used by `secure-split demo`, the leakage report, the benchmarks and the tests (`secure_split.testing`).
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_split.errors import ConfigError, ConfigProblem
from secure_split.yamlfile import dump_yaml

__all__ = [
    "ACCURACY_TOLERANCE",
    "HORIZONTAL_ACCURACY_TOLERANCE",
    "SCENARIOS",
    "SCENARIO_OPTIONS",
    "BaselineTopology",
    "GeneratedDeployment",
    "PeerPlan",
    "ScenarioPlan",
    "free_ports",
    "generate",
    "owner_shards",
]

ACCURACY_TOLERANCE = 0.02
HORIZONTAL_ACCURACY_TOLERANCE = 0.03
STALE_TOLERANCE = 0.05  # the demo's gate with training.overlap / pipeline_depth > 1 (stale stages)
"""Horizontal demos (sequential, splitfed) train one model over N owners' shards, so their updates
differ from the centralised run's; the issue asks for accuracy within 3 points for N = 5."""
SHARD_SEED = 13
"""Seed of the demos' partition of the digits among owners (IID shuffle, non-IID shard deal)."""


@dataclass
class PeerPlan:
    """One organisation in a demo: its name and the only data it ever holds."""

    name: str
    ids: Any
    features: Any = None
    labels: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] | None = None
    """The peer config's `data.preprocess` (fitted at the peer on its own training rows), if any."""


@dataclass
class BaselineTopology:
    """The network the centralised baseline trains, where it is not the deployment's own.

    A horizontal deployment holds one copy of the owners' segments per owner; the baseline is the
    same architecture once, in one process, on all the data: the first owner's segments (whose
    names seed every owner's copies, `engine.models.horizontal_seed_names`) and the coordinator's.
    """

    segments: dict[str, dict[str, Any]]
    edges: list[dict[str, Any]]


@dataclass
class ScenarioPlan:
    """Everything a scenario decides: peers and their data, topology, and baseline inputs.

    `baseline_features` and `baseline_labels` are keyed by the baseline's segment names: the
    deployment's, or `baseline_topology`'s where a scenario sets one. `baseline_split` (train ids,
    test ids) replaces the baseline's own split of `baseline_ids` where the split run splits
    differently. `tolerance` is how far (in accuracy) the split run may be from the baseline for
    the demo to pass; None where no such claim is made (non-IID shards: the demo measures the gap).
    """

    name: str
    peers: list[PeerPlan]
    coordinator: str
    segments: dict[str, dict[str, Any]]
    edges: list[dict[str, Any]]
    training: dict[str, Any]
    baseline_features: dict[str, Any]
    baseline_labels: dict[str, Any]
    baseline_ids: Any
    main_task: str
    baseline_topology: BaselineTopology | None = None
    baseline_split: tuple[Any, Any] | None = None
    tolerance: float | None = ACCURACY_TOLERANCE
    variant: dict[str, Any] = field(default_factory=dict)


# -- scenarios -------------------------------------------------------------------------------


def _digits() -> tuple[Any, Any, Any]:
    from secure_split.engine.data import digits

    return digits()


def _training(epochs: int) -> dict[str, Any]:
    from secure_split.engine import zoo

    return {"seed": 7, "epochs": epochs, "batch_size": 64, "test_fraction": 0.2,
            "optimizer": {"type": "adam", "lr": zoo.DIGITS_LR}}


def scenario_vanilla(epochs: int, **_: Any) -> ScenarioPlan:
    """owner.bottom -> label_holder.top on digits."""
    from secure_split.engine import zoo

    ids, x, y = _digits()
    return ScenarioPlan(
        name="vanilla",
        peers=[PeerPlan("owner", ids, features=x), PeerPlan("label_holder", ids, labels={"labels": y})],
        coordinator="label_holder",
        segments={
            "bottom": {"peer": "owner", "input": "features", "model": zoo.DIGITS_CNN_BOTTOM},
            "top": {"peer": "label_holder", "loss": "cross_entropy", "model": zoo.DIGITS_CNN_TOP},
        },
        edges=[{"from": "bottom", "to": "top"}],
        training=_training(epochs),
        baseline_features={"bottom": x},
        baseline_labels={"top": y},
        baseline_ids=ids,
        main_task="labels",
    )


def scenario_u_shaped(epochs: int, **_: Any) -> ScenarioPlan:
    """owner.head -> server.middle -> owner.tail: labels never leave the owner."""
    from secure_split.engine import zoo

    ids, x, y = _digits()
    return ScenarioPlan(
        name="u-shaped",
        peers=[PeerPlan("owner", ids, features=x, labels={"labels": y}), PeerPlan("server", None)],
        coordinator="owner",
        segments={
            "head": {"peer": "owner", "input": "features", "model": zoo.DIGITS_U_HEAD},
            "middle": {"peer": "server", "model": zoo.DIGITS_U_MIDDLE},
            "tail": {"peer": "owner", "loss": "cross_entropy", "model": zoo.DIGITS_U_TAIL},
        },
        edges=[{"from": "head", "to": "middle"}, {"from": "middle", "to": "tail"}],
        training=_training(epochs),
        baseline_features={"head": x},
        baseline_labels={"tail": y},
        baseline_ids=ids,
        main_task="labels",
    )


def scenario_multi_hop(epochs: int, hops: int = 2, **_: Any) -> ScenarioPlan:
    """owner.bottom -> hop1.mid -> ... -> hopK.mid -> label_holder.top."""
    from secure_split.engine import zoo

    if hops < 1:
        raise ConfigError(ConfigProblem("--hops", "hops", "the chain needs at least one hop (K >= 1)"))
    ids, x, y = _digits()
    peers = [PeerPlan("owner", ids, features=x)]
    segments: dict[str, dict[str, Any]] = {
        "bottom": {"peer": "owner", "input": "features", "model": zoo.DIGITS_CNN_BOTTOM},
    }
    edges = []
    prev = "bottom"
    for k in range(1, hops + 1):
        peers.append(PeerPlan(f"hop{k}", None))
        seg = f"mid{k}"
        segments[seg] = {"peer": f"hop{k}", "model": zoo.DIGITS_HOP}
        edges.append({"from": prev, "to": seg})
        prev = seg
    peers.append(PeerPlan("label_holder", ids, labels={"labels": y}))
    segments["top"] = {"peer": "label_holder", "loss": "cross_entropy", "model": zoo.DIGITS_CNN_TOP}
    edges.append({"from": prev, "to": "top"})
    return ScenarioPlan(
        name="multi-hop",
        peers=peers,
        coordinator="label_holder",
        segments=segments,
        edges=edges,
        training=_training(epochs),
        baseline_features={"bottom": x},
        baseline_labels={"top": y},
        baseline_ids=ids,
        main_task="labels",
    )


def scenario_multi_task(epochs: int, **_: Any) -> ScenarioPlan:
    """owner.trunk feeds two label holders: digit class at one, "digit >= 5" at another."""
    from secure_split.engine import zoo

    ids, x, y = _digits()
    ge5 = (y >= 5).to(y.dtype)
    return ScenarioPlan(
        name="multi-task",
        peers=[
            PeerPlan("owner", ids, features=x),
            PeerPlan("digit_lab", ids, labels={"labels": y}),
            PeerPlan("ge5_lab", ids, labels={"ge5": ge5}),
        ],
        coordinator="digit_lab",
        segments={
            "trunk": {"peer": "owner", "input": "features", "model": zoo.DIGITS_CNN_BOTTOM},
            "head_digit": {"peer": "digit_lab", "loss": "cross_entropy", "model": zoo.DIGITS_CNN_TOP},
            "head_ge5": {"peer": "ge5_lab", "loss": "cross_entropy", "labels": "ge5", "model": zoo.DIGITS_GE5_HEAD},
        },
        edges=[{"from": "trunk", "to": "head_digit"}, {"from": "trunk", "to": "head_ge5"}],
        training=_training(epochs),
        baseline_features={"trunk": x},
        baseline_labels={"head_digit": y, "head_ge5": ge5},
        baseline_ids=ids,
        main_task="labels",
    )


def _vertical(epochs: int, *, he: bool) -> ScenarioPlan:
    """Breast cancer split by columns between two hospitals with overlapping patient lists;
    labels at a lab. Ids are aligned by PSI at run time; the baseline trains on the same
    intersection. The hospitals hold the clinical values as measured and standardise their own
    columns on their own training rows (`preprocess: {scale: standard}` in their peer configs);
    the baseline applies the same transform."""
    import numpy as np

    from secure_split.engine import zoo
    from secure_split.engine.data import breast_cancer
    from secure_split.engine.schedule import split_train_test

    ids, x, y = breast_cancer(raw=True)
    rng = np.random.default_rng(11)
    n = len(ids)
    # Each party holds a different, partially overlapping subset of the patients.
    a_rows = np.sort(rng.choice(n, size=int(0.85 * n), replace=False))
    b_rows = np.sort(rng.choice(n, size=int(0.85 * n), replace=False))
    l_rows = np.sort(rng.choice(n, size=int(0.9 * n), replace=False))
    xa, xb = x[:, :15].contiguous(), x[:, 15:].contiguous()
    inter = np.intersect1d(np.intersect1d(a_rows, b_rows), l_rows)
    top = zoo.BREAST_CANCER_SUM_TOP if he else zoo.BREAST_CANCER_VERTICAL_TOP
    merge: dict[str, Any] = {"merge": "sum", "he": True} if he else {"merge": "concat"}
    seed, test_fraction = 7, 0.2
    training = {"seed": seed, "epochs": epochs, "batch_size": 64, "test_fraction": test_fraction,
                "optimizer": {"type": "adam", "lr": zoo.BREAST_CANCER_LR}}
    standard = {"scale": "standard"}
    train_ids, _ = split_train_test(ids[inter], test_fraction, seed)
    return ScenarioPlan(
        name="vertical-he" if he else "vertical",
        peers=[
            PeerPlan("hospital_a", ids[a_rows], features=xa[a_rows], preprocess=standard),
            PeerPlan("hospital_b", ids[b_rows], features=xb[b_rows], preprocess=standard),
            PeerPlan("lab", ids[l_rows], labels={"labels": y[l_rows]}),
        ],
        coordinator="lab",
        segments={
            "bottom_a": {"peer": "hospital_a", "input": "features", "model": zoo.BREAST_CANCER_HALF_BOTTOM},
            "bottom_b": {"peer": "hospital_b", "input": "features", "model": zoo.BREAST_CANCER_HALF_BOTTOM},
            "top": {"peer": "lab", "loss": "cross_entropy", "model": top, **merge},
        },
        edges=[{"from": "bottom_a", "to": "top"}, {"from": "bottom_b", "to": "top"}],
        training=training,
        baseline_features={"bottom_a": _preprocessed(ids[inter], xa[inter], train_ids, standard),
                           "bottom_b": _preprocessed(ids[inter], xb[inter], train_ids, standard)},
        baseline_labels={"top": y[inter]},
        baseline_ids=ids[inter],
        main_task="labels",
    )


def _preprocessed(ids: Any, x: Any, train_ids: Any, preprocess: dict[str, Any]) -> Any:
    """`x` transformed as a peer with `data.preprocess: preprocess` transforms it, fitted on `train_ids`."""
    from secure_split.engine.data import fit_preprocessing, site_from_arrays

    site = site_from_arrays(ids, x, preprocess=preprocess)
    return fit_preprocessing(site, train_ids).apply(site).features


def scenario_vertical(epochs: int, **_: Any) -> ScenarioPlan:
    """Two hospitals' columns, concatenated at the lab (plaintext cut tensors)."""
    return _vertical(epochs, he=False)


def scenario_vertical_he(epochs: int, **_: Any) -> ScenarioPlan:
    """Two hospitals' columns, summed at the lab under CKKS: the lab never sees either one."""
    return _vertical(epochs, he=True)


def owner_shards(labels: Any, owners: int, *, non_iid: bool, seed: int = SHARD_SEED) -> list[Any]:
    """Partition the row indices 0..len(labels)-1 among `owners` owners.

    IID: a seeded random permutation cut into `owners` near-equal shards. Non-IID (the usual
    pathological split of the FedAvg paper): rows sorted by label are cut into 2 x `owners` shards
    of consecutive rows, and each owner is dealt 2 of them at random, so each owner holds only a
    few classes (digits, 5 owners: 2 to 5 of the 10, 3.4 on average; 20 owners: 2.25).

    Args:
        labels: int class per row (numpy array or tensor).
        owners: how many shards (>= 1).
        non_iid: split by label instead of at random.
        seed: the partition's seed.

    Returns:
        One sorted int64 numpy array of row indices per owner; disjoint, together all rows.
    """
    import numpy as np

    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if not non_iid:
        return [np.sort(part) for part in np.array_split(rng.permutation(len(y)), owners)]
    by_label = np.argsort(y, kind="stable")
    pieces = np.array_split(by_label, 2 * owners)
    deal = rng.permutation(2 * owners)
    return [np.sort(np.concatenate([pieces[deal[2 * k]], pieces[deal[2 * k + 1]]])) for k in range(owners)]


def _horizontal_split(shards: list[Any], test_fraction: float, seed: int, *, ordinal: bool) -> tuple[Any, Any]:
    """The rows a horizontal run trains and tests on: (union of train ids, union of test ids).

    The coordinator splits each owner's rows on their own (`split_train_test` with the training
    seed): the ids the owner shares with the label holder, or (U-shaped, `ordinal`: the server
    knows no ids) the row positions 0..n-1, which the owner maps to its ids in sorted order.
    """
    import numpy as np

    from secure_split.engine.schedule import split_train_test

    train, test = [], []
    for shard in shards:
        ids = np.sort(np.asarray(shard))
        if ordinal:
            tr, te = split_train_test(np.arange(len(ids)), test_fraction, seed)
            tr, te = ids[tr], ids[te]
        else:
            tr, te = split_train_test(ids, test_fraction, seed)
        train.append(tr)
        test.append(te)
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _too_many_owners(n_rows: int, owners: int, test_fraction: float) -> str | None:
    """Why `owners` near-equal shards of `n_rows` rows are too small to train and test on, or None.

    Each owner's rows are split on their own (`training.test_fraction`), and every batch that
    crosses the wire must hold at least `MIN_BATCH` rows (the generated policy's `min_batch`):
    an owner with 7 test rows would be refused at its first evaluation.
    """
    from secure_split.engine.schedule import MIN_BATCH

    def smallest(k: int) -> int:
        rows = n_rows // k
        n_test = round(rows * test_fraction)
        return min(n_test, rows - n_test)

    if smallest(owners) >= MIN_BATCH:
        return None
    most = max((k for k in range(2, owners) if smallest(k) >= MIN_BATCH), default=None)
    rows = n_rows // owners
    return (f"with {owners} owners each holds about {rows} of the {n_rows} digits and trains or tests on as few as "
            f"{smallest(owners)} of them (test_fraction {test_fraction}): fewer than {MIN_BATCH}, the smallest "
            "batch the policy lets cross the wire (min_batch)"
            + (f"; use at most {most} owners" if most else ""))


def _horizontal(schedule: str, epochs: int, *, owners: int | None = None, non_iid: bool = False,
                labels: str | None = None, handoff: str | None = None, he: bool = False,
                test_fraction: float | None = None, **_: Any) -> ScenarioPlan:
    """N data owners with the same model, each holding a shard of the digits (rows, not columns).

    labels "holder": owner_k.bottom_k -> label_holder.top; the label holder holds every id's
    label, each owner its shard's images (the runtime aligns ids per owner by PSI).
    labels "owners" (U-shaped): owner_k.head_k -> server.middle -> owner_k.tail_k; each owner
    holds its shard's images and labels, the server no data at all.
    `test_fraction` (not a CLI option; benchmarks with many owners raise it) overrides 0.2.
    """
    from secure_split.engine import zoo

    n = 5 if owners is None else owners
    labels = labels or "holder"
    handoff = handoff or "relay"
    training = {**_training(epochs), "schedule": schedule, "handoff": handoff}
    if test_fraction is not None:
        training["test_fraction"] = test_fraction
    ids, x, y = _digits()
    problems = []
    if n < 2:
        problems.append(ConfigProblem("--owners", "owners", f"needs at least 2 data owners, got {n} "
                                      "(one owner is the vanilla demo: `secure-split demo vanilla`)"))
    elif (why := _too_many_owners(len(ids), n, training["test_fraction"])) is not None:
        problems.append(ConfigProblem("--owners", "owners", why))
    if labels not in ("holder", "owners"):
        problems.append(ConfigProblem("--labels", "labels", f"'{labels}' is not a choice: 'holder' (a label holder "
                                      "coordinates) or 'owners' (U-shaped: each owner keeps its labels)"))
    if handoff not in ("relay", "direct"):
        problems.append(ConfigProblem("--handoff", "handoff", f"'{handoff}' is not a choice: 'relay' (sealed weights "
                                      "through the coordinator) or 'direct' (owner to owner)"))
    if he and schedule != "splitfed":
        problems.append(ConfigProblem("--he", "he", "--he averages SplitFed rounds under CKKS; the sequential "
                                      "schedule hands weights on sealed instead: use `demo splitfed --he`"))
    if problems:
        raise ConfigError(problems)
    shards = owner_shards(y, n, non_iid=non_iid)
    names = [f"owner_{k}" for k in range(1, n + 1)]
    segments: dict[str, dict[str, Any]] = {}
    edges: list[dict[str, Any]] = []
    if labels == "holder":
        coordinator = "label_holder"
        peers = [PeerPlan(o, ids[rows], features=x[rows]) for o, rows in zip(names, shards, strict=True)]
        peers.append(PeerPlan(coordinator, ids, labels={"labels": y}))
        for k, o in enumerate(names, 1):
            segments[f"bottom_{k}"] = {"peer": o, "input": "features", "model": zoo.DIGITS_CNN_BOTTOM}
        segments["top"] = {"peer": coordinator, "loss": "cross_entropy", "model": zoo.DIGITS_CNN_TOP}
        edges = [{"from": f"bottom_{k}", "to": "top"} for k in range(1, n + 1)]
        baseline = BaselineTopology(
            segments={"bottom_1": segments["bottom_1"], "top": segments["top"]},
            edges=[{"from": "bottom_1", "to": "top"}],
        )
        baseline_features, baseline_labels = {"bottom_1": x}, {"top": y}
    else:
        coordinator = "server"
        peers = [PeerPlan(o, ids[rows], features=x[rows], labels={"labels": y[rows]})
                 for o, rows in zip(names, shards, strict=True)]
        peers.append(PeerPlan(coordinator, None))
        for k, o in enumerate(names, 1):
            segments[f"head_{k}"] = {"peer": o, "input": "features", "model": zoo.DIGITS_U_HEAD}
            segments[f"tail_{k}"] = {"peer": o, "loss": "cross_entropy", "model": zoo.DIGITS_U_TAIL}
        segments["middle"] = {"peer": coordinator, "model": zoo.DIGITS_U_MIDDLE}
        for k in range(1, n + 1):
            edges += [{"from": f"head_{k}", "to": "middle"}, {"from": "middle", "to": f"tail_{k}"}]
        baseline = BaselineTopology(
            segments={s: segments[s] for s in ("head_1", "middle", "tail_1")},
            edges=[{"from": "head_1", "to": "middle"}, {"from": "middle", "to": "tail_1"}],
        )
        baseline_features, baseline_labels = {"head_1": x}, {"tail_1": y}
    split = _horizontal_split([ids[rows] for rows in shards], training["test_fraction"], training["seed"],
                              ordinal=labels == "owners")
    if schedule == "splitfed":
        training["average"] = "he" if he else "sealed"
    variant = {"owners": n, "labels": labels, "handoff": handoff, "non_iid": non_iid,
               **({"average": training["average"]} if schedule == "splitfed" else {})}
    return ScenarioPlan(
        name=schedule,
        peers=peers,
        coordinator=coordinator,
        segments=segments,
        edges=edges,
        training=training,
        baseline_features=baseline_features,
        baseline_labels=baseline_labels,
        baseline_ids=ids,
        main_task="labels",
        baseline_topology=baseline,
        baseline_split=split,
        # Pathological non-IID shards cost accuracy by design (sequential training forgets
        # earlier owners' classes): the demo reports the gap and gates only the IID claim.
        tolerance=None if non_iid else HORIZONTAL_ACCURACY_TOLERANCE,
        variant=variant,
    )


def scenario_sequential(epochs: int, **options: Any) -> ScenarioPlan:
    """N owners take turns on one model: each trains on its shard, then seals the weights to the next."""
    return _horizontal("sequential", epochs, **options)


def scenario_splitfed(epochs: int, **options: Any) -> ScenarioPlan:
    """N owners train in parallel against one coordinator; their weights are averaged every epoch."""
    return _horizontal("splitfed", epochs, **options)


SCENARIOS: dict[str, Callable[..., ScenarioPlan]] = {
    "vanilla": scenario_vanilla,
    "u-shaped": scenario_u_shaped,
    "multi-hop": scenario_multi_hop,
    "multi-task": scenario_multi_task,
    "vertical": scenario_vertical,
    "vertical-he": scenario_vertical_he,
    "sequential": scenario_sequential,
    "splitfed": scenario_splitfed,
}
_HORIZONTAL_OPTIONS = ("owners", "non_iid", "labels", "handoff", "he")
SCENARIO_OPTIONS: dict[str, tuple[str, ...]] = {
    "multi-hop": ("hops",),
    "sequential": _HORIZONTAL_OPTIONS,
    "splitfed": _HORIZONTAL_OPTIONS,
}
"""The scenario-specific options (keyword arguments of the scenario function) each accepts."""


# -- generation --------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (bound then released; the OS does not reuse them at once)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class GeneratedDeployment:
    """Paths of everything the demo generated in its workdir."""

    workdir: Path
    deployment: Path
    policy: Path
    peer_configs: dict[str, Path]


def generate(plan: ScenarioPlan, workdir: Path, *, limits: dict[str, Any] | None = None) -> GeneratedDeployment:
    """Write keys, data, deployment, signed policy and peer configs for `plan` into `workdir`."""
    from secure_split.config import load_deployment
    from secure_split.crypto.keys import generate_identity, write_key_files
    from secure_split.engine.data import write_peer_data
    from secure_split.policy import load_policy, policy_for_deployment, sign_policy

    for sub in ("keys", "data", "peers", "audit", "checkpoints", "results", "logs"):
        d = workdir / sub
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    for f in ("deployment.yaml", "policy.yaml", "baseline.yaml"):
        (workdir / f).unlink(missing_ok=True)
    sigdir = workdir / "signatures"
    if sigdir.exists():
        shutil.rmtree(sigdir)

    identities = {p.name: generate_identity(p.name) for p in plan.peers}
    for ident in identities.values():
        write_key_files(ident, workdir / "keys")
    ports = free_ports(len(plan.peers))
    for p in plan.peers:
        if p.ids is None:
            continue  # a peer that only computes (a server, a hop) holds no data at all
        write_peer_data(workdir / "data" / f"{p.name}.safetensors", ids=p.ids, features=p.features,
                        labels=p.labels or None)
    deployment = {
        "version": 1,
        "name": f"demo-{plan.name}",
        "coordinator": plan.coordinator,
        "policy": "policy.yaml",
        "peers": {
            p.name: {
                "endpoint": f"tcp://127.0.0.1:{port}",
                "sign_key": identities[p.name].sign_key_hex,
                "transport_key": identities[p.name].transport_public_z85,
            }
            for p, port in zip(plan.peers, ports, strict=True)
        },
        "segments": plan.segments,
        "edges": plan.edges,
        "training": plan.training,
        # Peers start one after another (about 1-2 s of CPU each to import torch): with many of
        # them on one host the first waits for the last to come up.
        "limits": {"max_message_bytes": 16 * 1024 * 1024, "handshake_timeout_s": max(60.0, 2.0 * len(plan.peers)),
                   "peer_timeout_s": 60.0, "heartbeat_s": 1.0, **(limits or {})},
    }
    dep_path = workdir / "deployment.yaml"
    dep_path.write_text(
        "# Shared, public deployment: every party holds this same file (its hash is agreed in the handshake).\n"
        + dump_yaml(deployment)
    )
    dep = load_deployment(dep_path)
    policy = policy_for_deployment(dep, name=f"demo-{plan.name}-v1")
    policy_path = workdir / "policy.yaml"
    policy_path.write_text(
        "# Data-sharing policy every party signs. Default deny: only the flows below may cross the wire.\n"
        + dump_yaml(policy)
    )
    signed = load_policy(policy_path)  # once: a many-owner policy takes a while to parse
    for ident in identities.values():
        sign_policy(signed, ident)
    configs = {}
    for p in plan.peers:
        cfg = {
            "peer": p.name,
            "deployment": "../deployment.yaml",
            "secret_key": f"../keys/{p.name}.key",
            **({"data": f"../data/{p.name}.safetensors" if p.preprocess is None else
                {"path": f"../data/{p.name}.safetensors", "preprocess": p.preprocess}} if p.ids is not None else {}),
            "checkpoints": f"../checkpoints/{p.name}",
            "audit": "../audit",
            "threads": 1,
        }
        path = workdir / "peers" / f"{p.name}.yaml"
        path.write_text(f"# Private to {p.name}: never shared, never hashed into the deployment.\n"
                        + dump_yaml(cfg))
        configs[p.name] = path
    return GeneratedDeployment(workdir, dep_path, policy_path, configs)
