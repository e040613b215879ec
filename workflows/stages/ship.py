"""Stage 7, ship: the registered student exported to ONNX and checked against PyTorch on real test
rows; quantized to INT8 by every ONNX Runtime recipe that fits it (static QDQ calibrated on real
training rows, dynamic MatMul-only for transformers), fine-tuned with quantization-aware
distillation through the same Train loop, simulating the recipe that lost least, when none is
within `deploy.int8_max_drop`; the INT8 model shipped (or fp32, when none is within it) chosen on
validation; timed on `deploy.target`. The maths (export, quantization, the pick, timing) is
kd_ops.deploy's; this file places and records it."""
from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kd_ops import deploy as dp, evaluate, models
from kd_ops.fsio import Loc
from workflows import console, scoring
from workflows.layout import Layout
from workflows.loop import Loop
from workflows.stages.fit import child_fit
from workflows.stages.target import gpu_note, latency_on_target, sample_rows

log = logging.getLogger("kd")


def _export(model, rows: np.ndarray, task, path: Path, opset: int) -> float:
    """Export to `path`; returns max |Δlogit| between ONNX Runtime and PyTorch on `rows`."""
    import torch

    x = rows.astype(task.example_dtype)  # what the exported graph takes (token ids: int64)
    dp.export_onnx(model, torch.from_numpy(x[:2]), path, opset=opset)
    return dp.max_abs_diff(model, path, x)


