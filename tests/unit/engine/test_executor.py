"""PeerExecutor: refusals of bad inbound tensors, phases, predictions, and the edge protections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from secure_split.config import Deployment
from secure_split.engine import label_defences, privacy
from secure_split.engine.data import PeerData
from secure_split.engine.executor import Outgoing, PeerExecutor
from secure_split.engine.tensors import from_wire, to_wire
from secure_split.errors import ConfigError, LocalProtocolError, RemoteProtocolError, TrainingError
from secure_split.protocol import WireTensor

from .harness import LocalRouter, deployment_yaml, make_executors, write_deployment

BOTTOM = [{"linear": {"in": 4, "out": 3}}, {"tanh": {}}]
TOP = [{"linear": {"in": 3, "out": 2}}]
IDS = torch.arange(100, 140)
BATCH = np.arange(100, 108)


def _data() -> tuple[PeerData, PeerData]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g)
    y = (x[:, 0] > 0).to(torch.int64)
    return PeerData(ids=IDS, features=x), PeerData(ids=IDS, labels={"labels": y})


def _vanilla(tmp_path: Path, protections: dict[str, Any] | None = None, name: str = "d.yaml") -> Deployment:
    text = deployment_yaml(
        ["owner", "lab"],
        {
            "bottom": {"peer": "owner", "model": BOTTOM, "input": "features"},
            "top": {"peer": "lab", "model": TOP, "loss": "cross_entropy"},
        },
        [{"from": "bottom", "to": "top", "protections": protections or {}}],
        {"seed": 1, "optimizer": {"type": "adam", "lr": 0.01}},
    )
    return write_deployment(tmp_path, text, name)


def _pair(dep: Deployment, **options: bool) -> tuple[PeerExecutor, PeerExecutor]:
    """Owner and lab executors of a vanilla deployment; `options` (defer_update, overlap) go to both."""
    owner_data, lab_data = _data()
    return (PeerExecutor(dep, "owner", owner_data, noise_seed=0, **options),
            PeerExecutor(dep, "lab", lab_data, noise_seed=0, **options))


def _weights(ex: PeerExecutor) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ex.state_tensors().items()}


def _one_step(
    owner: PeerExecutor, lab: PeerExecutor, phase: str = "train"
) -> tuple[Outgoing, list[Outgoing]]:
    lab.begin_step(0, phase, BATCH)  # type: ignore[arg-type]
    (act,) = owner.begin_step(0, phase, BATCH)  # type: ignore[arg-type]
    back = lab.on_activation(act.edge, act.tensor, step=0)
    for g in back:
        owner.on_gradient(g.edge, g.tensor, step=0)
    return act, back


def test_bad_inbound_tensors_are_refused_and_leave_the_step_intact(tmp_path: Path) -> None:
    dep = _vanilla(tmp_path)
    owner, lab = _pair(dep)
    clean_owner, clean_lab = _pair(dep)
    _one_step(clean_owner, clean_lab)

    lab.begin_step(0, "train", BATCH)
    (act,) = owner.begin_step(0, "train", BATCH)
    t = act.tensor
    bad_activations = [
        ("bottom->top", t[:-1], "batch dimension must be 8"),
        ("nope->top", t, "unknown edge"),
        ("bottom->top", t.to(torch.int64), "floating dtype is required"),
        ("bottom->top", torch.full_like(t, float("nan")), "NaN or infinite"),
        ("bottom->top", t[:, :2], "does not fit segment 'top'"),
        ("bottom->top", t.reshape(8, 3, 1), "does not fit segment 'top'"),
    ]
    for edge, tensor, message in bad_activations:
        with pytest.raises(RemoteProtocolError, match=message):
            lab.on_activation(edge, tensor)
    with pytest.raises(RemoteProtocolError, match="is for step 5, the active step is 0"):
        lab.on_activation("bottom->top", t, step=5)
    with pytest.raises(RemoteProtocolError, match="does not receive gradients on it"):
        lab.on_gradient("bottom->top", t)
    with pytest.raises(RemoteProtocolError, match="does not receive activations on it"):
        owner.on_activation("bottom->top", t)
    assert lab.waiting_for() == [("activation", "bottom->top")]

    (grad,) = lab.on_activation("bottom->top", t, step=0)
    with pytest.raises(RemoteProtocolError, match="arrived twice"):
        lab.on_activation("bottom->top", t)
    with pytest.raises(RemoteProtocolError, match="has shape \\[8, 2\\], the activation sent had \\[8, 3\\]"):
        owner.on_gradient("bottom->top", grad.tensor[:, :2])
    with pytest.raises(RemoteProtocolError, match="batch dimension"):
        owner.on_gradient("bottom->top", grad.tensor[:4])
    assert owner.on_gradient("bottom->top", grad.tensor) == []
    with pytest.raises(RemoteProtocolError, match="arrived twice"):
        owner.on_gradient("bottom->top", grad.tensor)
    assert owner.step_complete() and lab.step_complete()
    owner.finish_step()
    lab.finish_step()
    for ex, clean in ((owner, clean_owner), (lab, clean_lab)):
        for k, v in _weights(ex).items():
            assert torch.equal(v, clean.state_tensors()[k]), k


def test_tensors_outside_a_step_or_in_the_wrong_phase_are_refused(tmp_path: Path) -> None:
    owner, lab = _pair(_vanilla(tmp_path))
    with pytest.raises(RemoteProtocolError, match="no step is active"):
        lab.on_activation("bottom->top", torch.zeros(8, 3))
    before = {**_weights(owner), **_weights(lab)}
    _, back = _one_step(owner, lab, "eval")
    assert back == [] and lab.step_complete() and owner.step_complete()
    after = {**owner.state_tensors(), **lab.state_tensors()}
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # eval never updates
    with pytest.raises(RemoteProtocolError, match="gradients exist only in train"):
        owner.on_gradient("bottom->top", torch.zeros(8, 3))
    metrics = lab.finish_step()
    assert metrics.phase == "eval" and metrics.tasks["labels"].count == 8
    assert owner.finish_step().tasks == {}


def test_a_gradient_before_the_activation_was_sent_is_refused(tmp_path: Path) -> None:
    text = deployment_yaml(
        ["owner", "server"],
        {
            "head": {"peer": "owner", "model": BOTTOM, "input": "features"},
            "middle": {"peer": "server", "model": [{"linear": {"in": 3, "out": 3}}]},
            "tail": {"peer": "owner", "model": TOP, "loss": "cross_entropy"},
        },
        [{"from": "head", "to": "middle"}, {"from": "middle", "to": "tail"}],
        coordinator="owner",
    )
    server = PeerExecutor(write_deployment(tmp_path, text), "server", None)
    server.begin_step(0, "train", BATCH)
    with pytest.raises(RemoteProtocolError, match="before this peer sent its activation"):
        server.on_gradient("middle->tail", torch.zeros(8, 3))
    assert server.waiting_for() == [("activation", "head->middle"), ("gradient", "middle->tail")]


def test_step_lifecycle_misuse_is_a_local_error(tmp_path: Path) -> None:
    owner, lab = _pair(_vanilla(tmp_path))
    with pytest.raises(LocalProtocolError, match="without an active step"):
        lab.finish_step()
    lab.begin_step(0, "train", BATCH)
    with pytest.raises(LocalProtocolError, match="still active"):
        lab.begin_step(1, "train", BATCH)
    with pytest.raises(LocalProtocolError, match="not complete"):
        lab.finish_step()
    lab.abort_step()
    assert lab.active_step is None
    _one_step(owner, lab)
    assert lab.finish_step().tasks["labels"].count == 8


@pytest.mark.parametrize(
    ("ids", "error", "message"),
    [
        (np.array([100, 100]), RemoteProtocolError, "repeats sample ids"),
        (np.array([], dtype=np.int64), RemoteProtocolError, "no sample ids"),
        (np.array([1.5]), RemoteProtocolError, "bad sample ids"),
        (np.array([100, 7]), TrainingError, "not in this peer's data"),
    ],
)
def test_bad_batch_ids_are_refused_without_starting_a_step(
    tmp_path: Path, ids: np.ndarray, error: type[Exception], message: str
) -> None:
    owner, _ = _pair(_vanilla(tmp_path))
    with pytest.raises(error, match=message):
        owner.begin_step(0, "train", ids)
    assert owner.active_step is None
    with pytest.raises(RemoteProtocolError, match="unknown phase"):
        owner.begin_step(0, "predict", BATCH)  # type: ignore[arg-type]


def test_infer_needs_no_labels_and_yields_predictions(tmp_path: Path) -> None:
    dep = _vanilla(tmp_path)
    owner_data, _ = _data()
    owner = PeerExecutor(dep, "owner", owner_data)
    lab = PeerExecutor(dep, "lab", None)  # serving: no label file at all
    lab.begin_step(3, "infer", BATCH)
    (act,) = owner.begin_step(3, "infer", BATCH)
    assert lab.on_activation(act.edge, act.tensor) == []
    metrics = lab.finish_step()
    assert metrics.tasks == {}
    pred = lab.predictions()["top"]
    assert pred.dtype == torch.int64 and pred.shape == (8,)
    expected = lab.segments["top"](act.tensor).argmax(dim=1)
    assert torch.equal(pred, expected)
    with pytest.raises(ConfigError, match="needs its data"):
        lab.begin_step(4, "train", BATCH)


def test_outgoing_carries_the_raw_batch_only_for_activations_of_input_segments(tmp_path: Path) -> None:
    owner, lab = _pair(_vanilla(tmp_path))
    act, (grad,) = _one_step(owner, lab)
    owner_data, _ = _data()
    assert act.raw is not None and torch.equal(act.raw, owner_data.features[owner_data.rows(BATCH)])  # type: ignore[index]
    assert (act.kind, act.to_peer, act.step, act.phase) == ("activation", "lab", 0, "train")
    assert (grad.kind, grad.to_peer, grad.raw) == ("gradient", "owner", None)
    for o in (act, grad):
        assert o.tensor.is_contiguous() and not o.tensor.requires_grad and o.tensor.device.type == "cpu"


def test_received_buffers_are_never_written(tmp_path: Path) -> None:
    owner, lab = _pair(_vanilla(tmp_path))
    lab.begin_step(0, "train", BATCH)
    (act,) = owner.begin_step(0, "train", BATCH)
    data = bytes(to_wire(act.tensor).data)
    snapshot = bytes(bytearray(data))
    (grad,) = lab.on_activation(act.edge, from_wire(WireTensor("float32", tuple(act.tensor.shape), data)))
    gdata = bytes(to_wire(grad.tensor).data)
    gsnapshot = bytes(bytearray(gdata))
    owner.on_gradient(grad.edge, from_wire(WireTensor("float32", tuple(grad.tensor.shape), gdata)))
    assert owner.step_complete() and lab.step_complete()
    assert data == snapshot and gdata == gsnapshot


def test_config_problems_are_reported_at_construction(tmp_path: Path) -> None:
    dep = _vanilla(tmp_path)
    with pytest.raises(ConfigError, match="its data has no features"):
        PeerExecutor(dep, "owner", None)
    with pytest.raises(ConfigError, match="does not fit this peer's features \\[5\\]"):
        PeerExecutor(dep, "owner", PeerData(ids=IDS, features=torch.zeros(40, 5)))
    with pytest.raises(ConfigError, match="not a peer"):
        PeerExecutor(dep, "stranger", None)
    lab = PeerExecutor(dep, "lab", PeerData(ids=IDS, labels={"other": torch.zeros(40, dtype=torch.int64)}))
    with pytest.raises(ConfigError, match="label column 'labels'"):
        lab.begin_step(0, "eval", BATCH)


# --- protections ----------------------------------------------------------------------------


def test_activation_noise_is_added_by_the_sender_in_train_only(tmp_path: Path) -> None:
    plain_owner, plain_lab = _pair(_vanilla(tmp_path))
    noisy_owner, noisy_lab = _pair(_vanilla(tmp_path, {"activation_noise_std": 0.5}, "noisy.yaml"))
    plain_act, _ = _one_step(plain_owner, plain_lab, "eval")
    noisy_act, _ = _one_step(noisy_owner, noisy_lab, "eval")
    assert torch.equal(plain_act.tensor, noisy_act.tensor)
    for ex in (plain_owner, plain_lab, noisy_owner, noisy_lab):
        ex.finish_step()
    plain_act, _ = _one_step(plain_owner, plain_lab)
    noisy_act, _ = _one_step(noisy_owner, noisy_lab)
    diff = noisy_act.tensor - plain_act.tensor
    assert 0.2 < float(diff.std()) < 1.0


def test_returned_gradients_are_clipped_per_sample_then_noised_by_the_receiver(tmp_path: Path) -> None:
    clip_owner, clip_lab = _pair(_vanilla(tmp_path, {"gradient_clip_norm": 1e-3}, "clip.yaml"))
    _, (grad,) = _one_step(clip_owner, clip_lab)
    norms = grad.tensor.norm(dim=1)
    assert bool((norms <= 1e-3 + 1e-9).all()) and float(norms.max()) > 0.5e-3
    plain_owner, plain_lab = _pair(_vanilla(tmp_path))
    _, (plain,) = _one_step(plain_owner, plain_lab)
    assert torch.allclose(
        grad.tensor, plain.tensor * (1e-3 / plain.tensor.norm(dim=1, keepdim=True)).clamp(max=1)
    )
    noisy_owner, noisy_lab = _pair(_vanilla(tmp_path, {"gradient_noise_std": 1.0}, "gnoise.yaml"))
    _, (noisy,) = _one_step(noisy_owner, noisy_lab)
    assert float((noisy.tensor - plain.tensor).abs().max()) > 0.1


def test_nopeek_adds_the_distance_correlation_to_the_owner_backward(tmp_path: Path) -> None:
    plain_owner, plain_lab = _pair(_vanilla(tmp_path))
    nopeek_owner, nopeek_lab = _pair(_vanilla(tmp_path, {"nopeek_alpha": 2.0}, "nopeek.yaml"))
    plain_act, (plain_grad,) = _one_step(plain_owner, plain_lab)
    act, (grad,) = _one_step(nopeek_owner, nopeek_lab)
    assert torch.equal(plain_act.tensor, act.tensor) and torch.equal(plain_grad.tensor, grad.tensor)
    metrics = nopeek_owner.finish_step()
    expected = privacy.distance_correlation(act.raw, act.tensor)  # type: ignore[arg-type]
    assert metrics.dcor == {"bottom->top": pytest.approx(float(expected), rel=1e-5)}
    assert plain_owner.finish_step().dcor == {}
    # The label side is unaffected; the owner's update is not the plain one.
    assert all(torch.equal(v, plain_lab.state_tensors()[k]) for k, v in nopeek_lab.state_tensors().items())
    w, pw = nopeek_owner.segments["bottom"][0].weight, plain_owner.segments["bottom"][0].weight
    assert not torch.allclose(w, pw)


def test_nopeek_on_an_edge_that_reads_no_raw_features_is_a_config_error(tmp_path: Path) -> None:
    text = deployment_yaml(
        ["owner", "hop", "lab"],
        {
            "bottom": {"peer": "owner", "model": BOTTOM, "input": "features"},
            "mid": {"peer": "hop", "model": [{"linear": {"in": 3, "out": 3}}]},
            "top": {"peer": "lab", "model": TOP, "loss": "cross_entropy"},
        },
        [{"from": "bottom", "to": "mid"}, {"from": "mid", "to": "top", "protections": {"nopeek_alpha": 0.5}}],
    )
    with pytest.raises(ConfigError, match="segment 'mid' reads no raw features"):
        PeerExecutor(write_deployment(tmp_path, text), "hop", None)


def test_label_defence_hook_is_called_by_the_label_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[torch.Size, list[str]]] = []

    def zeroing(grad: torch.Tensor, labels: Any, generator: torch.Generator | None) -> torch.Tensor:
        calls.append((grad.shape, sorted(labels)))
        return torch.zeros_like(grad)

    monkeypatch.setitem(label_defences.LABEL_DEFENCE_HOOKS, "max_norm", zeroing)
    owner, lab = _pair(_vanilla(tmp_path, {"label_defence": "max_norm"}))
    _, (grad,) = _one_step(owner, lab)
    assert calls == [(torch.Size([8, 3]), ["labels"])]
    assert float(grad.tensor.abs().sum()) == 0.0


def test_an_unknown_label_defence_refuses_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(label_defences.LABEL_DEFENCE_HOOKS, "marvell")
    dep = _vanilla(tmp_path, {"label_defence": "marvell"})
    PeerExecutor(dep, "owner", _data()[0])  # the owner does not apply it
    with pytest.raises(ValueError, match="unknown label_defence 'marvell' on edge bottom->top"):
        PeerExecutor(dep, "lab", _data()[1])


def test_router_runs_many_steps_without_leaking_state(tmp_path: Path) -> None:
    owner_data, lab_data = _data()
    router = LocalRouter(make_executors(_vanilla(tmp_path), {"owner": owner_data, "lab": lab_data}))
    first = router.run_step(0, "eval", BATCH)["lab"].tasks["labels"]
    for step in range(1, 30):
        router.run_step(step, "train", IDS[(step * 8) % 40 : (step * 8) % 40 + 8].numpy())
    last = router.run_step(30, "eval", BATCH)["lab"].tasks["labels"]
    assert last.mean_loss < first.mean_loss


def test_an_he_merged_segment_takes_only_the_aggregate(tmp_path: Path) -> None:
    segments: dict[str, Any] = {
        "ba": {"peer": "a", "model": BOTTOM, "input": "features"},
        "bb": {"peer": "b", "model": BOTTOM, "input": "features"},
        "top": {"peer": "lab", "model": TOP, "loss": "cross_entropy", "merge": "sum", "he": True},
    }
    edges = [{"from": "ba", "to": "top"}, {"from": "bb", "to": "top"}]
    dep = write_deployment(tmp_path, deployment_yaml(["a", "b", "lab"], segments, edges))
    lab = PeerExecutor(dep, "lab", _data()[1])
    lab.begin_step(0, "train", BATCH)
    with pytest.raises(RemoteProtocolError, match="plaintext activation on edge ba->top refused"):
        lab.on_activation("ba->top", torch.zeros(8, 3))
    with pytest.raises(RemoteProtocolError, match="not an HE-merged segment"):
        lab.on_aggregate("ba", torch.zeros(8, 3))
    with pytest.raises(RemoteProtocolError, match="does not fit it"):
        lab.on_aggregate("top", torch.zeros(8, 4))
    assert lab.waiting_for() == [("aggregate", "top")]
    grads = lab.on_aggregate("top", torch.ones(8, 3))
    assert [(g.edge, g.to_peer) for g in grads] == [("ba->top", "a"), ("bb->top", "b")]
    assert torch.equal(grads[0].tensor, grads[1].tensor)
    assert lab.step_complete()

    segments["mid"] = {"peer": "lab", "model": BOTTOM, "input": "features"}
    edges.append({"from": "mid", "to": "top"})
    local = write_deployment(tmp_path, deployment_yaml(["a", "b", "lab"], segments, edges), "local.yaml")
    with pytest.raises(ConfigError, match="edge mid->top is local"):
        PeerExecutor(local, "lab", PeerData(ids=IDS, features=torch.zeros(40, 4), labels=_data()[1].labels))
