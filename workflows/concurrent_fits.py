"""Independent fits (the teachers of a run; the KD student and its label-only baseline) side by
side, as many at once as the cluster holds.

Each fit is its own Ray Train run started from a driver thread (Train V2 supports `fit()` off the
main thread). On a cluster the teachers then train on different nodes at once; on a laptop with
one-CPU workers they use the cores a single fit leaves idle.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import ray

from workflows import train
from workflows.config import TrainConfig

T = TypeVar("T")


def fits_at_once(t: TrainConfig, fits: int) -> int:
    """How many fits with the run's Train workers (`t`: the config's train section) the cluster
    holds at once now (≥ 1, ≤ `fits`), bounded by train.max_concurrent_fits when set."""
    need = train.worker_bundle(t.cpus_per_worker, t.use_gpu, t.resources)
    have = ray.cluster_resources()
    room = min(int(have.get(k, 0) // (v * t.num_workers)) for k, v in need.items() if v > 0)
    if t.max_concurrent_fits is not None:
        room = min(room, t.max_concurrent_fits)
    return max(1, min(room, fits))


def run_all(fn: Callable[[T], Any], items: Sequence[T], at_once: int) -> list[Any]:
    """[fn(item) for item in items], `at_once` at a time. Threads are daemons, so a Ctrl-C in the
    driver ends the run instead of waiting for them. After every fit started has stopped (a
    half-finished fit keeps its checkpoints for the rerun), the error of the first item that
    failed, in the order of `items`, is raised."""
    if at_once <= 1:
        return [fn(item) for item in items]
    results: list[Any] = [None] * len(items)
    errors: dict[int, BaseException] = {}
    slots = threading.Semaphore(at_once)

    def one(i: int) -> None:
        try:
            results[i] = fn(items[i])
        except BaseException as e:  # noqa: BLE001 - re-raised in the driver's thread below
            errors[i] = e
        finally:
            slots.release()

    threads = []
    for i in range(len(items)):
        slots.acquire()
        if errors:  # one failed: start no more
            slots.release()
            break
        th = threading.Thread(target=one, args=(i,), daemon=True, name=f"fit-{i}")
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    if errors:
        raise errors[min(errors)]
    return results
