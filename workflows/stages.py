"""Pipeline stages, each usable alone (`kd precompute`, `kd train`, `kd tune`) or chained by `kd run`.

Orchestration only: the maths lives in kd_ops; Ray does the work; MLflow records it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import ray

from kd_ops import data, evaluate, models, store
from workflows import precompute as pre
from workflows import train
from workflows.config import RunConfig, TeacherConfig
from workflows.ray_session import progress_bars
from workflows.tracking import Tracker

log = logging.getLogger("kd")


@dataclass
class Layout:
    """Where a run keeps things under --out."""
    out: Path

    @property
    def data(self) -> Path: return self.out / "data"
    @property
    def teachers(self) -> Path: return self.out / "teachers"
    @property
    def store(self) -> Path: return self.out / "store"
    @property
    def ray(self) -> Path: return self.out / "ray"


def stage_data(cfg: RunConfig, lay: Layout) -> dict[str, Path]:
    """Split directories (train/val/test[/transfer]); the built-in source writes them once."""
    if cfg.data.source == "parquet":
        p = cfg.data.parquet
        dirs = {"train": p.train, "val": p.val, "test": p.test} | ({"transfer": p.transfer} if p.transfer else {})
        for d in dirs.values():
            data.parquet_files(d)
        return dirs
    m = cfg.data.mnist1d
    stamp = lay.data / "source.json"
    want = m.model_dump()
    dirs = {s: lay.data / s for s in data.SPLITS if s != "transfer" or m.transfer > 0}
    if stamp.is_file() and json.loads(stamp.read_text()) == want and all(d.is_dir() for d in dirs.values()):
        log.info("data: reusing %s", lay.data)
        return dirs
    log.info("data: generating MNIST-1D (%d labelled, %d transfer)", m.labelled, m.transfer)
    splits = data.mnist1d_splits(m.labelled, m.val, m.test, m.transfer, m.seed, m.transfer_seed)
    for name, inputs in splits.items():
        data.write_split(inputs, lay.data / name, m.rows_per_file)
    stamp.write_text(json.dumps(want))
    return dirs


def feature_columns(cfg: RunConfig) -> list[str]:
    return cfg.data.parquet.feature_columns if cfg.data.source == "parquet" and cfg.task == "classification" else ["x"]


def label_column(cfg: RunConfig) -> str:
    return cfg.data.parquet.label_column if cfg.data.source == "parquet" else "label"


def load_split(cfg: RunConfig, d: Path) -> data.Inputs:
    return data.read_inputs(d, feature_columns(cfg), label_column(cfg))


def teacher_weights_path(t: TeacherConfig, lay: Layout) -> Path:
    return t.weights or lay.teachers / f"{t.name}.safetensors"


def fit_spec(factory: str, kwargs: dict, fit, cpus_per_worker: int, **extra) -> dict[str, Any]:
    return {"factory": factory, "kwargs": kwargs, **fit.model_dump(), "cpus_per_worker": cpus_per_worker, **extra}


def stage_teachers(cfg: RunConfig, dirs: dict[str, Path], lay: Layout, tracker: Tracker | None) -> list[TeacherConfig]:
    """Teachers with weights given are checked; the others are trained on the labelled train split."""
    resolved, to_train = [], []
    for t in cfg.teachers:
        path = teacher_weights_path(t, lay)
        if t.weights is None and not path.is_file():
            to_train.append(t)
        resolved.append(t.model_copy(update={"weights": path}))
    if to_train:
        tr, va = load_split(cfg, dirs["train"]), load_split(cfg, dirs["val"])
        ds = {"train": train.make_dataset(tr.x, tr.y), "val": train.make_dataset(va.x, va.y, shuffle_seed=None)}
        for t in to_train:
            models.build(t.factory, t.kwargs)  # fail fast on a bad factory, before Ray Train starts
            loop = fit_spec(t.factory, t.kwargs, t.fit, cfg.train.cpus_per_worker, train_rows=len(tr.x),
                            label=f"teacher {t.name}")
            with _child(tracker, f"teacher-{t.name}", loop) as run_id:
                loop["mlflow"] = tracker and {"tracking_uri": tracker.uri, "run_id": run_id}
                res = train.fit(loop, ds, name=f"teacher-{t.name}", storage=lay.ray,
                                num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu)
                models.save_weights(models.load_weights(models.build(t.factory, t.kwargs), res.weights),
                                    teacher_weights_path(t, lay))
                if tracker:
                    mlflow.log_artifact(str(teacher_weights_path(t, lay)), "weights")
    return resolved


class _NullRun:
    def __enter__(self): return None
    def __exit__(self, *a): return False


def _child(tracker: Tracker | None, name: str, params: dict | None = None):
    return tracker.child(name, params) if tracker else _NullRun()


def stage_precompute(cfg: RunConfig, teachers: list[TeacherConfig], dirs: dict[str, Path], lay: Layout,
                     tracker: Tracker | None) -> list[pre.TeacherResult]:
    pc = cfg.precompute
    with _child(tracker, "precompute", pc.model_dump()), progress_bars():
        lm = cfg.task == "lm"
        results = pre.precompute(teachers, dirs, lay.store, feature_columns=feature_columns(cfg), **pre.options(pc),
                                 top_k=pc.top_k if lm else None, tail_samples=pc.tail_samples if lm else 0,
                                 input_dtype="int64" if lm else "float32",
                                 extra=None if lm else {"num_classes": cfg.data.num_classes})
        if tracker:
            for r in results:
                mlflow.log_dict(r.manifest, f"manifests/{r.name}.json")
                mlflow.log_metric(f"{r.name}.seconds", r.seconds)
            mlflow.log_metric("store_bytes", store.size_bytes(lay.store))
            mlflow.set_tag("kd.reused", ",".join(r.name for r in results if r.reused) or "none")
    return results


@dataclass
class Prepared:
    """Inputs joined with the store's logits by id, as arrays and as Ray datasets."""
    splits: dict[str, data.Inputs]
    logits: dict[str, np.ndarray]          # split → [M, N, C] float16
    kd_datasets: dict[str, ray.data.Dataset]
    train_rows: int


