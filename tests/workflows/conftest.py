"""Shared fixtures: one real local Ray session for the whole test run, a real MLflow server on
127.0.0.1, and a tiny MNIST-1D config (hundreds of samples, 2 teachers, 2 trials, 1-2 epochs)."""
from __future__ import annotations

import base64
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from werkzeug.security import generate_password_hash

HERE = Path(__file__).parent
COUNTER = Path(os.environ.setdefault("KD_TEST_COUNTER", f"/tmp/kd-test-counter-{os.getpid()}.txt"))
FLAKY = Path(os.environ.setdefault("KD_TEST_FLAKY", f"/tmp/kd-test-flaky-{os.getpid()}.txt"))  # flaky_student


@pytest.fixture(scope="session")
def ray_session():
    # Ray workers inherit the environment of the raylet started here: the counting teacher's
    # module path and counter file must be set before init.
    os.environ["PYTHONPATH"] = f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    COUNTER.unlink(missing_ok=True)
    FLAKY.unlink(missing_ok=True)
    import ray

    from workflows.ray_session import init_ray

    init_ray()
    yield ray
    ray.shutdown()
    COUNTER.unlink(missing_ok=True)
    FLAKY.unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The test MLflow server's one user (basic auth; MLflow wants passwords of 12+ characters). Its
# credentials are in this process's environment before any fixture starts Ray, as a real
# cluster's pods get them from a Secret: the local raylet, and so every Ray worker, inherits the
# environment it starts with (the runtime env carries no secret).
MLFLOW_USER, MLFLOW_PASSWORD = "kd", "s3cr3t-pa55-w0rd"
os.environ.update(MLFLOW_TRACKING_USERNAME=MLFLOW_USER, MLFLOW_TRACKING_PASSWORD=MLFLOW_PASSWORD)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with its own sqlite store and artifact root, behind
    MLflow's basic auth (user MLFLOW_USER, password MLFLOW_PASSWORD): a request without them is
    refused, so a run reaches it only if the credentials really flow."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    (root / "basic_auth.ini").write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\n"
        f"admin_username = {MLFLOW_USER}\nadmin_password = {MLFLOW_PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = os.environ | {"MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"),
                        "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex(),  # the auth app's CSRF key
                        # no job runner (five huey consumer processes for GenAI jobs that kd-ops never submits)
                        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180  # ~7 s when idle; minutes on a loaded 2-core machine
    while True:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    # The server checks the password on every request against its stored hash, by default scrypt
    # (~0.1 s of CPU a request, one request at a time): a run's few hundred requests then cost it
    # tens of seconds. The same password under a cheap PBKDF2 hash: the same check, at test speed.
    with sqlite3.connect(root / "auth.db") as db:
        db.execute("UPDATE users SET password_hash = ? WHERE username = ?",
                   (generate_password_hash(MLFLOW_PASSWORD, method="pbkdf2:sha256:1000"), MLFLOW_USER))
    search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
    try:  # basic auth is really on: an anonymous request is refused...
        urllib.request.urlopen(search, timeout=30).close()
        anonymous = 200
    except urllib.request.HTTPError as e:
        anonymous = e.code
    # ...and one with the credentials is answered
    token = base64.b64encode(f"{MLFLOW_USER}:{MLFLOW_PASSWORD}".encode()).decode()
    with urllib.request.urlopen(urllib.request.Request(search, headers={"Authorization": f"Basic {token}"}),
                                timeout=30) as r:
        signed_in = r.status
    if (anonymous, signed_in) != (401, 200):
        os.killpg(proc.pid, 9)
        raise RuntimeError(f"the test mlflow server answered an anonymous request with {anonymous} (not 401) "
                           f"and one with its credentials with {signed_in} (not 200)")
    yield url
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a loaded machine: SIGTERM was not enough in time
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)


