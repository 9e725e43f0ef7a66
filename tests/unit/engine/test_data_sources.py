"""Data sources: CSV, Parquet, .npy and safetensors read to the same checked rows; bounds before
allocation; every problem at once with file, column and rows; preprocessing fitted on training
rows only and saved with the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from secure_split.data_source import DataSource
from secure_split.engine.checkpoint import checkpoint_preprocessing, load_checkpoint, save_checkpoint
from secure_split.engine.data import (
    PeerData,
    Preprocessing,
    fit_preprocessing,
    load_peer_data,
    load_site_data,
    site_from_arrays,
    write_peer_data,
)
from secure_split.errors import ConfigError, TrainingError

from .harness import deployment_yaml, make_executors, write_deployment

IDS = [11, 12, 13, 14, 15, 16]
AGE = [50.0, 61.0, 47.0, 70.0, 58.0, 66.0]
BMI = [21.5, 30.25, 27.0, 24.5, 33.0, 26.0]
SMOKER = ["no", "yes", "no", "no", "yes", "no"]
LABEL = [0, 1, 0, 1, 1, 0]


def _csv(path: Path, rows: list[list[Any]], header: str = "pid,age,bmi,smoker,y") -> Path:
    path.write_text(header + "\n" + "".join(",".join(str(v) for v in r) + "\n" for r in rows))
    return path


def _table_rows() -> list[list[Any]]:
    return [list(r) for r in zip(IDS, AGE, BMI, SMOKER, LABEL, strict=True)]


def _write_parquet(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"pid": IDS, "age": AGE, "bmi": BMI, "smoker": SMOKER, "y": LABEL}), path)
    return path


def _errors(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    return "\n".join(str(p) for p in exc.value.problems)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_csv_and_parquet_read_to_the_same_columns(tmp_path: Path, fmt: str) -> None:
    path = _csv(tmp_path / "t.csv", _table_rows()) if fmt == "csv" else _write_parquet(tmp_path / "t.parquet")
    site = load_site_data(DataSource.of(path, id_column="pid", categorical=["smoker"], labels={"labels": "y"}))
    assert site.ids.tolist() == IDS and site.feature_order == ("age", "bmi", "smoker")
    assert site.numbers["age"].tolist() == AGE and site.numbers["bmi"].tolist() == BMI
    assert site.texts["smoker"].tolist() == SMOKER and site.categories["smoker"] == ("no", "yes")
    assert site.labels["labels"].tolist() == LABEL and site.width == 4
    data = fit_preprocessing(site, None).apply(site)
    assert data.features is not None and data.features.shape == (6, 4) and data.source == str(path)
    assert data.features[1].tolist() == [61.0, 30.25, 0.0, 1.0]  # age, bmi, one-hot(no, yes)


def test_npy_names_its_columns_in_the_config(tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    np.save(path, np.column_stack([IDS, AGE, BMI, LABEL]).astype(np.float64))
    site = load_site_data(DataSource.of(path, id_column="pid", columns=["pid", "age", "bmi", "y"],
                                        labels={"labels": "y"}))
    assert site.ids.tolist() == IDS and site.numbers["bmi"].tolist() == BMI and site.labels["labels"].tolist() == LABEL
    np.save(path, np.asfortranarray(np.column_stack([IDS, AGE, BMI, LABEL]).astype(np.float32)))
    again = load_site_data(DataSource.of(path, id_column="pid", columns=["pid", "age", "bmi", "y"]))
    assert again.ids.tolist() == IDS and again.numbers["age"].tolist() == AGE  # column-major too
    with pytest.raises(ValueError, match="columns"):
        DataSource.of(path, id_column="pid")  # a .npy array has no column names


def test_safetensors_long_form_renames_a_label_tensor_and_scales(tmp_path: Path) -> None:
    x = np.column_stack([AGE, BMI]).astype(np.float32)
    path = write_peer_data(tmp_path / "d.safetensors", ids=IDS, features=x, labels={"top": LABEL})
    site = load_site_data(DataSource.of(path, labels={"labels": "top"}, preprocess={"scale": "minmax"}))
    assert site.labels["labels"].tolist() == LABEL and site.feature_order == ("features[0]", "features[1]")
    data = fit_preprocessing(site, IDS).apply(site)
    assert data.features is not None
    assert data.features.min(dim=0).values.tolist() == [0.0, 0.0] and data.features.max(dim=0).values.tolist() == [1.0, 1.0]
    # The short form reads the file as it is.
    legacy = load_peer_data(path)
    assert legacy.features is not None and torch.equal(legacy.features, torch.from_numpy(x))


def test_every_problem_is_reported_at_once_with_column_and_rows(tmp_path: Path) -> None:
    rows = _table_rows()
    rows[1][1] = ""          # missing age, row 2
    rows[2][2] = "heavy"     # not a number, row 3
    rows[3][0] = 11          # duplicate id, row 4
    rows[4][4] = "-1"        # negative label, row 5
    rows[5][4] = ""          # missing label, row 6
    path = _csv(tmp_path / "bad.csv", rows)
    with pytest.raises(ConfigError) as exc:
        load_site_data(DataSource.of(path, id_column="pid", categorical=["smoker"], labels={"labels": "y"}))
    text = _errors(exc)
    assert f"{path}: column age: missing value(s) in row 2 (line 3)" in text and "data.impute.age" in text
    assert "column bmi: not a finite number in row 3 (line 4) (e.g. 'heavy')" in text
    assert "column pid: id 11 appears in 2 rows: rows 1, 4 (lines 2, 5)" in text
    assert "column y: negative class in row 5" in text and "column y: missing label(s) in row 6" in text
    assert len(exc.value.problems) == 5


def test_columns_the_config_names_must_be_in_the_file(tmp_path: Path) -> None:
    path = _csv(tmp_path / "t.csv", _table_rows())
    with pytest.raises(ConfigError) as exc:
        load_site_data(DataSource.of(path, id_column="patient_id", features=["age", "weight"], labels={"labels": "dx"}))
    text = _errors(exc)
    for col in ("patient_id", "weight", "dx"):
        assert f"column {col}: named in the peer config's data: section but not in the file" in text
    assert "its columns are pid, age, bmi, smoker, y" in text


def test_imputation_fills_missing_values_from_training_rows(tmp_path: Path) -> None:
    rows = _table_rows()
    rows[0][1] = "NA"
    rows[5][3] = ""
    path = _csv(tmp_path / "t.csv", rows)
    src = DataSource.of(path, id_column="pid", categorical=["smoker"], labels={"labels": "y"},
                        impute={"age": "median", "smoker": {"constant": "unknown"}})
    site = load_site_data(src)
    assert site.categories["smoker"] == ("no", "unknown", "yes")  # the constant is a category of its own
    prep = fit_preprocessing(site, [12, 13, 14])  # training rows: ages 61, 47, 70
    col = {c.name: c for c in prep.columns}
    assert col["age"].fill == 61.0 and col["smoker"].fill == "unknown"
    data = prep.apply(site)
    assert data.features is not None and data.features[0, 0].item() == 61.0
    assert data.features[5, 2:].tolist() == [0.0, 1.0, 0.0]


def test_scaling_is_fitted_on_training_rows_only(tmp_path: Path) -> None:
    """Changing a test row's value changes nothing in the fit: test rows never leak into it."""
    train = [11, 12, 13, 14]
    x = np.column_stack([AGE, BMI])
    site = site_from_arrays(IDS, x, preprocess={"scale": "standard"})
    fitted = fit_preprocessing(site, train)
    x_leak = x.copy()
    x_leak[5, 0] = 1e6  # id 16 is a test row
    refit = fit_preprocessing(site_from_arrays(IDS, x_leak, preprocess={"scale": "standard"}), train)
    assert refit.to_json() == fitted.to_json()
    age = fitted.columns[0]
    assert age.offset == pytest.approx(np.mean(AGE[:4])) and age.factor == pytest.approx(1 / np.std(AGE[:4]))
    data = fitted.apply(site)
    assert data.features is not None
    assert data.features[:4, 0].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert data.features[:, 0].mean().item() != pytest.approx(0.0, abs=1e-3)  # the test rows are not centred
    with pytest.raises(ConfigError, match="pass the training ids"):
        fit_preprocessing(site, None)


