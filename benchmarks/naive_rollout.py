"""The Quiet-STaR loss computed the authors' way, with qstar_jax's model: the benchmark's baseline.

What the authors' code does, and `qstar_jax.rollout.rollout` does not:
- every sequence is repeated `n_passes` times in the batch, so the base pass runs once per
  rationale (R = B * n_passes rows below);
- each pass attends with a block mask that grows by L keys a pass: base keys causal, then one
  diagonal block per earlier chain pass (`rerun=False`: the authors' KV-cached form, L new tokens
  against (k+1)L keys at pass k; `rerun=True`: the whole [x, chain_1, ..., chain_k] sequence,
  (k+1)L tokens, re-run under a (k+1)L x (k+1)L mask, as tests/test_thoughts.py's reference does);
- every token fed after the base pass (sampled thought tokens and teacher-forced talk tokens) is
  embedded by a one-hot [R*L, V] @ [V, D] product, samples are hard Gumbel-max one-hots;
- passes are unrolled in Python, one differently shaped computation each.

Given the same thought tokens it computes the same loss as `objective.quiet_star_loss`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qstar_jax.model import Context, KeyValues, Masks, Params, causal_context, visible
from qstar_jax.objective import label_mask, reinforce_terms
from qstar_jax.rollout import check_batch
from qstar_jax.thoughts import (
    QuietStarConfig,
    embed_tokens,
    hidden,
    lm_logits,
    mask_thought_logits,
    mix,
    start_end_embeddings,
    token_logprob,
)


def shift(x_RL: jax.Array, t: int, fill) -> jax.Array:
    """x[:, j + t] at column j, `fill` past the end."""
    pad = ((0, 0), (0, t)) + ((0, 0),) * (x_RL.ndim - 2)
    return jnp.pad(x_RL[:, t:], pad, constant_values=fill)


def masked_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def naive_loss(params: Params, batch: dict, rng: jax.Array, cfg: QuietStarConfig,
               thought_tokens: jax.Array | None = None, rerun: bool = False
               ) -> tuple[jax.Array, dict]:
    """Loss and metrics as `quiet_star_loss` (thoughts sampled, or forced [B, P, L, S])."""
    tokens_BL = batch["tokens"]
    b, length = tokens_BL.shape
    check_batch(cfg, length)
    if cfg.n_sampled < 1:
        raise ValueError(f"n_ahead={cfg.n_ahead}: the naive path needs n_ahead >= 4")
    p, s, t_talk = cfg.n_passes, cfg.n_sampled, cfg.n_ahead_talk
    rows = lambda x: jnp.repeat(x, p, axis=0)  # noqa: E731  [B, ...] -> [R, ...], rationale-minor
    tokens_RL, valid_RL = rows(tokens_BL), rows(label_mask(batch, cfg))
    positions_RL = jnp.broadcast_to(jnp.arange(length), tokens_RL.shape)
    base_mask_RLL = visible(positions_RL, positions_RL, valid_RL)
    eye_RLL = jnp.broadcast_to(jnp.eye(length, dtype=bool), base_mask_RLL.shape)

    x_RLD = embed_tokens(params, cfg, tokens_RL)
    base_ctx = causal_context(positions_RL, valid_RL)
    h_base, base_kv = hidden(params, cfg, x_RLD, positions_RL, base_ctx)
    next_valid_RL = shift(valid_RL, 1, False)
    ce0_RL = jnp.where(next_valid_RL,
                       -token_logprob(lm_logits(params, cfg, h_base), shift(tokens_RL, 1, 0)), 0.0)

    dt = jnp.dtype(cfg.model.dtype)
    table_VD = params["decoder"]["embed"]["embedding"].astype(dt)
    vocab = table_VD.shape[0]
    one_hot_embed = lambda tok_RL: jax.nn.one_hot(tok_RL, vocab, dtype=dt) @ table_VD  # noqa: E731
    start_D, end_D = start_end_embeddings(params, cfg)
    forced_RLS = None if thought_tokens is None else thought_tokens.reshape(b * p, length, s)

    blocks_x, blocks_kv = [x_RLD], [base_kv]

    def chain_pass(k: int, x_RLD: jax.Array) -> jax.Array:
        """Hidden states [R, L, D] of the tokens fed at pass k, under the growing block mask."""
        if rerun:  # all (k+1)L tokens; block row a sees base keys causally, chain blocks 1..a
            blocks_x.append(x_RLD)
            mask = jnp.concatenate([jnp.concatenate(
                [base_mask_RLL] + [eye_RLL & (c <= a) for c in range(1, k + 1)],
                axis=2) for a in range(k + 1)], axis=1)
            pos = jnp.concatenate([positions_RL + a for a in range(k + 1)], axis=1)
            h, _ = hidden(params, cfg, jnp.concatenate(blocks_x, 1), pos,
                          Context(Masks(self_BLL=mask)))
            return h[:, k * length:]
        prefix = KeyValues(jnp.concatenate([kv.k for kv in blocks_kv], axis=2),
                           jnp.concatenate([kv.v for kv in blocks_kv], axis=2))
        prefix_mask = jnp.concatenate([base_mask_RLL] + [eye_RLL] * (k - 1), axis=2)
        ctx = Context(Masks(prefix_BLS=prefix_mask, self_BLL=eye_RLL), prefix=prefix)
        h, kv = hidden(params, cfg, x_RLD, positions_RL + k, ctx)
        blocks_kv.append(kv)
        return h

    logprobs, ce_talk, talk_valid = [], [], []
    x_RLD = jnp.broadcast_to(start_D, h_base.shape)
    keys = jax.random.split(rng, s)
    for k in range(1, cfg.n_chain_passes + 1):
        h_RLD = chain_pass(k, x_RLD)
        if k <= s:  # sample the token fed at pass k + 1
            logits = mask_thought_logits(lm_logits(params, cfg, h_RLD), cfg)
            if forced_RLS is None:
                token_RL = jnp.argmax(logits + jax.random.gumbel(keys[k - 1], logits.shape), -1)
            else:
                token_RL = forced_RLS[:, :, k - 1]
            logprobs.append(token_logprob(logits / cfg.reinforce_temperature, token_RL))
            x_RLD = one_hot_embed(jax.lax.stop_gradient(token_RL))
        t = k - (cfg.n_ahead - 1)
        if t >= 0:  # talk pass: mix with the base state that predicts the same token, score
            h_mix, _ = mix(params, cfg, shift(h_base, t, 0.0), h_RLD)
            target_RL = shift(tokens_RL, t + 1, cfg.pad_id)
            talk_valid.append(shift(valid_RL, t + 1, False))
            ce_talk.append(jnp.where(talk_valid[-1],
                                     -token_logprob(lm_logits(params, cfg, h_mix), target_RL), 0.0))
        if k == cfg.n_ahead - 2:
            x_RLD = jnp.broadcast_to(end_D, h_base.shape)
        elif k >= cfg.n_ahead - 1:
            x_RLD = one_hot_embed(shift(tokens_RL, t + 1, cfg.pad_id))

    loss_base = masked_mean(ce0_RL, next_valid_RL)
    loss_talk_T = [masked_mean(c, v) for c, v in zip(ce_talk, talk_valid, strict=True)]
    loss_talk = jnp.mean(jnp.stack(loss_talk_T))
    w0 = cfg.original_loss_weight
    nll = cfg.base_loss_beta * (w0 * loss_base + (1 - w0) * loss_talk)
    ce_talk_BPTL = jnp.stack(ce_talk, 1).reshape(b, p, t_talk, length)
    logprob_BPLS = jnp.stack(logprobs, -1).reshape(b, p, length, s)
    # The copies of the base pass are equal; their mean keeps every copy in the computation.
    ce0_BL = ce0_RL.reshape(b, p, length).mean(1)
    _, _, policy_loss = reinforce_terms(ce0_BL, ce_talk_BPTL, logprob_BPLS, cfg)
    loss = nll + cfg.policy_loss_beta * policy_loss
    return loss, {"loss": loss, "nll": nll, "loss_base": loss_base, "loss_talk": loss_talk,
                  "policy_loss": policy_loss}
