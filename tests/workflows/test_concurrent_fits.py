"""Teachers side by side: how many fits the cluster holds at once, and the runner's order,
concurrency bound and error handling."""
import threading
import time

import pytest

from workflows import concurrent_fits
from workflows.config import RunConfig

from conftest import tiny_config


def _cfg(tmp_path, **train) -> RunConfig:
    from workflows.config import load_config

    return load_config(tiny_config(tmp_path), [f"train.{k}={v}" for k, v in train.items()])


def test_fits_at_once_follows_the_clusters_resources(ray_session, tmp_path):
    cpus = int(ray_session.cluster_resources()["CPU"])
    assert concurrent_fits.fits_at_once(_cfg(tmp_path).train, 10) == cpus
    assert concurrent_fits.fits_at_once(_cfg(tmp_path).train, 1) == 1
    assert concurrent_fits.fits_at_once(_cfg(tmp_path, cpus_per_worker=cpus).train, 10) == 1
    assert concurrent_fits.fits_at_once(_cfg(tmp_path, max_concurrent_fits=1).train, 10) == 1
    # a resource no node has: one at a time (the fit then waits and fails as it would alone)
    assert concurrent_fits.fits_at_once(_cfg(tmp_path, resources="{nowhere: 1}").train, 10) == 1


def test_run_all_keeps_order_and_bounds_how_many_run_at_once():
    running, peak, lock = [0], [0], threading.Lock()

    def fn(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return i * i

    assert concurrent_fits.run_all(fn, list(range(7)), 3) == [i * i for i in range(7)]
    assert peak[0] == 3


def test_run_all_raises_the_first_error_and_starts_no_more():
    started = []

    def fn(i):
        started.append(i)
        if i == 0:
            raise ValueError("teacher 0 failed")
        time.sleep(0.2)
        return i

    with pytest.raises(ValueError, match="teacher 0 failed"):
        concurrent_fits.run_all(fn, list(range(6)), 2)
    assert len(started) < 6
