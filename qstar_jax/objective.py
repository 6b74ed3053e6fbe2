"""The Quiet-STaR objective: NLL of the base and talk passes plus the REINFORCE term on thoughts.

Shapes: B batch, P rationales, T talk offsets, L positions, J = L - T - 1 rewarded positions,
S sampled thought tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qstar_jax.model import Params
from qstar_jax.rollout import rollout, shifted
from qstar_jax.thoughts import QuietStarConfig, token_logprob


def _masked_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def label_mask(batch: dict, cfg: QuietStarConfig) -> jax.Array:
    """Which tokens count [B, L]: `batch["mask"]`, else tokens != pad_id (the reference's rule)."""
    mask = batch.get("mask")
    return batch["tokens"] != cfg.pad_id if mask is None else mask.astype(bool)


def reinforce_terms(ce0_BL: jax.Array, ce_talk_BPTL: jax.Array, logprob_BPLS: jax.Array,
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
    if cfg.use_trice_baseline and cfg.n_passes > 1:
        advantage_BPJ = reward_BPJ - jnp.mean(reward_BPJ, axis=1, keepdims=True)
    if cfg.remove_negative_rewards:
        advantage_BPJ = jnp.maximum(advantage_BPJ, 0.0)
    advantage_BPJ = jax.lax.stop_gradient(advantage_BPJ)
    if logprob_BPLS.shape[-1] == 0:
        return reward_BPJ, advantage_BPJ, jnp.zeros(())
    policy_loss = jnp.mean(-advantage_BPJ[..., None] * logprob_BPLS[:, :, :j])
    return reward_BPJ, advantage_BPJ, policy_loss


def quiet_star_loss(params: Params, batch: dict, rng: jax.Array, cfg: QuietStarConfig,
                    thought_tokens: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Loss and named scalar metrics for a batch {"tokens": int32 [B, L], "mask": bool [B, L]}."""
    tokens_BL = batch["tokens"]
    mask_BL = label_mask(batch, cfg)
    ro = rollout(params, tokens_BL, mask_BL, rng, cfg, thought_tokens)

    # CE_0[j] = -log p_base(x[j+1]); zero where the label is ignored or past the end.
    next_valid_BL = shifted(mask_BL, 1, False)
    ce0_BL = jnp.where(next_valid_BL, -token_logprob(ro.base_logits, shifted(tokens_BL, 1)), 0.0)
    loss_base = _masked_mean(ce0_BL, next_valid_BL)
    metrics = {"loss_base": loss_base}
    if not cfg.thinks:
        loss = cfg.base_loss_beta * loss_base
        zero = jnp.zeros(())
        metrics.update(loss=loss, nll=loss, policy_loss=zero, reward_mean=zero,
                       advantage_mean=zero, advantage_positive=zero, mixing_weight_mean=zero,
                       thought_entropy=zero)
        return loss, metrics

    t_talk = cfg.n_ahead_talk
    # CE_talk_t[j] = -log p_mix(x[j+1+t]), label validity shifted likewise.
    talk_valid_BTL = jnp.stack([shifted(mask_BL, t + 1, False) for t in range(t_talk)], 1)
    talk_valid_BPTL = jnp.broadcast_to(talk_valid_BTL[:, None], ro.talk_logprobs.shape)
    ce_talk_BPTL = jnp.where(talk_valid_BPTL, -ro.talk_logprobs, 0.0)
    loss_talk_T = jnp.stack([_masked_mean(ce_talk_BPTL[:, :, t], talk_valid_BPTL[:, :, t])
                             for t in range(t_talk)])
    w0 = cfg.original_loss_weight
    nll = cfg.base_loss_beta * (w0 * loss_base + (1 - w0) * jnp.mean(loss_talk_T))

    reward_BPJ, advantage_BPJ, policy_loss = reinforce_terms(
        ce0_BL, ce_talk_BPTL, ro.thought_logprobs, cfg)
    # Filler thoughts are not drawn: there is no policy to reinforce.
    loss = nll if cfg.filler_thoughts else nll + cfg.policy_loss_beta * policy_loss
    metrics.update(
        loss=loss, nll=nll, loss_talk=jnp.mean(loss_talk_T), policy_loss=policy_loss,
        reward_mean=jnp.mean(reward_BPJ), advantage_mean=jnp.mean(advantage_BPJ),
        advantage_positive=jnp.mean(advantage_BPJ > 0),  # share of thoughts reinforced
        mixing_weight_mean=jnp.mean(ro.mixing_weights),
        thought_entropy=jnp.mean(ro.thought_entropy) if cfg.n_sampled else jnp.zeros(()),
        **{f"loss_talk_{t}": loss_talk_T[t] for t in range(t_talk)},
    )
    return loss, metrics
