"""Hugging Face causal LMs: load from local directories only, check that teachers and student
share a vocabulary, build smaller students from a teacher's config, and pack text into
fixed-length token sequences."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


class LMError(ValueError):
    """A model directory is missing, is not a causal LM, or does not match the others."""


class CausalLM(nn.Module):
    """A Hugging Face causal LM behind the kd-ops module contract: input_ids [B, L] → logits [B, L, V]."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids.long(), use_cache=False).logits

    @property
    def config(self):
        return self.hf.config


def _check_dir(path: str | Path, files: tuple[str, ...] = ("config.json",)) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise LMError(f"model directory {path} does not exist")
    if not any((path / f).is_file() for f in files):
        raise LMError(f"{path} has no config.json: not a Hugging Face model directory (save one with save_pretrained)")
    return path


def load_config(path: str | Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(_check_dir(path), local_files_only=True)


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def weight_files(path: str | Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a model directory: its *.safetensors, or, with `allow_pickle`, its pickle
    files when it has no safetensors. LMError for a directory with only pickle files and no opt-in:
    unpickling a file runs whatever code it holds."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(f for pattern in PICKLE_WEIGHTS for f in path.glob(pattern))
    if pickles and not allow_pickle:
        raise LMError(f"{path} has only pickle weights ({', '.join(f.name for f in pickles[:3])}); kd-ops loads "
                      "safetensors only, since unpickling runs code. Convert them (model.save_pretrained(dir, "
                      "safe_serialization=True)) or, for files you trust, set allow_pickle: true on this teacher")
    return pickles


def load_causal_lm(path: str | Path, dtype: torch.dtype | None = None, allow_pickle: bool = False) -> CausalLM:
    """from_pretrained on a local directory, never the hub, from safetensors only unless
    `allow_pickle`. Raises LMError if it is not a causal LM or has no weights it may load."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per actor and per evaluation is noise, not progress
    path = _check_dir(path)
    cfg = load_config(path)
    weight_files(path, allow_pickle)  # refuses pickle-only directories before from_pretrained sees them
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype,
                                                     use_safetensors=None if allow_pickle else True)
    except ValueError as e:
        raise LMError(f"{path} is not a causal LM (config model_type {cfg.model_type!r}, architectures "
                      f"{getattr(cfg, 'architectures', None)}): {str(e).splitlines()[0]}") from e
    except OSError as e:
        raise LMError(f"{path}: cannot load the weights ({str(e).splitlines()[0]})") from e
    return CausalLM(model)


def causal_lm(path: str, allow_pickle: bool = False) -> CausalLM:
    """Factory for configs and Ray actors: `kd_ops.lm:causal_lm` with kwargs {path[, allow_pickle]}."""
    return load_causal_lm(path, allow_pickle=allow_pickle)


def new_causal_lm(vocab_size: int, n_positions: int, n_layer: int, n_embd: int, n_head: int, **extra) -> CausalLM:
    """A fresh GPT-2-style LM (for training a teacher from scratch)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                     bos_token_id=0, eos_token_id=0, **extra)
    return CausalLM(GPT2LMHeadModel(cfg))


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    # a model directory, or a tokenizer saved alone (kd run keeps the data's tokenizer that way)
    path = _check_dir(path, ("config.json", "tokenizer_config.json"))
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise LMError(f"{path}: no usable tokenizer ({str(e).splitlines()[0]}); the tokenizer comes from the "
                      "teacher directory (tokenizer.save_pretrained)") from e


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a tokenizer: its full vocabulary (token → id) and special tokens."""
    spec = json.dumps({"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.all_special_tokens})
    return hashlib.sha256(spec.encode()).hexdigest()


def check_same_vocab(models: dict[str, Any], tokenizers: dict[str, Any]) -> int:
    """All models share vocab size and all tokenizers are identical; returns the vocab size.

    models: name → config (anything with .vocab_size); tokenizers: name → tokenizer (may be fewer).
    """
    sizes = {name: cfg.vocab_size for name, cfg in models.items()}
    if len(set(sizes.values())) > 1:
        raise LMError("models must share one vocabulary, but vocab sizes differ: "
                      + ", ".join(f"{n}={v}" for n, v in sizes.items()))
    prints = {name: tokenizer_fingerprint(t) for name, t in tokenizers.items()}
    if len(set(prints.values())) > 1:
        raise LMError("tokenizers differ (same vocab size, different token → id maps): "
                      + ", ".join(f"{n}={p[:12]}" for n, p in prints.items()))
    for name, t in tokenizers.items():
        if len(t) > next(iter(sizes.values())):
            raise LMError(f"tokenizer of {name} has {len(t)} tokens but the models' vocab size is {next(iter(sizes.values()))}")
    return next(iter(sizes.values()))


def _layer_list(hf_model: nn.Module) -> nn.ModuleList:
    base = getattr(hf_model, hf_model.base_model_prefix)
    for attr in ("h", "layers"):
        if hasattr(base, attr):
            return getattr(base, attr)
    raise LMError(f"cannot find the transformer layers of {type(hf_model).__name__} to initialise from")


def student_from_teacher(teacher_dir: str | Path, *, layers: int | None = None, width: int | None = None,
                         heads: int | None = None, init_from_teacher: bool = False, seed: int = 0) -> CausalLM:
    """A smaller causal LM from the teacher's config: fewer layers and/or a smaller hidden size.

    `init_from_teacher` copies embeddings and every other teacher layer (DistilBERT-style); it
    needs the teacher's hidden size (width None or equal).
    """
    from transformers import AutoModelForCausalLM

    cfg = load_config(teacher_dir)
    d = cfg.to_dict()
    keys = {"layers": ("n_layer", "num_hidden_layers"), "width": ("n_embd", "hidden_size"),
            "heads": ("n_head", "num_attention_heads")}
    for arg, value in (("layers", layers), ("width", width), ("heads", heads)):
        if value is not None:
            for k in keys[arg]:
                if k in d:
                    d[k] = int(value)
    if "intermediate_size" in d and width is not None:
        d["intermediate_size"] = 4 * int(width)
    if "n_inner" in d:
        d["n_inner"] = None
    new_cfg = type(cfg).from_dict(d)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(new_cfg)
    if init_from_teacher:
        teacher = load_causal_lm(teacher_dir).hf
        if width is not None and width != getattr(cfg, "hidden_size", getattr(cfg, "n_embd", None)):
            raise LMError("init_from_teacher needs the teacher's hidden size; leave width unset")
        t_layers, s_layers = _layer_list(teacher), _layer_list(model)
        picks = np.linspace(0, len(t_layers) - 1, len(s_layers)).round().astype(int)
        for s_layer, i in zip(s_layers, picks):
            s_layer.load_state_dict(t_layers[int(i)].state_dict())
        model.get_input_embeddings().load_state_dict(teacher.get_input_embeddings().state_dict())
        # non-layer weights (final norm, position embeddings, untied head) copied where names match
        s_state, t_state = model.state_dict(), teacher.state_dict()
        layer_prefix = tuple(n for n, _ in model.named_modules() if n.endswith((".h", ".layers")))
        extra = {k: v for k, v in t_state.items()
                 if k in s_state and not k.startswith(layer_prefix) and s_state[k].shape == v.shape}
        model.load_state_dict(extra, strict=False)
    return CausalLM(model)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pack(token_lists: list[list[int]], seq_len: int, eos_id: int) -> np.ndarray:
    """Concatenate documents (each followed by EOS) and cut into rows of seq_len tokens.
    Returns [N, seq_len] int32; the incomplete last row is dropped."""
    flat = np.fromiter((t for toks in token_lists for t in (*toks, eos_id)), dtype=np.int64)
    n = len(flat) // seq_len
    return flat[: n * seq_len].reshape(n, seq_len).astype(np.int32)


def check_context(model_config, seq_len: int, name: str) -> None:
    ctx = getattr(model_config, "n_positions", None) or getattr(model_config, "max_position_embeddings", None)
    if ctx is not None and seq_len > ctx:
        raise LMError(f"sequence length {seq_len} is longer than {name}'s context ({ctx} positions); "
                      f"lower data.seq_len to at most {ctx}")


def read_corpus(paths: list[str], max_bytes: int) -> list[tuple[str, str]]:
    """(name, text) documents from files, directories (recursive *.py/*.txt/*.md) or globs, sorted
    by name, up to `max_bytes`. 'python-stdlib' names this interpreter's standard library."""
    import glob
    import sysconfig

    files: list[Path] = []
    for p in paths:
        if p == "python-stdlib":
            root = Path(sysconfig.get_paths()["stdlib"])
            files += [f for f in root.rglob("*.py") if "site-packages" not in f.parts and "test" not in f.parts]
        elif Path(p).is_dir():
            files += [f for ext in ("*.py", "*.txt", "*.md") for f in Path(p).rglob(ext)]
        else:
            files += [Path(f) for f in glob.glob(p)]
    if not files:
        raise LMError(f"no text files found in {paths}")
    docs, total = [], 0
    for f in sorted(set(files)):
        text = f.read_text(encoding="utf-8", errors="replace")
        docs.append((str(f), text))
        total += len(text.encode())
        if total >= max_bytes:
            break
    return docs


def split_docs(docs: list[tuple[str, str]], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Deterministic split by document, so no file leaks across splits: documents ordered by a
    hash of (seed, name); the first ⌈val·n⌉ go to val, the next ⌈test·n⌉ to test, the rest to train."""
    if len(docs) < 3:
        raise LMError(f"corpus of {len(docs)} documents is too small to split into train/val/test; add text")
    ranked = sorted(docs, key=lambda d: hashlib.sha256(f"{seed}:{d[0]}".encode()).hexdigest())
    n_val, n_test = (max(1, int(np.ceil(f * len(docs)))) for f in (val_fraction, test_fraction))
    if n_val + n_test >= len(docs):
        raise LMError(f"corpus of {len(docs)} documents leaves no training text after val/test; add text or lower fractions")
    texts = [t for _, t in ranked]
    return {"val": texts[:n_val], "test": texts[n_val:n_val + n_test], "train": texts[n_val + n_test:]}


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts` (no download), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def tokenize_and_pack(tokenizer, texts: list[str], seq_len: int) -> np.ndarray:
    """Tokenise documents and pack them into [N, seq_len] int32 rows separated by EOS."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return pack(ids, seq_len, tokenizer.eos_token_id)
