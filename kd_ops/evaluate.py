"""Evaluation metrics on logits; batched inference for a module."""
from __future__ import annotations

from typing import Any

import re

import numpy as np
import torch
from torch import nn


@torch.inference_mode()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Run `model` in eval mode over x [N, ...] float32 → logits [N, C] float32."""
    model.eval()
    out = [model(torch.from_numpy(x[i:i + batch_size])).float().numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy. logits [N, C]; labels [N]."""
    return float((logits.argmax(-1) == labels).mean())


def interval95(p: float, n: int) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion `p` (an accuracy) measured on `n` rows: what the
    data can resolve (±0.6 points at 0.9 on 10,000 rows; ±2.6 on 500). Stays inside [0, 1]."""
    if n <= 0:
        return (0.0, 1.0)
    z = 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows where two models' top-1 predictions agree. a, b: [N, C] logits or probs."""
    return float((a.argmax(-1) == b.argmax(-1)).mean())


@torch.inference_mode()
def classification_sums(student_logits: torch.Tensor | None, labels: torch.Tensor,
                        teacher_logits: torch.Tensor | None, weights: torch.Tensor | None,
                        kl: bool = False) -> dict[str, float]:
    """Counts over one batch, summed across batches (and workers) and turned into rates by `rates`.

    student_logits [B, C] or None; labels [B] (−1 = unlabelled, skipped); teacher_logits [B, M, C]
    raw or None; weights [M]. Returns rows (labelled), correct (student), agree (student top-1 ==
    weighted ensemble top-1), ensemble_correct and teacher<i>_correct per teacher, and with `kl`
    the summed KL(ensemble at T=1 || student)."""
    keep = labels >= 0
    y = labels[keep]
    out = {"rows": float(keep.sum())}
    student = student_logits[keep].argmax(-1) if student_logits is not None else None
    if student is not None:
        out["correct"] = float((student == y).sum())
        out |= _calibration_sums("", torch.softmax(student_logits[keep].float(), -1), y)
    if teacher_logits is not None:
        from kd_ops.losses import ensemble_probs, soft_cross_entropy

        t = teacher_logits[keep].float()
        p = ensemble_probs(t.transpose(0, 1), weights, 1.0)
        ens = p.argmax(-1)
        out["ensemble_correct"] = float((ens == y).sum())
        out |= _calibration_sums("ensemble_", p, y)
        out |= {f"teacher{i}_correct": float((t[:, i].argmax(-1) == y).sum()) for i in range(t.shape[1])}
        if student is not None:
            out["agree"] = float((student == ens).sum())
            if kl:
                out["kl"] = float(soft_cross_entropy(student_logits[keep], p, 1.0).sum())
    return out


ECE_BINS = 15  # equal-width confidence bins (Guo et al. 2017)


def _calibration_sums(prefix: str, probs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Per confidence bin: rows, summed confidence, correct rows; per class: rows, correct rows.
    probs [B, C] (labelled rows only); y [B]. `rates` turns them into `ece` and `per_class_accuracy`."""
    conf, pred = probs.max(-1)
    hit = (pred == y).float()
    b = torch.clamp((conf * ECE_BINS).long(), max=ECE_BINS - 1)
    out = {}
    for name, values in (("n", torch.ones_like(conf)), ("conf", conf), ("hit", hit)):
        out |= {f"{prefix}bin{i}_{name}": float(v) for i, v in
                enumerate(torch.zeros(ECE_BINS, dtype=torch.float64).index_add_(0, b, values.double()))}
    classes = probs.shape[-1]
    for name, values in (("n", torch.ones_like(hit)), ("hit", hit)):
        out |= {f"{prefix}class{i}_{name}": float(v) for i, v in
                enumerate(torch.zeros(classes, dtype=torch.float64).index_add_(0, y.long(), values.double()))}
    return out


def _calibration_rates(sums: dict[str, float], prefix: str) -> dict[str, object]:
    """Expected calibration error (Σ_bins |hits − confidence| / rows) and accuracy per class (NaN: no rows)."""
    if f"{prefix}bin0_n" not in sums:
        return {}
    rows = sum(sums[f"{prefix}bin{i}_n"] for i in range(ECE_BINS))
    ece = sum(abs(sums[f"{prefix}bin{i}_hit"] - sums[f"{prefix}bin{i}_conf"]) for i in range(ECE_BINS)) / max(rows, 1)
    classes = sorted(int(k[len(prefix) + 5:-2]) for k in sums if k.startswith(f"{prefix}class") and k.endswith("_n"))
    per_class = [sums[f"{prefix}class{c}_hit"] / sums[f"{prefix}class{c}_n"] if sums[f"{prefix}class{c}_n"]
                 else float("nan") for c in classes]
    return {f"{prefix}ece": ece, f"{prefix}per_class_accuracy": per_class}


_CALIBRATION_KEY = re.compile(r"^(ensemble_)?(bin|class)\d+_")


def teacher_top1(teacher: dict[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """The highest-weighted teacher's top-1 token per position [B, L], from stored columns with a
    teacher axis (top-k "indices" [B, M, L, k], or full "logits" [B, M, L, V])."""
    best = int(torch.argmax(weights))
    return (teacher["indices"][:, best, :, 0] if "indices" in teacher else teacher["logits"][:, best].argmax(-1)).long()


@torch.inference_mode()
def lm_sums(logits: torch.Tensor, input_ids: torch.Tensor, teacher: dict[str, torch.Tensor] | None = None,
            weights: torch.Tensor | None = None, kl: bool = False) -> dict[str, float]:
    """Counts over one batch of sequences: nll (summed next-token cross-entropy), tokens (predicted
    positions), positions (B·L); with the stored teacher columns and weights [M]: agree (student
    top-1 == the highest-weighted teacher's, over all positions) and with `kl` the summed forward
    KL (tail bucket, T=1). logits [B, L, V]; input_ids [B, L]."""
    from kd_ops.token_losses import lm_distillation_sums, next_token_ce_sum

    b, length = input_ids.shape
    ids = input_ids.long()
    out = {"nll": float(next_token_ce_sum(logits, ids, torch.ones_like(ids, dtype=torch.float32))),
           "tokens": float(b * (length - 1)), "positions": float(b * length)}
    if teacher is not None and weights is not None:
        out["agree"] = float((logits.argmax(-1) == teacher_top1(teacher, weights)).sum())
        if kl:
            out["kl"] = float(lm_distillation_sums(logits, ids, teacher, weights, kind="forward_kl")[0])
    return out


def rates(sums: dict[str, float], task: str) -> dict[str, Any]:
    """Summed counts → metrics. Classification: accuracy, agreement, ensemble/teacher accuracies and
    kl per labelled row, ece and per_class_accuracy (a list) for the model and the ensemble; LM: perplexity, top1_agreement and kl per position."""
    if task == "lm":
        out = {"perplexity": float(np.exp(min(sums["nll"] / max(sums["tokens"], 1), 50)))} if "nll" in sums else {}
        if "agree" in sums:
            out["top1_agreement"] = sums["agree"] / max(sums["positions"], 1)
        if "kl" in sums:
            out["kl"] = sums["kl"] / max(sums["positions"], 1)
        return out
    n = max(sums["rows"], 1)
    out = {k.replace("correct", "accuracy").replace("agree", "agreement"): v / n
           for k, v in sums.items() if k != "rows" and not _CALIBRATION_KEY.match(k)}
    return out | _calibration_rates(sums, "") | _calibration_rates(sums, "ensemble_")
