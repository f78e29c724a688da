"""The SOUP loss against hand-computed values, an independent GRPO loss, and ratio identities."""

import math

import pytest
import torch

from soup_megatron.algo.advantage import group_advantages
from soup_megatron.algo.loss import LossConfig, aggregation_weights, loss_mask, policy_token_loss, soup_loss
from soup_megatron.sample import CONTINUATION as C
from soup_megatron.sample import PREFIX as P
from soup_megatron.sample import PROMPT as Q

# one sample: a prompt column, two prefix tokens, two continuation tokens
SEG = torch.tensor([[Q, P, P, C, C]])
LOGP = torch.log(torch.tensor([[0.5, 0.6, 0.3, 0.4, 0.9]]))
OLD = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.6]]))  # pi_old
BEH = torch.log(torch.tensor([[0.5, 0.4, 0.2, 0.5, 0.6]]))  # pi_h on the prefix, = pi_old on the continuation
ADV = torch.tensor([1.0])


def hand_ppo(r, a, lo=0.2, hi=0.2):
    return -min(r * a, min(max(r, 1 - lo), 1 + hi) * a)


def per_token(mode, **kw):
    cfg = LossConfig(prefix_mode=mode, **kw)
    loss, _, _ = policy_token_loss(LOGP, OLD, BEH, ADV, SEG, cfg)
    return loss[0].tolist()


def test_continuation_tokens_use_ppo_clip_on_pi_old():
    # r = 0.4/0.5 = 0.8 (inside the range), r = 0.9/0.6 = 1.5 (clipped at 1.2 for A > 0)
    got = per_token("mask")
    assert got[3] == pytest.approx(-0.8)
    assert got[4] == pytest.approx(-1.2)
    assert got[0] == 0.0  # prompt column


def test_prefix_clip_mode_uses_behaviour_ratio_and_own_clip():
    got = per_token("clip")
    assert got[1] == pytest.approx(hand_ppo(0.6 / 0.4, 1.0))  # 1.5 -> clipped to 1.2
    assert got[2] == pytest.approx(hand_ppo(0.3 / 0.2, 1.0))
    got = per_token("clip", prefix_clip=0.6)
    assert got[1] == pytest.approx(-1.5)  # 1.5 is inside [0.4, 1.6]
    assert got[2] == pytest.approx(-1.5)


def test_prefix_decoupled_mode():
    # r = pi_theta/pi_old, weight = min(pi_old/pi_h, cap)
    got = per_token("decoupled", is_cap=2.0)
    assert got[1] == pytest.approx(min(0.5 / 0.4, 2.0) * hand_ppo(0.6 / 0.5, 1.0))
    assert got[2] == pytest.approx(min(0.5 / 0.2, 2.0) * hand_ppo(0.3 / 0.5, 1.0))  # weight capped at 2


def test_prefix_shaped_mode():
    got = per_token("shaped", shaping_gamma=0.1)
    r1, r2 = 0.6 / 0.4, 0.3 / 0.2
    assert got[1] == pytest.approx(-r1 / (r1 + 0.1))
    assert got[2] == pytest.approx(-r2 / (r2 + 0.1))


def test_mask_mode_drops_prefix_from_loss_and_count():
    mask = loss_mask(SEG, "mask")
    assert mask.tolist() == [[0, 0, 0, 1, 1]]
    assert loss_mask(SEG, "clip").tolist() == [[0, 1, 1, 1, 1]]


def test_negative_advantage_clips_from_below():
    cfg = LossConfig(prefix_mode="mask")
    loss, _, clipped = policy_token_loss(LOGP, OLD, BEH, torch.tensor([-1.0]), SEG, cfg)
    assert loss[0, 3].item() == pytest.approx(0.8)  # r = 0.8 within range: -min(-0.8, -0.8)
    assert loss[0, 4].item() == pytest.approx(1.5)  # r = 1.5: -min(-1.5, -1.2) = 1.5, not clipped
    assert not clipped[0, 4]


def two_samples():
    seg = torch.tensor([[P, C, C, Q], [C, C, C, C]])
    token_loss = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 6.0, 7.0]])
    return seg, token_loss


@pytest.mark.parametrize("agg,expected", [
    ("token_mean", (1 + 2 + 3 + 4 + 5 + 6 + 7) / 7),
    ("seq_mean_token_mean", ((1 + 2 + 3) / 3 + (4 + 5 + 6 + 7) / 4) / 2),
    ("seq_mean_token_sum", ((1 + 2 + 3) + (4 + 5 + 6 + 7)) / 2),
])
def test_aggregations(agg, expected):
    seg, token_loss = two_samples()
    mask = loss_mask(seg, "clip")
    w = aggregation_weights(mask, agg, num_seqs=2, num_tokens=float(mask.sum()))
    assert float((token_loss * w).sum()) == pytest.approx(expected)


