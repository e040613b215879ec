"""kd_ops.deploy and kd_ops.qat: ONNX export, INT8 quantization, ONNX-backed modules, latency,
fake-quant fine-tuning. Pure Python, no Ray; one torch thread (the CI box has two cores)."""
import copy
import os
import pickle

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from kd_ops import data, deploy, lm, models, qat


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def splits():
    return data.mnist1d_splits(2500, 500, 500, 0, seed=0, transfer_seed=1)


@pytest.fixture(scope="module")
def cnn8(tmp_path_factory, splits):
    """An untrained width-8 CNN exported from training mode (export must restore the flag)."""
    torch.manual_seed(0)
    model = models.build("kd_ops.models:cnn", {"width": 8}).train()
    out = tmp_path_factory.mktemp("cnn8")
    path = deploy.export_onnx(model, torch.from_numpy(splits["train"].x[:4]), out / "m.onnx")
    return model, path


@pytest.fixture(scope="module")
def cnn32(tmp_path_factory, splits):
    """A width-32 CNN trained for 300 steps on MNIST-1D, its fp32 export and its INT8 quantization."""
    torch.manual_seed(0)
    model = models.build("kd_ops.models:cnn", {"width": 32})
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    x, y = torch.from_numpy(splits["train"].x), torch.from_numpy(splits["train"].y)
    for _ in range(300):
        i = torch.randint(0, len(x), (64,))
        loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("cnn32")
    fp32 = deploy.export_onnx(model, x[:8], out / "fp32.onnx")
    int8 = deploy.quantize_int8(fp32, splits["val"].x[:256], out / "int8.onnx")  # calibration: real held-out rows
    return model, fp32, int8


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def test_export_matches_torch_at_any_batch(cnn8, splits):
    model, path = cnn8
    assert all(m.training for m in model.modules()), "export must restore the training flags"
    for batch in (1, 37):
        assert deploy.max_abs_diff(model, path, splits["test"].x[:batch]) < 1e-4
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert [i.name for i in proto.graph.input] == ["x"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # batch is symbolic
    assert os.listdir(path.parent) == ["m.onnx"]  # no temporary file left beside it
    with pytest.raises(ValueError, match="opset 17 is too old"):
        deploy.export_onnx(model, torch.zeros(2, 40), path.parent / "old.onnx", opset=17)


def test_export_failure_is_one_line_value_error(tmp_path):
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x) if x.sum() > 0 else -self.lin(x)

    with pytest.raises(ValueError, match=r"cannot export DataDependent to ONNX .*data-dependent") as info:
        deploy.export_onnx(DataDependent(), torch.ones(3, 4), tmp_path / "bad.onnx")
    assert "\n" not in str(info.value)
    assert os.listdir(tmp_path) == []


def test_int8_is_smaller_as_accurate_and_per_channel(cnn32, splits):
    model, fp32, int8 = cnn32
    assert deploy.weight_bytes(int8) <= 0.3 * deploy.weight_bytes(fp32)
    assert deploy.file_bytes(int8) < deploy.file_bytes(fp32)
    x, y = splits["test"].x, splits["test"].y
    acc32 = accuracy(deploy.onnx_logits(deploy.onnx_session(fp32), x), y)
    acc8 = accuracy(deploy.onnx_logits(deploy.onnx_session(int8), x), y)
    print(f"held-out accuracy fp32 {acc32:.3f} int8 {acc8:.3f}")
    assert acc32 > 0.4, "the model should have learned something, or the comparison says nothing"
    assert abs(acc32 - acc8) <= 0.02
    proto = onnx.load(str(int8))
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    weight_dq = {}  # out channels of each int8 weight → its scale's shape
    for n in proto.graph.node:
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0], np.zeros(0)).dtype == np.int8:
            w, scale = inits[n.input[0]], inits[n.input[1]]
            weight_dq[n.input[0]] = (w.shape[0], scale.shape)
    assert len(weight_dq) == 4  # three convolutions and the head
    assert all(scale_shape == (out,) for out, scale_shape in weight_dq.values()), weight_dq
    assert sorted(out for out, _ in weight_dq.values()) == [10, 32, 32, 32]
    assert sorted(os.listdir(int8.parent)) == ["fp32.onnx", "int8.onnx"]


