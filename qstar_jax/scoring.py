"""Per-token held-out losses under the evaluation semantics: the base pass, and thinking at every
position before predicting the next tokens (one rationale; the spec's "Evaluation semantics").

Shapes: B batch, L positions, T talk offsets, S sampled thought tokens.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from qstar_jax.model import Params
from qstar_jax.rollout import _shift, rollout
from qstar_jax.thoughts import QuietStarConfig, token_logprob


def evaluation_config(cfg: QuietStarConfig) -> QuietStarConfig:
    """One rationale per position; the talk offsets of training kept, so that the loss at each
    offset can be read (offset 0 is "think, then predict x[j+1]")."""
    return cfg.replace(n_passes=1)


@flax.struct.dataclass
class TokenLosses:
    """Cross-entropies (nats) of the true next tokens of a batch; 0 where not valid.

    `talk[:, t, j]` scores x[j+1+t] after the thought at j; a model that does not think has
    T = 1 and its talk losses are its base losses.
    """

    base: jax.Array  # [B, L] -log p_base(x[j+1])
    talk: jax.Array  # [B, T, L] -log p_mix(x[j+1+t])
    valid: jax.Array  # [B, T, L] bool: the target exists and is not masked
    thoughts: jax.Array  # [B, L, S] int32, the thought at each position

    @property
    def think(self) -> jax.Array:
        """[B, L] -log p(x[j+1]) after thinking at j: the model's prediction with thoughts."""
        return self.talk[:, 0]


def token_losses(params: Params, tokens_BL: jax.Array, mask_BL: jax.Array, rng: jax.Array,
                 cfg: QuietStarConfig) -> TokenLosses:
    """Per-token losses of a batch [B, L] (`cfg` as trained; see `evaluation_config`)."""
    cfg = evaluation_config(cfg)
    ro = rollout(params, tokens_BL, mask_BL, rng, cfg)
    t_talk = cfg.n_ahead_talk if cfg.thinks else 1
    valid_BTL = jnp.stack([_shift(mask_BL, t + 1, False) for t in range(t_talk)], 1)
    base_BL = jnp.where(valid_BTL[:, 0],
                        -token_logprob(ro.base_logits, _shift(tokens_BL, 1)), 0.0)
    talk_BTL = -ro.talk_logprobs[:, 0] if cfg.thinks else base_BL[:, None]
    return TokenLosses(base=base_BL, talk=jnp.where(valid_BTL, talk_BTL, 0.0), valid=valid_BTL,
                       thoughts=ro.thought_tokens[:, 0])
