"""The optimizer: AdamW with linear warmup, a learning-rate schedule and global-norm clipping.

Defaults are the Quiet-STaR paper's (lr 1e-6, 20 warmup steps, weight decay 0.001, clip 1.0,
constant after warmup) and match the authors' Hugging Face Trainer run: torch AdamW (betas 0.9,
0.999, eps 1e-8), the mean gradient of the accumulated micro-batches clipped, then one update
(the accumulation is in `steps.train_step`).
"""

from __future__ import annotations

import jax
import ml_collections
import optax

from qstar_jax.errors import ConfigError

SCHEDULES = ("constant", "cosine", "linear")


def default_config() -> ml_collections.ConfigDict:
    """The `optim` section of a run config, with the paper's values."""
    return ml_collections.ConfigDict(dict(
        learning_rate=1e-6,
        warmup_steps=20,  # linear from 0 (the first update uses lr 0, as Hugging Face's does)
        schedule="constant",  # after warmup: one of SCHEDULES ("linear"/"cosine" decay to 0)
        weight_decay=1e-3,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        grad_clip_norm=1.0,  # global-norm clipping of the (accumulated) gradient; 0: none
        grad_accum_steps=1,  # micro-batches averaged per update (steps.train_step sums them)
        # The mixing head's learning rate as a multiple of learning_rate (weight decay scales
        # with it, as in a torch parameter group): a head that starts at zero otherwise moves
        # as slowly as the language model it sits on (benchmarks/RESULTS.md).
        mixing_head_lr_scale=1.0,
    ))


def learning_rate_fn(config: ml_collections.ConfigDict, train_steps: int) -> optax.Schedule:
    """The learning rate at each optimizer update (count from 0; micro-batches do not count)."""
    lr, warmup = config.learning_rate, config.warmup_steps
    if config.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={config.schedule!r}: expected one of {list(SCHEDULES)}")
    if warmup < 0 or lr < 0:
        raise ConfigError(f"optim.warmup_steps={warmup} and optim.learning_rate={lr} must be >= 0")
    if config.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif train_steps <= warmup:
        raise ConfigError(f"optim.schedule={config.schedule!r} decays over train_steps="
                          f"{train_steps}, which must exceed optim.warmup_steps={warmup}")
    elif config.schedule == "linear":
        after = optax.linear_schedule(lr, 0.0, train_steps - warmup)
    else:
        after = optax.cosine_decay_schedule(lr, train_steps - warmup)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _decay_mask(params):
    """True for leaves that get weight decay: all but those named "bias".

    Reference behaviour: Hugging Face's Trainer decays every parameter except those named "*bias*"
    and nn.LayerNorm weights; Mistral's RMSNorm is not an nn.LayerNorm, so norm scales and the
    start/end thought embeddings are decayed, and only the mixing head's biases are not.
    """
    def decays(path, _):
        last = path[-1]
        return getattr(last, "key", getattr(last, "name", None)) != "bias"

    return jax.tree_util.tree_map_with_path(decays, params)


def _mixing_head_mask(params):
    """True for the leaves of the mixing head (params["mixing_head"])."""
    def in_head(path, _):
        return getattr(path[0], "key", None) == "mixing_head"

    return jax.tree_util.tree_map_with_path(in_head, params)


def make_optimizer(config: ml_collections.ConfigDict,
                   train_steps: int) -> optax.GradientTransformation:
    """AdamW per `config` (see `default_config`); `train_steps` counts optimizer updates."""
    if config.grad_clip_norm < 0:
        raise ConfigError(f"optim.grad_clip_norm={config.grad_clip_norm} must be >= 0 (0: none)")
    if config.mixing_head_lr_scale <= 0:
        raise ConfigError(f"optim.mixing_head_lr_scale={config.mixing_head_lr_scale} must be > 0")
    adamw = optax.adamw(learning_rate_fn(config, train_steps), b1=config.b1, b2=config.b2,
                        eps=config.eps, weight_decay=config.weight_decay, mask=_decay_mask)
    if config.mixing_head_lr_scale != 1.0:
        adamw = optax.chain(adamw, optax.masked(optax.scale(config.mixing_head_lr_scale),
                                                _mixing_head_mask))
    # torch clips by max_norm / (norm + 1e-6); optax by max_norm / norm: equal to ~1e-6 relative.
    return (optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
            if config.grad_clip_norm else adamw)
