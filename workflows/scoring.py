"""Test and validation metrics computed on the cluster: Ray Data tasks run the model over
a streamed dataset (`workflows.ingest`) and returns one row of counts per batch; the driver only
adds those rows up. The counting itself is kd_ops.evaluate's."""
from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import ray
import torch

from kd_ops import models
from workflows import kinds


class Scorer:
    """Counts for one batch. Built once per worker process and score() call (None factory: score
    the stored teachers only)."""

    def __init__(self, factory: str | None, kwargs: dict[str, Any], weights, task: str,
                 teacher_weights: list[float] | None):
        torch.set_num_threads(1)  # the task reserves one CPU
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


_BUILT: dict[str, Scorer] = {}  # in a Ray worker process: the model of the latest score() call


def _score_batch(batch: dict[str, np.ndarray], *, call: str, **scorer_args) -> dict[str, np.ndarray]:
    if call not in _BUILT:
        _BUILT.clear()
        _BUILT[call] = Scorer(**scorer_args)
    return _BUILT[call](batch)


def score(ds: ray.data.Dataset, *, task: str, factory: str | None = None, kwargs: dict | None = None,
          weights=None, teacher_weights: list[float] | None = None, actors: int = 1,
          batch_size: int = 1024) -> dict[str, float]:
    """Summed counts of `Scorer` over the whole dataset (see kd_ops.evaluate.*_sums), on at most
    `actors` CPUs. Tasks, not an actor pool: Ray Data drops a failed pool's actors without killing
    them, and an actor keeps its CPU while anything (a log handler's record of the error) still
    references it, so a caller that goes on (a failed INT8 scoring ships fp32) would wait for ever."""
    rows = ds.map_batches(_score_batch, fn_kwargs=dict(call=uuid.uuid4().hex, factory=factory, kwargs=kwargs or {},
                                                       weights=weights, task=task, teacher_weights=teacher_weights),
                          batch_size=batch_size, compute=ray.data.TaskPoolStrategy(size=actors), num_cpus=1)
    try:
        return _add_up(rows)
    except Exception as e:  # noqa: BLE001 - one line instead of Ray's wrapped remote traceback
        raise ScoringError(one_line(e)) from None


def _add_up(rows: ray.data.Dataset) -> dict[str, float]:
    total: dict[str, float] = {}
    for r in rows.iter_rows():  # one row of counts per batch
        for k, v in r.items():
            total[k] = total.get(k, 0.0) + float(v)
    return total


class ScoringError(RuntimeError):
    """Scoring a model on the cluster failed: the message is the innermost error's."""


def one_line(e: BaseException) -> str:
    """The innermost error of a Ray chain as "Type: message": what a warning shows instead of Ray's
    wrapped remote traceback. Ray Data's UserCodeException reaches the driver without its cause,
    whose last line is in the remote traceback text before Python's "direct cause" line."""
    if isinstance(e, ScoringError):
        return str(e)
    text = str(e)
    if CAUSED in text:
        return [line for line in text.split(CAUSED)[0].splitlines() if line.strip()][-1].strip()
    seen = set()
    while id(e) not in seen:  # RayTaskError's `.cause`, or Python's `__cause__`
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        if not isinstance(inner, BaseException):
            break
        e = inner
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


CAUSED = "The above exception was the direct cause of the following exception"