def test_an_unknown_category_at_inference_is_refused_with_its_row(tmp_path: Path) -> None:
    path = _csv(tmp_path / "t.csv", _table_rows())
    src = DataSource.of(path, id_column="pid", categorical=["smoker"], labels={"labels": "y"})
    prep = fit_preprocessing(load_site_data(src), None)
    new = _csv(tmp_path / "new.csv", [[21, 40, 20, "sometimes", 0], [22, 41, 22, "no", 1]])
    rows = load_site_data(src.with_path(new), inference=True)
    with pytest.raises(ConfigError, match=r"category 'sometimes' in row 1 \(line 2\) is not one the model was trained"):
        prep.apply(rows)


def test_rows_to_predict_need_no_labels_and_keep_those_they_have(tmp_path: Path) -> None:
    src = DataSource.of(_csv(tmp_path / "t.csv", _table_rows()), id_column="pid", categorical=["smoker"],
                        labels={"labels": "y"})
    with_labels = load_site_data(src, inference=True)
    assert with_labels.labels["labels"].tolist() == LABEL and with_labels.feature_order == ("age", "bmi", "smoker")
    ids_only = _csv(tmp_path / "new.csv", [[21, 40, 20, "no"]], header="pid,age,bmi,smoker")
    rows = load_site_data(src.with_path(ids_only), inference=True)
    assert rows.labels == {} and rows.ids.tolist() == [21]


