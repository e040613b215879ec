"""`kd run`: data → teachers → precompute → tune → final student → test evaluation → register →
summary. One MLflow parent run with a nested child run per stage and per tune trial."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from kd_ops import evaluate, models, store
from workflows import ray_session, stages, train
from workflows.config import RunConfig
from workflows.report import print_summary
from workflows.tracking import Tracker
from workflows.tune import run_tune

log = logging.getLogger("kd")


def run(cfg: RunConfig, out: Path, *, tracking_uri: str | None = None, ray_address: str | None = None) -> dict[str, Any]:
    if cfg.task == "lm":
        from workflows.lm_pipeline import run_lm

        return run_lm(cfg, out, tracking_uri=tracking_uri, ray_address=ray_address)
    start = time.perf_counter()
    lay = stages.Layout(Path(out).resolve())
    lay.out.mkdir(parents=True, exist_ok=True)
    (lay.out / "summary.json").unlink(missing_ok=True)  # a summary only ever describes a finished run
    ray_session.init_ray(ray_address)
    tracker = Tracker(tracking_uri or cfg.tracking.tracking_uri, cfg.tracking.experiment)
    names = [t.name for t in cfg.teachers]
    with tracker.parent(cfg.name, cfg.model_dump(mode="json"), {"kd.out": str(lay.out)}) as parent_id:
        mlflow.log_dict(cfg.model_dump(mode="json"), "config.json")
        step("data")
        dirs = stages.stage_data(cfg, lay)
        step("teachers")
        teachers = stages.stage_teachers(cfg, dirs, lay, tracker)
        step("precompute")
        stages.stage_precompute(cfg, teachers, dirs, lay, tracker)
        prep = stages.prepare(cfg, dirs, lay)

        te = prep.splits["test"]
        teacher_rows = []
        for i, t in enumerate(teachers):
            model = models.build(t.factory, t.kwargs)
            teacher_rows.append({"name": t.name, "params": models.num_params(model),
                                 "test_accuracy": evaluate.accuracy(prep.logits["test"][i].astype(np.float32), te.y)})
        uniform = np.full(len(names), 1 / len(names))
        ens_test = evaluate.ensemble_probs_np(prep.logits["test"], uniform)
        ens_acc = evaluate.accuracy(ens_test, te.y)
        mlflow.log_metrics({"ensemble_test_accuracy": ens_acc,
                            **{f"teacher.{r['name']}.test_accuracy": r["test_accuracy"] for r in teacher_rows}})

        base = stages.distill_spec(cfg, prep)
        tune_rows: list[dict] = []
        if cfg.tune.enabled:
            step("tune")
            base, best, tune_rows = run_tune(cfg.tune, base, names, cfg.student.width_kwarg, prep.kd_datasets,
                                             storage=lay.ray, num_workers=cfg.train.num_workers,
                                             use_gpu=cfg.train.use_gpu, tracking_uri=tracker.uri,
                                             experiment=tracker.experiment, parent_run_id=parent_id)
            log.info("tune: best %s", best)
        base |= {"epochs": cfg.train.fit.epochs, "label": "student"}

        step("student")
        chosen = {k: base[k] for k in ("temperature", "alpha", "teacher_weights")} | {"student_kwargs": base["kwargs"]}
        with tracker.child("student", chosen | {"epochs": base["epochs"]}) as run_id:
            res = train.fit(base | {"mlflow": {"tracking_uri": tracker.uri, "run_id": run_id}}, prep.kd_datasets,
                            name="student", storage=lay.ray, num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu)
            student, srow = stages.test_report(base["factory"], base["kwargs"], res.weights, prep, ens_test)
            mlflow.log_metrics({f"test_{k}": v for k, v in srow.items() if k != "params"} | {"params": srow["params"]})
            mlflow.log_artifact(str(res.weights), "weights")
            registered = tracker.register(student, cfg.tracking.registered_model, te.x[:2])

        step("label-only student")
        lo = stages.fit_spec(base["factory"], base["kwargs"], cfg.train.label_only_fit, cfg.train.cpus_per_worker,
                             train_rows=len(prep.splits["train"].x), label="label-only")
        tr, va = prep.splits["train"], prep.splits["val"]
        lo_ds = {"train": train.make_dataset(tr.x, tr.y), "val": train.make_dataset(va.x, va.y, shuffle_seed=None)}
        with tracker.child("label-only-student", {"student_kwargs": lo["kwargs"], **cfg.train.label_only_fit.model_dump()}) as run_id:
            res_lo = train.fit(lo | {"mlflow": {"tracking_uri": tracker.uri, "run_id": run_id}}, lo_ds,
                               name="label-only", storage=lay.ray, num_workers=cfg.train.num_workers,
                               use_gpu=cfg.train.use_gpu)
            _, lorow = stages.test_report(lo["factory"], lo["kwargs"], res_lo.weights, prep, ens_test)
            mlflow.log_metrics({f"test_{k}": v for k, v in lorow.items() if k != "params"})

        summary = {
            "name": cfg.name,
            "teachers": teacher_rows,
            "ensemble_test_accuracy": ens_acc,
            "student": srow | {"val_accuracy": res.metrics["val_accuracy"], "config": chosen},
            "label_only_student": lorow,
            "student_vs_ensemble": srow["test_accuracy"] / ens_acc,
            "tune_trials": tune_rows,
            "store_bytes": store.size_bytes(lay.store),
            "wall_seconds": time.perf_counter() - start,
            "mlflow": {"tracking_uri": tracker.uri, "experiment": tracker.experiment, "parent_run_id": parent_id,
                       "registered_model": registered},
        }
        mlflow.log_metrics({"student_test_accuracy": srow["test_accuracy"], "wall_seconds": summary["wall_seconds"]})
        mlflow.log_dict(summary, "summary.json")
    write_summary(summary, lay)
    return summary


def write_summary(summary: dict[str, Any], lay: stages.Layout) -> None:
    """summary.json appears only when the run finished (tmp file + rename), then the table."""
    tmp = lay.out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(lay.out / "summary.json")
    print_summary(summary)


def step(name: str) -> None:
    print(f"\n==> {name}", flush=True)
