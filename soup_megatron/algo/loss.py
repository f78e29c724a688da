"""The SOUP token-ratio loss (spec steps 9-10), pure torch and backend-free.

Per response token t of sample i with advantage A_i, mask m_t and aggregation weight w_t:

    L = sum_t w_t * m_t * l_t  (+ kl_coef * KL_t - entropy_coef * H_t, same weights)

continuation tokens (written by pi_old):
    r_t = pi_theta / pi_old,  l_t = -min(r_t A, clip(r_t, 1 - eps_lo, 1 + eps_hi) A)
prefix tokens (written by a historical pi_h), by `prefix_mode`:
    clip       r_t = pi_theta / pi_h,  l_t = -min(r_t A, clip(r_t, 1 - c_lo, 1 + c_hi) A)   c = prefix_clip or eps
    decoupled  r_t = pi_theta / pi_old, l_t = -min(pi_old / pi_h, is_cap) * min(r_t A, clip(r_t, 1-eps_lo, 1+eps_hi) A)
    shaped     r_t = pi_theta / pi_h,  l_t = -r_t / (r_t + gamma) * A          (no clipping)
    mask       m_t = 0 (no gradient, not counted)
With a rollout correction (`algo.rollout_correction`, see rollout_correction.py) a continuation token's
l_t is multiplied by its constant weight c_t. A row with no trained token (an overlong response under
`algo.overlong_filter`, filler rows) has m_t = 0 everywhere: no loss, and it is not counted.

Aggregation weights make a mean over *all* microbatches and ranks exact: they take global counts
(`LossScale`: the sequences and trained tokens of the whole optimizer update, including rows an actor
never sees because their loss is identically zero).
    token_mean            w_t = 1 / (number of trained tokens)
    seq_mean_token_mean   w_t = 1 / (number of sequences * trained tokens of t's sequence)
    seq_mean_token_sum    w_t = 1 / (number of sequences)
KL is the k3 estimator against a reference policy: exp(ref - logp) - (ref - logp) - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sample import CONTINUATION, PREFIX


@dataclass(frozen=True)
class LossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.2
    prefix_mode: str = "clip"
    prefix_clip: float | None = None
    is_cap: float = 2.0
    shaping_gamma: float = 0.1
    loss_agg: str = "token_mean"
    kl_coef: float = 0.0
    entropy_coef: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> "LossConfig":
        return cls(cfg.algo.clip_low, cfg.algo.clip_high, cfg.soup.prefix_mode, cfg.soup.prefix_clip,
                   cfg.soup.is_cap, cfg.soup.shaping_gamma, cfg.algo.loss_agg, cfg.algo.kl_coef,
                   cfg.algo.entropy_coef)


def loss_mask(segment: torch.Tensor, prefix_mode: str) -> torch.Tensor:
    """1.0 where a token is trained: continuation tokens always, prefix tokens unless masked."""
    trained = segment == CONTINUATION
    if prefix_mode != "mask":
        trained = trained | (segment == PREFIX)
    return trained.float()


@dataclass(frozen=True)
class LossScale:
    """The counts an optimizer update's aggregation weights divide by."""

    sequences: int
    tokens: float

    @classmethod
    def of(cls, segment: torch.Tensor, prefix_mode: str) -> "LossScale":
        """Of the update whose samples' segment tags are `segment` [N, T-1]."""
        mask = loss_mask(segment, prefix_mode)
        return cls(int((mask.sum(-1) > 0).sum()), float(mask.sum()))


def zero_loss_rows(advantages: torch.Tensor, segment: torch.Tensor, cfg: "LossConfig") -> torch.Tensor:
    """[N] True where a sample's loss and gradient are exactly zero whatever the weights: it has no trained
    token, or A_i = 0 (every policy term is a multiple of A_i, in each prefix_mode) and no KL or entropy term."""
    untrained = loss_mask(segment, cfg.prefix_mode).sum(-1) == 0
    if cfg.kl_coef > 0 or cfg.entropy_coef > 0:
        return untrained
    return untrained | (advantages == 0)


def aggregation_weights(mask: torch.Tensor, loss_agg: str, num_seqs: int, num_tokens: float) -> torch.Tensor:
    """Per-token weights w_t (see module docstring). `num_seqs`/`num_tokens` are global counts."""
    if loss_agg == "token_mean":
        return mask / max(num_tokens, 1.0)
    if loss_agg == "seq_mean_token_mean":
        return mask / (mask.sum(-1, keepdim=True).clamp(min=1.0) * num_seqs)
    if loss_agg == "seq_mean_token_sum":
        return mask / num_seqs
    raise ValueError(f"unknown loss_agg {loss_agg!r}")


