"""Failures cost minutes, not the run: a Train worker SIGKILLed mid-fit resumes from its latest
checkpoint; a fit that finished is not run again; a worker node lost mid-precompute loses and
duplicates no rows, and teachers pinned to a custom resource run only where it is."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import pyarrow.parquet as pq
import ray
import ray.train

from kd_ops import data
from workflows import ingest, train
from workflows.loop import Loop


class _Record(ray.train.UserCallback):
    """Runs in the TrainController (same machine): one line per report, `epoch resumed_from`."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.write(f"{int(metrics[0]['epoch'])} {int(metrics[0]['resumed_from'])} {checkpoint is not None}\n")


def _lines(path: Path) -> list[tuple[int, int, bool]]:
    if not path.exists():
        return []
    return [(int(a), int(b), c == "True") for a, b, c in (line.split() for line in path.read_text().splitlines())]


def _train_workers() -> list[int]:
    """Pids of this session's Ray Train worker processes: children of its raylet that Ray titled
    `ray::RayTrainWorker...` (Linux /proc; other Ray clusters on the machine are left alone)."""
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    out = []
    for d in Path("/proc").iterdir():
        try:
            if not d.name.isdigit() or not (d / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                continue
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == raylet:
                out.append(int(d.name))
        except (OSError, ValueError, IndexError):  # the process ended while we looked
            pass
    return out


def _setup(tmp_path: Path):
    s = data.mnist1d_splits(1500, 300, 0, 0, seed=0, transfer_seed=1)
    # one file per split, not shuffled: with the seeded local shuffle buffer every epoch sees
    # the same batches in both runs, so the resumed run can be compared with the uninterrupted one
    dirs = {n: data.write_split(s[n], tmp_path / "in" / n, rows_per_file=10_000) for n in ("train", "val")}
    sets = {n: ingest.dataset({n: d}, feature_columns=["x"], label_column="label", shuffle=False,
                              cache_bytes=10**9)[0] for n, d in dirs.items()}
    loop = Loop(factory="kd_ops.models:cnn", kwargs={"width": 8}, epochs=6, batch_size=64, lr=0.01,
                weight_decay=0.0, seed=0, train_rows=1500, shuffle_buffer=512, checkpoint_interval_s=0)
    return sets, loop


def test_a_killed_train_worker_resumes_from_its_last_checkpoint(ray_session, tmp_path):
    sets, loop = _setup(tmp_path)
    record = tmp_path / "reports.txt"
    killed: list[int] = []

    def kill_after_epoch_2() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            if any(epoch >= 2 for epoch, _, _ in _lines(record)) and (workers := _train_workers()):
                killed.append(max(e for e, _, _ in _lines(record)))
                os.kill(workers[0], signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_epoch_2, daemon=True)
    killer.start()
    res = train.fit(loop, sets, name="killed", storage=tmp_path / "ray", num_workers=1, use_gpu=False,
                    max_failures=2, callbacks=[_Record(str(record))])
    killer.join()
    assert killed, "the Train worker was never killed"
    reports = _lines(record)
    first_life = [r for r in reports if r[1] == 0]
    second_life = [r for r in reports if r[1] > 0]
    assert second_life, f"the fit never restarted from a checkpoint: {reports}"
    resumed_from = second_life[0][1]
    # every report carried a checkpoint (interval 0); the restart began at the latest of them
    assert resumed_from == max(e for e, _, _ in first_life) >= 2
    assert [e for e, _, _ in second_life] == list(range(resumed_from + 1, loop.epochs + 1))
    assert {e for e, _, _ in reports} == set(range(1, loop.epochs + 1))

    clean = train.fit(loop, sets, name="clean", storage=tmp_path / "ray", num_workers=1, use_gpu=False)
    print(f"killed after epoch {killed[0]}, resumed from {resumed_from}: val_accuracy {res.metrics['val_accuracy']:.4f} "
          f"vs uninterrupted {clean.metrics['val_accuracy']:.4f}")
    assert abs(res.metrics["val_accuracy"] - clean.metrics["val_accuracy"]) <= 0.01, (res.metrics, clean.metrics)
    assert res.weights.is_file() and res.weights.name == "best.safetensors"

    # the same fit again: it finished, so it returns at once with the same result, no Train run
    again_record = tmp_path / "again.txt"
    again = train.fit(loop, sets, name="clean", storage=tmp_path / "ray", num_workers=1, use_gpu=False,
                      callbacks=[_Record(str(again_record))])
    assert not again_record.exists()  # no epoch was trained
    assert again.metrics == clean.metrics and str(again.weights) == str(clean.weights)


def test_losing_a_worker_node_mid_precompute_loses_and_duplicates_no_rows(tmp_path, monkeypatch):
    """3 nodes: a head that runs everything but teachers, and two worker nodes that have the
    `teacher_node` resource the config pins teachers to. One worker node is removed while the
    teachers run on both; the run completes and the store holds every input id exactly once."""
    from ray.cluster_utils import Cluster

    import counting_teacher
    from kd_ops import store
    from conftest import HERE
    from test_data_plane import _config, _env, _kd

    counter = tmp_path / "counter.txt"
    monkeypatch.setenv("KD_TEST_COUNTER", str(counter))  # the nodes' processes inherit it
    cfg = _config(tmp_path, {"width": 8, "delay": 0.5}, code=[str(HERE / "counting_teacher.py")],
                  precompute={"batch_size": 50, "num_actors": 2, "resources": {"teacher_node": 0.5}})
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        workers = [cluster.add_node(num_cpus=2, resources={"teacher_node": 1}) for _ in range(2)]
        cluster.wait_for_nodes()
        teacher_nodes = {w.node_id for w in workers}
        p = _kd("precompute", cfg, "--out", tmp_path / "out", "--ray-address", cluster.address,
                "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", env=_env(counter))
        deadline = time.time() + 240
        while len(set(counting_teacher.nodes(counter, not_pid=p.pid))) < 2 and time.time() < deadline and p.poll() is None:
            time.sleep(0.1)
        assert p.poll() is None, p.communicate()[0][-3000:]
        before = counting_teacher.nodes(counter, not_pid=p.pid)  # the driver probes the teacher once
        assert set(before) == teacher_nodes, before  # the teachers ran on both worker nodes, nowhere else
        lost = workers[1]
        cluster.remove_node(lost, allow_graceful=False)
        log, _ = p.communicate(timeout=300)
    finally:
        cluster.shutdown()
    assert p.returncode == 0, log[-3000:]
    after = counting_teacher.nodes(counter, not_pid=p.pid)[len(before):]
    assert after and set(counting_teacher.nodes(counter, "init", not_pid=p.pid)) <= teacher_nodes
    m = store.read_manifest(tmp_path / "out" / "store", "t")
    ids = np.concatenate([store.open_parquet(store.shard_of(tmp_path / "out" / "store", m, u)).read(columns=["id"])
                          .column("id").to_numpy() for u in sorted(m["shards"])])
    inputs = np.concatenate([pq.read_table(f, columns=["id"]).column("id").to_numpy()
                             for f in sorted((tmp_path / "in").rglob("*.parquet"))])
    assert len(ids) == len(inputs) == m["rows"] and np.array_equal(np.sort(ids), np.sort(inputs))


@pytest.mark.parametrize("runner", ["auto", "ray_train"])  # the loop in the trial actor / a Ray Train run
def test_a_trial_that_fails_once_is_retried_and_one_that_always_fails_is_reported(ray_session, tmp_path, runner):
    from conftest import FLAKY
    from workflows.config import TuneConfig
    from workflows.tune import run_tune

    FLAKY.unlink(missing_ok=True)
    sets, loop = _setup(tmp_path)
    base = loop.replace(factory="flaky_student:make", epochs=1, checkpoint_interval_s=60)
    tc = TuneConfig(num_samples=3, max_concurrent_trials=2, epochs=1, grace_period=1, temperature=None, alpha=None,
                    teacher_weights=None, student_width={"choice": [4, 5]}, seed=SEED, max_failures=1,
                    trial_runner=runner)
    # Train's own retries off: here the trial (Tune) retries
    workers = dict(num_workers=1, use_gpu=False, max_failures=0, resources={})
    _, best, rows, failed = run_tune(tc, base, [], "width", sets, storage=tmp_path / "ray", workers=workers,
                                     tracking_uri=None, experiment=None, parent_run_id=None)
    assert FLAKY.exists()  # some trial's first attempt failed...
    assert [r["student_width"] for r in rows] and all(r["student_width"] == 4 for r in rows)  # ...and succeeded
    assert len(rows) + len(failed) == 3 and failed
    assert all(f["student_width"] == 5 and "width 5 always fails" in f["error"] for f in failed), failed
    assert best["student_width"] == 4 and 0 <= best["val_accuracy"] <= 1


SEED = 1  # samples width 4 and width 5 among the 3 trials


def _finished_trials(out: Path, epochs: int = 2) -> dict[str, str]:
    """Tune trials that reported their last epoch: trial folder → its result.json."""
    found = {}
    for f in out.glob("ray/tune/*/result.json"):
        text = f.read_text()
        if any(json.loads(line)["training_iteration"] == epochs for line in text.splitlines() if line.strip()):
            found[f.parent.name] = text
    return found


def test_a_kd_run_killed_during_tune_continues_where_it_stopped(tmp_path):
    from mlflow.tracking import MlflowClient

    from conftest import tiny_config
    from test_data_plane import ROOT, _env, _kd

    # one teacher, one epoch: the point is the search, killed and resumed
    teacher = {"name": "t1", "factory": "counting_teacher:make", "kwargs": {"width": 8}, "fit": {"epochs": 1}}
    cfg = tiny_config(tmp_path, teachers=[teacher], data={"mnist1d": {"labelled": 400, "val": 100, "test": 100,
                                                                      "transfer": 0}},
                      tune={"num_samples": 2, "max_concurrent_trials": 1, "epochs": 2, "grace_period": 2,
                            "student_width": {"choice": [4, 6]}},
                      train={"fit": {"epochs": 1}, "label_only_fit": {"epochs": 1}},
                      student={"factory": "slow_student:make", "kwargs": {"width": 4}})
    out, db = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ("run", cfg, "--out", out, "--tracking-uri", db)
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as f:  # not a pipe: nobody reads it while we wait, and a full pipe blocks the run
        p = subprocess.Popen([sys.executable, "-m", "workflows.cli", *map(str, argv)], env=_env(tmp_path / "c.txt"),
                             cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while not _finished_trials(out) and time.time() < deadline:
        assert p.poll() is None, first_log.read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
    p.wait()
    before = _finished_trials(out)
    assert len(before) == 1 and not (out / "summary.json").exists()

    p = _kd(*argv, env=_env(tmp_path / "c.txt"))
    log, _ = p.communicate(timeout=900)
    assert p.returncode == 0, log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["tune_trials"]) == 2 and not summary["tune_failed_trials"]
    # a quiet console: kd-ops' own lines only; Ray's output (worker epoch lines included) in the run's log
    lines = log.splitlines()
    assert len(lines) <= 60 and "==> tune" in lines and any(line.startswith("tune: 2/2 trials") for line in lines)
    assert not [line for line in lines if "RayTrainWorker" in line or "pid=" in line], log
    ray_log = (out / "logs" / "kd.log").read_text()
    assert "RayTrainWorker" in ray_log and "[student] epoch 1/1" in ray_log
    after = _finished_trials(out)
    assert len(after) == 2
    assert {k: after[k] for k in before} == before  # the trials finished before the kill did not run again
    client = MlflowClient(db)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in parents] == [summary["mlflow"]["parent_run_id"]]
    assert parents[0].info.status == "FINISHED"
    stages = [r.data.tags["mlflow.runName"] for r in runs
              if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id and r.data.tags.get("kd.stage") != "trial"]
    assert sorted(stages) == sorted(set(stages))  # each stage's child run once, reopened not repeated
    assert all(r.info.status == "FINISHED" for r in runs if r.data.tags.get("kd.stage") != "trial")
