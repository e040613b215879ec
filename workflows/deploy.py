"""`kd run`'s deploy stage: the registered student exported to ONNX and checked against PyTorch on
real test rows, quantized to INT8 (ONNX Runtime, calibrated on real training rows), fine-tuned
with quantization-aware distillation through the same Train loop when INT8 loses more than
`deploy.int8_max_drop`, and timed by a Ray task placed on `deploy.target`. Also the latency of
each tune trial's architecture, the smallest student under a budget and the Pareto picture.
The maths (export, quantization, timing) is kd_ops.deploy's; this file places and records it."""
from __future__ import annotations

import dataclasses

import io
import logging
import math
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import ray

from kd_ops import data, deploy as dp, evaluate, models
from kd_ops.fsio import Loc
from workflows import console, evaluation, stages, tune
from workflows.loop import Loop
from workflows.layout import Layout

log = logging.getLogger("kd")

RUNTIMES = ("pytorch-fp32", "onnxruntime-fp32", "onnxruntime-int8")


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


def _export(model, rows: np.ndarray, task, path: Path, opset: int) -> float:
    """Export to `path`; returns max |Δlogit| between ONNX Runtime and PyTorch on `rows`."""
    import torch

    dp.export_onnx(model, torch.from_numpy(_example(rows[:2], task)), path, opset=opset)
    return dp.max_abs_diff(model, path, _example(rows, task))


