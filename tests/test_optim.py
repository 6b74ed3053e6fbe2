"""qstar_jax.optim against hand-computed schedules and a numpy AdamW written here."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qstar_jax import optim


def config(**overrides):
    cfg = optim.default_config()
    cfg.update(overrides)
    return cfg


def test_defaults_are_the_papers():
    cfg = optim.default_config()
    assert (cfg.learning_rate, cfg.warmup_steps, cfg.schedule) == (1e-6, 20, "constant")
    assert (cfg.weight_decay, cfg.grad_clip_norm, cfg.grad_accum_steps) == (1e-3, 1.0, 1)
    assert (cfg.b1, cfg.b2, cfg.eps) == (0.9, 0.999, 1e-8)


@pytest.mark.parametrize("schedule,expected", [
    # warmup 4 steps to lr 2, then (train_steps 12): constant / linear / cosine to 0 at step 12.
    ("constant", {0: 0.0, 1: 0.5, 3: 1.5, 4: 2.0, 8: 2.0, 30: 2.0}),
    ("linear", {0: 0.0, 2: 1.0, 4: 2.0, 6: 1.5, 8: 1.0, 12: 0.0, 30: 0.0}),
    ("cosine", {0: 0.0, 2: 1.0, 4: 2.0, 6: 1 + math.sqrt(0.5), 8: 1.0, 10: 1 - math.sqrt(0.5),
                12: 0.0, 30: 0.0}),
])
def test_schedules(schedule, expected):
    fn = optim.learning_rate_fn(config(learning_rate=2.0, warmup_steps=4, schedule=schedule), 12)
    for step, value in expected.items():
        assert float(fn(step)) == pytest.approx(value, abs=1e-6), step


def test_schedule_without_warmup():
    fn = optim.learning_rate_fn(config(learning_rate=3.0, warmup_steps=0, schedule="linear"), 6)
    assert [float(fn(s)) for s in (0, 3, 6)] == pytest.approx([3.0, 1.5, 0.0])


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="optim.schedule='step'"):
        optim.make_optimizer(config(schedule="step"), 100)
    with pytest.raises(ValueError, match="train_steps=20.*optim.warmup_steps=20"):
        optim.make_optimizer(config(schedule="cosine"), 20)


def numpy_adamw(params, grads_per_step, *, lr_at, b1, b2, eps, wd, clip, decays):
    """torch.optim.AdamW after clip_grad_norm_, in float64 (decay where decays[name])."""
    params = {k: np.array(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(x) for k, x in params.items()}
    for t, grads in enumerate(grads_per_step):
        norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in grads.values()))
        scale = min(1.0, clip / norm) if clip else 1.0
        lr = lr_at(t)
        for k in params:
            g = np.asarray(grads[k], np.float64) * scale
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            m_hat, v_hat = m[k] / (1 - b1 ** (t + 1)), v[k] / (1 - b2 ** (t + 1))
            decay = wd * params[k] if decays[k] else 0.0
            params[k] = params[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + decay)
    return params


def run(opt, params, grads_per_step):
    state = opt.init(params)
    for grads in grads_per_step:
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def tree(kernel, bias, scale):
    return {"layer": {"kernel": jnp.asarray(kernel, jnp.float32),
                      "bias": jnp.asarray(bias, jnp.float32)},
            "norm": {"scale": jnp.asarray(scale, jnp.float32)}}


def flat(t):
    return {"kernel": t["layer"]["kernel"], "bias": t["layer"]["bias"],
            "scale": t["norm"]["scale"]}


def test_adamw_matches_numpy_with_decay_warmup_and_clipping():
    rng = np.random.default_rng(0)
    params = tree(rng.normal(size=(3, 4)), rng.normal(size=4), 1 + rng.normal(size=5))
    grads = [tree(rng.normal(size=(3, 4)) * s, rng.normal(size=4) * s, rng.normal(size=5) * s)
             for s in (3.0, 0.05, 2.0, 0.1, 1.0)]  # norms above and below the clip
    cfg = config(learning_rate=0.1, warmup_steps=2, weight_decay=0.3, eps=1e-3, grad_clip_norm=1.5)
    got = run(optim.make_optimizer(cfg, 10), params, grads)
    want = numpy_adamw(flat(params), [flat(g) for g in grads],
                       lr_at=lambda t: 0.1 * min(t / 2, 1.0), b1=0.9, b2=0.999, eps=1e-3, wd=0.3,
                       clip=1.5, decays={"kernel": True, "bias": False, "scale": True})
    for name, value in flat(got).items():
        np.testing.assert_allclose(value, want[name], rtol=2e-5, atol=1e-6, err_msg=name)


def test_clipping_scales_a_known_norm_exactly():
    # One step with b1 = b2 = 0 and a large eps: the update is -lr * g / (|g| + eps), so it
    # shows the scale of the gradient Adam saw. Gradient (3, 4): norm 5, clipped to 2 -> (1.2, 1.6).
    cfg = config(learning_rate=1.0, warmup_steps=0, weight_decay=0.0, b1=0.0, b2=0.0, eps=1.0,
                 grad_clip_norm=2.0)
    opt = optim.make_optimizer(cfg, 10)
    params = {"w": jnp.zeros(2)}
    updates, _ = opt.update({"w": jnp.array([3.0, 4.0])}, opt.init(params), params)
    np.testing.assert_allclose(updates["w"], [-1.2 / 2.2, -1.6 / 2.6], rtol=1e-6)
    updates, _ = opt.update({"w": jnp.array([0.3, 0.4])}, opt.init(params), params)  # below: kept
    np.testing.assert_allclose(updates["w"], [-0.3 / 1.3, -0.4 / 1.4], rtol=1e-6)


def test_the_mixing_head_learning_rate_scale_scales_only_its_updates():
    """Three AdamW steps with the head's rate x4 against a plain numpy AdamW per leaf: the head
    moves as with lr 4 x 0.1 (its weight decay too), every other leaf as with lr 0.1."""
    params = {"decoder": {"w": jnp.array([1.0, -2.0])},
              "mixing_head": {"out": {"kernel": jnp.array([0.5, 0.25])}}}
    grads = [{"decoder": {"w": jnp.array([0.3, -0.1]) * (i + 1)},
              "mixing_head": {"out": {"kernel": jnp.array([-0.2, 0.4]) / (i + 1)}}}
             for i in range(3)]
    opt = optim.make_optimizer(config(learning_rate=0.1, warmup_steps=0, weight_decay=0.5,
                                      grad_clip_norm=0.0, mixing_head_lr_scale=4.0), 10)
    state, p = opt.init(params), params
    for g in grads:
        updates, state = opt.update(g, state, p)
        p = optax.apply_updates(p, updates)

    def numpy_adamw(x, gs, lr):
        x, m, v = np.array(x, float), 0.0, 0.0
        for t, g in enumerate(gs, 1):
            g = np.asarray(g, float)
            m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
            step = (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
            x = x - lr * (step + 0.5 * x)
        return x

    np.testing.assert_allclose(p["decoder"]["w"], numpy_adamw(
        params["decoder"]["w"], [g["decoder"]["w"] for g in grads], 0.1), rtol=1e-5)
    np.testing.assert_allclose(p["mixing_head"]["out"]["kernel"], numpy_adamw(
        params["mixing_head"]["out"]["kernel"],
        [g["mixing_head"]["out"]["kernel"] for g in grads], 0.4), rtol=1e-5)
    with pytest.raises(ValueError, match="mixing_head_lr_scale"):
        optim.make_optimizer(config(mixing_head_lr_scale=0.0), 10)
