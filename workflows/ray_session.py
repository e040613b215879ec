"""The Ray session kd-ops runs in (no MLflow here: GPU benchmark machines run without it)."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import ray

# Ray Train V2 workers block in report() until the controller drains a 1-slot queue, which it
# polls every 2 s by default: with sub-second epochs that poll, not training, sets the pace.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def init_ray(address: str | None = None) -> None:
    """Start (or join) Ray. Local runs get a fresh cluster with the dashboard on 127.0.0.1: Tune's
    ASHA needs the state API it serves to clean up stopped trials."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local default; a real cluster sets its own
    os.environ.update({k: os.environ.get(k, v) for k, v in RAY_ENV.items()})  # the local raylet inherits these
    ray.init(address=address or "local", include_dashboard=address is None, dashboard_host="127.0.0.1",
             runtime_env={"env_vars": {k: os.environ[k] for k in RAY_ENV}},
             configure_logging=True, logging_level=logging.WARNING)
    # bars only around precompute (see progress_bars): in Train ingest they repeat every epoch
    ray.data.DataContext.get_current().enable_progress_bars = False


@contextmanager
def progress_bars():
    ctx = ray.data.DataContext.get_current()
    before, ctx.enable_progress_bars = ctx.enable_progress_bars, True
    try:
        yield
    finally:
        ctx.enable_progress_bars = before
