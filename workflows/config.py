"""Run configuration: pydantic models, validated once, passed down as typed objects.

Defaults live here and only here. Every model forbids unknown keys, so a typo is an error that
names the field instead of a silently ignored setting.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """The config file is unreadable or invalid; the message names file and field."""


# Names that become file or directory names (store entries, checkpoints, MLflow metric prefixes):
# one plain identifier, so `.`, `..`, `a/b` or a leading dot can never point a path elsewhere.
def _plain_name(v: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", v):
        raise ValueError(f"{v!r} is not a plain name: use letters, digits, _ and - only, starting with a letter "
                         "or digit (it names directories and metrics)")
    return v


Name = Annotated[str, AfterValidator(_plain_name)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Mnist1dSource(Strict):
    labelled: int = Field(20000, ge=100, description="labelled samples, split into train/val/test")
    val: int = Field(5000, ge=10)
    test: int = Field(10000, ge=10)
    transfer: int = Field(60000, ge=0, description="unlabelled transfer-set size (another seed)")
    seed: int = 0
    transfer_seed: int = 1
    rows_per_file: int = Field(8192, ge=1)


class ParquetSource(Strict):
    """Split directories: local paths (relative to the config file) or pyarrow.fs URIs (s3://, gs://)."""
    train: str
    val: str
    test: str
    transfer: str | None = None
    feature_columns: list[str] = ["x"]
    label_column: str = "label"


class TextSource(Strict):
    """Plain-text corpus for LM distillation, split by document into train/val/test."""
    paths: list[str] = Field(["python-stdlib"], description="files, directories or globs; 'python-stdlib' = "
                             "this Python's standard library *.py files (a real corpus available offline)")
    max_bytes: int = Field(3_000_000, ge=1000, description="stop reading after this much text")
    val_fraction: float = Field(0.05, gt=0, lt=0.5)
    test_fraction: float = Field(0.05, gt=0, lt=0.5)
    vocab_size: int = Field(2048, ge=260, description="BPE size when kd-ops trains the tokenizer (no teacher directory given)")
    seed: int = 0


class DataConfig(Strict):
    source: Literal["mnist1d", "parquet", "text"] = "mnist1d"
    mnist1d: Mnist1dSource = Mnist1dSource()
    parquet: ParquetSource | None = None
    text: TextSource | None = None
    num_classes: int = Field(10, ge=2)
    seq_len: int = Field(64, ge=2, description="LM: tokens per packed sequence")

    @model_validator(mode="after")
    def _source_given(self) -> "DataConfig":
        if self.source == "parquet" and self.parquet is None:
            raise ValueError("data.source is 'parquet' but data.parquet (train/val/test directories) is missing")
        if self.source == "text" and self.text is None:
            self.text = TextSource()
        return self


class Fit(Strict):
    """How one model is trained (teacher, student or label-only baseline)."""
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(256, ge=1, description="rows per optimisation step over all Train workers "
                            "(each of N workers takes batch_size / N)")
    lr: float = Field(5e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    max_grad_norm: float | None = Field(None, gt=0, description="clip the global gradient norm to this (null: no clipping)")
    shuffle_buffer: int | None = Field(None, ge=0, description="rows in each Train worker's local shuffle buffer; "
                                       "null = auto: 8192 for datasets cached in the object store, 0 for streamed "
                                       "ones (their read tasks permute rows; file order is shuffled every epoch)")
    seed: int = 0


class TeacherConfig(Strict):
    name: Name
    factory: str | None = Field(None, description="import path 'package.module:function' returning a torch.nn.Module")
    kwargs: dict[str, Any] = {}
    weights: str | None = Field(None, description="safetensors file (local path or URI); if absent, the pipeline "
                                "trains the teacher")
    hf_dir: Path | None = Field(None, description="LM: a local Hugging Face causal-LM directory (config, weights, tokenizer)")
    init: dict[str, int] | None = Field(None, description="LM: GPT-2 sizes (n_layer, n_embd, n_head) to train a teacher from scratch")
    allow_pickle: bool = Field(False, description="LM: load an hf_dir whose weights are only pickle files "
                               "(pytorch_model.bin). Unpickling runs code: only for files you trust; "
                               "better convert them to safetensors")
    fit: Fit = Fit(epochs=100, batch_size=128)

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherConfig":
        given = [k for k in ("factory", "hf_dir", "init") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"teacher {self.name!r}: give exactly one of factory (+ weights), hf_dir or init, got {given or 'none'}")
        return self


class StudentConfig(Strict):
    factory: str = "kd_ops.models:cnn"
    kwargs: dict[str, Any] = {"width": 16}
    width_kwarg: str = Field("width", description="the kwarg that tune.student_width sets")


class FeatureKD(Strict):
    """Feature distillation from one teacher's named layer (see kd_ops.feature_kd)."""
    kind: Literal["hint", "attention"] = Field("hint", description="hint: FitNets alignment through a learned "
                                               "projection; attention: attention transfer (no projection)")
    student_layer: str = Field(description="module name in the student (model.named_modules()), e.g. features.5")
    teacher_layer: str = Field(description="module name in the teacher, e.g. features.5")
    teacher: str | None = Field(None, description="whose features (a teacher's name); default: the first teacher")
    source: Literal["store", "online"] = Field("store", description="store: precompute writes the layer's output "
                                               "per id (fp16) into the store; online: each Train worker runs the "
                                               "teacher on its batches")
    pool: int | None = Field(None, ge=1, description="average-pool the teacher's positions to this many (smaller store)")
    loss: Literal["mse", "cosine"] = Field("mse", description="hint loss")
    weight: float = Field(1.0, ge=0, description="weight of the feature term in the student's loss")


class RelationKD(Strict):
    """Relational KD (Park et al. 2019) on the feature layers' outputs, or the logits without them."""
    distance: float = Field(0.0, ge=0, description="weight of the RKD distance loss (paper: 25)")
    angle: float = Field(0.0, ge=0, description="weight of the RKD angle loss (paper: 50)")


class DKD(Strict):
    alpha: float = Field(1.0, ge=0, description="weight of the target-class term (TCKD)")
    beta: float = Field(8.0, ge=0, description="weight of the non-target-class term (NCKD)")


class Assistant(Strict):
    """One teacher assistant of a TAKD chain: the student's factory with these kwargs."""
    name: Name
    kwargs: dict[str, Any]


class DistillConfig(Strict):
    temperature: float = Field(1.0, gt=0, description="softmax temperature T applied to stored raw logits")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field("forward_kl", description="LM token-level divergence")
    beta: float = Field(0.5, gt=0, lt=1, description="JSD mixing weight")
    tail: bool = Field(True, description="LM top-k: add a bucket for the teacher mass outside the top-k")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft (KD) term; 1 − α goes to labels")
    teacher_weights: dict[str, float] | None = Field(None, description="per-teacher weights, normalised to sum 1; default uniform")
    response: Literal["hinton", "dkd"] = Field("hinton", description="the soft term: Hinton KD, or decoupled KD "
                                               "(Zhao et al. 2022) with distill.dkd.alpha/beta")
    dkd: DKD = DKD()
    schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="temperature over training, "
                                                               "from distill.temperature to distill.temperature_end")
    temperature_end: float | None = Field(None, gt=0, description="the temperature at the end of training (schedule)")
    standardize: bool = Field(False, description="per-sample temperature: z-score each model's logits per row "
                              "before the softmax (Sun et al. 2024, logit standardisation)")
    teacher_weighting: Literal["static", "entropy", "correctness"] = Field(
        "static", description="multi-teacher weights per row from the stored logits: static (teacher_weights "
        "only), entropy (times each teacher's confidence on the row), correctness (CA-MKD: less weight to a "
        "teacher that is wrong on a labelled row; entropy on unlabelled rows)")
    feature: FeatureKD | None = None
    rkd: RelationKD = RelationKD()
    assistants: list[Assistant] = Field([], description="TAKD (Mirzadeh et al. 2020): teacher → assistants → "
                                        "student, largest first; each is distilled from the one before and its "
                                        "logits stored as a new teacher")
    generations: int = Field(1, ge=1, description="born-again students (Furlanello et al. 2018): generation g+1, "
                             "the student's own architecture, learns from generation g's stored logits")
    chain_teacher_weight: float = Field(0.0, ge=0, le=1, description="TAKD / born-again: weight of the original "
                                        "teachers (together) beside the previous stage for each next stage")

    @field_validator("teacher_weights")
    @classmethod
    def _non_negative(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None:
            bad = {k: w for k, w in v.items() if w < 0}
            if bad:
                raise ValueError(f"teacher weights must be >= 0, got {bad}")
            if sum(v.values()) <= 0:
                raise ValueError("teacher weights must not all be 0")
        return v


class TrainConfig(Strict):
    fit: Fit = Fit(epochs=12)
    label_only_fit: Fit = Fit(epochs=100, batch_size=128)
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP, gloo on CPU)")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs (and torch threads) per Train worker")
    use_gpu: bool = False
    cache_datasets_mb: float = Field(512, ge=0, description="a dataset whose files (inputs + shards) take less "
                                     "than this is read once into Ray's object store instead of every epoch; 0: "
                                     "always stream")
    in_memory: bool = Field(True, description="a one-worker fit of a dataset cached in the object store reads "
                            "its rows once into the fit's own process and shuffles them there every epoch, "
                            "instead of a Ray Data pass per epoch (fits with augmented views always stream)")
    max_concurrent_fits: int | None = Field(None, ge=1, description="independent fits run at once (the "
                                            "teachers; the KD student beside its label-only baseline), each its "
                                            "own Ray Train run; null: as many as the cluster's resources hold")
    resource_wait_s: float = Field(600, gt=0, description="a fit whose workers cannot get their resources for "
                                   "this long fails, naming the resources (Ray would wait forever)")
    max_failures: int = Field(3, ge=-1, description="times a fit's worker group is restarted from its latest "
                              "checkpoint after a worker or node is lost (-1: no limit)")
    checkpoint_interval_s: float = Field(60, ge=0, description="at most this long between checkpoints (one is "
                                         "always written after the last epoch); 0: every epoch")
    resources: dict[str, float] = Field({}, description="custom resources (e.g. {student_node: 1}) or accelerator "
                                        "types (e.g. {'accelerator_type:A10G': 0.001}) each Train worker needs: "
                                        "places students on a node group")