def tiny_config(tmp_path: Path, **sections) -> Path:
    """Write a tiny but complete config (counting teachers) and return its path."""
    teacher = {"factory": "counting_teacher:make", "kwargs": {"width": 16}, "fit": {"epochs": 3, "lr": 0.01}}
    cfg = {
        "name": "tiny",
        "data": {"mnist1d": {"labelled": 600, "val": 100, "test": 100, "transfer": 600}},
        "teachers": [{"name": "t1", **teacher}, {"name": "t2", **teacher, "fit": {"epochs": 3, "lr": 0.01, "seed": 1}}],
        "student": {"kwargs": {"width": 4}},
        "train": {"fit": {"epochs": 2}, "label_only_fit": {"epochs": 2}},
        "precompute": {"batch_size": 256, "num_actors": 1},
        "tune": {"num_samples": 2, "max_concurrent_trials": 2, "epochs": 2, "grace_period": 1,
                 "student_width": {"choice": [4, 6]}},
        "tracking": {"experiment": "tiny", "registered_model": "tiny-student"},
        "deploy": {"enabled": False},  # tests of the deploy stage turn it on (TINY_DEPLOY)
    }
    for k, v in sections.items():
        cfg[k] = v
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def one_teacher_split(tmp_path: Path, rows: int = 300):
    """A training split of MNIST-1D in Parquet files of 100 rows and one untrained width-8 CNN
    teacher with its weights: (split, input dir, weights path, TeacherConfig)."""
    from kd_ops import data, models
    from workflows.config import TeacherConfig

    split = data.mnist1d_splits(rows, 50, 50, 0, seed=0, transfer_seed=1)["train"]
    src = data.write_split(split, tmp_path / "in" / "train", rows_per_file=100)
    w = tmp_path / "t.safetensors"
    models.save_weights(models.cnn(width=8), w)
    return split, src, w, TeacherConfig(name="t", factory="kd_ops.models:cnn", kwargs={"width": 8}, weights=str(w))


# the deploy stage, quick: few timed runs, small batches, one QAT epoch; INT8 ships whatever the
# tiny students lose (the choice itself: test_choices.py, tests/kd_ops/test_int8_recipes.py)
TINY_DEPLOY = {"target": {"runs": 10, "warmup": 2, "batch_sizes": [1, 16]}, "calibration_rows": 64, "qat": "always",
               "qat_epochs": 1, "int8_max_drop": 1.0}


def ddp_fits(cfg, out, tmp_path, fit, kwargs, distill: bool = True, workers=(1, 2)):
    """The same fit on 1 and 2 Train workers (`workers`) over the streamed store (nothing cached in
    the object store), each worker tracing the ids it trained on and its final weights. Returns
    ({workers: (Trained, trace dir)}, the training split's ids sorted)."""
    from kd_ops import data, store
    from workflows import tasks, train
    from workflows.stages import training_data
    from workflows.layout import Layout

    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"cache_datasets_mb": 0})})
    lay, task = Layout(out), tasks.for_config(cfg)
    dirs = task.data(lay)
    inputs = training_data.datasets(task, dirs, lay, teachers=distill, splits={"train": task.train_splits, "val": ("val",)})
    assert not inputs.cached
    sets = inputs.sets
    loop = training_data.loop(task, cfg.student.factory, kwargs, fit, inputs=inputs, label="ddp", distill=distill)
    fits = {}
    for n in workers:
        trace = tmp_path / f"trace-{n}"
        trace.mkdir()
        res = train.fit(loop.replace(trace_dir=str(trace)), sets, name=f"ddp-{n}", storage=tmp_path / "ray",
                        num_workers=n, use_gpu=False)
        fits[n] = (res, trace)
    expected = np.sort(np.concatenate([store.open_parquet(f).read(columns=["id"]).column("id").to_numpy()
                                       for s in task.train_splits for f in data.parquet_files(out / "data" / s)]))
    return fits, expected


def assert_ddp_split(fits, expected, epochs):
    """Each epoch the two workers saw disjoint ids whose union is the split, and ended with the same weights."""
    _, trace = fits[2]
    for epoch in range(1, epochs + 1):
        a, b = (np.load(trace / f"rank{r}-epoch{epoch}.npy", allow_pickle=False) for r in (0, 1))
        assert len(a) and len(b) and not np.intersect1d(a, b).size, epoch  # disjoint
        np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), expected)  # the whole split, once
    assert (trace / "rank0.sha256").read_text() == (trace / "rank1.sha256").read_text()
    if 1 in fits:
        np.testing.assert_array_equal(np.sort(np.load(fits[1][1] / "rank0-epoch1.npy")), expected)

