"""The layer under every stage: a nested MLflow run, one fit under it with the run's Train
workers and an epoch progress line, and fits side by side (`workflows.concurrent_fits`)."""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

from workflows import console, train
from workflows.config import TrainConfig
from workflows.concurrent_fits import fits_at_once, run_all
from workflows.layout import Layout
from workflows.loop import Loop
from workflows.tracking import Tracker

log = logging.getLogger("kd")

__all__ = ["child_run", "child_fit", "workers", "epoch_progress", "epochs_progress", "fits_at_once", "run_all"]


class _NullRun:
    def __enter__(self): return None
    def __exit__(self, *a): return False


def child_run(tracker: Tracker | None, name: str, params: dict | None = None):
    """A nested MLflow run (or nothing without a tracker)."""
    return tracker.child(name, params) if tracker else _NullRun()


@contextmanager
def child_fit(t: TrainConfig, tracker: Tracker | None, run_name: str, params: dict | None, loop: Loop,
              sets: dict, *, name: str, lay: Layout, progress=None):
    """Fit `loop` under a nested MLflow run `run_name` (rank 0 logs each epoch there) with the run's
    Train workers (`t`: the config's train section) and an epoch progress line (or `progress(epoch)`); yields the `train.Trained`
    inside that run, so the caller logs what it measures of the model there too."""
    with child_run(tracker, run_name, params) as run_id:
        loop = loop.replace(mlflow=tracker and {"tracking_uri": tracker.uri, "run_id": run_id})
        yield train.fit(loop, sets, name=name, storage=lay.ray, **workers(t),
                        progress=progress or epoch_progress(loop))


def workers(t: TrainConfig) -> dict:
    """How every fit of a run gets its Train workers (train.fit's keyword arguments), from the
    config's train section."""
    return dict(num_workers=t.num_workers, use_gpu=t.use_gpu, max_failures=t.max_failures, resources=t.resources)


def epoch_progress(loop: Loop):
    """A fit's `progress`: `label: epoch/epochs epochs (…, ETA)` on the console."""
    return epochs_progress(loop.label, [loop])(0)


def epochs_progress(label: str, loops: list[Loop]):
    """For fits running side by side: progress(i) is fit i's `progress(epoch)`, all of them counted
    on one line `label: epochs done/all epochs`."""
    bar, lock = console.progress(label, "epochs"), threading.Lock()
    done, total = [0] * len(loops), sum(lp.epochs for lp in loops)

    def of(i: int):
        def update(epoch: int) -> None:
            with lock:
                done[i] = epoch
                bar(sum(done), total)
        return update
    return of
