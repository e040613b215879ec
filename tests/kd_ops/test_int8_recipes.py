"""INT8 for transformers (kd_ops.deploy.int8_recipes, quantize_dynamic_int8, pick_int8), QAT that
simulates the recipe that ships (kd_ops.qat mode "dynamic"), and latency timed by time, not count.
Pure Python, no Ray; one torch thread."""
import time

import numpy as np
import pytest
import torch

from kd_ops import deploy, lm, models, qat

V, L = 128, 32  # vocabulary, sequence length


def _bigram_text(n: int, seed: int) -> np.ndarray:
    """n token sequences [n, L] from a fixed random bigram table with peaked next-token laws: a
    language a tiny LM learns in a few hundred steps."""
    table = np.random.default_rng(0).dirichlet(np.full(V, 0.05), size=V).cumsum(axis=1)
    rng = np.random.default_rng(seed)
    out = np.empty((n, L), np.int64)
    out[:, 0] = rng.integers(0, V, n)
    for t in range(1, L):
        out[:, t] = np.minimum((table[out[:, t - 1]] < rng.random(n)[:, None]).sum(axis=1), V - 1)
    return out


def _perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    logits = torch.from_numpy(np.asarray(logits, np.float32))[:, :-1]
    target = torch.from_numpy(ids)[:, 1:]
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, V), target.reshape(-1)).exp())


def _ort_perplexity(path, ids: np.ndarray) -> float:
    return _perplexity(deploy.onnx_logits(deploy.onnx_session(path), ids, batch_size=64), ids)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A 2-layer × 128 GPT-2-style LM (tied head) trained 300 steps on bigram text; its fp32 export,
    static QDQ and dynamic INT8 files; validation and test token ids."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = lm.new_causal_lm(vocab_size=V, n_positions=L, n_layer=2, n_embd=128, n_head=4)
    train, val, test = _bigram_text(2048, 1), _bigram_text(256, 2), _bigram_text(256, 3)
    opt = torch.optim.AdamW(model.parameters(), 1e-2)  # a high rate: the activation outliers trained LMs have
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        ids = torch.from_numpy(train[torch.randint(0, len(train), (32,), generator=gen).numpy()])
        loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = tmp_path_factory.mktemp("lm")
    fp32 = deploy.export_onnx(model, torch.from_numpy(val[:2]), out / "fp32.onnx")
    static = deploy.quantize_int8(fp32, train[:128], out / "static.onnx")
    dynamic = deploy.quantize_dynamic_int8(fp32, out / "dynamic.onnx")
    yield model, fp32, static, dynamic, val, test
    torch.set_num_threads(n)


def test_a_transformer_ships_dynamic_int8_within_3_percent_where_static_qdq_breaks_it(tiny_lm):
    model, fp32, static, dynamic, val, _ = tiny_lm
    ppl = {name: _ort_perplexity(path, val) for name, path in (("fp32", fp32), ("static", static), ("dynamic", dynamic))}
    print({k: round(v, 3) for k, v in ppl.items()})
    assert ppl["fp32"] < 0.5 * V  # it learned the language
    assert ppl["static"] >= 2 * ppl["fp32"]  # calibrated activation ranges break a transformer...
    assert ppl["dynamic"] <= 1.03 * ppl["fp32"]  # ...the dynamic recipe keeps it
    # the recipes that fit a transformer: dynamic only, saying why not static
    fits = deploy.int8_recipes(fp32)
    assert fits["dynamic"] is None and "multiplies two activations" in fits["static"]
    fp32_b, dyn_b = deploy.weight_bytes(fp32), deploy.weight_bytes(dynamic)
    assert dyn_b <= 0.5 * fp32_b, (dyn_b, fp32_b)  # MatMul weights and the embedding tables are int8
    drops = [{"recipe": "dynamic", "drop": ppl["dynamic"] / ppl["fp32"] - 1, "weight_bytes": dyn_b}]
    assert deploy.pick_int8(drops, 0.03)["recipe"] == "dynamic"


