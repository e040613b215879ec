"""Input data: the built-in MNIST-1D source and Parquet directories keyed by a stable `id`.

The id contract: every input row has an `id` (int64 or string), unique within a split directory
and across the splits of one run. Soft labels are joined to inputs by this id, never by row
order (Ray Data does not guarantee order).
"""
from __future__ import annotations

import hashlib
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from kd_ops.fsio import Loc

SPLITS = ("train", "val", "test", "transfer")


class DataError(ValueError):
    """Bad input data: the message says which file/column/id and how to fix it."""


@dataclass
class Inputs:
    ids: np.ndarray            # [N] int64 or object (str)
    x: np.ndarray              # [N, ...] float32
    y: np.ndarray | None       # [N] int64, −1 where unlabelled; None if the split has no label column


def mnist1d_arrays(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate MNIST-1D (no download): x [N, 40] float32, y [N] int64."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    # make_dataset makes num_samples // 10 per class: round up, keep the first N of its shuffled rows
    args.num_samples, args.seed, args.train_split = -(-num_samples // 10) * 10, seed, 1.0
    state = np.random.get_state()  # make_dataset reseeds numpy's global RNG; leave the caller's alone
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    return d["x"][:num_samples].astype(np.float32), d["y"][:num_samples].astype(np.int64)


TRANSFER_PART = 10_000  # rows per independently seeded part of the transfer set


def transfer_parts(transfer: int, seed: int) -> list[tuple[int, int]]:
    """(rows, seed) of each part of an unlabelled transfer set of `transfer` rows: generated in
    parts so a caller can make them in parallel (MNIST-1D's generator is a Python loop per sample).
    Part seeds come from a SeedSequence of (seed, part), so no part replays the labelled set's seed."""
    sizes = [min(TRANSFER_PART, transfer - start) for start in range(0, transfer, TRANSFER_PART)]
    return [(n, int(np.random.SeedSequence([seed, k]).generate_state(1)[0])) for k, n in enumerate(sizes)]


def mnist1d_parts(labelled: int, seed: int, transfer: int, transfer_seed: int) -> list[tuple[int, int]]:
    """(rows, seed) of each `mnist1d_arrays` call `mnist1d_splits` needs: the labelled set, then
    the transfer set's parts (`transfer_parts`). A caller may make them in parallel."""
    return [(labelled, seed), *transfer_parts(transfer, transfer_seed)]


def mnist1d_splits(labelled: int, val: int, test: int, transfer: int, seed: int, transfer_seed: int,
                   arrays: list[tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, Inputs]:
    """Labelled MNIST-1D split into train/val/test, plus an unlabelled transfer set from other
    seeds (`transfer_parts`). `arrays`: the (x, y) of each of `mnist1d_parts`, made by the caller
    (e.g. in parallel); default: made here one after another.

    Ids are unique across splits: train/val/test take 0..labelled-1 in order, transfer starts
    at 10_000_000.
    """
    if val + test >= labelled:
        raise DataError(f"val ({val}) + test ({test}) must be smaller than labelled ({labelled})")
    if arrays is None:
        arrays = [mnist1d_arrays(n, s) for n, s in mnist1d_parts(labelled, seed, transfer, transfer_seed)]
    (x, y), *parts = arrays
    ids = np.arange(labelled, dtype=np.int64)
    n_train = labelled - val - test
    cut = {"train": slice(0, n_train), "val": slice(n_train, n_train + val), "test": slice(n_train + val, labelled)}
    out = {k: Inputs(ids[s], x[s], y[s]) for k, s in cut.items()}
    if transfer > 0:
        tx = np.concatenate([px for px, _ in parts])  # their labels are thrown away: unlabelled data
        out["transfer"] = Inputs(np.arange(transfer, dtype=np.int64) + 10_000_000, tx, None)
    return out


def to_table(inputs: Inputs) -> pa.Table:
    """Inputs → Arrow: `id`, `x` (fixed_size_list of x's dtype: float32 signals, int32 token ids),
    `label` (int64) if labelled."""
    x = np.ascontiguousarray(inputs.x).reshape(len(inputs.x), -1)
    cols = {"id": pa.array(inputs.ids),
            "x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])}
    if inputs.y is not None:
        cols["label"] = pa.array(inputs.y, pa.int64())
    return pa.table(cols)


def write_split(inputs: Inputs, out_dir: str | Path | Loc, rows_per_file: int = 8192) -> Path | Loc:
    """Write one split as Parquet files of `rows_per_file` rows. Local: into a hidden directory
    renamed into place. Object storage (no rename): the old files are deleted first, so callers
    trust the split only through a marker they write after it (e.g. the data stamp)."""
    loc = Loc.of(out_dir)
    table = to_table(inputs)
    parts = [table.slice(s, rows_per_file) for s in range(0, max(len(table), 1), rows_per_file)]
    if not loc.local:
        loc.delete()
        for i, part in enumerate(parts):
            with (loc / f"part-{i:05d}.parquet").open_output() as f:
                pq.write_table(part, f)
        return loc
    out = Path(loc.path)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    for i, part in enumerate(parts):
        pq.write_table(part, tmp / f"part-{i:05d}.parquet")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out_dir if isinstance(out_dir, Path) else out


def parquet_files(where: str | Path | Loc) -> list[Loc]:
    """The *.parquet files of a split directory (local path or URI), or the file itself."""
    loc = Loc.of(where)
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"input directory {loc} does not exist")
    files = loc.files(".parquet") if info.type == pafs.FileType.Directory else [loc]
    if not files:
        raise DataError(f"input directory {loc} holds no *.parquet files")
    return files


def file_key(f: Loc, columns: list[str] = ()) -> dict:
    """What identifies an input file's content without reading it: size, rows and a hash of its
    Parquet footer (schema, row groups, column chunk offsets and statistics). Checks that the
    file has `columns`."""
    with f.fs.open_input_file(f.path) as h:
        size = h.size()
        h.seek(size - 8)
        tail = h.read(8)
        if tail[4:] != b"PAR1":
            raise DataError(f"{f}: not a Parquet file (no PAR1 footer)")
        n = int.from_bytes(tail[:4], "little")
        h.seek(size - 8 - n)
        footer = h.read(n)
        h.seek(0)
        try:
            meta = pq.ParquetFile(h)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{f}: not a readable Parquet file ({e}); replace or remove it") from None
        rows, names = meta.metadata.num_rows, meta.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if "id" in missing:
        raise _no_id(str(f), names)
    if missing:
        raise DataError(f"{f}: column(s) {missing} not found (have {names}); set data.feature_columns in the config")
    return {"size": size, "rows": rows, "footer_sha256": hashlib.sha256(footer).hexdigest()}


def file_keys(files: list[Loc], columns: list[str] = ()) -> dict[str, dict]:
    """{file name: file_key} for one split, fetched concurrently (object stores answer slowly, in parallel)."""
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise DataError(f"{files[0]}: input file names must be unique within a split")
    with ThreadPoolExecutor(16) as pool:
        return dict(zip(names, pool.map(lambda f: file_key(f, columns), files)))


def _no_id(where: str, names: list[str]) -> DataError:
    return DataError(f"{where}: no `id` column (found {names}); every input row needs a stable unique "
                     "`id` (int64 or string) so soft labels can be joined to it")


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    files = parquet_files(path)
    names = pq.read_schema(files[0].path, filesystem=files[0].fs).names
    missing = [c for c in columns or [] if c not in names]
    if "id" in missing:
        raise _no_id(str(path), names)
    if missing:
        raise DataError(f"{path}: column(s) {missing} not found (have {names})")
    try:
        return pa.concat_tables([pq.read_table(f.path, filesystem=f.fs, columns=columns) for f in files])
    except (pa.ArrowInvalid, KeyError) as e:
        raise DataError(f"cannot read {path} (columns {columns}): {e}") from e


def validate_ids(table: pa.Table, where: str) -> None:
    """The id contract: an `id` column, no nulls, no duplicates. Raises DataError naming examples."""
    if "id" not in table.column_names:
        raise _no_id(where, table.column_names)
    ids = table.column("id")
    if ids.null_count:
        raise DataError(f"{where}: {ids.null_count} rows have a null `id`")
    counts = pc.value_counts(ids)
    dup = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(dup):
        raise DataError(f"{where}: {len(dup)} duplicate ids, e.g. {dup[:5].to_pylist()}; ids must be unique")


def features(table: pa.Table, feature_columns: list[str], where: str = "input", dtype=np.float32) -> np.ndarray:
    """Feature matrix [N, F] of `dtype` (float32; int64 for token ids) from one fixed/variable
    list column or several numeric columns."""
    missing = [c for c in feature_columns if c not in table.column_names]
    if missing:
        raise DataError(f"{where}: feature column(s) {missing} not found (have {table.column_names}); "
                        "set data.feature_columns in the config")
    cols = []
    for name in feature_columns:
        col = table.column(name)
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            flat = col.flatten().to_numpy(zero_copy_only=False)
            if len(col) and len(flat) % len(col):
                raise DataError(f"{where}: list column {name!r} has rows of different lengths")
            cols.append(flat.astype(dtype).reshape(len(col), -1))  # a writable copy, torch-safe
        elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            cols.append(col.to_numpy(zero_copy_only=False).astype(dtype).reshape(-1, 1))
        else:
            raise DataError(f"{where}: feature column {name!r} has type {col.type}; need numbers or lists of numbers")
    return np.concatenate(cols, axis=1) if len(cols) > 1 else cols[0]


def read_inputs(path: str | Path, feature_columns: list[str], label_column: str = "label", dtype=np.float32) -> Inputs:
    """Read and validate one split directory."""
    table = read_table(path)
    validate_ids(table, str(path))
    y = None
    if label_column in table.column_names:
        y = table.column(label_column).fill_null(-1).to_numpy().astype(np.int64)
    return Inputs(table.column("id").to_numpy(zero_copy_only=False), features(table, feature_columns, str(path), dtype), y)
