"""What differs between a classification run and an LM run on the driver, behind one small
interface that workflows.pipeline and workflows.stages drive: where the inputs come from (`data`),
which teachers to train and how they are kept (`teachers_to_train`, `keep_teachers`), which columns
are read and stored (`feature_columns`, `label_column`, `train_splits`, `precompute_options`), and
how models are scored and summarised (`teacher_report`, `model_report`, `summary`, `quality_key`).
Metrics are computed on the cluster (workflows.scoring) from streamed datasets; what differs on
the workers is in workflows.kinds. This file calls no stage: stages call it."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import ray

from kd_ops import data, evaluate, lm, models
from workflows import precompute as pre
from workflows import fingerprints, ingest, scoring
from workflows.config import RunConfig, TeacherConfig
from workflows.layout import Layout
from workflows.loop import Loop
from workflows.tracking import Tracker

log = logging.getLogger("kd")


KEY_FILE = "kd-teacher-key.json"  # beside a Hugging Face teacher `kd run` trained


def _teacher_key(task, t: TeacherConfig, factory: str, kwargs: dict, dirs) -> str:
    return fingerprints.teacher_key(factory, kwargs, t.fit.model_dump(mode="json"), task.feature_columns, dirs)


def for_config(cfg: RunConfig):
    return LanguageModel(cfg) if cfg.task == "lm" else Classification(cfg)


def _on_the_cluster(specs: list[tuple[int, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """`data.mnist1d_arrays` for each (rows, seed), one Ray task each, in parallel."""
    make = ray.remote(num_cpus=1)(data.mnist1d_arrays)
    return ray.get([make.remote(n, s) for n, s in specs])


class Classification:
    kind = "classification"
    input_dtype = "float32"
    example_dtype = "float32"  # of the registered model's input example
    eval_split = "test"
    train_splits = ("train", "transfer")  # what students train on; transfer rows carry no label (−1): soft term only
    quality_key = "test_accuracy"  # what is reported of a model that ships (the test split)
    choice_key = "val_accuracy"    # what choices between models are made by (the validation split)
    perplexity_quality = False     # tune trials' quality: × the ensemble's val accuracy (higher is better)
    stage_commands = True          # kd precompute / train / tune

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.num_classes = cfg.data.num_classes  # labels are checked against it
        p = cfg.data.parquet if cfg.data.source == "parquet" else None
        self.feature_columns = p.feature_columns if p else ["x"]
        self.label_column = p.label_column if p else "label"

    def data(self, lay: Layout) -> dict[str, Any]:
        """Split directories (train/val/test[/transfer]); the built-in source writes them once."""
        cfg = self.cfg
        if cfg.data.source == "parquet":
            p = cfg.data.parquet
            dirs = {"train": p.train, "val": p.val, "test": p.test} | ({"transfer": p.transfer} if p.transfer else {})
            for d in dirs.values():
                data.parquet_files(d)
            return dirs
        m = cfg.data.mnist1d
        stamp = lay.data / "source.json"
        want = m.model_dump() | {"transfer_parts": data.TRANSFER_PART}  # how the transfer set is made
        dirs = {s: lay.data / s for s in data.SPLITS if s != "transfer" or m.transfer > 0}
        if stamp.is_file() and json.loads(stamp.read_text()) == want and all(d.exists() for d in dirs.values()):
            log.info("data: reusing %s", lay.data)
            return dirs
        log.info("data: generating MNIST-1D (%d labelled, %d transfer)", m.labelled, m.transfer)
        stamp.delete()  # written last: until then the splits are not trusted
        parts = _on_the_cluster(data.mnist1d_parts(m.labelled, m.seed, m.transfer, m.transfer_seed))
        splits = data.mnist1d_splits(m.labelled, m.val, m.test, m.transfer, m.seed, m.transfer_seed, arrays=parts)
        for name, inputs in splits.items():
            data.write_split(inputs, lay.data / name, m.rows_per_file)
        stamp.write_text(json.dumps(want))
        return dirs

    def teachers_to_train(self, dirs, lay: Layout) -> list[tuple[TeacherConfig, str, dict]]:
        """(teacher, factory, kwargs) of each teacher without weights, given or kept under --out.
        Each is built and run on the first train rows first: a bad factory or a model that cannot
        take the inputs fails here, before Ray Train starts."""
        todo = [t for t in self.cfg.teachers if t.weights is None
                and not fingerprints.matches(lay.teacher_key(t), _teacher_key(self, t, t.factory, t.kwargs, dirs))]
        for t in todo:
            pre.forward(f"teacher {t.name!r}", models.build(t.factory, t.kwargs),
                        ingest.first_rows(dirs["train"], self.feature_columns, self.input_dtype))
        return [(t, t.factory, t.kwargs) for t in todo]

    def keep_teachers(self, trained: list[tuple[tuple[TeacherConfig, str, dict], Any]], lay: Layout,
                      tracker: Tracker | None, dirs) -> list[TeacherConfig]:
        """Save each trained teacher's weights under --out (and what they are keyed by, written last);
        returns every teacher with its weights file."""
        for (t, _, _), weights in trained:
            lay.teacher_key(t).delete()
            models.save_weights(models.load_weights(models.build(t.factory, t.kwargs), weights), lay.teacher_weights(t))
            fingerprints.record(lay.teacher_key(t), _teacher_key(self, t, t.factory, t.kwargs, dirs))
            if tracker:
                tracker.log_file(lay.teacher_weights(t), "weights")
        return [t.model_copy(update={"weights": str(lay.teacher_weights(t))}) for t in self.cfg.teachers]

    def precompute_options(self) -> dict[str, Any]:
        return {"input_dtype": "float32", "extra": {"num_classes": self.cfg.data.num_classes}}

    def student_kwargs(self, teachers: list[TeacherConfig]) -> dict[str, Any]:
        return dict(self.cfg.student.kwargs)

    def teacher_report(self, teachers: list[TeacherConfig], kd_sets) -> tuple[list[dict], dict[str, Any], dict[str, float]]:
        """Per-teacher and uniform-ensemble test accuracy from the stored logits, and each teacher's
        validation accuracy (what warnings judge it by): (a row per teacher, the ensemble's numbers
        the student is compared with, the metrics to log)."""
        n = len(teachers)
        acc = evaluate.rates(scoring.score(kd_sets["test"], task=self.kind, teacher_weights=[1 / n] * n), self.kind)
        val = evaluate.rates(scoring.score(kd_sets["val"], task=self.kind, teacher_weights=[1 / n] * n), self.kind)
        rows = [{"name": t.name, "params": models.num_params(models.build(t.factory, t.kwargs)),
                 "test_accuracy": acc[f"teacher{i}_accuracy"], "val_accuracy": val[f"teacher{i}_accuracy"]}
                for i, t in enumerate(teachers)]
        reference = {"ensemble_test_accuracy": acc["ensemble_accuracy"], "ensemble_test_ece": acc["ensemble_ece"],
                     "ensemble_per_class_accuracy": acc["ensemble_per_class_accuracy"]}
        return rows, reference, {**{k: v for k, v in reference.items() if isinstance(v, float)},
                                 **{f"teacher.{r['name']}.test_accuracy": r["test_accuracy"] for r in rows}}

    @staticmethod
    def int8_drop(fp32: float, int8: float) -> float:
        """What INT8 lost, from two accuracies: points/100."""
        return fp32 - int8

    def choice_score(self, loop: Loop, weights, kd_sets) -> float:
        """A model's `choice_key`: its accuracy on the validation split, computed on the cluster."""
        n = len(self.cfg.teachers)  # the sets hold the teachers' logits: scored too, not used here
        sums = scoring.score(kd_sets["val"], task=self.kind, factory=loop.factory, kwargs=loop.kwargs,
                                weights=weights, teacher_weights=[1 / n] * n)
        return evaluate.rates(sums, self.kind)["accuracy"]

    def trial_reference(self, kd_sets) -> float:
        """The uniform teacher ensemble's validation accuracy (what tune trials' scores are compared with)."""
        n = len(self.cfg.teachers)
        sums = scoring.score(kd_sets["val"], task=self.kind, teacher_weights=[1 / n] * n)
        return evaluate.rates(sums, self.kind)["ensemble_accuracy"]

    def model_report(self, loop: Loop, weights: Path, kd_sets) -> dict[str, Any]:
        """Test accuracy and agreement with the uniform teacher ensemble, computed on the cluster."""
        n = len(self.cfg.teachers)
        acc = evaluate.rates(scoring.score(kd_sets["test"], task=self.kind, factory=loop.factory,
                                                kwargs=loop.kwargs, weights=weights, teacher_weights=[1 / n] * n),
                               self.kind)
        return {"params": models.num_params(models.build(loop.factory, loop.kwargs)),
                "test_accuracy": acc["accuracy"], "test_agreement": acc["agreement"], "test_ece": acc["ece"],
                "per_class_accuracy": acc["per_class_accuracy"]}

    def summary(self, teacher_rows, reference, srow, lorow, res, lo_res, store_bytes: int, rows: dict[str, int],
                teachers: list[str]) -> dict[str, Any]:
        """The summary's task-specific part (the store's size is not broken down further here).
        `res`, `lo_res`: the KD and label-only students' fits (their best validation metrics)."""
        ens = reference["ensemble_test_accuracy"]
        per_class = {"teacher ensemble": reference["ensemble_per_class_accuracy"],
                     "KD student": srow.pop("per_class_accuracy"), "label-only student": lorow.pop("per_class_accuracy")}
        return {"teachers": teacher_rows, "ensemble_test_accuracy": ens, "ensemble_test_ece": reference["ensemble_test_ece"],
                "student": srow | {"val_accuracy": res.metrics["val_accuracy"]},
                "label_only_student": lorow | {"val_accuracy": lo_res.metrics["val_accuracy"]},
                "student_vs_ensemble": srow["test_accuracy"] / ens,
                "per_class_accuracy": per_class}

    @staticmethod
    def add_intervals(s: dict[str, Any]) -> None:
        """Every accuracy of the summary `s` gets its 95% interval beside it (`<key>_ci95`, Wilson)
        on the rows it was measured on: what the splits can resolve."""
        n = {"test_accuracy": s["test_rows"], "val_accuracy": s["val_rows"]}
        rows = [*s["teachers"], *(s.get("chain") or []), s["student"], s["label_only_student"],
                (s.get("deploy") or {}).get("int8") or {}]
        for row in rows:
            for key, rows_n in n.items():
                if isinstance(row.get(key), float):
                    row[f"{key}_ci95"] = evaluate.interval95(row[key], rows_n)
        s["ensemble_test_accuracy_ci95"] = evaluate.interval95(s["ensemble_test_accuracy"], s["test_rows"])

    def chosen(self, loop: Loop, teachers: list[str]) -> dict[str, Any]:
        """What the summary records of the student's settings beyond T, α and weights."""
        return {"teachers": teachers, "method": loop.distill.method()}


