"""Shipping a student: ONNX export, ONNX Runtime inference, INT8 post-training quantization,
size and latency measurement.

The flow: `export_onnx` a trained student (float32), check it against torch with `max_abs_diff`,
`quantize_int8` it with ONNX Runtime static quantization calibrated on real input rows, and
compare runtimes with `measure_latency`. `OnnxModule` puts an ONNX file behind the nn.Module
contract, so the scoring code that evaluates torch students evaluates ONNX/INT8 ones unchanged.

Every file is written to a temporary name beside its destination and renamed into place, so a
crash never leaves a half-written model where a reader expects a whole one.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from torch import nn

# ONNX input element type → the numpy dtype a session must be fed
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(e: BaseException, limit: int = 300) -> str:
    """'Type: first line of the message', without terminal colours, at most `limit` characters."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else '(no message)'}"
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _export_failure(e: BaseException) -> str:
    """The exporter's own error says which step failed ("torch.export", "translate", ...); the
    exception it wraps says why. One line with both."""
    root = e
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ or root.__context__
    step = _first_line(e, 160)
    return step if root is e else f"{step.split('. ')[0]} — {_first_line(root)}"


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs one warning per missing torchvision op and emits FutureWarnings from
    torch internals: noise for a caller that only needs the file or one error line."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, opset: int = 18) -> Path:
    """Export `model` to an ONNX file with torch's current exporter (torch.export based, dynamo=True).

    example: one input batch, e.g. float32 [B, 40] for the CNN or int64 token ids [B, T] for an LM;
    only its batch dimension is dynamic in the file (every other dimension, e.g. an LM's T, is
    fixed to the example's). The graph has one input "x" and one output "logits".
    The model is moved to the CPU (and stays there) and exported in eval mode; the training flag of
    every submodule is restored afterwards. Returns `path`. Raises ValueError with one line saying
    why when the model cannot be exported.
    """
    if opset < 18:
        raise ValueError(f"export_onnx: opset {opset} is too old; torch's exporter targets opset >= 18, "
                         "pass opset=18 or newer")
    if not isinstance(example, torch.Tensor) or example.dim() < 1 or example.shape[0] < 1:
        raise ValueError("export_onnx: example must be a tensor with a batch dimension of at least one row, "
                         f"got {type(example).__name__} {tuple(getattr(example, 'shape', ()))}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = example.detach().cpu()
    if example.shape[0] < 2:
        # torch.export specialises dimensions of size 1, which would pin the batch: export with two rows
        example = example.expand(2, *example.shape[1:]).contiguous()
    flags = {m: m.training for m in model.modules()}
    model.cpu().eval()
    tmp = _tmp_beside(path)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                model, (example,), dynamo=True, input_names=["x"], output_names=["logits"], opset_version=opset,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False)
    except Exception as e:  # the exporter raises many types (TorchExportError, UserError, RuntimeError, ...)
        raise ValueError(f"cannot export {type(model).__name__} to ONNX (torch {torch.__version__}, dynamo exporter, "
                         f"opset {opset}): {_export_failure(e)}") from e
    finally:
        for m, flag in flags.items():
            m.training = flag
    try:
        program.save(tmp, external_data=False)  # one self-contained file (students are far below protobuf's 2 GB)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def onnx_session(path_or_bytes: str | Path | bytes, threads: int = 1,
                 providers: list[str] | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session: `threads` intra-op threads, one inter-op thread, sequential
    execution (reproducible latency, no oversubscription next to other workers); CPU by default."""
    if threads < 1:
        raise ValueError(f"onnx_session: threads must be >= 1, got {threads}")
    if not isinstance(path_or_bytes, (bytes, bytearray)):
        path_or_bytes = str(path_or_bytes)
        if not Path(path_or_bytes).is_file():
            raise ValueError(f"ONNX file {path_or_bytes} does not exist; export it first (kd_ops.deploy.export_onnx)")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        return ort.InferenceSession(path_or_bytes, opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, NoSuchFile, Fail)
        where = "the given bytes" if isinstance(path_or_bytes, (bytes, bytearray)) else path_or_bytes
        raise ValueError(f"ONNX Runtime cannot load {where}: {_first_line(e)}") from e


def _feed(session: ort.InferenceSession, x: np.ndarray) -> tuple[str, np.ndarray]:
    """The session's single input name and x cast to its element type (token ids are stored as
    int32 but exported LMs take int64)."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ValueError(f"expected an ONNX model with one input, this one has {[i.name for i in inputs]}")
    dtype = _ORT_DTYPES.get(inputs[0].type)
    return inputs[0].name, (np.asarray(x) if dtype is None else np.asarray(x, dtype=dtype))


