"""Relational knowledge distillation (RKD; Park et al., CVPR 2019, "Relational Knowledge Distillation").

The student matches the *structure* of the teacher's embedding space rather than the embeddings:
pairwise distances (normalised by their mean, so the loss ignores the embeddings' scale) and the
angles formed by triples. Student and teacher embeddings may have different widths.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _pairwise(e: torch.Tensor) -> torch.Tensor:
    """[B, D] → [B, B] Euclidean distances divided by their mean over distinct pairs."""
    e = e.float().flatten(1)
    d = torch.cdist(e, e)
    off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    return d / d[off].mean().clamp_min(1e-12)


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Huber loss between the mean-normalised pairwise distances of the two batches. Scalar.

    student: [B, Ds]; teacher: [B, Dt] (any trailing shape, flattened). Invariant to scaling
    either embedding by a positive factor."""
    with torch.no_grad():
        t = _pairwise(teacher)
    s = _pairwise(student)
    off = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
    return F.smooth_l1_loss(s[off], t[off])


def _angles(e: torch.Tensor) -> torch.Tensor:
    """[B, D] → [B, B, B]: cos of the angle at j between i and k, for every triple (i, j, k)."""
    e = e.float().flatten(1)
    v = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [j, i, D]: unit vectors from j to i
    return torch.bmm(v, v.transpose(1, 2))


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor, max_rows: int | None = 64) -> torch.Tensor:
    """Huber loss between the triple angles of the two batches. Scalar; shapes as above.

    Every triple costs B³ time and memory (a 256-row batch: 0.16 s a step on one CPU core), so
    the angles are taken over the first `max_rows` rows of the batch (None: all). Training
    batches arrive shuffled, so these are a random subset each step."""
    if max_rows is not None:
        student, teacher = student[:max_rows], teacher[:max_rows]
    with torch.no_grad():
        t = _angles(teacher)
    return F.smooth_l1_loss(_angles(student), t)
