"""Every optimised path of the rollout gives the plain path's losses and gradients.

The plain path has no layer scan, no rematerialisation and no gradient threading
(`gradient_memory`): each chain pass is an ordinary function of the parameters, differentiated
by JAX. Each combination of `scan_layers`, `remat_policy` and `remat_passes` the configs can
choose must agree with it, under the TRICE baseline with 2 rationales (one carries the policy
gradient) and 3 (two carry it, and rounding can reach the third).
"""

import importlib.util
import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qstar_jax import gradient_memory
from qstar_jax.model import ModelConfig, init_params, join_layers, split_layers
from qstar_jax.objective import quiet_star_loss
from qstar_jax.thoughts import QuietStarConfig, add_thought_params

VOCAB = 24
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # half the compile time, exact to rounding
PLAIN = dict(scan_layers=False, remat_policy="none", remat_passes=False)
# Rematerialised scanned layers are threaded under "nothing_saveable" and are flax's nn.remat
# inside nn.scan under any other policy ("dots_saveable"); unscanned ones are nn.remat per layer
# under every policy, so one stands for all there.
PATHS = [dict(scan_layers=s, remat_policy=r, remat_passes=p) for s, r, p in itertools.product(
    [True, False], ["nothing_saveable", "dots_saveable", "none"], [True, False])
    if not (r == "dots_saveable" and not s)]
PATHS.remove(PLAIN)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def configs_paths() -> dict[str, dict]:
    """The path each of configs/*.py (at its default preset) trains on."""
    paths = {}
    for file in sorted(CONFIGS.glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"configs_{file.stem}", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        c = module.get_config()
        paths[file.stem] = dict(scan_layers=c.model.scan_layers, remat_policy=c.model.remat_policy,
                                remat_passes=c.quiet_star.remat_passes)
    return paths


def path_id(path: dict) -> str:
    return "-".join([("scan" if path["scan_layers"] else "loop"), path["remat_policy"],
                     ("remat_passes" if path["remat_passes"] else "unrolled")])


def setup(path: dict, n_rationales: int) -> tuple[QuietStarConfig, dict, dict]:
    """A 2-layer model laid out for `path`, with a mixing head that lets thoughts count; one
    thought token, two talk offsets (a pass loop of two passes to recompute)."""
    mcfg = ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                       ffn_dim=32, rope_theta=1000.0, norm_eps=1e-6, scan_layers=True)
    mcfg, params = add_thought_params(init_params(mcfg, jax.random.key(0)), mcfg, 3,
                                      jax.random.key(1))
    head = params["mixing_head"]["out"]["kernel"]
    params["mixing_head"]["out"]["kernel"] = 0.3 * jax.random.normal(jax.random.key(2),
                                                                     head.shape)
    # The same weights in the layout `path` asks for.
    rest, layers = split_layers(params["decoder"], mcfg)
    mcfg = mcfg.replace(scan_layers=path["scan_layers"], remat_policy=path["remat_policy"])
    params["decoder"] = join_layers(rest, layers, mcfg)
    cfg = QuietStarConfig(model=mcfg, start_thought_id=VOCAB, end_thought_id=VOCAB + 1,
                          pad_id=0, n_ahead=4, n_ahead_talk=2, n_passes=n_rationales,
                          remat_passes=path["remat_passes"])
    tokens = jnp.asarray(np.random.RandomState(0).randint(1, VOCAB, (2, 8)), jnp.int32)
    mask = jnp.ones(tokens.shape, bool).at[1, 6:].set(False)
    return cfg, params, {"tokens": tokens, "mask": mask}


def loss_and_grads(path: dict, n_rationales: int) -> tuple[QuietStarConfig, float, dict, dict]:
    """Loss, metrics and gradients (layers as a list) of one path."""
    cfg, params, batch = setup(path, n_rationales)
    grad = jax.jit(jax.value_and_grad(
        lambda p: quiet_star_loss(p, batch, jax.random.key(3), cfg), has_aux=True))
    (loss, metrics), grads = grad.lower(params).compile(FAST_COMPILE)(params)
    rest, layers = split_layers(grads["decoder"], cfg.model)
    return cfg, loss, metrics, {**grads, "decoder": {**rest, "layers": layers}}


_plain = {}


def plain(n_rationales: int):
    if n_rationales not in _plain:
        _plain[n_rationales] = loss_and_grads(PLAIN, n_rationales)
    return _plain[n_rationales]


def test_the_configs_paths_are_tested():
    paths = configs_paths()
    assert len(paths) >= 6
    untested = {name: path for name, path in paths.items() if path not in PATHS + [PLAIN]}
    assert not untested, f"configs on a path tests/test_rollout.py does not compare: {untested}"


@pytest.mark.parametrize("n_rationales", [2, 3])
@pytest.mark.parametrize("path", PATHS, ids=path_id)
def test_path_matches_the_plain_path(path, n_rationales):
    cfg, loss, metrics, grads = loss_and_grads(path, n_rationales)
    _, want_loss, want_metrics, want_grads = plain(n_rationales)
    assert gradient_memory.threads_layer_gradients(cfg) == (
        path["scan_layers"] and path["remat_policy"] == "nothing_saveable")
    assert float(want_metrics["policy_loss"]) != 0  # the policy gradient is in the comparison
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for name in want_metrics:
        np.testing.assert_allclose(metrics[name], want_metrics[name], rtol=1e-5, atol=1e-7,
                                   err_msg=name)
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    want = jax.tree.leaves(want_grads)
    assert len(flat) == len(want)
    for (where, got), expected in zip(flat, want, strict=True):
        scale = max(float(np.abs(expected).max()), 1e-8)
        np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(expected) / scale,
                                   atol=2e-5, err_msg=jax.tree_util.keystr(where))
