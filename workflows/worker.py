"""What runs in each Ray Train worker: one training loop for teachers, KD students and label-only
baselines, 1..N workers (DDP).

The loop reads its shard of a streamed Ray Dataset (`workflows.ingest`) with columns x, y (−1 =
unlabelled; classification) and, for distillation, the stored teacher columns stacked per row
([M, C] logits, or top-k values/indices/lse per token). Temperature, α and teacher weights arrive
in the typed `Loop` and are applied here, at training time. Rank 0 logs epochs to MLflow.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from kd_ops import checkpoint as ckpt
from kd_ops import feature_kd, models, qat
from workflows import ingest, kinds
from workflows.in_memory import InMemory
from workflows.loop import Loop


def _losses(model, batch, cfg: Loop, weights, progress: float = 0.0, online=None) -> tuple[torch.Tensor, int]:
    """(loss to backprop, rows) of one batch: the task kind's loss (`workflows.kinds`)."""
    return cfg.kind.loss(model, batch, cfg, weights, progress, online)


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
    """The counts of `kd_ops.evaluate` (the same the pipeline's evaluation uses) over this worker's
    validation shard, summed over all workers, as the task kind's metrics. Classification:
    val_accuracy and, with teachers, val_agreement (top-1 vs the weighted ensemble) and val_kl.
    LM: val_loss, val_perplexity and, with teachers, val_agreement (vs the highest-weighted
    teacher's top-1) and val_kl (forward KL with tail bucket, T=1), per position."""
    model.eval()
    kind = cfg.kind
    total = dict.fromkeys(kind.val_keys, 0.0)  # every worker reduces the same keys, batches or not
    with torch.inference_mode():
        for batch in shard.iter_torch_batches(batch_size=cfg.batch_size, device=device):
            teacher = kinds.teacher_columns(batch) if weights is not None else None
            sums = kind.sums(model(batch["x"]), batch, teacher, weights, kl=True)
            for k in kind.val_keys:
                total[k] += sums.get(k, 0.0)
    total = dict(zip(kind.val_keys, kinds.all_reduce([total[k] for k in kind.val_keys])))
    return kind.val_metrics(total, weights is not None)


@dataclass(frozen=True)
class Session:
    """Where the loop runs: its rank and world size, device, model preparation, datasets, and how
    it reports and resumes. Two places: a Ray Train worker (`train_session`, 1..N workers, DDP)
    and a one-worker Tune trial run directly in its trial actor (`tune_session`), which spares a
    trial Train's controller, worker group and fresh worker processes."""
    rank: int
    world: int
    device: torch.device
    prepare: Callable[[torch.nn.Module], torch.nn.Module]
    checkpoint: Callable[[], Any]
    shard: Callable[[str], Any]            # "train" | "val" → something with iter_torch_batches
    report: Callable[..., None]            # report(metrics, checkpoint=one from `saved` | None)
    saved: Callable[[str], Any]            # a directory → a checkpoint `report` takes


def train_session() -> Session:
    ctx = ray.train.get_context()
    return Session(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(),
                   ray.train.torch.prepare_model, ray.train.get_checkpoint, ray.train.get_dataset_shard,
                   ray.train.report, ray.train.Checkpoint.from_directory)


