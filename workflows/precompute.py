"""Precompute: Ray Data runs every teacher over every input file and writes raw logits to the store.

The work unit is one input file: an actor pool (all teachers in each actor) reads it once, writes
one shard per teacher with the file's rows in its order (the store is co-partitioned with the
inputs, so training zips a file with its shards, no join), then commits each shard
(kd_ops.store.commit). `publish` writes a teacher's manifest last, once every file is committed.

Why not Ray Data's own checkpointing (`DataContext.checkpoint_config`, beta): it filters rows by
id on the way into a `write_parquet`, whose output files follow Ray's blocks, not the input
files, so it cannot give a store with one shard per input file in the same row order; and the
commit protocol here is the one the manifest needs anyway. A killed driver or node loses at most
the files in flight; the rerun computes only the files without a matching commit.

Input files are identified by metadata (size, rows, footer hash); the inputs themselves (ids
unique, values finite, labels in range) are checked before by `workflows.validate`. A teacher whose manifest matches its
weights, the input files and the settings is reused without being built.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from kd_ops import augment, data, feature_kd, lm, models, store
from kd_ops.fsio import Loc

log = logging.getLogger("kd")


@dataclass
class TeacherSpec:
    """How to build one teacher anywhere: factory + kwargs, optional safetensors weights."""
    name: str
    factory: str
    kwargs: dict[str, Any]
    weights: Loc | None          # a local path or URI
    weight_files: list[Loc]      # what the fingerprint hashes
    layer: str | None = None     # store this layer's output (teacher features), not the logits
    pool: int | None = None      # ... average-pooled to this many positions
    view: int = 0                # run on augmented view `view` of the inputs (0: the inputs)
    augment: str | None = None   # ... made by this function (import path) with this seed
    augment_seed: int = 0

    @classmethod
    def of(cls, t) -> "TeacherSpec":
        if isinstance(t, TeacherSpec):
            return t
        if t.hf_dir is not None:
            files = lm.weight_files(t.hf_dir, t.allow_pickle)
            return cls(t.name, "kd_ops.lm:causal_lm", hf_kwargs(t), None, [Loc.of(f) for f in files])
        weights = Loc.of(t.weights) if t.weights is not None else None
        if weights is None or not weights.is_file():
            raise ValueError(f"teacher {t.name!r}: weights file {t.weights} does not exist")
        return cls(t.name, t.factory, t.kwargs, weights, [weights])

    def build(self) -> torch.nn.Module:
        model = models.build(self.factory, self.kwargs)
        model = models.load_weights(model, self.weights) if self.weights is not None else model
        return model if self.layer is None else feature_kd.LayerOutput(model, self.layer, self.pool)

    def features(self, layer: str, pool: int | None) -> "TeacherSpec":
        """This teacher as a source of `layer`'s outputs: stored as its own store entry."""
        return dataclasses.replace(self, name=feature_entry(self.name, layer, pool), layer=layer, pool=pool)

    def viewed(self, view: int, augment: str, seed: int) -> "TeacherSpec":
        """This teacher on augmented view `view` of every input: its own store entry."""
        return dataclasses.replace(self, name=store.view_entry(self.name, view), view=view, augment=augment, augment_seed=seed)

    def fingerprint(self) -> str:
        kwargs = self.kwargs if self.layer is None else {**self.kwargs, "__layer__": self.layer, "__pool__": self.pool}
        if self.view:
            kwargs = {**kwargs, "__view__": [self.view, self.augment, self.augment_seed]}
        return models.teacher_fingerprint(self.factory, kwargs, self.weight_files)


def hf_kwargs(t) -> dict[str, Any]:
    """`kd_ops.lm:causal_lm` kwargs of a Hugging Face teacher (allow_pickle only where opted in, so
    the fingerprint of a safetensors teacher is unchanged)."""
    return {"path": str(t.hf_dir)} | ({"allow_pickle": True} if t.allow_pickle else {})


def feature_entry(teacher: str, layer: str, pool: int | None) -> str:
    """The store entry holding `teacher`'s `layer` outputs (a name that is also a safe directory name)."""
    return f"{teacher}.features.{re.sub(r'[^A-Za-z0-9_.-]', '_', layer)}" + (f".pool{pool}" if pool else "")


