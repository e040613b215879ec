"""Precompute: Ray Data runs each teacher over every input split and writes raw logits to the store.

read_parquet → select id + features → map_batches(TeacherPredictor, actor pool) → write_parquet
into a staging directory → kd_ops.store.publish (row/id checks, manifest, atomic rename). A
teacher whose manifest already matches its weights, the inputs and the settings is reused.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from kd_ops import data, models, store

log = logging.getLogger("kd")


@dataclass
class TeacherSpec:
    """How to build one teacher anywhere: factory + kwargs, optional safetensors weights."""
    name: str
    factory: str
    kwargs: dict[str, Any]
    weights: Path | None
    weight_files: list[Path]     # what the fingerprint hashes

    @classmethod
    def of(cls, t) -> "TeacherSpec":
        if t.hf_dir is not None:
            files = sorted(Path(t.hf_dir).glob("*.safetensors")) or sorted(Path(t.hf_dir).glob("*.bin"))
            return cls(t.name, "kd_ops.lm:causal_lm", {"path": str(t.hf_dir)}, None, files)
        if t.weights is None or not Path(t.weights).is_file():
            raise ValueError(f"teacher {t.name!r}: weights file {t.weights} does not exist")
        return cls(t.name, t.factory, t.kwargs, Path(t.weights), [Path(t.weights)])

    def build(self) -> torch.nn.Module:
        model = models.build(self.factory, self.kwargs)
        return models.load_weights(model, self.weights) if self.weights is not None else model


class TeacherPredictor:
    """Ray Data callable class: loads one teacher once per actor, maps Arrow batches to stored arrays."""

    def __init__(self, spec: TeacherSpec, feature_columns: list[str], input_dtype: str, top_k: int | None,
                 device: str, threads: int, teacher_dtype: str = "float32"):
        torch.set_num_threads(max(1, threads))
        self.device = torch.device(device)
        self.model = spec.build().to(self.device, getattr(torch, teacher_dtype)).eval()
        self.feature_columns, self.input_dtype, self.top_k = feature_columns, np.dtype(input_dtype), top_k

    def __call__(self, batch: pa.Table) -> pa.Table:
        x = torch.from_numpy(data.features(batch, self.feature_columns, dtype=self.input_dtype))
        with torch.inference_mode():
            logits = self.model(x.to(self.device, non_blocking=True))
            return store.shard_table(batch.column("id"), store.teacher_arrays(logits, self.top_k))


@dataclass
class TeacherResult:
    name: str
    reused: bool
    manifest: dict
    seconds: float


def probe(spec: TeacherSpec, sample: np.ndarray, top_k: int | None) -> dict[str, dict[str, Any]]:
    """Build the teacher on the driver and run it on a sample: a bad factory, weights file or input
    fails here with a clear message instead of inside a Ray actor. Returns the store column spec."""
    model = spec.build().eval()
    with torch.inference_mode():
        return store.column_spec(store.teacher_arrays(model(torch.from_numpy(sample)), top_k))


def count_rows(split_dirs: dict[str, Path]) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for d in split_dirs.values() for f in data.parquet_files(d))


def precompute(teachers, split_dirs: dict[str, Path], store_dir: Path, *, feature_columns: list[str],
               batch_size: int, num_actors: int, use_gpu: bool, top_k: int | None = None,
               input_dtype: str = "float32", teacher_dtype: str = "float32",
               extra: dict[str, Any] | None = None) -> list[TeacherResult]:
    """Run every teacher over every split in `split_dirs`; returns one result per teacher."""
    input_fps = {split: data.fingerprint(d) for split, d in sorted(split_dirs.items())}
    for split, d in split_dirs.items():  # the id contract, checked once before any teacher runs
        data.validate_ids(data.read_table(d, columns=["id"]), str(d))
    expected = count_rows(split_dirs)
    first_file = data.parquet_files(next(iter(split_dirs.values())))[0]  # two rows to probe with, not a whole split
    first = pq.read_table(first_file, columns=feature_columns).slice(0, 2)
    sample = data.features(first, feature_columns, "input", np.dtype(input_dtype))
    kind = "full" if top_k is None else "topk"
    settings = {"kind": kind, "top_k": top_k, "teacher_dtype": teacher_dtype}
    results = []
    for t in teachers:
        start = time.perf_counter()
        spec = TeacherSpec.of(t)
        fp = models.teacher_fingerprint(spec.factory, spec.kwargs, spec.weight_files)
        if store.is_current(store_dir, t.name, fp, input_fps, settings):  # reused without building the teacher
            log.info("precompute %s: store is current (same weights, inputs and settings), reusing it", t.name)
            results.append(TeacherResult(t.name, True, store.read_manifest(store_dir, t.name), 0.0))
            continue
        columns = probe(spec, sample, top_k)
        if extra and "num_classes" in extra and columns["logits"]["shape"] != [extra["num_classes"]]:
            raise ValueError(f"teacher {t.name!r} outputs logits of shape {columns['logits']['shape']} per row, "
                             f"but data.num_classes is {extra['num_classes']}")
        log.info("precompute %s: %d rows from %s", t.name, expected, ", ".join(split_dirs))
        staging = store.staging_dir(store_dir, t.name)
        try:
            ds = ray.data.read_parquet([str(d) for d in split_dirs.values()]).select_columns(["id", *feature_columns])
            ds = ds.map_batches(
                TeacherPredictor,
                fn_constructor_kwargs=dict(spec=spec, feature_columns=feature_columns, input_dtype=input_dtype,
                                           top_k=top_k, device="cuda" if use_gpu else "cpu", threads=1,
                                           teacher_dtype=teacher_dtype),
                batch_size=batch_size, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors),
                num_gpus=1 if use_gpu else 0, num_cpus=1)
            ds.write_parquet(str(staging), **store.parquet_options(columns))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        manifest = store.publish(staging, store_dir, t.name, kind=kind, columns=columns, expected_rows=expected,
                                 teacher_fp=fp, input_fps=input_fps,
                                 extra={**settings, **(extra or {}), "factory": spec.factory, "kwargs": spec.kwargs,
                                        "weights": [str(f) for f in spec.weight_files]})
        results.append(TeacherResult(t.name, False, manifest, time.perf_counter() - start))
    return results
