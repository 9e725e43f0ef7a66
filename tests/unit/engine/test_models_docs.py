"""docs/models.md: every model in its YAML examples is valid as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from secure_split.architecture import model_problems, source_kind
from secure_split.engine.models import validate_layers

DOC = Path(__file__).resolve().parents[3] / "docs" / "models.md"


def _models(node: Any) -> list[Any]:
    if isinstance(node, dict):
        found = [node["model"]] if "model" in node else []
        return found + [m for v in node.values() for m in _models(v)]
    if isinstance(node, list):
        return [m for v in node for m in _models(v)]
    return []


def test_every_model_in_the_docs_yaml_is_valid() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    models = [m for block in blocks for m in _models(yaml.safe_load(block.replace("…", "")))]
    assert len(models) >= 6, "the scan must see the examples"
    for model in models:
        if source_kind(model) == "layers":
            assert validate_layers(model) == [], model
        else:
            assert model_problems(model, in_deployment=False) == [], model
