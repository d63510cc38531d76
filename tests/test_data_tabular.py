"""Tabular sources: scikit-learn's diabetes and CSV / Parquet tables, on files each test writes itself."""
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from raydistill.data import default_augment, load_dataset, make_view
from raydistill.data.sources import infer_task
from raydistill.errors import ConfigError


def test_diabetes_is_a_fixed_regression_split_with_standardized_targets():
    from sklearn.datasets import load_diabetes

    ds = load_dataset("diabetes")
    assert ds.spec.task == "regression" and ds.spec.num_classes == 1 and ds.spec.input_shape == (10,)
    assert ds.train_x.shape == (354, 10) and ds.test_x.shape == (88, 10)
    assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.float32 and ds.train_y.shape == (354,)
    assert abs(ds.train_y.mean()) < 1e-5 and abs(ds.train_y.std() - 1) < 1e-5
    # the rows are the data set's own rows, and the split does not move between calls
    raw = load_diabetes(scaled=False)
    row = np.where((raw.data.astype(np.float32) == ds.test_x[0]).all(axis=1))[0]
    assert len(row) == 1
    again = load_dataset("diabetes")
    np.testing.assert_array_equal(ds.test_x, again.test_x)
    # standardized with the train statistics: undoing it gives the raw targets back
    raw_ds = load_dataset("diabetes", standardize_target=False)
    mean, std = raw_ds.train_y.mean(), raw_ds.train_y.std()
    np.testing.assert_allclose(ds.test_y * std + mean, raw_ds.test_y, rtol=1e-5)
    assert np.allclose(ds.spec.mean, raw_ds.train_x.astype(np.float64).mean(axis=0))
    assert default_augment("diabetes") == {"crop_pad": 0, "flip": False}
    assert make_view(ds.train_x[:4], 0, 0, 0, 1, 0, False).dtype.is_floating_point


def _table(n=50, seed=0, target="y", kind="float"):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal(n), rng.integers(0, 5, n)
    if kind == "float":
        y = 2 * a + b + 0.5
    elif kind == "string":
        y = np.where(a > 0, "pos", "neg")
    else:
        y = (a > 0).astype(np.int64) + 2 * (b > 2)
    return pa.table({"a": a, "b": b, target: y})


def test_tabular_csv_single_file_regression(tmp_path):
    path = tmp_path / "table.csv"
    pa_csv.write_csv(_table(), path)
    ds = load_dataset("tabular", str(path), target="y")
    assert ds.spec.task == "regression" and ds.spec.num_classes == 1 and ds.spec.input_shape == (2,)
    assert len(ds.test_x) == 10 and len(ds.train_x) == 40
    assert abs(ds.train_y.mean()) < 1e-5
    raw = load_dataset("tabular", str(path), target="y", standardize_target=False)
    # the target is the function of the features it was built from
    np.testing.assert_allclose(raw.train_y, 2 * raw.train_x[:, 0] + raw.train_x[:, 1] + 0.5, rtol=1e-5, atol=1e-5)


def test_tabular_parquet_folder_classification_with_string_labels(tmp_path):
    pq.write_table(_table(60, 0, kind="string"), tmp_path / "train.parquet")
    pq.write_table(_table(20, 1, kind="string"), tmp_path / "test.parquet")
    ds = load_dataset("tabular", str(tmp_path), target="y")
    assert ds.spec.task == "classification" and ds.spec.num_classes == 2
    assert ds.train_y.dtype == np.int64 and set(ds.train_y) == {0, 1}
    # sorted label order: "neg" -> 0, "pos" -> 1, and "pos" means a > 0
    np.testing.assert_array_equal(ds.test_y, (ds.test_x[:, 0] > 0).astype(np.int64))
    assert len(ds.train_x) == 60 and len(ds.test_x) == 20


def test_tabular_integer_target_is_classes_unless_told_regression(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(_table(80, kind="int"), path)
    assert load_dataset("tabular", str(path), target="y").spec.num_classes == 4
    forced = load_dataset("tabular", str(path), target="y", task="regression")
    assert forced.spec.task == "regression" and forced.train_y.dtype == np.float32
    assert infer_task(np.arange(100)) == "regression" and infer_task(np.array([0.5, 1.5])) == "regression"
    assert infer_task(np.array(["a", "b"], dtype=object)) == "classification"


def test_tabular_bad_input_names_the_field(tmp_path):
    path = tmp_path / "table.csv"
    pa_csv.write_csv(_table(), path)
    with pytest.raises(ConfigError, match="data.options.target"):
        load_dataset("tabular", str(path))
    with pytest.raises(ConfigError, match="data.options.target='z'"):
        load_dataset("tabular", str(path), target="z")
    with pytest.raises(ConfigError, match="data.root"):
        load_dataset("tabular", str(tmp_path / "missing.csv"), target="y")
    with pytest.raises(ConfigError, match="data.root"):
        load_dataset("tabular", str(tmp_path), target="y")          # a folder without train/test files
    with pytest.raises(ConfigError, match="data.options.task"):
        load_dataset("tabular", str(path), target="y", task="ranking")
    pa_csv.write_csv(pa.table({"name": ["x", "y"] * 5, "y": np.arange(10.0)}), tmp_path / "text.csv")
    with pytest.raises(ConfigError, match="numeric feature columns"):
        load_dataset("tabular", str(tmp_path / "text.csv"), target="y")


@pytest.mark.parametrize("column, task", [("y", None), ("y", "regression"), ("b", "regression")])
def test_a_missing_value_is_named_by_file_column_and_row_at_load_time(tmp_path, column, task):
    table = _table(n=20, kind="int").to_pydict()
    table[column][6] = None                         # the 7th data row: a missing cell, read by pyarrow as null
    path = tmp_path / "table.csv"
    pa_csv.write_csv(pa.table(table), path)
    options = {"task": task} if task else {}
    with pytest.raises(ConfigError, match=rf"^data\.root='.*table\.csv': a number in every cell; column '{column}' is "
                                          r"missing, NaN or infinite at row 7 "):
        load_dataset("tabular", str(path), target="y", **options)
    floats = pa.table({"a": np.arange(10.0), "y": np.r_[np.arange(9.0), np.nan]})
    pq.write_table(floats, tmp_path / "nan.parquet")
    with pytest.raises(ConfigError, match=r"column 'y' is missing, NaN or infinite at row 10 "):
        load_dataset("tabular", str(tmp_path / "nan.parquet"), target="y", task="regression")


def test_an_empty_csv_is_one_line_and_exit_2(tmp_path, capsys):
    from raydistill.cli import main

    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ConfigError, match=r"^data\.root='.*empty\.csv': a table with a header and rows \(Empty CSV"):
        load_dataset("tabular", str(tmp_path / "empty.csv"), target="y")
    code = main(["train", "--runtime", "inprocess", "--output", str(tmp_path / "run"), "--set", "data.name=tabular",
                 "--set", f"data.root={tmp_path / 'empty.csv'}", "--set", "data.options={target: y}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("raydistill: error: data.root="), err
    assert not (tmp_path / "run").exists()