def test_dynamic_fake_quantization_simulates_the_dynamic_int8_file(tiny_lm, tmp_path):
    """What QAT trains through is what ships: on a fresh LM the fake-quantized model computes what
    ONNX Runtime's dynamic INT8 file computes, to float rounding (the same batch: activation ranges
    are per call); on the trained one they agree on validation perplexity."""
    torch.manual_seed(1)
    fresh = lm.new_causal_lm(vocab_size=V, n_positions=L, n_layer=2, n_embd=64, n_head=4).eval()
    ids = torch.from_numpy(_bigram_text(16, 4))
    path = deploy.quantize_dynamic_int8(deploy.export_onnx(fresh, ids[:2], tmp_path / "f.onnx"), tmp_path / "d.onnx")
    wrapped = qat.wrap(fresh, mode="dynamic").eval()
    assert "hf.lm_head" in wrapped.layers and wrapped.tables == ["hf.transformer.wte"]
    ort = deploy.onnx_logits(deploy.onnx_session(path), ids.numpy(), batch_size=16)
    with torch.no_grad():
        fq, f32 = wrapped(ids).numpy(), fresh(ids).numpy()
    # the share of logits equal to float rounding (an activation on a rounding boundary may round the
    # other way in one of them and move what follows it by a step)
    same, same_fp32 = (np.abs(fq - ort) < 1e-5).mean(), (np.abs(f32 - ort) < 1e-5).mean()
    print(f"fresh LM: {same:.1%} of logits equal fake-quant vs ORT int8, {same_fp32:.1%} fp32 vs ORT int8; "
          f"max |Δ| {np.abs(fq - ort).max():.1e} and {np.abs(f32 - ort).max():.1e}")
    assert same > 0.9 and same_fp32 < 0.2

    model, _, _, dynamic, val, _ = tiny_lm
    batch = val[:64]
    with torch.no_grad():
        fq = qat.wrap(model, mode="dynamic").eval()(torch.from_numpy(batch)).numpy()
    ort = deploy.onnx_logits(deploy.onnx_session(dynamic), batch, batch_size=64)
    print(f"trained LM: perplexity fake-quant {_perplexity(fq, batch):.4f}, ORT int8 {_perplexity(ort, batch):.4f}")
    assert _perplexity(fq, batch) == pytest.approx(_perplexity(ort, batch), rel=1e-3)


def test_the_int8_pick_reads_only_the_drops_it_is_given_and_ships_nothing_out_of_tolerance():
    # validation drops: static out of tolerance, dynamic within; what a test split would say is not an input
    rows = [{"recipe": "static", "drop": 0.03, "weight_bytes": 100}, {"recipe": "dynamic", "drop": 0.004, "weight_bytes": 300}]
    assert deploy.pick_int8(rows, 0.01)["recipe"] == "dynamic"
    assert deploy.pick_int8(rows, 0.05)["recipe"] == "static"  # both within: the smaller ships
    assert deploy.pick_int8(rows, 0.001) is None  # none within: fp32 ships


def test_latency_is_timed_by_time_not_by_count():
    """A runtime whose one run takes 0.3 s, asked for 200 runs after 20 warm-up runs: ~1 s of
    timed runs (4 runs) after one warm-up run, not a minute."""
    calls = []

    def slow(x):
        calls.append(len(x))
        time.sleep(0.3)

    rows = deploy.measure_latency({"slow": slow}, np.zeros((4, 40), np.float32), [1], runs=200, warmup=20, seconds=1.0)
    assert 3 <= rows[0]["runs"] <= 5 and len(calls) == rows[0]["runs"] + 1
    assert rows[0]["median_ms"] >= 290
    fast = deploy.time_runs(lambda: None, runs=50, warmup=2, seconds=1.0)
    assert fast["runs"] == 50  # `runs` still caps a fast one
