import math

import pytest
import torch

from kd_ops import losses


def test_soft_cross_entropy_matches_hand_computed_kl():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    s = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))  # softmax(s) == [0.5, 0.3, 0.2]
    expected = 0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.2)
    assert losses.soft_cross_entropy(s, p, 1.0).item() == pytest.approx(expected, rel=1e-5)


def test_kd_term_is_zero_when_student_equals_teacher():
    torch.manual_seed(0)
    z = torch.randn(8, 10)
    for T in (0.5, 1.0, 4.0):
        p = losses.ensemble_probs(z[None], torch.tensor([1.0]), T)
        assert losses.hinton_kd_loss(z, p, T).item() == pytest.approx(0.0, abs=1e-6)


def test_hinton_kd_scales_by_t_squared_hand_computed():
    t, s, T = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]]), 2.0
    p1 = math.exp(1.0) / (math.exp(1.0) + 1.0)  # softmax([2, 0] / 2)
    kl = p1 * math.log(p1 / 0.5) + (1 - p1) * math.log((1 - p1) / 0.5)
    p = losses.ensemble_probs(t[None], torch.tensor([1.0]), T)
    assert losses.hinton_kd_loss(s, p, T).item() == pytest.approx(T**2 * kl, rel=1e-5)


def test_t_squared_keeps_gradient_scale():
    """The gradient of T²·KL w.r.t. student logits is (q_T − p_T)·T; for large T it tends to
    (s − t)/C-ish and stays O(1), not O(1/T²) as the plain KL would."""
    torch.manual_seed(0)
    t = torch.randn(64, 10)
    s = torch.randn(64, 10)
    norms = {}
    for T in (4.0, 8.0, 16.0):
        x = s.clone().requires_grad_()
        losses.hinton_kd_loss(x, losses.ensemble_probs(t[None], torch.tensor([1.0]), T), T).backward()
        norms[T] = x.grad.norm().item()
    assert norms[16.0] / norms[4.0] == pytest.approx(1.0, abs=0.1)
    # without T² the gradient would shrink by (4/16)² = 1/16
    x = s.clone().requires_grad_()
    losses.soft_cross_entropy(x, losses.ensemble_probs(t[None], torch.tensor([1.0]), 16.0), 16.0).mean().backward()
    assert x.grad.norm().item() < norms[16.0] / 100


def test_ensemble_mixes_probabilities_with_weights():
    a, b = torch.tensor([[10.0, 0.0]]), torch.tensor([[0.0, 10.0]])
    p = losses.ensemble_probs(torch.stack([a, b]), torch.tensor([0.25, 0.75]), 1.0)
    pa, pb = torch.softmax(a, -1), torch.softmax(b, -1)
    assert torch.allclose(p, 0.25 * pa + 0.75 * pb)
    assert p.sum().item() == pytest.approx(1.0)


def test_ensemble_accepts_fp16_store_logits():
    z = torch.randn(2, 4, 10).half()
    p = losses.ensemble_probs(z, torch.tensor([0.5, 0.5]), 2.0)
    assert p.dtype == torch.float32 and torch.allclose(p.sum(-1), torch.ones(4))


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        losses.ensemble_probs(torch.zeros(1, 1, 3), torch.tensor([1.0]), 0.0)


def test_distillation_loss_mixes_alpha_and_masks_unlabelled_rows():
    torch.manual_seed(1)
    s, t = torch.randn(4, 5), torch.randn(1, 4, 5)
    y = torch.tensor([1, -1, 3, -1])
    w = torch.tensor([1.0])
    loss, parts = losses.distillation_loss(s, t, y, temperature=2.0, alpha=0.3, weights=w)
    kd = losses.hinton_kd_loss(s, losses.ensemble_probs(t, w, 2.0), 2.0)
    ce = torch.nn.functional.cross_entropy(s[[0, 2]], y[[0, 2]])
    assert loss.item() == pytest.approx(0.3 * kd.item() + 0.7 * ce.item(), rel=1e-5)
    assert parts["ce"] == pytest.approx(ce.item(), rel=1e-5)


def test_hard_label_loss_is_zero_without_labels_but_keeps_graph():
    s = torch.randn(3, 4, requires_grad=True)
    loss = losses.hard_label_loss(s, torch.full((3,), -1))
    loss.backward()
    assert loss.item() == 0.0 and s.grad is not None


def test_alpha_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="alpha"):
        losses.distillation_loss(torch.zeros(1, 2), torch.zeros(1, 1, 2), torch.tensor([0]),
                                 temperature=1.0, alpha=1.5, weights=torch.tensor([1.0]))
