"""Compile the Quiet-STaR train step for a TPU topology on a CPU machine and report its memory.

Needs `pip install libtpu` (kept out of the default install: it makes every JAX start print TPU
warnings). Example, Mistral-7B with the paper's settings on a v4 2x2x4 slice:

    python benchmarks/tpu_compile.py --topology v4:2x2x4 --fsdp 8

Prints one JSON line: per-device argument/output/temporary bytes against the chip's HBM.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import topologies
from jax.sharding import Mesh

from qstar_jax import sharding
from qstar_jax.model import ModelConfig, init_params
from qstar_jax.objective import quiet_star_loss
from qstar_jax.thoughts import QuietStarConfig, add_thought_params

MISTRAL_7B = ModelConfig(vocab_size=32002, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                         ffn_dim=14336, rope_theta=10000.0, sliding_window=4096,
                         dtype="bfloat16", param_dtype="float32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", default="v4:2x2x4", help="e.g. v4:2x2x4, v4:2x4x4")
    ap.add_argument("--fsdp", type=int, default=8)
    ap.add_argument("--tensor", type=int, default=-1, help="-1: the devices left over")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq_len", type=int, default=256)
    args = ap.parse_args()

    devices = np.array(topologies.get_topology_desc(args.topology, "tpu").devices)
    mesh = Mesh(devices.reshape(1, args.fsdp, args.tensor), sharding.MESH_AXES)
    cfg = QuietStarConfig(model=MISTRAL_7B, start_thought_id=32000, end_thought_id=32001,
                          pad_id=2)  # the paper: n_ahead 12, n_ahead_talk 4, 2 rationales
    logical = sharding.logical_specs(cfg)
    params_abs = quiet_star_shapes(cfg)
    param_sh = sharding.shardings(logical, params_abs, mesh)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6, weight_decay=1e-3))
    opt_abs = jax.eval_shape(optimizer.init, params_abs)
    opt_sh = sharding.optimizer_shardings(optimizer, opt_abs, param_sh, mesh)
    tokens = jax.ShapeDtypeStruct((args.batch, args.seq_len), jnp.int32,
                                  sharding=sharding.batch_sharding(mesh))
    with_sh = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731

    def step(params, opt_state, tokens_BL):
        grads, metrics = jax.grad(quiet_star_loss, has_aux=True)(
            params, {"tokens": tokens_BL}, jax.random.key(0), cfg)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    start = time.time()
    with sharding.activate(mesh):
        jitted = jax.jit(step, donate_argnums=(0, 1), out_shardings=(param_sh, opt_sh, None))
        lowered = jitted.lower(
            jax.tree.map(with_sh, params_abs, param_sh), jax.tree.map(with_sh, opt_abs, opt_sh),
            tokens)
        compiled = lowered.compile()
    mem = compiled.memory_analysis()
    gib = lambda b: round(b / 2**30, 2)  # noqa: E731
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes \
        + mem.temp_size_in_bytes
    print(json.dumps({
        "topology": args.topology, "devices": int(devices.size), "mesh": dict(mesh.shape),
        "batch": args.batch, "seq_len": args.seq_len, "compile_s": round(time.time() - start, 1),
        "argument_gib": gib(mem.argument_size_in_bytes),
        "output_gib": gib(mem.output_size_in_bytes),
        "alias_gib": gib(mem.alias_size_in_bytes), "temp_gib": gib(mem.temp_size_in_bytes),
        "total_gib": gib(total),
    }))


def quiet_star_shapes(cfg: QuietStarConfig):
    """Abstract Quiet-STaR parameters (shapes and dtypes, nothing allocated)."""
    base = cfg.model.replace(vocab_size=cfg.model.vocab_size - 2)
    return jax.eval_shape(
        lambda r: add_thought_params(init_params(base, r), base, 0, r)[1], jax.random.key(0))


if __name__ == "__main__":
    main()
