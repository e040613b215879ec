"""`kd bench store`: what top-k costs and what it keeps, measured in one run.

For one teacher and one text set (a finished `kd run` of an LM config), the store is written
full (fp16 logits), as top-k for k in {8, 32, 128} and as top-32 plus 8 sampled tail tokens per
position, through the real precompute pipeline; the same student is trained for the same short
schedule on each, and bytes per token and the student's validation perplexity are reported side
by side. A second part measures bytes per
token at a 32k-token vocabulary (a teacher of the same shape with a 32k BPE tokenizer, briefly
trained), where full logits are 64 KB per token.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from kd_ops import data, evaluate, lm, models, store
from workflows import console, fingerprints
from workflows import precompute as pre
from workflows import ingest, ray_session, scoring, tasks, train
from workflows.stages import training_data
from workflows.config import RunConfig

log = logging.getLogger("kd")


def _subset(src: Path, dst: Path, rows: int) -> Path:
    """The `rows` sequences with the smallest ids (a stable choice), written as a split."""
    inp = data.read_inputs(src, ["x"], dtype=np.int32)
    order = np.argsort(inp.ids)[:rows]
    return data.write_split(data.Inputs(inp.ids[order], inp.x[order], None), dst)


def _store_for(teacher, dirs: dict[str, Path], store_dir: Path, top_k: int | None, cfg: RunConfig,
               tokens: int, tail_samples: int = 0) -> dict[str, Any]:
    start = time.perf_counter()
    pre.precompute([teacher], dirs, store_dir, feature_columns=["x"], **pre.options(cfg.precompute), top_k=top_k,
                   tail_samples=tail_samples, input_dtype="int64")
    return {"bytes_per_token": store.size_bytes(store_dir) / tokens, "store_bytes": store.size_bytes(store_dir),
            "tokens": tokens, "precompute_seconds": time.perf_counter() - start}


def bench_store(cfg: RunConfig, run_dir: Path, out: Path, *, train_rows: int, epochs: int,
                ks: tuple[int, ...] = (8, 32, 128), tail: tuple[int, int] = (32, 8), big_vocab: int = 32000,
                big_rows: int = 128) -> dict[str, Any]:
    """`tail` = (k, m): one more store, top-k plus m sampled tail tokens per position."""
    ray_session.init_ray()
    run = Path(run_dir).resolve()
    teacher = cfg.teachers[0].model_copy(update={"hf_dir": cfg.teachers[0].hf_dir or run / "teachers" / cfg.teachers[0].name,
                                                 "init": None})
    if not (Path(teacher.hf_dir) / "config.json").is_file():
        raise ValueError(f"no teacher at {teacher.hf_dir}: run `kd run {cfg.name} --out {run_dir}` first")
    out = Path(out).resolve()
    dirs = {"train": _subset(run / "data" / "train", out / "data" / "train", train_rows),
            "val": _subset(run / "data" / "val", out / "data" / "val", 10**9)}
    inputs = {s: data.read_inputs(d, ["x"], dtype=np.int32) for s, d in dirs.items()}
    x_train, x_val = inputs["train"].x, inputs["val"].x
    tokens = sum(inp.x.size for inp in inputs.values())
    results: dict[str, Any] = {"teacher": str(teacher.hf_dir), "vocab_size": lm.load_config(teacher.hf_dir).vocab_size,
                               "train_tokens": int(x_train.size), "val_tokens": int(x_val.size), "epochs": epochs}
    student_kwargs = dict(cfg.student.kwargs) | {"teacher_dir": str(teacher.hf_dir)}
    stores = [("full", None, 0)] + [(f"topk_{k}", k, 0) for k in ks] + [(f"topk_{tail[0]}_tail_{tail[1]}", *tail)]
    task = tasks.LanguageModel(cfg.model_copy(update={"teachers": [teacher]}))
    for key, k, m in stores:
        row = _store_for(teacher, dirs, out / f"store-{key}", k, cfg, tokens, m)
        sets = {s: ingest.dataset({s: d}, feature_columns=["x"], label_column=None, input_dtype="int32",
                                  store_dir=out / f"store-{key}", teachers=[teacher.name], shuffle=s == "train", cache_bytes=int(cfg.train.cache_datasets_mb * 1e6))[0]
                for s, d in dirs.items()}
        # the config's own distillation settings, identical for every store
        inputs = training_data.Inputs(sets, {"train": len(x_train)}, True,
                               fingerprints.digest(store.read_manifest(out / f"store-{key}", teacher.name)))
        loop = training_data.loop(task, cfg.student.factory, student_kwargs,
                           cfg.train.fit.model_copy(update={"epochs": epochs}), inputs=inputs,
                           label=f"bench {key}", distill=True)
        res = train.fit(loop, sets, name=f"bench-{key}", storage=out / "ray", num_workers=cfg.train.num_workers,
                        use_gpu=cfg.train.use_gpu)
        sums = scoring.score(sets["val"], task="lm", factory=loop.factory, kwargs=loop.kwargs, weights=res.weights,
                                batch_size=64)
        row["student_val_perplexity"] = evaluate.rates(sums, "lm")["perplexity"]
        results[key] = row
        log.info("bench store %s: %.1f bytes/token, student val ppl %.3f", key, row["bytes_per_token"],
                 row["student_val_perplexity"])
    for key, _, _ in stores[1:]:
        results[key]["val_perplexity_vs_full"] = (results[key]["student_val_perplexity"]
                                                  / results["full"]["student_val_perplexity"])
    results["big_vocab"] = _big_vocab_sizes(cfg, run, out, big_vocab, big_rows, min(train_rows, 2000), tail)
    return results


def _big_vocab_sizes(cfg: RunConfig, run: Path, out: Path, vocab: int, rows: int, train_rows: int,
                     tail: tuple[int, int]) -> dict:
    """Bytes per token at a big vocabulary: a 32k BPE tokenizer trained on the same text, a
    teacher of the configured shape trained for one epoch on it, stores written full and top-k."""
    t = cfg.data.text
    # a 32k BPE needs more text than the demo reads to find 32k merges
    texts = lm.split_docs(lm.read_corpus(t.paths, max(t.max_bytes, 40_000_000)), t.val_fraction, t.test_fraction, t.seed)
    tok = lm.train_bpe_tokenizer(texts["train"], vocab)
    x = lm.tokenize_and_pack(tok, texts["train"], cfg.data.seq_len)[:train_rows]
    shape = cfg.teachers[0].init or {"n_layer": 4, "n_embd": 128, "n_head": 4}
    kwargs = {"vocab_size": len(tok), "n_positions": cfg.data.seq_len, **shape}
    task = tasks.LanguageModel(cfg)
    split = data.write_split(data.Inputs(np.arange(len(x), dtype=np.int64), x, None), out / "data" / "big-train")
    sets = {s: ingest.dataset({"train": split}, feature_columns=["x"], label_column=None, input_dtype="int32",
                              shuffle=s == "train", cache_bytes=int(cfg.train.cache_datasets_mb * 1e6))[0] for s in ("train", "val")}
    inputs = training_data.Inputs(sets, {"train": len(x)}, True, fingerprints.digest(fingerprints.data_key(["x"], {"train": split})))
    loop = training_data.loop(task, "kd_ops.lm:new_causal_lm", kwargs,
                       cfg.teachers[0].fit.model_copy(update={"epochs": 1}), inputs=inputs,
                       label=f"bench teacher {len(tok)}")
    res = train.fit(loop, sets, name=f"bench-teacher-{len(tok)}", storage=out / "ray", num_workers=1,
                    use_gpu=cfg.train.use_gpu)
    hf_dir = out / f"teacher-{len(tok)}"
    models.load_weights(models.build(loop.factory, kwargs), res.weights).hf.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    last = x[-rows:]  # at most `rows` sequences (fewer when the training slice is smaller)
    sample = {"sample": data.write_split(data.Inputs(np.arange(len(last), dtype=np.int64), last, None), out / "data" / "big")}
    teacher = cfg.teachers[0].model_copy(update={"name": f"teacher-{len(tok)}", "hf_dir": hf_dir, "init": None})
    sizes = {"vocab_size": len(tok), "full_fp16_raw_bytes_per_token": 2 * len(tok)}
    for key, k, m in (("full", None, 0), ("topk_32", 32, 0), (f"topk_{tail[0]}_tail_{tail[1]}", *tail)):
        sizes[key] = _store_for(teacher, sample, out / f"store-big-{key}", k, cfg, int(last.size), m)
    return sizes


def print_table(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"kd bench store · vocab {r['vocab_size']} · {r['train_tokens']:,} train tokens · {r['epochs']} epoch(s)")
    for c in ("store", "bytes/token", "student val ppl", "vs full"):
        t.add_column(c, justify="right")
    for key in [k for k in r if k == "full" or k.startswith("topk_")]:
        row = r[key]
        t.add_row(key, f"{row['bytes_per_token']:,.1f}", f"{row['student_val_perplexity']:.3f}",
                  f"{row.get('val_perplexity_vs_full', 1.0):.4f}")
    Console(file=console.out()).print(t)
    big = r["big_vocab"]
    console.say(f"at vocab {big['vocab_size']}: " + ", ".join(f"{k} {v['bytes_per_token']:,.1f} bytes/token"
                                                        for k, v in big.items() if isinstance(v, dict)))


def main(args) -> int:
    from workflows.config import load_config

    cfg = load_config(args.config, args.overrides)
    if cfg.task != "lm":
        raise ValueError("kd bench store measures the LM token store: give an LM config (task: lm)")
    r = bench_store(cfg, Path(args.run), Path(args.out), train_rows=args.train_rows, epochs=args.epochs)
    if args.json:
        console.say(json.dumps(r))
    else:
        print_table(r)
    Path(args.out, "bench_store.json").write_text(json.dumps(r, indent=2))
    return 0
