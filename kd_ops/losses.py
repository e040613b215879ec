"""Distillation losses: plain functions of tensors, no state.

Shapes: B = batch, C = classes, M = teachers. Everything is upcast to float32 before the
softmax, so fp16 logits read from the store are safe to pass in directly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ensemble_probs(teacher_logits: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """Weighted mixture of the teachers' softened distributions.

    teacher_logits: [M, B, C] raw (untempered) logits; weights: [M] (one per teacher) or [M, B]
    (per teacher and row, `kd_ops.teacher_weighting`), non-negative, summing to 1 over M.
    Returns p [B, C] with p_b = sum_m w_m(b) * softmax(z_mb / T).

    Probabilities are mixed, not logits: a mixture keeps each teacher's calibration and the
    result stays a proper distribution whatever the weights, whereas averaging logits is a
    product of experts that sharpens wherever the teachers agree and hides their disagreement.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    probs = torch.softmax(teacher_logits.float() / temperature, dim=-1)
    return torch.einsum("m,mbc->bc" if weights.dim() == 1 else "mb,mbc->bc", weights.to(probs), probs)


def soft_cross_entropy(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row KL(p || softmax(s / T)) between target probabilities and the softened student.

    student_logits: [B, C]; target_probs: [B, C] (rows sum to 1). Returns [B].
    KL = sum_c p_c (log p_c - log q_c), with 0 log 0 taken as 0.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = target_probs.float()
    return (torch.xlogy(p, p) - p * log_q).sum(-1)


def hinton_kd_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015) soft-target loss: T² · mean_b KL(p_T || q_T).

    student_logits: [B, C] raw; target_probs: [B, C], the teacher(s) already softened at T.
    The T² factor keeps the gradient scale of the soft term independent of T (the gradient
    of the softened KL w.r.t. the logits shrinks as 1/T²). Returns a scalar.
    """
    return temperature**2 * soft_cross_entropy(student_logits, target_probs, temperature).mean()


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """α · Hinton KD against the weighted teacher ensemble + (1 − α) · cross-entropy on labels.

    student_logits: [B, C]; teacher_logits: [M, B, C] raw; labels: [B] int64, −1 where the row
    has no label (transfer set). The hard term averages over labelled rows only and is 0 for a
    batch without labels. Returns (loss scalar, {"kd": …, "ce": …} as floats for logging).
    """
    kd = hinton_kd_loss(student_logits, ensemble_probs(teacher_logits, weights, temperature), temperature)
    ce = hard_label_loss(student_logits, labels)
    return mix(kd, ce, alpha), {"kd": float(kd.detach()), "ce": float(ce.detach())}


def mix(kd: torch.Tensor, ce: torch.Tensor, alpha: float) -> torch.Tensor:
    """The hard/soft mix every student loss uses: α · KD term + (1 − α) · label term (scalars)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha * kd + (1.0 - alpha) * ce


def hard_label_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the rows whose label is ≥ 0. student_logits [B, C]; labels [B]. Scalar."""
    mask = labels >= 0
    if not bool(mask.any()):
        return student_logits.sum() * 0.0  # keeps the graph, contributes nothing
    return F.cross_entropy(student_logits[mask].float(), labels[mask])
