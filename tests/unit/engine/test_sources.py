"""Segment sources: an organisation's own module, initial weights, commitments, devices, interfaces."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from secure_split.architecture import (
    SegmentSource,
    commitment_problems,
    peer_config_source,
    public_model_digest,
    segment_commitment,
    segment_sources,
)
from secure_split.config import load_deployment, load_peer_config
from secure_split.engine.executor import PeerExecutor
from secure_split.engine.sources import (
    build_segment_module,
    describe_source,
    load_initial_weights,
    resolve_device,
)
from secure_split.errors import ConfigError, RemoteProtocolError, TrainingError

from . import model_cases
from .harness import LocalRouter, make_executors
from .model_cases import ORG_CODE, SALT, bank_module, commit, write_peer_config


def _source(model: Any, *, private: bool = True, tmp: Path = ORG_CODE, **kw: Any) -> SegmentSource:
    kind = "module" if "module" in model else "layers"
    return SegmentSource("bottom", kind, model, private=private, origin=tmp / "peer.yaml", salt=SALT, **kw)


def test_a_module_factory_is_called_with_its_arguments_under_the_segment_seed() -> None:
    a = build_segment_module(_source(bank_module()), seed=3)
    b = build_segment_module(_source(bank_module()), seed=3)
    c = build_segment_module(_source(bank_module()), seed=4)
    assert type(a).__name__ == "TabularBottom" and len(a.embeddings) == 2
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.state_dict()["mlp.0.weight"], c.state_dict()["mlp.0.weight"])


@pytest.mark.parametrize(("model", "message"), [
    ({"module": "no_such_package_here:build"}, "cannot import 'no_such_package_here' on this host"),
    ({**bank_module("missing")}, "bank_models has no callable 'missing'"),
    ({**bank_module("not_a_module"), "arguments": {}}, "returned int, not a torch.nn.Module"),
    ({**bank_module("broken")}, "failed: RuntimeError: the bank's factory failed"),
    ({**bank_module(), "arguments": {"features": 5}}, "failed: TypeError"),
    ({**bank_module(), "path": "no/such/folder"}, "folder .* not found"),
])
def test_own_code_that_cannot_be_built_is_a_configuration_error(model: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        build_segment_module(_source(model), seed=0)
    assert info.value.problems[0].key.startswith("segments.bottom.model")


def test_a_private_module_is_checked_against_the_deployments_commitment(tmp_path: Path) -> None:
    case = model_cases.private(tmp_path)
    (source,) = case.sources["bank"].values()
    assert source.private and source.commitment is not None
    # The bank swaps its model for another one: the peer refuses to start, naming both commitments.
    other = write_peer_config(tmp_path, "bank", {"bottom": {"model": bank_module("wide_bottom", features=5),
                                                            "salt": SALT}})
    with pytest.raises(ConfigError, match=r"is not the one the deployment commits to \(the document hashes to "
                                          r"sha256:[0-9a-f]{64}, the deployment commits to " + source.commitment):
        PeerExecutor(case.dep, "bank", case.datas["bank"], sources=segment_sources(case.dep, load_peer_config(other)))


def test_the_salt_is_part_of_the_commitment(tmp_path: Path) -> None:
    cfg = write_peer_config(tmp_path, "bank", {"bottom": {"model": bank_module(), "salt": SALT}})
    again = write_peer_config(tmp_path / "b", "bank", {"bottom": {"model": bank_module(), "salt": "0f" * 16}})
    assert commit(cfg, "bottom")["parameters"] == commit(again, "bottom")["parameters"]
    assert commit(cfg, "bottom")["commitment"] != commit(again, "bottom")["commitment"]


def test_an_auditor_recomputes_the_commitment_from_the_document_alone(tmp_path: Path) -> None:
    cfg = write_peer_config(tmp_path, "bank", {"bottom": {"model": bank_module(), "salt": SALT}})
    document = describe_source(peer_config_source(load_peer_config(cfg), "bottom"))
    entry = commit(cfg, "bottom")
    assert segment_commitment(document) == entry["commitment"]
    assert commitment_problems(document, entry["commitment"], entry["parameters"]) == []
    assert document["model"] == {"module": "bank_models:tabular_bottom", "arguments": bank_module()["arguments"]}
    assert ["mlp.2.weight", [8, 32], "float32"] in document["state"]
    lied = {**document, "state": document["state"][:-1]}  # a layer left out of the disclosure
    assert "hashes to" in commitment_problems(lied, entry["commitment"], entry["parameters"])[0]
    assert "counts 3 parameters" in commitment_problems({**document, "parameters": 3}, entry["commitment"],
                                                         entry["parameters"])[1]


def test_segment_records_for_the_audit_log(tmp_path: Path) -> None:
    case = model_cases.private(tmp_path)
    bank, lab = (PeerExecutor(case.dep, p, case.datas[p], sources=case.sources[p]) for p in ("bank", "lab"))
    (record,) = bank.segment_records()
    assert record == {"segment": "bottom", "source": "module", "public": False,
                      "parameters": case.dep.spec.segments["bottom"].parameters,
                      "commitment": case.dep.spec.segments["bottom"].commitment}
    (public,) = lab.segment_records()
    assert public["public"] and public["source"] == "layers" and public["parameters"] == 8 * 2 + 2
    assert public["commitment"] == public_model_digest(case.dep.spec.segments["top"].model)  # torch-free


def test_a_private_segment_without_its_source_is_refused_at_construction(tmp_path: Path) -> None:
    case = model_cases.private(tmp_path)
    with pytest.raises(ConfigError, match="segment 'bottom' is private: its model is in peer 'bank''s config"):
        PeerExecutor(case.dep, "bank", case.datas["bank"])


def test_initial_weights_load_from_a_safetensors_file(tmp_path: Path) -> None:
    layers = [{"linear": {"in": 3, "out": 2}}]
    save_file({"0.weight": torch.ones(2, 3), "0.bias": torch.zeros(2), "unused": torch.zeros(1)},
              str(tmp_path / "w.safetensors"))
    m = build_segment_module(_source(layers, private=False, weights=tmp_path / "w.safetensors"), seed=0)
    assert torch.equal(m.state_dict()["0.weight"], torch.ones(2, 3))


def test_weights_that_do_not_fit_are_refused_and_nothing_loads(tmp_path: Path) -> None:
    module = torch.nn.Sequential(torch.nn.Linear(3, 2))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    save_file({"0.weight": torch.ones(2, 4)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConfigError, match=r"0.weight: the file has \[2, 4\], the segment \[2, 3\]; 0.bias is missing"):
        load_initial_weights(module, tmp_path / "w.safetensors", name="bottom")
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_a_pickled_weights_file_is_refused_without_unpickling(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self) -> tuple[Any, ...]:
            return (exec, ("raise SystemExit('unpickled')",))

    (tmp_path / "w.safetensors").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ConfigError, match="not a valid safetensors file"):
        load_initial_weights(torch.nn.Linear(2, 2), tmp_path / "w.safetensors", name="bottom")


def test_devices() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="expected cpu, cuda, cuda:N or auto"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA device; install a CUDA build of torch or set device: cpu"):
            resolve_device("cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_label_holder_trains_like_a_cpu_one(tmp_path: Path) -> None:
    case = model_cases.tabular(tmp_path)
    cpu = make_executors(case.dep, case.datas, sources=case.sources)
    mixed = make_executors(case.dep, case.datas, sources=case.sources)
    mixed["lab"] = PeerExecutor(case.dep, "lab", case.datas["lab"], device="cuda", noise_seed=0,
                                sources=case.sources["lab"])
    for ex in (cpu, mixed):
        router = LocalRouter(ex)
        for step in range(3):
            router.run_step(step, "train", np.arange(step * 8, step * 8 + 8))
    for s in ("bottom", "top"):
        peer = case.dep.spec.segments[s].peer
        for k, v in cpu[peer].segments[s].state_dict().items():
            torch.testing.assert_close(mixed[peer].segments[s].state_dict()[k].cpu(), v, rtol=1e-4, atol=1e-5)
    (act,) = mixed["bank"].begin_step(10, "train", [0, 1])
    mixed["lab"].begin_step(10, "train", [0, 1])
    (grad,) = mixed["lab"].on_activation("bottom->top", act.tensor, step=10)
    assert grad.tensor.device.type == "cpu"  # what crosses the wire is on the host


# --- the edge's interface ------------------------------------------------------------------


def _interface_case(tmp_path: Path, interface: dict[str, Any]) -> model_cases.ModelCase:
    case = model_cases.private(tmp_path)
    raw = yaml.safe_load(case.dep.path.read_text())
    raw["edges"][0]["interface"] = interface
    case.dep.path.write_text(yaml.safe_dump(raw))
    return dataclasses.replace(case, dep=load_deployment(case.dep.path))


def test_the_receiver_refuses_what_breaks_the_interface_and_keeps_serving(tmp_path: Path) -> None:
    case = model_cases.private(tmp_path)
    lab = PeerExecutor(case.dep, "lab", case.datas["lab"], sources=case.sources["lab"])
    lab.begin_step(0, "train", [0, 1])
    for bad, message in [
        (torch.full((2, 8), 1.5), r"holds values in \[1.5, 1.5\], outside the interface's bounds \[-1.0, 1.0\]"),
        (torch.zeros(2, 8, dtype=torch.float16), "has dtype float16, the interface float32"),
        (torch.zeros(2, 4, 2), r"per-sample shape \[4, 2\], the interface \[8\]"),
    ]:
        with pytest.raises(RemoteProtocolError, match=message):
            lab.on_activation("bottom->top", bad, step=0)
    out = lab.on_activation("bottom->top", torch.zeros(2, 8), step=0)
    assert [o.kind for o in out] == ["gradient"]


def test_the_sender_sends_in_the_wire_dtype_and_within_the_bounds(tmp_path: Path) -> None:
    case = _interface_case(tmp_path, {"shape": [8], "dtype": "float16", "bounds": [-0.5, 0.5]})
    bank = PeerExecutor(case.dep, "bank", case.datas["bank"], sources=case.sources["bank"], noise_seed=0)
    (out,) = bank.begin_step(0, "train", list(range(16)))
    assert out.tensor.dtype == torch.float16 and out.tensor.device.type == "cpu"
    assert float(out.tensor.abs().max()) <= 0.5  # the tanh cut reaches beyond 0.5: clamped
    assert bank.on_gradient("bottom->top", torch.zeros(16, 8, dtype=torch.float16), step=0) == []
    assert bank.step_complete()
    bank.finish_step()
    bank.begin_step(1, "train", [0, 1])
    with pytest.raises(RemoteProtocolError, match="gradient on edge bottom->top has dtype float32, the interface float16"):
        bank.on_gradient("bottom->top", torch.zeros(2, 8), step=1)


def test_a_model_that_cannot_produce_its_interface_is_refused_before_the_first_step(tmp_path: Path) -> None:
    case = _interface_case(tmp_path, {"shape": [16], "dtype": "float32"})
    with pytest.raises(ConfigError, match=r"segment 'bottom' outputs per-sample shape \[8\], but the interface of "
                                          r"edge bottom->top is \[16\]"):
        PeerExecutor(case.dep, "bank", case.datas["bank"], sources=case.sources["bank"])
    with pytest.raises(ConfigError, match=r"segment 'top' cannot run on its input \(per sample \[16\]\)"):
        PeerExecutor(case.dep, "lab", case.datas["lab"], sources=case.sources["lab"])


def test_own_code_that_fails_on_the_features_is_refused_before_the_first_step(tmp_path: Path) -> None:
    case = model_cases.private(tmp_path)
    narrow = dataclasses.replace(case.datas["bank"], features=case.datas["bank"].features[:, :4])  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=r"segment 'bottom' cannot run on its input \(per sample \[4\]\)"):
        PeerExecutor(case.dep, "bank", narrow, sources=case.sources["bank"])


def test_a_step_whose_outbound_breaks_the_interface_fails_without_sending(tmp_path: Path) -> None:
    case = model_cases.private(tmp_path)
    bank = PeerExecutor(case.dep, "bank", case.datas["bank"], sources=case.sources["bank"])
    bank._modules["bottom"] = torch.nn.Sequential(torch.nn.Linear(5, 3))  # a model swapped after the check
    with pytest.raises(TrainingError, match=r"per-sample shape \[3\], but the deployment's interface of the edge is \[8\]"):
        bank.begin_step(0, "train", [0, 1])
    assert bank.active_step is None


def test_a_bad_private_layer_list_is_reported_against_the_peer_config(tmp_path: Path) -> None:
    case = model_cases.private(tmp_path)
    cfg = write_peer_config(tmp_path, "bank", {"bottom": {"model": [{"linear": {"in": 5}}], "salt": SALT}})
    with pytest.raises(ConfigError) as info:
        PeerExecutor(case.dep, "bank", case.datas["bank"], sources=segment_sources(case.dep, load_peer_config(cfg)))
    (problem,) = info.value.problems
    assert problem.file == str(cfg.resolve()) and problem.key == "segments.bottom.model"
    assert "missing key 'out'" in problem.message