class ShardWriter:
    """Ray Data callable class: each call takes input files (units) and writes, for every teacher
    that lacks it, the shard of that file (same rows, same order) and then its commit record.

    All teachers live in one actor, so the inputs are read once for all of them. A call holds
    one record batch of one file at a time, whatever the file's size. Ray Data may run several
    calls of one actor at once (`calls_per_actor`, threads): on CUDA each thread has its own
    stream and copies the kept arrays into pinned host memory without blocking, so one batch's
    copies overlap the next batch's forward instead of stalling the GPU.
    """

    def __init__(self, specs: list[TeacherSpec], plan: "Plan", feature_columns: list[str], input_dtype: str,
                 top_k: int | None, device: str, threads: int, teacher_dtype: str = "float32",
                 tail_samples: int = 0, batch_size: int = 4096):
        torch.set_num_threads(max(1, threads))
        self.device = torch.device(device)
        built: dict[str, torch.nn.Module] = {}
        self.models = {}
        for s in specs:  # a teacher's views share its one model: the same weights, K-1 fewer copies
            key = repr(dataclasses.replace(s, name="", view=0, augment=None, augment_seed=0))
            if key not in built:
                built[key] = s.build().to(self.device, getattr(torch, teacher_dtype)).eval()
            self.models[s.name] = built[key]
        self.views = {s.name: (s.view, models.resolve(s.augment), s.augment_seed) for s in specs if s.view}
        self.plan, self.feature_columns, self.input_dtype = plan, feature_columns, np.dtype(input_dtype)
        self.top_k, self.tail_samples, self.batch_size = top_k, tail_samples, batch_size
        self._local = threading.local()

    def _stream(self):
        if self.device.type != "cuda":
            return None
        if getattr(self._local, "stream", None) is None:
            self._local.stream = torch.cuda.Stream(self.device)
        return self._local.stream

    def _generator(self, ids: pa.Array) -> torch.Generator | None:
        """Tail draws seeded by the batch's ids, so a rerun over the same rows stores the same draws."""
        if not self.tail_samples:
            return None
        raw = np.ascontiguousarray(ids.to_numpy(zero_copy_only=False).astype(str)).tobytes()
        seed = int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") >> 1
        return torch.Generator(self.device).manual_seed(seed)

    def _kept(self, model, x: np.ndarray, ids: pa.Array) -> dict[str, np.ndarray]:
        x = torch.from_numpy(x)
        stream = self._stream()
        with torch.inference_mode(), (torch.cuda.stream(stream) if stream else contextlib.nullcontext()):
            if stream is not None:
                x = x.pin_memory()
            kept = store.teacher_tensors(model(x.to(self.device, non_blocking=True)), self.top_k,
                                         self.tail_samples, self._generator(ids))
            if stream is not None:
                # the numpy views below keep these pinned buffers alive until Arrow is done with them
                kept = {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                        for k, t in kept.items()}
                stream.synchronize()
        return store.host_arrays(kept)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        units = [str(u) for u in batch["unit"]]
        rows = [self._unit(u, str(ts).split(",")) for u, ts in zip(units, batch["teachers"])]
        return {"unit": np.array(units), "rows": np.array(rows, np.int64)}

    def _unit(self, u: str, teachers: list[str]) -> int:
        p = self.plan
        split, name = u.split("/", 1)
        src = p.files[u]
        shards = {t: store.new_shard(p.store, t, split, name) for t in teachers}
        writers, sinks, n, digest = {}, {}, 0, hashlib.sha256()
        reader = store.open_parquet(src)
        try:
            for rb in reader.iter_batches(batch_size=self.batch_size,
                                                          columns=["id", *self.feature_columns]):
                table = pa.Table.from_batches([rb])
                x = data.features(table, self.feature_columns, str(src), self.input_dtype)
                ids = table.column("id").combine_chunks()
                store.ids_digest(ids, digest)
                for t in teachers:
                    if t in self.views:  # the teacher sees view k of these rows, as the student will
                        view, fn, seed = self.views[t]
                        kept = self._kept(self.models[t], augment.apply(fn, x, ids.to_numpy(zero_copy_only=False),
                                                                        view, seed), ids)
                    else:
                        kept = self._kept(self.models[t], x, ids)
                    _check_finite(t, kept, ids, str(src))
                    shard = store.shard_table(ids, kept)
                    if t not in writers:
                        sinks[t] = shards[t].open_output()
                        writers[t] = pq.ParquetWriter(sinks[t], shard.schema, **store.parquet_options(p.columns))
                    writers[t].write_table(shard)
                n += rb.num_rows
        finally:
            for t, w in writers.items():
                w.close()
                sinks[t].close()  # ParquetWriter leaves a stream it did not open; closing completes the upload
        for t in teachers:  # the shard is whole: now (and only now) commit it
            if t not in writers:  # an empty input file still gets an (empty) shard
                store.write_empty_shard(shards[t], reader.schema_arrow.field("id").type, p.columns)
            store.commit(p.store, t, split, name, shards[t], n, p.inputs[split][name], p.fps[t], p.settings,
                         digest.hexdigest())
        return n


