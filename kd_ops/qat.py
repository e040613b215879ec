"""Quantization-aware fine-tuning of a student with core PyTorch fake-quantization ops.

Why: ONNX Runtime's INT8 model (kd_ops.deploy.quantize_int8) rounds every Conv/Linear weight to
int8 per output channel and every activation to uint8 per tensor. A student trained in float
can lose accuracy to that rounding. `FakeQuant` makes the forward pass see the same rounding
(straight-through gradients), so the student is fine-tuned to be robust to it with the same
distillation loss as before; afterwards `strip` gives the plain float module, which is saved,
exported to ONNX as float and quantized by ORT with the same calibration rows as any student.

The fake-quant ops (torch.fake_quantize_per_channel_affine / _per_tensor_affine) are core ATen
operators, maintained and differentiable; eager-mode torch.ao.quantization (QuantStub, prepare_qat,
convert) is deprecated and would change the module's structure and state dict.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

QUANTIZED = (nn.Conv1d, nn.Conv2d, nn.Linear)
W_QMIN, W_QMAX = -127, 127  # ORT's symmetric int8 weights: scale = max|w| / 127, zero point 0
A_QMIN, A_QMAX = 0, 255     # ORT's uint8 activations (QUInt8, asymmetric, the range extended to include 0)


def fake_quant_weight(w: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Symmetric int8 fake quantization per output channel (`axis`: 0 for a Conv/Linear weight
    [out, in, ...] or an embedding table [rows, dim], 1 for a transformers Conv1D weight [in, out]);
    gradients pass straight through."""
    amax = w.detach().abs().movedim(axis, 0).flatten(1).amax(dim=1)
    scale = (amax / W_QMAX).clamp_min(torch.finfo(torch.float32).tiny).float()
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, axis, W_QMIN, W_QMAX)


def fake_quant_activation(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Asymmetric uint8 fake quantization per tensor over the range [lo, hi] (scalars), computed
    as ORT does: the range is widened to include 0, scale = (hi − lo) / 255, zero point
    round(−lo / scale). Gradients pass straight through inside the range, are 0 outside it."""
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / (A_QMAX - A_QMIN)).clamp_min(torch.finfo(torch.float32).tiny).float()
    zero = (A_QMIN - lo / scale).round().clamp(A_QMIN, A_QMAX).to(torch.int32)
    return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero.reshape(()), A_QMIN, A_QMAX)


def _matmul_layers(model: nn.Module) -> dict[str, int]:
    """Layers that ONNX Runtime's dynamic recipe quantizes (exported as MatMul/Gemm by a weight) →
    the output-channel axis of their weight: nn.Linear [out, in] → 0; transformers' Conv1D (GPT-2)
    [in, out] → 1. (torch's exporter gives a head tied to an embedding its own initializer, so ORT
    quantizes it like any MatMul; its int8 rows are the table's.)"""
    return {name: (0 if isinstance(m, nn.Linear) else 1) for name, m in model.named_modules()
            if isinstance(m, nn.Linear)
            or (type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None and m.weight.dim() == 2)}


def _token_tables(model: nn.Module) -> list[str]:
    """The embedding tables the exported graph reads with a Gather (and so stores int8): a Hugging
    Face model's input embeddings (its position table is read at fixed positions, which the
    exporter folds into a constant); for other models every nn.Embedding."""
    hf = next((m for m in model.modules() if callable(getattr(m, "get_input_embeddings", None))), None)
    token = hf.get_input_embeddings() if hf is not None else None
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Embedding) and (token is None or m is token)]


