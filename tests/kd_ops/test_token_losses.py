import math

import pytest
import torch

from kd_ops import token_losses as tl

KINDS = ["forward_kl", "reverse_kl", "jsd"]


def _logits(seed, shape=(2, 5, 11)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_topk_with_k_equal_vocab_equals_full_logits(kind, tail, T):
    t, s = _logits(0), _logits(1)
    mask = torch.ones(2, 5)
    v, i, lse = tl.topk_support(t, t.shape[-1])
    sparse = tl.token_kd_loss(s, v, i, lse, mask, kind=kind, temperature=T, tail=tail)
    full = tl.token_kd_loss(s, *tl.full_support(t), mask, kind=kind, temperature=T, tail=tail)
    # reference: the divergence between the full softmax distributions, written out directly
    lp, lq = torch.log_softmax(t / T, -1), torch.log_softmax(s / T, -1)
    ref = T**2 * tl.divergence(lp, lq, kind).sum()
    assert sparse.item() == pytest.approx(full.item(), rel=1e-5)
    assert full.item() == pytest.approx(ref.item(), rel=1e-4)


@pytest.mark.parametrize("T", [1.0, 0.5, 3.0])
def test_tail_bucket_makes_teacher_sum_to_one(T):
    t = _logits(2)
    v, _, lse = tl.topk_support(t, 4)
    p = tl.teacher_log_probs(v, lse, T, tail=True).exp()
    assert p.shape[-1] == 5
    assert torch.allclose(p.sum(-1), torch.ones(2, 5), atol=1e-6)


def test_tail_bucket_at_t1_is_exact_mass_outside_topk():
    t = _logits(3)
    v, i, lse = tl.topk_support(t, 3)
    p = tl.teacher_log_probs(v, lse, 1.0, tail=True).exp()
    full = torch.softmax(t, -1)
    assert torch.allclose(p[..., :3], torch.gather(full, -1, i), atol=1e-6)
    assert torch.allclose(p[..., 3], 1 - torch.gather(full, -1, i).sum(-1), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [3, 11])
def test_each_divergence_is_zero_when_student_equals_teacher(kind, k):
    t = _logits(4)
    v, i, lse = tl.topk_support(t, k)
    for tail in (True, False):
        loss = tl.token_kd_loss(t.clone(), v, i, lse, torch.ones(2, 5), kind=kind, temperature=2.0, tail=tail)
        assert loss.item() == pytest.approx(0.0, abs=1e-5)


def test_forward_kl_hand_computed_on_two_buckets():
    lp = torch.log(torch.tensor([0.75, 0.25]))
    lq = torch.log(torch.tensor([0.5, 0.5]))
    assert tl.divergence(lp, lq, "forward_kl").item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert tl.divergence(lp, lq, "reverse_kl").item() == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2.0))
    m = [0.625, 0.375]
    jsd = 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])) + 0.5 * (
        0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    assert tl.divergence(lp, lq, "jsd", 0.5).item() == pytest.approx(jsd)


def test_mask_excludes_tokens_and_loss_is_a_sum():
    t, s = _logits(5), _logits(6)
    v, i, lse = tl.topk_support(t, 4)
    mask = torch.zeros(2, 5)
    mask[0, :2] = 1
    part = tl.token_kd_loss(s, v, i, lse, mask)
    one = tl.token_kd_loss(s[:1, :1], v[:1, :1], i[:1, :1], lse[:1, :1], torch.ones(1, 1))
    two = tl.token_kd_loss(s[:1, 1:2], v[:1, 1:2], i[:1, 1:2], lse[:1, 1:2], torch.ones(1, 1))
    assert part.item() == pytest.approx(one.item() + two.item(), rel=1e-5)


def test_next_token_ce_matches_cross_entropy():
    s = _logits(7)
    ids = torch.randint(0, 11, (2, 5))
    mask = torch.ones(2, 5)
    ref = torch.nn.functional.cross_entropy(s[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1), reduction="sum")
    assert tl.next_token_ce_sum(s, ids, mask).item() == pytest.approx(ref.item(), rel=1e-5)


def test_bad_arguments_are_rejected():
    t = _logits(8)
    with pytest.raises(ValueError, match="k=12 is larger than the vocabulary \\(11\\)"):
        tl.topk_support(t, 12)
    with pytest.raises(ValueError, match="jsd beta"):
        tl.divergence(torch.zeros(2), torch.zeros(2), "jsd", beta=1.0)


def _sampled(t, k, m, seed=0):
    v, i, lse = tl.topk_support(t, k)
    tv, ti = tl.sample_tail(t, i, m, torch.Generator().manual_seed(seed))
    return v, i, lse, tv, ti


def test_tail_samples_come_from_outside_the_topk_in_proportion_to_teacher_mass():
    t = _logits(5, (1, 1, 11))
    v, i, lse, tv, ti = _sampled(t, 3, 200_000)
    assert not torch.isin(ti, i).any()
    assert torch.equal(tv, torch.gather(t, -1, ti))
    p = torch.softmax(t, -1)[0, 0]
    tail = torch.ones(11, dtype=torch.bool)
    tail[i[0, 0]] = False
    freq = torch.bincount(ti.flatten(), minlength=11).float() / ti.numel()
    assert torch.allclose(freq[tail], p[tail] / p[tail].sum(), atol=3e-3)


def test_sampled_tail_weights_sum_to_one_and_are_exact():
    t = _logits(6)
    v, i, lse, tv, ti = _sampled(t, 4, 8)
    log_w, lp = tl.sampled_teacher(v, lse, tv)
    assert torch.allclose(log_w.exp().sum(-1), torch.ones(2, 5), atol=1e-6)
    full = torch.softmax(t, -1)
    top = torch.gather(full, -1, i)
    assert torch.allclose(log_w[..., :4].exp(), top, atol=1e-6)
    assert torch.allclose(log_w[..., 4:].exp(), ((1 - top.sum(-1)) / 8).unsqueeze(-1).expand(-1, -1, 8), atol=1e-6)
    assert torch.allclose(lp, torch.log(torch.gather(full, -1, torch.cat([i, ti], -1))), atol=1e-5)


def test_sampled_forward_kl_is_zero_for_the_teacher_and_unbiased_for_the_full_kl():
    t, s = _logits(7), _logits(8)
    mask = torch.ones(2, 5)
    v, i, lse, tv, ti = _sampled(t, 3, 8)
    assert tl.token_kd_loss(t.clone(), v, i, lse, mask, tail_values=tv, tail_indices=ti).item() == pytest.approx(0.0, abs=1e-5)
    full = tl.token_kd_loss(s, *tl.full_support(t), mask, tail=False)
    # many independent draws of m = 8: their mean estimates the full-vocabulary KL and its gradient
    s = s.clone().requires_grad_()
    g_full = torch.autograd.grad(tl.token_kd_loss(s, *tl.full_support(t), mask, tail=False), s)[0]
    g_bucket = torch.autograd.grad(tl.token_kd_loss(s, v, i, lse, mask), s)[0]
    v, i, lse, tv, ti = _sampled(t.repeat(400, 1, 1), 3, 8, seed=1)
    est = tl.token_kd_loss(s.repeat(400, 1, 1), v, i, lse, torch.ones(800, 5), tail_values=tv, tail_indices=ti) / 400
    g_est = torch.autograd.grad(est, s)[0]
    assert est.item() == pytest.approx(full.item(), rel=0.02)
    err_est, err_bucket = (g_est - g_full).abs().max().item(), (g_bucket - g_full).abs().max().item()
    assert err_est < 0.02 * g_full.abs().max().item()
    assert err_bucket > 3 * err_est  # the bucket alone cannot shape the tail


def test_without_tail_at_t_not_1_or_for_other_divergences_the_samples_are_not_used():
    t, s = _logits(9), _logits(10)
    v, i, lse, tv, ti = _sampled(t, 3, 8)
    mask = torch.ones(2, 5)
    for kind in ("reverse_kl", "jsd"):
        assert tl.token_kd_loss(s, v, i, lse, mask, kind=kind, tail_values=tv, tail_indices=ti).item() == \
            pytest.approx(tl.token_kd_loss(s, v, i, lse, mask, kind=kind).item())
    assert tl.token_kd_loss(s, v, i, lse, mask, tail=False, tail_values=tv, tail_indices=ti).item() == \
        pytest.approx(tl.token_kd_loss(s, v, i, lse, mask, tail=False).item())
    assert tl.token_kd_loss(s, v, i, lse, mask, temperature=2.0, tail_values=tv, tail_indices=ti).item() == \
        pytest.approx(tl.token_kd_loss(s, v, i, lse, mask, temperature=2.0).item())
