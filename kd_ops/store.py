"""The soft-label store: raw teacher logits keyed by input id, in Parquet, one directory per teacher.

Layout (format version 1)::

    STORE/<teacher>/manifest.json       written last: its presence means the teacher is complete
    STORE/<teacher>/<shard>.parquet      columns: id (as the inputs) + the kind's columns below

Every non-id column is `fixed_size_binary`: one row's array as raw little-endian bytes, with its
dtype and per-row shape in the manifest's `columns`. Raw bytes write ~10x faster than
list<float16> and decode zero-copy into numpy. Kinds:

- ``full``: ``logits`` float16 [C] (classifier) or [L, V] (LM, one row per sequence): the raw,
  untempered logits z.
- ``topk`` (LM): ``values`` float16 [L, k], the k largest raw logits of each token, descending;
  ``indices`` uint16 (vocab ≤ 65536) or int32 [L, k], their token ids; ``lse`` float32 [L], the
  teacher's full log-sum-exp at T=1, so the probability mass outside the top-k is known exactly
  at T=1: 1 − Σ_i exp(values_i − lse). With `tail_samples` m > 0 also ``tail_values`` float16
  [L, m] and ``tail_indices`` (as ``indices``) [L, m]: m tokens per position drawn with
  replacement from the teacher's T=1 distribution outside the top-k, and their raw logits, so
  forward KL can estimate the tail without bias (kd_ops/token_losses.py: sampled_teacher).

The manifest also records the format, kind, row count, shard files, the teacher's fingerprint
(factory, kwargs, weights sha256) and the fingerprint of every input split it covers, so a rerun
with the same teacher and inputs reuses it.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FORMAT = "kd-ops/soft-labels"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def parquet_options(columns: dict[str, Any]) -> dict[str, Any]:
    """Writer options for shards: zstd over byte-stream-split columns. Splitting each value's bytes
    into separate streams groups the fp16 exponents and the indices' high bytes, which zstd then
    compresses: top-32 at a 2k vocabulary goes from 132 (snappy) to ~91 bytes/token. Statistics
    only for `id`: a teacher column's min/max are whole rows (4 KB for top-32 × 64 tokens), kept per
    row group and page, useless for filtering: 69 → 52 bytes/token for 128-row top-32 shards at 32k."""
    return {"compression": "zstd", "use_dictionary": False, "use_byte_stream_split": sorted(columns),
            "write_statistics": ["id"]}


class StoreError(ValueError):
    """The store is missing, incomplete or does not match what the caller asks for."""


def encode(a: np.ndarray) -> pa.FixedSizeBinaryArray:
    """[N, ...] array → fixed_size_binary holding each row's bytes (little-endian; one buffer, no per-row Python)."""
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    row_bytes = a[0].nbytes if len(a) else a.dtype.itemsize * int(np.prod(a.shape[1:]))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(row_bytes), len(a), [None, pa.py_buffer(a)])