@dataclass
class Plan:
    """What every ShardWriter needs to know, shipped once to the actors (metadata only)."""
    store: Loc
    files: dict[str, Loc]                   # unit → input file
    inputs: dict[str, dict[str, dict]]      # split → file name → file key
    columns: dict[str, dict[str, Any]]      # stored column spec
    fps: dict[str, str]                     # teacher → fingerprint
    settings: dict[str, Any]


def actor_threads(threads: int | None, num_actors: int, use_gpu: bool) -> int:
    """Torch intra-op threads per actor: as given, else the node's cores shared by the actors
    (CPU teachers), or 1 (a GPU teacher's host work is copies and encoding)."""
    if threads is not None:
        return threads
    return 1 if use_gpu else max(1, (os.cpu_count() or 1) // num_actors)


def options(pc) -> dict[str, Any]:
    """`precompute` keyword arguments from a PrecomputeConfig."""
    return dict(batch_size=pc.batch_size, num_actors=pc.num_actors, use_gpu=pc.use_gpu, teacher_dtype=pc.teacher_dtype,
                threads=pc.threads_per_actor, calls_per_actor=pc.calls_per_actor, resources=pc.resources)


@dataclass
class TeacherResult:
    name: str
    reused: bool
    manifest: dict
    seconds: float           # wall time of the pass that computed it, shared with that pass's other entries
    shards_computed: int = 0


def probe(spec: TeacherSpec, sample: np.ndarray, top_k: int | None, tail_samples: int = 0) -> dict[str, dict[str, Any]]:
    """Build the teacher on the driver and run it on a sample: a bad factory, weights file or input
    fails here with a clear message instead of inside a Ray actor. Returns the store column spec."""
    model = spec.build().eval()
    arrays = store.teacher_arrays(forward(spec.name, model, sample), top_k, tail_samples)
    _check_finite(spec.name, arrays, None, "the first input rows")
    return store.column_spec(arrays)


def forward(name: str, model: torch.nn.Module, sample: np.ndarray) -> torch.Tensor:
    """The model on a few input rows; a shape mismatch becomes one clear error naming both sides."""
    try:
        with torch.inference_mode():
            return model(torch.from_numpy(sample))
    except (RuntimeError, ValueError, IndexError) as e:
        raise ValueError(f"{name}: cannot run on the input rows (shape {list(sample.shape)}, {sample.dtype}): "
                         f"{str(e).splitlines()[0]}. Check data.feature_columns against what the model "
                         "takes (e.g. its kwargs)") from None


def _check_finite(teacher: str, arrays: dict[str, np.ndarray], ids, where: str) -> None:
    for k, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
            example = f", e.g. ids {np.asarray(ids)[bad][:5].tolist()}" if ids is not None else ""
            raise ValueError(f"teacher {teacher!r} returned NaN or infinite {k} for {int(bad.sum())} rows of "
                             f"{where}{example}; nothing was stored for them. Check the teacher's weights and "
                             "precompute.teacher_dtype")


SMALL_SHUFFLE = 8  # partitions (millions of ids)


def check_ids(files: dict[str, Loc], rows: int) -> None:
    """The id contract over every input file (`rows` in all), on the cluster (hash-partitioned
    count by id): no nulls, no id twice. The driver receives at most a few duplicate ids, never
    the id column."""
    ds = ray.data.from_items([{"unit": u} for u in files], override_num_blocks=max(1, min(len(files), 64)))
    # a partition per million ids: Ray's default (200) costs ~12 s of shuffle start-up on 2 cores for 67k ids
    parts = max(1, min(200, math.ceil(rows / 1_000_000)))
    if parts <= SMALL_SHUFFLE:
        # a few partitions: the task-based sort shuffle (~2 s on 2 cores) instead of the default, whose
        # aggregator actors take ~10 s to start for any input size
        ds.context.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    nulls = ds.map_batches(_null_count, fn_kwargs={"files": files}, batch_size=1).sum("nulls") or 0
    if nulls:
        raise data.DataError(f"inputs ({_dirs(files)}): {nulls} rows have a null `id`")
    dup = (ds.map_batches(_ids, fn_kwargs={"files": files}, batch_size=1).groupby("id", num_partitions=parts).count()
           .filter(expr=ray.data.expressions.col("count()") > 1))
    examples = [r["id"] for r in dup.take(5)]
    if examples:
        n = dup.count()
        where = ds.map_batches(_where_ids, fn_kwargs={"files": files, "ids": examples}, batch_size=1).take_all()
        places = {i: sorted(r["unit"] for r in where if r["id"] == i) for i in examples}
        text = "; ".join(f"id {i} in {' and '.join(u)}" for i, u in places.items())
        raise data.DataError(f"inputs ({_dirs(files)}): {n} duplicate ids, e.g. [{text}]; ids must be unique "
                             "across every split and file")


def damaged_shards(root: Loc, manifest: dict[str, Any]) -> list[str]:
    """`store.shard_damaged` for every shard of a published teacher, on the cluster (each task
    reads one shard's footer and id column); the driver gets the damaged units' names."""
    items = [{"unit": u} for u in sorted(manifest["shards"])]
    if not items:
        return []
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 64)))
    bad = ds.map_batches(_damaged, fn_kwargs={"root": root, "manifest": manifest}, batch_size=1)
    return sorted(r["unit"] for r in bad.take_all())


