"""The soft-label store: raw teacher logits keyed by input id, in Parquet, one directory per teacher.

Layout (format version 1)::

    STORE/<teacher>/manifest.json       written last: its presence means the teacher is complete
    STORE/<teacher>/<shard>.parquet      columns: id (as the inputs), logits (fixed_size_binary)

`logits` holds C float16 values per row as raw little-endian bytes (fixed_size_binary(2·C)):
the raw, untempered logits z, never softmaxed. Raw bytes write ~10x faster than
list<float16> and decode zero-copy into numpy. The manifest records the format, number of
classes, dtype, row count, the teacher's fingerprint (factory, kwargs, weights sha256) and the
fingerprint of every input split it covers, so a rerun with the same teacher and inputs reuses it.
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


class StoreError(ValueError):
    """The store is missing, incomplete or does not match what the caller asks for."""


def encode_logits(logits: np.ndarray) -> pa.FixedSizeBinaryArray:
    """[N, C] float → fixed_size_binary(2C) of float16 little-endian bytes (one buffer, no per-row Python)."""
    z = np.ascontiguousarray(logits, dtype="<f2")
    n, c = z.shape
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * c), n, [None, pa.py_buffer(z)])


def decode_logits(column: pa.Array | pa.ChunkedArray, num_classes: int) -> np.ndarray:
    """fixed_size_binary column → [N, C] float16 array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.type != pa.binary(2 * num_classes):
        raise StoreError(f"logits column has type {column.type}, expected fixed_size_binary({2 * num_classes})")
    n = len(column)
    data = column.buffers()[1]
    start = column.offset * 2 * num_classes
    return np.frombuffer(data, dtype="<f2", count=n * num_classes, offset=start).reshape(n, num_classes)


def shard_table(ids: pa.Array | np.ndarray, logits: np.ndarray) -> pa.Table:
    return pa.table({"id": ids, "logits": encode_logits(logits)})


def teacher_dir(store: str | Path, teacher: str) -> Path:
    return Path(store) / teacher


def read_manifest(store: str | Path, teacher: str) -> dict[str, Any] | None:
    path = teacher_dir(store, teacher) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def is_current(store: str | Path, teacher: str, teacher_fp: str, input_fps: dict[str, str]) -> bool:
    """True if the teacher's shards are complete and were made from exactly these weights and inputs."""
    m = read_manifest(store, teacher)
    return bool(m and m.get("format_version") == FORMAT_VERSION and m.get("teacher_fingerprint") == teacher_fp
                and m.get("input_fingerprints") == input_fps)


def staging_dir(store: str | Path, teacher: str) -> Path:
    """A fresh hidden directory to write shards into; nothing reads it until `publish`."""
    path = Path(store) / f".staging-{teacher}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def publish(staging: Path, store: str | Path, teacher: str, *, num_classes: int, expected_rows: int,
            teacher_fp: str, input_fps: dict[str, str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
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
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "full", "teacher": teacher,
                    "teacher_fingerprint": teacher_fp, "input_fingerprints": input_fps,
                    "num_classes": num_classes, "dtype": "float16", "logits": "raw",
                    "rows": rows, "files": files, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    **(extra or {})}
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


def read_teacher(store: str | Path, teacher: str) -> tuple[np.ndarray, np.ndarray]:
    """All rows of one teacher: (ids [N], logits [N, C] float16)."""
    m = read_manifest(store, teacher)
    if m is None:
        raise StoreError(f"no complete soft labels for teacher {teacher!r} in {store} (no {MANIFEST}); "
                         "run `kd precompute` first")
    if m.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{teacher_dir(store, teacher)}: format version {m.get('format_version')}, "
                         f"this kd-ops reads {FORMAT_VERSION}; recompute the store")
    files = [teacher_dir(store, teacher) / f["name"] for f in m["files"]]
    table = pa.concat_tables([pq.read_table(f) for f in files])
    return table.column("id").to_numpy(zero_copy_only=False), decode_logits(table.column("logits"), m["num_classes"])


def align(ids: np.ndarray, store_ids: np.ndarray, logits: np.ndarray, teacher: str) -> np.ndarray:
    """Rows of `logits` reordered to follow `ids`. Raises StoreError listing ids the store lacks."""
    order = np.argsort(store_ids, kind="stable")
    sorted_ids = store_ids[order]
    pos = np.searchsorted(sorted_ids, ids)
    pos_clipped = np.minimum(pos, len(sorted_ids) - 1)
    found = (pos < len(sorted_ids)) & (sorted_ids[pos_clipped] == ids) if len(sorted_ids) else np.zeros(len(ids), bool)
    if not found.all():
        missing = ids[~found]
        raise StoreError(f"teacher {teacher!r}: {len(missing)} input ids have no soft labels, e.g. "
                         f"{missing[:5].tolist()}; recompute the store for these inputs")
    return logits[order[pos_clipped]]


def soft_labels(store: str | Path, teachers: list[str], ids: np.ndarray) -> np.ndarray:
    """Stored logits of several teachers for `ids`, stacked: [M, N, C] float16."""
    return np.stack([align(ids, *read_teacher(store, t), teacher=t) for t in teachers])


def size_bytes(store: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file() and not f.name.startswith("."))