def onnx_logits(session: ort.InferenceSession, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Run the session's first output over x [N, ...] in batches of `batch_size` → logits [N, ...]."""
    name, x = _feed(session, x)
    if len(x) == 0:
        raise ValueError("onnx_logits: x has no rows")
    out = [session.run(None, {name: np.ascontiguousarray(x[i:i + batch_size])})[0]
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out)


@torch.inference_mode()
def _torch_logits(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return np.concatenate([model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size]))).float().cpu().numpy()
                               for i in range(0, len(x), batch_size)])
    finally:
        for m, flag in flags.items():
            m.training = flag


def max_abs_diff(model: nn.Module, path: str | Path, x: np.ndarray) -> float:
    """max |torch logits − ONNX Runtime logits| over real rows x [N, ...] (model on CPU, eval mode)."""
    onnx_out = onnx_logits(onnx_session(path), x)
    torch_out = _torch_logits(model.cpu(), x)
    if onnx_out.shape != torch_out.shape:
        raise ValueError(f"{path}: ONNX logits {onnx_out.shape} and torch logits {torch_out.shape} differ in shape; "
                         "was the file exported from this model?")
    return float(np.abs(onnx_out.astype(np.float64) - torch_out.astype(np.float64)).max())


class _Rows:
    """A calibration data reader (onnxruntime.quantization.CalibrationDataReader protocol) over
    real input rows, in batches."""

    def __init__(self, name: str, x: np.ndarray, batch_size: int):
        self.name, self.x, self.batch_size, self.i = name, x, batch_size, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.x):
            return None
        batch = np.ascontiguousarray(self.x[self.i:self.i + self.batch_size])
        self.i += self.batch_size
        return {self.name: batch}

    def rewind(self) -> None:
        self.i = 0


