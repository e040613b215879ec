"""What a rerun into the same --out may reuse is keyed by everything that produced it: these
digests name the inputs of a fit (files, store entries, views) and of a trained teacher."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from kd_ops import data


def digest(obj: Any) -> str:
    """A short stable digest of a JSON-like value."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_key(feature_columns: list[str], dirs: dict[str, Any]) -> dict[str, dict]:
    """What identifies the input files of `dirs` ({split: directory}) without reading their data
    (`data.file_keys`: size, rows and a hash of each Parquet footer)."""
    return {s: data.file_keys(data.parquet_files(d), ["id", *feature_columns]) for s, d in sorted(dirs.items())}


def teacher_key(factory: str, kwargs: dict, fit: dict, feature_columns: list[str], dirs: dict[str, Any]) -> str:
    """A teacher trained by `kd run`: its model, its fit settings and the data it was trained and
    validated on."""
    return digest({"factory": factory, "kwargs": kwargs, "fit": fit,
                   "data": data_key(feature_columns, {s: dirs[s] for s in ("train", "val")})})


def matches(stamp, key: str) -> bool:
    """Whether the key file `stamp` (a Loc or Path) records `key`."""
    return stamp.is_file() and json.loads(stamp.read_text()).get("key") == key


def record(stamp, key: str) -> None:
    stamp.write_text(json.dumps({"key": key}))
