"""Decoupled knowledge distillation (DKD; Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation").

Hinton's KD term splits into a target-class part and a non-target-class part:
    KD = TCKD + (1 − p_t) · NCKD
where, with t the target class, p the teacher's and q the student's softened distributions,
    TCKD = KL([p_t, 1 − p_t] ‖ [q_t, 1 − q_t])                 (binary: target vs the rest)
    NCKD = KL(p̂ ‖ q̂),  p̂_c = p_c / (1 − p_t) over c ≠ t          (the rest, renormalised)
DKD weights the two freely: α · TCKD + β · NCKD, so the non-target "dark knowledge" is no longer
suppressed where the teacher is confident (large p_t).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-8


def dkd_terms(student_logits: torch.Tensor, target_probs: torch.Tensor, target: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (TCKD, NCKD, teacher p_t), each [B].

    student_logits: [B, C] raw; target_probs: [B, C] the teacher (ensemble) already softened at T;
    target: [B] int64 class per row (the label; for unlabelled rows the teacher's top-1).
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = target_probs.float()
    hot = F.one_hot(target, p.shape[-1]).bool()
    p_t = p[hot].clamp(_EPS, 1 - _EPS)
    log_q_t = log_q[hot]
    log_q_rest = torch.log1p(-log_q_t.exp().clamp(max=1 - _EPS))
    tckd = p_t * (p_t.log() - log_q_t) + (1 - p_t) * ((1 - p_t).log() - log_q_rest)
    # non-target distributions: renormalised over c ≠ t (log-space for the student)
    p_hat = p.masked_fill(hot, 0.0) / (1 - p_t).unsqueeze(-1)
    log_q_hat = torch.log_softmax((student_logits.float() / temperature).masked_fill(hot, float("-inf")), dim=-1)
    nckd = (torch.xlogy(p_hat, p_hat) - p_hat * log_q_hat.masked_fill(hot, 0.0)).sum(-1)
    return tckd, nckd, p_t


def dkd_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, target: torch.Tensor, *,
             temperature: float, alpha: float | torch.Tensor = 1.0, beta: float | torch.Tensor = 8.0) -> torch.Tensor:
    """T² · mean_b (α · TCKD + β · NCKD); α, β scalars or per-row [B] tensors. Scalar.

    Shapes as in `dkd_terms`. With α = 1 and β = 1 − p_t (teacher, per row) this is Hinton's KD
    term exactly. The paper's CIFAR defaults are α = 1, β = 8.
    """
    tckd, nckd, _ = dkd_terms(student_logits, target_probs, target, temperature)
    return temperature**2 * (alpha * tckd + beta * nckd).mean()


def targets(labels: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """The class DKD splits on: the label where there is one (≥ 0), else the teacher's top-1. [B]."""
    return torch.where(labels >= 0, labels, target_probs.argmax(-1))
