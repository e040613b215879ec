"""Single-stage commands: `kd precompute`, `kd train`, `kd tune`. Each reuses what earlier stages
left under --out (data, teacher weights, store) and records itself as an MLflow parent run."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kd_ops import store
from workflows import ray_session, stages, train as train_mod
from workflows.config import RunConfig
from workflows.tracking import Tracker
from workflows.tune import run_tune


def _setup(cfg: RunConfig, out: Path, tracking_uri, ray_address):
    if cfg.task == "lm":
        raise ValueError("kd precompute / train / tune take classification configs for now; "
                         "for task: lm run the whole pipeline with `kd run`")
    lay = stages.Layout(Path(out).resolve())
    lay.out.mkdir(parents=True, exist_ok=True)
    ray_session.init_ray(ray_address)
    return lay, Tracker(tracking_uri or cfg.tracking.tracking_uri, cfg.tracking.experiment)


def _teachers_with_weights(cfg: RunConfig, lay: stages.Layout):
    teachers = [t.model_copy(update={"weights": stages.teacher_weights_path(t, lay)}) for t in cfg.teachers]
    missing = [t.name for t in teachers if not Path(t.weights).is_file()]
    if missing:
        raise ValueError(f"teachers {missing} have no weights file (looked in teachers[].weights and {lay.teachers}); "
                         "give weights in the config or run `kd run` once to train them")
    return teachers


def precompute(cfg: RunConfig, out: Path, *, tracking_uri=None, ray_address=None) -> int:
    lay, tracker = _setup(cfg, out, tracking_uri, ray_address)
    with tracker.parent(f"{cfg.name}-precompute", cfg.model_dump(mode="json"), {"kd.out": str(lay.out)}):
        dirs = stages.stage_data(cfg, lay)
        results = stages.stage_precompute(cfg, _teachers_with_weights(cfg, lay), dirs, lay, tracker)
    t = Table(title=f"soft-label store {lay.store}")
    for c in ("teacher", "rows", "kind", "columns", "status", "seconds"):
        t.add_column(c)
    for r in results:
        cols = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in r.manifest["columns"].items())
        t.add_row(r.name, str(r.manifest["rows"]), r.manifest["kind"], cols,
                  "reused" if r.reused else "computed", f"{r.seconds:.1f}")
    Console().print(t)
    print(f"store size: {store.size_bytes(lay.store):,} bytes")
    return 0


def _prepared(cfg, lay):
    dirs = stages.stage_data(cfg, lay)
    for t in cfg.teachers:
        if store.read_manifest(lay.store, t.name) is None:
            raise ValueError(f"no soft labels for teacher {t.name!r} in {lay.store}; run `kd precompute` first")
    return stages.prepare(cfg, dirs, lay)


def train(cfg: RunConfig, out: Path, *, tracking_uri=None, ray_address=None) -> int:
    lay, tracker = _setup(cfg, out, tracking_uri, ray_address)
    with tracker.parent(f"{cfg.name}-train", cfg.model_dump(mode="json"), {"kd.out": str(lay.out)}):
        prep = _prepared(cfg, lay)
        spec = stages.distill_spec(cfg, prep)
        with tracker.child("student", {k: spec[k] for k in ("temperature", "alpha", "teacher_weights", "kwargs")}) as rid:
            res = train_mod.fit(spec | {"mlflow": {"tracking_uri": tracker.uri, "run_id": rid}}, prep.kd_datasets,
                                name="student", storage=lay.ray, num_workers=cfg.train.num_workers,
                                use_gpu=cfg.train.use_gpu)
            from kd_ops import evaluate

            names = [t.name for t in cfg.teachers]
            ens = evaluate.ensemble_probs_np(prep.logits["test"], [1 / len(names)] * len(names))
            _, row = stages.test_report(spec["factory"], spec["kwargs"], res.weights, prep, ens)
    print(json.dumps({"student": row, "weights": str(res.weights)}, indent=2))
    return 0


def tune(cfg: RunConfig, out: Path, *, tracking_uri=None, ray_address=None) -> int:
    lay, tracker = _setup(cfg, out, tracking_uri, ray_address)
    with tracker.parent(f"{cfg.name}-tune", cfg.model_dump(mode="json"), {"kd.out": str(lay.out)}) as parent_id:
        prep = _prepared(cfg, lay)
        _, best, rows = run_tune(cfg.tune, stages.distill_spec(cfg, prep), [t.name for t in cfg.teachers],
                                 cfg.student.width_kwarg, prep.kd_datasets, storage=lay.ray,
                                 num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                 tracking_uri=tracker.uri, experiment=tracker.experiment, parent_run_id=parent_id)
    print(json.dumps({"best": best, "trials": rows}, indent=2, default=str))
    return 0
