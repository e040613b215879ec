"""Token-level divergences for LM distillation, on the teacher's stored support (top-k or full).

Shapes: B batch, L sequence length, V vocabulary, k kept entries per token, K = k (+1 with the
tail bucket). Teacher inputs are the store's raw logits: `values` [B, L, k], `indices` [B, L, k],
`lse` [B, L] (the full log-sum-exp at T=1). Full logits are the case k = V (see `full_support`).
Optionally the store also holds m tokens per position drawn from the teacher's distribution
outside the top-k, with their raw logits: `tail_values`, `tail_indices` [B, L, m] (see
`sample_tail`); forward KL then estimates the tail without bias instead of lumping it.
Every loss is masked per token and *summed*: the training loop divides by the global token count
across workers, so each token weighs the same whatever its worker or sequence.
"""
from __future__ import annotations

import math
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


def sampled_teacher(values: torch.Tensor, lse: torch.Tensor, tail_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher at T = 1 on its top-k plus m sampled tail tokens: (log weights, log p), both [..., k + m].

    Top-k entries weigh p_j = exp(z_j − lse); each draw weighs p_tail/m and has log p = z_s − lse.
    So Σ_w (log p − log q) is an unbiased estimate of the full-vocabulary forward KL and of its
    gradient, and 0 when the student equals the teacher. values [..., k], lse [...], tail_values [..., m].
    """
    m = tail_values.shape[-1]
    buckets = bucket_log_probs(values, lse, 1.0, tail=True)  # [..., k + 1], exact at T = 1
    log_tail = buckets[..., -1:]
    log_w = torch.cat([buckets[..., :-1], (log_tail - math.log(m)).expand(*log_tail.shape[:-1], m)], -1)
    return log_w, torch.cat([buckets[..., :-1], tail_values.float() - lse.float().unsqueeze(-1)], -1)


def sampled_forward_kl(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor,
                       tail_values: torch.Tensor, tail_indices: torch.Tensor) -> torch.Tensor:
    """Per-token forward KL(teacher ‖ student) at T = 1 estimated on top-k + sampled tail → [B, L].
    student_logits [B, L, V]; values, indices [B, L, k]; lse [B, L]; tail_* [B, L, m]."""
    log_w, lp = sampled_teacher(values, lse, tail_values)
    lq = torch.gather(F.log_softmax(student_logits.float(), -1), -1, torch.cat([indices, tail_indices], -1).long())
    return (log_w.exp() * (lp - lq)).sum(-1)


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
                  tail: bool = True, beta: float = 0.5, tail_values: torch.Tensor | None = None,
                  tail_indices: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over masked tokens of T² · divergence(teacher_T ‖ student_T) on the stored support.

    student_logits [B, L, V]; values, indices [B, L, k]; lse [B, L]; mask [B, L] (1 = counts);
    optional tail_values, tail_indices [B, L, m]: with `tail`, forward KL at T = 1 uses them for the
    tail (`sampled_forward_kl`). Otherwise the tail bucket: reverse KL and JSD need p wherever the
    student puts mass, and at T ≠ 1 the draws follow the T=1 tail, not the tempered one (README
    "Why the sampled tail"). Returns a scalar sum (divide by the global token count).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if tail and kind == "forward_kl" and temperature == 1.0 and tail_values is not None and tail_indices is not None:
        return (sampled_forward_kl(student_logits, values, indices, lse, tail_values, tail_indices) * mask.float()).sum()
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


def sample_tail(logits: torch.Tensor, indices: torch.Tensor, m: int,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """m tokens per position drawn with replacement from the teacher's T=1 distribution outside its
    top-k `indices`, and their raw logits. logits [B, L, V], indices [B, L, k] → (values [B, L, m]
    same dtype as logits, indices [B, L, m] int64). A position with no tail mass draws uniformly;
    its samples then carry weight 0 in `sampled_teacher`."""
    probs = torch.softmax(logits.float(), -1).scatter_(-1, indices, 0.0).reshape(-1, logits.shape[-1])
    empty = probs.sum(-1, keepdim=True) <= 0
    probs = torch.where(empty, torch.ones_like(probs), probs)
    drawn = torch.multinomial(probs, m, replacement=True, generator=generator).reshape(*logits.shape[:-1], m)
    return torch.gather(logits, -1, drawn), drawn


def lm_distillation_sums(student_logits: torch.Tensor, input_ids: torch.Tensor, teacher: dict[str, torch.Tensor] | None,
                         weights: torch.Tensor | None, *, kind: Divergence = "forward_kl", temperature: float = 1.0,
                         tail: bool = True, beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ KD over tokens, Σ next-token CE) for one batch; the loop combines them as
    α·KD/N_kd + (1 − α)·CE/N_ce with global token counts N.

    student_logits [B, L, V]; input_ids [B, L]; teacher: stored columns with a teacher axis,
    either {"values", "indices": [B, M, L, k], "lse": [B, M, L]} (top-k, optionally "tail_values",
    "tail_indices": [B, M, L, m]) or {"logits": [B, M, L, V]} (full); weights [M] on the simplex. With several teachers the per-teacher divergences are
    weighted (their supports differ, so their distributions are not mixed). KD is 0 without teacher.
    """
    mask = torch.ones_like(input_ids, dtype=torch.float32)
    ce = next_token_ce_sum(student_logits, input_ids, mask)
    if teacher is None:
        return student_logits.sum() * 0.0, ce
    if "logits" in teacher:
        supports = [dict(zip(("values", "indices", "lse"), full_support(teacher["logits"][:, m].float())))
                    for m in range(teacher["logits"].shape[1])]
    else:
        supports = [{k: c[:, m] for k, c in teacher.items()} for m in range(teacher["values"].shape[1])]
    kd = sum(w * token_kd_loss(student_logits, s["values"], s["indices"], s["lse"], mask, kind=kind,
                               temperature=temperature, tail=tail, beta=beta, tail_values=s.get("tail_values"),
                               tail_indices=s.get("tail_indices"))
             for w, s in zip(weights, supports))
    return kd, ce
