"""`kd bench precompute` and `kd bench train`: both sides of a comparison timed in one run.

precompute: a plain PyTorch loop (forward, full logits or top-k, copy to host) against the kd-ops
precompute pipeline (Ray Data actor pool writing the real store), same teacher, data and device.
The pipeline is run twice, on N and N/5 rows: end-to-end is N / T(N); steady state is
(N − N/5) / (T(N) − T(N/5)), which cancels start-up (Ray Data planning, actor start, model load).

train: student-only steps (labels), offline KD (soft labels read from the store's arrays) and
online KD (teacher forward every step), same student, same batches, one process.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd_ops import data, losses, models, store
from kd_ops import token_losses as tl
from workflows import console

log = logging.getLogger("kd")

MNIST1D_TEACHER = {"factory": "kd_ops.models:cnn", "kwargs": {"width": 88}}
MNIST1D_STUDENT = {"factory": "kd_ops.models:cnn", "kwargs": {"width": 24}}
# ~135M parameters: 12 layers × 768 wide, 32k vocabulary (as in the reference numbers)
LM_TEACHER = {"n_layer": 12, "n_embd": 768, "n_head": 12}
LM_STUDENT = {"n_layer": 2, "n_embd": 512, "n_head": 8}  # ~20M: mostly embeddings at 32k vocab


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class GpuUtilisation:
    """Mean GPU utilisation (%, NVML via torch) sampled every 0.2 s while the block runs; None
    without a GPU or NVML. Device-wide, so it sees the Ray actor's work too."""

    def __init__(self, device: torch.device):
        self.samples: list[float] = []
        self._on = device.type == "cuda"
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.samples.append(float(torch.cuda.utilization()))
            except Exception:  # no pynvml / NVML: report None, not a guess
                return

    def __enter__(self) -> "GpuUtilisation":
        if self._on:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._on:
            self._stop.set()
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def _teacher_and_inputs(kind: str, rows: int, seq_len: int, device: torch.device, dtype: torch.dtype):
    """(model spec for the pipeline, built model, inputs [rows, ...], input dtype name, top_k)."""
    rng = np.random.default_rng(0)
    if kind == "mnist1d":
        model = models.build(MNIST1D_TEACHER["factory"], MNIST1D_TEACHER["kwargs"])
        x = rng.standard_normal((rows, 40)).astype(np.float32)
        return model, x, "float32", None
    from kd_ops import lm

    model = lm.new_causal_lm(32000, seq_len, **LM_TEACHER)
    x = rng.integers(0, 32000, (rows, seq_len)).astype(np.int32)
    return model, x, "int64", 32


@torch.inference_mode()
def plain_loop(model, x: np.ndarray, batch: int, device, dtype, top_k) -> float:
    """Seconds for forward + (top-k) + copy to host over all of x, after one warm-up batch."""
    model = model.to(device=device, dtype=dtype).eval()
    as_tensor = lambda a: torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
    store.teacher_arrays(model(as_tensor(x[:batch]).long() if top_k else as_tensor(x[:batch]).to(dtype)), top_k)
    _sync(device)
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        xb = as_tensor(x[i:i + batch])
        store.teacher_arrays(model(xb.long() if top_k else xb.to(dtype)), top_k)
    _sync(device)
    return time.perf_counter() - start


