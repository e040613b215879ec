"""Training checkpoints that hold everything a restarted worker needs to continue: the model, the
optimiser, the LR schedule, the epoch, torch's RNG state, and the best model and score so far.

Layout of a checkpoint directory (no pickle: tensors are safetensors, the optimiser and schedule
state is saved with torch.save and read back with `weights_only=True`):
  model.safetensors   the model after `epoch`
  best.safetensors    the best model so far (by the validation score)
  state.pt            {"optimizer", "scheduler", "rng"}
  progress.json       {"epoch", "best_score", "best_metrics"}
  model.json          {"factory", "kwargs"}: how to build the model again
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kd_ops.models import unwrap

MODEL, BEST, STATE, PROGRESS, SPEC = "model.safetensors", "best.safetensors", "state.pt", "progress.json", "model.json"


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the state dict (tied weights cloned apart, as safetensors needs)."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in unwrap(model).state_dict().items()}


@dataclass
class Progress:
    epoch: int                      # epochs finished
    best_score: float               # the best validation score so far, larger is better
    best_metrics: dict[str, Any]    # the metrics of that epoch


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over a model's parameters and buffers (names, dtypes, shapes, bytes) in state-dict order:
    equal on every DDP worker that holds the same weights."""
    import hashlib

    h = hashlib.sha256()
    for name, t in unwrap(model).state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save(directory: str | Path, *, model, optimizer, scheduler, progress: Progress,
         best_weights: dict[str, torch.Tensor], spec: dict[str, Any]) -> None:
    d = Path(directory)
    save_file(weights_of(model), d / MODEL)
    save_file(best_weights, d / BEST)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state()}, d / STATE)
    (d / PROGRESS).write_text(json.dumps(progress.__dict__))
    (d / SPEC).write_text(json.dumps(spec))


def restore(directory: str | Path, *, model, optimizer, scheduler) -> tuple[Progress, dict[str, torch.Tensor]]:
    """Load a checkpoint written by `save` into model, optimiser, schedule and torch's RNG;
    returns (progress, best weights)."""
    d = Path(directory)
    unwrap(model).load_state_dict(load_file(d / MODEL))
    state = torch.load(d / STATE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return Progress(**json.loads((d / PROGRESS).read_text())), load_file(d / BEST)
