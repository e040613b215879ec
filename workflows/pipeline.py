"""`kd run`, for every task: data → teachers → precompute → tune → student → label-only baseline →
evaluate → register → summary. One MLflow parent run with a nested child run per stage and per
tune trial. The task-specific parts are in workflows.tasks; nothing here grows with the data:
datasets are streamed to the Train workers and metrics are computed on the cluster."""
from __future__ import annotations

import json
import math
import logging
import time
from pathlib import Path
from typing import Any

import mlflow

from kd_ops import store
from kd_ops.fsio import Loc, redacted
from rich.console import Console

from workflows import advice, chain, concurrent_fits, console, deploy, ingest, ray_session, report_page, stages, tasks
from workflows.config import RunConfig
from workflows.report import print_summary
from workflows.tracking import Tracker
from workflows.tune import run_tune
from workflows.layout import Layout

log = logging.getLogger("kd")


def run(cfg: RunConfig, out: Path, *, tracking_uri: str | None = None, ray_address: str | None = None,
        restart: bool = False) -> dict[str, Any]:
    """The whole pipeline. Rerunning it after its driver died continues where it stopped: the same
    MLflow parent run, finished stages and fits reused, an interrupted search or fit resumed from
    its checkpoints. `restart`: start over instead (everything under --out but the data)."""
    start = time.perf_counter()
    task = tasks.for_config(cfg)
    lay = Layout(out)
    lay.make()
    # a summary and shipped files only ever describe a finished run: an earlier run's go first
    (lay.out / "summary.json").delete()
    (lay.out / "deploy").delete()
    tracker = Tracker(tracking_uri or cfg.tracking.tracking_uri, cfg.tracking.experiment,
                      artifact_root=None if lay.out.local else (lay.out / "mlflow").bare_uri)
    resume = _previous_run(cfg, lay, tracker, restart)
    ray_session.init_ray(ray_address, cfg.code, cfg.train.resource_wait_s)
    with tracker.parent(cfg.name, cfg.model_dump(mode="json"), {"kd.out": str(lay.out), "kd.task": task.kind},
                        resume=resume) as parent_id:
        (lay.out / RUN_STATE).write_text(json.dumps({"parent_run_id": parent_id, "config": _config_key(cfg)}))
        mlflow.log_dict(redacted(cfg.model_dump(mode="json")), "config.json")
        step("data")
        dirs = task.data(lay)
        features = stages.check_run(task, dirs, lay, target=True)  # before any teacher runs
        chain.warn_sizes(cfg, cfg.teachers)
        step("teachers")
        teachers = stages.teachers(task, dirs, lay, tracker)
        step("precompute")
        precomputed, _ = stages.precompute_all(task, teachers, dirs, lay, tracker)
        kd = stages.datasets(task, dirs, lay, teachers=True,
                             splits={"train": task.train_splits, "val": ("val",), "test": ("test",)})
        kd_sets, rows_test = kd.sets, kd.rows["test"]
        teacher_rows, reference, teacher_metrics = task.teacher_report(teachers, kd_sets)
        mlflow.log_metrics(teacher_metrics)
        # TAKD / born-again stages, each stored as a new teacher; the student distils from the last
        names, teacher_weights, chain_rows = chain.run(task, teachers, dirs, lay, tracker, kd_sets["test"])
        inputs = kd
        if chain_rows or features:
            inputs = stages.datasets(task, dirs, lay, teachers=names, features=features,
                                     splits={"train": task.train_splits, "val": ("val",)})
        train_sets, rows = {k: inputs.sets[k] for k in ("train", "val")}, inputs.rows

        base = stages.loop(task, cfg.student.factory, task.student_kwargs(teachers), cfg.train.fit,
                           inputs=inputs, label="student", distill=True,
                           teacher_weights=teacher_weights, features=features)
        tune_rows: list[dict] = []
        tune_failed: list[dict] = []
        best, budget, pareto = None, None, None
        if cfg.tune.enabled:
            step("tune")
            # after a chain, the weights between teachers and the last stage are the chain's design
            search = cfg.tune.model_copy(update={"teacher_weights": None}) if chain_rows else cfg.tune
            search_base = base
            base, best, tune_rows, tune_failed = run_tune(search, base, names, cfg.student.width_kwarg,
                                             train_sets, storage=lay.ray,
                                             workers=stages.workers(cfg.train), tracking_uri=tracker.uri,
                                             experiment=tracker.experiment, parent_run_id=parent_id)
            log.info("tune: best %s", best)
            if cfg.deploy.enabled:
                step("latency of the trials")
                chosen, budget, pareto = deploy.trials_on_target(task, lay, tracker, search_base, names, tune_rows,
                                                                  kd_sets, dirs)
                base = chosen or base
        base = base.replace(epochs=cfg.train.fit.epochs, label="student")

        step("student and label-only student")
        chosen = {"temperature": base.temperature, "alpha": base.alpha, "teacher_weights": base.teacher_weights,
                  "student_kwargs": {k: v for k, v in base.kwargs.items() if k != "teacher_dir"}}
        chosen |= task.chosen(base, names)
        lo_inputs = stages.datasets(task, dirs, lay, teachers=False, splits={"train": ("train",), "val": ("val",)})
        lo = stages.loop(task, base.factory, base.kwargs, cfg.train.label_only_fit, inputs=lo_inputs,
                         label="label-only")
        progress = stages.epochs_progress("student, label-only", [base, lo])
        # (MLflow run, its params, loop, datasets, fit name) of the KD student and its label-only baseline
        fits = [("student", chosen | {"epochs": base.epochs}, base, train_sets, "student"),
                ("label-only-student", {"student_kwargs": chosen["student_kwargs"],
                                        **cfg.train.label_only_fit.model_dump()}, lo, lo_inputs.sets, "label-only")]

        def fit_and_score(i: int):
            run_name, params, loop, sets, name = fits[i]
            with stages.child_fit(cfg.train, tracker, run_name, params, loop, sets, name=name, lay=lay,
                                  progress=progress(i)) as res:
                if i == 0 and not all(math.isfinite(v) for v in res.metrics.values() if isinstance(v, float)):
                    raise ValueError(f"the student's training diverged (metrics {res.metrics}); not registered. "
                                     "Lower train.fit.lr or set train.fit.max_grad_norm")
                row = task.model_report(loop, res.weights, kd_sets)
                mlflow.log_metrics({k: v for k, v in row.items() if isinstance(v, (int, float))})
                registered = _register(task, tracker, loop, res.weights, dirs) if i == 0 else None
            return res, row, registered

        # independent fits: side by side when the cluster holds both
        (res, srow, registered), (lo_res, lorow, _) = concurrent_fits.run_all(
            fit_and_score, range(len(fits)), concurrent_fits.fits_at_once(cfg.train, len(fits)))

        dep = None
        if cfg.deploy.enabled:
            step("deploy")
            with stages.child_run(tracker, "deploy", cfg.deploy.model_dump(mode="json")):
                dep = deploy.stage(task, lay, base, res.weights, kd_sets, dirs, train_sets, srow, teachers, tracker)
                dep |= {"budget": budget, "pareto_png": pareto}
                mlflow.log_dict(dep, "deploy.json")

        store_bytes = store.size_bytes(lay.store)
        summary = {"name": cfg.name, **task.summary(teacher_rows, reference, srow, lorow, res, lo_res, store_bytes, rows, names)}
        summary["student"]["config"] = chosen
        summary |= {
            "chain": chain_rows,
            # born-again: test accuracy of generation 1..N (the last is the student above)
            **({"generations": [r["test_accuracy"] for r in chain_rows] + [srow["test_accuracy"]]}
               if cfg.distill.generations > 1 else {}),
            "tune_trials": tune_rows,
            # the trial the student's settings come from: the budget's pick, else Tune's best
            "chosen_trial": (budget or {}).get("chosen_trial") or (best or {}).get("trial_id"),
            "tune_failed_trials": tune_failed,
            "store_bytes": store_bytes,
            "test_rows": rows_test,
            "val_rows": kd.rows["val"],
            "deploy": dep,
            "teacher_compute": advice.teacher_compute(
                stages.timings(lay), sum(r.manifest["rows"] for r in precomputed), rows["train"], tune_rows,
                base.epochs, ((dep or {}).get("int8") or {}).get("qat_epochs") or 0, len(names)),
            "wall_seconds": time.perf_counter() - start,
            "mlflow": tracker.summary(registered),  # the tracking URI with its secrets masked
        }
        task.add_intervals(summary)
        summary["warnings"] = advice.warnings(summary, cfg, best)
        mlflow.log_metrics({k: v for k, v in summary.items() if isinstance(v, float)})
        mlflow.log_dict(summary, "summary.json")
        page = write_summary(summary, lay)
        tracker.log_file(page, "report")
    return summary


