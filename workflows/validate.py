"""Input checks before any teacher or student runs: one Ray Data pass over the input files, on the
cluster (the driver gets one small row of counts per file and at most a few example ids), then
the id contract (`precompute.check_ids`: no nulls, no id twice across splits and files).

Per file: unreadable Parquet, missing columns, non-finite feature values, list features of
unequal lengths, labels outside [0, num_classes). Per split: no rows. Each problem is one
DataError naming the file (or split), the column, a few ids and the fix. A passing check is
remembered under --out by the files' keys (size, rows, footer hash), so a rerun does not rescan.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from kd_ops import store
from kd_ops.data import DataError
from kd_ops.fsio import Loc
from workflows import precompute as pre

log = logging.getLogger("kd")

EXAMPLES = 5
NEED_ROWS = ("val", "test")  # splits that must not be empty (metrics are computed on them)


def _file_stats(batch: dict[str, np.ndarray], files: dict[str, Loc], feature_columns: list[str],
                label_column: str | None, num_classes: int | None) -> dict[str, np.ndarray]:
    """One row per input file: a JSON list of the problems found (empty when the file is fine)."""
    out = []
    for u in batch["unit"]:
        f = files[str(u)]
        problems = []
        try:  # only the columns checked here: other columns of the file are not ours to read
            src = store.open_parquet(f)
            names = src.schema_arrow.names
            t = src.read(columns=[c for c in ("id", *feature_columns, label_column) if c and c in names])
        except Exception as e:  # pyarrow raises several types for a damaged file
            out.append(json.dumps([f"cannot be read as Parquet ({type(e).__name__}: {e}); replace or remove the file"]))
            continue
        ids = t.column("id") if "id" in t.column_names else None
        for name in feature_columns:
            if name not in t.column_names:
                problems.append(f"has no feature column {name!r} (columns: {t.column_names}); set data.feature_columns")
                continue
            col = t.column(name).combine_chunks()
            values = col
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
                lengths = pc.list_value_length(col)
                lo, hi = pc.min(lengths).as_py(), pc.max(lengths).as_py()
                if lo != hi:
                    bad = pc.not_equal(lengths, pc.mode(lengths)[0]["mode"])
                    problems.append(f"column {name!r}: lists of different lengths ({lo} to {hi}), e.g. ids "
                                    f"{_ids(ids, bad)}; every row needs the same number of features")
                values = pc.list_flatten(col)
                row_of = pc.list_parent_indices(col)
            else:
                row_of = None
            if pa.types.is_floating(values.type):
                bad_values = pc.invert(pc.is_finite(values.fill_null(0.0)))
                n = pc.sum(bad_values).as_py() or 0
                if n:
                    rows = np.unique(np.asarray(row_of)[np.asarray(bad_values)]) if row_of is not None else \
                        np.flatnonzero(np.asarray(bad_values))
                    mask = np.zeros(len(col), bool)
                    mask[rows] = True
                    problems.append(f"column {name!r}: {len(rows)} rows hold NaN or infinite values, e.g. ids "
                                    f"{_ids(ids, pa.array(mask))}; clean or drop those rows")
        if label_column and num_classes and label_column in t.column_names:
            y = t.column(label_column).combine_chunks()
            if not pa.types.is_integer(y.type):
                problems.append(f"label column {label_column!r} has type {y.type}; labels must be integers")
            else:
                # −1 or null: an unlabelled row (soft term only); anything else must be a class index
                bad = pc.and_(pc.not_equal(y, -1), pc.or_(pc.less(y, 0), pc.greater_equal(y, num_classes)))
                bad = bad.fill_null(False)
                n = pc.sum(bad).as_py() or 0
                if n:
                    values = sorted(set(pc.filter(y, bad).to_pylist()))[:EXAMPLES]
                    problems.append(f"label column {label_column!r}: {n} labels outside [0, {num_classes}) "
                                    f"(values {values}, e.g. ids {_ids(ids, bad)}); fix the labels or "
                                    "data.num_classes")
        out.append(json.dumps(problems))
    return {"unit": batch["unit"], "problems": np.array(out, dtype=object)}


def _ids(ids: pa.ChunkedArray | None, mask: pa.Array) -> list:
    if ids is None:
        return []
    return pc.filter(ids.combine_chunks(), mask).slice(0, EXAMPLES).to_pylist()


def check_inputs(split_dirs: dict[str, Any], *, feature_columns: list[str], label_column: str | None,
                 num_classes: int | None, remember: Loc | None = None) -> None:
    """Raise DataError for the first problem found in the inputs (all files are checked; up to
    five problems are listed). `remember`: a directory where a passing check is recorded."""
    files, inputs = pre.input_files(split_dirs, ["id", *feature_columns])  # names a file without id/features
    for split in NEED_ROWS:
        if split in inputs and sum(k["rows"] for k in inputs[split].values()) == 0:
            raise DataError(f"split {split!r} ({split_dirs[split]}) has no rows; it needs at least one "
                            "(metrics are computed on it)")
    key = hashlib.sha256(json.dumps([inputs, feature_columns, label_column, num_classes],
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    stamp = remember / f"inputs-{key}.json" if remember is not None else None
    if stamp is not None and stamp.is_file():
        log.info("data: inputs checked before (same files), not scanning again")
        return
    ds = ray.data.from_items([{"unit": u} for u in files], override_num_blocks=max(1, min(len(files), 64)))
    rows = ds.map_batches(_file_stats, batch_size=1, fn_kwargs=dict(
        files=files, feature_columns=feature_columns, label_column=label_column, num_classes=num_classes)).take_all()
    found = [f"{files[r['unit']]}: {p}" for r in sorted(rows, key=lambda r: r["unit"]) for p in json.loads(r["problems"])]
    if found:
        more = f" (and {len(found) - EXAMPLES} more)" if len(found) > EXAMPLES else ""
        raise DataError("bad input data: " + "; ".join(found[:EXAMPLES]) + more)
    rows = sum(k["rows"] for s in inputs.values() for k in s.values())
    pre.check_ids(files, rows)
    if stamp is not None:
        stamp.write_text(json.dumps({"files": len(files), "rows": rows}))
