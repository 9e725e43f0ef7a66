"""engine.optim: the same weights and state_dict as torch.optim, without importing torch._dynamo."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from secure_split.engine.optim import Adam, Sgd


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _train(net: nn.Module, opt: object, steps: int, freeze_last: bool = False) -> None:
    g = torch.Generator().manual_seed(7)
    for i in range(steps):
        x = torch.randn(5, 1, 8, 8, generator=g)
        y = torch.randint(0, 3, (5,), generator=g)
        opt.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
        nn.functional.cross_entropy(net(x), y).backward()
        if freeze_last and i % 2:
            net[3].bias.grad = None  # a parameter without a gradient this step is left alone
        opt.step()  # type: ignore[attr-defined]


CASES = [
    ("adam", lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.001), lambda p: Adam(p, lr=0.01, weight_decay=0.001)),
    ("sgd-momentum", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.001),
     lambda p: Sgd(p, lr=0.05, momentum=0.9, weight_decay=0.001)),
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.05), lambda p: Sgd(p, lr=0.05)),
]


@pytest.mark.parametrize(("name", "theirs", "ours"), CASES, ids=[c[0] for c in CASES])
def test_weights_and_state_are_bit_identical_to_torch_optim(name: str, theirs, ours) -> None:
    a, b = _net(1), _net(1)
    ta, ob = theirs(list(a.parameters())), ours(list(b.parameters()))
    _train(a, ta, 9, freeze_last=True)
    _train(b, ob, 9, freeze_last=True)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), n
    sa, sb = ta.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i, entry in sa["state"].items():
        assert entry.keys() == sb["state"][i].keys()
        for k, v in entry.items():
            assert torch.equal(v, sb["state"][i][k]) and v.dtype == sb["state"][i][k].dtype, (i, k)


@pytest.mark.parametrize(("name", "theirs", "ours"), CASES, ids=[c[0] for c in CASES])
def test_state_saved_by_torch_resumes_here_and_back(name: str, theirs, ours) -> None:
    """A checkpoint's optimizer state loads either way and the next steps stay identical."""
    a, b = _net(2), _net(2)
    ta = theirs(list(a.parameters()))
    _train(a, ta, 4)
    b.load_state_dict(a.state_dict())
    ob = ours(list(b.parameters()))
    ob.load_state_dict(ta.state_dict())  # copies: torch's state_dict() hands out its live tensors
    _train(a, ta, 3)
    _train(b, ob, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    c = _net(3)
    c.load_state_dict(b.state_dict())
    tc = theirs(list(c.parameters()))
    tc.load_state_dict(copy.deepcopy(ob.state_dict()))  # torch's load does not copy
    _train(b, ob, 2)
    _train(c, tc, 2)
    assert all(torch.equal(x, y) for x, y in zip(b.parameters(), c.parameters(), strict=True))


def test_a_state_that_does_not_fit_is_refused_before_anything_changes() -> None:
    net = _net(4)
    opt = Adam(list(net.parameters()), lr=0.01)
    _train(net, opt, 1)
    before = {i: {k: v.clone() for k, v in e.items()} for i, e in opt.state.items()}
    good = opt.state_dict()
    bad_shape = {"state": {**good["state"], 0: {**good["state"][0], "exp_avg": torch.zeros(2, 2)}},
                 "param_groups": good["param_groups"]}
    for bad, words in (
        (bad_shape, "expected shape"),
        ({"state": {99: good["state"][0]}, "param_groups": good["param_groups"]}, "does not exist"),
        ({"state": {0: {**good["state"][0], "momentum_buffer": torch.zeros(1)}},
          "param_groups": good["param_groups"]}, "unknown adam state keys"),
        ({"state": {}, "param_groups": [{"params": [0]}]}, "has 1 parameters"),
    ):
        with pytest.raises(ValueError, match=words):
            opt.load_state_dict(bad)
        assert all(torch.equal(v, opt.state[i][k]) for i, e in before.items() for k, v in e.items())


def test_a_training_step_does_not_import_dynamo() -> None:
    """The reason this module exists: torch.optim's first call imports torch._dynamo (about 2 s)."""
    code = (
        "import sys, torch\n"
        "from secure_split.engine.optim import Adam, Sgd\n"
        "m = torch.nn.Linear(3, 2)\n"
        "for opt in (Adam(list(m.parameters()), lr=0.1), Sgd(list(m.parameters()), lr=0.1, momentum=0.9)):\n"
        "    opt.zero_grad(); m(torch.randn(4, 3)).sum().backward(); opt.step(); opt.load_state_dict(opt.state_dict())\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_a_split_training_step_imports_neither_dynamo_nor_sympy(tmp_path: Path) -> None:
    """README: a peer's start-up is torch's import, not these two (about 2 s of CPU and 70 MiB):
    two executors train through the LocalRouter (the owner's backward from a received gradient,
    the label holder's from its loss, both optimizers stepping) and neither module is loaded."""
    code = f"""
import sys
import numpy as np, torch
from pathlib import Path
from secure_split.engine.data import PeerData
from tests.unit.engine.harness import LocalRouter, deployment_yaml, make_executors, write_deployment
text = deployment_yaml(["owner", "lab"], {{
    "bottom": {{"peer": "owner", "model": [{{"linear": {{"in": 6, "out": 4}}}}, {{"relu": {{}}}}], "input": "features"}},
    "top": {{"peer": "lab", "model": [{{"linear": {{"in": 4, "out": 2}}}}], "loss": "cross_entropy"}}}},
    [{{"from": "bottom", "to": "top"}}], {{"seed": 4, "optimizer": {{"type": "adam", "lr": 0.01}}}})
dep = write_deployment(Path({str(tmp_path)!r}), text)
x = torch.randn(20, 6); y = (x.sum(dim=1) > 0).to(torch.int64); ids = torch.arange(20)
router = LocalRouter(make_executors(dep, {{"owner": PeerData(ids=ids, features=x), "lab": PeerData(ids=ids, labels={{"labels": y}})}}))
for step in range(2):
    router.run_step(step, "train", np.arange(10) + 10 * step)
assert router.executors["owner"].state_tensors().keys() >= {{"optimizer.bottom.0.weight.exp_avg"}}
print("torch._dynamo" in sys.modules, "sympy" in sys.modules)
"""
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"], out.stderr
