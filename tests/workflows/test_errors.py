"""Bad input: one clear error naming the problem, a non-zero exit, nothing marked complete."""
from __future__ import annotations

import os
import time

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


@pytest.mark.parametrize("name", [".", ".."])
def test_a_teacher_named_dot_or_dotdot_is_refused_and_no_file_under_out_is_touched(capsys, tmp_path, name):
    """`..` made the teacher's store directory --out itself, and publishing deleted the run's inputs."""
    out = tmp_path / "out"
    inputs = out / "data" / "train" / "part-0.parquet"
    inputs.parent.mkdir(parents=True)
    inputs.write_bytes(b"the user's inputs")
    rc, err, _ = _run(capsys, tmp_path, "run", str(tiny_config(tmp_path)), "--set", f"teachers.0.name={name}")
    assert rc == 2 and err.count("kd: error:") == 1 and f"teachers.0.name: Value error, '{name}' is not a plain name" in err
    assert "Traceback" not in err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["data", "data/train", "data/train/part-0.parquet"]
    assert inputs.read_bytes() == b"the user's inputs"


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


def _nan_features(d):
    f = sorted(d.glob("*.parquet"))[0]
    t = pq.read_table(f)
    x = t.column("x").to_pylist()
    for i in range(10):
        x[i][3] = float("nan")
    pq.write_table(t.set_column(t.schema.get_field_index("x"), "x", pa.array(x, t.schema.field("x").type)), f)


def _ragged_features(d):
    f = sorted(d.glob("*.parquet"))[0]
    t = pq.read_table(f)
    x = [row[:39] if i % 2 else row + [0.0] for i, row in enumerate(t.column("x").to_pylist())]  # 39 and 41
    pq.write_table(t.set_column(t.schema.get_field_index("x"), "x", pa.array(x, pa.list_(pa.float32()))), f)


def _label_12(d):
    f = sorted(d.glob("*.parquet"))[0]
    t = pq.read_table(f)
    y = t.column("label").to_numpy().copy()
    y[5] = 12
    pq.write_table(t.set_column(t.schema.get_field_index("label"), "label", pa.array(y)), f)


def _corrupt_file(d):
    f = sorted(d.glob("*.parquet"))[0]
    raw = bytearray(f.read_bytes())
    raw[4:68] = b"\xff" * 64  # the first page header (right after the PAR1 magic); the footer stays readable
    f.write_bytes(bytes(raw))


def _nan_teacher(tmp_path):
    w = tmp_path / "nan.safetensors"
    m = models.cnn(width=8)
    for p in m.parameters():
        p.data.fill_(float("nan"))
    models.save_weights(m, w)
    return {"weights": str(w)}


def _wider_teacher(tmp_path):
    """A teacher (with its weights) built for 50 features; the inputs have 40."""
    w = tmp_path / "wide.safetensors"
    models.save_weights(models.cnn(width=8, length=50), w)
    return {"weights": str(w), "kwargs": {"width": 8, "length": 50}}


@pytest.mark.parametrize("mutate, teacher_over, message", [
    (_nan_features, {}, "column 'x': 10 rows hold NaN or infinite values, e.g. ids ["),
    (_ragged_features, {}, "column 'x': lists of different lengths (39 to 41)"),
    (_label_12, {}, "1 labels outside [0, 10) (values [12], e.g. ids ["),
    (_corrupt_file, {}, "cannot be read as Parquet"),
    (None, _nan_teacher, "teacher 't' returned NaN or infinite logits"),
    (None, _wider_teacher, "cannot run on the input rows (shape [2, 40]"),
])
def test_bad_data_and_teachers_stop_before_compute_naming_file_column_and_ids(ray_session, capsys, tmp_path,
                                                                              mutate, teacher_over, message):
    import yaml

    over = teacher_over(tmp_path) if callable(teacher_over) else teacher_over
    cfg = {"name": "bad", "data": _parquet_source(tmp_path, mutate), "tracking": {"experiment": "bad"},
           "teachers": _teacher(tmp_path, **over)}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, err, uri = _run(capsys, tmp_path, "precompute", str(path))
    assert rc == 2, err
    assert message in err and err.count("kd: error:") == 1, err
    if mutate is not None:
        assert "train/part-" in err or "/train/" in err  # the file is named
    _nothing_complete(tmp_path, uri)


