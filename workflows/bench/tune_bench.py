"""`kd bench tune`: what a Tune trial costs beyond its training loop, and what early stopping saves.

One run, on the config's data, teachers and store (built once, reused from --out):
1. The fixed cost of a trial. The same N sampled configurations of the student are trained three
   ways, one trial at a time, no early stopping: as kd-ops searches today (each one-worker trial
   runs its loop in its Tune trial actor), with every trial a Ray Train run (`tune.trial_runner:
   ray_train`, how kd-ops ran trials before), and as a plain loop over the configurations in this
   process. Per trial: wall seconds, training-loop seconds (the epochs' own time, as each epoch
   reports it) and fixed seconds = wall − loop; trials per hour.
2. Early stopping and the searcher. The same search (same seed, so the same sampled
   configurations for the random searcher) with ASHA and without it, and with Optuna's TPE when
   optuna is installed: trial-epochs, wall seconds and the best trial's validation score.
Prints a table and, with --json, one JSON object as the last line of stdout.
"""
from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from kd_ops.fsio import Loc
from workflows import console, tasks, worker
from workflows.stages import chain, fit, training_data
from workflows.bench import methods_bench
from workflows.config import load_config
from workflows.tune import apply_trial, run_tune
from workflows.layout import Layout

FIXED = ["tune.max_concurrent_trials=1", "tune.teacher_weights=null"]


def _trial_results(storage: Loc) -> list[list[dict]]:
    """Each trial's reported epochs (result.json lines), from a search's storage."""
    trials = []
    for f in (storage / "tune").files("result.json", recursive=True):
        lines = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if lines:
            trials.append(lines)
    return trials


def _search(cfg, base, names, sets, lay, label: str) -> dict[str, Any]:
    """One search as `kd run` runs it; its wall time, trial-epochs, loop seconds and best score."""
    storage = lay.ray / f"bench-tune-{label}"
    Loc.of(storage).delete()  # a bench measures a fresh search, never a resumed one
    start = time.perf_counter()
    _, best, rows, failed = run_tune(cfg.tune, base, names, cfg.student.width_kwarg, sets, storage=storage,
                                     workers=fit.workers(cfg.train), tracking_uri=None, experiment=None,
                                     parent_run_id=None)
    wall = time.perf_counter() - start
    trials = _trial_results(storage)
    loop = sum(e["epoch_seconds"] for t in trials for e in t)
    metric = base.objective[0]
    out = {"trials": len(trials), "failed": len(failed), "trial_epochs": sum(len(t) for t in trials),
           "wall_seconds": wall, "loop_seconds": loop, "best_val": best[metric],
           "points": [{k: v for k, v in r.items() if k not in ("trial_id", "epochs", metric, "val_agreement")}
                      for r in rows]}
    console.say(f"{label}: {out['trials']} trials, {out['trial_epochs']} trial-epochs in {wall:.0f} s, "
                f"best {metric} {out['best_val']:.4f}")
    return out


def _plain(base, names, points: list[dict], sets, width_kwarg: str) -> dict[str, Any]:
    """The same configurations trained one after another in this process: the same training loop
    (`worker.run_loop`) on the same datasets, with no Tune or Train around it."""
    start, loop, epochs = time.perf_counter(), 0.0, 0
    best = None
    metric, mode = base.objective
    for i, point in enumerate(points):
        reports: list[dict] = []
        session = worker.Session(0, 1, worker.torch.device("cpu"), lambda m: m, lambda: None, sets.__getitem__,
                                 lambda metrics, checkpoint=None: reports.append(metrics), lambda d: None)
        worker.run_loop(apply_trial(base, point, names, width_kwarg).replace(label=f"plain {i}"), session)
        loop += sum(r["epoch_seconds"] for r in reports)
        epochs += len(reports)
        scores = [r[metric] for r in reports]
        top = max(scores) if mode == "max" else min(scores)
        best = top if best is None else (max if mode == "max" else min)(best, top)
    wall = time.perf_counter() - start
    console.say(f"plain loop: {len(points)} trials, {epochs} trial-epochs in {wall:.0f} s")
    return {"trials": len(points), "trial_epochs": epochs, "wall_seconds": wall, "loop_seconds": loop,
            "best_val": best}


def _costs(r: dict) -> dict:
    n = max(r["trials"], 1)
    return r | {"trials_per_hour": 3600 * r["trials"] / r["wall_seconds"],
                "loop_seconds_per_trial": r["loop_seconds"] / n,
                "fixed_seconds_per_trial": (r["wall_seconds"] - r["loop_seconds"]) / n}


