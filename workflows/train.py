"""Ray Train: one training loop for teachers, KD students and label-only baselines, 1..N workers.

The loop reads its shard of a Ray Dataset with columns x, y (−1 = unlabelled) and, for
distillation, t: the stored raw teacher logits [M, C] per row. Temperature, α and teacher
weights arrive in the loop config and are applied here, at training time.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.data.extensions import ArrowTensorArray

from kd_ops import losses, models, token_losses

WEIGHTS = "model.safetensors"


def make_dataset(x: np.ndarray, y: np.ndarray | None = None, teacher: dict[str, np.ndarray] | None = None, *,
                 shuffle_seed: int | None = 0, rows_per_block: int = 8192) -> ray.data.Dataset:
    """Ray Dataset of x [N, ...], y [N] int64 (classification) and the stored teacher columns,
    given as {name: [M, N, ...]} and laid out per row as [N, M, ...].

    Rows are shuffled once here (labelled and transfer rows arrive concatenated); each epoch
    adds a local shuffle on top.
    """
    order = np.random.default_rng(shuffle_seed).permutation(len(x)) if shuffle_seed is not None else np.arange(len(x))
    cols = {"x": x[order]}
    if y is not None:
        cols["y"] = y[order]
    for name, arr in (teacher or {}).items():
        cols[name] = np.ascontiguousarray(np.moveaxis(arr, 0, 1)[order])
    table = pa.table({k: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else pa.array(v) for k, v in cols.items()})
    return ray.data.from_arrow([table.slice(i, rows_per_block) for i in range(0, max(len(table), 1), rows_per_block)])


def _all_reduce(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


TEACHER_COLUMNS = ("logits", "values", "indices", "lse", "tail_values", "tail_indices")


def _teacher(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    t = {k: batch[k] for k in TEACHER_COLUMNS if k in batch}
    return t or None


def _losses(model, batch, cfg, weights) -> tuple[torch.Tensor, int]:
    """Returns (loss to backprop, rows). Classification: α·KD + (1 − α)·CE batch means.
    LM: sums over tokens divided by the global token counts (all workers), scaled by the world
    size because DDP averages gradients over workers."""
    logits = model(batch["x"])
    teacher = _teacher(batch)
    if cfg.get("task") == "lm":
        kd, ce = token_losses.lm_distillation_sums(
            logits, batch["x"], teacher, weights, kind=cfg.get("divergence", "forward_kl"),
            temperature=cfg.get("temperature", 1.0), tail=cfg.get("tail", True), beta=cfg.get("beta", 0.5))
        b, length = batch["x"].shape
        n_kd, n_ce, world = _all_reduce([b * length, b * (length - 1), 1])
        alpha = cfg.get("alpha", 0.0) if teacher is not None else 0.0
        return world * (alpha * kd / n_kd + (1 - alpha) * ce / n_ce), b
    if teacher is not None:
        loss, _ = losses.distillation_loss(logits, teacher["logits"].transpose(0, 1), batch["y"],
                                           temperature=cfg["temperature"], alpha=cfg["alpha"], weights=weights)
    else:
        loss = losses.hard_label_loss(logits, batch["y"])
    return loss, len(logits)


def _evaluate(model, shard, device, weights: torch.Tensor | None, cfg) -> dict[str, float]:
    """Classification: val_accuracy and, with teachers, val_agreement (top-1 vs the weighted
    ensemble) and val_kl. LM: val_perplexity and, with teachers, val_agreement (student top-1 vs
    the top-1 of the highest-weighted teacher) and val_kl (forward KL with tail bucket, T=1)."""
    model.eval()
    lm = cfg.get("task") == "lm"
    n = correct = agree = kl = 0.0
    with torch.inference_mode():
        for batch in shard.iter_torch_batches(batch_size=cfg["batch_size"], device=device):
            logits = model(batch["x"])
            teacher = _teacher(batch)
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


def train_loop(cfg: dict[str, Any]) -> None:
    """Ray Train worker function. cfg: factory, kwargs, epochs, batch_size, lr, weight_decay, max_grad_norm, seed,
    train_rows, label (for log lines), optional temperature/alpha/teacher_weights (KD) and
    mlflow = {tracking_uri, run_id} (rank 0 logs per-epoch metrics there)."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(cfg.get("cpus_per_worker", 1))
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(models.build(cfg["factory"], cfg["kwargs"]))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps = cfg["epochs"] * max(1, math.ceil(cfg["train_rows"] / world / cfg["batch_size"]))
    # One-cycle: warm up then anneal; steps is an upper bound per worker, so never overrun it.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg["lr"], total_steps=steps + world)
    kd = cfg.get("teacher_weights") is not None
    weights = torch.tensor(cfg["teacher_weights"], dtype=torch.float32, device=device) if kd else None
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    client = _mlflow_client(cfg) if rank == 0 else None
    best, (metric, mode) = -math.inf, objective(cfg)
    for epoch in range(1, cfg["epochs"] + 1):
        start, model_loss, seen = time.perf_counter(), 0.0, 0
        model.train()
        for batch in train_shard.iter_torch_batches(batch_size=cfg["batch_size"], device=device,
                                                    local_shuffle_buffer_size=4 * cfg["batch_size"],
                                                    local_shuffle_seed=cfg["seed"] + epoch):
            loss, rows = _losses(model, batch, cfg, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.get("max_grad_norm"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"])
            opt.step()
            if sched.last_epoch + 1 < sched.total_steps:
                sched.step()
            model_loss += float(loss.detach()) * rows
            seen += rows
        total, count = _all_reduce([model_loss, seen])
        metrics = {"epoch": epoch, "train_loss": total / max(count, 1),
                   **_evaluate(model, val_shard, device, weights, cfg),
                   "epoch_seconds": time.perf_counter() - start}
        # A checkpoint costs ~1.5 s of Ray Train bookkeeping on this scale of model: only when the
        # validation score improves (the first epoch always does), so the kept checkpoint is the best.
        score = metrics[metric] if mode == "max" else -metrics[metric]
        improved = score > best
        best = max(best, score)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0 and improved:
                models.save_weights(model, Path(tmp) / WEIGHTS)
                (Path(tmp) / "model.json").write_text(json.dumps({"factory": cfg["factory"], "kwargs": cfg["kwargs"]}))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            if rank == 0:
                # straight to stdout: Train V2 patches print() into a logger that echoes it twice
                sys.stdout.write(_epoch_line(cfg.get("label", "model"), epoch, cfg["epochs"], metrics) + "\n")
                sys.stdout.flush()
                if client is not None:
                    client.log_batch(cfg["mlflow"]["run_id"], metrics=_mlflow_metrics(metrics, epoch))
            ray.train.report(metrics, checkpoint=checkpoint)


def _epoch_line(label: str, epoch: int, epochs: int, m: dict[str, float]) -> str:
    extra = f" agree {m['val_agreement']:.4f} kl {m['val_kl']:.4f}" if "val_agreement" in m else ""
    val = f"val_ppl {m['val_perplexity']:.3f}" if "val_perplexity" in m else f"val_acc {m['val_accuracy']:.4f}"
    return f"[{label}] epoch {epoch}/{epochs} loss {m['train_loss']:.4f} {val}{extra} ({m['epoch_seconds']:.1f}s)"


def objective(loop_cfg: dict[str, Any]) -> tuple[str, str]:
    """The metric that picks checkpoints and tune trials, and its direction."""
    return ("val_perplexity", "min") if loop_cfg.get("task") == "lm" else ("val_accuracy", "max")


def _mlflow_client(cfg):
    if not cfg.get("mlflow"):
        return None
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg["mlflow"]["tracking_uri"])


def _mlflow_metrics(metrics: dict[str, float], step: int):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items() if k != "epoch"]


@dataclass
class Trained:
    weights: Path          # best checkpoint's safetensors file
    metrics: dict          # that checkpoint's reported metrics


def fit(loop_cfg: dict[str, Any], datasets: dict[str, ray.data.Dataset], *, name: str, storage: Path,
        num_workers: int, use_gpu: bool, callbacks: list | None = None) -> Trained:
    """Run `train_loop` under a TorchTrainer; keep the checkpoint with the best validation score."""
    cpus = loop_cfg.get("cpus_per_worker", 1)
    metric, mode = objective(loop_cfg)
    # Train V2 reloads the checkpoint bookkeeping it finds under storage/name: a rerun into the same
    # --out would rank its checkpoints against the last run's and could return the old, better one.
    # Every fit here trains from scratch, so it starts from an empty run folder.
    shutil.rmtree(Path(storage) / name, ignore_errors=True)
    trainer = ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage), callbacks=callbacks or [],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=metric,
                                                         checkpoint_score_order=mode)),
        datasets=datasets,
    )
    result = trainer.fit()
    checkpoint, metrics = result.best_checkpoints[0]
    return Trained(Path(checkpoint.path) / WEIGHTS, metrics)
