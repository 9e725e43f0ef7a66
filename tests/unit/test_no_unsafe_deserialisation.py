"""SECURITY.md: no pickle, no torch.load, no yaml.load, no eval/exec anywhere in the library."""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[2] / "secure_split"
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve"}
FORBIDDEN_CALLS = {("torch", "load"), ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
                   ("numpy", "load"), ("np", "load")}


def _violations(path: Path, root: Path = LIBRARY) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in FORBIDDEN_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in {"eval", "exec", "__import__"}:
                found.append(f"{f.id}(...)")
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (f.value.id, f.attr) in FORBIDDEN_CALLS:
                found.append(f"{f.value.id}.{f.attr}(...)")
    return [f"{path.relative_to(root.parent)}:{v}" for v in found]


def test_the_library_never_deserialises_with_pickle_torch_load_yaml_load_or_eval() -> None:
    files = sorted(LIBRARY.rglob("*.py"))
    assert len(files) > 40, "the scan must actually see the library"
    problems = [v for f in files for v in _violations(f)]
    assert problems == []


def test_the_scan_would_catch_each_forbidden_form(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport yaml, torch\nyaml.load(x)\ntorch.load(f)\neval('1')\n")
    assert len(_violations(bad, tmp_path)) == 4