class FakeQuant(nn.Module):
    """Wraps a model so its forward sees INT8 rounding as ONNX Runtime will apply it, in the
    recipe that will ship (`mode`, see kd_ops.deploy.int8_recipes).

    static: every Conv1d/Conv2d/Linear runs with its weight fake-quantized per output channel
    (symmetric int8) and its input fake-quantized per tensor (asymmetric uint8) over a running
    range. With `quantize_output` the model's output is fake-quantized the same way, as ORT
    quantizes the logits its last quantized layer produces (on a trained MNIST-1D CNN this takes
    the largest |fake-quant − ORT INT8| logit gap from ~1.1 to ~0.2, logits up to ~30). Training
    mode: each batch's min/max updates the ranges by an exponential moving average with
    `momentum` (the first batch sets them). Eval mode: the stored ranges are used; a range never
    seen in training mode falls back to its batch's own min/max.
    dynamic: only the layers exported as MatMul by a weight (nn.Linear, transformers' Conv1D): the
    weight per output channel (symmetric int8), the input per tensor over its own min/max at every
    call (DynamicQuantizeLinear); the token embedding table per row (weight only, as
    kd_ops.deploy stores it); nothing else, the output neither.

    The wrapped model is `self.module` and keeps its float parameters (the fake-quantized weights
    are passed through torch.func.functional_call), so `strip(wrapper).state_dict()` is the plain
    model's. The activation ranges are buffers of the wrapper: act_min, act_max and act_seen (bool),
    each [n_layers + 1]: slot i is the input of `self.layers[i]`, the last slot the model's output.
    """

    def __init__(self, model: nn.Module, momentum: float = 0.01, *, quantize_output: bool = True,
                 mode: str = "static"):
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"FakeQuant: momentum must be in (0, 1], got {momentum}")
        if mode not in ("static", "dynamic"):
            raise ValueError(f"FakeQuant: mode must be 'static' or 'dynamic', got {mode!r}")
        self.module = model
        self.momentum = momentum
        self.mode = mode
        self.quantize_output = quantize_output and mode == "static"
        if mode == "static":
            self.axes = {name: 0 for name, m in model.named_modules() if isinstance(m, QUANTIZED)}
        else:
            self.axes = _matmul_layers(model)
        self.layers = list(self.axes)
        self.tables = _token_tables(model) if mode == "dynamic" else []
        if not self.layers:
            raise ValueError(f"FakeQuant: {type(model).__name__} has no layer the {mode} INT8 recipe quantizes")
        n = len(self.layers) + 1
        self.register_buffer("act_min", torch.zeros(n))
        self.register_buffer("act_max", torch.zeros(n))
        self.register_buffer("act_seen", torch.zeros(n, dtype=torch.bool))

    def _quantize(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize x over range slot i, updating the slot in training mode."""
        if self.mode == "dynamic":  # each call's own range, as DynamicQuantizeLinear computes it
            lo, hi = x.detach().min().float(), x.detach().max().float()
            return fake_quant_activation(x, lo, hi)
        if self.training:
            with torch.no_grad():
                lo, hi = x.detach().min().float(), x.detach().max().float()
                if self.act_seen[i]:
                    lo = torch.lerp(self.act_min[i], lo, self.momentum)
                    hi = torch.lerp(self.act_max[i], hi, self.momentum)
                self.act_min[i], self.act_max[i] = lo, hi
                self.act_seen[i] = True
        elif self.act_seen[i]:
            lo, hi = self.act_min[i], self.act_max[i]
        else:
            lo, hi = x.detach().min().float(), x.detach().max().float()
        return fake_quant_activation(x, lo.to(x.device), hi.to(x.device))

    def forward(self, *args, **kwargs):
        modules = dict(self.module.named_modules())
        params = {f"{name}.weight": fake_quant_weight(modules[name].weight, axis) for name, axis in self.axes.items()}
        params |= {f"{name}.weight": fake_quant_weight(modules[name].weight) for name in self.tables}
        handles = []

        # hooks live only for this call, so the inner module stays a plain module
        def make_hook(i: int):
            def hook(_module, inputs):
                x, *rest = inputs
                return (self._quantize(i, x), *rest)
            return hook

        try:
            for i, name in enumerate(self.layers):
                handles.append(modules[name].register_forward_pre_hook(make_hook(i)))
            # untied: a head tied to an embedding gets its own (equal) int8 rows and its input quantized
            out = functional_call(self.module, params, args, kwargs, tie_weights=False)
        finally:
            for h in handles:
                h.remove()
        if self.quantize_output and isinstance(out, torch.Tensor) and out.is_floating_point():
            out = self._quantize(len(self.layers), out)
        return out


def wrap(model: nn.Module, momentum: float = 0.01, *, quantize_output: bool = True, mode: str = "static") -> FakeQuant:
    return FakeQuant(model, momentum=momentum, quantize_output=quantize_output, mode=mode)


def strip(model: nn.Module) -> nn.Module:
    """The plain float module inside a FakeQuant (or the model itself when it is not wrapped)."""
    return model.module if isinstance(model, FakeQuant) else model
