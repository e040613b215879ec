"""The Ray session kd-ops runs in (no MLflow here: GPU benchmark machines run without it).

One run, one pinned cluster: every process the run starts (tasks, actors, Train controllers and
workers, Tune trials, Ray Train's detached PlacementGroupCleaner) gets RAY_ADDRESS of this run's
cluster in its environment, so nothing auto-detects "the" local cluster and finds several when
two runs share a machine. User code named in the config is shipped to every node as
runtime_env py_modules.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import ray
from ray.data._internal.execution.execution_callback import ExecutionCallback  # the base of DataContext callbacks

from kd_ops.fsio import redact

# Ray internals used here (pyproject pins Ray to the range they were tested with): fail at import,
# naming them, rather than run with the pacing silently gone
if not (callable(getattr(ExecutionCallback, "on_execution_step", None))
        and callable(getattr(getattr(ray._private, "utils", None), "get_dashboard_dependency_error", None))
        and callable(getattr(getattr(ray._private, "utils", None), "get_entrypoint_name", None))):
    raise ImportError(f"kd-ops needs Ray's ExecutionCallback.on_execution_step and ray._private.utils."
                      f"get_dashboard_dependency_error / get_entrypoint_name, which Ray {ray.__version__} lacks; "
                      "install the Ray version pyproject.toml names")

# Ray Train V2 workers block in report() until the controller drains a 1-slot queue, which it
# polls every 2 s by default: with sub-second epochs that poll, not training, sets the pace.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
# How long a Train worker group may wait for its resources before the fit fails (Ray's default
# is 60 s, retried without limit: a run that can never be scheduled waited forever).
WAIT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def code_paths(code: list) -> list[str]:
    """Check the config's `code` entries (module files or package directories) and return them absolute."""
    out = []
    for c in code or []:
        p = Path(c).resolve()
        if not p.exists():
            raise ValueError(f"code: {p} does not exist (give module files or package directories to ship)")
        if p.is_file() and p.suffix != ".py":
            raise ValueError(f"code: {p} is neither a .py module nor a package directory")
        if p.is_dir() and not (p / "__init__.py").is_file():
            raise ValueError(f"code: {p} is a directory without __init__.py; ship a package directory or .py files")
        out.append(str(p))
    return out


def init_ray(address: str | None = None, code: list | None = None, resource_wait_s: float = 600.0) -> None:
    """Start (or join) Ray. Local runs get a fresh cluster with the dashboard on 127.0.0.1 (Tune's
    ASHA needs the state API it serves to clean up stopped trials) on a GCS port chosen here, so
    its address is known before any process starts and can be pinned in every process's env."""
    if ray.is_initialized():
        return
    modules = code_paths(code)
    for m in modules:  # the driver imports them too (the probe builds teachers here)
        parent = str(Path(m).parent)
        if parent not in sys.path:
            sys.path.insert(0, parent)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local default; a real cluster sets its own
    os.environ.update({k: os.environ.get(k, v) for k, v in RAY_ENV.items()})  # the local raylet inherits these
    os.environ[WAIT_ENV] = str(resource_wait_s)
    # no secret here: Ray's job API returns the runtime env whole and every node's runtime-env agent
    # logs it. MLflow credentials reach Ray's processes through their node's environment (a local
    # cluster's inherit this process's, see tracking.connect_uri).
    env = {k: os.environ[k] for k in (*RAY_ENV, WAIT_ENV)}
    if address is None:
        port = _free_port()
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        pinned = f"{ray.util.get_node_ip_address()}:{port}"
    else:
        pinned = address if address != "auto" else None
    if pinned:
        env["RAY_ADDRESS"] = pinned
    runtime_env = {"env_vars": env} | ({"py_modules": modules} if modules else {})
    try:
        # a local cluster gets the dashboard (127.0.0.1) where its packages are installed (`ray[default]`;
        # a minimal Ray, e.g. a trimmed bundle, runs without it rather than failing to start)
        dashboard = address is None and not ray._private.utils.get_dashboard_dependency_error()
        with _entrypoint_redacted():
            ray.init(address=address or "local", include_dashboard=dashboard, dashboard_host="127.0.0.1",
                     runtime_env=runtime_env, configure_logging=True, logging_level=logging.WARNING)
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)
    # the driver's own later helpers (state API, subprocesses) use this cluster too
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    ctx = ray.data.DataContext.get_current()  # datasets copy it: these hold for every one this run builds
    # bars only around precompute (see progress_bars): in Train ingest they repeat every epoch
    ctx.enable_progress_bars = False
    if PacedScheduling not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes = [*ctx.custom_execution_callback_classes, PacedScheduling]


@contextmanager
def _entrypoint_redacted():
    """Ray records the driver's command line as its job's entrypoint (job API, dashboard): a
    `--tracking-uri` or `--out` with a password in it is recorded redacted."""
    utils = ray._private.utils
    original = utils.get_entrypoint_name
    utils.get_entrypoint_name = lambda: redact(original())
    try:
        yield
    finally:
        utils.get_entrypoint_name = original


class PacedScheduling(ExecutionCallback):
    """At most one step of a Ray Data scheduling loop per `STEP_S`.

    Ray 2.60's streaming executor blocks (in `ray.wait`) only while one of its tasks runs; while
    none may run, e.g. the ingest's reads wait for object-store budget because training consumes
    slower than they read (any store larger than that budget), the loop polls without pause: half
    a core or more in the SplitCoordinator, taken from the Train worker beside it. A step after a
    blocking wait is not delayed. (`kd bench ingest`, 4.6 GB store, 2 cores: the coordinator used
    63 s of CPU during a 124 s epoch without this, 7 s during a 115 s one with it.)"""
    STEP_S = 0.01

    def __init__(self):
        self._last = 0.0

    def on_execution_step(self, executor) -> None:
        pause = self._last + self.STEP_S - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        self._last = time.monotonic()


@contextmanager
def progress_bars():
    ctx = ray.data.DataContext.get_current()
    before, ctx.enable_progress_bars = ctx.enable_progress_bars, True
    try:
        yield
    finally:
        ctx.enable_progress_bars = before
