"""Precompute: Ray Data runs each teacher over every input split and writes raw logits to the store.

read_parquet → select id + features → map_batches(TeacherPredictor, actor pool) → write_parquet
into a staging directory → kd_ops.store.publish (row/id checks, manifest, atomic rename). A
teacher whose manifest already matches its weights, the inputs and the settings is reused.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
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
    """Ray Data callable class: loads one teacher once per actor, maps Arrow batches to stored arrays.

    Ray Data may run several calls of one actor at once (`calls_per_actor`, threads): while one
    batch is in the teacher, another is read, copied and encoded. On CUDA each thread has its own
    stream and copies the kept arrays into pinned host memory without blocking, so one batch's
    copies overlap the next batch's forward instead of stalling the GPU.
    """

    def __init__(self, spec: TeacherSpec, feature_columns: list[str], input_dtype: str, top_k: int | None,
                 device: str, threads: int, teacher_dtype: str = "float32", tail_samples: int = 0):
        torch.set_num_threads(max(1, threads))
        self.device = torch.device(device)
        self.model = spec.build().to(self.device, getattr(torch, teacher_dtype)).eval()
        self.feature_columns, self.input_dtype, self.top_k = feature_columns, np.dtype(input_dtype), top_k
        self.tail_samples = tail_samples
        self._local = threading.local()

    def _stream(self):
        if self.device.type != "cuda":
            return None
        if getattr(self._local, "stream", None) is None:
            self._local.stream = torch.cuda.Stream(self.device)
        return self._local.stream

    def _generator(self, batch: pa.Table) -> torch.Generator | None:
        """Tail draws seeded by the batch's ids, so a rerun over the same batches stores the same draws."""
        if not self.tail_samples:
            return None
        ids = np.ascontiguousarray(batch.column("id").to_numpy(zero_copy_only=False).astype(str)).tobytes()
        seed = int.from_bytes(hashlib.blake2b(ids, digest_size=8).digest(), "little") >> 1
        return torch.Generator(self.device).manual_seed(seed)

    def __call__(self, batch: pa.Table) -> pa.Table:
        x = torch.from_numpy(data.features(batch, self.feature_columns, dtype=self.input_dtype))
        stream = self._stream()
        with torch.inference_mode(), (torch.cuda.stream(stream) if stream else contextlib.nullcontext()):
            if stream is not None:
                x = x.pin_memory()
            kept = store.teacher_tensors(self.model(x.to(self.device, non_blocking=True)), self.top_k,
                                         self.tail_samples, self._generator(batch))
            if stream is not None:
                # the numpy views below keep these pinned buffers alive until Arrow is done with them
                kept = {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                        for k, t in kept.items()}
                stream.synchronize()
        return store.shard_table(batch.column("id"), store.host_arrays(kept))


def actor_threads(threads: int | None, num_actors: int, use_gpu: bool) -> int:
    """Torch intra-op threads per actor: as given, else the node's cores shared by the actors
    (CPU teachers), or 1 (a GPU teacher's host work is copies and encoding)."""
    if threads is not None:
        return threads
    return 1 if use_gpu else max(1, (os.cpu_count() or 1) // num_actors)


def read_inputs(paths: list[str]) -> ray.data.Dataset:
    """read_parquet through Ray Data's V1 Parquet datasource. Measured here (Ray 2.60, 62 files of
    8k rows): the V2 default took 14 s and packed every file into one block, so one actor got all
    the work and nothing overlapped; V1 read the same files in 3.6 s as 124 blocks."""
    ctx = ray.data.DataContext.get_current()
    before, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(paths)
    finally:
        ctx.use_datasource_v2 = before


def options(pc) -> dict[str, Any]:
    """`precompute` keyword arguments from a PrecomputeConfig."""
    return dict(batch_size=pc.batch_size, num_actors=pc.num_actors, use_gpu=pc.use_gpu, teacher_dtype=pc.teacher_dtype,
                threads=pc.threads_per_actor, calls_per_actor=pc.calls_per_actor)


@dataclass
class TeacherResult:
    name: str
    reused: bool
    manifest: dict
    seconds: float


def probe(spec: TeacherSpec, sample: np.ndarray, top_k: int | None, tail_samples: int = 0) -> dict[str, dict[str, Any]]:
    """Build the teacher on the driver and run it on a sample: a bad factory, weights file or input
    fails here with a clear message instead of inside a Ray actor. Returns the store column spec."""
    model = spec.build().eval()
    with torch.inference_mode():
        return store.column_spec(store.teacher_arrays(model(torch.from_numpy(sample)), top_k, tail_samples))


def count_rows(split_dirs: dict[str, Path]) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for d in split_dirs.values() for f in data.parquet_files(d))