class PrecomputeConfig(Strict):
    batch_size: int = Field(4096, ge=1)
    top_k: int | None = Field(None, ge=1, description="LM: keep the k largest logits per token (None = full logits)")
    tail_samples: int = Field(0, ge=0, description="LM top-k: also keep m tokens per position drawn from the "
                              "teacher's distribution outside the top-k (with their logits); forward KL then "
                              "estimates the tail without bias. ~3 bytes/token each")
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="bfloat16 for GPU teachers")
    num_actors: int = Field(1, ge=1, description="actor-pool size per teacher")
    threads_per_actor: int | None = Field(None, ge=1, description="torch threads per actor (None: CPU teachers "
                                          "share the node's cores, GPU teachers use 1)")
    calls_per_actor: int = Field(2, ge=1, description="batches in flight in one actor, so reading, host copies "
                                 "and encoding overlap the teacher's forward")
    use_gpu: bool = False
    resources: dict[str, float] = Field({}, description="custom resources (e.g. {teacher_node: 1}) or accelerator "
                                        "types each teacher actor needs: places teachers on a node group")
    views: int = Field(1, ge=1, description="augmented views per training row: the teachers also run on views "
                       "1..K-1 of the training splits (store entries <teacher>.view<k>, K× the bytes); training "
                       "draws one view per row per epoch and gives the student that same view")
    augment: str = Field("kd_ops.augment:signal_views", description="the view function fn(x, ids, view, seed) → "
                         "x of the same shape and dtype; view 0 must be x itself")
    augment_seed: int = Field(0, ge=0, lt=2**64, description="seed of the views (with the row id and view number; "
                              "drawn as an unsigned 64-bit integer)")


