"""Hugging Face causal LMs from local directories (tiny random GPT-2 / Llama configs), the top-k
store round trip and a short distillation whose KL to the teacher falls. No Ray."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_ops import lm, store
from kd_ops import token_losses as tl

TEXT = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n    y: int = 0\n",
        "for i in range(10):\n    print(i * i)\n", "import os\nprint(os.path.join('a', 'b'))\n"] * 20


@pytest.fixture(scope="module")
def tok():
    return lm.train_bpe_tokenizer(TEXT, 300)


def _save_gpt2(path, tok, vocab=None, n_layer=2, n_embd=32, n_positions=32, seed=0):
    torch.manual_seed(seed)
    model = lm.new_causal_lm(vocab or len(tok), n_positions, n_layer, n_embd, 4)
    model.hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _save_llama(path, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_gpt2_and_llama_load_from_directories_and_return_logits(tmp_path, tok):
    for save in (_save_gpt2, _save_llama):
        d = save(tmp_path / save.__name__, tok)
        model = lm.load_causal_lm(d)
        out = model(torch.randint(0, len(tok), (2, 8)))
        assert out.shape == (2, 8, len(tok))
        assert lm.check_same_vocab({"m": model.config}, {"m": lm.load_tokenizer(d)}) == len(tok)


def test_missing_or_non_causal_directories_are_refused(tmp_path):
    from transformers import ViTConfig

    with pytest.raises(lm.LMError, match="does not exist"):
        lm.load_causal_lm(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(lm.LMError, match="no config.json"):
        lm.load_causal_lm(tmp_path / "empty")
    ViTConfig().save_pretrained(tmp_path / "vit")
    with pytest.raises(lm.LMError, match=r"is not a causal LM \(config model_type 'vit'"):
        lm.load_causal_lm(tmp_path / "vit")


def test_vocab_and_tokenizer_mismatches_name_the_models(tmp_path, tok):
    a = _save_gpt2(tmp_path / "a", tok)
    b = _save_gpt2(tmp_path / "b", tok, vocab=len(tok) + 7)
    with pytest.raises(lm.LMError, match=rf"vocab sizes differ: a={len(tok)}, b={len(tok) + 7}"):
        lm.check_same_vocab({"a": lm.load_config(a), "b": lm.load_config(b)}, {})
    other = lm.train_bpe_tokenizer(["SELECT * FROM t WHERE x = 1;"] * 50, len(tok))
    assert len(other) != len(tok) or lm.tokenizer_fingerprint(other) != lm.tokenizer_fingerprint(tok)
    with pytest.raises(lm.LMError, match="tokenizers differ|has .* tokens but"):
        lm.check_same_vocab({"a": lm.load_config(a)}, {"a": tok, "c": other})


def test_context_length_is_checked(tmp_path, tok):
    cfg = lm.load_config(_save_gpt2(tmp_path / "a", tok, n_positions=16))
    lm.check_context(cfg, 16, "a")
    with pytest.raises(lm.LMError, match=r"sequence length 17 is longer than a's context \(16 positions\)"):
        lm.check_context(cfg, 17, "a")


def test_student_from_teacher_shrinks_and_can_copy_every_other_layer(tmp_path, tok):
    d = _save_gpt2(tmp_path / "t", tok, n_layer=4, n_embd=32)
    teacher = lm.load_causal_lm(d)
    small = lm.student_from_teacher(d, layers=2, width=16, heads=2)
    assert small.config.n_layer == 2 and small.config.n_embd == 16
    assert lm.num_params(small) < lm.num_params(teacher) / 2
    copied = lm.student_from_teacher(d, layers=2, init_from_teacher=True)
    t_layers, s_layers = teacher.hf.transformer.h, copied.hf.transformer.h
    assert torch.equal(s_layers[0].attn.c_attn.weight, t_layers[0].attn.c_attn.weight)
    assert torch.equal(s_layers[1].mlp.c_fc.weight, t_layers[3].mlp.c_fc.weight)
    assert torch.equal(copied.hf.transformer.wte.weight, teacher.hf.transformer.wte.weight)


def test_pack_concatenates_with_eos_and_drops_the_remainder():
    x = lm.pack([[1, 2, 3], [4, 5]], seq_len=3, eos_id=0)
    assert x.tolist() == [[1, 2, 3], [0, 4, 5]] and x.dtype == np.int32


def test_split_docs_is_deterministic_and_disjoint():
    docs = [(f"f{i}.py", f"text {i}") for i in range(40)]
    a, b = lm.split_docs(docs, 0.1, 0.1, seed=3), lm.split_docs(docs, 0.1, 0.1, seed=3)
    assert a == b and len(a["val"]) == 4 and len(a["test"]) == 4 and len(a["train"]) == 32
    assert not set(a["val"]) & set(a["train"])


def test_topk_store_round_trip_and_k_equal_vocab_matches_full(tmp_path, tok):
    model = lm.load_causal_lm(_save_gpt2(tmp_path / "t", tok))
    x = torch.randint(0, len(tok), (3, 8))
    with torch.inference_mode():
        logits = model(x)
    for k in (4, len(tok)):
        arrays = store.teacher_arrays(logits, k)
        assert arrays["indices"].dtype == np.uint16 and arrays["values"].shape == (3, 8, k)
        spec, key = store.column_spec(arrays), {"rows": 3}
        store.write_shard(tmp_path / f"s{k}", "t", "val", "p.parquet", store.shard_table(np.array([7, 8, 9]), arrays),
                          key, "f", {}, spec)
        store.publish(tmp_path / f"s{k}", "t", kind="topk", columns=spec, inputs={"val": {"p.parquet": key}},
                      teacher_fp="f", settings={})
        back = store.soft_labels(tmp_path / f"s{k}", ["t"], np.array([9, 7, 8]))
        for name in ("values", "indices", "lse"):
            assert np.array_equal(back[name][0], arrays[name][[2, 0, 1]])
    # k = V from the store gives the full-logit loss (up to fp16 storage of the values)
    student = torch.randn(3, 8, len(tok))
    sparse = tl.token_kd_loss(student, torch.from_numpy(back["values"][0].astype(np.float32)),
                              torch.from_numpy(back["indices"][0].astype(np.int64)), torch.from_numpy(back["lse"][0]),
                              torch.ones(3, 8))
    full = tl.token_kd_loss(student, *tl.full_support(logits[[2, 0, 1]].half().float()), torch.ones(3, 8))
    assert sparse.item() == pytest.approx(full.item(), rel=1e-3)
    with pytest.raises(ValueError, match=rf"k={len(tok) + 1} is larger than the vocabulary \({len(tok)}\)"):
        store.teacher_arrays(logits, len(tok) + 1)


def test_short_kd_run_lowers_the_students_kl_to_the_teacher(tmp_path, tok):
    torch.manual_seed(0)
    teacher = lm.load_causal_lm(_save_gpt2(tmp_path / "t", tok, n_layer=2, n_embd=32, seed=1))
    ids = torch.from_numpy(lm.tokenize_and_pack(tok, TEXT, 16)).long()
    with torch.no_grad():  # no_grad, not inference_mode: these tensors feed an autograd graph
        v, i, lse = tl.topk_support(teacher(ids), 16)
    teacher_cols = {"values": v[:, None], "indices": i[:, None], "lse": lse[:, None]}
    student = lm.student_from_teacher(tmp_path / "t", layers=1, width=16, heads=2, seed=0)
    w = torch.tensor([1.0])

    def kl() -> float:
        with torch.no_grad():
            kd, _ = tl.lm_distillation_sums(student(ids), ids, teacher_cols, w)
        return kd.item() / ids.numel()

    before = kl()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    for _ in range(40):
        kd, _ = tl.lm_distillation_sums(student(ids), ids, teacher_cols, w)
        opt.zero_grad()
        (kd / ids.numel()).backward()
        opt.step()
    after = kl()
    assert after < 0.5 * before, (before, after)