def precompute(teachers, split_dirs: dict[str, Path], store_dir: Path, *, feature_columns: list[str],
               batch_size: int, num_actors: int, use_gpu: bool, top_k: int | None = None,
               input_dtype: str = "float32", teacher_dtype: str = "float32", threads: int | None = None,
               calls_per_actor: int = 2, tail_samples: int = 0,
               extra: dict[str, Any] | None = None) -> list[TeacherResult]:
    """Run every teacher over every split in `split_dirs`; returns one result per teacher.

    The actor pool reserves one CPU per actor for Ray's scheduler and runs the teacher with
    `actor_threads(threads, …)` torch threads; reading and writing run in Ray tasks beside it."""
    input_fps = {split: data.fingerprint(d) for split, d in sorted(split_dirs.items())}
    for split, d in split_dirs.items():  # the id contract, checked once before any teacher runs
        data.validate_ids(data.read_table(d, columns=["id"]), str(d))
    expected = count_rows(split_dirs)
    first_file = data.parquet_files(next(iter(split_dirs.values())))[0]  # two rows to probe with, not a whole split
    first = pq.read_table(first_file, columns=feature_columns).slice(0, 2)
    sample = data.features(first, feature_columns, "input", np.dtype(input_dtype))
    kind = "full" if top_k is None else "topk"
    if tail_samples and top_k is None:
        raise ValueError("tail_samples needs top_k: full logits have no tail to sample")
    settings = {"kind": kind, "top_k": top_k, "tail_samples": tail_samples, "teacher_dtype": teacher_dtype}
    results = []
    for t in teachers:
        start = time.perf_counter()
        spec = TeacherSpec.of(t)
        fp = models.teacher_fingerprint(spec.factory, spec.kwargs, spec.weight_files)
        if store.is_current(store_dir, t.name, fp, input_fps, settings):  # reused without building the teacher
            log.info("precompute %s: store is current (same weights, inputs and settings), reusing it", t.name)
            results.append(TeacherResult(t.name, True, store.read_manifest(store_dir, t.name), 0.0))
            continue
        columns = probe(spec, sample, top_k, tail_samples)
        if extra and "num_classes" in extra and columns["logits"]["shape"] != [extra["num_classes"]]:
            raise ValueError(f"teacher {t.name!r} outputs logits of shape {columns['logits']['shape']} per row, "
                             f"but data.num_classes is {extra['num_classes']}")
        log.info("precompute %s: %d rows from %s", t.name, expected, ", ".join(split_dirs))
        staging = store.staging_dir(store_dir, t.name)
        try:
            ds = read_inputs([str(d) for d in split_dirs.values()]).select_columns(["id", *feature_columns])
            ds = ds.map_batches(
                TeacherPredictor,
                fn_constructor_kwargs=dict(spec=spec, feature_columns=feature_columns, input_dtype=input_dtype,
                                           top_k=top_k, device="cuda" if use_gpu else "cpu",
                                           threads=actor_threads(threads, num_actors, use_gpu),
                                           teacher_dtype=teacher_dtype, tail_samples=tail_samples),
                batch_size=batch_size, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(
                    min_size=1, max_size=num_actors, max_concurrent_calls_per_actor=calls_per_actor,
                    # GPU: calls overlap inside the UDF (each on its own stream); CPU: only the
                    # reading and output building overlap, the teacher already uses every core
                    enable_true_multi_threading=use_gpu),
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
