"""Ray Tune over temperature, α, student width and teacher weights. A one-worker trial runs the
training loop in its own trial actor; a multi-worker one is a per-trial driver function that
trains through Ray Train. Every trial reads the same soft-label datasets, so no teacher runs
while tuning."""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
from typing import Any

import ray
import ray.train
from ray import tune
from ray.util.queue import Queue
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator

from kd_ops.fsio import Loc
from workflows import console, train, worker
from workflows.config import METHOD_DIMS, METHOD_WORDS, Dim, TuneConfig
from workflows.loop import Loop
from workflows.tracking import connect_uri

log = logging.getLogger("kd")


def _dim(d: Dim):
    if d.choice is not None:
        return tune.choice(d.choice)
    if d.uniform is not None:
        return tune.uniform(*d.uniform)
    return tune.loguniform(*d.loguniform)


def search_space(tc: TuneConfig, teachers: list[str]) -> dict[str, Any]:
    """Flat Tune param space; teacher weights get one raw weight per teacher, normalised per trial."""
    space = {k: _dim(getattr(tc, k)) for k in ("temperature", "alpha", "student_width", *METHOD_DIMS)
             if getattr(tc, k) is not None}
    if tc.teacher_weights is not None and len(teachers) > 1:
        space |= {f"teacher_weight.{t}": _dim(tc.teacher_weights) for t in teachers}
    return space


def apply_trial(base: Loop, trial: dict[str, Any], teachers: list[str], width_kwarg: str) -> Loop:
    """The loop for one point of the search space: the point's values replace those of `base`'s
    distillation settings (`Loop.distill`) and its width the student's; unsearched values keep `base`'s."""
    point: dict[str, Any] = {k: trial[k] if k in METHOD_WORDS else float(trial[k])
                             for k in ("temperature", "alpha", *METHOD_DIMS) if k in trial}
    if any(f"teacher_weight.{t}" in trial for t in teachers):
        raw = [float(trial.get(f"teacher_weight.{t}", 1.0)) for t in teachers]
        point["teacher_weights"] = tuple(w / sum(raw) for w in raw)
    kwargs = {**base.kwargs, width_kwarg: int(trial["student_width"])} if "student_width" in trial else base.kwargs
    return base.replace(kwargs=kwargs, distill=dataclasses.replace(base.distill, **point) if point else base.distill)


def _trial(trial: dict[str, Any], *, base, teachers, width_kwarg, datasets, storage, workers, direct):
    """One Tune trial. `direct` (one worker): the training loop runs here, in the trial actor, and
    reports and checkpoints through Tune. Otherwise a TorchTrainer whose per-epoch metrics reach
    Tune through tune.report from this (the trial's own) thread. Ray 2.60's TuneReportCallback
    reports from the trial actor's main thread instead, and a trial whose fit ends as its last
    report arrives can then block forever on a full result queue (seen here as a hung test run),
    so reports are forwarded by hand."""
    trial_id = tune.get_context().get_trial_id()
    cfg = apply_trial(base, trial, teachers, width_kwarg).replace(label=f"trial {trial_id}")
    if direct:
        worker.run_loop(cfg, worker.tune_session(datasets, workers["use_gpu"]))
        return
    queue, outcome = Queue(actor_options={"num_cpus": 0}), {}

    def fit() -> None:
        try:
            train.fit(cfg, datasets, name=f"train-trial_id={trial_id}", storage=storage, **workers,
                      callbacks=[train.ForwardReports(queue)])
        except BaseException as e:  # re-raised in the trial thread below
            outcome["error"] = e
        finally:
            queue.put(None)

    runner = threading.Thread(target=fit, name=f"fit-{trial_id}", daemon=True)
    runner.start()
    while (metrics := queue.get()) is not None:
        tune.report(metrics)  # ASHA may stop the trial here; the TorchTrainer shares the actor's fate
    runner.join()
    if "error" in outcome:
        raise outcome["error"]


class _MLflowLogger(MLflowLoggerCallback):
    """Tune pickles its callbacks into the run's folder (tuner.pkl): this one holds the tracking URI
    with its secrets masked and connects with the real one (tracking.connect_uri) while it sets up."""

    def setup(self, *args, **kwargs):
        shown, self.tracking_uri = self.tracking_uri, connect_uri(self.tracking_uri)
        try:
            super().setup(*args, **kwargs)
        finally:
            self.tracking_uri = shown


