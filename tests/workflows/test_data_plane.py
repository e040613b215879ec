"""The cluster data plane, each on real Ray in separate `kd` processes where a process must die or
several must run at once: shard-level resume after a SIGKILLed driver, two runs on one machine,
a fit that cannot get its resources, user code shipped to another node; and Ray Data's scheduling
loop paced while its reads wait on a slow consumer."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from ray.data._internal.execution.execution_callback import ExecutionCallback

import counting_teacher
from conftest import HERE
from kd_ops import data, models, store
from workflows.ray_session import PacedScheduling

ROOT = HERE.parent.parent


def _env(counter: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each kd process starts its own cluster
    env |= {"PYTHONPATH": f"{HERE}{os.pathsep}{ROOT}", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    if counter is not None:
        env["KD_TEST_COUNTER"] = str(counter)
    return env


def _kd(*argv, env, cwd=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "workflows.cli", *map(str, argv)], env=env, cwd=cwd or ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def _source(tmp_path: Path, rows_per_file: int, train: int = 600) -> dict:
    s = data.mnist1d_splits(train + 200, 100, 100, 0, seed=0, transfer_seed=1)
    return {"source": "parquet",
            "parquet": {n: str(data.write_split(i, tmp_path / "in" / n, rows_per_file)) for n, i in s.items()}}


def _config(tmp_path: Path, teacher_kwargs: dict, **sections) -> Path:
    w = tmp_path / "teacher.safetensors"
    models.save_weights(models.cnn(width=8), w)
    cfg = {"name": "dp", "data": _source(tmp_path, 50),
           "teachers": [{"name": "t", "factory": "counting_teacher:make", "kwargs": teacher_kwargs, "weights": str(w)}],
           "student": {"kwargs": {"width": 4}},
           "train": {"fit": {"epochs": 2}, "label_only_fit": {"epochs": 1}},
           "precompute": {"batch_size": 50, "num_actors": 1},
           "tune": {"enabled": False}, "tracking": {"experiment": "dp"}} | sections
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _commits(out: Path) -> list[Path]:
    return sorted((out / "store" / "t" / "_commits").rglob("*.json"))


def test_a_killed_precompute_reruns_only_missing_files_and_ends_with_the_same_store(ray_session, tmp_path):
    cfg = _config(tmp_path, {"width": 8, "delay": 0.4})
    out, counter = tmp_path / "out", tmp_path / "counter.txt"
    files = sum(len(data.parquet_files(tmp_path / "in" / s)) for s in ("train", "val", "test"))
    total = 800
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = _kd("precompute", cfg, "--out", out, "--tracking-uri", uri, env=_env(counter))
    deadline = time.time() + 240
    while len(_commits(out)) < 4:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no shard committed in time"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver; Ray's own processes notice and end, finishing what is in flight
    proc.wait()
    seen, stable_since = len(_commits(out)), time.time()
    while time.time() - stable_since < 5:
        time.sleep(0.5)
        if len(_commits(out)) != seen:
            seen, stable_since = len(_commits(out)), time.time()
    assert store.read_manifest(out / "store", "t") is None  # nothing published
    committed = {str(p.relative_to(out / "store" / "t" / "_commits")) for p in _commits(out)}
    assert 4 <= len(committed) < files
    first = sum(counting_teacher.rows(counter)) - 2  # minus the 2-row probe on the driver
    open(counter, "w").close()

    rerun = _kd("precompute", cfg, "--out", out, "--tracking-uri", uri, env=_env(counter))
    log, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, log
    second = sum(counting_teacher.rows(counter)) - 2
    committed_rows = 50 * len(committed)
    assert second == total - committed_rows  # the rerun computed exactly the files without a commit
    in_flight = 2 * 50  # 1 actor × 2 calls × 50-row files
    assert first + second <= total + in_flight
    assert f"precompute t: {files - len(committed)} of {files} input files to compute" in log

    clean = tmp_path / "clean"  # in this session's Ray: the same code as `kd precompute`, no process to start
    from workflows import commands
    from workflows.config import load_config

    assert commands.precompute(load_config(cfg), clean, tracking_uri=uri) == 0
    ids_a, cols_a, m_a = store.read_teacher(out / "store", "t")
    ids_b, cols_b, m_b = store.read_teacher(clean / "store", "t")
    a, b = np.argsort(ids_a), np.argsort(ids_b)
    assert np.array_equal(ids_a[a], ids_b[b]) and len(ids_a) == total
    assert cols_a["logits"][a].tobytes() == cols_b["logits"][b].tobytes()  # bitwise
    assert m_a["inputs"] == m_b["inputs"] and m_a["rows"] == m_b["rows"] == total
    # no file is left that the manifest does not name (the killed attempt's partial shards are gone)
    on_disk = sorted(str(p.relative_to(out / "store" / "t")) for p in (out / "store" / "t").rglob("*.parquet"))
    assert on_disk == sorted(s["file"] for s in m_a["shards"].values())


def test_two_searches_with_asha_in_two_ray_instances_beside_a_third_both_finish(ray_session, tmp_path):
    """Two `kd tune` processes, each with its own local Ray instance, while this test session's Ray
    (a third instance) stays up: every process of a run is pinned to its own cluster, so Ray Train's
    PlacementGroupCleaner and the state API never pick another instance, ASHA's stopped trials
    free their resources and both searches finish. The store is precomputed once, in this
    session's Ray, so the two processes run only what the point is: Tune, ASHA and Train."""
    from workflows import commands
    from workflows.config import load_config

    tune = {"num_samples": 2, "max_concurrent_trials": 1, "epochs": 2, "grace_period": 1,
            "student_width": {"choice": [4, 6]}, "temperature": {"choice": [1.0, 2.0]}}
    cfg = _config(tmp_path, {"width": 8}, tune=tune)
    assert commands.precompute(load_config(cfg), tmp_path / "out", tracking_uri=f"sqlite:///{tmp_path / 'pre.db'}") == 0
    procs = []
    for i in range(2):
        d = tmp_path / f"run{i}"
        shutil.copytree(tmp_path / "out" / "store", d / "out" / "store")
        procs.append((d, _kd("tune", cfg, "--out", d / "out", "--tracking-uri", f"sqlite:///{d / 'mlflow.db'}",
                             env=_env())))
    for d, p in procs:
        log, _ = p.communicate(timeout=600)
        assert p.returncode == 0, log[-4000:]
        result = json.loads(log[log.index('{\n  "best"'):])
        assert len(result["trials"]) == 2 and result["failed_trials"] == [], result
        assert {t["student_width"] for t in result["trials"]} <= {4, 6} and 0.0 <= result["best"]["val_accuracy"] <= 1.0
        assert all(1 <= t["epochs"] <= 2 for t in result["trials"])  # ASHA may stop a trial after its first epoch


