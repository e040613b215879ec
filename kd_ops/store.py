"""The soft-label store: raw teacher logits keyed by input id, in Parquet, one directory per teacher,
co-partitioned with the inputs: one shard per input file, holding that file's rows in its order.

Layout (format version 2); STORE is a local path or any pyarrow.fs URI (s3://, gs://)::

    STORE/<teacher>/manifest.json                 written last; names every shard a reader may open
    STORE/<teacher>/<split>/<file>-<rand>.parquet  shard of input file <split>/<file>: id + columns below
    STORE/<teacher>/_commits/<split>/<file>.json   one per committed shard: shard name, rows, input key

Object storage has no rename, so nothing is moved: a shard is written under a fresh name, then its
commit record (one small object, written whole); `publish` writes the manifest only when every
input file has a commit that matches the teacher, the settings and the input file's key, then
deletes shards nobody names (interrupted attempts, older versions). A rerun after a crash finds
the commits and computes only the missing shards.

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

The manifest also records the format, kind, row count, shards, the teacher's fingerprint
(factory, kwargs, weights sha256) and the key of every input file it covers (size, rows, footer
hash: metadata, never the data bytes), so a rerun with the same teacher and inputs reuses it.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import posixpath
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kd_ops.data import file_key
from kd_ops.fsio import Loc, UnsafePathError

FORMAT = "kd-ops/soft-labels"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
COMMITS = "_commits"


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


def write_empty_shard(loc: Loc, id_type: pa.DataType, columns: dict[str, dict[str, Any]]) -> None:
    """The shard of an input file with no rows: the schema alone."""
    schema = pa.schema([("id", id_type)] + [(k, pa.binary(np.dtype(s["dtype"]).itemsize * int(np.prod(s["shape"]))))
                                            for k, s in columns.items()])
    with loc.open_output() as f:
        pq.write_table(schema.empty_table(), f, **parquet_options(columns))


# A store entry's name is one directory under STORE: a teacher's name, or `<teacher>.features.<layer>`.
ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def teacher_loc(store: str | Path | Loc, teacher: str) -> Loc:
    """STORE/<teacher>; StoreError for a name that is not one plain directory name (`.`, `..`,
    `a/b`, ...): such a name would put shards in STORE itself or outside it, and publishing
    would delete files there."""
    if not isinstance(teacher, str) or not ENTRY_NAME.match(teacher):
        raise StoreError(f"store entry name {teacher!r} is not a plain name (letters, digits, _ . -, starting "
                         "with a letter or digit); rename the teacher")
    return Loc.of(store) / teacher


def read_manifest(store: str | Path | Loc, teacher: str) -> dict[str, Any] | None:
    """The published manifest, or None. Every shard it names must lie inside the entry's directory
    (StoreError otherwise, before any shard is opened or deleted)."""
    tdir = teacher_loc(store, teacher)
    path = tdir / MANIFEST
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    try:
        for u, s in m.get("shards", {}).items():
            tdir.inside(f"{u}.json")  # a unit is <split>/<file>: it names a commit record too
            tdir.inside(s["file"])
    except UnsafePathError as e:
        raise StoreError(f"{path}: {e}") from None
    return m


def is_current(store: str | Path | Loc, teacher: str, teacher_fp: str, inputs: dict[str, dict[str, dict]],
               settings: dict[str, Any] | None = None) -> bool:
    """True if the published shards were made from exactly these weights, input files (their keys:
    size, rows, footer hash) and settings (e.g. kind and k)."""
    try:
        m = read_manifest(store, teacher)
    except StoreError:  # it names files outside its entry: not ours to trust, recomputed and rewritten
        return False
    return bool(m and m.get("format_version") == FORMAT_VERSION and m.get("teacher_fingerprint") == teacher_fp
                and m.get("inputs") == inputs and all(m.get(k) == v for k, v in (settings or {}).items()))


def shard_damaged(store: str | Path | Loc, teacher: str, entry: dict[str, Any]) -> bool:
    """Whether a published shard is missing or no longer the file that was committed: its size,
    rows or footer hash (truncated, rewritten) or the digest of its ids (rows swapped) differ."""
    loc = teacher_loc(store, teacher).inside(entry["file"])
    try:
        if file_key(loc) != entry["key"]:
            return True
        if entry.get("ids_sha256"):
            return ids_digest(open_parquet(loc).read(columns=["id"]).column("id")).hexdigest() != entry["ids_sha256"]
        return False
    except Exception:  # missing or unreadable
        return True


def damaged(store: str | Path | Loc, manifest: dict[str, Any]) -> list[str]:
    """Units whose shard is damaged (`shard_damaged`), checked here with threads; the pipeline
    runs `shard_damaged` on the cluster instead."""
    items = sorted(manifest["shards"].items())
    with ThreadPoolExecutor(16) as pool:
        flags = list(pool.map(lambda e: shard_damaged(store, manifest["teacher"], e), [s for _, s in items]))
    return [u for (u, _), b in zip(items, flags) if b]


def forget(store: str | Path | Loc, teacher: str, units: list[str]) -> None:
    """Unpublish a teacher and drop the commits of `units`, so the next precompute recomputes them."""
    tdir = teacher_loc(store, teacher)
    (tdir / MANIFEST).delete()
    for u in units:
        (tdir / COMMITS).inside(f"{u}.json").delete()


def unit(split: str, file_name: str) -> str:
    """The store's name for one input file: `<split>/<file name>`."""
    return f"{split}/{file_name}"