def _drop_zero_points(model: onnx.ModelProto) -> None:
    """Remove the all-zero zero points of constant (weight, bias) DequantizeLinear inputs: symmetric
    int8 weights have zero point 0 per channel, which ONNX defines as the default of the optional
    input, and ORT's QDQ fusion (QLinearConv/QGemm) still applies without them: same outputs,
    smaller file."""
    inits = {t.name: t for t in model.graph.initializer}
    dropped = set()
    for node in model.graph.node:
        if (node.op_type == "DequantizeLinear" and len(node.input) == 3 and node.input[2] in inits
                and node.input[0] in inits):
            zp = inits[node.input[2]]
            if not numpy_helper.to_array(zp).any():
                dropped.add(node.input[2])
                del node.input[2]
    used = {name for node in model.graph.node for name in node.input}
    keep = [t for t in model.graph.initializer if t.name not in dropped or t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


_CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def quantize_int8(fp32_path: str | Path, calibration: np.ndarray, out_path: str | Path, *,
                  per_channel: bool = True, batch_size: int = 64, method: str = "minmax") -> Path:
    """ONNX Runtime static post-training quantization of an exported float model → INT8 ONNX file.

    calibration: real input rows [N, ...] (N >= 1; a few hundred held-out rows are typical), fed in
    batches of `batch_size` to record each activation's range. Settings, as ORT recommends for CPU:
    QDQ format; weights symmetric int8 per output channel (`per_channel`); activations asymmetric
    uint8 per tensor (U8S8, no reduce_range: x86 CPUs with VNNI and ARM accumulate without
    saturation); `method` "minmax" (default: the exact range seen), "entropy" or "percentile".
    The graph first goes through `quant_pre_process` (shape inference + ORT graph optimisation),
    ORT's recommended preprocessing. Returns `out_path`.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    calibration = np.asarray(calibration)
    if calibration.ndim == 0 or len(calibration) < 1:
        raise ValueError(f"quantize_int8: calibration has no rows (shape {calibration.shape}); pass real input rows, "
                         "e.g. a few hundred held-out rows, so activation ranges come from real data")
    if method not in _CALIBRATION:
        raise ValueError(f"quantize_int8: unknown calibration method {method!r}; use one of {sorted(_CALIBRATION)}")
    if batch_size < 1:
        raise ValueError(f"quantize_int8: batch_size must be >= 1, got {batch_size}")
    name, calibration = _feed(onnx_session(fp32_path), calibration)  # also checks the file loads
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=out_path.parent) as work:
        source = Path(work) / "pre.onnx"
        try:
            quant_pre_process(str(fp32_path), str(source))
        except Exception as e:  # symbolic shape inference does not cover every op; quantize the graph as exported
            warnings.warn(f"quant_pre_process failed on {fp32_path} ({_first_line(e)}); "
                          "quantizing it without preprocessing", stacklevel=2)
            source = fp32_path
        try:
            quantize_static(str(source), str(Path(work) / "int8.onnx"), _Rows(name, calibration, batch_size),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=False,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, _CALIBRATION[method]),
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                           # float biases: an int32 bias needs its own per-channel
                                           # scale (8 bytes per channel against 4); the integer
                                           # kernels still run (same latency, same outputs here)
                                           "QuantizeBias": False})
        except Exception as e:
            raise ValueError(f"ONNX Runtime cannot quantize {fp32_path}: {_first_line(e)}") from e
        model = onnx.load(str(Path(work) / "int8.onnx"))
    _drop_zero_points(model)
    return _save_checked(model, out_path)


def _save_checked(model: onnx.ModelProto, out_path: Path) -> Path:
    """Check the model and write it to a temporary name beside `out_path`, renamed into place."""
    onnx.checker.check_model(model)
    tmp = _tmp_beside(out_path)
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def _gemm_as_matmul(model: onnx.ModelProto) -> int:
    """Rewrite each Gemm whose B is a weight (an initializer) as MatMul (+ Add of its bias): ONNX
    Runtime's dynamic quantization covers MatMul only, and torch exports a Linear on 2-D input as
    Gemm. alpha, beta ≠ 1 and transA are left as Gemm. Returns how many were rewritten."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes, done = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        b = node.input[1]
        if attrs.get("transB", 0):
            w = numpy_helper.to_array(inits[b]).T
            b = f"{b}_t_{done}"
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), b))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        mm_out = f"{node.output[0]}_matmul" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], b], [mm_out], name=f"{node.name or 'gemm'}_matmul"))
        if bias:
            nodes.append(helper.make_node("Add", [mm_out, bias], [node.output[0]], name=f"{node.name or 'gemm'}_bias"))
        done += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return done


