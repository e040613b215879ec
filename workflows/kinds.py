"""What runs on the workers and differs between the two task kinds: the training loss of a batch,
the validation counts and metrics, and how a scoring actor counts a batch. `Loop.task` names the
kind and `Loop.kind` is its object here; the driver's side of the difference (data, teachers,
reports) is the Task in workflows.tasks. The counting is kd_ops.evaluate's; the losses are kd_ops'."""
from __future__ import annotations

import torch
import torch.distributed as dist

from kd_ops import evaluate, feature_kd, losses, method_loss, models, token_losses

# stored teacher columns a batch may carry, stacked per row with a teacher axis
TEACHER_COLUMNS = ("logits", "values", "indices", "lse", "tail_values", "tail_indices")


def teacher_columns(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    t = {k: batch[k] for k in TEACHER_COLUMNS if k in batch}
    return t or None


def all_reduce(values: list[float]) -> list[float]:
    """Sums over the DDP workers (the values themselves on one worker)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    # NCCL (use_gpu) reduces CUDA tensors only; gloo CPU ones
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def row_share(rows: int) -> float:
    """rows × world / global rows of this step (1.0 on one worker)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 1.0
    total, world = all_reduce([rows, 1])
    return rows * world / total


class Classification:
    """Rows x → one label y (−1: unlabelled, soft term only); teachers stored as [M, C] logits."""
    name = "classification"
    objective = ("val_accuracy", "max")        # picks checkpoints and tune trials
    val_keys = ("rows", "correct", "agree", "kl")

    def loss(self, model, batch, loop, weights, progress: float, online) -> tuple[torch.Tensor, int]:
        """`method_loss.student_loss` (α·KD + (1 − α)·CE batch means, plus the method's terms) at
        training progress `progress` ∈ [0, 1], or cross-entropy without teachers; teacher features
        from the batch (stored) or from `online` (a teacher run on this worker). The batch mean is
        weighted by this worker's share of the global batch's rows, so with DDP averaging gradients
        every row of the global batch counts the same, however the rows are split."""
        logits = model(batch["x"])
        teacher = teacher_columns(batch) if weights is not None else None
        if teacher is None:
            return losses.hard_label_loss(logits, batch["y"]) * row_share(len(logits)), len(logits)
        s_feat = t_feat = None
        if loop.features is not None:
            s_feat = models.unwrap(model).features
            t_feat = batch["features"] if online is None else feature_kd.teacher_features(online, batch["x"])
        loss, _ = method_loss.student_loss(logits, teacher["logits"].transpose(0, 1), batch["y"], weights, loop.distill,
                                           progress=progress, student_features=s_feat, teacher_features=t_feat)
        return loss * row_share(len(logits)), len(logits)

    def sums(self, logits, batch, teacher, weights, kl: bool = False) -> dict[str, float]:
        return evaluate.classification_sums(logits, batch["y"], teacher and teacher["logits"], weights, kl=kl)

    def val_metrics(self, total: dict[str, float], with_teachers: bool) -> dict[str, float]:
        r = evaluate.rates(total, self.name)
        return {"val_accuracy": r["accuracy"]} | (
            {"val_agreement": r["agreement"], "val_kl": r["kl"]} if with_teachers else {})


class LanguageModel:
    """Token sequences x [L] (the next token is the label); teachers stored per token (full
    logits, or top-k values/indices/lse and tail samples)."""
    name = "lm"
    objective = ("val_perplexity", "min")
    val_keys = ("nll", "tokens", "positions", "agree", "kl")

    def loss(self, model, batch, loop, weights, progress: float, online) -> tuple[torch.Tensor, int]:
        """Sums over tokens divided by the global token counts (all workers), scaled by the world
        size because DDP averages gradients over workers."""
        logits = model(batch["x"])
        teacher = teacher_columns(batch) if weights is not None else None
        d = loop.distill
        settings = {} if d is None else dict(kind=d.divergence, temperature=d.temperature, tail=d.tail, beta=d.beta)
        kd, ce = token_losses.lm_distillation_sums(logits, batch["x"], teacher, weights, **settings)
        b, length = batch["x"].shape
        n_kd, n_ce, world = all_reduce([b * length, b * (length - 1), 1])
        return world * losses.mix(kd / n_kd, ce / n_ce, d.alpha if teacher is not None else 0.0), b

    def sums(self, logits, batch, teacher, weights, kl: bool = False) -> dict[str, float]:
        # without teacher weights the model is scored on its own (a teacher's perplexity)
        return evaluate.lm_sums(logits, batch["x"], teacher, weights, kl=kl)

    def val_metrics(self, total: dict[str, float], with_teachers: bool) -> dict[str, float]:
        r = evaluate.rates(total, self.name)
        return {"val_loss": total["nll"] / max(total["tokens"], 1), "val_perplexity": r["perplexity"]} | (
            {"val_agreement": r["top1_agreement"], "val_kl": r["kl"]} if with_teachers else {})


def of(name: str) -> Classification | LanguageModel:
    """The kind a Loop or a scoring actor names ("classification" or "lm")."""
    return LanguageModel() if name == LanguageModel.name else Classification()
