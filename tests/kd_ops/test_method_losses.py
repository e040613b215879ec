"""The method losses against hand-computed values and their known properties."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_ops import decoupled_kd, feature_kd, losses, method_loss, models, relation_kd, temperature


def _batch(b=16, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * 3, torch.randn(b, c, generator=g) * 3, torch.randint(0, c, (b,), generator=g)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_dkd_with_alpha_1_and_beta_1_minus_pt_is_classical_kd(t):
    s, z, y = _batch()
    p = torch.softmax(z / t, -1)
    _, _, p_t = decoupled_kd.dkd_terms(s, p, y, t)
    dkd = decoupled_kd.dkd_loss(s, p, y, temperature=t, alpha=1.0, beta=1 - p_t)
    kd = losses.hinton_kd_loss(s, p, t)
    assert dkd.item() == pytest.approx(kd.item(), rel=1e-5)
    # and the default β = 8 weighs the non-target term up: not the same number
    assert decoupled_kd.dkd_loss(s, p, y, temperature=t).item() > kd.item() * 1.5


def test_dkd_terms_by_hand():
    s = torch.tensor([[2.0, 0.0, 0.0]])
    p = torch.tensor([[0.5, 0.3, 0.2]])
    q = torch.softmax(s, -1)[0]
    tckd = 0.5 * math.log(0.5 / q[0]) + 0.5 * math.log(0.5 / (1 - q[0]))
    nckd = 0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.5)  # q̂ over classes 1, 2 is uniform
    got_t, got_n, p_t = decoupled_kd.dkd_terms(s, p, torch.tensor([0]), 1.0)
    assert (got_t.item(), got_n.item(), p_t.item()) == pytest.approx((tckd, nckd, 0.5), rel=1e-5)


def test_dkd_target_is_label_or_teacher_top1():
    p = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    assert decoupled_kd.targets(torch.tensor([0, -1]), p).tolist() == [0, 0]


def test_rkd_distance_loss_is_invariant_to_scaling_both_embeddings():
    s, t, _ = _batch(b=12, c=8)
    base = relation_kd.rkd_distance_loss(s, t).item()
    assert base > 0
    assert relation_kd.rkd_distance_loss(3.7 * s, 3.7 * t).item() == pytest.approx(base, rel=1e-5)
    assert relation_kd.rkd_distance_loss(s, 0.01 * t).item() == pytest.approx(base, rel=1e-5)
    assert relation_kd.rkd_angle_loss(2 * s, 5 * t).item() == pytest.approx(relation_kd.rkd_angle_loss(s, t).item(), rel=1e-5)
    assert relation_kd.rkd_distance_loss(t, t).item() == 0 and relation_kd.rkd_angle_loss(t, t).item() < 1e-10


def test_rkd_distance_by_hand():
    # three points on a line: distances 1, 1, 2 (mean 4/3) vs an equilateral triangle (all equal)
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    ds = torch.tensor([1, 2, 1, 1, 2, 1]) / (4 / 3)  # off-diagonal pairs (i≠j), in row order
    expect = F.smooth_l1_loss(ds, torch.ones(6)).item()
    assert relation_kd.rkd_distance_loss(s, t).item() == pytest.approx(expect, rel=1e-5)


def test_attention_maps_are_unit_norm_and_loss_zero_for_same_pattern():
    f = torch.randn(4, 16, 5)
    a = feature_kd.attention_map(f)
    assert a.shape == (4, 5) and torch.allclose(a.norm(dim=1), torch.ones(4))
    # channel count does not matter; scaling the features does not change the map
    assert feature_kd.attention_loss(f, 3 * f).item() < 1e-10
    assert feature_kd.attention_loss(torch.randn(4, 8, 10), f).item() > 0  # different positions: pooled to 5
    with pytest.raises(feature_kd.LayerError, match="channels, positions"):
        feature_kd.attention_map(torch.randn(4, 16))


def test_feature_kd_is_zero_when_projected_student_equals_teacher():
    t = torch.randn(4, 8, 5)
    assert feature_kd.hint_loss(t.clone(), t).item() == 0
    assert feature_kd.hint_loss(2 * t, t, "cosine").item() == pytest.approx(0, abs=1e-6)
    assert feature_kd.hint_loss(t + 1, t).item() == pytest.approx(1.0)


def test_projection_shapes_and_errors():
    assert feature_kd.projection([6, 10], [16, 5])(torch.randn(2, 6, 10)).shape == (2, 16, 5)
    assert feature_kd.projection([12], [40])(torch.randn(2, 12)).shape == (2, 40)
    with pytest.raises(feature_kd.LayerError, match=r"no projection maps student features of shape \[6, 10\] to teacher features \[64\]"):
        feature_kd.projection([6, 10], [64])
    with pytest.raises(feature_kd.LayerError, match="fewer positions"):
        feature_kd.projection([6, 5], [16, 10])


def test_wrong_layer_name_lists_the_available_ones():
    with pytest.raises(feature_kd.LayerError, match=r"student has no layer 'feature.9'; its layers are: features, features.0, features.1"):
        feature_kd.Tap(models.cnn(width=4), "feature.9", "student")


def test_layer_output_and_feature_student_read_the_named_layer():
    m = models.cnn(width=4)
    x = torch.randn(3, 40)
    tapped = feature_kd.LayerOutput(m, "features.5")(x)
    assert torch.equal(tapped, m.features(x.unsqueeze(1)))
    assert feature_kd.LayerOutput(m, "features.5", pool_to=2)(x).shape == (3, 4, 2)
    fs = feature_kd.FeatureStudent(m, "features.5", feature_kd.projection([4, 5], [8, 5]))
    assert fs(x).shape == (3, 10) and fs.features.shape == (3, 8, 5)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_schedules_hit_their_end_points(kind):
    assert temperature.scheduled(4.0, 1.0, kind, 0.0) == 4.0
    assert temperature.scheduled(4.0, 1.0, kind, 1.0) == (4.0 if kind == "constant" else 1.0)
    mid = temperature.scheduled(4.0, 1.0, kind, 0.5)
    assert mid == {"constant": 4.0, "linear": 2.5, "cosine": pytest.approx(2.5)}[kind]
    assert temperature.scheduled(4.0, 1.0, "cosine", 0.25) > temperature.scheduled(4.0, 1.0, "linear", 0.25)


def test_standardized_logits_have_zero_mean_unit_std_and_ignore_scale():
    z = torch.randn(5, 10) * 7 + 3
    s = temperature.standardize(z)
    assert torch.allclose(s.mean(-1), torch.zeros(5), atol=1e-5) and torch.allclose(s.std(-1), torch.ones(5), atol=1e-4)
    assert torch.allclose(temperature.standardize(10 * z), s, atol=1e-4)


def test_student_loss_composes_the_terms():
    s, z, y = _batch()
    w = torch.tensor([1.0])
    hinton, parts = method_loss.student_loss(s, z[None], y, w, method_loss.Distill((1.0,), temperature=2.0, alpha=0.7))
    expect, _ = losses.distillation_loss(s, z[None], y, temperature=2.0, alpha=0.7, weights=w)
    assert hinton.item() == pytest.approx(expect.item(), rel=1e-6) and parts["temperature"] == 2.0
    f = torch.randn(16, 4, 5)
    m = method_loss.Distill((1.0,), temperature=2.0, alpha=0.7, feature="hint", feature_weight=0.5, rkd_distance=2.0,
                            schedule="linear", temperature_end=1.0)
    total, parts = method_loss.student_loss(s, z[None], y, w, m, progress=1.0,
                                            student_features=f + 1, teacher_features=f)
    at_t1, _ = losses.distillation_loss(s, z[None], y, temperature=1.0, alpha=0.7, weights=w)
    rkd = relation_kd.rkd_distance_loss(f + 1, f)
    assert total.item() == pytest.approx(at_t1.item() + 0.5 * 1.0 + 2.0 * rkd.item(), rel=1e-5)
    assert parts["temperature"] == 1.0 and parts["feature"] == pytest.approx(1.0)


@pytest.mark.parametrize("bad, text", [({"response": "fitnet"}, "response must be one of"),
                                       ({"dkd_beta": -1}, "dkd alpha and beta must be >= 0"),
                                       ({"schedule": "step"}, "schedule must be one of"),
                                       ({"temperature_end": 0}, "temperature_end must be > 0"),
                                       ({"alpha": 1.5}, r"alpha in \[0, 1\]")])
def test_method_settings_out_of_range(bad, text):
    with pytest.raises(ValueError, match=text):
        method_loss.Distill(**{"teacher_weights": (1.0,), "temperature": 1.0, "alpha": 0.5, **bad})