def new_shard(store: str | Path | Loc, teacher: str, split: str, file_name: str) -> Loc:
    """A fresh shard location for one input file; nothing reads it until a commit names it."""
    return teacher_loc(store, teacher) / split / f"{Path(file_name).stem}-{uuid.uuid4().hex[:8]}.parquet"


def ids_digest(ids: pa.Array | pa.ChunkedArray, h=None):
    """sha256 over a shard's ids in row order (update `h` batch by batch while writing)."""
    h = h or hashlib.sha256()
    if pa.types.is_integer(ids.type):
        h.update(np.ascontiguousarray(ids.to_numpy(zero_copy_only=False), dtype="<i8").tobytes())
    else:
        h.update("\0".join(map(str, ids.to_pylist())).encode() + b"\0")
    return h


def commit(store: str | Path | Loc, teacher: str, split: str, file_name: str, shard: Loc, rows: int,
           input_key: dict, teacher_fp: str, settings: dict[str, Any], ids_sha256: str | None = None) -> None:
    """Record a finished shard (written whole, after the shard itself): its own key (size, rows,
    footer hash) and the digest of its ids, which reuse checks (`damaged`)."""
    tdir = teacher_loc(store, teacher)
    record = {"shard": shard.path[len(tdir.path) + 1:], "rows": rows, "input": input_key, "key": file_key(shard),
              "ids_sha256": ids_sha256, "teacher_fingerprint": teacher_fp, "settings": settings}
    (tdir / COMMITS / split / f"{file_name}.json").write_text(json.dumps(record))


def write_shard(store: str | Path | Loc, teacher: str, split: str, file_name: str, table: pa.Table,
                input_key: dict, teacher_fp: str, settings: dict[str, Any],
                columns: dict[str, dict[str, Any]]) -> Loc:
    """Write a whole in-memory shard and commit it (the pipeline streams instead; see precompute)."""
    loc = new_shard(store, teacher, split, file_name)
    with loc.open_output() as f:
        pq.write_table(table, f, **parquet_options(columns))
    commit(store, teacher, split, file_name, loc, table.num_rows, input_key, teacher_fp, settings,
           ids_digest(table.column("id")).hexdigest())
    return loc


