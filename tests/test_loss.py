"""The SOUP loss against hand-computed values, an independent GRPO loss, and ratio identities."""

import math

import pytest
import torch

from soup_megatron.algo.advantage import group_advantages
from soup_megatron.algo.loss import (
    LossConfig,
    LossScale,
    advantage_weights,
    aggregation_weights,
    loss_mask,
    policy_token_loss,
    soup_loss,
)
from soup_megatron.algo.stats import segment_stats
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
    loss, _ = policy_token_loss(LOGP, OLD, BEH, ADV, SEG, cfg)
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
    loss, tok = policy_token_loss(LOGP, OLD, BEH, torch.tensor([-1.0]), SEG, cfg)
    assert loss[0, 3].item() == pytest.approx(0.8)  # r = 0.8 within range: -min(-0.8, -0.8)
    assert loss[0, 4].item() == pytest.approx(1.5)  # r = 1.5: -min(-1.5, -1.2) = 1.5, not clipped
    assert not tok["clipped"][0, 4] and tok["ratio_out"][0, 4]  # out of [0.8, 1.2], yet the unclipped branch
    assert not tok["ratio_out"][0, 3]


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
        _, tok = policy_token_loss(logp, logp.clone(), logp.clone(), torch.randn(3), seg, LossConfig(prefix_mode=mode))
        trained = seg > 0
        assert torch.equal(tok["ratio"][trained], torch.ones_like(tok["ratio"][trained]))
        assert not tok["clipped"].any() and not tok["ratio_out"].any()


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
    _, tok = policy_token_loss(LOGP, OLD, BEH, ADV, SEG, LossConfig(prefix_mode="mask"))
    assert not tok["clipped"][SEG == P].any() and not tok["ratio_out"][SEG == P].any()


def mechanism_stats(ratios, advantages, segment, **loss):
    """segment_stats of one update whose pi_theta / pi_old (= pi_theta / pi_h on the prefix) are `ratios`."""
    cfg = LossConfig(**loss)
    old = torch.zeros_like(ratios)
    _, tok = policy_token_loss(torch.log(ratios), old, old, advantages, segment, cfg)
    weight = advantage_weights(advantages, segment, cfg, LossScale.of(segment, cfg.prefix_mode))
    return segment_stats(segment.flatten(), *(tok[k].flatten() for k in ("ratio", "clipped", "ratio_out")),
                         torch.zeros(segment.numel()), weight.flatten())


def test_clip_adv_mass_weighs_clipped_tokens_by_their_advantage():
    # four continuation tokens with |A| 1, 1, 3, 3; the two with A = 3 have r > 1.2 and are clipped
    stats = mechanism_stats(torch.tensor([[1.0, 1.1], [1.5, 1.3]]), torch.tensor([1.0, 3.0]), torch.full((2, 2), C))
    assert stats["continuation/clip_frac"] == 0.5 and stats["continuation/ratio_out_frac"] == 0.5
    assert stats["continuation/clip_adv_mass"] == pytest.approx(0.75)  # (3 + 3) / (1 + 1 + 3 + 3)
    assert stats["prefix/tokens"] == 0 and not any(k.startswith("prefix/") and k != "prefix/tokens" for k in stats)


def test_ratio_out_frac_also_counts_ratios_the_min_left_unclipped():
    # A < 0: r = 1.5 leaves [0.8, 1.2] but -min(1.5 A, 1.2 A) takes the unclipped branch; r = 0.5 is clipped
    stats = mechanism_stats(torch.tensor([[1.5, 0.5, 1.0, 1.0]]), torch.tensor([-2.0]), torch.full((1, 4), C))
    assert stats["continuation/ratio_out_frac"] == 0.5
    assert stats["continuation/clip_frac"] == 0.25 and stats["continuation/clip_adv_mass"] == 0.25


@pytest.mark.parametrize("loss_agg,expected", [("token_mean", 3 / 7), ("seq_mean_token_mean", 0.375)])
def test_clip_adv_mass_follows_the_aggregation_weights(loss_agg, expected):
    # row 0: one token, A = 1; row 1: two tokens, A = 3, the first clipped. Per sequence, row 0's token weighs
    # 1/2 and row 1's 1/4 each: 0.75 / (0.5 + 2 * 0.75) = 0.375; per token all weigh 1/3: 3 / (1 + 3 + 3)
    stats = mechanism_stats(torch.tensor([[1.0, 1.0], [1.5, 1.0]]), torch.tensor([1.0, 3.0]),
                            torch.tensor([[C, Q], [C, C]]), loss_agg=loss_agg)
    assert stats["continuation/clip_adv_mass"] == pytest.approx(expected)


def test_prefix_tokens_have_their_own_clip_range_and_a_masked_prefix_loses_no_gradient():
    ratios, seg = torch.tensor([[1.3, 1.3, 1.3]]), torch.tensor([[P, P, C]])
    stats = mechanism_stats(ratios, ADV, seg, prefix_clip=0.5)  # prefix range [0.5, 1.5], continuation [0.8, 1.2]
    assert stats["prefix/ratio_out_frac"] == stats["prefix/clip_adv_mass"] == 0.0
    assert stats["continuation/ratio_out_frac"] == stats["continuation/clip_adv_mass"] == 1.0
    masked = mechanism_stats(ratios, ADV, seg, prefix_mode="mask")
    assert masked["prefix/clip_frac"] == masked["prefix/ratio_out_frac"] == 0.0 and "prefix/clip_adv_mass" not in masked