def stage(task, lay: Layout, loop: Loop, weights, kd_sets, dirs, train_sets, fp32_row: dict,
          teachers, tracker) -> dict[str, Any]:
    """Export, INT8 (PTQ, then QAT when PTQ loses too much), latency on the target. Returns the
    summary's `deploy` section; files under --out/deploy and in the MLflow run's `deploy/`."""
    work = Path(tempfile.mkdtemp(prefix="kd-deploy-"))
    try:
        return _stage(task, lay, loop, weights, kd_sets, dirs, train_sets, fp32_row, teachers, tracker, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _stage(task, lay, loop, weights, kd_sets, dirs, train_sets, fp32_row, teachers, tracker, work: Path):
    d = task.cfg.deploy
    out: dict[str, Any] = {}
    student = models.load_weights(models.build(loop.factory, loop.kwargs), weights).eval()
    test_rows = sample_rows(dirs[task.eval_split], task, 256, seed=1)
    fp32 = work / "student.onnx"
    try:
        diff = _export(student, test_rows, task, fp32, d.opset)
    except ValueError as e:  # e.g. an LM whose graph the exporter cannot take: the run still finishes
        console.say(f"deploy: ONNX export skipped: {e}")
        return {"onnx_error": str(e), "gpu": _gpu_note(d)}
    scale = max(1.0, float(np.abs(evaluate.predict_logits(student, _example(test_rows, task))).max()))
    if not diff <= 1e-3 * scale:
        raise ValueError(f"deploy: the ONNX export differs from PyTorch by {diff:.2e} on real test rows "
                         f"(bound {1e-3 * scale:.1e}); set deploy.enabled: false to skip it, and report it")
    out["onnx"] = {"opset": d.opset, "max_abs_logit_diff": diff, "fp32_file_bytes": dp.file_bytes(fp32),
                   "fp32_weight_bytes": dp.weight_bytes(fp32), "rows_checked": len(test_rows)}
    console.say(f"deploy: ONNX opset {d.opset}, max |Δlogit| vs PyTorch {diff:.1e} on {len(test_rows)} test rows")
    files = {"student.onnx": fp32}
    int8 = None
    if d.int8:
        calib = sample_rows(dirs["train"], task, d.calibration_rows, seed=2)
        try:
            int8, out["int8"], qat_weights = _int8(task, lay, loop, weights, kd_sets, train_sets, fp32_row, calib,
                                                    fp32, work, tracker)
        except Exception as e:  # noqa: BLE001 - like a failed export: the run finishes and ships fp32
            log.exception("deploy: INT8 quantization failed")
            out["int8_error"] = evaluation.one_line(e)
        else:
            files["student.int8.onnx"] = int8
            if qat_weights is not None:
                files["student.qat.onnx"] = work / "student.qat.onnx"
    teacher = teachers[0]
    teacher_spec = ({"factory": teacher.factory, "kwargs": teacher.kwargs,
                     "weights": Loc.of(teacher.weights).read_bytes()} if teacher.factory else None)
    if teacher_spec:
        out["teacher_file_bytes"] = len(teacher_spec["weights"])
    out["student_file_bytes"] = Loc.of(weights).size()
    out |= latency_on_target(d, task, {"factory": loop.factory, "kwargs": loop.kwargs,
                                       "weights": Loc.of(weights).read_bytes()},
                             fp32.read_bytes(), int8.read_bytes() if int8 else None, teacher_spec, test_rows)
    for name, f in files.items():
        (lay.out / "deploy" / name).write_bytes(f.read_bytes())
        if tracker:
            tracker.log_file(lay.out / "deploy" / name, "deploy")
    out["files"] = sorted(files)
    return out


def _quality(task, row: dict) -> float:
    return row[task.quality_key]


def _onnx_loop(loop: Loop, path: Path) -> Loop:
    """The loop of an ONNX file, scored on the cluster like any model."""
    return loop.replace(factory="kd_ops.deploy:onnx_module", kwargs={"data": path.read_bytes()})


def _score_onnx(task, loop: Loop, path: Path, kd_sets) -> dict[str, Any]:
    """The task's test report for the ONNX file that ships."""
    row = task.model_report(_onnx_loop(loop, path), None, kd_sets)
    row.pop("params", None)
    return row


def _int8(task, lay, loop: Loop, weights, kd_sets, train_sets, fp32_row, calib, fp32: Path, work: Path, tracker):
    """PTQ, then QAT when PTQ loses more than deploy.int8_max_drop: every choice is made on the
    validation split (`task.choice_key`); the test split scores only the INT8 model that ships."""
    cfg = task.cfg
    d, key = cfg.deploy, task.choice_key
    def val_score(onnx: Path) -> float:  # the ONNX files compared: what quantization alone changed
        return task.choice_score(_onnx_loop(loop, onnx), None, kd_sets)

    fp32_val = val_score(fp32)
    int8 = dp.quantize_int8(fp32, calib, work / "student.int8.onnx")
    ptq = val_score(int8)
    drop = task.int8_drop(fp32_val, ptq)
    row = {"method": "ptq", "chosen_by": key, "calibration_rows": len(calib), "file_bytes": dp.file_bytes(int8),
           "weight_bytes": dp.weight_bytes(int8), "fp32_" + key: fp32_val, "ptq_" + key: ptq, "ptq_drop": drop,
           "qat_epochs": None, "qat_" + key: None, "max_drop": d.int8_max_drop}
    console.say(f"deploy: INT8 (PTQ, {len(calib)} calibration rows) {key} {ptq:.4f}, fp32 {fp32_val:.4f}: "
                f"drop {drop:.4f} (tolerance {d.int8_max_drop})")
    shipped, qat_weights = int8, None
    if d.qat == "always" or (d.qat == "auto" and drop > d.int8_max_drop):
        # quantization-aware distillation: the fp32 student fine-tuned through INT8 fake quantization
        # with the same stored soft labels and loss, then exported and quantized again. A feature term
        # is left out: its projection was trained beside the student but is not saved or shipped.
        qloop = loop.replace(init_weights=Loc.of(weights).uri, fake_quant=True, epochs=d.qat_epochs,
                             lr=loop.lr * d.qat_lr_scale, label="qat student", features=None,
                             method=dataclasses.replace(loop.method, feature=None, feature_weight=0.0))
        with stages.child_fit(cfg.train, tracker, "qat-student", {"epochs": d.qat_epochs, "lr": qloop.lr}, qloop,
                              train_sets, name="qat-student", lay=lay) as res:
            model = models.load_weights(models.build(loop.factory, loop.kwargs), res.weights).eval()
            _export(model, calib[:64], task, work / "student.qat.onnx", d.opset)
            qint8 = dp.quantize_int8(work / "student.qat.onnx", calib, work / "student.qat.int8.onnx")
            qat = val_score(qint8)
        qdrop = task.int8_drop(fp32_val, qat)
        console.say(f"deploy: INT8 after {d.qat_epochs} epochs of quantization-aware distillation "
                    f"{key} {qat:.4f}: drop {qdrop:.4f} (PTQ alone {drop:.4f})")
        row |= {"qat_epochs": d.qat_epochs, "qat_" + key: qat, "qat_drop": qdrop}
        if qdrop < drop:  # keep whichever INT8 model loses less on validation
            shipped, qat_weights = qint8, res.weights
            row |= {"method": "qat", "file_bytes": dp.file_bytes(qint8), "weight_bytes": dp.weight_bytes(qint8)}
    test = _score_onnx(task, loop, shipped, kd_sets)
    row |= test | {"test_drop": task.int8_drop(_quality(task, fp32_row), _quality(task, test))}
    return shipped, row, qat_weights


def _gpu_note(d) -> str:
    return ("GPU latency: measured on the target's GPU" if d.target.accelerator_type
            else "GPU latency: not measured (deploy.target names no accelerator)")


def latency_on_target(d, task, student: dict, fp32: bytes, int8: bytes | None, teacher: dict | None,
                      rows: np.ndarray) -> dict[str, Any]:
    """Median and p95 latency of the teacher (PyTorch), the student in PyTorch fp32, ONNX Runtime
    fp32 and INT8, per batch size, measured by one Ray task placed on `deploy.target`."""
    t = d.target
    console.say(f"deploy: timing on the target ({_describe(t)}), {t.runs} runs per runtime and batch size")
    ref = ray.remote(_measure).options(**d.target.ray_options()).remote(
        student, fp32, int8, teacher, _example(rows, task), t.batch_sizes, t.threads, t.runs, t.warmup,
        bool(t.accelerator_type))
    res = ray.get(ref)
    return {"latency": res["rows"], "target": {"description": _describe(t), "node": res["node"], "cpu": res["cpu"],
                                               "threads": t.threads}, "gpu": res.get("gpu") or _gpu_note(d)}


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
             batch_sizes: list[int], threads: int, runs: int, warmup: int, gpu: bool) -> dict[str, Any]:
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
    return {"rows": dp.measure_latency(runners, rows, batch_sizes, runs=runs, warmup=warmup),
            "node": platform.node(), "cpu": _cpu_name(), "gpu": note}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- tune trials: latency per architecture, the smallest student under a budget, the Pareto front