def decode(column: pa.Array | pa.ChunkedArray, dtype: str, shape: list[int]) -> np.ndarray:
    """fixed_size_binary column → [N, *shape] array of `dtype` (zero-copy for a single chunk)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dt = np.dtype(dtype).newbyteorder("<")
    row = dt.itemsize * int(np.prod(shape))
    if column.type != pa.binary(row):
        raise StoreError(f"column has type {column.type}, expected fixed_size_binary({row}) for {dtype} {shape}")
    n = len(column)
    return np.frombuffer(column.buffers()[1], dtype=dt, count=n * row // dt.itemsize,
                         offset=column.offset * row).reshape(n, *shape)


def teacher_tensors(logits, top_k: int | None, tail_samples: int = 0, generator=None) -> dict[str, Any]:
    """What the store keeps of a teacher's raw logits, still on the logits' device (GPU included),
    in the stored dtypes: the reductions run there so only the kept bytes cross to the host.

    [B, C] or [B, L, V] with top_k None → {"logits": float16}; [B, L, V] with top_k → {"values"
    float16 [B, L, k], "indices" int16 (vocab ≤ 65536, read back as uint16) or int32 [B, L, k],
    "lse" float32 [B, L]}, plus with tail_samples m > 0 {"tail_values" float16, "tail_indices"
    [B, L, m]}: m draws from the distribution outside the top-k (`token_losses.sample_tail`).
    """
    import torch

    if top_k is None:
        return {"logits": logits.to(torch.float16)}
    from kd_ops.token_losses import sample_tail, topk_support

    values, indices, lse = topk_support(logits, top_k)
    index_dtype = torch.int32 if logits.shape[-1] > 65536 else torch.int16  # reinterpreted as uint16 in host_arrays

    def kept(v, i):  # one (logits, token ids) pair in the stored dtypes
        return v.to(torch.float16), i.to(torch.int32).to(index_dtype)

    out = dict(zip(("values", "indices"), kept(values, indices))) | {"lse": lse.float()}
    if tail_samples:
        out |= dict(zip(("tail_values", "tail_indices"), kept(*sample_tail(logits, indices, tail_samples, generator))))
    return out


def host_arrays(tensors: dict[str, Any]) -> dict[str, np.ndarray]:
    """`teacher_tensors` output (on the host) → numpy arrays with the stored dtypes (int16 indices as uint16)."""
    out = {k: t.numpy() for k, t in tensors.items()}
    for k in ("indices", "tail_indices"):
        if k in out and out[k].dtype == np.int16:
            out[k] = out[k].view(np.uint16)
    return out


def teacher_arrays(logits, top_k: int | None, tail_samples: int = 0, generator=None) -> dict[str, np.ndarray]:
    """`teacher_tensors` copied to the host as numpy arrays (synchronous copy)."""
    return host_arrays({k: t.cpu() for k, t in teacher_tensors(logits, top_k, tail_samples, generator).items()})


def column_spec(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    return {k: {"dtype": str(v.dtype), "shape": list(v.shape[1:])} for k, v in arrays.items()}


def shard_table(ids: pa.Array | np.ndarray, arrays: dict[str, np.ndarray]) -> pa.Table:
    return pa.table({"id": ids, **{k: encode(v) for k, v in arrays.items()}})


def teacher_dir(store: str | Path, teacher: str) -> Path:
    return Path(store) / teacher


def read_manifest(store: str | Path, teacher: str) -> dict[str, Any] | None:
    path = teacher_dir(store, teacher) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def is_current(store: str | Path, teacher: str, teacher_fp: str, input_fps: dict[str, str],
               settings: dict[str, Any] | None = None) -> bool:
    """True if the teacher's shards are complete and were made from exactly these weights, inputs
    and settings (e.g. kind and k)."""
    m = read_manifest(store, teacher)
    return bool(m and m.get("format_version") == FORMAT_VERSION and m.get("teacher_fingerprint") == teacher_fp
                and m.get("input_fingerprints") == input_fps
                and all(m.get(k) == v for k, v in (settings or {}).items()))


def staging_dir(store: str | Path, teacher: str) -> Path:
    """A fresh hidden directory to write shards into; nothing reads it until `publish`."""
    path = Path(store) / f".staging-{teacher}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def publish(staging: Path, store: str | Path, teacher: str, *, kind: str, columns: dict[str, dict[str, Any]],
            expected_rows: int, teacher_fp: str, input_fps: dict[str, str],
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check the staged shards, write the manifest and move them into place atomically.

    Raises StoreError (and removes the staging directory) if rows are missing or duplicated.
    """
    try:
        files, rows = [], 0
        for f in sorted(staging.glob("*.parquet")):
            n = pq.ParquetFile(f).metadata.num_rows
            files.append({"name": f.name, "rows": n})
            rows += n
        if rows != expected_rows:
            raise StoreError(f"teacher {teacher!r}: wrote {rows} rows, expected {expected_rows}; store not published")
        ids = pq.read_table(staging, columns=["id"]).column("id")
        if len(pc.unique(ids)) != rows:
            raise StoreError(f"teacher {teacher!r}: duplicate ids in the written shards; store not published")
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "teacher": teacher,
                    "teacher_fingerprint": teacher_fp, "input_fingerprints": input_fps, "columns": columns,
                    "logits": "raw", "rows": rows, "files": files,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {})}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        final = teacher_dir(store, teacher)
        if final.exists():  # replaced only now, when the new version is complete
            old = final.with_name(f".old-{teacher}-{uuid.uuid4().hex[:8]}")
            final.rename(old)
            shutil.rmtree(old)
        os.replace(staging, final)
        return manifest
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_teacher(store: str | Path, teacher: str) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """All rows of one teacher: (ids [N], {column: [N, ...]}, manifest)."""
    m = read_manifest(store, teacher)
    if m is None:
        raise StoreError(f"no complete soft labels for teacher {teacher!r} in {store} (no {MANIFEST}); "
                         "run `kd precompute` first")
    if m.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{teacher_dir(store, teacher)}: format version {m.get('format_version')}, "
                         f"this kd-ops reads {FORMAT_VERSION}; recompute the store")
    table = pa.concat_tables([pq.read_table(teacher_dir(store, teacher) / f["name"]) for f in m["files"]])
    arrays = {k: decode(table.column(k), s["dtype"], s["shape"]) for k, s in m["columns"].items()}
    return table.column("id").to_numpy(zero_copy_only=False), arrays, m


def align(ids: np.ndarray, store_ids: np.ndarray, teacher: str) -> np.ndarray:
    """Row positions in the store for `ids`. Raises StoreError listing ids the store lacks."""
    order = np.argsort(store_ids, kind="stable")
    sorted_ids = store_ids[order]
    pos = np.minimum(np.searchsorted(sorted_ids, ids), max(len(sorted_ids) - 1, 0))
    found = sorted_ids[pos] == ids if len(sorted_ids) else np.zeros(len(ids), bool)
    if not found.all():
        missing = ids[~found]
        raise StoreError(f"teacher {teacher!r}: {len(missing)} input ids have no soft labels, e.g. "
                         f"{missing[:5].tolist()}; recompute the store for these inputs")
    return order[pos]


def soft_labels(store: str | Path, teachers: list[str], ids: np.ndarray) -> dict[str, np.ndarray]:
    """Stored columns of several teachers for `ids`, stacked per column: {name: [M, N, ...]}."""
    per_teacher = []
    for t in teachers:
        store_ids, arrays, _ = read_teacher(store, t)
        rows = align(ids, store_ids, t)
        per_teacher.append({k: v[rows] for k, v in arrays.items()})
    names = per_teacher[0].keys()
    if any(p.keys() != names for p in per_teacher):
        raise StoreError(f"teachers {teachers} were stored in different kinds; recompute them with the same settings")
    return {k: np.stack([p[k] for p in per_teacher]) for k in names}


def size_bytes(store: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file() and not f.name.startswith("."))
