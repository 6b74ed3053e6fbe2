"""The evaluation semantics, written once: the base pass, and thinking at every position before
predicting the next tokens (one rationale; the spec's "Evaluation semantics"). Training's held-out
losses, `evaluate`, `visualize` and the experiment all score through this module.

Shapes: B batch, L positions, T talk offsets, M sampled thought tokens.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from qstar_jax.model import Params
from qstar_jax.objective import base_losses, target_validity
from qstar_jax.rollout import rollout
from qstar_jax.thoughts import QuietStarConfig, mask_thought_logits


def evaluation_config(cfg: QuietStarConfig, talk_offsets: bool = True) -> QuietStarConfig:
    """One rationale per position. `talk_offsets`: the talk offsets of training are kept, so that
    the loss at each can be read; else only offset 0 ("think, then predict x[j+1]"), which they
    do not change, is computed."""
    return cfg.replace(n_passes=1, **({} if talk_offsets else {"n_ahead_talk": 1}))


@flax.struct.dataclass
class TokenLosses:
    """Cross-entropies (nats) of the true next tokens of a batch; 0 where not valid.

    `talk[:, t, j]` scores x[j+1+t] after the thought at j; a model that does not think has
    T = 1 and its talk losses are its base losses.
    """

    base: jax.Array  # [B, L] -log p_base(x[j+1])
    talk: jax.Array  # [B, T, L] -log p_mix(x[j+1+t])
    valid: jax.Array  # [B, T, L] bool: the target exists and is not masked
    thoughts: jax.Array  # [B, L, M] int32, the thought at each position
    base_argmax: jax.Array  # [B, L] int32: the base pass's most likely x[j+1]
    think_argmax: jax.Array  # [B, L] int32: the most likely x[j+1] after thinking at j

    @property
    def think(self) -> jax.Array:
        """[B, L] -log p(x[j+1]) after thinking at j: the model's prediction with thoughts."""
        return self.talk[:, 0]


def token_losses(params: Params, tokens_BL: jax.Array, mask_BL: jax.Array, rng: jax.Array,
                 cfg: QuietStarConfig, talk_offsets: bool = True) -> TokenLosses:
    """Per-token losses of a batch [B, L] (`cfg` as trained; see `evaluation_config`)."""
    cfg = evaluation_config(cfg, talk_offsets)
    ro = rollout(params, tokens_BL, mask_BL, rng, cfg, return_talk_argmax=cfg.thinks)
    t_talk = cfg.n_ahead_talk if cfg.thinks else 1
    valid_BTL = target_validity(mask_BL, t_talk)
    base_BL, _ = base_losses(ro.base_logits, tokens_BL, mask_BL)
    talk_BTL = -ro.talk_logprobs[:, 0] if cfg.thinks else base_BL[:, None]
    base_argmax = jnp.argmax(mask_thought_logits(ro.base_logits, cfg), -1).astype(jnp.int32)
    return TokenLosses(base=base_BL, talk=jnp.where(valid_BTL, talk_BTL, 0.0), valid=valid_BTL,
                       thoughts=ro.thought_tokens[:, 0], base_argmax=base_argmax,
                       think_argmax=ro.talk_argmax[:, 0, 0] if cfg.thinks else base_argmax)


def next_token_logits(params: Params, tokens_BL: jax.Array, mask_BL: jax.Array, rng: jax.Array,
                      cfg: QuietStarConfig, thinking: bool = True
                      ) -> tuple[jax.Array, jax.Array | None]:
    """Logits [B, L, V] for x[j+1] at each position j: (base, after thinking at j, or None when
    not `thinking` or the model does not think; then no thought is sampled)."""
    cfg = evaluation_config(cfg, talk_offsets=False)
    if not thinking:
        cfg = cfg.replace(n_ahead=1)
    ro = rollout(params, tokens_BL, mask_BL, rng, cfg, return_talk_logits=cfg.thinks)
    return ro.base_logits, ro.talk_logits[:, 0, 0] if cfg.thinks else None