def run_tune(tc: TuneConfig, base: Loop, teachers: list[str], width_kwarg: str,
             datasets: dict[str, ray.data.Dataset], *, storage: Loc, workers: dict[str, Any],
             tracking_uri: str | None, experiment: str | None, parent_run_id: str | None):
    """Run the search; returns (best loop config, best metrics, list of per-trial rows)."""
    direct = tc.trial_runner == "auto" and workers["num_workers"] == 1
    trainable = tune.with_parameters(_trial, base=base.replace(epochs=tc.epochs), teachers=teachers,
                                     width_kwarg=width_kwarg, datasets=datasets, storage=Loc.of(storage),
                                     workers=workers, direct=direct)
    if direct:  # the trial is the worker: it holds what one Train worker would
        bundle = train.worker_bundle(base.cpus_per_worker, workers["use_gpu"], workers["resources"])
        train.wait_for_a_node(bundle, "tune trials")
        trainable = tune.with_resources(trainable, tune.PlacementGroupFactory([bundle]))
    else:
        # The driver function only waits on its TorchTrainer: it takes no CPU (the Train workers do),
        # but a bundle may not be empty, so it reserves the memory it really uses.
        trainable = tune.with_resources(trainable, {"cpu": 0, "memory": 256 * 1024**2})
    callbacks = []
    if tracking_uri:
        callbacks.append(_MLflowLogger(tracking_uri=tracking_uri, experiment_name=experiment,
                                       tags={"mlflow.parentRunId": parent_run_id, "kd.stage": "trial"},
                                       save_artifact=False))
    space = search_space(tc, teachers)
    run = Loc.of(storage) / NAME
    # how trials run is part of the search: a restored trial keeps the resources it was created with
    key = json.dumps({"search": tc.model_dump(mode="json"), "base": train._loop_key(base), "workers": workers,
                      "direct": direct}, sort_keys=True, default=str)
    fs = {} if run.local else {"storage_filesystem": run.fs}
    if (run / SEARCH_KEY).is_file() and (run / SEARCH_KEY).read_text() == key and tune.Tuner.can_restore(run.path, **fs):
        # the driver died during this search: finished trials keep their results, the others run
        # (again); each trial's fit continues from its own latest checkpoint
        log.info("tune: resuming the search in %s", run)
        tuner = tune.Tuner.restore(run.path, trainable, resume_unfinished=True, restart_errored=True,
                                   param_space=space, **fs)
    else:
        run.delete()
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=base.objective[0], mode=base.objective[1], num_samples=tc.num_samples,
                scheduler=_scheduler(tc), search_alg=_searcher(tc),
                # a direct trial's actor is kept for the next trial: torch and kd-ops stay imported
                reuse_actors=direct),
            run_config=tune.RunConfig(name=NAME, **train.storage_args(Loc.of(storage)),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # it holds the best model
                                      callbacks=[*callbacks, _TrialProgress(tc.num_samples)], verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=tc.max_failures)),
        )
        (run / SEARCH_KEY).write_text(key)
    grid = tuner.fit()
    metric, mode = base.objective
    failed = [{"trial_id": r.path.rsplit("/", 1)[-1] if r.path else None, **r.config,
               "error": _first_line(r.error)} for r in grid if r.error is not None]
    if len(failed) == len(grid):
        raise RuntimeError(f"all {len(grid)} tune trials failed (each tried {tc.max_failures + 1} times); "
                           f"first error: {failed[0]['error']}")
    for f in failed:
        log.warning("tune: trial %s failed after %d attempt(s): %s", f["trial_id"], tc.max_failures + 1, f["error"])
    best = grid.get_best_result(metric=metric, mode=mode, scope="all")
    rows = []
    for r in grid:
        if r.metrics and r.error is None:
            at = _best_epoch(r, metric, mode)
            rows.append({"trial_id": r.metrics.get("trial_id"), **{k: v for k, v in r.config.items()},
                         "epochs": r.metrics.get("training_iteration"), "best_epoch": at.get("training_iteration"),
                         metric: at.get(metric), "val_agreement": at.get("val_agreement")})
    best_val = _best_epoch(best, metric, mode)[metric]
    return (apply_trial(base, best.config, teachers, width_kwarg),
            {metric: float(best_val), "trial_id": best.metrics.get("trial_id"), **best.config},
            rows, failed)


NAME, SEARCH_KEY = "tune", "kd-search.json"


def _best_epoch(result, metric: str, mode: str) -> dict[str, Any]:
    """The metrics of a trial's best epoch: a trial counts by its best epoch everywhere (its row,
    the budget's pick), as in Tune's own pick (get_best_result scope="all")."""
    df = result.metrics_dataframe
    if df is None or metric not in df or df[metric].isna().all():
        return dict(result.metrics)
    return df.loc[df[metric].idxmax() if mode == "max" else df[metric].idxmin()].to_dict()


def _scheduler(tc: TuneConfig):
    if tc.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", max_t=tc.epochs, grace_period=tc.grace_period,
                         reduction_factor=tc.reduction_factor)


def _searcher(tc: TuneConfig):
    """The concurrency cap goes on the searcher: TuneConfig.max_concurrent_trials is ignored with
    a SearchGenerator such as BasicVariantGenerator."""
    if tc.searcher == "random":
        return BasicVariantGenerator(random_state=tc.seed, max_concurrent=tc.max_concurrent_trials)
    try:
        import optuna
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ValueError("tune.searcher: optuna needs the optuna package: pip install optuna "
                         "(or pip install 'kd-ops[search]')") from None
    # metric and mode come from tune.TuneConfig; the sampler is seeded so a search can be repeated
    tpe = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=tc.seed))
    return ConcurrencyLimiter(tpe, max_concurrent=tc.max_concurrent_trials)


class _TrialProgress(tune.Callback):
    """`tune: done/total trials (…, ETA)` on the console, from the driver's Tune loop."""

    def __init__(self, total: int):
        self.total, self.bar = total, None

    def setup(self, **info):
        self.bar = console.progress("tune", "trials")

    def _tick(self, trials) -> None:
        # counted from the trials' states, so a restored search starts at the trials already done
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials) + 1  # this one's state is not set yet
        self.bar = self.bar or console.progress("tune", "trials")
        self.bar(min(done, self.total), self.total)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._tick([t for t in trials if t is not trial])

    def on_trial_error(self, iteration, trials, trial, **info):
        self._tick([t for t in trials if t is not trial])


def _first_line(error: BaseException) -> str:
    """The innermost error of a trial failure (Ray wraps it in its own exceptions), on one line."""
    seen = set()
    while id(error) not in seen and (inner := getattr(error, "cause", None) or error.__cause__) is not None:
        seen.add(id(error))
        error = inner
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"
