import sys
from pathlib import Path

import pytest
import yaml

from workflows.config import ConfigError, load_config

DEFAULT = Path(__file__).parents[2] / "workflows" / "configs" / "mnist1d.yaml"


def test_default_config_validates():
    cfg = load_config(DEFAULT)
    assert [t.name for t in cfg.teachers] == ["cnn-a", "cnn-b", "cnn-c"]
    assert cfg.data.mnist1d.transfer == 60000 and cfg.tune.student_width.choice == [16, 20, 24]


def test_methods_config_searches_the_method_on_the_default_data_and_teachers():
    cfg, default = load_config(DEFAULT.parent / "mnist1d-methods.yaml"), load_config(DEFAULT)
    assert cfg.teachers == default.teachers and cfg.data == default.data  # a run of one reuses the other's teachers
    assert cfg.tune.response.choice == ["hinton", "dkd"] and cfg.tune.schedule.choice == ["constant", "cosine"]


@pytest.mark.parametrize("override, message", [
    ("train.fit.epochz=3", r"train.fit.epochz: Extra inputs are not permitted"),
    ("distill.temperature=0", r"distill.temperature: Input should be greater than 0"),
    ("distill.temperature=-1", r"distill.temperature: Input should be greater than 0"),
    ("distill.teacher_weights={cnn-a: -0.5}", r"teacher weights must be >= 0, got \{'cnn-a': -0.5\}"),
    ("distill.teacher_weights={cnn-z: 1}", r"unknown teachers \['cnn-z'\]"),
    ("distill.alpha=1.5", r"distill.alpha: Input should be less than or equal to 1"),
    ("tune.temperature={choice: [0, 1]}", r"tune.temperature values must be > 0"),
    ("tune.teacher_weights={uniform: [-1, 1]}", r"tune.teacher_weights values must be >= 0"),
    ("tune.alpha={uniform: [0.5, 0.2]}", r"uniform needs low < high"),
    ("train.num_workers=zero", r"train.num_workers: Input should be a valid integer"),
    ("precompute.tail_samples=8", r"precompute.tail_samples samples the tail outside a top-k store: it needs task: lm"),
    ("precompute.calls_per_actor=0", r"precompute.calls_per_actor: Input should be greater than or equal to 1"),
    ("train.fit.max_grad_norm=0", r"train.fit.max_grad_norm: Input should be greater than 0"),
    ("distill.teacher_weighting=votes",
     r"distill.teacher_weighting: Input should be 'static', 'entropy' or 'correctness'"),
    ("tune.teacher_weighting={choice: [static, votes]}",
     r"tune.teacher_weighting must be a choice among \['static', 'entropy', 'correctness'\]"),
    ("precompute.views=0", r"precompute.views: Input should be greater than or equal to 1"),
    # a negative seed once reached the view function and failed there as an OverflowError
    ("precompute.augment_seed=-1", r"precompute.augment_seed: Input should be greater than or equal to 0"),
    ("tune.scheduler=hyperband", r"tune.scheduler: Input should be 'asha' or 'fifo'"),
    ("tune.searcher=bohb", r"tune.searcher: Input should be 'random' or 'optuna'"),
    ("tune.trial_runner=train", r"tune.trial_runner: Input should be 'auto' or 'ray_train'"),
    ("deploy.qat=sometimes", r"deploy.qat: Input should be 'auto', 'always' or 'never'"),
    ("deploy.qat_epochs=0", r"deploy.qat_epochs: Input should be greater than or equal to 1"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEFAULT, [override])


def test_unknown_top_level_key_and_missing_file(tmp_path):
    raw = yaml.safe_load(DEFAULT.read_text()) | {"teachrs": []}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid config\n  teachrs: Extra inputs are not permitted"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    raw = yaml.safe_load(DEFAULT.read_text())
    raw["teachers"][0]["weights"] = "w/a.safetensors"
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    assert load_config(p).teachers[0].weights == str(tmp_path / "w" / "a.safetensors")
    raw["teachers"][0]["weights"] = "s3://bucket/w/a.safetensors"  # URIs are kept as given
    raw["code"] = ["models/user.py"]
    raw["data"] = {"source": "parquet", "parquet": {"train": "s3://b/train", "val": "v", "test": "gs://b/test"}}
    p.write_text(yaml.safe_dump(raw))
    cfg = load_config(p)
    assert cfg.teachers[0].weights == "s3://bucket/w/a.safetensors" and cfg.code == [tmp_path / "models" / "user.py"]
    assert (cfg.data.parquet.train, cfg.data.parquet.val, cfg.data.parquet.test) == (
        "s3://b/train", str(tmp_path / "v"), "gs://b/test")


def test_kd_version_prints_the_installed_version(capsys):
    import tomllib
    from importlib.metadata import version

    import pytest

    from workflows import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    project = tomllib.loads((Path(__file__).parent.parent.parent / "pyproject.toml").read_text())["project"]
    assert done.value.code == 0 and capsys.readouterr().out == f"kd {version('kd-ops')}\n"
    assert version("kd-ops") == project["version"]


def test_the_optuna_searcher_without_optuna_says_how_to_install_it(monkeypatch):
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from workflows.config import TuneConfig
    from workflows.tune import _searcher

    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    with pytest.raises(ValueError, match=r"tune.searcher: optuna needs the optuna package: pip install optuna"):
        _searcher(TuneConfig(searcher="optuna"))
    random = _searcher(TuneConfig(max_concurrent_trials=3))
    assert isinstance(random, BasicVariantGenerator) and random.max_concurrent == 3
    assert not isinstance(random, ConcurrencyLimiter)


@pytest.mark.parametrize("overrides, message", [
    (["distill.generations=2"], "precompute.views: a TAKD or born-again chain stores its stages without views"),
    (["distill.feature={student_layer: features.5, teacher_layer: features.5}"],
     "precompute.views: stored teacher features are of the plain inputs; use distill.feature.source: online"),
])
def test_views_with_what_cannot_use_them(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEFAULT, ["precompute.views=3", *overrides])
    load_config(DEFAULT, overrides)  # valid without views


def test_the_searchable_method_settings_are_the_distill_types_own_fields_and_words():
    """Tune's method dimensions name fields of the one settings type the workers get, and the words
    a dimension may take are the ones kd_ops accepts."""
    import dataclasses

    from kd_ops import method_loss, teacher_weighting, temperature
    from workflows.config import METHOD_DIMS, METHOD_WORDS

    fields = {f.name for f in dataclasses.fields(method_loss.Distill)}
    assert set(METHOD_DIMS) <= fields and set(METHOD_DIMS) <= set(method_loss.METHOD_FIELDS)
    assert METHOD_WORDS == {"response": method_loss.RESPONSES, "schedule": temperature.SCHEDULES,
                            "teacher_weighting": teacher_weighting.KINDS}
