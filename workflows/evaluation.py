"""Test and validation metrics computed on the cluster: a Ray Data actor pool runs the model over
a streamed dataset (`workflows.ingest`) and returns one row of counts per batch; the driver only
adds those rows up. The counting itself is kd_ops.evaluate's."""
from __future__ import annotations

from typing import Any

import numpy as np
import ray
import torch

from kd_ops import models
from workflows import kinds


class Scorer:
    """Ray Data callable class: builds the model once per actor (None: score the stored teachers only)."""

    def __init__(self, factory: str | None, kwargs: dict[str, Any], weights, task: str,
                 teacher_weights: list[float] | None):
        torch.set_num_threads(1)  # the actor reserves one CPU
        self.model = None
        if factory is not None:
            self.model = models.build(factory, kwargs)
            if weights is not None:
                models.load_weights(self.model, weights)
            self.model.eval()
        self.kind = kinds.of(task)
        self.weights = torch.tensor(teacher_weights, dtype=torch.float32) if teacher_weights else None

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {k: torch.from_numpy(batch[k]) for k in ("x", "y", *kinds.TEACHER_COLUMNS) if k in batch}
        logits = self.model(tensors["x"]) if self.model is not None else None
        sums = self.kind.sums(logits, tensors, kinds.teacher_columns(tensors), self.weights)
        return {k: np.array([v]) for k, v in sums.items()}


def score(ds: ray.data.Dataset, *, task: str, factory: str | None = None, kwargs: dict | None = None,
          weights=None, teacher_weights: list[float] | None = None, actors: int = 1,
          batch_size: int = 1024) -> dict[str, float]:
    """Summed counts of `Scorer` over the whole dataset (see kd_ops.evaluate.*_sums)."""
    rows = ds.map_batches(Scorer, fn_constructor_kwargs=dict(factory=factory, kwargs=kwargs or {}, weights=weights,
                                                            task=task, teacher_weights=teacher_weights),
                          batch_size=batch_size, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
                          num_cpus=1)
    total: dict[str, float] = {}
    for r in rows.iter_rows():  # one row of counts per batch
        for k, v in r.items():
            total[k] = total.get(k, 0.0) + float(v)
    return total


