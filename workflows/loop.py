"""The typed settings of one training run (a teacher, a KD student or a label-only baseline),
built by `workflows.stages.training_data.loop` from the config and handed to every Train worker."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kd_ops import method_loss
from workflows import kinds
from workflows.config import Fit, TrainConfig
from workflows.ingest import Views


def _defaults(model) -> dict[str, Any]:
    return {k: f.default for k, f in model.model_fields.items()}


_FIT, _TRAIN = _defaults(Fit), _defaults(TrainConfig)

@dataclass(frozen=True)
class FeaturePlan:
    """Feature KD for a student's fit (`stages.inputs.feature_plan`): which layers, their shapes (checked on
    real rows before any teacher runs) and where the teacher's features come from."""
    student_layer: str
    teacher_layer: str
    source: str                  # "store": read per id from `store_entry`; "online": run `teacher` on each batch
    pool: int | None             # teacher positions average-pooled to this many
    input_shape: list[int]       # one input row's shape and dtype (to build the student's projection)
    input_dtype: str
    teacher_shape: list[int]     # one row of the teacher layer's output
    store_entry: str
    teacher_factory: str
    teacher_kwargs: dict[str, Any]
    teacher_weights: str         # a local path or URI of the teacher's safetensors


@dataclass(frozen=True)
class Loop:
    """Everything one training run needs: the model, its optimisation and, for a student, the
    distillation settings (`distill` None: labels only)."""
    factory: str
    kwargs: dict[str, Any]
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    train_rows: int                          # rows per epoch (all workers): sizes the LR schedule
    inputs: str = ""                         # digest of what its datasets read (training_data.Inputs.key): part of the fit's key
    # the config's defaults (config.py holds them; a Loop built by hand gets the same)
    max_grad_norm: float | None = _FIT["max_grad_norm"]
    cpus_per_worker: int = _TRAIN["cpus_per_worker"]
    shuffle_buffer: int = 0                  # rows in Ray Data's local shuffle buffer per worker (0: none)
    in_memory: bool = False                  # one worker: read the datasets once into the process (workflows.in_memory)
    checkpoint_interval_s: float = _TRAIN["checkpoint_interval_s"]  # at most this long between checkpoints
    label: str = "model"                     # for log lines
    task: str = "classification"             # or "lm"
    distill: method_loss.Distill | None = None  # a student's: from the config's distill section (or a trial)
    features: FeaturePlan | None = None      # feature KD
    views: Views | None = None               # its train dataset holds K views per row: the worker draws one per epoch
    init_weights: str | None = None          # start from these safetensors (a local path or URI) instead of a fresh init
    fake_quant: str = ""                     # quantization-aware: train through INT8 fake quantization in this
                                             # recipe (kd_ops.qat: "static" or "dynamic"); "" off
    mlflow: dict[str, str] | None = field(default=None, compare=False)  # {tracking_uri, run_id}: rank 0 logs there
    trace_dir: str | None = None             # each worker writes the ids it trained on per epoch and its final
                                             # weights' digest here (rank<r>-epoch<e>.npy, rank<r>.sha256)

    def replace(self, **changes) -> "Loop":
        return dataclasses.replace(self, **changes)

    @property
    def kind(self) -> "kinds.Classification | kinds.LanguageModel":
        """What the workers do differently for this task kind (loss, validation, scoring)."""
        return kinds.of(self.task)

    @property
    def objective(self) -> tuple[str, str]:
        """The metric that picks checkpoints and tune trials, and its direction."""
        return self.kind.objective
