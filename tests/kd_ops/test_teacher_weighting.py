"""Per-sample teacher weights against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from kd_ops.teacher_weighting import KINDS, per_sample_weights


def test_every_kind_gives_non_negative_weights_summing_to_one_per_row():
    torch.manual_seed(0)
    logits = torch.randn(3, 50, 10) * 3
    labels = torch.randint(-1, 10, (50,))
    static = torch.tensor([0.5, 0.3, 0.2])
    for kind in KINDS:
        w = per_sample_weights(logits, static, kind, labels)
        assert w.shape == (3, 50) and (w >= 0).all(), kind
        torch.testing.assert_close(w.sum(0), torch.ones(50))
    torch.testing.assert_close(per_sample_weights(logits, static, "static", labels), static[:, None].expand(3, 50))


def test_entropy_weights_by_hand():
    # teacher 0 is sure (logits [4, 0]), teacher 1 has no idea ([0, 0]: entropy ln 2)
    logits = torch.tensor([[[4.0, 0.0]], [[0.0, 0.0]]])
    p = 1 / (1 + math.exp(-4))
    h0 = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    e0, e1 = math.exp(-h0), math.exp(-math.log(2))
    w = per_sample_weights(logits, torch.tensor([0.5, 0.5]), "entropy")
    assert w[:, 0].tolist() == pytest.approx([e0 / (e0 + e1), e1 / (e0 + e1)])
    # static weights multiply in: 0.2 / 0.8
    w = per_sample_weights(logits, torch.tensor([0.2, 0.8]), "entropy")
    assert w[0, 0].item() == pytest.approx(0.2 * e0 / (0.2 * e0 + 0.8 * e1))


def test_correctness_gives_a_wrong_teacher_less_weight_by_hand():
    # label 0: teacher 0 right ([3, 0]), teacher 1 wrong ([0, 3]); a third teacher unsure ([0, 0])
    logits = torch.tensor([[[3.0, 0.0]], [[0.0, 3.0]], [[0.0, 0.0]]])
    ce = [-torch.log_softmax(logits[i, 0], -1)[0].item() for i in range(3)]
    soft = [math.exp(c) / sum(math.exp(x) for x in ce) for c in ce]
    expected = [(1 - s) / 2 for s in soft]                       # CA-MKD with M = 3
    w = per_sample_weights(logits, torch.full((3,), 1 / 3), "correctness", torch.tensor([0]))
    assert w[:, 0].tolist() == pytest.approx(expected)
    assert w[0, 0] > w[2, 0] > w[1, 0]                           # right > unsure > wrong


def test_correctness_uses_entropy_on_unlabelled_rows():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 5)
    labels = torch.tensor([-1, 2, -1, 0, 4, -1])
    static = torch.tensor([0.6, 0.4])
    w = per_sample_weights(logits, static, "correctness", labels)
    e = per_sample_weights(logits, static, "entropy", labels)
    unlabelled = labels < 0
    torch.testing.assert_close(w[:, unlabelled], e[:, unlabelled])
    assert not torch.allclose(w[:, ~unlabelled], e[:, ~unlabelled])


def test_one_teacher_and_bad_kind():
    w = per_sample_weights(torch.randn(1, 4, 3), torch.tensor([1.0]), "correctness", torch.tensor([0, 1, 2, -1]))
    torch.testing.assert_close(w, torch.ones(1, 4))
    with pytest.raises(ValueError, match="is not one of"):
        per_sample_weights(torch.randn(2, 4, 3), torch.tensor([0.5, 0.5]), "votes")


def test_the_ensemble_takes_per_row_weights_and_static_rows_give_the_per_teacher_mixture():
    from kd_ops.losses import ensemble_probs

    torch.manual_seed(1)
    logits = torch.randn(2, 4, 3)
    static = torch.tensor([0.25, 0.75])
    torch.testing.assert_close(ensemble_probs(logits, static[:, None].expand(2, 4), 2.0),
                               ensemble_probs(logits, static, 2.0))
    w = torch.tensor([[1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 0.5, 0.8]])
    p = ensemble_probs(logits, w, 2.0)
    for b in range(4):  # row by row: sum_m w[m, b] softmax(z[m, b] / T)
        want = sum(w[m, b] * torch.softmax(logits[m, b] / 2.0, -1) for m in range(2))
        torch.testing.assert_close(p[b], want)


def test_the_students_loss_mixes_the_teachers_per_row_when_the_method_says_so():
    from kd_ops import losses
    from kd_ops.method_loss import Distill, student_loss

    # row 0 labelled 0: teacher 0 right, teacher 1 wrong; row 1 unlabelled
    t = torch.tensor([[[3.0, 0.0], [1.0, 0.0]], [[0.0, 3.0], [0.0, 0.5]]])
    s, y, static = torch.tensor([[0.5, 0.1], [0.2, 0.3]]), torch.tensor([0, -1]), torch.tensor([0.5, 0.5])
    plain, _ = student_loss(s, t, y, static, Distill((0.5, 0.5), temperature=2.0, alpha=1.0))
    ca, _ = student_loss(s, t, y, static, Distill((0.5, 0.5), temperature=2.0, alpha=1.0, teacher_weighting="correctness"))
    w = per_sample_weights(t, static, "correctness", y)
    assert w[0, 0] > 0.5 > w[1, 0]  # the right teacher counts more on the labelled row
    p = torch.stack([w[0, b] * torch.softmax(t[0, b] / 2, -1) + w[1, b] * torch.softmax(t[1, b] / 2, -1) for b in range(2)])
    torch.testing.assert_close(ca, losses.hinton_kd_loss(s, p, 2.0))
    assert not torch.isclose(ca, plain)
    with pytest.raises(ValueError, match="teacher_weighting must be one of"):
        Distill((0.5, 0.5), temperature=2.0, alpha=1.0, teacher_weighting="votes")
