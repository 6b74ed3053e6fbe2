"""The module-level train step: gradient accumulation over micro-batches, checked against one
step on the whole batch, and updates that lower the loss."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qstar_jax import loading, optim, steps
from qstar_jax.objective import quiet_star_loss

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "configs"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """configs/tiny.py's model with one layer: its settings, random parameters and a batch of
    8 full rows of 16 tokens."""
    from tiny import get_config

    config = get_config()
    config.update_from_flattened_dict({"model.n_layers": 1, "seq_len": 16,
                                       "data.num_synthetic": 200,
                                       "quiet_star.policy_loss_beta": 1.0})
    model = loading.load_model(config, str(tmp_path_factory.mktemp("tiny")))
    params = loading.random_params(model.cfg, model.init_token_id, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(3, model.cfg.model.vocab_size - 2, size=(8, 16))
    return config, model.cfg, params, {"tokens": tokens.astype(np.int32),
                                       "mask": np.ones((8, 16), bool)}


def start(config, params, **optim_overrides):
    """An optimizer per the config's `optim` section (no warmup) and its first state."""
    section = config.optim.copy_and_resolve_references()
    section.update(warmup_steps=0, **optim_overrides)
    optimizer = optim.make_optimizer(section, config.train_steps)
    return optimizer, {"params": params, "opt_state": optimizer.init(params),
                       "step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(0)}


def test_two_micro_batches_equal_one_step_on_the_whole_batch(tiny):
    """Plain language modelling (no sampling, so no key matters) on full rows: the mean of two
    half-batch gradients is the whole batch's gradient, so the update, the logged loss and
    grad_norm (the norm of the gradient applied, not a mean of per-micro-batch norms) agree."""
    config, cfg, params, batch = tiny
    cfg = cfg.replace(n_ahead=1, n_ahead_talk=1)
    optimizer, state = start(config, params)
    step = jax.jit(lambda s, b: steps.train_step(s, b, cfg=cfg, optimizer=optimizer))
    want_state, want = step(state, {k: v[None] for k, v in batch.items()})  # [1, 8, L]
    halves = {k: v.reshape(2, 4, -1) for k, v in batch.items()}  # [2, 4, L]
    got_state, got = step(state, halves)
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
    # Not 1e-5: AdamW's first step is lr * g / (|g| + eps) per entry, and an entry whose two
    # sums cancel to near eps (1e-8) carries their rounding, ~1e-3 relative, into its step
    # (measured: one entry in 8192 off by 5e-4 of the learning rate, 1.2e-4 of its value).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 got_state["params"], want_state["params"])
    assert int(got_state["step"]) == 1

    @jax.jit
    def grad_norm(micro_batch):
        grads = jax.grad(lambda p: quiet_star_loss(p, micro_batch, jax.random.PRNGKey(0), cfg)[0])(
            params)
        return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(grads)))

    # The micro-batches' own norms differ from the applied one: their mean is not what is logged.
    norms = [float(grad_norm({k: v[i] for k, v in halves.items()})) for i in range(2)]
    assert abs(np.mean(norms) - float(got["grad_norm"])) > 1e-3 * float(got["grad_norm"])


def test_updates_on_one_batch_lower_its_loss(tiny):
    """Five updates on the same batch lower its NLL by a clear margin: the step descends with
    thoughts (sampled, so the loss is noisy: the margin is wide)."""
    config, cfg, params, batch = tiny
    optimizer, state = start(config, params, learning_rate=3e-3)
    step = jax.jit(lambda s, b: steps.train_step(s, b, cfg=cfg, optimizer=optimizer))
    whole = {k: v[None] for k, v in batch.items()}
    nll = []
    for _ in range(6):
        state, metrics = step(state, whole)
        nll.append(float(metrics["nll"]))
    assert nll[-1] < nll[0] - 0.1, nll
