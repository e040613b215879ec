"""What a finished run should tell its user beyond the numbers: the teacher compute the store
saved, and honest warnings (weak teachers, an INT8 model that lost too much, a search whose best
value sits on the edge of its range). Reads the summary; computes nothing new."""
from __future__ import annotations

import math
from typing import Any


def teacher_compute(timings: dict[str, dict[str, float]], precompute_rows: int, train_rows: int,
                    trials: list[dict], final_epochs: int, qat_epochs: int, teachers: int) -> dict[str, Any]:
    """Teacher forward passes (rows) that online KD would have run — every teacher over every
    training row, each epoch of every tune trial, of the final fit and of quantization-aware
    distillation — against what the store took: the teachers' pass over all splits
    (`precompute_rows`) and the views' passes over the training rows (in `timings`). In
    teacher-seconds at the measured precompute throughput: teacher rows per second of pass wall
    time, where a pass of M teachers over R rows ran M·R of them (`stages.store_pass.timings`: each entry
    holds its share of its pass's wall time). None when this --out never timed a full precompute."""
    epochs = sum(int(t.get("epochs") or 0) for t in trials) + final_epochs + qat_epochs
    online = train_rows * teachers * epochs
    done = precompute_rows + sum(t["rows"] for t in timings.values() if t.get("view"))
    rows = sum(t["rows"] for t in timings.values())
    seconds = sum(t["seconds"] for t in timings.values())
    rate = rows / seconds if rows and seconds else None
    return {"precompute_forward_rows": done, "online_forward_rows": online, "epochs_counted": epochs,
            "ratio": online / done if done else None,
            "teacher_rows_per_second": rate,
            "precompute_teacher_seconds": done / rate if rate else None,
            "online_teacher_seconds": online / rate if rate else None,
            "saved_teacher_seconds": (online - done) / rate if rate else None}


def _noise(a: float, b: float, n: int) -> float:
    """Two standard errors of the difference of two accuracies measured on the same n rows."""
    return 2 * math.sqrt((a * (1 - a) + b * (1 - b)) / max(n, 1))


def warnings(s: dict[str, Any], cfg, best: dict[str, Any] | None) -> list[str]:
    """One sentence per problem, in the order a user should look at them."""
    out: list[str] = []
    lm = s.get("task") == "lm"
    kd, lo = s["student"], s["label_only_student"]
    if lm:
        if lo["val_perplexity"] < kd["val_perplexity"] * 0.98:
            out.append(f"the label-only student (val perplexity {lo['val_perplexity']:.3f}) beats the KD student "
                       f"({kd['val_perplexity']:.3f}): the teachers add nothing here; use stronger teachers, lower "
                       "distill.alpha or search it (tune)")
        for t in s["teachers"]:
            if t["val_perplexity"] > lo["val_perplexity"]:
                out.append(f"teacher {t['name']} (val perplexity {t['val_perplexity']:.3f}) is worse than the "
                           f"label-only student ({lo['val_perplexity']:.3f}): train it longer or drop it")
    else:  # judged on the validation split: what a user changes next is a choice too
        n = int(s.get("val_rows") or 0)
        a, b = lo["val_accuracy"], kd["val_accuracy"]
        if a - b > _noise(a, b, n):
            out.append(f"the label-only student (val accuracy {a:.4f}) beats the KD student ({b:.4f}) by more than "
                       f"seed noise (±{_noise(a, b, n):.4f} on {n} validation rows): the teachers mislead the student; "
                       "check their accuracy, train them longer, or let labels dominate (lower distill.alpha; "
                       "tune.alpha down to 0)")
        for t in s["teachers"]:
            if a - t["val_accuracy"] > _noise(a, t["val_accuracy"], n):
                out.append(f"teacher {t['name']} (val accuracy {t['val_accuracy']:.4f}) is worse than the label-only "
                           f"student ({a:.4f}): train it longer, give it more capacity, or drop it from teachers")
    i8 = (s.get("deploy") or {}).get("int8_not_shipped")
    if i8:  # a shipped INT8 model is within the tolerance by construction (kd_ops.deploy.pick_int8)
        lost = min(r["drop"] for r in i8["recipes"])
        what = "relative validation perplexity" if lm else "validation accuracy"
        out.append(f"no INT8 model is within deploy.int8_max_drop={i8['max_drop']} (the best loses {lost:.4f} {what} "
                   f"against fp32" + (f", after {i8['qat_epochs']} QAT epochs" if i8.get("qat_epochs") else "")
                   + "): the student ships in fp32; raise deploy.qat_epochs or int8_max_drop, or widen the student")
    if (s.get("deploy") or {}).get("int8_error"):
        out.append(f"INT8 quantization failed ({s['deploy']['int8_error']}): the student ships in fp32 only; "
                   "see logs/kd.log, or set deploy.int8: false")
    out += _below_target(s, lm)
    if best is not None:
        out += _edges(cfg.tune, best)
    return out


def _edges(tc, best: dict[str, Any]) -> list[str]:
    """The search's best value at the end of a searched range: the optimum may lie outside it."""
    out = []
    for key, dim in (("temperature", tc.temperature), ("alpha", tc.alpha), ("student_width", tc.student_width)):
        if dim is None or key not in best:
            continue
        v = float(best[key])
        if dim.choice is not None:
            values = sorted(float(c) for c in dim.choice)
            if len(values) < 2 or values[0] < v < values[-1]:
                continue
            lo, hi = values[0], values[-1]
            at = 0.0 if v == lo else 1.0 if v == hi else 0.5
        else:
            lo, hi = (dim.uniform or dim.loguniform)
            at = _position(v, lo, hi, log=dim.loguniform is not None)
        if at <= 0.05 or at >= 0.95:
            side = "bottom" if at <= 0.5 else "top"
            if key == "alpha" and (lo if side == "bottom" else hi) in (0.0, 1.0):
                continue  # α cannot go beyond [0, 1]
            out.append(f"tune: the best {key} ({v:g}) sits at the {side} of its range [{lo:g}, {hi:g}]: the optimum "
                       f"may lie beyond it; widen tune.{key}")
    return out


def _below_target(s: dict[str, Any], lm: bool) -> list[str]:
    """The budget picked a trial that met deploy.quality_target; the final student is trained
    again (longer, another seed of the data order): checked against the target once more, on the
    same validation measure (× the ensemble's validation accuracy, or validation perplexity)."""
    b = (s.get("deploy") or {}).get("budget") or {}
    target = b.get("quality_target")
    if target is None:
        return []
    if lm:
        q = s["student"].get("val_perplexity")
        below = q is not None and q > target
    else:
        acc, ref = s["student"].get("val_accuracy"), b.get("reference")
        q = acc / ref if acc is not None and ref else None
        below = q is not None and q < target
    if not below:
        return []
    what = "validation perplexity" if lm else "× the ensemble's validation accuracy"
    return [f"the final student's quality {q:.4f} {what} misses deploy.quality_target={target}, which trial "
            f"{b.get('chosen_trial')} met in the search: the retrained student fell short; raise train.fit.epochs, "
            "or search larger students (tune.student_width)"]


def _position(v: float, lo: float, hi: float, log: bool) -> float:
    """Where v sits in [lo, hi], 0 to 1, measured as the search draws: a loguniform range in log
    space (1.0 in [0.5, 20] is 19% up it, not 3%)."""
    if log:
        v, lo, hi = math.log(v), math.log(lo), math.log(hi)
    return (v - lo) / (hi - lo)
