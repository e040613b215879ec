"""Model construction: the built-in 1-D CNN, import-path factories and safetensors weights."""
from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save
from torch import nn

from kd_ops.fsio import Loc


class CNN1D(nn.Module):
    """A small 1-D CNN for fixed-length signals (MNIST-1D: length 40, 10 classes).

    `depth` stride-2 convolutions of `width` channels (the first with a wider kernel, as in the
    MNIST-1D paper's CNN), then one linear layer. Parameter count grows ~6·width², so `width` is
    the knob Tune searches for the student.
    """

    def __init__(self, length: int = 40, num_classes: int = 10, width: int = 32, depth: int = 3,
                 first_kernel: int = 5, kernel: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = 1, length
        for i in range(depth):
            k = first_kernel if i == 0 else kernel
            layers += [nn.Conv1d(channels, width, k, stride=2, padding=k // 2), nn.ReLU()]
            channels, size = width, (size + 1) // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L] or [B, 1, L] float → logits [B, num_classes]."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.head(self.features(x).flatten(1))


def cnn(**kwargs: Any) -> CNN1D:
    """Factory for configs: `kd_ops.models:cnn`."""
    return CNN1D(**kwargs)


def resolve(import_path: str):
    """'package.module:attr' → the object. Raises ValueError saying what failed and how to fix it."""
    module_name, sep, attr = import_path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"factory {import_path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"factory {import_path!r}: cannot import module {module_name!r} ({e}); "
                         "check the spelling and that the package is installed on every node") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"factory {import_path!r}: module {module_name!r} has no attribute {attr!r}") from None


def build(factory: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build a module from an import path and keyword arguments."""
    fn = resolve(factory)
    try:
        model = fn(**(kwargs or {}))
    except TypeError as e:
        raise ValueError(f"factory {factory!r} rejected its kwargs {kwargs}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ValueError(f"factory {factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_weights(model: nn.Module, path: str | Path | Loc, metadata: dict[str, str] | None = None) -> None:
    """Write the state dict as safetensors to a local path or URI, whole or not at all."""
    # clone: tied weights (an LM's embedding and head) share storage, which safetensors refuses
    state = {k: v.detach().cpu().clone().contiguous() for k, v in unwrap(model).state_dict().items()}
    Loc.of(path).write_bytes(save(state, metadata=metadata))


def load_weights(model: nn.Module, path: str | Path | Loc) -> nn.Module:
    """Load safetensors weights (local path or URI) into `model`, strictly. Raises ValueError naming the mismatch."""
    path = Loc.of(path)
    if not path.is_file():
        raise ValueError(f"weights file {path} does not exist")
    try:
        state = load(path.read_bytes())
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ValueError(f"weights file {path} is not a readable safetensors file: {e}") from e
    expected = unwrap(model).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs module {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if wrong:
            parts.append(f"shape mismatch {wrong[:5]}")
        raise ValueError(f"weights file {path} does not fit the module {type(unwrap(model)).__name__}: "
                         + "; ".join(parts) + ". Check the factory kwargs (e.g. width) match the ones it was trained with.")
    unwrap(model).load_state_dict(state)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside wrappers that keep it as `.module` (DistributedDataParallel, kd_ops.qat.FakeQuant)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def file_sha256(path: str | Path | Loc) -> str:
    h = hashlib.sha256()
    loc = Loc.of(path)
    with loc.fs.open_input_stream(loc.path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def teacher_fingerprint(factory: str, kwargs: dict[str, Any], weights: str | Path | list[Path]) -> str:
    """Identity of a teacher: its code path, kwargs and the exact bytes of its weight file(s)."""
    files = weights if isinstance(weights, list) else [weights]
    spec = json.dumps({"factory": factory, "kwargs": kwargs, "weights": [file_sha256(f) for f in files]}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()
