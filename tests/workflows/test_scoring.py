"""Scoring on the cluster (workflows.scoring): a model that fails inside a Ray Data task
raises one short error, and the pool's CPUs are free again for what the caller runs next (a failed
INT8 scoring is a warning: the run goes on to fits that need every CPU)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from workflows import scoring


def test_a_failed_scoring_names_the_error_and_frees_its_cpus(ray_session):
    ray = ray_session
    rows = [{"x": np.zeros(7, np.float32), "y": 0} for _ in range(8)]  # a CNN over 40 steps cannot take 7
    ds = ray.data.from_items(rows)
    with pytest.raises(scoring.ScoringError, match=r"^RuntimeError: ") as e:
        scoring.score(ds, task="classification", factory="kd_ops.models:cnn", kwargs={"width": 4})
    assert "\n" not in str(e.value) and "ray::" not in str(e.value)
    total, deadline = ray.cluster_resources()["CPU"], time.time() + 20
    while ray.available_resources().get("CPU", 0) < total and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == total