def test_empty_validation_split_and_ids_shared_by_two_splits(ray_session, capsys, tmp_path):
    import yaml

    src = _parquet_source(tmp_path)
    val = tmp_path / "in" / "val"
    for f in val.glob("*.parquet"):
        pq.write_table(pq.read_table(f).slice(0, 0), f)
    cfg = {"name": "bad", "data": src, "teachers": _teacher(tmp_path), "tracking": {"experiment": "bad"}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    rc, err, uri = _run(capsys, tmp_path, "precompute", str(tmp_path / "bad.yaml"))
    assert rc == 2 and "split 'val'" in err and "has no rows" in err, err

    src = _parquet_source(tmp_path / "b")
    test_file = sorted((tmp_path / "b" / "in" / "test").glob("*.parquet"))[0]
    train_file = sorted((tmp_path / "b" / "in" / "train").glob("*.parquet"))[0]
    t = pq.read_table(test_file)
    shared = pq.read_table(train_file).column("id")[0].as_py()
    ids = t.column("id").to_numpy().copy()
    ids[0] = shared
    pq.write_table(t.set_column(0, "id", pa.array(ids)), test_file)
    cfg["data"] = src
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    rc, err, uri = _run(capsys, tmp_path, "precompute", str(tmp_path / "bad.yaml"))
    assert rc == 2 and f"id {shared} in test/{test_file.name} and train/{train_file.name}" in err, err
    _nothing_complete(tmp_path, uri)


@pytest.mark.parametrize("case, message", [
    ("out_under_file", "cannot create the directory"),
    ("out_is_file", "is a file; give a directory"),
    ("config_dir", "is a directory; give the YAML file"),
    ("config_latin1", "not UTF-8 text"),
    ("server_down", "does not answer"),
])
def test_bad_paths_and_an_unreachable_tracking_server_fail_before_ray(capsys, tmp_path, monkeypatch, case, message):
    from workflows.tracking import CREDENTIAL_ENV

    for k in CREDENTIAL_ENV:  # `kd` moves a URI's credentials into these: the session's come back after
        if k in os.environ:
            monkeypatch.setenv(k, os.environ[k])
        else:
            monkeypatch.delenv(k)
    cfg = tiny_config(tmp_path)
    out = tmp_path / "out"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    if case == "out_under_file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "out"
    elif case == "out_is_file":
        out = tmp_path / "f"
        out.write_text("x")
    elif case == "config_dir":
        cfg = tmp_path
    elif case == "config_latin1":
        cfg.write_bytes(cfg.read_bytes() + "# caf\xe9\n".encode("latin-1"))
    elif case == "server_down":
        from conftest import _free_port

        uri = f"http://kd:s3cr3t@127.0.0.1:{_free_port()}"
    started = time.monotonic()
    rc = cli.main(["run", str(cfg), "--out", str(out), "--tracking-uri", uri])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("kd: error:") == 1, err
    assert "s3cr3t" not in err
    assert time.monotonic() - started < 60  # refused up front: no Ray start, no MLflow retry loop


def test_a_damaged_store_shard_is_recomputed_on_reuse_not_trusted(ray_session, capsys, tmp_path):
    """A truncated shard and a shard with two ids swapped: the next run recomputes exactly those
    two files (counted by the teacher) and the store reads back whole."""
    import yaml

    import counting_teacher
    from conftest import COUNTER
    from kd_ops import store

    w = tmp_path / "t.safetensors"
    models.save_weights(models.cnn(width=8), w)
    cfg = {"name": "dmg", "data": _parquet_source(tmp_path), "tracking": {"experiment": "dmg"},
           "teachers": [{"name": "t", "factory": "counting_teacher:make", "kwargs": {"width": 8}, "weights": str(w)}],
           "precompute": {"batch_size": 100, "num_actors": 1}}
    path = tmp_path / "dmg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, err, _ = _run(capsys, tmp_path, "precompute", str(path))
    assert rc == 0, err
    root = tmp_path / "out" / "store"
    m = store.read_manifest(root, "t")
    units = sorted(m["shards"])
    a, b = units[0], units[1]
    pa_path = store.shard_of(root, m, a).path
    raw = open(pa_path, "rb").read()
    open(pa_path, "wb").write(raw[: len(raw) // 2])
    t = pq.read_table(store.shard_of(root, m, b).path)
    ids = t.column("id").to_numpy().copy()
    ids[[0, 1]] = ids[[1, 0]]
    pq.write_table(t.set_column(0, "id", pa.array(ids)), store.shard_of(root, m, b).path)
    before = len(counting_teacher.rows(COUNTER))
    rc, err, _ = _run(capsys, tmp_path, "precompute", str(path))
    assert rc == 0, err
    recomputed = sum(counting_teacher.rows(COUNTER)[before:]) - 2  # minus the driver's 2-row probe
    assert recomputed == m["shards"][a]["rows"] + m["shards"][b]["rows"]
    m2 = store.read_manifest(root, "t")
    assert store.damaged(root, m2) == [] and m2["rows"] == m["rows"]
