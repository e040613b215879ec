"""`kd run`, for every task: the stages of workflows.stages in order (inputs → teachers → soft labels
→ chain → search → student and label-only baseline → ship), then the summary, the table and the
report page. One MLflow parent run with a nested child run per stage and per tune trial. The
task-specific parts are in workflows.tasks; nothing here grows with the data: datasets are
streamed to the Train workers and metrics are computed on the cluster."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow

from kd_ops import store
from kd_ops.fsio import Loc, redacted
from rich.console import Console

from workflows import advice, console, precompute as pre, ray_session, report_page, tasks
from workflows.config import RunConfig, TeacherConfig
from workflows.layout import Layout
from workflows.loop import FeaturePlan
from workflows.stages import chain, fit, inputs, search, ship, soft_labels, store_pass, student, teachers, training_data
from workflows.summary_table import print_summary
from workflows.tracking import Tracker

log = logging.getLogger("kd")


@dataclass
class Ready:
    """The run's inputs checked and its store complete: what every later stage reads."""
    dirs: dict[str, Path]                  # split name → input directory
    features: FeaturePlan | None           # feature KD's layers (checked on real rows)
    teachers: list[TeacherConfig]          # with their weights
    logits: list[pre.TeacherResult]        # the teachers' store entries
    extra: list[pre.TeacherResult]         # feature KD's and the augmented views' entries


def store_ready(task, lay: Layout, tracker: Tracker | None, *, train_teachers: bool = True,
                target: bool = True) -> Ready:
    """Data → checks → teachers → store: the inputs (made or found), every check that can run
    before a teacher does (with `target` the deploy target's), the teachers (trained where the
    task says, or with `train_teachers` False from their weights files) and the store (reused
    where already complete)."""
    dirs = task.data(lay)
    features = inputs.check_run(task, dirs, lay, target=target)  # before any teacher runs
    if train_teachers:
        chain.warn_sizes(task.cfg, task.cfg.teachers)
        step("teachers")
        found = teachers.run(task, dirs, lay, tracker)
        step("precompute")
    else:
        found = teachers.with_weights(task.cfg, lay)
    logits, extra = soft_labels.run(task, found, dirs, lay, tracker)
    return Ready(dirs, features, found, logits, extra)


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
        ready = store_ready(task, lay, tracker)
        dirs = ready.dirs
        kd = training_data.datasets(task, dirs, lay, teachers=True,
                                    splits={"train": task.train_splits, "val": ("val",), "test": ("test",)})
        kd_sets = kd.sets
        teacher_rows, reference, teacher_metrics = task.teacher_report(ready.teachers, kd_sets)
        mlflow.log_metrics(teacher_metrics)
        # TAKD / born-again stages, each stored as a new teacher; the student distils from the last
        names, teacher_weights, chain_rows = chain.run(task, ready.teachers, dirs, lay, tracker, kd_sets["test"])
        student_inputs = kd  # the student reads what the teachers' report did, unless a chain or features add to it
        if chain_rows or ready.features:
            student_inputs = training_data.datasets(task, dirs, lay, teachers=names, features=ready.features,
                                                    splits={"train": task.train_splits, "val": ("val",)})
        base = training_data.loop(task, cfg.student.factory, task.student_kwargs(ready.teachers), cfg.train.fit,
                                  inputs=student_inputs, label="student", distill=True,
                                  teacher_weights=teacher_weights, features=ready.features)
        train_sets = {k: student_inputs.sets[k] for k in ("train", "val")}
        found = search.run(task, base, names, train_sets, kd_sets, dirs, lay, tracker, parent_id,
                           after_chain=bool(chain_rows))
        step("student and label-only student")
        fitted = student.run(task, found.base.replace(epochs=cfg.train.fit.epochs, label="student"), names,
                             train_sets, kd_sets, dirs, lay, tracker)
        final = fitted.student
        dep = None
        if cfg.deploy.enabled:
            step("deploy")
            with fit.child_run(tracker, "deploy", cfg.deploy.model_dump(mode="json")):
                dep = ship.run(task, lay, final.loop, final.trained.weights, kd_sets, dirs, train_sets, final.report,
                               ready.teachers, tracker)
                dep |= {"budget": found.budget, "pareto_png": found.pareto_png}
                mlflow.log_dict(dep, "deploy.json")

        store_bytes = store.size_bytes(lay.store)
        summary = {"name": cfg.name, **task.summary(teacher_rows, reference, final.report, fitted.label_only.report,
                                                     final.trained, fitted.label_only.trained, store_bytes,
                                                     kd.rows, names)}
        summary["student"]["config"] = fitted.settings
        summary |= {
            "chain": chain_rows,
            # born-again: test accuracy of generation 1..N (the last is the student above)
            **({"generations": [r["test_accuracy"] for r in chain_rows] + [final.report["test_accuracy"]]}
               if cfg.distill.generations > 1 else {}),
            "tune_trials": found.trials,
            "chosen_trial": found.chosen_trial,
            "tune_failed_trials": found.failed,
            "store_bytes": store_bytes,
            "test_rows": kd.rows["test"],
            "val_rows": kd.rows["val"],
            "deploy": dep,
            "teacher_compute": advice.teacher_compute(
                store_pass.timings(lay), sum(r.manifest["rows"] for r in ready.logits), student_inputs.rows["train"],
                found.trials, final.loop.epochs, _qat_epochs(dep), len(names)),
            "wall_seconds": time.perf_counter() - start,
            "mlflow": tracker.summary(fitted.registered),  # the tracking URI with its secrets masked
        }
        task.add_intervals(summary)
        summary["warnings"] = advice.warnings(summary, cfg, found.best)
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


def _qat_epochs(dep: dict | None) -> int:
    """Epochs of quantization-aware distillation the deploy stage ran (whether or not it shipped INT8)."""
    i8 = (dep or {}).get("int8") or (dep or {}).get("int8_not_shipped") or {}
    return i8.get("qat_epochs") or 0