def test_quantize_needs_calibration_rows(cnn8, tmp_path):
    _, path = cnn8
    with pytest.raises(ValueError, match="calibration has no rows"):
        deploy.quantize_int8(path, np.zeros((0, 40), np.float32), tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


def test_fake_quant_trains_the_inner_model(splits):
    torch.manual_seed(0)
    plain = models.cnn(width=8)
    wrapped = qat.wrap(plain)
    x, y = torch.from_numpy(splits["train"].x[:128]), torch.from_numpy(splits["train"].y[:128])
    assert wrapped(x).shape == plain(x).shape == (128, 10)
    assert qat.strip(wrapped) is plain and models.unwrap(wrapped) is plain
    assert set(qat.strip(wrapped).state_dict()) == set(models.cnn(width=8).state_dict())
    assert {"act_min", "act_max", "act_seen"} <= set(dict(wrapped.named_buffers()))

    # the first training-mode batch sets the input range, later ones move it by `momentum`
    first_max = float(wrapped.act_max[0])
    assert bool(wrapped.act_seen.all()) and first_max == pytest.approx(float(x.max()))
    with torch.no_grad():
        wrapped(3 * x)
    assert float(wrapped.act_max[0]) == pytest.approx(first_max + 0.01 * (3 * float(x.max()) - first_max), rel=1e-5)

    loss = torch.nn.functional.cross_entropy(wrapped(x), y)
    loss.backward()
    for name in ("features.0.weight", "features.2.weight", "features.4.weight", "head.weight"):
        grad = plain.get_parameter(name).grad
        assert grad is not None and float(grad.abs().sum()) > 0, name

    wrapped.eval()
    with torch.no_grad():
        fq, fl = wrapped(x), plain(x)
    gap = float((fq - fl).abs().max())
    print(f"eval fake-quant vs float max |Δlogit| {gap:.4f} (logit scale {float(fl.abs().max()):.3f})")
    assert 0 < gap < 0.05 * float(fl.abs().max())
    assert all(len(m._forward_pre_hooks) == 0 for m in plain.modules()), "hooks must not outlive a forward"

    wrapped.train()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    opt = torch.optim.Adam(wrapped.parameters(), 1e-2)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(wrapped(x), y).backward()
        opt.step()
    assert all(not torch.equal(before[k], v) for k, v in plain.state_dict().items() if k.endswith("weight"))


def test_fake_quant_predicts_ort_int8(cnn32, splits):
    """Calibrated on the rows ORT calibrated on (one training-mode batch sets the ranges to their
    min/max, like ORT's MinMax), the fake-quant forward is much closer to ORT's INT8 logits than
    the float model: it simulates the same rounding."""
    model, _, int8 = cnn32
    model = copy.deepcopy(model)
    wrapped = qat.wrap(model).train()
    x = torch.from_numpy(splits["test"].x)
    with torch.no_grad():
        wrapped(torch.from_numpy(splits["val"].x[:256]))
        wrapped.eval()
        fake, plain = wrapped(x).numpy(), model(x).numpy()
    ort8 = deploy.onnx_logits(deploy.onnx_session(int8), splits["test"].x)
    gap_fake, gap_float = np.abs(fake - ort8).max(), np.abs(plain - ort8).max()
    print(f"max |logit − ORT int8|: fake-quant {gap_fake:.3f}, float {gap_float:.3f}")
    assert gap_fake < 0.5 * gap_float


def test_onnx_module_builds_from_config_and_matches_ort(cnn8, splits):
    model, path = cnn8
    mod = models.build("kd_ops.deploy:onnx_module", {"path": str(path)})
    x = splits["test"].x[:50]
    out = mod(torch.from_numpy(x))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (50, 10)
    assert np.array_equal(out.numpy(), deploy.onnx_logits(deploy.onnx_session(path), x))
    with torch.no_grad():
        assert float((out - model.eval()(torch.from_numpy(x))).abs().max()) < 1e-4
    # what Ray ships: the path or the file's bytes, not a session; reopened where it lands
    back = pickle.loads(pickle.dumps(mod))
    assert torch.equal(back(torch.from_numpy(x)), out)
    from_bytes = models.build("kd_ops.deploy:onnx_module", {"data": path.read_bytes()})
    assert torch.equal(pickle.loads(pickle.dumps(from_bytes))(torch.from_numpy(x)), out)
    with pytest.raises(ValueError, match="exactly one of path"):
        deploy.onnx_module()


def test_measure_latency_one_row_per_runtime_and_batch(cnn8, cnn32, splits):
    _, fp32, int8 = cnn32
    runners = {"pytorch-fp32": deploy.torch_runner(cnn8[0], threads=1),
               "onnxruntime-fp32": deploy.onnx_runner(fp32, threads=1),
               "onnxruntime-int8": deploy.onnx_runner(int8.read_bytes(), threads=1)}
    rows = deploy.measure_latency(runners, splits["test"].x[:10], [1, 16], runs=20, warmup=2)
    assert [(r["runtime"], r["batch"]) for r in rows] == [(n, b) for n in runners for b in (1, 16)]
    for r in rows:
        assert set(r) == {"runtime", "batch", "median_ms", "p95_ms", "runs", "rss_added_mb"}
        assert 0 < r["median_ms"] <= r["p95_ms"] and r["runs"] == 20 and np.isfinite(r["rss_added_mb"])
    assert deploy.onnx_runner(fp32, 1)(np.resize(splits["test"].x, (16, 40))).shape == (16, 10)


def test_lm_exports_or_says_why_in_one_line(tmp_path):
    torch.manual_seed(0)
    model = lm.new_causal_lm(vocab_size=64, n_positions=16, n_layer=1, n_embd=32, n_head=2)
    ids = torch.randint(0, 64, (4, 16))
    try:
        path = deploy.export_onnx(model, ids, tmp_path / "lm.onnx")
    except ValueError as e:
        assert "\n" not in str(e) and str(e).startswith("cannot export CausalLM")
        print(f"LM export refused: {e}")
        return
    rows = np.random.default_rng(0).integers(0, 64, (5, 16)).astype(np.int32)  # stored token ids are int32
    for batch in (1, 5):
        diff = deploy.max_abs_diff(model, path, rows[:batch])
        assert diff < 1e-3, diff
    assert deploy.onnx_logits(deploy.onnx_session(path), rows).shape == (5, 16, 64)
    print(f"LM exported; max |torch − ORT| {diff:.2e}")


def test_a_convolutional_student_is_still_quantized_statically(cnn32, splits, tmp_path):
    """Both recipes fit a CNN with a Linear head; static makes the convolutions int8 too (fewer
    weight bytes) within the tolerance, so it is the one that ships."""
    _, fp32, static = cnn32
    assert deploy.int8_recipes(fp32) == {"static": None, "dynamic": None}
    vx, vy = splits["val"].x, splits["val"].y

    def acc(path):
        return float((deploy.onnx_logits(deploy.onnx_session(path), vx).argmax(1) == vy).mean())

    rows = [{"recipe": r, "drop": acc(fp32) - acc(path), "weight_bytes": deploy.weight_bytes(path)}
            for r, path in (("static", static), ("dynamic", deploy.quantize_dynamic_int8(fp32, tmp_path / "d.onnx")))]
    print(f"fp32 val accuracy {acc(fp32):.4f}; {rows}")
    assert acc(fp32) > 0.5
    assert rows[0]["drop"] <= 0.01 and rows[0]["weight_bytes"] < rows[1]["weight_bytes"]
    assert deploy.pick_int8(rows, 0.01)["recipe"] == "static"
