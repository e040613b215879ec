"""The layer under the search and ship stages: real input rows, and latency measured by one Ray
task placed on `deploy.target` (the shipped student's runtimes, or each trial's architecture).
The maths (export, timing) is kd_ops.deploy's."""
from __future__ import annotations

import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray

from kd_ops import data, deploy as dp, models
from workflows import console
from workflows.loop import Loop


def sample_rows(split_dir, task, n: int, seed: int = 0) -> np.ndarray:
    """`n` real input rows of a split, drawn at random from its files (read in a seeded random order
    until there are enough), e.g. to calibrate INT8 — never random tensors."""
    rng = np.random.default_rng(seed)
    files = data.parquet_files(split_dir)
    parts, have = [], 0
    for i in rng.permutation(len(files)):
        table = data.read_table(files[i], columns=task.feature_columns)
        parts.append(data.features(table, task.feature_columns, str(files[i]), np.dtype(task.input_dtype)))
        have += len(parts[-1])
        if have >= 4 * n:
            break
    rows = np.concatenate(parts)
    return rows[np.sort(rng.choice(len(rows), size=min(n, len(rows)), replace=False))]


def _example(x: np.ndarray, task) -> np.ndarray:
    return x.astype(task.example_dtype)


def gpu_note(d) -> str:
    return ("GPU latency: measured on the target's GPU" if d.target.accelerator_type
            else "GPU latency: not measured (deploy.target names no accelerator)")


def latency_on_target(d, task, student: dict, fp32: bytes, int8: bytes | None, teacher: dict | None,
                      rows: np.ndarray) -> dict[str, Any]:
    """Median and p95 latency of the teacher (PyTorch), the student in PyTorch fp32, ONNX Runtime
    fp32 and INT8, per batch size, measured by one Ray task placed on `deploy.target`."""
    t = d.target
    timed = (3 + (teacher is not None) + (int8 is not None)) * len(t.batch_sizes)
    console.say(f"deploy: timing on the target ({_describe(t)}): {timed} runtime × batch size pairs, each about "
                f"{t.seconds:g} s of timed runs (at most {t.runs}): ~{timed * t.seconds * 1.25:.0f} s, longer only "
                "where 3 runs take more")
    ref = ray.remote(_measure).options(**d.target.ray_options()).remote(
        student, fp32, int8, teacher, _example(rows, task), t.batch_sizes, t.threads, t.runs, t.warmup,
        t.seconds, bool(t.accelerator_type))
    res = ray.get(ref)
    return {"latency": res["rows"], "target": {"description": _describe(t), "node": res["node"], "cpu": res["cpu"],
                                               "threads": t.threads}, "gpu": res.get("gpu") or gpu_note(d)}


def _describe(t) -> str:
    where = (f"Ray resources {dict(t.resources)}" if t.resources else "any node") + \
        (f", accelerator {t.accelerator_type}" if t.accelerator_type else "")
    return f"{where}, {t.threads} thread(s), batch sizes {t.batch_sizes}"


def _torch_model(spec: dict, device: str):
    from safetensors.torch import load

    model = models.build(spec["factory"], spec["kwargs"])
    models.unwrap(model).load_state_dict(load(spec["weights"]))
    return model.eval().to(device)


def _measure(student: dict, fp32: bytes, int8: bytes | None, teacher: dict | None, rows: np.ndarray,
             batch_sizes: list[int], threads: int, runs: int, warmup: int, seconds: float,
             gpu: bool) -> dict[str, Any]:
    """Runs on the target: the timings of kd_ops.deploy.measure_latency for each runtime."""
    import torch

    torch.set_num_threads(threads)
    device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    runners = {}
    if teacher:
        runners["teacher-pytorch-fp32"] = dp.torch_runner(_torch_model(teacher, device), threads)
    runners["pytorch-fp32"] = dp.torch_runner(_torch_model(student, device), threads)
    runners["onnxruntime-fp32"] = dp.onnx_runner(fp32, threads)
    if int8 is not None:
        runners["onnxruntime-int8"] = dp.onnx_runner(int8, threads)
    note = None
    if gpu:
        note = (f"GPU latency: PyTorch on {torch.cuda.get_device_name() if device == 'cuda' else 'no GPU visible'}; "
                "ONNX Runtime rows ran on the CPU (this onnxruntime build has no CUDA provider)")
    return {"rows": dp.measure_latency(runners, rows, batch_sizes, runs=runs, warmup=warmup, seconds=seconds),
            "node": platform.node(), "cpu": _cpu_name(), "gpu": note}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def trial_latencies(task, loop: Loop, trials: list[dict], width_kwarg: str,
                    rows: np.ndarray) -> dict[int, dict[str, float]]:
    """{width: {latency_ms, params}} for every student width the search tried: ONNX Runtime fp32 at
    deploy.budget_batch_size on the target (latency depends on the architecture, not the weights)."""
    widths = sorted({int(t.get("student_width", loop.kwargs.get(width_kwarg, 0))) for t in trials})
    d = task.cfg.deploy
    ref = ray.remote(_measure_widths).options(**d.target.ray_options()).remote(
        loop.factory, loop.kwargs, width_kwarg, widths, _example(rows, task), d.budget_batch_size,
        d.target.threads, d.target.runs, d.target.warmup, d.target.seconds, d.opset)
    return ray.get(ref)


def _measure_widths(factory, kwargs, width_kwarg, widths, rows, batch, threads, runs, warmup, seconds, opset):
    import torch

    torch.set_num_threads(threads)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for w in widths:
            model = models.build(factory, {**kwargs, width_kwarg: w}).eval() if w else models.build(factory, kwargs).eval()
            path = Path(tmp) / f"w{w}.onnx"
            dp.export_onnx(model, torch.from_numpy(rows[:2]), path, opset=opset)
            r = dp.measure_latency({"onnxruntime-fp32": dp.onnx_runner(path.read_bytes(), threads)}, rows, [batch],
                                   runs=runs, warmup=warmup, seconds=seconds)[0]
            out[w] = {"latency_ms": r["median_ms"], "params": models.num_params(model)}
    return out
