"""`kd bench ingest`: the real streaming ingest against in-memory tensors, one run.

Builds a synthetic soft-label store (default ≥ 4 GB: random inputs and full fp16 logits over
1,000 classes, co-partitioned with the inputs, written by Ray tasks so the driver never holds
it), then trains one epoch of the same student with the same loss and batch size twice:
through the kd-ops ingest (Ray Data reads each input file with its shard, Ray Train streams it
to one worker) and from tensors already in memory (a Ray task, a plain loop over a sample).
Reports the driver's own peak RSS (ru_maxrss) against the store's size, and store-fed
examples/s against in-memory examples/s (training loop time only, both sides).
"""
from __future__ import annotations

import json
import math
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from kd_ops import data, models, store
from kd_ops.fsio import Loc
from workflows import console
from kd_ops.method_loss import Distill
from workflows.loop import Loop

CLASSES, FEATURES = 1000, 40
STUDENT = "kd_ops.models:cnn"  # a 1-D CNN with a 1,000-class head; --student-width sets its width
SETTINGS = {"kind": "full", "top_k": None, "tail_samples": 0, "teacher_dtype": "float32"}


def _columns() -> dict:
    return {"logits": {"dtype": "float16", "shape": [CLASSES]}}


@ray.remote(num_cpus=1)
def _write_files(root: str, first: int, count: int, rows_per_file: int) -> dict[str, dict]:
    """Input files first..first+count and their shards (one teacher `t`), committed; returns their keys."""
    keys = {}
    for i in range(first, first + count):
        rng = np.random.default_rng(i)
        ids = np.arange(i * rows_per_file, (i + 1) * rows_per_file, dtype=np.int64)
        x = rng.standard_normal((rows_per_file, FEATURES), dtype=np.float32)
        y = rng.integers(0, CLASSES, rows_per_file)
        name = f"part-{i:05d}.parquet"
        f = Loc.of(root) / "inputs" / "train" / name
        with f.open_output() as out:  # the layout of every input split: id, x, label
            pq.write_table(data.to_table(data.Inputs(ids, x, y)), out)
        keys[name] = data.file_key(f)
        logits = (rng.standard_normal((rows_per_file, CLASSES), dtype=np.float32) * 3).astype(np.float16)
        store.write_shard(Loc.of(root) / "store", "t", "train", name, store.shard_table(ids, {"logits": logits}),
                          keys[name], "synthetic", SETTINGS, _columns())
    return keys


def build_store(root: Path, target_bytes: int, rows_per_file: int) -> tuple[int, int]:
    """(store bytes, rows): files are added in parallel Ray tasks until the store reaches target_bytes."""
    row_bytes = 2 * CLASSES
    files = max(2, math.ceil(target_bytes / (row_bytes * rows_per_file)))
    per_task = max(1, files // (4 * int(ray.cluster_resources().get("CPU", 1))))
    refs = {_write_files.remote(str(root), i, min(per_task, files - i), rows_per_file): min(per_task, files - i)
            for i in range(0, files, per_task)}
    keys: dict[str, dict] = {}
    bar, pending = console.progress("store", "input files + shards"), list(refs)
    while pending:
        [ready], pending = ray.wait(pending, num_returns=1)
        keys |= ray.get(ready)
        bar(len(keys), files)
    store.publish(root / "store", "t", kind="full", columns=_columns(), inputs={"train": keys},
                  teacher_fp="synthetic", settings=SETTINGS)
    return store.size_bytes(root / "store"), files * rows_per_file


@ray.remote(num_cpus=1)
def _in_memory(loop, rows: int, seed: int = 0) -> dict[str, float]:
    """The training step of the Train workers (`worker.step`: same student, loss, optimiser and LR
    schedule) on tensors already in memory, one thread as a Train worker has."""
    from workflows import worker

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((rows, FEATURES), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, CLASSES, rows))
    t = torch.from_numpy((rng.standard_normal((rows, 1, CLASSES), dtype=np.float32) * 3).astype(np.float16))
    loop = loop.replace(train_rows=rows)
    model = models.build(loop.factory, loop.kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=loop.lr, weight_decay=loop.weight_decay)
    sched, w = worker.schedule(opt, loop, 1), torch.tensor(loop.distill.teacher_weights)
    b = loop.batch_size
    start = time.perf_counter()
    for i in range(0, rows, b):
        worker.step(model, opt, sched, {"x": x[i:i + b], "y": y[i:i + b], "logits": t[i:i + b]}, loop, w)
    return {"rows": rows, "seconds": time.perf_counter() - start}