def bench_precompute(teacher: str, device_name: str, rows: int, batch: int, seq_len: int, actors: int,
                     threads: int | None = None, calls_per_actor: int = 2) -> dict[str, Any]:
    from workflows import precompute as pre
    from workflows import ray_session
    from workflows.config import TeacherConfig

    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" and teacher == "lm" else torch.float32
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, x, input_dtype, top_k = _teacher_and_inputs(teacher, rows, seq_len, device, dtype)
    tokens_per_row = x.shape[1] if teacher == "lm" else 1
    tmp = Path(tempfile.mkdtemp(prefix="kd-bench-"))
    try:
        weights = tmp / "teacher.safetensors"
        if teacher == "lm":
            model.hf.save_pretrained(tmp / "teacher")
            tcfg = TeacherConfig(name="teacher", hf_dir=tmp / "teacher")
        else:
            models.save_weights(model, weights)
            tcfg = TeacherConfig(name="teacher", weights=str(weights), **MNIST1D_TEACHER)
        with GpuUtilisation(device) as plain_util:
            plain_s = plain_loop(model, x, batch, device, dtype, top_k)
        ray_session.init_ray()
        timings = {}
        for n in (rows // 5, rows):
            split = data.write_split(data.Inputs(np.arange(n, dtype=np.int64), x[:n], None), tmp / f"in-{n}",
                                     rows_per_file=max(batch * 4, 1))
            start = time.perf_counter()
            with GpuUtilisation(device) as util:
                pre.precompute([tcfg], {"bench": split}, tmp / f"store-{n}", feature_columns=["x"], batch_size=batch,
                               num_actors=actors, use_gpu=device.type == "cuda", top_k=top_k, input_dtype=input_dtype,
                               teacher_dtype=str(dtype).removeprefix("torch."), threads=threads,
                               calls_per_actor=calls_per_actor)
            timings[n] = time.perf_counter() - start
        small, big = rows // 5, rows
        steady = (big - small) / max(timings[big] - timings[small], 1e-9)
        plain = rows / plain_s
        return {"teacher": teacher, "device": device_name, "teacher_params": models.num_params(model),
                "rows": rows, "tokens_per_row": tokens_per_row, "batch_size": batch, "top_k": top_k,
                "actors": actors, "threads_per_actor": pre.actor_threads(threads, actors, device.type == "cuda"),
                "plain_threads": torch.get_num_threads(), "calls_per_actor": calls_per_actor,
                "plain_per_s": plain, "plain_tokens_per_s": plain * tokens_per_row,
                "pipeline_per_s": steady, "pipeline_tokens_per_s": steady * tokens_per_row,
                "pipeline_end_to_end_per_s": rows / timings[big],
                "ratio": steady / plain, "ratio_end_to_end": (rows / timings[big]) / plain,
                "pipeline_seconds": {str(k): v for k, v in timings.items()}, "plain_seconds": plain_s,
                "store_bytes_per_row": store.size_bytes(tmp / f"store-{big}") / big,
                "gpu_utilization_percent": {"plain": plain_util.mean, "pipeline": util.mean}}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_train(pair: str, device_name: str, steps: int, batch: int, seq_len: int) -> dict[str, Any]:
    """Steps/s of student-only, offline KD (store-fed soft labels) and online KD (teacher forward)."""
    device = torch.device(device_name)
    torch.manual_seed(0)
    if pair == "mnist1d":
        teacher = models.build(**MNIST1D_TEACHER).to(device).eval()
        student = models.build(**MNIST1D_STUDENT).to(device)
        x = torch.randn(steps * batch, 40, device=device)
        y = torch.randint(0, 10, (steps * batch,), device=device)
        with torch.inference_mode():
            stored = torch.cat([teacher(x[i:i + 4096]) for i in range(0, len(x), 4096)]).half()
        w = torch.tensor([1.0], device=device)

        def loss_fn(xb, yb, soft):
            out = student(xb)
            if soft is None:
                return losses.hard_label_loss(out, yb)
            return losses.distillation_loss(out, soft[None], yb, temperature=2.0, alpha=0.9, weights=w)[0]

        def batch_at(i):
            s = slice(i * batch, (i + 1) * batch)
            return x[s], y[s], stored[s]

        def online(xb):
            with torch.inference_mode():
                return teacher(xb).half()
    else:
        from kd_ops import lm

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        teacher = lm.new_causal_lm(32000, seq_len, **LM_TEACHER).to(device, dtype).eval()
        student = lm.new_causal_lm(32000, seq_len, **LM_STUDENT).to(device)
        ids = torch.randint(0, 32000, (steps * batch, seq_len), device=device)
        with torch.inference_mode():
            sup = [tl.topk_support(teacher(ids[i:i + batch]), 32) for i in range(0, len(ids), batch)]
        w = torch.tensor([1.0], device=device)

        def loss_fn(xb, yb, soft):
            kd, ce = tl.lm_distillation_sums(student(xb), xb, soft, w if soft is not None else None)
            return losses.mix(kd, ce, 0.9) / xb.numel() if soft is not None else ce / xb.numel()

        def batch_at(i):
            v, idx, lse = sup[i]
            return ids[i * batch:(i + 1) * batch], None, {"values": v[:, None].clone(), "indices": idx[:, None].clone(),
                                                          "lse": lse[:, None].clone()}

        def online(xb):
            with torch.inference_mode():
                v, idx, lse = tl.topk_support(teacher(xb), 32)
            return {"values": v[:, None].clone(), "indices": idx[:, None].clone(), "lse": lse[:, None].clone()}

    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)

    def run(mode: str) -> float:
        def step(i):
            xb, yb, soft = batch_at(i % steps)
            soft = None if mode == "student_only" else (online(xb) if mode == "online" else soft)
            loss = loss_fn(xb, yb, soft)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for i in range(3):  # warm-up
            step(i)
        _sync(device)
        start = time.perf_counter()
        for i in range(steps):
            step(i)
        _sync(device)
        return steps / (time.perf_counter() - start)

    rates = {m: run(m) for m in ("student_only", "offline", "online")}
    return {"pair": pair, "device": device_name, "steps": steps, "batch_size": batch,
            "teacher_params": models.num_params(teacher), "student_params": models.num_params(student),
            "student_only_steps_per_s": rates["student_only"], "offline_kd_steps_per_s": rates["offline"],
            "online_kd_steps_per_s": rates["online"],
            "offline_vs_student_only": rates["offline"] / rates["student_only"],
            "offline_vs_online": rates["offline"] / rates["online"]}


def main(args) -> int:
    if args.bench == "precompute":
        teacher = args.teacher or ("lm" if args.device == "cuda" else "mnist1d")
        rows = args.rows or (2048 if teacher == "lm" else 500_000)
        batch = args.batch_size or (32 if teacher == "lm" else 2048)  # 2048: the plain loop's best on this CPU
        r = bench_precompute(teacher, args.device, rows, batch, args.seq_len, args.actors, args.threads,
                             args.calls_per_actor)
    else:
        pair = args.pair or ("lm" if args.device == "cuda" else "mnist1d")
        r = bench_train(pair, args.device, args.steps, args.batch_size or (32 if pair == "lm" else 256), args.seq_len)
    console.say(json.dumps(r) if args.json else "\n".join(f"{k}: {v}" for k, v in r.items()))
    return 0
