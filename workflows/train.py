"""The driver's side of training: `fit` runs `workflows.worker.train_loop` under a Ray Train
TorchTrainer on 1..N workers, resumes an interrupted fit from its checkpoints, reuses a finished
one, forwards epoch progress and turns a worker group that cannot be placed into one clear error."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch

from kd_ops import checkpoint as ckpt
from kd_ops.fsio import Loc, redacted
from workflows import ray_session
from workflows.loop import Loop
from workflows.worker import train_loop

log = logging.getLogger("kd")


class ResourceWaitError(ValueError):
    """A fit could not get the resources it asked for within train.resource_wait_s."""


def wait_for_a_node(bundle: dict[str, float], what: str,
                    fix: str = "Lower train.cpus_per_worker / train.resources, add nodes", wait: float | None = None) -> None:
    """Returns once some alive node can hold `bundle` (its total resources); ResourceWaitError
    after `wait` seconds (default: train.resource_wait_s of the run that started Ray) otherwise,
    saying `fix`: a task that no node can hold would wait forever."""
    wait = float(os.environ.get(ray_session.WAIT_ENV, "600")) if wait is None else wait
    deadline = time.monotonic() + wait
    while not any(n["Alive"] and all(n["Resources"].get(k, 0) >= v for k, v in bundle.items()) for n in ray.nodes()):
        if time.monotonic() > deadline:
            raise ResourceWaitError(
                f"{what}: gave up waiting for a node with {_resources_text(bundle)} after {wait} s; the cluster has "
                f"{_resources_text(ray.cluster_resources())} in all. {fix}, "
                "or raise train.resource_wait_s if resources are on their way")
        time.sleep(1.0)


def worker_bundle(cpus: int, use_gpu: bool, extra: dict[str, float] | None = None) -> dict[str, float]:
    """What one Train worker (or a one-worker Tune trial) asks for: CPUs, a GPU, custom resources."""
    return {"CPU": cpus, **({"GPU": 1} if use_gpu else {}), **(extra or {})}


def _resources(cpus: int, use_gpu: bool, extra: dict[str, float] | None = None) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in worker_bundle(cpus, use_gpu, extra).items()) + "}"


def _resources_text(res: dict) -> str:
    keep = {k: v for k, v in res.items() if k in ("CPU", "GPU") or not (k.startswith("node:") or "memory" in k)}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(keep.items())) + "}"


@dataclass
class Trained:
    weights: Loc           # best checkpoint's safetensors file (local or on the run's storage)
    metrics: dict          # that checkpoint's reported metrics


def storage_args(storage: Loc) -> dict[str, Any]:
    """RunConfig storage for Train and Tune: a local directory, or a path on a pyarrow filesystem."""
    return {"storage_path": storage.path} | ({} if storage.local else {"storage_filesystem": storage.fs})


DONE, LOOP_KEY = "kd-done.json", "kd-loop.json"


class ForwardReports(ray.train.UserCallback):
    """Runs in the TrainController: hands each epoch's rank-0 metrics to a queue the caller reads."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put(dict(metrics[0]))


@contextmanager
def _epoch_progress(progress, callbacks: list):
    """With `progress(done_epochs, epochs)`, a callback that forwards each report to this process."""
    if progress is None:
        yield callbacks
        return
    from ray.util.queue import Queue

    queue = Queue(actor_options={"num_cpus": 0})

    def consume() -> None:
        while (m := queue.get()) is not None:
            progress(int(m["epoch"]))

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    try:
        yield [*callbacks, ForwardReports(queue)]
    finally:
        queue.put(None)
        reader.join(timeout=30)
        queue.shutdown()


def _loop_key(loop: Loop) -> str:
    """What makes two fits the same fit (not the MLflow run they log to, nor their label)."""
    settings = {k: v for k, v in dataclasses.asdict(loop).items() if k not in ("mlflow", "label")}
    return json.dumps(redacted(json.loads(json.dumps(settings, default=str))), sort_keys=True)


def fit(loop: Loop, datasets: dict[str, ray.data.Dataset], *, name: str, storage: Loc,
        num_workers: int, use_gpu: bool, callbacks: list | None = None, max_failures: int = 0,
        resources: dict[str, float] | None = None, progress=None) -> Trained:
    """Run `train_loop` under a TorchTrainer; returns the best model so far and its metrics.

    Resumable: the run lives in storage/name. A fit of the same loop settings that finished
    before returns at once; one that was interrupted (the driver died) continues from its latest
    checkpoint, as does a worker group restarted after a worker or node was lost (up to
    `max_failures` times). Other settings under the same name start over. `resources`: custom
    resources (or accelerator types) each worker needs, to place students on a node group.
    `progress(epoch)` is called in this process as each epoch is reported."""
    run, key = Loc.of(storage) / name, _loop_key(loop)
    if (run / LOOP_KEY).is_file() and (run / LOOP_KEY).read_text() != key:
        run.delete()  # Train V2 would resume another fit's checkpoints
    if (run / DONE).is_file():
        done = json.loads((run / DONE).read_text())
        log.info("%s: finished before with these settings, reusing it", name)
        return Trained(run / done["checkpoint"] / ckpt.BEST, done["metrics"])
    (run / LOOP_KEY).write_text(key)
    with _epoch_progress(progress, callbacks or []) as callbacks:
        result = _fit(loop, datasets, name, storage, num_workers, use_gpu, callbacks, max_failures, resources)
    latest = run / posixpath.basename(result.checkpoint.path)  # in the user's URI form
    metrics = json.loads((latest / ckpt.PROGRESS).read_text())["best_metrics"]
    (run / DONE).write_text(json.dumps({"checkpoint": latest.name, "metrics": metrics}))  # Train keeps it under run/
    return Trained(latest / ckpt.BEST, metrics)


def _fit(loop: Loop, datasets, name, storage, num_workers, use_gpu, callbacks, max_failures, resources):
    cpus = loop.cpus_per_worker
    trainer = ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config={"loop": loop},
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu,
            resources_per_worker=worker_bundle(cpus, use_gpu, resources)),
        run_config=ray.train.RunConfig(
            name=name, **storage_args(Loc.of(storage)), callbacks=callbacks,
            # worker errors (a lost worker or node) restart the group from the latest checkpoint;
            # a worker group that cannot be scheduled fails (after RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S,
            # see ray_session) instead of being retried forever
            failure_config=ray.train.FailureConfig(max_failures=max_failures, controller_failure_limit=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),  # the latest; it holds the best model
        datasets=datasets,
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        if "worker group startup timed out" in str(e):
            raise ResourceWaitError(
                f"{name}: gave up waiting for {num_workers} Train worker(s) of {_resources(cpus, use_gpu, resources)} "
                f"each after {os.environ.get(ray_session.WAIT_ENV, '?')} s; the cluster has "
                f"{_resources_text(ray.cluster_resources())} in all. Lower train.num_workers / train.cpus_per_worker "
                "/ train.resources, add nodes, or raise train.resource_wait_s if resources are on their way") from None
        raise
