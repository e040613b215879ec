"""Precompute: Ray Data runs each teacher over every input split and writes raw logits to the store.

read_parquet(id + features) → map_batches(TeacherPredictor, actor pool) → write_parquet into a
staging directory → kd_ops.store.publish (row/id checks, manifest, atomic rename). A teacher
whose manifest already matches its weights and the inputs is reused, not recomputed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from kd_ops import data, models, store

log = logging.getLogger("kd")


class TeacherPredictor:
    """Ray Data callable class: loads one teacher once per actor, maps Arrow batches to logits."""

    def __init__(self, factory: str, kwargs: dict, weights: str, feature_columns: list[str], device: str, threads: int):
        torch.set_num_threads(max(1, threads))
        self.device = torch.device(device)
        self.model = models.load_weights(models.build(factory, kwargs), weights).to(self.device).eval()
        self.feature_columns = feature_columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        x = torch.from_numpy(data.features(batch, self.feature_columns)).to(self.device, non_blocking=True)
        with torch.inference_mode():
            logits = self.model(x).to(torch.float16).cpu().numpy()
        return store.shard_table(batch.column("id"), logits)


@dataclass
class TeacherResult:
    name: str
    reused: bool
    manifest: dict
    seconds: float


def check_teacher(t) -> int:
    """Build the teacher and load its weights on the driver first: a bad factory or weights file
    fails here with a clear message instead of inside a Ray actor. Returns its parameter count."""
    model = models.load_weights(models.build(t.factory, t.kwargs), t.weights)
    return models.num_params(model)


def count_rows(split_dirs: dict[str, Path]) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for d in split_dirs.values() for f in data.parquet_files(d))


def precompute(teachers, split_dirs: dict[str, Path], store_dir: Path, *, feature_columns: list[str],
               num_classes: int, batch_size: int, num_actors: int, use_gpu: bool) -> list[TeacherResult]:
    """Run every teacher over every split in `split_dirs`; returns one result per teacher."""
    import time

    input_fps = {split: data.fingerprint(d) for split, d in sorted(split_dirs.items())}
    for split, d in split_dirs.items():  # the id contract, checked once before any teacher runs
        data.validate_ids(data.read_table(d, columns=["id"]), str(d))
    expected = count_rows(split_dirs)
    results = []
    for t in teachers:
        start = time.perf_counter()
        if t.weights is None or not Path(t.weights).is_file():
            raise ValueError(f"teacher {t.name!r}: weights file {t.weights} does not exist")
        fp = models.teacher_fingerprint(t.factory, t.kwargs, t.weights)
        if store.is_current(store_dir, t.name, fp, input_fps):  # reused without building the teacher
            log.info("precompute %s: store is current (same weights and inputs), reusing it", t.name)
            results.append(TeacherResult(t.name, True, store.read_manifest(store_dir, t.name), 0.0))
            continue
        check_teacher(t)
        log.info("precompute %s: %d rows from %s", t.name, expected, ", ".join(split_dirs))
        staging = store.staging_dir(store_dir, t.name)
        try:
            ds = ray.data.read_parquet([str(d) for d in split_dirs.values()]).select_columns(["id", *feature_columns])
            ds = ds.map_batches(
                TeacherPredictor,
                fn_constructor_kwargs=dict(factory=t.factory, kwargs=t.kwargs, weights=str(t.weights),
                                           feature_columns=feature_columns, device="cuda" if use_gpu else "cpu",
                                           threads=1),
                batch_size=batch_size, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors),
                num_gpus=1 if use_gpu else 0, num_cpus=1)
            ds.write_parquet(str(staging))
        except BaseException:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
            raise
        manifest = store.publish(staging, store_dir, t.name, num_classes=num_classes, expected_rows=expected,
                                 teacher_fp=fp, input_fps=input_fps,
                                 extra={"factory": t.factory, "kwargs": t.kwargs, "weights": str(t.weights)})
        results.append(TeacherResult(t.name, False, manifest, time.perf_counter() - start))
    return results