def test_listed_categories_fix_the_width_and_refuse_others(tmp_path: Path) -> None:
    path = _csv(tmp_path / "t.csv", _table_rows())
    site = load_site_data(DataSource.of(path, id_column="pid", labels={"labels": "y"},
                                        categorical={"smoker": ["yes", "no", "former"]}))
    assert site.categories["smoker"] == ("former", "no", "yes") and site.width == 5
    with pytest.raises(ConfigError, match=r"value 'no' in rows 1, 3, 4, 6 \(lines 2, 4, 5, 7\) is not one of"):
        load_site_data(DataSource.of(path, id_column="pid", labels={"labels": "y"}, categorical={"smoker": ["yes"]}))


def test_bounds_are_checked_before_the_rows_are_read(tmp_path: Path) -> None:
    path = _csv(tmp_path / "t.csv", _table_rows())
    base: dict[str, Any] = {"id_column": "pid", "categorical": ["smoker"], "labels": {"labels": "y"}}
    cases = {
        "max_bytes": ({"max_bytes": 10}, "more than data.limits.max_bytes"),
        "max_rows": ({"max_rows": 5}, "more than data.limits.max_rows"),
        "max_columns": ({"max_columns": 4}, "5 columns, more than data.limits.max_columns"),
        "max_string_bytes": ({"max_string_bytes": 2}, "a cell of 3 bytes"),
        "max_categories": ({"max_categories": 1}, "2 categories, more than data.limits.max_categories"),
    }
    for limits, message in cases.values():
        with pytest.raises(ConfigError, match=message):
            load_site_data(DataSource.of(path, limits=limits, **base))
    # A .npy header that claims 10^9 rows is refused from the header: nothing that size is allocated.
    npy = tmp_path / "huge.npy"
    with npy.open("wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (10**9, 2)})
    with pytest.raises(ConfigError, match=r"1000000000 rows, more than data\.limits\.max_rows"):
        load_site_data(DataSource.of(npy, id_column="a", columns=["a", "b"]))
    # An object array is refused without unpickling anything.
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([[1, "x"]], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match="holds numbers"):
        load_site_data(DataSource.of(obj, id_column="a", columns=["a", "b"]))


def test_parquet_row_count_is_checked_from_its_footer(tmp_path: Path) -> None:
    path = _write_parquet(tmp_path / "t.parquet")
    with pytest.raises(ConfigError, match=r"6 rows, more than data\.limits\.max_rows"):
        load_site_data(DataSource.of(path, id_column="pid", categorical=["smoker"], limits={"max_rows": 5}))


def test_a_csv_given_as_safetensors_gets_advice(tmp_path: Path) -> None:
    path = _csv(tmp_path / "t.csv", _table_rows())
    with pytest.raises(ConfigError, match="needs the long form of the peer config's data"):
        load_peer_data(path)


def test_preprocessing_round_trips_through_json_and_refuses_malformed_input() -> None:
    site = site_from_arrays(IDS, np.column_stack([AGE, BMI]), preprocess={"scale": "standard"})
    prep = fit_preprocessing(site, IDS[:4])
    text = json.dumps(prep.to_json())
    again = Preprocessing.from_json(json.loads(text), where="m.json")
    assert again == prep
    bad = json.loads(text)
    bad["columns"][0]["factor"] = 0
    with pytest.raises(ConfigError, match="malformed"):
        Preprocessing.from_json(bad, where="m.json")
    bad = json.loads(text)
    bad["columns"][0]["fill"] = "x"
    with pytest.raises(ConfigError, match="fill must be a finite number"):
        Preprocessing.from_json(bad, where="m.json")
    with pytest.raises(ConfigError, match="format"):
        Preprocessing.from_json({"format": 99}, where="m.json")


def test_preprocessing_is_saved_with_the_checkpoint_and_a_changed_one_refuses_resume(tmp_path: Path) -> None:
    x = np.column_stack([AGE, BMI])
    site = site_from_arrays(IDS, x, preprocess={"scale": "standard"})
    prep = fit_preprocessing(site, IDS[:4])
    dep = write_deployment(tmp_path, deployment_yaml(
        ["owner", "lab"],
        {"bottom": {"peer": "owner", "input": "features", "model": [{"linear": {"in": 2, "out": 3}}]},
         "top": {"peer": "lab", "loss": "cross_entropy", "model": [{"linear": {"in": 3, "out": 2}}]}},
        [{"from": "bottom", "to": "top"}]))
    data = prep.apply(site)
    lab = PeerData(ids=torch.tensor(IDS), labels={"labels": torch.tensor(LABEL)})
    owner = make_executors(dep, {"owner": data, "lab": lab})["owner"]
    save_checkpoint(tmp_path / "ck", epoch=0, executor=owner, meta={}, preprocessing=prep)
    assert checkpoint_preprocessing(tmp_path / "ck", 0) == prep
    load_checkpoint(tmp_path / "ck", 0, owner, preprocessing=prep)  # the same transform: fine
    other = fit_preprocessing(site, IDS[1:5])
    with pytest.raises(TrainingError, match="preprocessed otherwise"):
        load_checkpoint(tmp_path / "ck", 0, owner, preprocessing=other)
    save_checkpoint(tmp_path / "plain", epoch=0, executor=owner, meta={})
    assert checkpoint_preprocessing(tmp_path / "plain", 0) is None