def trials_on_target(task, lay, tracker, search_base, names, trials, kd_sets, dirs):
    """Each trial's latency on the target beside its validation score, the Pareto picture, and
    with a budget the smallest student that meets it (else exit 2 naming the closest trial)."""
    cfg = task.cfg
    d, lm = cfg.deploy, task.perplexity_quality
    rows = sample_rows(dirs[task.eval_split], task, 256, seed=1)
    lat = trial_latencies(task, search_base, trials, cfg.student.width_kwarg, rows)
    reference = task.trial_reference(kd_sets)
    annotate_trials(trials, lat, search_base, cfg.student.width_kwarg, reference, lm)
    budget, base = None, None
    if d.latency_budget_ms is not None or d.quality_target is not None:
        budget = {"latency_budget_ms": d.latency_budget_ms, "quality_target": d.quality_target,
                  "batch_size": d.budget_batch_size, "reference": reference, "counted_by": "best epoch",
                  **pick_under_budget(trials, d.latency_budget_ms, d.quality_target, lm)}
        chosen = next(t for t in trials if t["trial_id"] == budget["chosen_trial"])
        base = tune.apply_trial(search_base, chosen, names, cfg.student.width_kwarg)
        console.say(f"budget: trial {chosen['trial_id']}: {budget['reason']}")
    png = pareto_png(trials, budget and budget["chosen_trial"], d.latency_budget_ms, d.quality_target, lm)
    (lay.out / "deploy" / "pareto.png").write_bytes(png)
    tracker.log_file(lay.out / "deploy" / "pareto.png", "deploy")
    mlflow.log_dict({"trials": trials, "budget": budget}, "deploy/trials.json")
    return base, budget, "deploy/pareto.png"


def trial_latencies(task, loop: Loop, trials: list[dict], width_kwarg: str,
                    rows: np.ndarray) -> dict[int, dict[str, float]]:
    """{width: {latency_ms, params}} for every student width the search tried: ONNX Runtime fp32 at
    deploy.budget_batch_size on the target (latency depends on the architecture, not the weights)."""
    widths = sorted({int(t.get("student_width", loop.kwargs.get(width_kwarg, 0))) for t in trials})
    d = task.cfg.deploy
    ref = ray.remote(_measure_widths).options(**d.target.ray_options()).remote(
        loop.factory, loop.kwargs, width_kwarg, widths, _example(rows, task), d.budget_batch_size,
        d.target.threads, d.target.runs, d.target.warmup, d.opset)
    return ray.get(ref)


def _measure_widths(factory, kwargs, width_kwarg, widths, rows, batch, threads, runs, warmup, opset):
    import torch

    torch.set_num_threads(threads)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for w in widths:
            model = models.build(factory, {**kwargs, width_kwarg: w}).eval() if w else models.build(factory, kwargs).eval()
            path = Path(tmp) / f"w{w}.onnx"
            dp.export_onnx(model, torch.from_numpy(rows[:2]), path, opset=opset)
            r = dp.measure_latency({"onnxruntime-fp32": dp.onnx_runner(path.read_bytes(), threads)}, rows, [batch],
                                   runs=runs, warmup=warmup)[0]
            out[w] = {"latency_ms": r["median_ms"], "params": models.num_params(model)}
    return out


