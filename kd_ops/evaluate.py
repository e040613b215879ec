"""Evaluation metrics on logits; batched inference for a module."""
from __future__ import annotations

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


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows where two models' top-1 predictions agree. a, b: [N, C] logits or probs."""
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def ensemble_probs_np(teacher_logits: np.ndarray, weights: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """numpy twin of kd_ops.losses.ensemble_probs for evaluation: [M, N, C] → [N, C]."""
    from kd_ops.losses import ensemble_probs

    return ensemble_probs(torch.from_numpy(np.asarray(teacher_logits, np.float32)),
                          torch.from_numpy(np.asarray(weights, np.float32)), temperature).numpy()