RUN_STATE = "run.json"  # {parent_run_id, config}: lets a rerun find the run its dead driver left


def _config_key(cfg: RunConfig) -> str:
    return json.dumps(redacted(cfg.model_dump(mode="json")), sort_keys=True, default=str)


def _previous_run(cfg: RunConfig, lay: Layout, tracker: Tracker, restart: bool) -> str | None:
    """The parent run id to continue, if the last run into this --out (same config) never finished.
    A restart, or another config, closes such a run as KILLED and starts a new one."""
    state_file = lay.out / RUN_STATE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    previous = state.get("parent_run_id")
    unfinished = tracker.unfinished(previous)
    if unfinished and not restart and state.get("config") == _config_key(cfg):
        log.info("continuing run %s (its driver stopped before the end); --restart starts over", previous)
        return previous
    if unfinished:
        tracker.close_unfinished(previous)
    if restart:
        for d in (lay.ray, lay.store, lay.teachers, state_file):
            d.delete()
    return None


def _register(task, tracker: Tracker, loop, weights, dirs) -> dict | None:
    """The student's weights as an artifact of its run, and as a version of the registered model."""
    cfg = task.cfg
    example = ingest.first_rows(dirs[task.eval_split], task.feature_columns, task.input_dtype)
    tracker.log_file(weights, "weights", "model.safetensors")
    return tracker.register(weights, {"factory": loop.factory, "kwargs": loop.kwargs}, cfg.tracking.registered_model,
                            example.astype(task.example_dtype), cfg.code)


def write_summary(summary: dict[str, Any], lay: Layout) -> Loc:
    """The report page, then summary.json (it appears only when the run finished, written whole),
    then the table and one console line per warning. Returns the page's location."""
    page = report_page.write(summary, lay.out)
    (lay.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print_summary(summary, Console(file=console.out()))
    for w in summary.get("warnings") or []:
        console.say(f"warning: {w}")
    console.say(f"report: {page}")
    return page


def step(name: str) -> None:
    console.say(f"==> {name}")
