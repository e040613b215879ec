"""Teacher weights per sample for a multi-teacher ensemble, computed from the stored logits alone
(the store is never recomputed): how much each teacher's distribution counts in a row's target.

- `static`: the run's per-teacher weights (fixed or tuned), the same in every row.
- `entropy`: a teacher counts in proportion to its confidence on that row, exp(−H), with H the
  entropy (nats) of its softmax: a teacher that is unsure of a sample says less about it.
- `correctness`: confidence-aware multi-teacher KD (CA-MKD, Zhang et al., ICASSP 2022): on a
  labelled row, teacher m gets (1 − softmax_m(CE_m)) / (M − 1), CE_m the cross-entropy of its
  prediction with the label, so a teacher that is wrong on the row gets less than one that is
  right; unlabelled rows (label −1) fall back to `entropy`.

Every kind is multiplied by the static weights and renormalised, so each row's weights are
non-negative and sum to 1.
"""
from __future__ import annotations

import torch

KINDS = ("static", "entropy", "correctness")


def per_sample_weights(teacher_logits: torch.Tensor, static: torch.Tensor, kind: str,
                       labels: torch.Tensor | None = None) -> torch.Tensor:
    """teacher_logits [M, B, C] raw; static [M] (non-negative, summing to 1); labels [B] (−1 =
    unlabelled) or None. Returns weights [M, B], each column summing to 1."""
    if kind not in KINDS:
        raise ValueError(f"teacher weighting {kind!r} is not one of {list(KINDS)}")
    m, b, _ = teacher_logits.shape
    base = static.to(teacher_logits.device, torch.float32)[:, None].expand(m, b)
    if kind == "static" or m == 1:
        return base.clone()
    logp = torch.log_softmax(teacher_logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)                               # [M, B]
    score = torch.exp(-entropy)
    if kind == "correctness" and labels is not None:
        known = labels >= 0
        y = labels.clamp(min=0).long()
        ce = -logp.gather(-1, y[None, :, None].expand(m, b, 1)).squeeze(-1)   # [M, B]
        ca = (1 - torch.softmax(ce, dim=0)) / (m - 1)                    # CA-MKD, sums to 1 over M
        score = torch.where(known[None, :], ca, score)
    w = base * score
    total = w.sum(0, keepdim=True)
    # a row where every weighted teacher scores 0 (all static weight on a teacher with score 0) keeps the static weights
    return torch.where(total > 0, w / total.clamp_min(torch.finfo(w.dtype).tiny), base)