class Dim(Strict):
    """One search dimension: exactly one of choice / uniform / loguniform."""
    choice: list[float] | list[str] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one(self) -> "Dim":
        given = [k for k in ("choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice / uniform / loguniform, got {given or 'none'}")
        for k in ("uniform", "loguniform"):
            lo_hi = getattr(self, k)
            if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
                raise ValueError(f"{k} needs low < high, got {list(lo_hi)}")
        return self

    def values_bound(self) -> tuple[float, float]:
        vals = self.choice or self.uniform or self.loguniform
        return min(vals), max(vals)


# the distillation method's own settings (fields of kd_ops.method_loss.Distill) Tune can search: the names
# and words are kd_ops' own (tests/workflows/test_config.py checks they stay so; config.py imports no torch)
# those in METHOD_WORDS take words (the allowed ones), the others numbers
METHOD_WORDS = {"response": ("hinton", "dkd"), "schedule": ("constant", "linear", "cosine"),
                "teacher_weighting": ("static", "entropy", "correctness")}
METHOD_DIMS = ("response", "schedule", "teacher_weighting", "dkd_alpha", "dkd_beta", "temperature_end", "feature_weight",
               "rkd_distance", "rkd_angle")


class TuneConfig(Strict):
    enabled: bool = True
    num_samples: int = Field(8, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    epochs: int = Field(6, ge=1, description="max epochs per trial (ASHA max_t)")
    grace_period: int = Field(2, ge=1, description="epochs before ASHA may stop a trial")
    reduction_factor: int = Field(2, ge=2)
    temperature: Dim | None = Dim(choice=[1.0, 2.0, 4.0])
    alpha: Dim | None = Dim(uniform=(0.0, 1.0))  # reaches 0: a search can find that labels should dominate
    student_width: Dim | None = Dim(choice=[12, 16])
    teacher_weights: Dim | None = Dim(uniform=(0.1, 1.0))
    # methods (classification): searched when given, else the distill section's value
    response: Dim | None = Field(None, description="choice of hinton / dkd")
    dkd_alpha: Dim | None = None
    dkd_beta: Dim | None = None
    schedule: Dim | None = Field(None, description="choice of constant / linear / cosine")
    teacher_weighting: Dim | None = Field(None, description="choice of static / entropy / correctness")
    temperature_end: Dim | None = None
    feature_weight: Dim | None = Field(None, description="weight of the feature term (needs distill.feature)")
    rkd_distance: Dim | None = None
    rkd_angle: Dim | None = None
    seed: int = 0
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha: stop poor trials early (grace_period, "
                                               "reduction_factor); fifo: every trial runs all its epochs")
    searcher: Literal["random", "optuna"] = Field("random", description="random: sample the space (seeded); "
                                                 "optuna: Optuna's TPE proposes each trial from the ones before "
                                                 "(pip install optuna)")
    trial_runner: Literal["auto", "ray_train"] = Field(
        "auto", description="auto: a one-worker trial runs its training loop in its Tune trial (no Ray Train "
        "controller or worker group to start); ray_train: every trial is a Ray Train run")
    max_failures: int = Field(1, ge=0, description="retries of a trial that raised, before it counts as failed "
                              "(the search goes on with the others)")

    @model_validator(mode="after")
    def _ranges(self) -> "TuneConfig":
        for name, allowed in METHOD_WORDS.items():
            dim = getattr(self, name)
            if dim is not None and (dim.choice is None or any(v not in allowed for v in dim.choice)):
                raise ValueError(f"tune.{name} must be a choice among {list(allowed)}, got {dim.model_dump(exclude_none=True)}")
        checks = {"temperature": (0.0, None, "> 0"), "alpha": (0.0, 1.0, "in [0, 1]"),
                  "teacher_weights": (0.0, None, ">= 0"), "student_width": (1.0, None, ">= 1"),
                  "temperature_end": (0.0, None, "> 0"),
                  **{k: (0.0, None, ">= 0") for k in METHOD_DIMS if k not in METHOD_WORDS and k != "temperature_end"}}
        for name, (lo, hi, text) in checks.items():
            dim = getattr(self, name)
            if dim is None:
                continue
            if dim.choice is not None and any(isinstance(v, str) for v in dim.choice):
                raise ValueError(f"tune.{name} takes numbers, got {dim.choice}")
            low, high = dim.values_bound()
            if (name in ("temperature", "temperature_end") and low <= 0) or low < lo or (hi is not None and high > hi):
                raise ValueError(f"tune.{name} values must be {text}, got {dim.model_dump(exclude_none=True)}")
        if self.grace_period > self.epochs:
            raise ValueError(f"tune.grace_period ({self.grace_period}) must be <= tune.epochs ({self.epochs})")
        return self


class DeployTarget(Strict):
    """The hardware the student will run on, as Ray sees it: latency is measured by a Ray task placed there."""
    resources: dict[str, float] = Field({}, description="custom Ray resources of the target node, e.g. {edge_cpu: 1} "
                                        "(start that node with --resources '{\"edge_cpu\": 1}'); empty: any node")
    accelerator_type: str | None = Field(None, description="a Ray accelerator type (e.g. H100): the task takes one GPU "
                                         "of that type and PyTorch runs on it")
    threads: int = Field(1, ge=1, description="CPU threads for inference (torch and ONNX Runtime) and CPUs the task takes")
    batch_sizes: list[int] = Field([1, 256], min_length=1, description="batch sizes to time")
    runs: int = Field(200, ge=10, description="at most this many timed runs per runtime and batch size (median "
                      "and p95); fewer when `seconds` of timed work come first")
    warmup: int = Field(20, ge=0, description="at most this many untimed runs first (stopped after seconds/4)")
    seconds: float = Field(1.0, gt=0, le=60, description="about this much timed work per runtime and batch size "
                           "(at least 3 runs): the step ends in bounded time however slow one run is")

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError(f"batch sizes must be >= 1, got {v}")
        return v

    def ray_options(self) -> dict[str, Any]:
        """The `.options()` of the Ray task that times models here."""
        opts: dict[str, Any] = {"num_cpus": self.threads}
        if self.resources:
            opts["resources"] = dict(self.resources)
        if self.accelerator_type:
            opts |= {"num_gpus": 1, "accelerator_type": self.accelerator_type}
        return opts


class DeployConfig(Strict):
    """What ships: the student exported to ONNX, quantized to INT8, timed on the target, chosen under a budget."""
    enabled: bool = Field(True, description="export, quantize and time the student after the run")
    opset: int = Field(18, ge=18, description="ONNX opset of the exported graphs")
    int8: bool = Field(True, description="INT8 quantization (ONNX Runtime): every recipe that fits the model (static "
                       "QDQ for convolutional and MLP students, dynamic MatMul-only for transformers) tried, the smallest "
                       "within int8_max_drop on validation shipped; none within it: fp32 ships")
    calibration_rows: int = Field(512, ge=1, description="real input rows from the training split that calibrate INT8")
    int8_max_drop: float = Field(0.01, ge=0, description="largest loss of an INT8 model against fp32 on validation for "
                                 "it to ship: accuracy points/100 (classification), relative perplexity rise (LM)")
    qat: Literal["auto", "always", "never"] = Field("auto", description="quantization-aware distillation, simulating "
                                                    "the recipe that lost least: auto (when no recipe is within "
                                                    "int8_max_drop), always or never")
    qat_epochs: int = Field(5, ge=1, description="epochs of quantization-aware distillation")
    qat_lr_scale: float = Field(0.1, gt=0, description="its learning rate, as a fraction of train.fit.lr")
    target: DeployTarget = DeployTarget()
    latency_budget_ms: float | None = Field(None, gt=0, description="the student must answer a batch of "
                                            "budget_batch_size within this (ONNX Runtime fp32 on the target, median)")
    quality_target: float | None = Field(None, gt=0, description="classification: validation accuracy as a ratio to "
                                         "the teacher ensemble's (e.g. 0.97); LM: a validation perplexity ceiling")
    budget_batch_size: int = Field(1, ge=1)


class TrackingConfig(Strict):
    tracking_uri: str | None = Field(None, description="default: sqlite:///<cwd>/mlflow.db")
    experiment: str = "kd-ops"
    registered_model: str = "kd-student"


class RunConfig(Strict):
    name: Name = "kd-run"
    task: Literal["classification", "lm"] = "classification"
    data: DataConfig = DataConfig()
    teachers: list[TeacherConfig] = Field(min_length=1)
    student: StudentConfig = StudentConfig()
    distill: DistillConfig = DistillConfig()
    train: TrainConfig = TrainConfig()
    precompute: PrecomputeConfig = PrecomputeConfig()
    tune: TuneConfig = TuneConfig()
    tracking: TrackingConfig = TrackingConfig()
    deploy: DeployConfig = DeployConfig()
    code: list[Path] = Field([], description="local module files or package directories (e.g. the module of "
                             "your factories) shipped to every Ray worker as runtime_env py_modules; relative to "
                             "the config file")

    def teacher_weight_list(self) -> list[float]:
        """`distill.teacher_weights` as one weight per teacher, in teacher order, summing to 1."""
        names = [t.name for t in self.teachers]
        w = self.distill.teacher_weights
        raw = [w.get(n, 0.0) for n in names] if w else [1.0] * len(names)
        return [x / sum(raw) for x in raw]

    def feature_teacher(self, teachers: list["TeacherConfig"] | None = None) -> "TeacherConfig":
        """The teacher whose layer feature KD reads (`distill.feature.teacher`, or the first), among
        `teachers` (default: the config's)."""
        teachers = self.teachers if teachers is None else teachers
        name = self.distill.feature.teacher or teachers[0].name
        return next(t for t in teachers if t.name == name)

    @model_validator(mode="after")
    def _teachers_consistent(self) -> "RunConfig":
        for t in self.teachers:
            if self.task == "classification" and t.factory is None:
                raise ValueError(f"teacher {t.name!r}: classification teachers need a factory (hf_dir/init are for task: lm)")
            if self.task == "lm" and t.factory is not None:
                raise ValueError(f"teacher {t.name!r}: LM teachers are given by hf_dir or init, not factory")
        names = [t.name for t in self.teachers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"teacher names must be unique, repeated: {dup}")
        if self.distill.teacher_weights is not None:
            unknown = sorted(set(self.distill.teacher_weights) - set(names))
            if unknown:
                raise ValueError(f"distill.teacher_weights names unknown teachers {unknown} (teachers: {names})")
        d = self.distill
        if self.task == "lm" and (d.response != "hinton" or d.feature or d.rkd.distance or d.rkd.angle or d.assistants
                                  or d.generations > 1 or d.standardize or d.teacher_weighting != "static"):
            raise ValueError("distill: response/dkd, feature, rkd, assistants, generations, standardize and "
                             "teacher_weighting are for "
                             "task: classification; LM distillation uses distill.divergence")
        searched = [k for k in METHOD_DIMS if getattr(self.tune, k) is not None]
        if self.task == "lm" and searched:
            raise ValueError(f"tune.{searched[0]} searches a classification method; task: lm searches distill.divergence")
        if d.feature is not None and d.feature.teacher is not None and d.feature.teacher not in names:
            raise ValueError(f"distill.feature.teacher {d.feature.teacher!r} is not a teacher (teachers: {names})")
        if d.assistants and d.generations > 1:
            raise ValueError("give distill.assistants (TAKD) or distill.generations (born-again), not both")
        if self.tune.feature_weight is not None and d.feature is None:
            raise ValueError("tune.feature_weight searches the feature term's weight: set distill.feature (layers) too")
        dp = self.deploy
        if (dp.latency_budget_ms is not None or dp.quality_target is not None) and not (dp.enabled and self.tune.enabled):
            raise ValueError("deploy.latency_budget_ms / quality_target choose the smallest student among the tune "
                             "trials: set tune.enabled: true and deploy.enabled: true")
        if self.precompute.views > 1:
            if self.task != "classification":
                raise ValueError("precompute.views: augmented views are for task: classification")
            if d.assistants or d.generations > 1:
                raise ValueError("precompute.views: a TAKD or born-again chain stores its stages without views; "
                                 "give precompute.views: 1 with distill.assistants / generations")
            if d.feature is not None and d.feature.source == "store":
                raise ValueError("precompute.views: stored teacher features are of the plain inputs; use "
                                 "distill.feature.source: online with views")
        if self.precompute.tail_samples and (self.task != "lm" or self.precompute.top_k is None):
            raise ValueError("precompute.tail_samples samples the tail outside a top-k store: it needs task: lm "
                             "and precompute.top_k (full logits have no tail)")
        return self


def _set(tree: dict, dotted: str, value: Any) -> None:
    """Set a.b.0.c = value; integer parts index lists (teachers.0.fit.epochs)."""
    keys: list[Any] = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    try:
        for k in keys[:-1]:
            tree = tree[k] if isinstance(tree, list) else tree.setdefault(k, {})
        tree[keys[-1]] = value
    except (IndexError, TypeError, AttributeError):
        raise ConfigError(f"override {dotted}: no such place in the config (lists take an index, e.g. teachers.0.fit)") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML, apply `a.b=value` overrides (values parsed as YAML), validate.

    Relative paths in the file are taken relative to the file's directory.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config {path} is a directory; give the YAML file (e.g. {path}/config.yaml)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the config as UTF-8 YAML") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (data, teachers, ...)")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        _set(raw, key, yaml.safe_load(value))
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"{path}: invalid config\n  " + "\n  ".join(lines)) from None
    return _resolve_paths(cfg, path.parent.resolve())


def _resolve_paths(cfg: RunConfig, base: Path) -> RunConfig:
    fix = lambda p: p if p is None or p.is_absolute() else (base / p).resolve()  # noqa: E731
    uri = lambda p: p if p is None or "://" in p else str(fix(Path(p)))  # noqa: E731
    for t in cfg.teachers:
        t.weights, t.hf_dir = uri(t.weights), fix(t.hf_dir)
    cfg.code = [fix(Path(c)) for c in cfg.code]
    if cfg.data.parquet is not None:
        pq_cfg = cfg.data.parquet
        pq_cfg.train, pq_cfg.val, pq_cfg.test, pq_cfg.transfer = map(uri, (pq_cfg.train, pq_cfg.val, pq_cfg.test, pq_cfg.transfer))
    return cfg