def committed(store: str | Path | Loc, teacher: str, teacher_fp: str, settings: dict[str, Any],
              inputs: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """{unit: commit record} for the input files whose shard is already written for this teacher
    version, these settings and the file as it is now."""
    tdir = teacher_loc(store, teacher)
    out = {}
    for split, files in inputs.items():
        for f in (tdir / COMMITS / split).files(".json"):
            name = f.name[:-len(".json")]
            if name not in files:
                continue
            rec = json.loads(f.read_text())
            if (rec.get("input") == files[name] and rec.get("teacher_fingerprint") == teacher_fp
                    and rec.get("settings") == settings):
                out[unit(split, name)] = rec
    return out


def publish(store: str | Path | Loc, teacher: str, *, kind: str, columns: dict[str, dict[str, Any]],
            inputs: dict[str, dict[str, dict]], teacher_fp: str, settings: dict[str, Any],
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the manifest once every input file has a matching commit, then delete unnamed shards.

    Raises StoreError (and writes no manifest) if a shard is missing or its row count differs
    from its input file's."""
    tdir = teacher_loc(store, teacher)
    commits = committed(store, teacher, teacher_fp, settings, inputs)
    shards, missing = {}, []
    for split, files in inputs.items():
        for name, key in files.items():
            rec = commits.get(unit(split, name))
            if rec is None:
                missing.append(unit(split, name))
            elif rec["rows"] != key["rows"]:
                raise StoreError(f"teacher {teacher!r}: shard for {unit(split, name)} has {rec['rows']} rows, "
                                 f"the input file {key['rows']}; store not published")
            else:
                tdir.inside(rec["shard"])  # a commit record names a file inside this entry, or nothing is published
                shards[unit(split, name)] = {"file": rec["shard"], "rows": rec["rows"], "key": rec.get("key"),
                                             "ids_sha256": rec.get("ids_sha256")}
    if missing:
        raise StoreError(f"teacher {teacher!r}: {len(missing)} input files have no committed shard, e.g. "
                         f"{missing[:3]}; store not published (rerun to compute them)")
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "teacher": teacher,
                "teacher_fingerprint": teacher_fp, "inputs": inputs, "columns": columns, "logits": "raw",
                "rows": sum(s["rows"] for s in shards.values()), "shards": shards,
                # payload per row, without the id and Parquet's own overhead
                "bytes_per_row": sum(np.dtype(c["dtype"]).itemsize * int(np.prod(c["shape"])) for c in columns.values()),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **settings, **(extra or {})}
    (tdir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    named = {(tdir / s["file"]).path for s in shards.values()}  # each checked above
    for f in tdir.files(".parquet", recursive=True):
        if f.path not in named:
            f.delete()
    return manifest


def check_manifest(store: str | Path | Loc, teacher: str) -> dict[str, Any]:
    """The teacher's manifest, or StoreError saying what to run."""
    m = read_manifest(store, teacher)
    if m is None:
        raise StoreError(f"no complete soft labels for teacher {teacher!r} in {Loc.of(store)} (no {MANIFEST}); "
                         "run `kd precompute` first")
    if m.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{teacher_loc(store, teacher)}: format version {m.get('format_version')}, "
                         f"this kd-ops reads {FORMAT_VERSION}; recompute the store")
    return m


def shard_of(store: str | Path | Loc, manifest: dict[str, Any], unit_name: str) -> Loc:
    """Where the shard of one input file lives; StoreError if the manifest does not cover it."""
    s = manifest["shards"].get(unit_name)
    if s is None:
        raise StoreError(f"teacher {manifest['teacher']!r}: the store has no shard for input file {unit_name}; "
                         "recompute the store for these inputs")
    return teacher_loc(store, manifest["teacher"]).inside(s["file"])


def open_parquet(loc: Loc) -> pq.ParquetFile:
    return pq.ParquetFile(loc.fs.open_input_file(loc.path))


def aligned_batches(inputs: Loc, columns: list[str], shards: list[Loc], batch_rows: int, optional: tuple = ()
                    ) -> Iterator[tuple[pa.RecordBatch, list[pa.RecordBatch]]]:
    """Read an input file (`columns`, plus those of `optional` it has) and its shards in lockstep,
    `batch_rows` rows at a time, checking that the ids match row for row (a shard holds its input
    file's rows in the same order)."""
    src = open_parquet(inputs)
    columns = [*columns, *(c for c in optional if c in src.schema_arrow.names)]
    # one decoding thread per reader: the cores belong to the teachers or the Train workers
    readers = [src.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False)]
    readers += [open_parquet(s).iter_batches(batch_size=batch_rows, use_threads=False) for s in shards]
    for parts in itertools.zip_longest(*readers):
        if any(p is None for p in parts):
            raise StoreError(f"{inputs}: a shard of it has a different row count; recompute the store")
        ids = parts[0].column("id")
        for s, p in zip(shards, parts[1:]):
            if not ids.equals(p.column("id")):
                bad = pc.index(pc.equal(ids, p.column("id")), False).as_py()
                raise StoreError(f"{s}: row {bad} has id {p.column('id')[bad]} but its input file {inputs} has "
                                 f"{ids[bad]}; the shard does not belong to this input, recompute the store")
        yield parts[0], list(parts[1:])


def decode_batch(batch: pa.RecordBatch | pa.Table, columns: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    return {k: decode(batch.column(k), s["dtype"], s["shape"]) for k, s in columns.items()}


def read_teacher(store: str | Path | Loc, teacher: str) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """All rows of one teacher, in memory: (ids [N], {column: [N, ...]}, manifest). For tests and
    small benchmarks; the pipeline streams shards instead (`aligned_batches`)."""
    m = check_manifest(store, teacher)
    tables = [open_parquet(shard_of(store, m, u)).read() for u in sorted(m["shards"])]
    table = pa.concat_tables(tables)
    return table.column("id").to_numpy(zero_copy_only=False), decode_batch(table, m["columns"]), m


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


def soft_labels(store: str | Path | Loc, teachers: list[str], ids: np.ndarray) -> dict[str, np.ndarray]:
    """Stored columns of several teachers for `ids`, stacked per column: {name: [M, N, ...]} (in memory:
    tests and benchmarks)."""
    per_teacher = []
    for t in teachers:
        store_ids, arrays, _ = read_teacher(store, t)
        rows = align(ids, store_ids, t)
        per_teacher.append({k: v[rows] for k, v in arrays.items()})
    names = per_teacher[0].keys()
    if any(p.keys() != names for p in per_teacher):
        raise StoreError(f"teachers {teachers} were stored in different kinds; recompute them with the same settings")
    return {k: np.stack([p[k] for p in per_teacher]) for k in names}


def view_entry(teacher: str, view: int) -> str:
    """The store entry of `teacher`'s logits on augmented view `view` (view 0 is the teacher's own entry)."""
    return teacher if view == 0 else f"{teacher}.view{view}"


def size_bytes(store: str | Path | Loc, entries: list[str] | None = None) -> int:
    """Bytes of the published shards and manifests (what a reader uses), of every entry or of `entries`."""
    root, total = Loc.of(store), 0
    for mf in root.files(MANIFEST, recursive=True):
        name = posixpath.basename(posixpath.dirname(mf.path))
        m = read_manifest(root, name)
        if m is None or (entries is not None and name not in entries):
            continue
        tdir = teacher_loc(root, name)  # read_manifest checked every shard path
        total += mf.size() + sum((tdir / s["file"]).size() for s in m["shards"].values())
    return total
