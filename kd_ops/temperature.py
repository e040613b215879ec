"""Temperature over training and per sample.

Schedules (end points searchable by Tune): constant, linear and cosine from `start` to `end` as
training progresses from 0 to 1 (steps done / steps planned). Annealing the temperature from high
to low moves the student from the teacher's dark knowledge towards its top-1 decisions (e.g.
Jafari et al. 2021, "Annealing Knowledge Distillation"; Li et al. 2023, "Curriculum Temperature").

Per sample: logit standardisation (Sun et al., CVPR 2024, "Logit Standardization in Knowledge
Distillation"): each model's logits are z-scored per row before the softmax at T, i.e. every
sample gets its own temperature T · σ(z). The student then matches the teacher's logit *shape*,
not its magnitude, which a small student often cannot reach.
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "linear", "cosine")


def scheduled(start: float, end: float | None, kind: str, progress: float) -> float:
    """The temperature at `progress` ∈ [0, 1]: `start` at 0, `end` at 1 (end None: constant)."""
    if kind not in SCHEDULES:
        raise ValueError(f"temperature schedule must be one of {SCHEDULES}, got {kind!r}")
    p = min(max(progress, 0.0), 1.0)
    if kind == "constant" or end is None:
        return start
    if kind == "linear":
        return start + (end - start) * p
    return end + (start - end) * (1 + math.cos(math.pi * p)) / 2


def standardize(logits: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-row z-score over the last dimension: (z − mean) / std. [..., C] → [..., C] float32."""
    z = logits.float()
    return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + eps)