def prepare(cfg: RunConfig, dirs: dict[str, Path], lay: Layout) -> Prepared:
    names = [t.name for t in cfg.teachers]
    splits = {s: load_split(cfg, d) for s, d in dirs.items()}
    logits = {s: store.soft_labels(lay.store, names, inp.ids)["logits"] for s, inp in splits.items()}
    tr = splits["train"]
    x, y, t = tr.x, tr.y, logits["train"]
    if "transfer" in splits:  # transfer rows carry no label (−1): soft term only
        tf = splits["transfer"]
        y_tf = tf.y if tf.y is not None else np.full(len(tf.x), -1, np.int64)
        x, y, t = np.concatenate([x, tf.x]), np.concatenate([y, y_tf]), np.concatenate([t, logits["transfer"]], 1)
    va = splits["val"]
    kd = {"train": train.make_dataset(x, y, {"logits": t}),
          "val": train.make_dataset(va.x, va.y, {"logits": logits["val"]}, shuffle_seed=None)}
    return Prepared(splits, logits, kd, len(x))


def teacher_weight_list(cfg: RunConfig) -> list[float]:
    names = [t.name for t in cfg.teachers]
    raw = [cfg.distill.teacher_weights.get(n, 0.0) for n in names] if cfg.distill.teacher_weights else [1.0] * len(names)
    return [w / sum(raw) for w in raw]


def distill_spec(cfg: RunConfig, prep: Prepared) -> dict[str, Any]:
    s, d = cfg.student, cfg.distill
    return fit_spec(s.factory, s.kwargs, cfg.train.fit, cfg.train.cpus_per_worker, train_rows=prep.train_rows,
                    temperature=d.temperature, alpha=d.alpha, teacher_weights=teacher_weight_list(cfg), label="student")


def test_report(factory: str, kwargs: dict, weights: Path, prep: Prepared, ens_test: np.ndarray) -> tuple[Any, dict]:
    model = models.load_weights(models.build(factory, kwargs), weights)
    te = prep.splits["test"]
    logits = evaluate.predict_logits(model, te.x)
    return model, {"params": models.num_params(model), "test_accuracy": evaluate.accuracy(logits, te.y),
                   "test_agreement": evaluate.agreement(logits, ens_test)}