class LanguageModel:
    """task: lm. Inputs are packed token sequences (id, x: fixed_size_list<int32>[seq_len]); there
    are no labels (the next token is the label) and no transfer split."""
    kind = "lm"
    input_dtype = "int32"
    example_dtype = "int64"  # token ids, as the registered model's signature takes them
    eval_split = "val"
    train_splits = ("train",)
    quality_key = "test_perplexity"  # reported of a model that ships
    choice_key = "val_perplexity"    # what choices between models are made by
    perplexity_quality = True      # tune trials' quality: val perplexity (lower is better)
    stage_commands = False
    feature_columns = ["x"]
    label_column = None
    SPLIT_OFFSET = {"train": 0, "val": 10_000_000, "test": 20_000_000}  # ids unique across splits

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.num_classes = None  # token ids are checked against the vocabulary instead
        self.tokenizer = None

    def _tokenizer_source(self) -> Path | None:
        return next((t.hf_dir for t in self.cfg.teachers if t.hf_dir is not None), None)

    def data(self, lay: Layout) -> dict[str, Path]:
        """Packed token sequences per split, written as Parquet. The tokenizer comes from the first
        teacher directory, or is trained on the train split."""
        cfg = self.cfg
        src = self._tokenizer_source()
        want = {"data": cfg.data.model_dump(mode="json"), "tokenizer_from": str(src)}
        out = lay.local("task: lm")
        stamp, tok_dir = out / "data" / "source.json", out / "tokenizer"
        dirs = {s: out / "data" / s for s in self.SPLIT_OFFSET}
        if stamp.is_file() and json.loads(stamp.read_text()) == want and all(d.is_dir() for d in dirs.values()):
            log.info("data: reusing %s", out / "data")
            self.tokenizer = lm.load_tokenizer(tok_dir)
            return dirs
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
            data.write_split(data.Inputs(np.arange(len(x), dtype=np.int64) + self.SPLIT_OFFSET[split], x, None),
                             dirs[split])
            log.info("data: %s %d sequences × %d tokens", split, len(x), cfg.data.seq_len)
        stamp.write_text(json.dumps(want))
        self.tokenizer = tokenizer
        return dirs

    def _teacher_dir(self, t: TeacherConfig, lay: Layout) -> Path:
        return t.hf_dir or lay.local("task: lm") / "teachers" / t.name

    def teachers_to_train(self, dirs, lay: Layout) -> list[tuple[TeacherConfig, str, dict]]:
        """(teacher, factory, kwargs) of each `init` teacher not yet trained under --out."""
        cfg, tokenizer = self.cfg, self.tokenizer
        todo = [(t, "kd_ops.lm:new_causal_lm", {"vocab_size": len(tokenizer), "n_positions": cfg.data.seq_len, **t.init})
                for t in cfg.teachers if t.init is not None]
        return [(t, f, kw) for t, f, kw in todo if not (self._teacher_dir(t, lay) / "config.json").is_file()
                or not fingerprints.matches(self._teacher_dir(t, lay) / KEY_FILE, _teacher_key(self, t, f, kw, dirs))]

    def keep_teachers(self, trained: list[tuple[tuple[TeacherConfig, str, dict], Any]], lay: Layout,
                      tracker: Tracker | None, dirs) -> list[TeacherConfig]:
        """Save each trained teacher as a Hugging Face directory (and what it is keyed by, written
        last), resolve every teacher to one, then check that all of them, the student and the data
        share one vocabulary and fit seq_len."""
        cfg, tokenizer = self.cfg, self.tokenizer
        for (t, factory, kwargs), weights in trained:
            (self._teacher_dir(t, lay) / KEY_FILE).unlink(missing_ok=True)
            model = models.load_weights(models.build(factory, kwargs), weights)
            model.hf.save_pretrained(self._teacher_dir(t, lay))
            tokenizer.save_pretrained(self._teacher_dir(t, lay))
            fingerprints.record(self._teacher_dir(t, lay) / KEY_FILE, _teacher_key(self, t, factory, kwargs, dirs))
        resolved = []
        for t in cfg.teachers:
            lm.weight_files(self._teacher_dir(t, lay), t.allow_pickle)  # safetensors, or pickle only where the config opts in
            resolved.append(t.model_copy(update={"hf_dir": self._teacher_dir(t, lay), "init": None}))
        configs = {t.name: lm.load_config(t.hf_dir) for t in resolved}
        toks = {t.name: lm.load_tokenizer(t.hf_dir) for t in resolved} | {"data": tokenizer}
        configs["student"] = models.build(cfg.student.factory, self.student_kwargs(resolved)).config
        lm.check_same_vocab(configs, toks)
        for name, c in configs.items():
            lm.check_context(c, cfg.data.seq_len, name)
        return resolved

    def precompute_options(self) -> dict[str, Any]:
        pc = self.cfg.precompute
        return {"input_dtype": "int64", "top_k": pc.top_k, "tail_samples": pc.tail_samples}

    def student_kwargs(self, teachers: list[TeacherConfig]) -> dict[str, Any]:
        kw = dict(self.cfg.student.kwargs)
        if self.cfg.student.factory == "kd_ops.lm:student_from_teacher":
            kw.setdefault("teacher_dir", str(teachers[0].hf_dir))
        return kw

    def teacher_report(self, teachers: list[TeacherConfig], kd_sets) -> tuple[list[dict], dict[str, float], dict[str, float]]:
        """Each teacher's validation perplexity, its model run on the cluster over the streamed split:
        (a row per teacher, the best of them, the metrics to log)."""
        rows = []
        for t in teachers:
            sums = scoring.score(kd_sets["val"], task=self.kind, factory="kd_ops.lm:causal_lm",
                                    kwargs=pre.hf_kwargs(t), teacher_weights=None, batch_size=64)
            rows.append({"name": t.name, "params": models.num_params(lm.load_causal_lm(t.hf_dir, allow_pickle=t.allow_pickle)),
                         "val_perplexity": evaluate.rates(sums, self.kind)["perplexity"]})
        reference = {"teacher_val_perplexity": min(r["val_perplexity"] for r in rows)}
        return rows, reference, dict(reference)

    def model_report(self, loop: Loop, weights: Path, kd_sets) -> dict[str, Any]:
        """Validation and test perplexity, and top-1 agreement with the highest-weighted teacher on val."""
        weights_for = self.cfg.teacher_weight_list()
        common = dict(task=self.kind, factory=loop.factory, kwargs=loop.kwargs, weights=weights, batch_size=64)
        val = evaluate.rates(scoring.score(kd_sets["val"], teacher_weights=weights_for, **common), self.kind)
        test = evaluate.rates(scoring.score(kd_sets["test"], teacher_weights=weights_for, **common), self.kind)
        return {"params": models.num_params(models.build(loop.factory, loop.kwargs)),
                "val_perplexity": val["perplexity"], "test_perplexity": test["perplexity"],
                "top1_agreement": val["top1_agreement"]}

    def summary(self, teacher_rows, reference, srow, lorow, res, lo_res, store_bytes: int, rows: dict[str, int],
                teachers: list[str]) -> dict[str, Any]:
        tokens = sum(rows.values()) * self.cfg.data.seq_len * len(teachers)
        return {"task": "lm", "teachers": teacher_rows, **reference,
                "student_val_perplexity": srow["val_perplexity"],
                "label_only_student_val_perplexity": lorow["val_perplexity"],
                "top1_agreement": srow["top1_agreement"], "student": srow, "label_only_student": lorow,
                "store_bytes_per_token": store_bytes / tokens}

    @staticmethod
    def int8_drop(fp32: float, int8: float) -> float:
        """What INT8 lost, from two perplexities: the relative rise."""
        return int8 / fp32 - 1

    def choice_score(self, loop: Loop, weights, kd_sets) -> float:
        """A model's `choice_key`: its perplexity on the validation split, computed on the cluster."""
        sums = scoring.score(kd_sets["val"], task=self.kind, factory=loop.factory, kwargs=loop.kwargs,
                                weights=weights, teacher_weights=None, batch_size=64)
        return evaluate.rates(sums, self.kind)["perplexity"]

    def trial_reference(self, kd_sets) -> None:
        return None  # trials are compared by their perplexity itself

    @staticmethod
    def add_intervals(s: dict[str, Any]) -> None:
        """Perplexities get no interval here (no per-sequence variance is kept)."""

    def chosen(self, loop: Loop, teachers: list[str]) -> dict[str, Any]:
        return {"divergence": loop.distill.divergence, "tail": loop.distill.tail}