def bench_ingest(target_gb: float, rows_per_file: int, batch: int, memory_rows: int, width: int,
                 keep: str | None, read_tasks: int = 2) -> dict[str, Any]:
    from workflows import ingest, ray_session, train

    ray_session.init_ray()
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="kd-bench-ingest-"))
    try:
        start = time.perf_counter()
        kept = store.read_manifest(root / "store", "t") if keep else None
        if kept is not None:  # a store --keep left: the same comparison again without rebuilding it
            store_bytes, rows = store.size_bytes(root / "store"), kept["rows"]
        else:
            console.say(f"==> building a {target_gb:g} GB synthetic store in {root}")
            store_bytes, rows = build_store(root, int(target_gb * 1e9), rows_per_file)
        build_s = time.perf_counter() - start
        splits = {"train": root / "inputs" / "train"}
        train_ds, n, _ = ingest.dataset(splits, feature_columns=["x"], label_column="label", store_dir=root / "store",
                                     teachers=["t"], shuffle=True, read_tasks=read_tasks)
        # validation: one input file of the same store (the loop validates once per epoch)
        first = sorted((root / "inputs" / "train").glob("*.parquet"))[0]
        val_dir = root / "val"
        val_dir.mkdir(exist_ok=True)
        shutil.copy(first, val_dir / first.name)
        val_ds, _, _ = ingest.dataset({"train": val_dir}, feature_columns=["x"], label_column="label",
                                   store_dir=root / "store", teachers=["t"], shuffle=False)
        kwargs = {"num_classes": CLASSES, "width": width}
        loop = Loop(factory=STUDENT, kwargs=kwargs, epochs=1, batch_size=batch, lr=1e-3,
                    weight_decay=0.0, seed=0, train_rows=n, label="bench ingest",
                    distill=Distill((1.0,), temperature=2.0, alpha=0.9))
        shutil.rmtree(root / "ray", ignore_errors=True)  # a fit of a kept store's last run would be reused, not timed
        console.say(f"==> store-fed fit: {n:,} rows streamed from {store_bytes / 1e9:.2f} GB, 1 epoch "
                    f"(at ~20k rows/s on a 2-core CPU machine: ~{n / 20000:.0f} s)")
        res = train.fit(loop, {"train": train_ds, "val": val_ds}, name="bench-ingest", storage=root / "ray",
                        num_workers=1, use_gpu=False, progress=lambda e: console.progress("store-fed", "epochs")(e, 1))
        store_fed = res.metrics["train_rows"] / res.metrics["train_seconds"]
        console.say(f"==> in-memory loop: {memory_rows:,} rows, the same training step")
        mem = ray.get(_in_memory.remote(loop, memory_rows))
        in_memory = mem["rows"] / mem["seconds"]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
        return {"store_bytes": store_bytes, "rows": rows, "read_tasks": read_tasks, "rows_per_file": rows_per_file, "classes": CLASSES,
                "batch_size": batch, "student_params": models.num_params(models.build(STUDENT, kwargs)), "store_build_seconds": build_s,
                "driver_peak_rss_bytes": peak, "driver_rss_over_store": peak / store_bytes,
                "store_fed_per_s": store_fed, "store_fed_rows": res.metrics["train_rows"],
                "store_fed_seconds": res.metrics["train_seconds"],
                "store_fed_data_wait_seconds": res.metrics["data_wait_seconds"],
                "store_fed_first_batch_seconds": res.metrics["data_first_batch_seconds"],
                "in_memory_per_s": in_memory, "in_memory_rows": mem["rows"], "in_memory_seconds": mem["seconds"],
                "store_fed_over_in_memory": store_fed / in_memory}
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def main(args) -> int:
    r = bench_ingest(args.store_gb, args.rows_per_file, args.batch_size, args.memory_rows, args.student_width,
                     args.keep, args.read_tasks)
    if not args.json:
        for k, v in r.items():
            console.say(f"{k}: {v:,.3f}" if isinstance(v, float) else f"{k}: {v:,}")
    else:
        console.say(json.dumps(r))
    return 0