def _damaged(batch: dict[str, np.ndarray], root: Loc, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    units = [str(u) for u in batch["unit"] if store.shard_damaged(root, manifest["teacher"], manifest["shards"][str(u)])]
    return {"unit": np.array(units, dtype=object)}


def _dirs(files: dict[str, Loc]) -> str:
    return ", ".join(sorted({str(f)[:-len(f.name) - 1] for f in files.values()}))


def _null_count(batch: dict[str, np.ndarray], files: dict[str, Loc]) -> dict[str, np.ndarray]:
    return {"nulls": np.array([store.open_parquet(files[str(u)]).read(columns=["id"]).column("id").null_count
                               for u in batch["unit"]], np.int64)}


def _where_ids(batch: dict[str, np.ndarray], files: dict[str, Loc], ids: list) -> pa.Table:
    """(unit, id) rows for the given ids in these files: where duplicates live."""
    import pyarrow.compute as pc

    parts = []
    for u in batch["unit"]:
        got = store.open_parquet(files[str(u)]).read(columns=["id"]).column("id")
        hit = pc.filter(got, pc.is_in(got, value_set=pa.array(ids, got.type)))
        parts.append(pa.table({"unit": pa.array([str(u)] * len(hit)), "id": hit.combine_chunks()}))
    return pa.concat_tables(parts)


def _ids(batch: dict[str, np.ndarray], files: dict[str, Loc]) -> pa.Table:
    return pa.concat_tables([store.open_parquet(files[str(u)]).read(columns=["id"]) for u in batch["unit"]]).drop_null()


def input_files(split_dirs: dict[str, Any], columns: list[str]) -> tuple[dict[str, Loc], dict[str, dict[str, dict]]]:
    """(unit → input file, split → file name → file key): metadata only, no data bytes read.
    Every file must have an `id` and the feature columns."""
    files, inputs = {}, {}
    for split, d in sorted(split_dirs.items()):
        locs = data.parquet_files(d)
        inputs[split] = data.file_keys(locs, columns)
        files |= {store.unit(split, f.name): f for f in locs}
    return files, inputs


def precompute(teachers, split_dirs: dict[str, Any], store_dir, *, feature_columns: list[str],
               batch_size: int, num_actors: int, use_gpu: bool, top_k: int | None = None,
               input_dtype: str = "float32", teacher_dtype: str = "float32", threads: int | None = None,
               calls_per_actor: int = 2, tail_samples: int = 0, extra: dict[str, Any] | None = None,
               progress=None, resources: dict[str, float] | None = None) -> list[TeacherResult]:
    """Run every teacher over every input file in `split_dirs` into the store; returns one result
    per teacher. Shard-level and resumable: a file whose shard is committed for this teacher,
    these settings and the file as it is now is not computed again, so a rerun after a crash
    runs only the missing files. All teachers that need a file run on it in one read.

    The actor pool reserves one CPU per actor for Ray's scheduler and runs the teachers with
    `actor_threads(threads, …)` torch threads, on nodes that have `resources` (custom resources
    or accelerator types: teachers on one node group). A lost actor or node costs only the files
    in flight: Ray Data restarts the actor and reruns their calls, which rewrite the same shards.
    `progress(done_rows, total_rows)` is called as shards finish."""
    root = Loc.of(store_dir)
    files, inputs = input_files(split_dirs, ["id", *feature_columns])
    kind = "full" if top_k is None else "topk"
    if tail_samples and top_k is None:
        raise ValueError("tail_samples needs top_k: full logits have no tail to sample")
    settings = {"kind": kind, "top_k": top_k, "tail_samples": tail_samples, "teacher_dtype": teacher_dtype}
    specs = {s.name: s for s in map(TeacherSpec.of, teachers)}
    fps = {n: s.fingerprint() for n, s in specs.items()}
    results, todo = {}, []
    for n in specs:
        if store.is_current(root, n, fps[n], inputs, settings):  # reused without building the teacher
            manifest = store.read_manifest(root, n)
            if bad := damaged_shards(root, manifest):
                log.warning("precompute %s: %d shard(s) no longer match the store's manifest (truncated or changed), "
                            "e.g. %s; recomputing them", n, len(bad), bad[:3])
                store.forget(root, n, bad)
                todo.append(n)
                continue
            log.info("precompute %s: store is current (same weights, input files and settings), reusing it", n)
            results[n] = TeacherResult(n, True, manifest, 0.0)
        else:
            todo.append(n)
    if not todo:
        return [results[n] for n in specs]
    start = time.perf_counter()
    first = store.open_parquet(next(iter(files.values()))).read(columns=feature_columns).slice(0, 2)
    sample = data.features(first, feature_columns, "input", np.dtype(input_dtype))
    columns = None
    for n in todo:
        spec_columns = probe(specs[n], sample, top_k, tail_samples)
        if extra and "num_classes" in extra and spec_columns["logits"]["shape"] != [extra["num_classes"]]:
            raise ValueError(f"teacher {n!r} outputs logits of shape {spec_columns['logits']['shape']} per row, "
                             f"but data.num_classes is {extra['num_classes']}")
        if columns is not None and spec_columns != columns:
            raise ValueError(f"teachers {todo} store different columns ({columns} vs {spec_columns}); "
                             "every teacher must have the same output shape")
        columns = spec_columns
    done = {n: store.committed(root, n, fps[n], settings, inputs) for n in todo}
    need = {u: [n for n in todo if u not in done[n]] for u in files}
    need = {u: ts for u, ts in need.items() if ts}
    total_rows = sum(k["rows"] for fs in inputs.values() for k in fs.values())
    resumed = sum(inputs[u.split("/", 1)[0]][u.split("/", 1)[1]]["rows"] for u in files if u not in need)
    log.info("precompute %s: %d of %d input files to compute (%d rows)%s", ", ".join(todo), len(need), len(files),
             total_rows - resumed, f"; {len(files) - len(need)} already committed" if len(need) < len(files) else "")
    if need:
        plan = Plan(root, {u: files[u] for u in need}, inputs, columns, fps, settings)
        items = [{"unit": u, "teachers": ",".join(ts)} for u, ts in need.items()]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardWriter,
            fn_constructor_kwargs=dict(specs=[specs[n] for n in todo], plan=plan, feature_columns=feature_columns,
                                       input_dtype=input_dtype, top_k=top_k, device="cuda" if use_gpu else "cpu",
                                       threads=actor_threads(threads, num_actors, use_gpu),
                                       teacher_dtype=teacher_dtype, tail_samples=tail_samples,
                                       batch_size=batch_size),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(
                min_size=1, max_size=num_actors, max_concurrent_calls_per_actor=calls_per_actor,
                # GPU: calls overlap inside the UDF (each on its own stream); CPU: the teachers
                # already use every core
                enable_true_multi_threading=use_gpu),
            num_gpus=1 if use_gpu else 0, num_cpus=1, **({"resources": resources} if resources else {}))
        done_rows = resumed
        for row in ds.iter_rows():  # one tiny row per finished file: progress, not data
            done_rows += int(row["rows"])
            if progress:
                progress(done_rows, total_rows)
    for n in todo:
        s = specs[n]
        manifest = store.publish(root, n, kind=kind, columns=columns, inputs=inputs, teacher_fp=fps[n],
                                 settings=settings, extra={**(extra or {}), "factory": s.factory, "kwargs": s.kwargs,
                                                           "weights": [str(f) for f in s.weight_files],
                                                           **({"view": s.view, "augment": s.augment,
                                                               "augment_seed": s.augment_seed} if s.view else {})})
        results[n] = TeacherResult(n, False, manifest, 0.0, sum(n in ts for ts in need.values()))
    # one pass ran every entry of `todo` at once: each gets the pass's wall time, the same for all
    # (stages.store_pass.remember_timings splits it by rows), not the time until its own manifest
    seconds = time.perf_counter() - start
    for n in todo:
        results[n].seconds = seconds
    return [results[n] for n in specs]