def tune_session(datasets: dict[str, Any], use_gpu: bool) -> Session:
    from ray import tune

    device = torch.device("cuda" if use_gpu else "cpu")
    return Session(0, 1, device, lambda m: m.to(device), tune.get_checkpoint, datasets.__getitem__, tune.report,
                   tune.Checkpoint.from_directory)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker function; config = {"loop": Loop}."""
    run_loop(config["loop"], train_session())


def run_loop(cfg: Loop, session: Session) -> None:
    """The training loop. Rank 0 logs per-epoch metrics to MLflow when `loop.mlflow` names a run.
    A restarted worker group or trial (a lost worker or node, a rerun after the driver died)
    continues from the latest checkpoint (`kd_ops.checkpoint`)."""
    rank, world, device = session.rank, session.world, session.device
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.cpus_per_worker)
    student = models.build(cfg.factory, cfg.kwargs)
    if cfg.init_weights is not None:
        models.load_weights(student, cfg.init_weights)
    if cfg.fake_quant:  # the saved weights stay the plain module's (models.unwrap looks through the wrapper)
        student = qat.wrap(student, mode=cfg.fake_quant)
    net, online = _with_features(student, cfg, device)
    model = session.prepare(net)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = schedule(opt, cfg, world)
    batch_rows = worker_batch(cfg, world)
    metric, mode = cfg.objective
    progress, best_weights = ckpt.Progress(0, -math.inf, {}), None
    if (resume := session.checkpoint()) is not None:
        with resume.as_directory() as d:
            progress, best_weights = ckpt.restore(d, model=model, optimizer=opt, scheduler=sched)
        if rank == 0:
            _say(f"[{cfg.label}] resumed from the checkpoint of epoch {progress.epoch}")
    resumed_from = progress.epoch
    kd = cfg.distill is not None
    weights = torch.tensor(cfg.distill.teacher_weights, dtype=torch.float32, device=device) if kd else None
    train_shard, val_shard = session.shard("train"), session.shard("val")
    if cfg.in_memory and world == 1 and cfg.views is None:  # InMemory takes no collate_fn: no view picking
        train_shard, val_shard = InMemory(train_shard, shuffle=True), InMemory(val_shard, shuffle=False)
    client = _mlflow_client(cfg) if rank == 0 else None
    last_checkpoint = time.monotonic()
    for epoch in range(progress.epoch + 1, cfg.epochs + 1):
        start, model_loss, seen, wait, first, ids = time.perf_counter(), 0.0, 0, 0.0, None, []
        model.train()
        ready = start
        # augmented views: each row's view of this epoch, drawn from (augment_seed, epoch, id)
        views = {"collate_fn": ingest.ViewPicker(cfg.views, epoch)} if cfg.views else {}
        for batch in train_shard.iter_torch_batches(batch_size=batch_rows, device=device,
                                                    local_shuffle_buffer_size=max(cfg.shuffle_buffer, batch_rows) if cfg.shuffle_buffer else None,
                                                    local_shuffle_seed=cfg.seed + epoch, **views):
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
        total, count = kinds.all_reduce([model_loss, seen])
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
                checkpoint = session.saved(tmp)
            if rank == 0:
                _say(_epoch_line(cfg.label, epoch, cfg.epochs, metrics))
                client = _log_epoch(client, cfg, metrics, epoch)
            session.report(metrics, checkpoint=checkpoint)
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
    example = torch.zeros(2, *f.input_shape, dtype=getattr(torch, f.input_dtype))
    net = feature_kd.feature_student(student, f.student_layer, example, f.teacher_shape, cfg.distill.feature or "attention")
    online = None
    if f.source == "online":
        teacher = models.load_weights(models.build(f.teacher_factory, f.teacher_kwargs), f.teacher_weights)
        online = feature_kd.LayerOutput(teacher, f.teacher_layer, f.pool).to(device).eval()
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
    """Rank 0's MLflow client, or None. The loop holds the tracking URI with its secrets masked: the
    real one and basic-auth credentials come from this node's environment (tracking.connect_uri)."""
    if not cfg.mlflow:
        return None
    from mlflow.tracking import MlflowClient

    from workflows.tracking import connect_uri

    client = MlflowClient(tracking_uri=connect_uri(cfg.mlflow["tracking_uri"]))
    try:
        client.get_run(cfg.mlflow["run_id"])  # reachable, and these credentials may read the run
    except Exception as e:
        return _mlflow_off(cfg, e)
    return client


def _log_epoch(client, cfg: Loop, metrics: dict[str, float], epoch: int):
    """Log one epoch's metrics; returns the client to log the next one with, None once MLflow failed."""
    if client is None:
        return None
    try:
        client.log_batch(cfg.mlflow["run_id"], metrics=_mlflow_metrics(metrics, epoch))
    except Exception as e:
        return _mlflow_off(cfg, e)
    return client


def _mlflow_off(cfg: Loop, e: Exception):
    # training goes on: the epochs still reach the driver (Train / Tune reports) and the console
    from kd_ops.fsio import redact

    first = redact((str(e).strip().splitlines() or [""])[0][:200])  # an error may quote the URI
    _say(f"[{cfg.label}] warning: MLflow at {cfg.mlflow['tracking_uri']} failed ({type(e).__name__}: {first}); "
         "this fit logs no more epochs there")
    return None


def _mlflow_metrics(metrics: dict[str, float], step: int):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items() if k != "epoch"]
