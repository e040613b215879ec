"""Stage 5, the search: Ray Tune over temperature, α, teacher weights, student width and the
method (workflows.tune), then with `deploy` each trial's architecture timed on the target beside
its validation score, the Pareto picture, and with a budget the smallest student that meets it."""
from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import mlflow

from workflows import console, tune
from workflows.layout import Layout
from workflows.loop import Loop
from workflows.stages.fit import workers
from workflows.stages.target import sample_rows, trial_latencies
from workflows.tracking import Tracker

log = logging.getLogger("kd")


@dataclass
class Searched:
    """What the search decided: the student's settings (`base`: the budget's pick, else Tune's best,
    else the config's) and what it saw."""
    base: Loop
    best: dict[str, Any] | None = None          # Tune's best trial (by its best epoch on validation)
    trials: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    budget: dict[str, Any] | None = None        # the budget's pick and why (deploy.latency_budget_ms / quality_target)
    pareto_png: str | None = None               # under --out

    @property
    def chosen_trial(self) -> str | None:
        """The trial the student's settings come from: the budget's pick, else Tune's best."""
        return (self.budget or {}).get("chosen_trial") or (self.best or {}).get("trial_id")


def run(task, base: Loop, names: list[str], train_sets: dict, kd_sets: dict, dirs, lay: Layout, tracker: Tracker,
        parent_id: str, *, after_chain: bool) -> Searched:
    """Tune from `base` over the stored logits of `names` (no teacher runs), then with `deploy` the
    trials on the target and the budget's pick. Without tune.enabled: `base` as it is."""
    cfg = task.cfg
    if not cfg.tune.enabled:
        return Searched(base)
    console.say("==> tune")
    # after a chain, the weights between teachers and the last stage are the chain's design
    tc = cfg.tune.model_copy(update={"teacher_weights": None}) if after_chain else cfg.tune
    tuned, best, trials, failed = tune.run_tune(tc, base, names, cfg.student.width_kwarg, train_sets, storage=lay.ray,
                                                workers=workers(cfg.train), tracking_uri=tracker.uri,
                                                experiment=tracker.experiment, parent_run_id=parent_id)
    log.info("tune: best %s", best)
    found = Searched(tuned, best, trials, failed)
    if cfg.deploy.enabled:
        console.say("==> latency of the trials")
        chosen, found.budget, found.pareto_png = trials_on_target(task, lay, tracker, base, names, trials, kd_sets, dirs)
        found.base = chosen or tuned
    return found


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