def run(task, lay: Layout, loop: Loop, weights, kd_sets, dirs, train_sets, fp32_row: dict,
          teachers, tracker) -> dict[str, Any]:
    """Export, INT8 (PTQ, then QAT when PTQ loses too much), latency on the target. Returns the
    summary's `deploy` section; files under --out/deploy and in the MLflow run's `deploy/`."""
    work = Path(tempfile.mkdtemp(prefix="kd-deploy-"))
    try:
        return _ship(task, lay, loop, weights, kd_sets, dirs, train_sets, fp32_row, teachers, tracker, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _ship(task, lay, loop, weights, kd_sets, dirs, train_sets, fp32_row, teachers, tracker, work: Path):
    d = task.cfg.deploy
    out: dict[str, Any] = {}
    student = models.load_weights(models.build(loop.factory, loop.kwargs), weights).eval()
    test_rows = sample_rows(dirs[task.eval_split], task, 256, seed=1)
    fp32 = work / "student.onnx"
    try:
        diff = _export(student, test_rows, task, fp32, d.opset)
    except ValueError as e:  # e.g. an LM whose graph the exporter cannot take: the run still finishes
        console.say(f"deploy: ONNX export skipped: {e}")
        return {"onnx_error": str(e), "gpu": gpu_note(d)}
    scale = max(1.0, float(np.abs(evaluate.predict_logits(student, test_rows.astype(task.example_dtype))).max()))
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
            int8, row, qat_weights = _int8(task, lay, loop, weights, kd_sets, train_sets, fp32_row, calib,
                                           fp32, work, tracker)
        except Exception as e:  # noqa: BLE001 - like a failed export: the run finishes and ships fp32
            log.exception("deploy: INT8 quantization failed")
            out["int8_error"] = scoring.one_line(e)
        else:
            if int8 is None:  # none within the tolerance: fp32 ships, the recipes tried are reported
                out["int8_not_shipped"] = row
            else:
                out["int8"] = row
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


def _quantize(recipe: str, fp32: Path, calib: np.ndarray, out: Path) -> Path:
    return dp.quantize_int8(fp32, calib, out) if recipe == "static" else dp.quantize_dynamic_int8(fp32, out)


def _int8(task, lay, loop: Loop, weights, kd_sets, train_sets, fp32_row, calib, fp32: Path, work: Path, tracker):
    """Every INT8 recipe that fits the model (kd_ops.deploy.int8_recipes) quantized and scored on
    validation; QAT, simulating the recipe that lost least, when none is within
    deploy.int8_max_drop (or qat: always); the one shipped is kd_ops.deploy.pick_int8's, or none
    (fp32 ships). Every choice is made on the validation split (`task.choice_key`); the test split
    scores only the INT8 model that ships. Returns (INT8 file or None, the summary's row with every
    recipe tried, the shipped QAT model's weights or None)."""
    cfg = task.cfg
    d, key = cfg.deploy, task.choice_key
    def val_score(onnx: Path) -> float:  # the ONNX files compared: what quantization alone changed
        return task.choice_score(_onnx_loop(loop, onnx), None, kd_sets)

    fp32_val = val_score(fp32)
    fits = dp.int8_recipes(fp32)
    tried: list[dict[str, Any]] = []
    for recipe, why_not in fits.items():
        if why_not:
            console.say(f"deploy: INT8 {recipe}: not tried ({why_not})")
            continue
        path = _quantize(recipe, fp32, calib, work / f"student.int8-{recipe}.onnx")
        score = val_score(path)
        tried.append({"recipe": recipe, "qat": False, key: score, "drop": task.int8_drop(fp32_val, score),
                      "weight_bytes": dp.weight_bytes(path), "file_bytes": dp.file_bytes(path), "path": path})
        console.say(f"deploy: INT8 {recipe} (PTQ{f', {len(calib)} calibration rows' if recipe == 'static' else ''}) "
                    f"{key} {score:.4f}, fp32 {fp32_val:.4f}: drop {tried[-1]['drop']:.4f} (tolerance {d.int8_max_drop}), "
                    f"weights {tried[-1]['weight_bytes']:,} B")
    if not tried:
        raise ValueError("no INT8 recipe fits this model: " + "; ".join(f"{r}: {w}" for r, w in fits.items()))
    # QAT's recipe: the one PTQ would ship, else the one that lost least
    best_ptq = dp.pick_int8(tried, d.int8_max_drop) or min(tried, key=lambda r: (r["drop"], r["weight_bytes"]))
    qat_weights = None
    if d.qat == "always" or (d.qat == "auto" and dp.pick_int8(tried, d.int8_max_drop) is None):
        # quantization-aware distillation: the fp32 student fine-tuned through fake quantization in that
        # recipe (what ships is what it simulates), with the same stored soft labels and loss, then
        # exported and quantized again. A feature term is left out: its projection was trained beside
        # the student but is not saved or shipped.
        recipe = best_ptq["recipe"]
        qloop = loop.replace(init_weights=Loc.of(weights).uri, fake_quant=recipe, epochs=d.qat_epochs,
                             lr=loop.lr * d.qat_lr_scale, label="qat student", features=None,
                             distill=dataclasses.replace(loop.distill, feature=None, feature_weight=0.0))
        with child_fit(cfg.train, tracker, "qat-student", {"epochs": d.qat_epochs, "lr": qloop.lr, "recipe": recipe},
                       qloop, train_sets, name="qat-student", lay=lay) as res:
            model = models.load_weights(models.build(loop.factory, loop.kwargs), res.weights).eval()
            _export(model, calib[:64], task, work / "student.qat.onnx", d.opset)
            path = _quantize(recipe, work / "student.qat.onnx", calib, work / f"student.qat.int8-{recipe}.onnx")
            score = val_score(path)
        tried.append({"recipe": recipe, "qat": True, key: score, "drop": task.int8_drop(fp32_val, score),
                      "weight_bytes": dp.weight_bytes(path), "file_bytes": dp.file_bytes(path), "path": path})
        qat_weights = res.weights
        console.say(f"deploy: INT8 {recipe} after {d.qat_epochs} epochs of quantization-aware distillation "
                    f"{key} {score:.4f}: drop {tried[-1]['drop']:.4f} (PTQ alone {best_ptq['drop']:.4f})")
    elif d.qat == "auto":
        console.say(f"deploy: QAT skipped: INT8 {dp.pick_int8(tried, d.int8_max_drop)['recipe']} PTQ is already within "
                    f"the tolerance {d.int8_max_drop}")
    pick = dp.pick_int8(tried, d.int8_max_drop)
    chosen = (pick or best_ptq)["recipe"]  # the PTQ and QAT numbers reported are of this recipe
    ptq = next(r for r in tried if r["recipe"] == chosen and not r["qat"])
    qat = next((r for r in tried if r["qat"]), None)
    row = {"method": "qat" if pick is not None and pick["qat"] else "ptq", "recipe": chosen,
           "chosen_by": key, "calibration_rows": len(calib), "fp32_" + key: fp32_val, "ptq_" + key: ptq[key],
           "ptq_drop": ptq["drop"], "qat_epochs": d.qat_epochs if qat else None, "qat_" + key: qat[key] if qat else None,
           "max_drop": d.int8_max_drop,
           "recipes": [{k: v for k, v in r.items() if k != "path"} | {"shipped": r is pick} for r in tried]}
    if qat:
        row["qat_drop"] = qat["drop"]
    if pick is None:
        console.say(f"deploy: no INT8 model within the tolerance {d.int8_max_drop} on validation (best drop "
                    f"{min(r['drop'] for r in tried):.4f}, {len(tried)} tried): the student ships in fp32, no INT8 file")
        return None, row, None
    row |= {"file_bytes": pick["file_bytes"], "weight_bytes": pick["weight_bytes"]}
    shipped = pick["path"]
    test = _score_onnx(task, loop, shipped, kd_sets)
    row |= test | {"test_drop": task.int8_drop(_quality(task, fp32_row), _quality(task, test))}
    return shipped, row, (qat_weights if pick["qat"] else None)
