"""The RLP objective: a thought is rewarded by the information gain it gives the next true tokens
over an exponential moving average (EMA) of the model that does not think.

RLP ("Reinforcement as a Pretraining Objective", Hatamizadeh et al., arXiv 2510.01265) on the
parallel rollout: at position j, rationale p, the reward is

    r[p, j] = sum_t log p_theta(x[j+1+t] | x[..j], thought, x[j+1..j+t])
                    - log p_phi(x[j+1+t] | x[..j+t])

(the paper's eq. 5; T = n_ahead_talk = 1 is the paper's single next token), where phi is the EMA
of the parameters and p_phi reads no thought. The advantage is group-relative over the P
rationales of a position with the paper's G / (G - 1) correction (eq. 7), and the update is the
clipped surrogate on the thought tokens only (eq. 8). The rewards and advantages carry no
gradient: only the thought tokens' log-probs do, and there is no next-token loss unless
`rlp_nll_weight` asks for one. One update per sampled batch, as the paper's Algorithm 1: the
importance ratio is then 1 in value (its gradient is the score function).

Shapes: B batch, P rationales (the paper's group of G), T talk offsets, L positions,
J = L - T rewarded positions (every position whose T targets exist), M sampled thought tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qstar_jax.errors import ConfigError
from qstar_jax.model import Params
from qstar_jax.objective import (
    label_mask,
    masked_mean,
    next_token_losses,
    no_thought_loss,
    rollout_metrics,
)
from qstar_jax.rollout import rollout, shifted
from qstar_jax.thoughts import QuietStarConfig, token_logprob

# The surrogate's clip range (1 - CLIP_LOW, 1 + CLIP_HIGH): PPO's and GRPO's 0.2 (the paper does
# not state its own).
CLIP_LOW = CLIP_HIGH = 0.2


def ema_update(ema: Params, params: Params, decay: float) -> Params:
    """phi <- decay * phi + (1 - decay) * theta, leaf by leaf in phi's dtype."""
    return jax.tree.map(lambda e, p: (decay * e + (1 - decay) * p).astype(e.dtype), ema, params)


def no_think_logprobs(ema_params: Params, tokens_BL: jax.Array, mask_BL: jax.Array,
                      cfg: QuietStarConfig) -> jax.Array:
    """log p_phi(x[j+1] | x[..j]) [B, L] of the EMA model without thoughts (0 past the end), with
    no gradient."""
    ro = rollout(ema_params, tokens_BL, mask_BL, jax.random.key(0), cfg.replace(n_ahead=1))
    return jax.lax.stop_gradient(token_logprob(ro.base_logits, shifted(tokens_BL, 1)))


def information_gain(talk_logprobs_BPTL: jax.Array, ema_logprobs_BL: jax.Array,
                     valid_BTL: jax.Array) -> jax.Array:
    """Rewards [B, P, J]: the thought's log-likelihood of the next T true tokens minus the EMA
    model's, summed over the T offsets whose label counts."""
    t_talk, length = talk_logprobs_BPTL.shape[2:]
    j = length - t_talk
    gain_BPTJ = jnp.stack([
        jnp.where(valid_BTL[:, None, t, :j],
                  talk_logprobs_BPTL[:, :, t, :j] - ema_logprobs_BL[:, None, t:t + j], 0.0)
        for t in range(t_talk)], 2)
    return jnp.sum(gain_BPTJ, axis=2)


def group_advantages(reward_BPJ: jax.Array) -> jax.Array:
    """A = G / (G - 1) * (r - mean r) over the G = P rationales of each position, detached."""
    g = reward_BPJ.shape[1]
    if g < 2:
        raise ConfigError(f"objective='rlp' with n_passes={g}: the advantage compares the "
                          "rationales of a position, so it needs n_passes >= 2")
    advantage = g / (g - 1) * (reward_BPJ - jnp.mean(reward_BPJ, axis=1, keepdims=True))
    return jax.lax.stop_gradient(advantage)


def clipped_surrogate(logprob_BPJM: jax.Array, behaviour_BPJM: jax.Array,
                      advantage_BPJ: jax.Array, clip_low: float = CLIP_LOW,
                      clip_high: float = CLIP_HIGH) -> jax.Array:
    """Per-thought losses [B, P, J] of eq. 8, -1/M sum_u min(rho A, clip(rho) A), with
    rho = exp(log pi - log pi_behaviour) per thought token."""
    ratio = jnp.exp(logprob_BPJM - behaviour_BPJM)
    a = advantage_BPJ[..., None]
    clipped = jnp.clip(ratio, 1 - clip_low, 1 + clip_high)
    return -jnp.mean(jnp.minimum(ratio * a, clipped * a), axis=-1)


def rlp_loss(params: Params, batch: dict, rng: jax.Array, cfg: QuietStarConfig,
             thought_tokens: jax.Array | None = None, *, ema_params: Params
             ) -> tuple[jax.Array, dict]:
    """Loss and named scalar metrics for a batch {"tokens": int32 [B, L], "mask": bool [B, L]};
    `ema_params` is the no-think baseline. The mean is over every position whose next token
    counts, and over its P rationales (the paper's 1 / (B G) sum)."""
    if not cfg.thinks:
        return no_thought_loss(params, batch, cfg)
    tokens_BL = batch["tokens"]
    mask_BL = label_mask(batch, cfg)
    ro = rollout(params, tokens_BL, mask_BL, rng, cfg, thought_tokens)
    ce = next_token_losses(ro, tokens_BL, mask_BL, cfg)
    ema_BL = no_think_logprobs(ema_params, tokens_BL, mask_BL, cfg)
    reward_BPJ = information_gain(jax.lax.stop_gradient(ro.talk_logprobs), ema_BL, ce.valid_BTL)
    advantage_BPJ = group_advantages(reward_BPJ)
    j = reward_BPJ.shape[-1]
    logprob_BPJM = ro.thought_logprobs[:, :, :j]
    # The thoughts were drawn by these parameters: the behaviour policy is the policy itself.
    loss_BPJ = clipped_surrogate(logprob_BPJM, jax.lax.stop_gradient(logprob_BPJM), advantage_BPJ)
    counts_BPJ = jnp.broadcast_to(ce.valid_BTL[:, None, 0, :j], reward_BPJ.shape)  # x[j+1] counts
    mean = lambda x_BPJ: masked_mean(x_BPJ, counts_BPJ)  # noqa: E731
    policy_loss = mean(loss_BPJ)
    loss = policy_loss + cfg.rlp_nll_weight * ce.nll if cfg.rlp_nll_weight else policy_loss
    return loss, dict(
        loss_base=ce.loss_base, loss=loss, nll=ce.nll, loss_talk=jnp.mean(ce.loss_talk_T),
        policy_loss=policy_loss, reward_mean=mean(reward_BPJ),
        advantage_mean=mean(advantage_BPJ), advantage_positive=mean(advantage_BPJ > 0),
        loss_ema=-masked_mean(ema_BL, ce.valid_BTL[:, 0]),
        **rollout_metrics(ro, cfg),
        **{f"loss_talk_{t}": ce.loss_talk_T[t] for t in range(cfg.n_ahead_talk)},
    )
