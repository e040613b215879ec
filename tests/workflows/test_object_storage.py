"""A `kd run` whose inputs, teacher weights and --out are s3:// URIs on a real S3-compatible server
(moto in server mode, started here on 127.0.0.1): the store, Train/Tune checkpoints, the summary and
the MLflow artifacts land in the bucket, and a rerun (`kd precompute`) reuses the store there without
running a teacher."""
from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.fs as pafs
import pytest
import yaml

import counting_teacher
from test_data_plane import ROOT, _env
from kd_ops import data, models, store
from kd_ops.fsio import Loc

BUCKET = "kd-test"


@pytest.fixture()
def s3(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "MLFLOW_S3_ENDPOINT_URL": f"http://{host}:{port}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env
    server.stop()


def _keys(prefix: str) -> list[str]:
    fs, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/{prefix}")
    return [i.path[len(BUCKET) + 1:] for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if i.type == pafs.FileType.File]


def test_a_run_on_s3_lands_in_the_bucket_and_a_rerun_reuses_the_store(s3, tmp_path):
    splits = data.mnist1d_splits(500, 100, 100, 0, seed=0, transfer_seed=1)
    inputs = {n: str(data.write_split(i, Loc.of(f"s3://{BUCKET}/in/{n}"), 100)) for n, i in splits.items()}
    models.save_weights(models.cnn(width=8), f"s3://{BUCKET}/teachers/t.safetensors")
    cfg = {"name": "s3", "data": {"source": "parquet", "parquet": inputs},
           "teachers": [{"name": "t", "factory": "counting_teacher:make", "kwargs": {"width": 8},
                         "weights": f"s3://{BUCKET}/teachers/t.safetensors"}],
           "student": {"kwargs": {"width": 4}},
           "train": {"fit": {"epochs": 2}, "label_only_fit": {"epochs": 1}},
           "precompute": {"batch_size": 100, "num_actors": 1},
           "tune": {"num_samples": 2, "max_concurrent_trials": 2, "epochs": 1, "grace_period": 1,
                    "student_width": {"choice": [4, 6]}},
           "tracking": {"experiment": "s3", "registered_model": "s3-student"},
           "deploy": {"enabled": False}}  # its latency task would run the counting teacher too
    path = tmp_path / "s3.yaml"
    path.write_text(yaml.safe_dump(cfg))
    counter = tmp_path / "counter.txt"
    out = f"s3://{BUCKET}/runs/a"
    argv = [sys.executable, "-m", "workflows.cli", "run", str(path), "--out", out,
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    env = _env(counter) | s3
    first = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert sum(counting_teacher.rows(counter)) == 2 + 500  # the probe, then every input row once

    keys = _keys("runs/a")
    assert "runs/a/summary.json" in keys and "runs/a/store/t/manifest.json" in keys
    m = store.read_manifest(f"s3://{BUCKET}/runs/a/store", "t")
    assert m["rows"] == 500 and len(m["shards"]) == 5
    assert all(f"runs/a/store/t/{s['file']}" in keys for s in m["shards"].values())
    assert any(k.startswith("runs/a/ray/student/checkpoint_") and k.endswith("model.safetensors") for k in keys)
    assert any(k.startswith("runs/a/ray/tune/") for k in keys)
    artifacts = [k for k in keys if k.startswith("runs/a/mlflow/")]
    assert any(k.endswith("weights/model.safetensors") for k in artifacts), artifacts
    assert any(k.endswith("summary.json") for k in artifacts)
    summary = json.loads(Loc.of(f"{out}/summary.json").read_text())
    assert len(summary["tune_trials"]) == 2 and 0.0 <= summary["student"]["test_accuracy"] <= 1.0

    open(counter, "w").close()  # `kd precompute` reads the store as `kd run` does, without the fits after it
    again = subprocess.run([*argv[:3], "precompute", *argv[4:]], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert counting_teacher.rows(counter) == []  # no teacher forward pass: the store in the bucket was reused
    assert "precompute t: store is current" in again.stdout + again.stderr
    assert store.read_manifest(f"s3://{BUCKET}/runs/a/store", "t")["created_at"] == m["created_at"]
