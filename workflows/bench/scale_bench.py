"""`kd bench scale --nodes 1,2,4 --json`: precompute throughput on N local Ray nodes of equal CPUs
(`ray.cluster_utils.Cluster`: a head with no CPUs, N worker nodes), as a ratio to one node.

Every N runs the same MNIST-1D teacher (the bench's 88-wide CNN) over the same synthetic inputs
through the real precompute (one actor per CPU, one thread each, one shard per input file) and
times it end to end. The nodes share this machine, so the numbers mean something only when it
has at least (max N × CPUs per node) cores: say so rather than trust a ratio measured on fewer.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from kd_ops import data, models
from workflows import console

TEACHER = {"factory": "kd_ops.models:cnn", "kwargs": {"width": 88}}


def _one(nodes: int, cpus: int, batch: int, tmp: Path) -> float:
    """Seconds for one precompute of the inputs in `tmp` on `nodes` nodes of `cpus` CPUs."""
    import ray
    from ray.cluster_utils import Cluster

    from workflows import precompute as pre
    from workflows import ray_session
    from workflows.config import TeacherConfig

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=cpus)
        cluster.wait_for_nodes()
        ray_session.init_ray(cluster.address)
        inputs = tmp / "inputs"
        weights = tmp / "teacher.safetensors"
        teacher = TeacherConfig(name="t", weights=str(weights), **TEACHER)
        start = time.perf_counter()
        pre.precompute([teacher], {"bench": inputs}, tmp / f"store-{nodes}", feature_columns=["x"], batch_size=batch,
                       num_actors=nodes * cpus, use_gpu=False, threads=1)
        return time.perf_counter() - start
    finally:
        ray.shutdown()
        cluster.shutdown()


def bench_scale(node_counts: list[int], cpus: int, rows: int, rows_per_file: int, batch: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="kd-bench-scale-"))
    try:
        x = np.random.default_rng(0).standard_normal((rows, 40)).astype(np.float32)
        data.write_split(data.Inputs(np.arange(rows, dtype=np.int64), x, None), tmp / "inputs", rows_per_file)
        models.save_weights(models.build(TEACHER["factory"], TEACHER["kwargs"]), tmp / "teacher.safetensors")
        seconds = {n: _one(n, cpus, batch, tmp) for n in node_counts}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows / seconds[node_counts[0]]
    cores = os.cpu_count() or 1
    return {"rows": rows, "rows_per_file": rows_per_file, "cpus_per_node": cpus, "machine_cores": cores,
            "meaningful": cores >= max(8, max(node_counts) * cpus),
            "nodes": {str(n): {"seconds": s, "rows_per_s": rows / s, "ratio_to_first": (rows / s) / base}
                      for n, s in seconds.items()}}


def main(args) -> int:
    counts = [int(n) for n in args.nodes.split(",")]
    cpus = args.cpus_per_node or max(1, (os.cpu_count() or 1) // max(counts))
    r = bench_scale(counts, cpus, args.rows, args.rows_per_file, args.batch_size)
    if not r["meaningful"]:
        console.say(f"kd bench scale: this machine has {r['machine_cores']} cores (needs ≥ 8 and ≥ {max(counts)} nodes × {cpus} "
              "CPUs): the nodes compete for cores and the ratios below do not measure scaling")
    for n, v in r["nodes"].items():
        console.say(f"{n} node(s) × {cpus} CPU: {v['rows_per_s']:,.0f} rows/s ({v['seconds']:.1f} s), "
              f"{v['ratio_to_first']:.2f}× {counts[0]} node(s)")
    if args.json:
        console.say(json.dumps(r))
    return 0
