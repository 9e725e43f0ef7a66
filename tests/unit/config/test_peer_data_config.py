"""The peer config's `data:`: the short form (a safetensors file) and the long form (a mapping),
unknown keys and contradictions refused with file, key and line, all at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from secure_split.config import load_peer_config
from secure_split.errors import ConfigError


def _cfg(tmp_path: Path, data: str, files: tuple[str, ...] = ("h.csv",)) -> Path:
    (tmp_path / "deployment.yaml").write_text("{}\n")
    (tmp_path / "h.key").write_text("{}\n")
    for f in files:
        (tmp_path / f).write_text("x\n")
    path = tmp_path / "peer.yaml"
    path.write_text(f"peer: hospital\ndeployment: deployment.yaml\nsecret_key: h.key\n{data}")
    return path


def test_the_long_form_loads_with_its_path_resolved(tmp_path: Path) -> None:
    cfg = load_peer_config(_cfg(tmp_path, """data:
  path: h.csv
  id_column: pid
  features: [age, smoker]
  categorical: [smoker]
  impute: {age: median}
  preprocess: {scale: standard, columns: {age: minmax}}
"""))
    src = cfg.data_source
    assert src is not None and src.format == "csv" and src.path == (tmp_path / "h.csv").resolve()
    assert cfg.data_path == src.path and not src.legacy
    assert src.spec.preprocess.columns == {"age": "minmax"}


def test_the_short_form_is_a_safetensors_file_whatever_its_suffix(tmp_path: Path) -> None:
    cfg = load_peer_config(_cfg(tmp_path, "data: h.bin\n", files=("h.bin",)))
    assert cfg.data_source is not None and cfg.data_source.format == "safetensors" and cfg.data_source.legacy


def test_unknown_keys_and_contradictions_are_reported_at_once_with_lines(tmp_path: Path) -> None:
    path = _cfg(tmp_path, """data:
  path: h.csv
  features: [age, pid]
  labels: {labels: age}
  categorical: [smoker]
  impute: {smoker: mean}
  preprocess: {scale: zscore}
  colour: red
""")
    with pytest.raises(ConfigError) as exc:
        load_peer_config(path)
    text = str(exc.value)
    assert f"{path}:11: data.colour: unknown key" in text
    assert f"{path}:10: data.preprocess.scale:" in text and "'standard'" in text
    # pydantic refuses the types first; the cross-checks then need a valid section:
    path.write_text(path.read_text().replace("  colour: red\n", "").replace("zscore", "standard"))
    with pytest.raises(ConfigError) as exc:
        load_peer_config(path)
    text = str(exc.value)
    assert f"{path}:4: data.id_column: a csv file needs id_column" in text  # the line of data:, where it is missing
    assert f"{path}:7: data.labels.labels: 'age' is also listed as a feature" in text
    assert f"{path}:8: data.categorical.smoker: 'smoker' is not one of the features" in text
    assert f"{path}:9: data.impute.smoker: 'smoker' is categorical: use most_frequent" in text
    assert len(exc.value.problems) == 5  # and: smoker is not a feature, so it cannot be imputed


def test_a_csv_in_the_short_form_gets_advice(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs the long form of data"):
        load_peer_config(_cfg(tmp_path, "data: h.csv\n"))


def test_a_missing_data_file_names_its_key_and_line(tmp_path: Path) -> None:
    path = _cfg(tmp_path, "data:\n  path: nowhere.csv\n  id_column: pid\n")
    with pytest.raises(ConfigError, match=rf"{path}:5: data.path: data file .*nowhere.csv not found"):
        load_peer_config(path)