def annotate_trials(trials: list[dict], lat: dict[int, dict[str, float]], loop: Loop, width_kwarg: str,
                    reference: float | None, lm: bool) -> None:
    """Each trial row gets latency_ms, params and its quality (val accuracy / the ensemble's, or perplexity)."""
    for t in trials:
        w = int(t.get("student_width", loop.kwargs.get(width_kwarg, 0)))
        t |= lat[w]
        score = t.get("val_perplexity" if lm else "val_accuracy")
        t["quality"] = score if lm or score is None else score / reference


def pick_under_budget(trials: list[dict], budget_ms: float | None, target: float | None, lm: bool) -> dict[str, Any]:
    """The smallest (then fastest, then best) trial with latency ≤ budget and quality ≥ target
    (LM: perplexity ≤ target). None met: ValueError naming the closest trial and what it missed by."""
    def misses(t) -> tuple[float, float]:
        q = t.get("quality")
        if q is None or (isinstance(q, float) and math.isnan(q)):
            return (math.inf, 0.0)
        qm = 0.0 if target is None else (max(0.0, q - target) / target if lm else max(0.0, target - q) / target)
        lm_ = 0.0 if budget_ms is None else max(0.0, t["latency_ms"] - budget_ms) / budget_ms
        return qm, lm_

    if target is not None and all(misses(t)[0] == math.inf for t in trials):
        raise ValueError(f"deploy.quality_target={target}: none of the {len(trials)} tune trials reported a validation "
                         "score (each stopped before its first validation), so none can be checked against it; "
                         "raise tune.epochs / tune.grace_period, or check the trials' errors in the log")
    ok = [t for t in trials if misses(t) == (0.0, 0.0)]
    if ok:
        best = min(ok, key=lambda t: (t["params"], t["latency_ms"], t["quality"] if lm else -t["quality"]))
        return {"chosen_trial": best["trial_id"], "met": len(ok), "of": len(trials),
                "reason": f"the smallest of {len(ok)}/{len(trials)} trials that meet both ({best['params']:,} params, "
                          f"{best['latency_ms']:.3f} ms, quality {best['quality']:.4f})"}
    close = min(trials, key=lambda t: sum(misses(t)))
    what = "validation perplexity" if lm else "× the ensemble's validation accuracy"
    parts = []
    if target is not None:
        parts.append(f"quality {close['quality']:.4f} {what} (target {'≤' if lm else '≥'} "
                     f"{target})")
    if budget_ms is not None:
        parts.append(f"{close['latency_ms']:.3f} ms (budget {budget_ms} ms)")
    raise ValueError(f"no tune trial meets deploy.latency_budget_ms={budget_ms} and deploy.quality_target={target}: "
                     f"the closest, trial {close['trial_id']} ({close['params']:,} params), reached "
                     + " and ".join(parts) + "; raise the budget, lower the target, or search other student "
                     "widths (tune.student_width)")


def pareto_png(trials: list[dict], chosen: str | None, budget_ms: float | None, target: float | None,
               lm: bool) -> bytes:
    """Quality vs latency of every trial, the Pareto front joined, the chosen trial ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [t for t in trials if t.get("quality") is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ax.scatter([t["latency_ms"] for t in pts], [t["quality"] for t in pts], s=[20 + t["params"] / 200 for t in pts],
               alpha=0.6, label="tune trials (size: params)")
    front, best = [], math.inf if lm else -math.inf
    for t in sorted(pts, key=lambda t: (t["latency_ms"], t["quality"] if lm else -t["quality"])):
        if (t["quality"] < best) if lm else (t["quality"] > best):
            front.append(t)
            best = t["quality"]
    ax.plot([t["latency_ms"] for t in front], [t["quality"] for t in front], "-o", color="C3", label="Pareto front")
    for t in pts:
        if t["trial_id"] == chosen:
            ax.scatter([t["latency_ms"]], [t["quality"]], s=220, facecolors="none", edgecolors="k", label="chosen")
    if budget_ms is not None:
        ax.axvline(budget_ms, color="gray", ls="--", label="latency budget")
    if target is not None:
        ax.axhline(target, color="gray", ls=":", label="quality target")
    ax.set_xlabel("latency, ONNX Runtime fp32 (ms, median)")
    ax.set_ylabel("validation perplexity" if lm else "val accuracy / ensemble's")
    ax.set_title("Tune trials: quality vs latency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
