"""`kd run` for `task: lm`: text → tokenizer → packed sequences → teachers (trained here if asked)
→ precompute (top-k or full logits per token) → tune → distilled student → label-only student →
validation perplexities and agreement → summary. Same store, Ray Train/Tune and MLflow path as
the classification pipeline; only data preparation and evaluation differ."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from kd_ops import data, lm, models, store
from workflows import ray_session, stages, train
from workflows.config import RunConfig, TeacherConfig
from workflows.tracking import Tracker
from workflows.tune import run_tune

log = logging.getLogger("kd")
SPLIT_OFFSET = {"train": 0, "val": 10_000_000, "test": 20_000_000}  # ids unique across splits


def _tokenizer_source(cfg: RunConfig) -> Path | None:
    return next((t.hf_dir for t in cfg.teachers if t.hf_dir is not None), None)


def stage_data(cfg: RunConfig, lay: stages.Layout):
    """Packed token sequences per split, written as Parquet (id, x: fixed_size_list<int32>[seq_len]).
    The tokenizer comes from the first teacher directory, or is trained on the train split."""
    src = _tokenizer_source(cfg)
    want = {"data": cfg.data.model_dump(mode="json"), "tokenizer_from": str(src)}
    stamp, tok_dir = lay.data / "source.json", lay.out / "tokenizer"
    dirs = {s: lay.data / s for s in SPLIT_OFFSET}
    if stamp.is_file() and json.loads(stamp.read_text()) == want and all(d.is_dir() for d in dirs.values()):
        log.info("data: reusing %s", lay.data)
        return dirs, lm.load_tokenizer(tok_dir)
    if cfg.data.source == "text":
        t = cfg.data.text
        texts = lm.split_docs(lm.read_corpus(t.paths, t.max_bytes), t.val_fraction, t.test_fraction, t.seed)
    elif cfg.data.source == "parquet":
        p = cfg.data.parquet
        texts = {}
        for split, d in {"train": p.train, "val": p.val, "test": p.test}.items():
            table = data.read_table(d)
            if "text" not in table.column_names:
                raise data.DataError(f"{d}: LM inputs need a `text` column (found {table.column_names})")
            data.validate_ids(table, str(d))
            texts[split] = [s for s in table.column("text").to_pylist() if s]
    else:
        raise ValueError("task: lm needs data.source 'text' or 'parquet' (with a `text` column)")
    if src is not None:
        tokenizer = lm.load_tokenizer(src)
    else:
        log.info("data: training a %d-token BPE tokenizer on the train split", cfg.data.text.vocab_size)
        tokenizer = lm.train_bpe_tokenizer(texts["train"], cfg.data.text.vocab_size if cfg.data.text else 2048)
    tokenizer.save_pretrained(tok_dir)
    for split, docs in texts.items():
        x = lm.tokenize_and_pack(tokenizer, docs, cfg.data.seq_len)
        if len(x) == 0:
            raise data.DataError(f"{split}: fewer than seq_len={cfg.data.seq_len} tokens of text")
        data.write_split(data.Inputs(np.arange(len(x), dtype=np.int64) + SPLIT_OFFSET[split], x, None), dirs[split])
        log.info("data: %s %d sequences × %d tokens", split, len(x), cfg.data.seq_len)
    stamp.write_text(json.dumps(want))
    return dirs, tokenizer


def _load(cfg: RunConfig, d: Path) -> data.Inputs:
    return data.read_inputs(d, ["x"], dtype=np.int32)


def stage_teachers(cfg: RunConfig, dirs, lay: stages.Layout, tracker: Tracker | None, tokenizer) -> list[TeacherConfig]:
    """Resolve every teacher to a Hugging Face directory, training `init` teachers from scratch,
    then check that all of them, the student and the data share one vocabulary and fit seq_len."""
    resolved = []
    for t in cfg.teachers:
        path = t.hf_dir or lay.teachers / t.name
        if t.init is not None and not (path / "config.json").is_file():
            tr, va = _load(cfg, dirs["train"]), _load(cfg, dirs["val"])
            kwargs = {"vocab_size": len(tokenizer), "n_positions": cfg.data.seq_len, **t.init}
            loop = stages.fit_spec("kd_ops.lm:new_causal_lm", kwargs, t.fit, cfg.train.cpus_per_worker, train_rows=len(tr.x),
                                   label=f"teacher {t.name}", task="lm")
            with stages._child(tracker, f"teacher-{t.name}", loop) as run_id:
                loop["mlflow"] = tracker and {"tracking_uri": tracker.uri, "run_id": run_id}
                res = train.fit(loop, {"train": train.make_dataset(tr.x), "val": train.make_dataset(va.x, shuffle_seed=None)},
                                name=f"teacher-{t.name}", storage=lay.ray, num_workers=cfg.train.num_workers,
                                use_gpu=cfg.train.use_gpu)
                model = models.load_weights(models.build(loop["factory"], kwargs), res.weights)
                model.hf.save_pretrained(path)
                tokenizer.save_pretrained(path)
        resolved.append(t.model_copy(update={"hf_dir": path, "init": None}))
    configs = {t.name: lm.load_config(t.hf_dir) for t in resolved}
    toks = {t.name: lm.load_tokenizer(t.hf_dir) for t in resolved} | {"data": tokenizer}
    configs["student"] = models.build(cfg.student.factory, student_kwargs(cfg, resolved)).config
    lm.check_same_vocab(configs, toks)
    for name, c in configs.items():
        lm.check_context(c, cfg.data.seq_len, name)
    return resolved


def student_kwargs(cfg: RunConfig, teachers: list[TeacherConfig]) -> dict[str, Any]:
    kw = dict(cfg.student.kwargs)
    if cfg.student.factory == "kd_ops.lm:student_from_teacher":
        kw.setdefault("teacher_dir", str(teachers[0].hf_dir))
    return kw


def run_lm(cfg: RunConfig, out: Path, *, tracking_uri: str | None = None, ray_address: str | None = None) -> dict[str, Any]:
    from workflows.pipeline import step, write_summary

    start = time.perf_counter()
    lay = stages.Layout(Path(out).resolve())
    lay.out.mkdir(parents=True, exist_ok=True)
    (lay.out / "summary.json").unlink(missing_ok=True)
    ray_session.init_ray(ray_address)
    tracker = Tracker(tracking_uri or cfg.tracking.tracking_uri, cfg.tracking.experiment)
    names = [t.name for t in cfg.teachers]
    with tracker.parent(cfg.name, cfg.model_dump(mode="json"), {"kd.out": str(lay.out), "kd.task": "lm"}) as parent_id:
        mlflow.log_dict(cfg.model_dump(mode="json"), "config.json")
        step("data")
        dirs, tokenizer = stage_data(cfg, lay)
        step("teachers")
        teachers = stage_teachers(cfg, dirs, lay, tracker, tokenizer)
        step("precompute")
        stages.stage_precompute(cfg, teachers, dirs, lay, tracker)
        splits = {s: _load(cfg, d) for s, d in dirs.items()}
        soft = {s: store.soft_labels(lay.store, names, splits[s].ids) for s in ("train", "val")}
        kd_ds = {"train": train.make_dataset(splits["train"].x, None, soft["train"]),
                 "val": train.make_dataset(splits["val"].x, None, soft["val"], shuffle_seed=None)}
        d = cfg.distill
        base = stages.fit_spec(cfg.student.factory, student_kwargs(cfg, teachers), cfg.train.fit, cfg.train.cpus_per_worker,
                               train_rows=len(splits["train"].x), task="lm", temperature=d.temperature, alpha=d.alpha,
                               teacher_weights=stages.teacher_weight_list(cfg), divergence=d.divergence,
                               beta=d.beta, tail=d.tail, label="student")
        tune_rows: list[dict] = []
        if cfg.tune.enabled:
            step("tune")
            base, best, tune_rows = run_tune(cfg.tune, base, names, cfg.student.width_kwarg, kd_ds, storage=lay.ray,
                                             num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                             tracking_uri=tracker.uri, experiment=tracker.experiment,
                                             parent_run_id=parent_id)
            log.info("tune: best %s", best)
        base |= {"epochs": cfg.train.fit.epochs, "label": "student"}
        va = splits["val"]
        teacher_top1 = (soft["val"]["indices"][0, ..., 0] if "indices" in soft["val"]
                        else soft["val"]["logits"][0].argmax(-1)).astype(np.int64)

        def evaluate(weights: Path) -> tuple[Any, dict[str, float]]:
            model = models.load_weights(models.build(base["factory"], base["kwargs"]), weights)
            return model, {"params": models.num_params(model), "val_perplexity": lm.perplexity(model, va.x),
                           "test_perplexity": lm.perplexity(model, splits["test"].x),
                           "top1_agreement": lm.top1_agreement(model, va.x, teacher_top1)}

        step("student")
        chosen = {k: base[k] for k in ("temperature", "alpha", "teacher_weights", "divergence", "tail")} | {
            "student_kwargs": {k: v for k, v in base["kwargs"].items() if k != "teacher_dir"}}
        with tracker.child("student", chosen | {"epochs": base["epochs"]}) as run_id:
            res = train.fit(base | {"mlflow": {"tracking_uri": tracker.uri, "run_id": run_id}}, kd_ds, name="student",
                            storage=lay.ray, num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu)
            student, srow = evaluate(res.weights)
            mlflow.log_metrics(srow)
            mlflow.log_artifact(str(res.weights), "weights")
            registered = tracker.register(student, cfg.tracking.registered_model, va.x[:1].astype(np.int64))

        step("label-only student")
        lo = stages.fit_spec(base["factory"], base["kwargs"], cfg.train.label_only_fit, cfg.train.cpus_per_worker,
                             train_rows=len(splits["train"].x), task="lm", label="label-only")
        lo_ds = {"train": train.make_dataset(splits["train"].x), "val": train.make_dataset(va.x, shuffle_seed=None)}
        with tracker.child("label-only-student", {**cfg.train.label_only_fit.model_dump()}) as run_id:
            res_lo = train.fit(lo | {"mlflow": {"tracking_uri": tracker.uri, "run_id": run_id}}, lo_ds, name="label-only",
                               storage=lay.ray, num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu)
            _, lorow = evaluate(res_lo.weights)
            mlflow.log_metrics(lorow)

        teacher_rows = []
        for t in teachers:
            tm = lm.load_causal_lm(t.hf_dir)
            teacher_rows.append({"name": t.name, "params": models.num_params(tm),
                                 "val_perplexity": lm.perplexity(tm, va.x)})
        tokens = sum(len(s.x) * s.x.shape[1] for s in splits.values()) * len(names)
        summary = {
            "name": cfg.name, "task": "lm",
            "teachers": teacher_rows,
            "teacher_val_perplexity": min(r["val_perplexity"] for r in teacher_rows),
            "student_val_perplexity": srow["val_perplexity"],
            "label_only_student_val_perplexity": lorow["val_perplexity"],
            "top1_agreement": srow["top1_agreement"],
            "store_bytes_per_token": store.size_bytes(lay.store) / tokens,
            "store_bytes": store.size_bytes(lay.store),
            "student": srow | {"config": chosen},
            "label_only_student": lorow,
            "tune_trials": tune_rows,
            "wall_seconds": time.perf_counter() - start,
            "mlflow": {"tracking_uri": tracker.uri, "experiment": tracker.experiment, "parent_run_id": parent_id,
                       "registered_model": registered},
        }
        mlflow.log_metrics({k: summary[k] for k in ("teacher_val_perplexity", "student_val_perplexity",
                                                     "label_only_student_val_perplexity", "top1_agreement",
                                                     "store_bytes_per_token", "wall_seconds")})
        mlflow.log_dict(summary, "summary.json")
    write_summary(summary, lay)
    return summary
