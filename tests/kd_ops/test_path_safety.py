"""Paths from names and manifests stay inside their directory; URIs keep the user's form and hide
their secrets; Hugging Face pickle weights need an explicit opt-in."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kd_ops import lm, store
from kd_ops.fsio import Loc, UnsafePathError, redact, redacted

from test_store import _publish, _write


@pytest.mark.parametrize("name", [".", "..", "a/b", ".hidden", ""])
def test_a_store_entry_name_that_is_not_one_plain_directory_is_refused(tmp_path, name):
    with pytest.raises(store.StoreError, match="is not a plain name"):
        store.teacher_loc(tmp_path / "store", name)


def test_a_manifest_naming_a_file_outside_its_entry_is_refused_before_anything_is_read_or_deleted(tmp_path):
    root = tmp_path / "out" / "store"
    _publish(root, "t", _write(root, "t", np.arange(6), np.ones((6, 3))))
    victim = tmp_path / "out" / "x.parquet"  # ../../x.parquet from the teacher's directory
    victim.write_bytes(b"the user's data")
    manifest = root / "t" / store.MANIFEST
    m = json.loads(manifest.read_text())
    unit = sorted(m["shards"])[0]
    m["shards"][unit]["file"] = "../../x.parquet"
    manifest.write_text(json.dumps(m))
    for read in (lambda: store.read_manifest(root, "t"), lambda: store.read_teacher(root, "t"),
                 lambda: store.size_bytes(root)):
        with pytest.raises(store.StoreError, match=r"'../../x.parquet' is not a plain relative path"):
            read()
    with pytest.raises(UnsafePathError):
        store.shard_damaged(root, "t", m["shards"][unit])
    assert victim.read_bytes() == b"the user's data"


def test_a_commit_record_naming_a_file_outside_publishes_nothing_and_deletes_nothing(tmp_path):
    root = tmp_path / "out" / "store"
    inputs = _write(root, "t", np.arange(6), np.ones((6, 3)))
    stray = root / "t" / "train" / "stray.parquet"  # publish deletes unnamed shards, but only after every check
    stray.write_bytes(b"x")
    record = root / "t" / store.COMMITS / "train" / "part-0.parquet.json"
    rec = json.loads(record.read_text())
    rec["shard"] = "../../x.parquet"
    record.write_text(json.dumps(rec))
    with pytest.raises(UnsafePathError, match="'../../x.parquet'"):
        _publish(root, "t", inputs)
    assert store.read_manifest(root, "t") is None and stray.exists()
    with pytest.raises(UnsafePathError):
        store.forget(root, "t", ["../../evil"])


@pytest.mark.parametrize("uri, child, path", [
    ("s3://bucket/runs/a?region=us-west-2&endpoint_override=http://127.0.0.1:9", "store/t",
     "bucket/runs/a/store/t"),
    ("gs://bucket/runs/a", "store/t", "bucket/runs/a/store/t"),
    ("file:///tmp/kd/runs/a", "store/t", "/tmp/kd/runs/a/store/t"),
])
def test_uris_keep_the_users_form_through_joins_and_round_trip(uri, child, path):
    loc = Loc.of(uri) / child
    scheme, rest = uri.split("://", 1)
    base, _, query = rest.partition("?")
    assert str(loc) == f"{scheme}://{base}/{child}" + (f"?{query}" if query else "")
    assert loc.path == path and Loc.of(str(loc)).path == path and Loc.of(str(loc)).uri == loc.uri
    assert loc.bare_uri == f"{scheme}://{base}/{child}"  # what MLflow takes as an artifact location


def test_local_paths_round_trip(tmp_path):
    loc = Loc.of(tmp_path / "a") / "b"
    assert str(loc) == str(tmp_path / "a" / "b") == loc.uri and Loc.of(str(loc)) == loc


def test_secrets_in_uris_are_redacted_where_shown_and_stored():
    assert redact("http://kd:s3cr3t@mlflow:5000/x") == "http://kd:***@mlflow:5000/x"
    assert redact("s3://bucket/a?region=r&secret_key=SK&session_token=T") == "s3://bucket/a?region=r&secret_key=***&session_token=***"
    assert redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert redacted({"a": ["http://u:p@h"], "b": {"c": "plain:p@x"}, "d": 1}) == {
        "a": ["http://u:***@h"], "b": {"c": "plain:p@x"}, "d": 1}
    assert str(Loc.of("s3://AK:SK@bucket/a?region=us-west-2") / "b") == "s3://AK:***@bucket/a/b?region=us-west-2"


@pytest.mark.parametrize("uri, shown", [
    ("postgresql://kd:pw@db:5432/mlflow", "postgresql://kd:***@db:5432/mlflow"),
    ("mysql+pymysql://kd:p@ss:w0rd@db/mlflow?charset=utf8mb4", "mysql+pymysql://kd:***@db/mlflow?charset=utf8mb4"),
    ("https://mlflow.example/?token=T0K", "https://mlflow.example/?token=***"),
    ("https://h/x?api_key=AK&x-access-key=XK&sig=S&auth=A&Password=P&page=2",
     "https://h/x?api_key=***&x-access-key=***&sig=***&auth=***&Password=***&page=2"),
    ("sqlite:////tmp/mlflow.db?password=PW", "sqlite:////tmp/mlflow.db?password=***"),
    # a URI inside a command line (Ray records the driver's as its job's entrypoint)
    ("kd run c.yaml --tracking-uri=postgresql://kd:pw@db/m --out s3://b/r?token=T0K --set a=1",
     "kd run c.yaml --tracking-uri=postgresql://kd:***@db/m --out s3://b/r?token=*** --set a=1"),
])
def test_secrets_of_every_scheme_are_redacted(uri, shown):
    """Database URIs MLflow takes as tracking stores hold their password in the user-info; an
    unescaped `@` in it must not leave a tail of it visible."""
    assert redact(uri) == shown
    assert redact(shown) == shown  # redacting twice changes nothing (a worker compares redacted forms)


def _tiny_lm_dir(path, safe: bool):
    """A tiny GPT-2 directory with model.safetensors, or (as older tools saved them) only pytorch_model.bin."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=8, n_layer=1, n_embd=16, n_head=2))
    model.save_pretrained(path)
    if not safe:  # transformers 5 writes safetensors only
        torch.save(model.state_dict(), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    return path


def test_pickle_weights_are_refused_unless_the_teacher_opts_in(tmp_path):
    d = _tiny_lm_dir(tmp_path / "pickled", safe=False)
    assert [f.name for f in d.glob("*.bin")] == ["pytorch_model.bin"] and not list(d.glob("*.safetensors"))
    with pytest.raises(lm.LMError, match=r"only pickle weights \(pytorch_model.bin\).*set allow_pickle: true"):
        lm.load_causal_lm(d)
    with pytest.raises(lm.LMError, match="only pickle weights"):
        lm.weight_files(d)
    assert [f.name for f in lm.weight_files(d, allow_pickle=True)] == ["pytorch_model.bin"]
    opted = lm.load_causal_lm(d, allow_pickle=True)
    safe = lm.load_causal_lm(_tiny_lm_dir(tmp_path / "safe", safe=True))
    x = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(opted(x), safe(x))  # the same weights, loaded from either file
    assert [f.name for f in lm.weight_files(tmp_path / "safe")] == ["model.safetensors"]
