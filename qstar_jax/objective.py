"""The Quiet-STaR objective: NLL of the base and talk passes plus the REINFORCE term on thoughts
(and the next-token losses that RLP, `rlp.py`, shares).

Shapes: B batch, P rationales, T talk offsets, L positions, J = L - T - 1 rewarded positions,
M sampled thought tokens.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from qstar_jax.model import Params
from qstar_jax.rollout import Rollout, rollout, shifted
from qstar_jax.thoughts import QuietStarConfig, token_logprob


def masked_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
    """The mean of `x` where `valid` (0 where nothing is)."""
    return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def label_mask(batch: dict, cfg: QuietStarConfig) -> jax.Array:
    """Which tokens count [B, L]: `batch["mask"]`, else tokens != pad_id (the reference's rule)."""
    mask = batch.get("mask")
    return batch["tokens"] != cfg.pad_id if mask is None else mask.astype(bool)


def reinforce_terms(ce0_BL: jax.Array, ce_talk_BPTL: jax.Array, logprob_BPLM: jax.Array,
                    cfg: QuietStarConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rewards [B, P, J], detached advantages [B, P, J] and the policy loss (a scalar).

    The reward of chain j is the gain in log-likelihood of the next T true tokens over the base
    pass: r[j] = sum_t CE_0[j+t] - CE_talk_t[j] (ignored labels are 0 in both).
    """
    t_talk, length = ce_talk_BPTL.shape[2], ce_talk_BPTL.shape[3]
    j = length - t_talk - 1
    gain_BPTJ = jnp.stack(
        [ce0_BL[:, None, t:t + j] - ce_talk_BPTL[:, :, t, :j] for t in range(t_talk)], 2)
    reward_BPJ = jnp.sum(gain_BPTJ, axis=2)
    advantage_BPJ = reward_BPJ
    if cfg.use_trice_baseline and cfg.n_rationales > 1:
        advantage_BPJ = reward_BPJ - jnp.mean(reward_BPJ, axis=1, keepdims=True)
    if cfg.remove_negative_rewards:
        advantage_BPJ = jnp.maximum(advantage_BPJ, 0.0)
    advantage_BPJ = jax.lax.stop_gradient(advantage_BPJ)
    if logprob_BPLM.shape[-1] == 0:
        return reward_BPJ, advantage_BPJ, jnp.zeros(())
    policy_loss = jnp.mean(-advantage_BPJ[..., None] * logprob_BPLM[:, :, :j])
    return reward_BPJ, advantage_BPJ, policy_loss


def target_validity(mask_BL: jax.Array, t_talk: int) -> jax.Array:
    """[B, T, L] bool: x[j+1+t], the target of talk offset t at position j, exists and counts."""
    return jnp.stack([shifted(mask_BL, t + 1, False) for t in range(t_talk)], 1)


def base_losses(base_logits_BLV: jax.Array, tokens_BL: jax.Array, mask_BL: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """CE_0[j] = -log p_base(x[j+1]) [B, L] (0 where the label is ignored or past the end), and
    its mean over the labels that count."""
    next_valid_BL = shifted(mask_BL, 1, False)
    ce0_BL = jnp.where(next_valid_BL, -token_logprob(base_logits_BLV, shifted(tokens_BL, 1)), 0.0)
    return ce0_BL, masked_mean(ce0_BL, next_valid_BL)


@flax.struct.dataclass
class NextTokenLosses:
    """The cross-entropies of the true next tokens in one rollout, and the NLL term they make."""

    ce0_BL: jax.Array  # -log p_base(x[j+1]); 0 where the label is ignored or past the end
    ce_talk_BPTL: jax.Array  # -log p(x[j+1+t]) after the thought at j; 0 likewise
    valid_BTL: jax.Array  # bool: x[j+1+t] exists and counts
    loss_base: jax.Array  # [] mean of ce0 over its valid labels
    loss_talk_T: jax.Array  # [T] mean of each offset's talk CE over its valid labels
    nll: jax.Array  # [] base_loss_beta * (w0 * loss_base + (1 - w0) * mean(loss_talk))


def next_token_losses(ro: Rollout, tokens_BL: jax.Array, mask_BL: jax.Array,
                      cfg: QuietStarConfig) -> NextTokenLosses:
    """The base and talk cross-entropies of a rollout of a thinking model, and the NLL term."""
    ce0_BL, loss_base = base_losses(ro.base_logits, tokens_BL, mask_BL)
    t_talk = cfg.n_ahead_talk
    # CE_talk_t[j] = -log p_mix(x[j+1+t]), label validity shifted likewise.
    valid_BTL = target_validity(mask_BL, t_talk)
    talk_valid_BPTL = jnp.broadcast_to(valid_BTL[:, None], ro.talk_logprobs.shape)
    ce_talk_BPTL = jnp.where(talk_valid_BPTL, -ro.talk_logprobs, 0.0)
    loss_talk_T = jnp.stack([masked_mean(ce_talk_BPTL[:, :, t], talk_valid_BPTL[:, :, t])
                             for t in range(t_talk)])
    w0 = cfg.original_loss_weight
    nll = cfg.base_loss_beta * (w0 * loss_base + (1 - w0) * jnp.mean(loss_talk_T))
    return NextTokenLosses(ce0_BL, ce_talk_BPTL, valid_BTL, loss_base, loss_talk_T, nll)


def no_thought_loss(params: Params, batch: dict, cfg: QuietStarConfig) -> tuple[jax.Array, dict]:
    """A model that does not think: plain next-token training, base_loss_beta * CE (with every
    metric of a thinking model, at 0 where it has no meaning)."""
    tokens_BL, mask_BL = batch["tokens"], label_mask(batch, cfg)
    ro = rollout(params, tokens_BL, mask_BL, jax.random.key(0), cfg)
    _, loss_base = base_losses(ro.base_logits, tokens_BL, mask_BL)
    loss = cfg.base_loss_beta * loss_base
    zero = jnp.zeros(())
    return loss, dict(loss_base=loss_base, loss=loss, nll=loss, policy_loss=zero,
                      reward_mean=zero, advantage_mean=zero, advantage_positive=zero,
                      mixing_weight_mean=zero, thought_entropy=zero)


def quiet_star_loss(params: Params, batch: dict, rng: jax.Array, cfg: QuietStarConfig,
                    thought_tokens: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Loss and named scalar metrics for a batch {"tokens": int32 [B, L], "mask": bool [B, L]}."""
    if not cfg.thinks:
        return no_thought_loss(params, batch, cfg)
    tokens_BL, mask_BL = batch["tokens"], label_mask(batch, cfg)
    ro = rollout(params, tokens_BL, mask_BL, rng, cfg, thought_tokens)
    ce = next_token_losses(ro, tokens_BL, mask_BL, cfg)
    reward_BPJ, advantage_BPJ, policy_loss = reinforce_terms(
        ce.ce0_BL, ce.ce_talk_BPTL, ro.thought_logprobs, cfg)
    # Filler thoughts are not drawn: there is no policy to reinforce.
    loss = ce.nll if cfg.filler_thoughts else ce.nll + cfg.policy_loss_beta * policy_loss
    return loss, dict(
        loss_base=ce.loss_base, loss=loss, nll=ce.nll, loss_talk=jnp.mean(ce.loss_talk_T),
        policy_loss=policy_loss, reward_mean=jnp.mean(reward_BPJ),
        advantage_mean=jnp.mean(advantage_BPJ),
        advantage_positive=jnp.mean(advantage_BPJ > 0),  # share of thoughts reinforced
        **rollout_metrics(ro, cfg),
        **{f"loss_talk_{t}": ce.loss_talk_T[t] for t in range(cfg.n_ahead_talk)},
    )


def rollout_metrics(ro: Rollout, cfg: QuietStarConfig) -> dict:
    """The mixing weight's mean and the entropy of the thought tokens' distributions."""
    return dict(mixing_weight_mean=jnp.mean(ro.mixing_weights),
                thought_entropy=jnp.mean(ro.thought_entropy) if cfg.n_sampled else jnp.zeros(()))
