"""Bad input: one clear error naming the problem, a non-zero exit, nothing marked complete."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from conftest import tiny_config
from kd_ops import data, models
from workflows import cli


def _parquet_source(tmp_path, mutate=None):
    s = data.mnist1d_splits(300, 50, 50, 0, seed=0, transfer_seed=1)
    dirs = {}
    for name, inputs in s.items():
        dirs[name] = str(data.write_split(inputs, tmp_path / "in" / name))
    if mutate:
        mutate(tmp_path / "in" / "train")
    return {"source": "parquet", "parquet": dirs}


def _teacher(tmp_path, **over):
    w = tmp_path / "t.safetensors"
    models.save_weights(models.cnn(width=8), w)
    return [{"name": "t", "factory": "kd_ops.models:cnn", "kwargs": {"width": 8}, "weights": str(w)} | over]


def _run(capsys, tmp_path, *argv):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = cli.main([*argv, "--out", str(tmp_path / "out"), "--tracking-uri", uri])
    err = capsys.readouterr().err
    return rc, err, uri


def _nothing_complete(tmp_path, uri):
    assert not list((tmp_path / "out").rglob("manifest.json")) if (tmp_path / "out").exists() else True
    assert not list((tmp_path / "out").rglob(".staging-*")) if (tmp_path / "out").exists() else True
    assert not (tmp_path / "out" / "summary.json").exists()
    if (tmp_path / "mlflow.db").exists():
        runs = MlflowClient(uri).search_runs(
            [e.experiment_id for e in MlflowClient(uri).search_experiments()])
        assert all(r.info.status == "FAILED" for r in runs)


@pytest.mark.parametrize("override, message", [
    ("distill.temprature=2", "distill.temprature: Extra inputs are not permitted"),
    ("distill.temperature=0", "distill.temperature: Input should be greater than 0"),
    ("distill.teacher_weights={t1: -1, t2: 1}", "teacher weights must be >= 0"),
])
def test_config_errors_exit_2_before_anything_runs(capsys, tmp_path, override, message):
    rc, err, uri = _run(capsys, tmp_path, "run", str(tiny_config(tmp_path)), "--set", override)
    assert rc == 2 and message in err and err.count("kd: error:") == 1
    assert not (tmp_path / "out").exists()


def _drop_id(d):
    for f in d.glob("*.parquet"):
        pq.write_table(pq.read_table(f).drop_columns(["id"]), f)


def _duplicate_ids(d):
    f = sorted(d.glob("*.parquet"))[0]
    t = pq.read_table(f)
    ids = t.column("id").to_numpy().copy()
    ids[1] = ids[0]
    pq.write_table(t.set_column(0, "id", pa.array(ids)), f)


@pytest.mark.parametrize("mutate, teacher_over, message", [
    (_drop_id, {}, "no `id` column"),
    (_duplicate_ids, {}, "1 duplicate ids, e.g. ["),
    (None, {"factory": "not_a_package.teachers:make"}, "cannot import module 'not_a_package.teachers'"),
    (None, {"kwargs": {"width": 12}}, "does not fit the module CNN1D: shape mismatch"),
])
def test_bad_inputs_and_teachers_fail_clearly_and_publish_nothing(ray_session, capsys, tmp_path, mutate, teacher_over, message):
    import yaml

    cfg = {"name": "bad", "data": _parquet_source(tmp_path, mutate), "teachers": _teacher(tmp_path, **teacher_over),
           "tracking": {"experiment": "bad"}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, err, uri = _run(capsys, tmp_path, "precompute", str(path))
    assert rc == 2, err
    assert message in err and err.count("kd: error:") == 1
    _nothing_complete(tmp_path, uri)