def run(path: str, out: str, overrides: list[str], trials: int, epochs: int, searchers: bool) -> dict[str, Any]:
    common = [*overrides, *FIXED, f"tune.num_samples={trials}", f"tune.epochs={epochs}", "tune.enabled=true"]
    cfg = load_config(path, common)
    task = tasks.for_config(cfg)
    if task.kind != "classification":
        raise ValueError("kd bench tune searches a classification student; give a classification config")
    lay, dirs, teachers, kd_sets = methods_bench.teachers_and_store(task, out)
    names, weights, _ = chain.run(task, teachers, dirs, lay, None, kd_sets["test"])
    found, base = training_data.fit_inputs(task, dirs, lay, cfg.student.factory, task.student_kwargs(teachers),
                                           cfg.train.fit, label="bench", teachers=names, teacher_weights=weights)
    sets = found.sets
    base = base.replace(epochs=epochs)

    def search(label: str, extra: list[str]) -> dict[str, Any]:
        c = load_config(path, [*common, *extra])
        return _search(c, base, names, sets, lay, label)

    console.say(f"==> the fixed cost of a trial: {trials} trials × {epochs} epochs, one at a time, no early stopping")
    res: dict[str, Any] = {"trials": trials, "epochs": epochs}
    fifo = ["tune.scheduler=fifo"]
    res["kd_ops"] = _costs(search("kd-ops", fifo))
    res["ray_train_trials"] = _costs(search("ray-train-trials", [*fifo, "tune.trial_runner=ray_train"]))
    res["plain_loop"] = _costs(_plain(base, names, res["kd_ops"]["points"], sets, cfg.student.width_kwarg))
    res["fixed_ratio_vs_ray_train"] = (res["ray_train_trials"]["fixed_seconds_per_trial"]
                                       / max(res["kd_ops"]["fixed_seconds_per_trial"], 1e-9))
    if searchers:
        console.say("==> early stopping and the searcher: the same search with ASHA, without it, and with TPE")
        res["no_asha"] = res["kd_ops"]
        res["asha"] = _costs(search("asha", ["tune.scheduler=asha"]))
        if _has_optuna():
            res["optuna_tpe_asha"] = _costs(search("optuna-tpe", ["tune.scheduler=asha", "tune.searcher=optuna"]))
        else:
            console.say("optuna is not installed: the TPE search is skipped (pip install optuna)")
        res["asha_vs_no_asha"] = {"trial_epochs": res["asha"]["trial_epochs"] / res["no_asha"]["trial_epochs"],
                                  "wall_seconds": res["asha"]["wall_seconds"] / res["no_asha"]["wall_seconds"]}
    return res


def _has_optuna() -> bool:
    try:
        import optuna  # noqa: F401
    except ImportError:
        return False
    return True


ROWS = {"kd_ops": "kd-ops (trial loop in the Tune trial)", "ray_train_trials": "every trial a Ray Train run",
        "plain_loop": "plain loop, one process", "asha": "kd-ops + ASHA", "optuna_tpe_asha": "kd-ops + Optuna TPE + ASHA"}


def print_table(res: dict[str, Any], out: Console) -> None:
    t = Table(title=f"kd bench tune: {res['trials']} trials × up to {res['epochs']} epochs, one trial at a time")
    for col in ("how", "trials", "trial-epochs", "wall s", "loop s/trial", "fixed s/trial", "trials/hour", "best val"):
        t.add_column(col, justify="left" if col == "how" else "right")
    for key, name in ROWS.items():
        if key in res:
            r = res[key]
            t.add_row(name, str(r["trials"]), str(r["trial_epochs"]), f"{r['wall_seconds']:.1f}",
                      f"{r['loop_seconds_per_trial']:.2f}", f"{r['fixed_seconds_per_trial']:.2f}",
                      f"{r['trials_per_hour']:.0f}", f"{r['best_val']:.4f}")
    out.print(t)
    out.print(f"fixed cost per trial, Ray Train trials ÷ kd-ops: {res['fixed_ratio_vs_ray_train']:.2f}×")
    if "asha_vs_no_asha" in res:
        a = res["asha_vs_no_asha"]
        out.print(f"ASHA ÷ no early stopping: trial-epochs {a['trial_epochs']:.2f}×, wall {a['wall_seconds']:.2f}×")


def main(args) -> int:
    res = run(args.config, args.out, args.overrides, args.trials, args.epochs, not args.no_searchers)
    for r in res.values():
        if isinstance(r, dict):
            r.pop("points", None)
    (Layout(args.out).out / "bench-tune.json").write_text(json.dumps(res, indent=2))
    print_table(res, Console(file=console.out(), width=140))
    if args.json:
        print(json.dumps(res), file=console.out(), flush=True)
    return 0

