"""Token-level divergences for LM distillation, on the teacher's stored support (top-k or full).

Shapes: B batch, L sequence length, V vocabulary, k kept entries per token, K = k (+1 with the
tail bucket). Teacher inputs are the store's raw logits: `values` [B, L, k], `indices` [B, L, k],
`lse` [B, L] (the full log-sum-exp at T=1). Full logits are the case k = V (see `full_support`).
Every loss is masked per token and *summed*: the training loop divides by the global token count
across workers, so each token weighs the same whatever its worker or sequence.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
_EMPTY = 1e-6  # a tail bucket lighter than this is rounding noise, not mass


def full_support(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full logits [B, L, V] as a support of size V: (values, indices [B, L, V], lse [B, L])."""
    idx = torch.arange(logits.shape[-1], device=logits.device).expand_as(logits)
    return logits, idx, torch.logsumexp(logits.float(), -1)


def bucket_log_probs(support_logits: torch.Tensor, lse: torch.Tensor, temperature: float, tail: bool) -> torch.Tensor:
    """Log-probabilities on the support at temperature T: support logits [..., k], lse [...] → [..., K].

    One formula for teacher and student, so the two are always compared on the same buckets.
    Without tail: log_softmax(z / T) over the k kept tokens (renormalised).
    With tail: one extra bucket for the mass outside the support. At T = 1 it is exact:
    p_i = exp(z_i − lse), p_tail = 1 − Σ_i p_i. For T ≠ 1 the tail enters as one pseudo-logit
    z_tail = lse + log p_tail (the log-sum-exp of the dropped logits), tempered like the others:
    log_softmax([z, z_tail] / T). Exact at T = 1 and for k = V (empty tail); for T ≠ 1 the
    dropped logits are represented by their log-sum-exp. A tail lighter than 1e-6 is fp32
    rounding (k ≈ V) and counts as empty, since tempering would inflate it.
    """
    z = support_logits.float()
    if not tail:
        return F.log_softmax(z / temperature, -1)
    rest = 1.0 - torch.exp(z - lse.float().unsqueeze(-1)).sum(-1)
    log_rest = torch.where(rest > _EMPTY, torch.log(torch.clamp(rest, min=_EMPTY)), torch.full_like(rest, -1e4))
    z_tail = lse.float() + log_rest
    return F.log_softmax(torch.cat([z, z_tail.unsqueeze(-1)], -1) / temperature, -1)


def teacher_log_probs(values: torch.Tensor, lse: torch.Tensor, temperature: float, tail: bool) -> torch.Tensor:
    """The stored teacher support (values [..., k], lse [...]) as bucket log-probs [..., K]."""
    return bucket_log_probs(values, lse, temperature, tail)


def student_log_probs(student_logits: torch.Tensor, indices: torch.Tensor, temperature: float, tail: bool) -> torch.Tensor:
    """The student's full logits [..., V] on the teacher's support indices [..., k] → [..., K]."""
    s = student_logits.float()
    return bucket_log_probs(torch.gather(s, -1, indices.long()), torch.logsumexp(s, -1), temperature, tail)


def divergence(lp: torch.Tensor, lq: torch.Tensor, kind: Divergence, beta: float = 0.5) -> torch.Tensor:
    """Per-token divergence between teacher log-probs lp and student log-probs lq, both [..., K] → [...].

    forward_kl = Σ p (log p − log q)   (mean-seeking: the student covers all teacher modes)
    reverse_kl = Σ q (log q − log p)   (mode-seeking)
    jsd        = β·KL(p ‖ m) + (1 − β)·KL(q ‖ m), m = β p + (1 − β) q, 0 < β < 1 (generalised JSD)
    """
    p, q = lp.exp(), lq.exp()
    if kind == "forward_kl":
        return (p * (lp - lq)).sum(-1)
    if kind == "reverse_kl":
        return (q * (lq - lp)).sum(-1)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
        lm = torch.logsumexp(torch.stack([lp + torch.log(torch.tensor(beta)), lq + torch.log(torch.tensor(1 - beta))]), 0)
        return beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; use forward_kl, reverse_kl or jsd")


def token_kd_loss(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor,
                  mask: torch.Tensor, *, kind: Divergence = "forward_kl", temperature: float = 1.0,
                  tail: bool = True, beta: float = 0.5) -> torch.Tensor:
    """Σ over masked tokens of T² · divergence(teacher_T ‖ student_T) on the stored support.

    student_logits [B, L, V]; values, indices [B, L, k]; lse [B, L]; mask [B, L] (1 = counts).
    Returns a scalar sum (divide by the global token count).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # a support covering the whole vocabulary has no tail; estimating one from fp16-rounded values
    # would turn rounding noise (~1e-3 of the mass) into a bucket the student cannot match
    tail = tail and values.shape[-1] < student_logits.shape[-1]
    lp = teacher_log_probs(values, lse, temperature, tail)
    lq = student_log_probs(student_logits, indices, temperature, tail)
    return temperature**2 * (divergence(lp, lq, kind, beta) * mask.float()).sum()


def next_token_ce_sum(student_logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over masked positions of −log q(next token). logits [B, L, V], input_ids [B, L], mask [B, L]
    (position t predicts token t+1, so the last position never counts). Scalar sum."""
    logits, target, m = student_logits[:, :-1], input_ids[:, 1:], mask[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1).long(), reduction="none")
    return (ce * m.reshape(-1)).sum()


def topk_support(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the store keeps per token: (k largest raw logits, their ids, full log-sum-exp at T=1).
    logits [B, L, V] → values [B, L, k] (same dtype), indices [B, L, k] int64, lse [B, L] float32."""
    if k > logits.shape[-1]:
        raise ValueError(f"top-k k={k} is larger than the vocabulary ({logits.shape[-1]})")
    values, indices = torch.topk(logits, k, dim=-1)
    return values, indices, torch.logsumexp(logits.float(), -1)


def lm_distillation_sums(student_logits: torch.Tensor, input_ids: torch.Tensor, teacher: dict[str, torch.Tensor] | None,
                         weights: torch.Tensor | None, *, kind: Divergence = "forward_kl", temperature: float = 1.0,
                         tail: bool = True, beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ KD over tokens, Σ next-token CE) for one batch; the loop combines them as
    α·KD/N_kd + (1 − α)·CE/N_ce with global token counts N.

    student_logits [B, L, V]; input_ids [B, L]; teacher: stored columns with a teacher axis,
    either {"values", "indices": [B, M, L, k], "lse": [B, M, L]} (top-k) or {"logits": [B, M, L, V]}
    (full); weights [M] on the simplex. With several teachers the per-teacher divergences are
    weighted (their supports differ, so their distributions are not mixed). KD is 0 without teacher.
    """
    mask = torch.ones_like(input_ids, dtype=torch.float32)
    ce = next_token_ce_sum(student_logits, input_ids, mask)
    if teacher is None:
        return student_logits.sum() * 0.0, ce
    if "logits" in teacher:
        supports = [full_support(teacher["logits"][:, m].float()) for m in range(teacher["logits"].shape[1])]
    else:
        supports = [(teacher["values"][:, m], teacher["indices"][:, m], teacher["lse"][:, m])
                    for m in range(teacher["values"].shape[1])]
    kd = sum(w * token_kd_loss(student_logits, v, i, lse, mask, kind=kind, temperature=temperature, tail=tail, beta=beta)
             for w, (v, i, lse) in zip(weights, supports))
    return kd, ce