def test_a_fit_that_cannot_get_its_resources_fails_in_bounded_time_naming_them(tmp_path):
    cfg = _config(tmp_path, {"width": 8})
    start = time.time()
    p = _kd("run", cfg, "--out", tmp_path / "out", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--set", "train.cpus_per_worker=64", "--set", "train.resource_wait_s=3", env=_env())
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 2, log[-3000:]
    err = [line for line in log.splitlines() if line.startswith("kd: error:")]
    assert len(err) == 1 and "1 Train worker(s) of {CPU: 64}" in err[0] and "after 3.0 s" in err[0], log[-3000:]
    assert time.time() - start < 240
    assert not (tmp_path / "out" / "summary.json").exists()


USER_MODULE = '''
import os
from kd_ops.models import CNN1D


def make(**kwargs):
    with open(os.environ["KD_TEST_SHIPPED"], "a") as f:
        f.write(f"{__file__} {os.getpid()}\\n")
    return CNN1D(**kwargs)
'''


def test_user_code_is_shipped_to_a_worker_node(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    user = tmp_path / "user"
    user.mkdir()
    (user / "my_teachers.py").write_text(USER_MODULE)
    w = tmp_path / "teacher.safetensors"
    models.save_weights(models.cnn(width=8), w)
    cfg = {"name": "ship", "data": _source(tmp_path, 200), "code": ["user/my_teachers.py"],
           "teachers": [{"name": "t", "factory": "my_teachers:make", "kwargs": {"width": 8}, "weights": str(w)}],
           "precompute": {"batch_size": 100, "num_actors": 1}, "tracking": {"experiment": "ship"}}
    (tmp_path / "ship.yaml").write_text(yaml.safe_dump(cfg))
    marker = tmp_path / "shipped.txt"
    monkeypatch.setenv("KD_TEST_SHIPPED", str(marker))  # the nodes' processes inherit it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        env = _env()
        # the driver runs from another directory: nothing but the config's `code` names the module
        p = _kd("precompute", tmp_path / "ship.yaml", "--out", tmp_path / "out", "--ray-address", cluster.address,
                "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", env=env, cwd=ROOT)
        log, _ = p.communicate(timeout=300)
    finally:
        cluster.shutdown()
    assert p.returncode == 0, log[-3000:]
    loaded = [line.split()[0] for line in marker.read_text().splitlines()]
    driver = str(user / "my_teachers.py")
    workers = [f for f in loaded if f != driver]
    assert workers, loaded  # the teacher actor built the model too, on the worker node
    assert all("runtime_resources" in f and "py_modules" in f for f in workers), workers
    assert store.read_manifest(tmp_path / "out" / "store", "t")["rows"] == 800


class _Steps(ExecutionCallback):
    """Counts scheduling-loop steps of the executions it is attached to (they run in this process)."""
    count = 0

    def on_execution_step(self, executor) -> None:
        type(self).count += 1


def test_a_backpressured_dataset_does_not_spin_its_scheduling_loop(ray_session):
    """The reads of a dataset wait for object-store budget while its consumer is slow (a store larger
    than the budget, read faster than a student trains): its executor steps at most every
    PacedScheduling.STEP_S instead of polling without pause (Ray 2.60 unpaced: ~1,600 steps/s on 2 cores)."""
    ray = ray_session
    ds = ray.data.range(40, override_num_blocks=40).map_batches(
        lambda b: {"x": np.zeros((len(b["id"]), 4_000_000), np.uint8)}, batch_size=None)
    assert PacedScheduling in ds.context.custom_execution_callback_classes  # every dataset of a kd-ops session
    ds.context.custom_execution_callback_classes = [*ds.context.custom_execution_callback_classes, _Steps]
    ds.context.execution_options.resource_limits = ray.data.ExecutionResources(object_store_memory=20e6)
    it = iter(ds.iter_batches(batch_size=1, batch_format="numpy"))
    rows = len(next(it)["x"])
    _Steps.count, start = 0, time.monotonic()
    for batch in it:  # a slow consumer: about five 4 MB blocks fit the budget, the reads wait on it
        time.sleep(0.05)
        rows += len(batch["x"])
    elapsed = time.monotonic() - start
    assert rows == 40
    assert _Steps.count >= 10, "Ray no longer calls on_execution_step: PacedScheduling paces nothing"
    # steps are STEP_S apart at least (unpaced: 3,182 in these 2 s on a 2-core machine)
    assert _Steps.count <= elapsed / PacedScheduling.STEP_S + 5, (_Steps.count, elapsed)


def test_ray_is_pinned_to_the_tested_range_and_the_private_hooks_kd_ops_uses_exist():
    """PacedScheduling and the dashboard check use Ray internals: pyproject pins Ray to the range they
    were tested with, and each hook is checked here (and at import) instead of failing silently."""
    import tomllib

    import ray
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [req] = [Requirement(d) for d in deps if Requirement(d).name == "ray"]
    assert str(req.specifier) and ray.__version__ in req.specifier and "2.61.0" not in req.specifier, str(req)
    assert callable(ExecutionCallback.on_execution_step) and issubclass(PacedScheduling, ExecutionCallback)
    assert PacedScheduling.on_execution_step is not ExecutionCallback.on_execution_step
    assert callable(ray._private.utils.get_dashboard_dependency_error)
    import ray.data

    assert hasattr(ray.data.DataContext.get_current(), "custom_execution_callback_classes")
