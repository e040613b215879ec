"""Feature distillation: hidden-state alignment through a learned projection (FitNets; Romero et
al., ICLR 2015, "FitNets: Hints for Thin Deep Nets") and attention transfer (Zagoruyko &
Komodakis, ICLR 2017, "Paying More Attention to Attention").

Layers are named by module name (`model.named_modules()`) and read with forward hooks: no model
surgery, any torch module works. Shapes below are per batch: [B, D] (a flat layer), [B, C, L]
(1-D conv maps, or [B, L, D] sequences read as channels × positions) or [B, C, H, W].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerError(ValueError):
    """A layer name that does not exist, or features no projection can map."""


def find_module(model: nn.Module, name: str, who: str = "model") -> nn.Module:
    """The submodule called `name`; LayerError listing the available names if there is none."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        names = [n for n in modules if n]
        raise LayerError(f"{who} has no layer {name!r}; its layers are: {', '.join(names)}")
    return modules[name]


def pool(f: torch.Tensor, size: int | None) -> torch.Tensor:
    """Adaptive average pooling of the positions to `size` (per spatial dim); None or flat: as is."""
    if size is None or f.dim() == 2:
        return f
    return F.adaptive_avg_pool1d(f, size) if f.dim() == 3 else F.adaptive_avg_pool2d(f, size)


def _output(out) -> torch.Tensor:
    """A layer's output tensor (the first element of a tuple, as HF blocks return)."""
    return out[0] if isinstance(out, (tuple, list)) else out


class Tap:
    """Keeps the latest output of one named layer (with its graph: students learn through it)."""

    def __init__(self, model: nn.Module, layer: str, who: str = "model"):
        self.out: torch.Tensor | None = None
        self.handle = find_module(model, layer, who).register_forward_hook(self._keep)

    def _keep(self, module, inputs, out) -> None:
        self.out = _output(out)

    def remove(self) -> None:
        self.handle.remove()

    def take(self) -> torch.Tensor:
        out, self.out = self.out, None
        if out is None:
            raise LayerError("the named layer did not run in the model's forward")
        return out


class LayerOutput(nn.Module):
    """A teacher that returns one named layer's output (pooled) instead of its logits: what
    precompute stores as teacher features and what online feature KD computes on the workers."""

    def __init__(self, model: nn.Module, layer: str, pool_to: int | None = None):
        super().__init__()
        self.model, self.pool_to = model, pool_to
        self.tap = Tap(model, layer, "teacher")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.model(x)
        return pool(self.tap.take(), self.pool_to)


def projection(student: list[int], teacher: list[int]) -> nn.Module:
    """A learned map from per-sample student features to the teacher's shape.

    [Ds] → [Dt]: linear; [Cs, L] → [Ct, L]: 1×1 conv; [Cs, H, W] → [Ct, H, W]: 1×1 conv. A student
    with more positions than the teacher is average-pooled down first. LayerError otherwise."""
    if len(student) != len(teacher) or not 1 <= len(student) <= 3:
        raise LayerError(f"no projection maps student features of shape {student} to teacher features {teacher}: "
                         "pick layers of the same kind (both flat, or both [channels, positions]), or set "
                         "distill.feature.pool")
    if len(student) == 1:
        return nn.Linear(student[0], teacher[0])
    if any(s < t for s, t in zip(student[1:], teacher[1:])):
        raise LayerError(f"student features {student} have fewer positions than the teacher's {teacher}: pick an "
                         "earlier student layer or a later teacher layer, or set distill.feature.pool to pool both")
    conv = nn.Conv1d if len(student) == 2 else nn.Conv2d
    layers: list[nn.Module] = [conv(student[0], teacher[0], 1)]
    if student[1:] != teacher[1:]:
        size = teacher[1] if len(teacher) == 2 else tuple(teacher[1:])
        layers.insert(0, nn.AdaptiveAvgPool1d(size) if len(student) == 2 else nn.AdaptiveAvgPool2d(size))
    return nn.Sequential(*layers)


def hint_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """FitNets hint loss between projected student features and the teacher's, same shape [B, ...].
    mse: mean squared error; cosine: mean over rows of 1 − cos(flattened rows). Scalar, 0 when equal."""
    if student.shape != teacher.shape:
        raise LayerError(f"projected student features {list(student.shape)} != teacher features {list(teacher.shape)}")
    s, t = student.float(), teacher.float()
    if kind == "mse":
        return F.mse_loss(s, t)
    if kind == "cosine":
        return (1 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1)).mean()
    raise ValueError(f"hint loss must be 'mse' or 'cosine', got {kind!r}")


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis' spatial attention: mean over channels of |f|^p, flattened, unit L2 norm.
    [B, C, L] or [B, C, H, W] → [B, positions]."""
    if f.dim() < 3:
        raise LayerError(f"attention transfer needs [channels, positions] features per sample, got {list(f.shape[1:])}; "
                         "name a convolutional (or sequence) layer")
    return F.normalize(f.float().abs().pow(p).mean(1).flatten(1), dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean squared distance between the two attention maps (as the authors' code computes it);
    the larger map is average-pooled to the smaller's positions. Raw features in, scalar out;
    channel counts may differ (no projection needed)."""
    a_s, a_t = student.float(), teacher.float()
    if a_s.shape[2:] != a_t.shape[2:]:
        smaller = min(a_s.shape[2:], a_t.shape[2:])
        size = smaller[0] if len(smaller) == 1 else tuple(smaller)
        a_s, a_t = pool(a_s, size), pool(a_t, size)
    return (attention_map(a_s, p) - attention_map(a_t, p)).pow(2).mean()


class FeatureStudent(nn.Module):
    """The student with a tap on one of its layers and the projection to the teacher's features:
    one module, so DDP syncs the projection's gradients too. forward → logits; `features` holds
    the (projected, for hint KD) student features of the last forward. Only `student` is exported."""

    def __init__(self, student: nn.Module, layer: str, proj: nn.Module | None):
        super().__init__()
        self.student, self.proj = student, proj
        self.tap = Tap(student, layer, "student")
        self.features: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.student(x)
        f = self.tap.take()
        self.features = self.proj(f) if self.proj is not None else f
        return logits


def layer_shape(model: nn.Module, layer: str, example: torch.Tensor, who: str = "model") -> list[int]:
    """Per-sample shape of `layer`'s output when `model` runs on `example` [B, ...]."""
    tap = Tap(model, layer, who)
    try:
        with torch.no_grad():
            model(example)
        return list(tap.take().shape[1:])
    finally:
        tap.remove()


def feature_student(student: nn.Module, layer: str, example: torch.Tensor, teacher_shape: list[int],
                    kind: str) -> FeatureStudent:
    """The student wrapped for feature KD: hint KD gets a projection to `teacher_shape`; attention
    transfer compares maps directly, so it only needs [channels, positions] features."""
    shape = layer_shape(student, layer, example, "student")
    if kind == "attention":
        if len(shape) < 2 or len(teacher_shape) < 2:
            raise LayerError(f"attention transfer needs [channels, positions] features; student layer {layer!r} "
                             f"gives {shape}, the teacher layer {teacher_shape}")
        return FeatureStudent(student, layer, None)
    return FeatureStudent(student, layer, projection(shape, teacher_shape))


def teacher_features(teacher: LayerOutput, x: torch.Tensor) -> torch.Tensor:
    """The teacher's features for a batch, rounded to fp16 exactly as the store keeps them, so
    online and stored features feed the same loss the same numbers."""
    with torch.no_grad():
        return teacher(x).to(torch.float16)