def advantage_weights(advantages: torch.Tensor, segment: torch.Tensor, cfg: LossConfig, scale: LossScale
                      ) -> torch.Tensor:
    """|A_i| * w_t per token [N, T-1]: a token's weight in the policy gradient before its ratio, clipping and
    corrections (0 where it is not trained)."""
    weights = aggregation_weights(loss_mask(segment, cfg.prefix_mode), cfg.loss_agg, scale.sequences, scale.tokens)
    return advantages.abs()[:, None] * weights


def _clipped_pg(ratio, adv, lo, hi):
    """-min(r A, clip(r) A); whether the min took the clipped branch (no gradient); whether r left [1-lo, 1+hi]."""
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - lo, 1.0 + hi) * adv
    return -torch.minimum(unclipped, clipped), clipped < unclipped, (ratio < 1.0 - lo) | (ratio > 1.0 + hi)


def policy_token_loss(logp, old_logp, behaviour_logp, advantages, segment, cfg: LossConfig, correction=None):
    """Per-token loss l_t and per-token stats: `ratio` (the r_t each token is judged by), `clipped` (the min took
    the clipped branch) and `ratio_out` (r_t outside its clip range; never for shaped prefix tokens, which have
    none). Shapes [N, T]; `advantages` is [N]; `correction` the rollout correction's c_t (None: 1). Tokens
    outside prefix/continuation get l_t = 0 and no flag."""
    adv = advantages[:, None].expand_as(logp)
    is_prefix = segment == PREFIX
    ratio_old = torch.exp(logp - old_logp)
    loss, clipped, ratio_out = _clipped_pg(ratio_old, adv, cfg.clip_low, cfg.clip_high)
    if correction is not None:
        loss = torch.where(segment == CONTINUATION, correction * loss, loss)
    ratio = ratio_old
    if cfg.prefix_mode in ("clip", "shaped"):
        ratio_behav = torch.exp(logp - behaviour_logp)
        ratio = torch.where(is_prefix, ratio_behav, ratio_old)
        if cfg.prefix_mode == "clip":
            pc = cfg.prefix_clip
            lo, hi = (cfg.clip_low, cfg.clip_high) if pc is None else (pc, pc)
            prefix_loss, prefix_clipped, prefix_out = _clipped_pg(ratio_behav, adv, lo, hi)
        else:
            prefix_loss = -(ratio_behav / (ratio_behav + cfg.shaping_gamma)) * adv
            prefix_clipped = prefix_out = torch.zeros_like(clipped)
        loss = torch.where(is_prefix, prefix_loss, loss)
        clipped = torch.where(is_prefix, prefix_clipped, clipped)
        ratio_out = torch.where(is_prefix, prefix_out, ratio_out)
    elif cfg.prefix_mode == "decoupled":
        behaviour_weight = torch.exp(old_logp - behaviour_logp).clamp(max=cfg.is_cap).detach()
        loss = torch.where(is_prefix, behaviour_weight * loss, loss)
    elif cfg.prefix_mode != "mask":
        raise ValueError(f"unknown prefix_mode {cfg.prefix_mode!r}")
    trained = loss_mask(segment, cfg.prefix_mode) > 0
    return (torch.where(trained, loss, torch.zeros_like(loss)),
            {"ratio": ratio, "clipped": clipped & trained, "ratio_out": ratio_out & trained})


def soup_loss(logp, old_logp, behaviour_logp, advantages, segment, weights, cfg: LossConfig,
              entropy=None, ref_logp=None, correction=None):
    """Scalar loss for one microbatch (sum over its tokens of weighted terms) and per-token stats."""
    token_loss, stats = policy_token_loss(logp, old_logp, behaviour_logp, advantages, segment, cfg, correction)
    total = token_loss
    if cfg.kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs reference log-probs")
        # only where a token is trained: padding columns hold arbitrary log-probs that could overflow exp
        log_ratio = torch.where(weights > 0, ref_logp - logp, torch.zeros_like(logp))
        total = total + cfg.kl_coef * (torch.exp(log_ratio) - log_ratio - 1.0)
    if cfg.entropy_coef > 0:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs per-token entropy")
        total = total - cfg.entropy_coef * entropy
    return (total * weights).sum(), {k: v.detach() for k, v in stats.items()}