def _int8_embeddings(model: onnx.ModelProto) -> int:
    """Store every embedding table (a 2-D float initializer that a Gather reads rows of) as int8,
    symmetric per row (scale = max|row| / 127), behind a DequantizeLinear that gives every reader
    the dequantized table: weight-only INT8, as ORT's dynamic recipe leaves Gather in float and
    the table is most of a small LM's weights. Returns how many tables were converted."""
    inits = {t.name: t for t in model.graph.initializer}
    # a position table read at fixed positions is exported as a Slice of it, not a Gather
    tables = {n.input[0] for n in model.graph.node if n.op_type in ("Gather", "Slice") and n.input[0] in inits
              and inits[n.input[0]].data_type == onnx.TensorProto.FLOAT and len(inits[n.input[0]].dims) == 2}
    dq = []
    for name in sorted(tables):
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        if not np.isfinite(w).all():  # e.g. an additive mask with -inf: not a table of values
            continue
        scale = (np.abs(w).max(axis=1) / 127).astype(np.float32)
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
        model.graph.initializer.remove(inits[name])
        model.graph.initializer.extend([numpy_helper.from_array(q, f"{name}_int8"),
                                        numpy_helper.from_array(scale, f"{name}_scale")])
        dq.append(helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale"], [name],
                                   name=f"{name}_dequantize", axis=0))
    if not dq:
        return 0
    nodes = [*dq, *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return len(dq)


def quantize_dynamic_int8(fp32_path: str | Path, out_path: str | Path, *, per_channel: bool = True) -> Path:
    """ONNX Runtime dynamic quantization of an exported float model → INT8 ONNX file.

    Only MatMul (and Gemm, rewritten as MatMul + Add) with a weight as second input is quantized:
    weights symmetric int8 per output channel,
    activations uint8 per tensor with the range of each call's own input (DynamicQuantizeLinear),
    nothing calibrated ahead of time. Embedding tables are stored int8 per row and dequantized at
    run time (`_int8_embeddings`: weight-only). Attention scores, softmax, LayerNorm and the
    residual stream stay float: what static activation quantization breaks in transformers, and
    ORT's and Optimum's recipe for them. Biases and LayerNorm weights stay fp32 (a few hundred
    bytes a layer). Returns `out_path`.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    onnx_session(fp32_path)  # checks the file loads
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=out_path.parent) as work:
        model = onnx.load(str(fp32_path))
        _gemm_as_matmul(model)
        source = Path(work) / "matmul.onnx"
        onnx.save(model, str(source))
        try:
            quantize_dynamic(str(source), str(Path(work) / "int8.onnx"), op_types_to_quantize=["MatMul"],
                             per_channel=per_channel, weight_type=QuantType.QInt8)
        except Exception as e:
            raise ValueError(f"ONNX Runtime cannot quantize {fp32_path} dynamically: {_first_line(e)}") from e
        model = onnx.load(str(Path(work) / "int8.onnx"))
    _int8_embeddings(model)
    return _save_checked(model, out_path)


def int8_recipes(fp32_path: str | Path) -> dict[str, str | None]:
    """Which INT8 recipes fit an exported float model: recipe → None where it fits, else why not.

    static (`quantize_int8`, QDQ with calibrated activation ranges): convolutional and MLP models.
    Not for a graph that multiplies two activations (attention's Q·Kᵀ and scores·V): calibrated
    per-tensor ranges of attention scores, softmax and the residual stream are what break
    transformers. dynamic (`quantize_dynamic_int8`): any graph with a MatMul/Gemm by a weight.
    """
    model = onnx.load(str(fp32_path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    consts = inits | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    mm = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    by_weight = [n for n in mm if n.input[1] in consts]
    two_activations = [n for n in mm if n.input[0] not in consts and n.input[1] not in consts]
    return {"static": ("the graph multiplies two activations (attention): calibrated activation ranges break it"
                       if two_activations else None),
            "dynamic": None if by_weight else "no MatMul/Gemm by a weight to quantize"}


def pick_int8(rows: list[dict], max_drop: float) -> dict | None:
    """The INT8 model to ship among `rows` (each {"drop", "weight_bytes", ...}; drop measured on
    validation, larger is worse): within `max_drop` the one with the fewest weight bytes (what INT8
    is for), ties to the smaller drop; None when none is within it (ship fp32)."""
    ok = [r for r in rows if r["drop"] <= max_drop]
    return min(ok, key=lambda r: (r["weight_bytes"], r["drop"])) if ok else None


def weight_bytes(path: str | Path) -> int:
    """Bytes of the graph's initializers (weights, biases, scales, zero points), counted as
    elements × element size: what the model weighs independent of protobuf overhead."""
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        if dtype == np.dtype(object):  # strings: their bytes
            total += sum(len(s) for s in t.string_data)
        else:
            total += int(np.prod(t.dims, dtype=np.int64)) * dtype.itemsize
    return total


def file_bytes(path: str | Path) -> int:
    return Path(path).stat().st_size


class OnnxModule(nn.Module):
    """An ONNX model behind the nn.Module contract: forward(x [B, ...]) → float logits [B, ...] on
    x's device, computed by ONNX Runtime (one thread). Give the file's `path`, or its bytes as
    `data` (what travels to another node: a path may exist only where the file was written).
    It has no parameters; `.to()`, `.eval()` and `.train()` do not change what it computes."""

    def __init__(self, path: str | None = None, data: bytes | None = None):
        super().__init__()
        if (path is None) == (data is None):
            raise ValueError("OnnxModule needs exactly one of path (an .onnx file) or data (its bytes), "
                             f"got {'both' if path is not None else 'neither'}")
        self.path, self.data = (str(path) if path is not None else None), data
        self.session = onnx_session(self.data if self.data is not None else self.path, threads=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = onnx_logits(self.session, x.detach().cpu().numpy())
        return torch.from_numpy(logits).float().to(x.device)

    # an InferenceSession does not pickle: ship the path or bytes and reopen where it lands
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("session", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.session = onnx_session(self.data if self.data is not None else self.path, threads=1)


def onnx_module(path: str | None = None, data: bytes | None = None) -> OnnxModule:
    """Factory for configs: `kd_ops.deploy:onnx_module` with kwargs {"path": ...} or {"data": bytes}."""
    return OnnxModule(path, data)


def time_runs(fn: Callable[[], object], runs: int = 200, warmup: int = 20, seconds: float = 1.0,
              min_runs: int = 3) -> dict:
    """Time fn by time, not count (as timeit's autorange does): up to `warmup` untimed calls, stopped
    once they took seconds/4; then calls timed one by one with perf_counter_ns until `runs` calls or
    about `seconds` of timed work, whichever comes first, but at least `min_runs` (and at least one
    warm-up call when warmup > 0). A run of 0.3 s with runs=200 takes ~1.5 s, not a minute.
    → {"median_ms", "p95_ms", "runs"} with the number of timed runs that ran."""
    if runs < 1 or warmup < 0 or seconds <= 0 or min_runs < 1:
        raise ValueError(f"time_runs: need runs >= 1, warmup >= 0, seconds > 0 and min_runs >= 1, got runs={runs}, "
                         f"warmup={warmup}, seconds={seconds}, min_runs={min_runs}")
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
        if time.perf_counter() - start >= seconds / 4:
            break
    times = []
    total = 0.0
    while len(times) < runs and (total < seconds * 1e9 or len(times) < min(min_runs, runs)):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
        total += times[-1]
    ms = np.asarray(times, dtype=np.float64) / 1e6
    return {"median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)), "runs": len(ms)}


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def measure_latency(models: dict[str, Callable[[np.ndarray], object]], rows: np.ndarray, batch_sizes: list[int],
                    runs: int = 200, warmup: int = 20, seconds: float = 1.0) -> list[dict]:
    """Latency of each named runtime at each batch size, on real rows.

    models: name → fn(x) (see torch_runner, onnx_runner); rows: real inputs [N, ...] (float32
    signals [N, 40], token ids [N, T]), repeated cyclically to fill each batch.
    Each (runtime, batch) is timed by `time_runs`: about `seconds` of timed work or `runs` runs,
    whichever comes first. Returns one dict per (runtime, batch): runtime, batch, median_ms, p95_ms,
    runs (how many ran), rss_added_mb.
    rss_added_mb is this process's resident set size after the runs minus before building that
    batch's input and first call: an approximation (allocator caches, other threads and lazily
    built sessions — counted at a runtime's first batch size — all move it), for orders of
    magnitude, not exact accounting.
    """
    rows = np.asarray(rows)
    if len(rows) == 0:
        raise ValueError("measure_latency: rows is empty; pass real input rows")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"measure_latency: batch sizes must be >= 1, got {batch_sizes}")
    out = []
    for name, fn in models.items():
        # young generations only: arrays and tensors are freed by reference counting anyway, and a
        # full collection costs ~1 s once torch.export's modules are loaded
        gc.collect(1)
        for b in batch_sizes:
            before = _rss_mb()
            x = np.ascontiguousarray(rows[np.arange(b) % len(rows)])
            stats = time_runs(lambda: fn(x), runs=runs, warmup=warmup, seconds=seconds)
            out.append({"runtime": name, "batch": int(b), **stats, "rss_added_mb": _rss_mb() - before})
    return out


def torch_runner(model: nn.Module, threads: int) -> Callable[[np.ndarray], object]:
    """fn(x numpy [B, ...]) → torch logits, in eval mode under inference_mode, on the device the
    model's parameters are on (the input is copied there inside the timed call, and CUDA is
    synchronised so the time is the kernels', not their launch). torch's intra-op thread count is
    set to `threads` (a process-wide setting, reset at each call if another runner changed it)."""
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def run(x: np.ndarray):
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            out = model(torch.from_numpy(x).to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return run


def onnx_runner(path_or_bytes: str | Path | bytes, threads: int) -> Callable[[np.ndarray], object]:
    """fn(x numpy [B, ...]) → ONNX Runtime logits. The session is created at the first call, so
    measure_latency's rss_added_mb for the first batch size includes loading the model."""
    state: dict[str, Any] = {}

    def run(x: np.ndarray):
        if not state:
            state["session"] = onnx_session(path_or_bytes, threads=threads)
            state["name"], _ = _feed(state["session"], x[:1])
            state["dtype"] = _ORT_DTYPES.get(state["session"].get_inputs()[0].type)
        if state["dtype"] is not None and x.dtype != state["dtype"]:
            x = x.astype(state["dtype"])
        return state["session"].run(None, {state["name"]: x})[0]

    return run
