"""Ray Train: one training loop for teachers, KD students and label-only baselines, 1..N workers.

The loop reads its shard of a streamed Ray Dataset (`workflows.ingest`) with columns x, y (−1 =
unlabelled; classification) and, for distillation, the stored teacher columns stacked per row
([M, C] logits, or top-k values/indices/lse per token). Temperature, α and teacher weights arrive
in the typed `Loop` and are applied here, at training time.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.train
import ray.train.torch
import numpy as np
import torch
import torch.distributed as dist

from kd_ops import checkpoint as ckpt
from kd_ops import feature_kd, losses, method_loss, models, token_losses
from kd_ops.fsio import Loc
from workflows import ray_session

log = logging.getLogger("kd")



@dataclass(frozen=True)
class Loop:
    """Everything one training run needs: the model, its optimisation and, for a student, the
    distillation settings (teacher_weights None = labels only)."""
    factory: str
    kwargs: dict[str, Any]
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    train_rows: int                          # rows per epoch (all workers): sizes the LR schedule
    max_grad_norm: float | None = None
    cpus_per_worker: int = 1
    shuffle_buffer: int = 0                  # rows in Ray Data's local shuffle buffer per worker (0: none)
    checkpoint_interval_s: float = 60.0      # at most this long between checkpoints (and one at the end)
    label: str = "model"                     # for log lines
    task: str = "classification"             # or "lm"
    temperature: float = 1.0
    alpha: float = 0.0
    teacher_weights: list[float] | None = None
    divergence: str = "forward_kl"           # LM token divergence
    beta: float = 0.5
    tail: bool = True
    method: method_loss.Method = method_loss.Method()   # classification students: the method's own settings
    features: dict[str, Any] | None = None   # feature KD: layers, teacher, source (see stages.feature_plan)
    mlflow: dict[str, str] | None = field(default=None, compare=False)  # {tracking_uri, run_id}: rank 0 logs there
    trace_dir: str | None = None             # each worker writes the ids it trained on per epoch and its final
                                             # weights' digest here (rank<r>-epoch<e>.npy, rank<r>.sha256)

    def replace(self, **changes) -> "Loop":
        return dataclasses.replace(self, **changes)

    @property
    def objective(self) -> tuple[str, str]:
        """The metric that picks checkpoints and tune trials, and its direction."""
        return ("val_perplexity", "min") if self.task == "lm" else ("val_accuracy", "max")


def _all_reduce(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


TEACHER_COLUMNS = ("logits", "values", "indices", "lse", "tail_values", "tail_indices")


def _teacher(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    t = {k: batch[k] for k in TEACHER_COLUMNS if k in batch}
    return t or None


def _losses(model, batch, cfg: Loop, weights, progress: float = 0.0, online=None) -> tuple[torch.Tensor, int]:
    """Returns (loss to backprop, rows). Classification: `method_loss.student_loss` (α·KD + (1 − α)·CE
    batch means, plus the method's terms) at training progress `progress` ∈ [0, 1]; teacher
    features from the batch (stored) or from `online` (a teacher run on this worker); the batch
    mean is weighted by this worker's share of the global batch's rows, so with DDP averaging
    gradients every row of the global batch counts the same, however the rows are split.
    LM: sums over tokens divided by the global token counts (all workers), scaled by the world
    size because DDP averages gradients over workers."""
    logits = model(batch["x"])
    teacher = _teacher(batch) if weights is not None else None
    if cfg.task == "lm":
        kd, ce = token_losses.lm_distillation_sums(logits, batch["x"], teacher, weights, kind=cfg.divergence,
                                                   temperature=cfg.temperature, tail=cfg.tail, beta=cfg.beta)
        b, length = batch["x"].shape
        n_kd, n_ce, world = _all_reduce([b * length, b * (length - 1), 1])
        return world * losses.mix(kd / n_kd, ce / n_ce, cfg.alpha if teacher is not None else 0.0), b
    if teacher is not None:
        s_feat = t_feat = None
        if cfg.features is not None:
            s_feat = models.unwrap(model).features
            t_feat = batch["features"] if online is None else feature_kd.teacher_features(online, batch["x"])
        loss, _ = method_loss.student_loss(logits, teacher["logits"].transpose(0, 1), batch["y"], weights,
                                           temperature=cfg.temperature, alpha=cfg.alpha, method=cfg.method,
                                           progress=progress, student_features=s_feat, teacher_features=t_feat)
    else:
        loss = losses.hard_label_loss(logits, batch["y"])
    return loss * _row_share(len(logits)), len(logits)


def _row_share(rows: int) -> float:
    """rows × world / global rows of this step (1.0 on one worker)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 1.0
    total, world = _all_reduce([rows, 1])
    return rows * world / total


def step(model, opt, sched, batch: dict[str, torch.Tensor], cfg: Loop, weights, online=None) -> tuple[float, int]:
    """One optimisation step on one batch; returns (its loss, its rows). `kd bench ingest` times
    this same function on in-memory tensors."""
    loss, rows = _losses(model, batch, cfg, weights, sched.last_epoch / sched.total_steps, online)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    opt.step()
    if sched.last_epoch + 1 < sched.total_steps:
        sched.step()
    return float(loss.detach()), rows


def worker_batch(cfg: Loop, world: int) -> int:
    """Rows per step on one worker: `batch_size` is the global batch, split over the workers, so
    N workers take the same steps with the same global batch as one (and the same schedule)."""
    return max(1, math.ceil(cfg.batch_size / world))


def schedule(opt, cfg: Loop, world: int):
    """One-cycle: warm up then anneal; the step count is an upper bound per worker, never overrun."""
    steps = cfg.epochs * max(1, math.ceil(cfg.train_rows / world / worker_batch(cfg, world)))
    return torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps + world)


