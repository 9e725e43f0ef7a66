"""SECURITY.md, "Model code and private architectures": a peer imports only code its own operator named
in its own peer config; nothing in the shared deployment or in a message can select or load code."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import yaml

from secure_split.architecture import SegmentSource, public_sources, segment_sources
from secure_split.config import Deployment, load_deployment
from secure_split.engine.executor import PeerExecutor
from secure_split.engine.sources import build_segment_module
from secure_split.errors import ConfigError

LIBRARY = Path(__file__).resolve().parents[2] / "secure_split"
ORG_CODE = Path(__file__).resolve().parent / "engine" / "org_code"
MODULE = {"module": "bank_models:tabular_bottom", "path": str(ORG_CODE),
          "arguments": {"features": 5, "columns": [3], "cardinalities": [4]}}
IMPORTERS = {"import_module", "__import__", "spec_from_file_location", "exec_module", "run_path", "run_module",
             "load_source"}


def _deployment_text(model: object) -> str:
    return yaml.safe_dump({
        "version": 1, "name": "t", "coordinator": "lab", "policy": "policy.yaml",
        "peers": {p: {"endpoint": f"tcp://127.0.0.1:{5601 + i}", "sign_key": "ab"[i] * 64,
                      "transport_key": "xy"[i] * 40}
                  for i, p in enumerate(("bank", "lab"))},
        "segments": {"bottom": {"peer": "bank", "input": "features", "model": model},
                     "top": {"peer": "lab", "loss": "cross_entropy", "model": [{"linear": {"in": 8, "out": 2}}]}},
        "edges": [{"from": "bottom", "to": "top"}],
    })


def _calls(path: Path) -> list[tuple[str, ast.Call]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            out.append((name, node))
    return out


def _fixed_package_name(call: ast.Call) -> bool:
    """import_module(f"secure_split.cli.{name}"): a name inside our own package, from a fixed list."""
    arg = call.args[0] if call.args else None
    return (isinstance(arg, ast.JoinedStr) and isinstance(arg.values[0], ast.Constant)
            and str(arg.values[0].value).startswith("secure_split."))


def test_a_deployment_that_names_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "deployment.yaml"
    path.write_text(_deployment_text(MODULE))
    with pytest.raises(ConfigError, match="module: names code to import, and the shared deployment may not name code"):
        load_deployment(path)


def test_only_the_model_builder_imports_code_by_name() -> None:
    files = sorted(LIBRARY.rglob("*.py"))
    assert len(files) > 40, "the scan must see the library"
    found = sorted({str(p.relative_to(LIBRARY)) for p in files for name, call in _calls(p)
                    if name in IMPORTERS and not _fixed_package_name(call)})
    assert found == ["engine/sources.py"]


def test_only_the_config_layer_makes_segment_sources() -> None:
    makers = sorted({str(p.relative_to(LIBRARY)) for p in LIBRARY.rglob("*.py")
                     for name, _ in _calls(p) if name == "SegmentSource"})
    assert makers == ["architecture.py"]
    # ... from nothing but the deployment file (which refuses module:) and the peer's own config.
    assert [p.annotation for p in inspect.signature(segment_sources).parameters.values()] == [
        "Deployment", "PeerConfig"]
    assert [p.annotation for p in inspect.signature(public_sources).parameters.values()] == ["Deployment"]


def test_code_is_never_built_from_a_public_source(tmp_path: Path) -> None:
    source = SegmentSource("bottom", "module", MODULE, private=False, origin=tmp_path / "deployment.yaml")
    with pytest.raises(ConfigError, match="module: is accepted only from this peer's own config"):
        build_segment_module(source, seed=0)


def test_nothing_received_reaches_a_model_source(tmp_path: Path) -> None:
    # Even a Deployment object that names code (as if built from bytes that bypassed load_deployment)
    # makes no source and builds nothing: the segment counts as private, and its model must come from
    # the peer's own config.
    path = tmp_path / "deployment.yaml"
    path.write_text(_deployment_text([{"linear": {"in": 5, "out": 8}}]))
    honest = load_deployment(path)
    seg = honest.spec.segments["bottom"].model_copy(update={"model": MODULE})
    forged = Deployment(spec=honest.spec.model_copy(update={"segments": {**honest.spec.segments, "bottom": seg}}),
                        path=honest.path, hash=honest.hash, raw=honest.raw)
    assert "bottom" not in public_sources(forged)
    with pytest.raises(ConfigError, match="segment 'bottom' is private: its model is in peer 'bank''s config"):
        PeerExecutor(forged, "bank", None)
    # The layers that handle what peers send never build models themselves.
    builders = {"build_segment_module", "build_segments", "build_preset", "describe_source", "import_torchvision"}
    for package in ("protocol", "transport", "peer", "crypto", "policy", "audit"):
        for p in (LIBRARY / package).rglob("*.py"):
            assert not [n for n, _ in _calls(p) if n in builders], p
