"""Single-stage commands: `kd precompute`, `kd train`, `kd tune`. Each reuses what earlier stages
left under --out (data, teacher weights, store) and records itself as an MLflow parent run."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kd_ops import store
from workflows import console, pipeline, ray_session, tasks
from workflows.config import RunConfig
from workflows.tracking import Tracker
from workflows.layout import Layout
from workflows.stages import fit, inputs, training_data
from workflows.tune import run_tune


def _setup(cfg: RunConfig, out: Path, tracking_uri, ray_address):
    task = tasks.for_config(cfg)
    if not task.stage_commands:
        raise ValueError("kd precompute / train / tune take classification configs for now; "
                         "for task: lm run the whole pipeline with `kd run`")
    lay = Layout(out)
    lay.make()
    tracker = Tracker(tracking_uri or cfg.tracking.tracking_uri, cfg.tracking.experiment)  # reachable before Ray starts
    ray_session.init_ray(ray_address, cfg.code, cfg.train.resource_wait_s)
    return lay, tracker, task


def precompute(cfg: RunConfig, out: Path, *, tracking_uri=None, ray_address=None) -> int:
    lay, tracker, task = _setup(cfg, out, tracking_uri, ray_address)
    with tracker.parent(f"{cfg.name}-precompute", cfg.model_dump(mode="json"), {"kd.out": str(lay.out)}):
        ready = pipeline.store_ready(task, lay, tracker, train_teachers=False, target=False)
        results = ready.logits + ready.extra
    t = Table(title=f"soft-label store {lay.store}")
    for c in ("teacher", "rows", "shards", "kind", "columns", "status", "seconds"):
        t.add_column(c)
    for r in results:
        cols = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in r.manifest["columns"].items())
        status = "reused" if r.reused else f"computed {r.shards_computed} shards"
        t.add_row(r.name, str(r.manifest["rows"]), str(len(r.manifest["shards"])), r.manifest["kind"], cols,
                  status, f"{r.seconds:.1f}")
    Console(file=console.out()).print(t)
    console.say(f"store size: {store.size_bytes(lay.store):,} bytes")
    return 0


def _datasets(lay, task):
    cfg = task.cfg
    if cfg.distill.assistants or cfg.distill.generations > 1:
        raise ValueError("distill.assistants / distill.generations train a chain of students, each stored as a "
                         "teacher: run them with `kd run`")
    dirs = task.data(lay)
    features = inputs.feature_plan(task, dirs, lay)
    entries = [t.name for t in cfg.teachers]
    if features and features.source == "store":
        entries.append(features.store_entry)
    for name in entries:
        if store.read_manifest(lay.store, name) is None:
            raise ValueError(f"no soft labels or features {name!r} in {lay.store}; run `kd precompute` first")
    found, base = training_data.fit_inputs(task, dirs, lay, cfg.student.factory, task.student_kwargs(cfg.teachers),
                                           cfg.train.fit, label="student", teachers=True, features=features,
                                           splits={"train": task.train_splits, "val": ("val",), "test": ("test",)})
    return found.sets, base


def train(cfg: RunConfig, out: Path, *, tracking_uri=None, ray_address=None) -> int:
    lay, tracker, task = _setup(cfg, out, tracking_uri, ray_address)
    with tracker.parent(f"{cfg.name}-train", cfg.model_dump(mode="json"), {"kd.out": str(lay.out)}):
        sets, spec = _datasets(lay, task)
        d = spec.distill
        params = {"temperature": d.temperature, "alpha": d.alpha, "teacher_weights": list(d.teacher_weights),
                  "kwargs": spec.kwargs, "method": d.method()}
        with fit.child_fit(cfg.train, tracker, "student", params, spec, {k: sets[k] for k in ("train", "val")},
                              name="student", lay=lay) as res:
            row = task.model_report(spec, res.weights, sets)
    console.say(json.dumps({"student": row, "weights": str(res.weights)}, indent=2))
    return 0


def tune(cfg: RunConfig, out: Path, *, tracking_uri=None, ray_address=None) -> int:
    lay, tracker, task = _setup(cfg, out, tracking_uri, ray_address)
    with tracker.parent(f"{cfg.name}-tune", cfg.model_dump(mode="json"), {"kd.out": str(lay.out)}) as parent_id:
        sets, spec = _datasets(lay, task)
        _, best, rows, failed = run_tune(cfg.tune, spec, [t.name for t in cfg.teachers], cfg.student.width_kwarg,
                                 {k: sets[k] for k in ("train", "val")}, storage=lay.ray, workers=fit.workers(cfg.train),
                                 tracking_uri=tracker.uri, experiment=tracker.experiment, parent_run_id=parent_id)
    console.say(json.dumps({"best": best, "trials": rows, "failed_trials": failed}, indent=2, default=str))
    return 0
