"""The train step and the eval step, and their sharded, jitted forms for one mesh.

`train_step` and `eval_step` are plain functions of explicit state, as in Flax's lm1b: a
`Trainer` only binds them to a run's settings and shardings and jits them.

Shapes: U micro-batches per update, B batch rows, L positions.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from qstar_jax import host_memory, loading, optim, rlp, sharding
from qstar_jax.model import Params
from qstar_jax.objective import quiet_star_loss
from qstar_jax.scoring import TokenLosses, token_losses
from qstar_jax.thoughts import QuietStarConfig

# {"params", "opt_state", "step": int32 [], "rng": uint32 [2]}, and for RLP "ema_params": the
# no-think baseline, shaped and sharded as "params"
State = dict

# On CPU a step's temporaries share RAM with everything else. XLA's default CPU schedule runs
# independent work early for concurrency, which keeps the gradient buffers of every backward
# layer scan allocated from the start; the memory-optimised schedule cuts the demo step's
# temporaries at the same speed, also as the demo runs, its layers rematerialised and their
# gradients summed in one buffer (benchmarks/RESULTS.md, "Where the demo's memory goes, and
# what is cut", "The demo under 4 GiB").
CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def compiler_options(mesh: Mesh) -> dict | None:
    """XLA options for the steps on `mesh`: CPU_COMPILER_OPTIONS on CPU, else none."""
    return CPU_COMPILER_OPTIONS if mesh.devices.flat[0].platform == "cpu" else None


def train_step(state: State, batch_UBL: dict, *, cfg: QuietStarConfig,
               optimizer: optax.GradientTransformation) -> tuple[State, dict]:
    """One optimizer update from the U micro-batches {"tokens", "mask"} [U, B, L].

    Gradient accumulation happens here: the micro-batches' gradients are summed in a scan (each
    with its own key) and their mean is the one update applied. `grad_norm` is the norm of that
    mean, before clipping; the other metrics are means over the micro-batches.
    """
    params = state["params"]
    rng, step_rng = jax.random.split(state["rng"])
    n_micro = batch_UBL["tokens"].shape[0]
    keys = jax.random.split(step_rng, n_micro)
    loss_fn = (functools.partial(rlp.rlp_loss, ema_params=state["ema_params"])
               if cfg.objective == "rlp" else quiet_star_loss)

    def accumulate(grad_sum, micro):
        micro_batch, key = micro
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, micro_batch, key, cfg)
        return jax.tree.map(jnp.add, grad_sum, grads), metrics

    grad_sum, metrics = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params),
                                     (batch_UBL, keys))
    grads = grad_sum if n_micro == 1 else jax.tree.map(lambda g: g / n_micro, grad_sum)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    metrics = jax.tree.map(jnp.mean, metrics)
    metrics["grad_norm"] = optax.tree.norm(grads)
    new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                 "step": state["step"] + 1, "rng": rng}
    if cfg.objective == "rlp":  # the baseline follows each update, one step behind
        new_state["ema_params"] = rlp.ema_update(state["ema_params"], new_state["params"],
                                                 cfg.ema_decay)
    return new_state, metrics


def eval_step(params: Params, batch_BL: dict, rng: jax.Array, *,
              cfg: QuietStarConfig) -> TokenLosses:
    """Per-token held-out losses of a batch {"tokens", "mask"} [B, L] (`scoring.token_losses`)."""
    return token_losses(params, batch_BL["tokens"], batch_BL["mask"], rng, cfg)


@dataclasses.dataclass
class Trainer:
    """A run's steps on one mesh, jitted with their shardings (each compiles at its first call).

    train_step(state, batch) -> (state, metrics), batch [A, B, L]; the state is donated.
    eval_step(params, batch, rng) -> TokenLosses of a held-out batch [B, L].
    lower_train_step(batch) -> train_step lowered for `abstract_state` and a batch of
    ShapeDtypeStructs (ahead-of-time compilation, e.g. for devices that are not attached).
    """

    model: loading.Model
    mesh: Mesh
    abstract_state: State  # ShapeDtypeStructs carrying their shardings
    init_state: Callable[[int], State]
    train_step: Callable[[State, dict], tuple[State, dict]]
    eval_step: Callable[[dict, dict, jax.Array], TokenLosses]
    lower_train_step: Callable[[dict], jax.stages.Lowered]


def build(config: ml_collections.ConfigDict, model: loading.Model, mesh: Mesh) -> Trainer:
    """Shardings of the state, then the init, train and eval functions for `mesh`."""
    cfg = model.cfg
    optimizer = optim.make_optimizer(config.optim, config.train_steps)
    abstract_params = model.abstract_params()
    param_shardings = sharding.shardings(sharding.logical_specs(cfg), abstract_params, mesh)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_shardings = {
        "params": param_shardings,
        "opt_state": sharding.optimizer_shardings(optimizer, abstract_opt, param_shardings, mesh),
        "step": replicated, "rng": replicated,
    }
    abstract = {"params": abstract_params, "opt_state": abstract_opt,
                "step": jax.ShapeDtypeStruct((), jnp.int32),
                "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    if cfg.objective == "rlp":
        state_shardings["ema_params"] = param_shardings
        abstract["ema_params"] = abstract_params
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, state_shardings)

    def fresh_state(params, seed):
        state = {"params": params, "opt_state": optimizer.init(params),
                 "step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(seed)}
        if cfg.objective == "rlp":  # the baseline starts as the model (the paper's phi <- theta)
            state["ema_params"] = jax.tree.map(jnp.copy, params)
        return state

    def init_state(seed: int) -> State:
        """A new state, created directly sharded (random) or from host weights put leaf by leaf."""
        with sharding.activate(mesh):
            if model.load is None:
                fn = lambda: fresh_state(  # noqa: E731
                    loading.random_params(cfg, model.init_token_id, jax.random.key(seed)), seed)
                return jax.jit(fn, out_shardings=state_shardings)()
            params = sharding.put(model.load(), param_shardings)
            state = jax.jit(fresh_state, static_argnums=1, donate_argnums=0,
                            out_shardings=state_shardings)(params, seed)
        del params
        gc.collect()  # the host weights are held in reference cycles (buffer views) until now
        return state

    micro_batches = sharding.batch_sharding(mesh, 1)  # [A, B, L]
    options = compiler_options(mesh)
    train_jit = jax.jit(functools.partial(train_step, cfg=cfg, optimizer=optimizer),
                        in_shardings=(state_shardings, micro_batches),
                        out_shardings=(state_shardings, replicated), donate_argnums=0,
                        compiler_options=options)
    eval_jit = jax.jit(functools.partial(eval_step, cfg=cfg),
                       in_shardings=(param_shardings, sharding.batch_sharding(mesh), replicated),
                       compiler_options=options)

    def on_mesh(fn):
        """`fn` called under the mesh; jit compiles it at its first call of each argument
        shape and caches it. After the first call the heap that compiling freed is handed back
        (`host_memory.release`): without that a short demo run peaks far higher, and with it
        as low as when the release comes between compiling and the first execution
        (benchmarks/RESULTS.md, "The steps through jit's own cache")."""
        first = True

        def call(*args):
            nonlocal first
            with sharding.activate(mesh):
                out = fn(*args)
            if first:
                host_memory.release()
                first = False
            return out
        return call

    def lower_train_step(batch: dict) -> jax.stages.Lowered:
        with sharding.activate(mesh):
            return train_jit.lower(abstract, batch)

    return Trainer(model, mesh, abstract, init_state, on_mesh(train_jit), on_mesh(eval_jit),
                   lower_train_step)
