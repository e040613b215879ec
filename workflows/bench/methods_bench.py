"""`kd bench methods`: the distillation methods side by side on one store, same student, same budget.

One run: the config's teachers are trained (or reused from --out) and precomputed once; then for
every method and seed the same student (same factory and kwargs, `train.fit` epochs and batch
size) is trained through the pipeline's own stages (Ray Train, the store, chains stored as new
teachers) and scored on the test split. Prints a table (mean ± std over seeds, ratio to the
teacher ensemble, whether the method beats Hinton KD beyond the seed noise, wall time) and, with
--json, one JSON object as the last line of stdout.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from workflows import console, pipeline, ray_session, tasks, train
from workflows.stages import chain, fit, inputs, soft_labels, training_data
from workflows.config import load_config
from workflows.layout import Layout

# name → the distill settings it adds to the Hinton base (None: labels only). Layer `features.5`
# is the built-in CNN's last convolution block (ReLU output), [width, 5] per sample.
METHODS: dict[str, list[str] | None] = {
    "labels only": None,
    "hinton": [],
    "hinton + fitnets hint": ["distill.feature={student_layer: features.5, teacher_layer: features.5, weight: 1.0}"],
    "hinton + attention transfer": ["distill.feature={kind: attention, student_layer: features.5, "
                                    "teacher_layer: features.5, weight: 100.0}"],
    "hinton + rkd": ["distill.rkd={distance: 25.0, angle: 50.0}"],
    "dkd": ["distill.response=dkd", "distill.dkd={alpha: 1.0, beta: 8.0}"],
    "hinton, T cosine 8→1": ["distill.temperature=8", "distill.schedule=cosine", "distill.temperature_end=1"],
    "hinton, logit standardization": ["distill.standardize=true"],
    "hinton, entropy teacher weights": ["distill.teacher_weighting=entropy"],
    "hinton, CA-MKD teacher weights": ["distill.teacher_weighting=correctness"],
    "hinton, 4 augmented views": ["precompute.views=4"],
    "takd (assistant width 44)": ["distill.assistants=[{name: ta44, kwargs: {width: 44}}]"],
    "born-again (2 generations)": ["distill.generations=2"],
}
BASE = ["tune.enabled=false", "distill.temperature=4", "distill.alpha=0.9"]


def _one(path: str, overrides: list[str], method: list[str] | None, seed: int, lay, dirs, teachers, test_set,
         label: str):
    """Train the student once with this method and seed, on the data and trained teachers `run`
    resolved once; returns (test accuracy, params, seconds)."""
    start = time.perf_counter()
    logging.getLogger("kd").setLevel(logging.WARNING)  # "reusing …" lines, once per method and seed
    cfg = load_config(path, [*BASE, *overrides, *(method or []), f"train.fit.seed={seed}"])
    task = tasks.for_config(cfg)
    kwargs = task.student_kwargs(teachers)
    if method is None:
        found, loop = training_data.fit_inputs(task, dirs, lay, cfg.student.factory, kwargs, cfg.train.fit, label=label)
    else:
        features = inputs.feature_plan(task, dirs, lay)
        soft_labels.precompute_features(task, teachers, dirs, lay, None)
        soft_labels.precompute_views(task, teachers, dirs, lay, None)
        names, weights, _ = chain.run(task, teachers, dirs, lay, None, test_set)
        found, loop = training_data.fit_inputs(task, dirs, lay, cfg.student.factory, kwargs, cfg.train.fit, label=label,
                                               teachers=names, teacher_weights=weights, features=features)
    res = train.fit(loop, found.sets, name=f"bench-{label}", storage=lay.ray, **fit.workers(cfg.train))
    row = task.model_report(loop, res.weights, {"test": test_set})
    return row["test_accuracy"], row["params"], time.perf_counter() - start


def teachers_and_store(task, out: str):
    """Ray, the data, the trained teachers and their store under `out` (each reused when current):
    (layout, split dirs, teachers, {"test": dataset with the teachers' logits})."""
    cfg, lay = task.cfg, Layout(out)
    lay.make()
    ray_session.init_ray(None, cfg.code, cfg.train.resource_wait_s)
    console.say("==> teachers and store (once for every comparison)")
    ready = pipeline.store_ready(task, lay, None, target=False)
    kd_sets = training_data.datasets(task, ready.dirs, lay, teachers=True, splits={"test": ("test",)}).sets
    return lay, ready.dirs, ready.teachers, kd_sets


def run(path: str, out: str, overrides: list[str], seeds: int, only: list[str] | None) -> dict[str, Any]:
    cfg = load_config(path, [*BASE, *overrides])
    task = tasks.for_config(cfg)
    if task.kind != "classification":
        raise ValueError("kd bench methods compares classification methods; give a classification config")
    lay, dirs, teachers, kd_sets = teachers_and_store(task, out)
    teacher_rows, reference, _ = task.teacher_report(teachers, kd_sets)
    ens = reference["ensemble_test_accuracy"]
    teacher_params = min(r["params"] for r in teacher_rows)
    console.say(f"teacher ensemble test accuracy {ens:.4f}; smallest teacher {teacher_params:,} params")
    results: dict[str, Any] = {}
    for name, method in METHODS.items():
        if only and name not in only:
            continue
        accs, seconds, params = [], [], 0
        for seed in range(seeds):
            label = f"{name.split(' ')[0]}-{len(results)}-s{seed}"
            acc, params, s = _one(path, overrides, method, seed, lay, dirs, teachers, kd_sets["test"], label)
            accs.append(acc)
            seconds.append(s)
            console.say(f"{name} seed {seed}: test accuracy {acc:.4f} ({s:.0f} s)")
        results[name] = {"params": params, "seeds": seeds, "test_accuracy_mean": statistics.fmean(accs),
                         "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                         "test_accuracies": accs, "wall_seconds": statistics.fmean(seconds),
                         "settings": method}
    return {"ensemble_test_accuracy": ens, "teacher_params": teacher_params, "teachers": teacher_rows,
            "student_fit": cfg.train.fit.model_dump(), "methods": results}


def verdict(name: str, r: dict, results: dict) -> str:
    """Does the method help here? Against Hinton KD (against labels only for Hinton itself),
    beyond the seeds' spread (the larger of the two standard deviations)."""
    ref_name = "labels only" if name == "hinton" else "hinton"
    ref = results.get(ref_name)
    if name == "labels only" or ref is None:
        return ""
    diff = r["test_accuracy_mean"] - ref["test_accuracy_mean"]
    noise = max(r["test_accuracy_std"], ref["test_accuracy_std"])
    word = "helps" if diff > noise else "worse" if diff < -noise else "no clear gain"
    return f"{word} ({diff:+.4f} vs {ref_name})"


def print_table(res: dict[str, Any], out: Console) -> None:
    ens = res["ensemble_test_accuracy"]
    t = Table(title=f"kd bench methods: teacher ensemble {ens:.4f}, smallest teacher {res['teacher_params']:,} params")
    for col in ("method", "params", "test acc (mean ± std)", "vs ensemble", "here", "wall s"):
        t.add_column(col, justify="left" if col in ("method", "here") else "right")
    for name, r in res["methods"].items():
        t.add_row(name, f"{r['params']:,}", f"{r['test_accuracy_mean']:.4f} ± {r['test_accuracy_std']:.4f}",
                  f"{r['test_accuracy_mean'] / ens:.3f}", verdict(name, r, res["methods"]), f"{r['wall_seconds']:.0f}")
    out.print(t)


def main(args) -> int:
    res = run(args.config, args.out, args.overrides, args.seeds, args.method or None)
    first = next(iter(res["methods"].values()), None)
    if first and first["params"] * 10 > res["teacher_params"]:
        console.say(f"note: the student ({first['params']:,} params) is larger than 1/10 of the smallest teacher")
    (Layout(args.out).out / "bench-methods.json").write_text(json.dumps(res, indent=2))
    print_table(res, Console(file=console.out(), width=140))
    if args.json:
        print(json.dumps(res), file=console.out(), flush=True)
    return 0