def test_aggregation_is_exact_across_microbatches():
    seg, token_loss = two_samples()
    mask = loss_mask(seg, "mask")
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"):
        whole = float((token_loss * aggregation_weights(mask, agg, 2, float(mask.sum()))).sum())
        parts = sum(float((token_loss[i:i + 1] * aggregation_weights(mask[i:i + 1], agg, 2, float(mask.sum()))).sum())
                    for i in range(2))
        assert parts == pytest.approx(whole)


def test_ratios_are_exactly_one_when_policies_coincide():
    logp = torch.log(torch.rand(3, 6) * 0.9 + 0.05)
    seg = torch.tensor([[Q, P, P, C, C, C]] * 3)
    for mode in ("clip", "decoupled", "shaped"):
        _, ratio, clipped = policy_token_loss(logp, logp.clone(), logp.clone(), torch.randn(3), seg,
                                              LossConfig(prefix_mode=mode))
        trained = seg > 0
        assert torch.equal(ratio[trained], torch.ones_like(ratio[trained]))
        assert not clipped.any()


def independent_grpo_loss(rewards, logps, olds, group_size, eps_lo=0.2, eps_hi=0.2):
    """Plain GRPO with token-mean aggregation, written with Python loops and no project code."""
    advantages = []
    for g in range(0, len(rewards), group_size):
        group = rewards[g:g + group_size]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / len(group))
        advantages += [(r - mean) / (std + 1e-6) for r in group]
    total, count = 0.0, 0
    for a, lp, old in zip(advantages, logps, olds):
        for x, y in zip(lp, old):
            r = math.exp(x - y)
            total += -min(r * a, min(max(r, 1 - eps_lo), 1 + eps_hi) * a)
            count += 1
    return total / count


def test_mix_fraction_zero_is_grpo():
    torch.manual_seed(0)
    group_size, lengths = 4, [3, 5, 2, 4, 4, 1, 5, 3]
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    width = max(lengths)
    seg = torch.full((8, width), Q)
    logp = torch.log(torch.rand(8, width) * 0.9 + 0.05)
    old = torch.log(torch.rand(8, width) * 0.9 + 0.05)
    for i, n in enumerate(lengths):
        seg[i, :n] = C  # no sample is mixed: every response token is on-policy
    adv = group_advantages(torch.tensor(rewards), group_size)
    mask = loss_mask(seg, "clip")
    w = aggregation_weights(mask, "token_mean", 8, float(mask.sum()))
    loss, _ = soup_loss(logp, old, old, adv, seg, w, LossConfig())
    expected = independent_grpo_loss(rewards, [logp[i, :n].tolist() for i, n in enumerate(lengths)],
                                     [old[i, :n].tolist() for i, n in enumerate(lengths)], group_size)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_kl_and_entropy_terms():
    seg = torch.tensor([[C, C]])
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    ent = torch.tensor([[1.0, 3.0]])
    w = aggregation_weights(loss_mask(seg, "clip"), "token_mean", 1, 2.0)
    base, _ = soup_loss(logp, logp, logp, torch.tensor([0.0]), seg, w, LossConfig())
    with_terms, _ = soup_loss(logp, logp, logp, torch.tensor([0.0]), seg, w,
                              LossConfig(kl_coef=0.5, entropy_coef=0.1), entropy=ent, ref_logp=ref)
    k3 = (0.5 - math.log(0.5) - 1.0 + 0.0) / 2  # token 1: ref/p = 0.5; token 2: ref = p gives 0
    assert float(with_terms - base) == pytest.approx(0.5 * k3 - 0.1 * 2.0)
    with pytest.raises(ValueError, match="reference"):
        soup_loss(logp, logp, logp, torch.tensor([0.0]), seg, w, LossConfig(kl_coef=0.5))


def test_group_advantages():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0]), 3)
    assert adv[:3].tolist() == pytest.approx([math.sqrt(2), -1 / math.sqrt(2), -1 / math.sqrt(2)], rel=1e-5)
    assert adv[3:].tolist() == [0.0, 0.0, 0.0]  # a group with equal rewards teaches nothing
    assert group_advantages(torch.tensor([1.0, 0.0]), 2, "none").tolist() == [0.5, -0.5]
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([1.0, 0.0, 1.0]), 2)


def test_kl_ignores_untrained_columns_with_extreme_logprobs():
    seg = torch.tensor([[C, C, Q]])
    logp = torch.tensor([[-0.5, -1.0, -200.0]], requires_grad=True)  # a padding column
    ref = torch.tensor([[-0.6, -1.0, 0.0]])
    w = aggregation_weights(loss_mask(seg, "clip"), "token_mean", 1, 2.0)
    loss, _ = soup_loss(logp, logp.detach(), logp.detach(), torch.tensor([1.0]), seg, w,
                        LossConfig(kl_coef=1.0), ref_logp=ref)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert logp.grad[0, 2] == 0


def test_mask_mode_reports_no_prefix_clipping():
    _, _, clipped = policy_token_loss(LOGP, OLD, BEH, ADV, SEG, LossConfig(prefix_mode="mask"))
    assert not clipped[SEG == P].any()