def _evaluate(model, shard, device, weights: torch.Tensor | None, cfg: Loop) -> dict[str, float]:
    """Classification: val_accuracy and, with teachers, val_agreement (top-1 vs the weighted
    ensemble) and val_kl. LM: val_perplexity and, with teachers, val_agreement (student top-1 vs
    the top-1 of the highest-weighted teacher) and val_kl (forward KL with tail bucket, T=1)."""
    model.eval()
    lm = cfg.task == "lm"
    n = correct = agree = kl = 0.0
    with torch.inference_mode():
        for batch in shard.iter_torch_batches(batch_size=cfg.batch_size, device=device):
            logits = model(batch["x"])
            teacher = _teacher(batch) if weights is not None else None
            if lm:
                x = batch["x"]
                kd, ce = token_losses.lm_distillation_sums(logits, x, teacher, weights, kind="forward_kl")
                correct += float(ce)  # summed next-token cross-entropy, turned into perplexity below
                n += x.shape[0] * (x.shape[1] - 1)
                if teacher is not None:
                    best = int(torch.argmax(weights))
                    top1 = teacher["indices"][:, best, :, 0] if "indices" in teacher else teacher["logits"][:, best].argmax(-1)
                    agree += float((logits.argmax(-1) == top1.long()).sum()) * (x.shape[1] - 1) / x.shape[1]
                    kl += float(kd) * (x.shape[1] - 1) / x.shape[1]
                continue
            correct += float((logits.argmax(-1) == batch["y"]).sum())
            n += len(logits)
            if teacher is not None:
                p = losses.ensemble_probs(teacher["logits"].transpose(0, 1), weights, 1.0)
                agree += float((logits.argmax(-1) == p.argmax(-1)).sum())
                kl += float(losses.soft_cross_entropy(logits, p, 1.0).sum())
    n, correct, agree, kl = _all_reduce([n, correct, agree, kl])
    out = ({"val_loss": correct / max(n, 1), "val_perplexity": math.exp(min(correct / max(n, 1), 50))} if lm
           else {"val_accuracy": correct / max(n, 1)})
    if weights is not None:
        out |= {"val_agreement": agree / max(n, 1), "val_kl": kl / max(n, 1)}
    return out


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker function; config = {"loop": Loop}. Rank 0 logs per-epoch metrics to
    MLflow when `loop.mlflow` names a run. A restarted worker group (a lost worker or node, a
    rerun after the driver died) continues from the latest checkpoint (`kd_ops.checkpoint`)."""
    cfg: Loop = config["loop"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.cpus_per_worker)
    device = ray.train.torch.get_device()
    student = models.build(cfg.factory, cfg.kwargs)
    net, online = _with_features(student, cfg, device)
    model = ray.train.torch.prepare_model(net)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = schedule(opt, cfg, world)
    batch_rows = worker_batch(cfg, world)
    metric, mode = cfg.objective
    progress, best_weights = ckpt.Progress(0, -math.inf, {}), None
    if (resume := ray.train.get_checkpoint()) is not None:
        with resume.as_directory() as d:
            progress, best_weights = ckpt.restore(d, model=model, optimizer=opt, scheduler=sched)
        if rank == 0:
            _say(f"[{cfg.label}] resumed from the checkpoint of epoch {progress.epoch}")
    resumed_from = progress.epoch
    kd = cfg.teacher_weights is not None
    weights = torch.tensor(cfg.teacher_weights, dtype=torch.float32, device=device) if kd else None
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    client = _mlflow_client(cfg) if rank == 0 else None
    last_checkpoint = time.monotonic()
    for epoch in range(progress.epoch + 1, cfg.epochs + 1):
        start, model_loss, seen, wait, first, ids = time.perf_counter(), 0.0, 0, 0.0, None, []
        model.train()
        ready = start
        for batch in train_shard.iter_torch_batches(batch_size=batch_rows, device=device,
                                                    local_shuffle_buffer_size=max(cfg.shuffle_buffer, batch_rows) if cfg.shuffle_buffer else None,
                                                    local_shuffle_seed=cfg.seed + epoch):
            wait += time.perf_counter() - ready  # the step waited for its data (ingest not keeping up)
            first = wait if first is None else first  # the epoch's start-up: all of the wait so far
            loss, rows = step(model, opt, sched, batch, cfg, weights, online)
            model_loss += loss * rows
            seen += rows
            if cfg.trace_dir:
                ids.append(batch["id"].cpu().numpy())
            ready = time.perf_counter()
        train_seconds = time.perf_counter() - start
        if cfg.trace_dir:
            np.save(os.path.join(cfg.trace_dir, f"rank{rank}-epoch{epoch}.npy"),
                    np.concatenate(ids) if ids else np.zeros(0, np.int64))
        total, count = _all_reduce([model_loss, seen])
        metrics = {"epoch": epoch, "train_loss": total / max(count, 1), "train_rows": count,
                   "train_seconds": train_seconds, "data_wait_seconds": wait, "data_first_batch_seconds": first or 0.0,
                   **_evaluate(model, val_shard, device, weights, cfg),
                   "epoch_seconds": time.perf_counter() - start, "resumed_from": resumed_from}
        score = metrics[metric] if mode == "max" else -metrics[metric]
        if score > progress.best_score:
            progress.best_score, progress.best_metrics = score, metrics
            best_weights = ckpt.weights_of(student)  # the student alone, without a feature projection
        progress.epoch = epoch
        # A checkpoint costs ~1.5 s of Ray Train bookkeeping at this scale: one every
        # checkpoint_interval_s and one at the end; a restart repeats at most that much work.
        due = epoch == cfg.epochs or time.monotonic() - last_checkpoint >= cfg.checkpoint_interval_s
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0 and due:
                ckpt.save(tmp, model=model, optimizer=opt, scheduler=sched, progress=progress,
                          best_weights=best_weights, spec={"factory": cfg.factory, "kwargs": cfg.kwargs})
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            if rank == 0:
                _say(_epoch_line(cfg.label, epoch, cfg.epochs, metrics))
                if client is not None:
                    client.log_batch(cfg.mlflow["run_id"], metrics=_mlflow_metrics(metrics, epoch))
            ray.train.report(metrics, checkpoint=checkpoint)
        if due:
            last_checkpoint = time.monotonic()
    if cfg.trace_dir:
        with open(os.path.join(cfg.trace_dir, f"rank{rank}.sha256"), "w") as f:
            f.write(ckpt.weights_digest(model))


def _with_features(student: torch.nn.Module, cfg: Loop, device):
    """(the module to train, the online feature teacher or None): with feature KD the student is
    wrapped with its layer tap and projection (`feature_kd.feature_student`)."""
    f = cfg.features
    if f is None:
        return student, None
    example = torch.zeros(2, *f["input_shape"], dtype=getattr(torch, f["input_dtype"]))
    net = feature_kd.feature_student(student, f["student_layer"], example, f["teacher_shape"], cfg.method.feature or "attention")
    online = None
    if f["source"] == "online":
        t = f["teacher"]
        teacher = models.load_weights(models.build(t["factory"], t["kwargs"]), t["weights"])
        online = feature_kd.LayerOutput(teacher, f["teacher_layer"], f["pool"]).to(device).eval()
    return net, online


def _say(line: str) -> None:
    # straight to stdout: Train V2 patches print() into a logger that echoes it twice
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _epoch_line(label: str, epoch: int, epochs: int, m: dict[str, float]) -> str:
    extra = f" agree {m['val_agreement']:.4f} kl {m['val_kl']:.4f}" if "val_agreement" in m else ""
    val = f"val_ppl {m['val_perplexity']:.3f}" if "val_perplexity" in m else f"val_acc {m['val_accuracy']:.4f}"
    return f"[{label}] epoch {epoch}/{epochs} loss {m['train_loss']:.4f} {val}{extra} ({m['epoch_seconds']:.1f}s)"


def _mlflow_client(cfg: Loop):
    if not cfg.mlflow:
        return None
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg.mlflow["tracking_uri"])


def _mlflow_metrics(metrics: dict[str, float], step: int):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items() if k != "epoch"]


class ResourceWaitError(ValueError):
    """A fit could not get the resources it asked for within train.resource_wait_s."""


def _resources(cpus: int, use_gpu: bool, extra: dict[str, float] | None = None) -> str:
    extra_text = "".join(f", {k}: {v:g}" for k, v in (extra or {}).items())
    return f"{{CPU: {cpus}{', GPU: 1' if use_gpu else ''}{extra_text}}}"


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
    return json.dumps(settings, sort_keys=True, default=str)


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
    latest = Loc(result.checkpoint.filesystem, result.checkpoint.path)
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
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {}), **(resources or {})}),
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
