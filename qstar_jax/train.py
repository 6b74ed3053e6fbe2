"""Quiet-STaR training on a mesh of devices, with checkpoints, held-out evaluation and logs.

    python -m qstar_jax.train --config=configs/tiny.py --workdir=runs/tiny [--config.KEY=VALUE ...]

Writes under the workdir: checkpoints/, config.json (the resolved config), metrics.jsonl (one
JSON object per logged step; "eval/..." keys for held-out evaluations), tensorboard/ and, for a
random model, tokenizer/. Run it again with the same workdir to resume.

    python -m qstar_jax.train --config=configs/tpu_v4.py --compile_only=v4-64 [--config...]

compiles the train step for a TPU slice on this machine (with libtpu, no TPU, no weights read) and
prints its memory per device against the HBM; exit status 1 if it does not fit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorboardX
from absl import app, flags, logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from ml_collections import config_flags

from qstar_jax import checkpoint, data, heldout, optim, outputs, sharding
from qstar_jax import config as config_lib
from qstar_jax.objective import quiet_star_loss
from qstar_jax.rollout import check_batch
from qstar_jax.scoring import TokenLosses, token_losses
from qstar_jax.tokenizer import END_THOUGHT, START_THOUGHT

State = dict  # {"params", "opt_state", "step": int32 [], "rng": uint32 [2]}
METRICS_FILE = "metrics.jsonl"
THOUGHTS_FILE = "thoughts.jsonl"  # {"step", "thoughts": [decoded samples]} per evaluation
SAMPLE_THOUGHTS = 3  # decoded thoughts logged at each evaluation


class NonFiniteLoss(RuntimeError):
    """The loss or gradient became NaN/inf; the run stops without saving that state."""


# ----------------------------------------------------------------------------- jitted pieces


@dataclasses.dataclass
class Trainer:
    """A run's jitted functions on one mesh (each compiles at its first call).

    train_step(state, batch) -> (state, metrics): one optimizer update from `grad_accum_steps`
    micro-batches {"tokens", "mask"} [A, B, L]; the state is donated.
    eval_step(params, batch, rng) -> scoring.TokenLosses of a held-out batch [B, L].
    lower_train_step(batch) -> train_step lowered for `abstract_state` and a batch of
    ShapeDtypeStructs (ahead-of-time compilation, e.g. for devices that are not attached).
    """

    model: config_lib.Model
    mesh: Mesh
    abstract_state: State  # ShapeDtypeStructs carrying their shardings
    init_state: Callable[[int], State]
    train_step: Callable[[State, dict], tuple[State, dict]]
    eval_step: Callable[[dict, dict, jax.Array], TokenLosses]
    lower_train_step: Callable[[dict], jax.stages.Lowered]


def build(config: ml_collections.ConfigDict, model: config_lib.Model, mesh: Mesh) -> Trainer:
    """Shardings of the state, then the init, train and eval functions for `mesh` (each compiles
    at its first call)."""
    cfg = model.cfg
    optimizer = optim.make_optimizer(config.optim, config.train_steps)
    abstract_params = config_lib.abstract_params(model)
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
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, state_shardings)

    def fresh_state(params, seed):
        return {"params": params, "opt_state": optimizer.init(params),
                "step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(seed)}

    def init_state(seed: int) -> State:
        """A new state, created directly sharded (random) or from host weights put leaf by leaf."""
        with sharding.activate(mesh):
            if model.load is None:
                fn = lambda: fresh_state(  # noqa: E731
                    config_lib.random_params(cfg, model.init_token_id, jax.random.key(seed)), seed)
                return jax.jit(fn, out_shardings=state_shardings)()
            params = sharding.put(model.load(), param_shardings)
            return jax.jit(fresh_state, static_argnums=1, donate_argnums=0,
                           out_shardings=state_shardings)(params, seed)

    def train_step(state: State, batch: dict) -> tuple[State, dict]:
        rng, step_rng = jax.random.split(state["rng"])

        def micro_step(carry, xs):
            params, opt_state = carry
            micro_batch, key = xs
            (_, metrics), grads = jax.value_and_grad(quiet_star_loss, has_aux=True)(
                params, micro_batch, key, cfg)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            metrics["grad_norm"] = optax.global_norm(grads)
            return (optax.apply_updates(params, updates), opt_state), metrics

        keys = jax.random.split(step_rng, config.optim.grad_accum_steps)
        (params, opt_state), metrics = jax.lax.scan(
            micro_step, (state["params"], state["opt_state"]), (batch, keys))
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                     "rng": rng}
        return new_state, jax.tree.map(jnp.mean, metrics)

    def eval_step(params, batch, rng):
        return token_losses(params, batch["tokens"], batch["mask"], rng, cfg)

    micro_batches = sharding.batch_sharding(mesh, 1)  # [A, B, L]
    train_jit = jax.jit(train_step, in_shardings=(state_shardings, micro_batches),
                        out_shardings=(state_shardings, replicated), donate_argnums=0)
    eval_jit = jax.jit(eval_step, in_shardings=(param_shardings, sharding.batch_sharding(mesh),
                                                replicated))

    def on_mesh(fn):
        def call(*args):
            with sharding.activate(mesh):  # traced and compiled at the first call
                return fn(*args)
        return call

    def lower_train_step(batch: dict) -> jax.stages.Lowered:
        with sharding.activate(mesh):
            return train_jit.lower(abstract, batch)

    return Trainer(model, mesh, abstract, init_state, on_mesh(train_jit), on_mesh(eval_jit),
                   lower_train_step)


# ----------------------------------------------------------------------------- logs


def _say(message: str, *args) -> None:
    """Progress for the person running the job: stdout of process 0 (library chatter is quieter)."""
    if jax.process_index() == 0:
        print(message % args if args else message, flush=True)


class MetricsLog:
    """metrics.jsonl and TensorBoard events (process 0). A resumed run first drops the lines
    after its starting step, so the file reads as if the run had never stopped; a fresh one
    starts the file anew. Local files are appended to; remote ones (gs://, no append) rewritten.
    """

    def __init__(self, workdir: str, start_step: int):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.path = epath.Path(workdir) / METRICS_FILE
        self.remote = "://" in workdir
        self.records: list[dict] = []
        if start_step and self.path.exists():
            self.records = [r for r in map(json.loads, self.path.read_text().splitlines())
                            if r["step"] <= start_step]
        self._rewrite()
        self.tb = tensorboardX.SummaryWriter(str(epath.Path(workdir) / "tensorboard"),
                                             purge_step=start_step + 1 if start_step else None)

    def _rewrite(self) -> None:
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.records.append({"step": step, **metrics})
        if self.remote:
            self._rewrite()
        else:
            with self.path.open("a") as f:
                f.write(json.dumps(self.records[-1]) + "\n")
        for name, value in metrics.items():
            self.tb.add_scalar(name if "/" in name else f"train/{name}", value, step)
        self.tb.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def _progress(step: int, total: int, m: dict) -> str:
    """The progress line; with thoughts, the loss is split into its NLL and policy term (times
    its weight), so that a growing policy term does not read as a diverging model."""
    talk = " ".join(f"{m[k]:.3f}" for k in sorted(m) if k.startswith("loss_talk_"))
    thinking = (f"(nll {m['nll']:.4f} + policy {m['loss'] - m['nll']:.3g})  "
                f"base {m['loss_base']:.4f}  talk [{talk}]  reward {m['reward_mean']:.4f}  "
                f"w {m['mixing_weight_mean']:.3g}  ") if talk else ""
    return (f"step {step}/{total}  loss {m['loss']:.4f}  {thinking}|g| {m['grad_norm']:.3g}  "
            f"lr {m['learning_rate']:.3g}  {m['tokens_per_s']:.0f} tok/s  "
            f"{m['step_time_s']:.2f} s/step  "
            f"ETA {_duration(m['step_time_s'] * (total - step))}")


# ----------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class Evaluation:
    """One held-out evaluation: logged metrics, decoded thoughts, per-token losses of the valid
    tokens in a fixed order (`base` [n]; `talk` [T, n], NaN where an offset has no target)."""

    metrics: dict
    samples: list[str]
    base: np.ndarray
    talk: np.ndarray


def evaluate(trainer: Trainer, params, batches: list[dict], seed: int,
             start_loss: np.ndarray | None = None) -> Evaluation:
    """Held-out losses of the base pass and with thinking, overall and on the hardest decile of
    the starting model (`start_loss`, per valid token; None: this evaluation is the start), the
    talk loss per offset, and a few decoded thoughts from the first row. Thoughts use a fixed
    key."""
    rng = jax.device_put(jax.random.PRNGKey(seed + 1),
                         jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec()))
    parts = []
    for local in batches:
        out = trainer.eval_step(params, sharding.global_batch(local, trainer.mesh), rng)
        parts.append(jax.tree.map(
            lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), out))
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    valid_BTL, talk_BTL = cat("valid"), cat("talk")
    valid_BL = valid_BTL[:, 0]
    base = cat("base")[valid_BL]
    talk = np.where(valid_BTL, talk_BTL, np.nan).transpose(1, 0, 2)[:, valid_BL]  # [T, n]
    start = base if start_loss is None else start_loss
    if start.shape != base.shape:
        raise ValueError(f"the starting model's losses cover {start.size} held-out tokens, this "
                         f"evaluation {base.size}: the held-out rows changed; delete the "
                         f"workdir's {heldout.DIRECTORY}/ to choose them again")
    hard = heldout.deciles(start) == heldout.N_DECILES - 1
    metrics = {"eval/loss_base": float(base.mean()), "eval/loss_think": float(talk[0].mean()),
               "eval/loss_base_hard": float(base[hard].mean()),
               "eval/loss_think_hard": float(talk[0][hard].mean()), "eval/tokens": int(base.size)}
    if trainer.model.cfg.thinks:
        metrics.update({f"eval/loss_talk_{t}": float(np.nanmean(talk[t]))
                        for t in range(talk.shape[0])})
    # Global row 0 is process 0's first row, and process 0 is the one that logs.
    samples = _thought_samples(trainer, batches[0]["tokens"][0], parts[0].valid[0, 0],
                               parts[0].thoughts[0]) if trainer.model.cfg.thinks else []
    return Evaluation(metrics, samples, base, talk)


def _thought_samples(trainer: Trainer, tokens_L: np.ndarray, valid_L: np.ndarray,
                     thoughts_LS: np.ndarray) -> list[str]:
    """'<context> <|startthought|>thought<|endthought|> -> next' at a few positions of a row
    (`valid_L`: where the next token is real)."""
    tok = trainer.model.tokenizer
    positions = np.flatnonzero(valid_L)
    if not positions.size:
        return []
    picks = positions[np.linspace(0, positions.size - 1, SAMPLE_THOUGHTS).astype(int)]
    return [f"{tok.decode(tokens_L[max(0, j - 12):j + 1])!r} {START_THOUGHT}"
            f"{tok.decode(thoughts_LS[j])!r}{END_THOUGHT} -> {tok.decode(tokens_L[j + 1:j + 2])!r}"
            for j in np.unique(picks)]


# ----------------------------------------------------------------------------- the run


def check_config(config: ml_collections.ConfigDict) -> None:
    """Reject settings no run can use, naming them."""
    for key in ("train_steps", "batch_size", "seq_len", "log_every", "checkpoint_every",
                "checkpoint_keep", "eval_batches"):
        if config[key] < 1:
            raise ValueError(f"{key}={config[key]} must be >= 1")
    if config.eval_every < 0:
        raise ValueError(f"eval_every={config.eval_every} must be >= 0 (0: only at start and end)")


def _batches(data_iter: Iterator[dict], trainer: Trainer, accum: int) -> dict:
    """The next `accum` host batches, stacked [A, B_local, L] and made global."""
    local = [next(data_iter) for _ in range(accum)]
    stacked = {k: np.stack([b[k] for b in local]) for k in ("tokens", "mask")}
    return sharding.global_batch(stacked, trainer.mesh, batch_axis=1)


def _global_rows(local: list[dict]) -> dict[str, np.ndarray]:
    """Every host's rows of the batches, stacked [N, B, L] in global row order."""
    rows = {}
    for k in ("tokens", "mask"):
        by_row = np.stack([b[k] for b in local]).swapaxes(0, 1)  # [B_local, N, L]
        if jax.process_count() > 1:
            by_row = np.asarray(multihost_utils.process_allgather(by_row, tiled=True))
        rows[k] = by_row.swapaxes(0, 1)
    return rows


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Train per `config` in `workdir` (resuming if it holds checkpoints); returns the logged
    records of process 0 (metrics.jsonl)."""
    check_config(config)
    config_lib.check_model_keys(config.model)
    if config.distributed:
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as e:
            raise ValueError(
                f"distributed=True, but this machine is not a host of a TPU pod ({e}): such runs "
                "are started on every host by launch/train.sh; to run this config on one "
                "machine, add --config.distributed=False") from None
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.batch_size, mesh)
    outputs.prepare_workdir(workdir, jax.process_index())
    _say("config:\n%s", config)
    _say("mesh: %s", sharding.describe(mesh))
    checkpoint.save_config(workdir, config)
    model = config_lib.load_model(config, workdir)
    check_batch(model.cfg, config.seq_len)
    trainer = build(config, model, mesh)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(trainer.abstract_state["params"]))
    _say("model: %s parameters", f"{n_params:,}")

    data_kwargs = dict(seq_len=config.seq_len, global_batch=config.batch_size,
                       process_index=jax.process_index(), process_count=jax.process_count())
    data_iter = data.make_dataset(config.data, model.tokenizer, seed=config.seed, **data_kwargs)
    rows = heldout.read_rows(workdir)
    if rows is None:  # the first run in this workdir fixes the held-out rows
        rows = _global_rows(data.heldout_batches(
            config.data, model.tokenizer, num_batches=config.eval_batches, **data_kwargs))
        if jax.process_index() == 0:
            heldout.write_rows(workdir, rows)
    heldout_rows = heldout.host_rows(rows, jax.process_index(), jax.process_count())
    ckpts = checkpoint.Checkpoints(workdir, config.checkpoint_keep)
    try:
        return _loop(config, workdir, trainer, ckpts, data_iter, heldout_rows)
    finally:
        ckpts.close()


def _loop(config, workdir, trainer: Trainer, ckpts: checkpoint.Checkpoints, data_iter,
          heldout_rows: list[dict]) -> list[dict]:
    state = ckpts.restore(trainer.abstract_state, data_iter)
    fresh = state is None
    if fresh:
        state = trainer.init_state(config.seed)
    step = int(state["step"])
    if step >= config.train_steps:
        _say("the run in %s is already complete at step %d: nothing to train. Train it further "
             "with --config.train_steps=N (N > %d), or afresh in a new --workdir.", workdir, step,
             step)
    else:
        _say("starting at step %d of %d%s", step, config.train_steps,
             "" if fresh else f" (resumed from {workdir})")
    log = MetricsLog(workdir, step)
    lr_fn = optim.learning_rate_fn(config.optim, config.train_steps)
    tokens_per_step = config.optim.grad_accum_steps * config.batch_size * config.seq_len
    saved = step if not fresh else None
    start_loss = heldout.read_start_loss(workdir)

    def run_eval(at: int, params) -> None:
        nonlocal start_loss
        began = time.perf_counter()
        result = evaluate(trainer, params, heldout_rows, config.seed, start_loss)
        main_process = jax.process_index() == 0
        if start_loss is None:  # the first evaluation: its base losses define the difficulty
            start_loss = result.base
            if main_process:
                heldout.write_start_loss(workdir, start_loss)
        if main_process:
            heldout.write_losses(workdir, at, result.base, result.talk)
            path = epath.Path(workdir) / THOUGHTS_FILE  # rewritten whole: gs:// cannot append
            kept = path.read_text() if path.exists() else ""
            path.write_text(kept + json.dumps({"step": at, "thoughts": result.samples}) + "\n")
        metrics = result.metrics
        log.write(at, metrics)
        took = time.perf_counter() - began
        if trainer.model.cfg.thinks:
            _say("eval at step %d (%.1f s): base %.4f  thinking %.4f  hardest decile: base %.4f  "
                 "thinking %.4f", at, took, metrics["eval/loss_base"],
                 metrics["eval/loss_think"], metrics["eval/loss_base_hard"],
                 metrics["eval/loss_think_hard"])
        else:
            _say("eval at step %d (%.1f s): loss %.4f  hardest decile %.4f", at, took,
                 metrics["eval/loss_base"], metrics["eval/loss_base_hard"])
        for sample in result.samples:
            _say("thought: %s", sample)
        log.text(at, "thoughts", "\n\n".join(result.samples))

    if fresh:
        (epath.Path(workdir) / THOUGHTS_FILE).unlink(missing_ok=True)  # from a run that crashed
        run_eval(0, state["params"])
    window: list[float] = []  # seconds per step since the last log
    compiled = False
    while step < config.train_steps:
        start = time.perf_counter()
        batch = _batches(data_iter, trainer, config.optim.grad_accum_steps)
        state, metrics = trainer.train_step(state, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        step += 1
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            kept = f"the last checkpoint (step {saved}) is kept" if saved is not None else \
                "no checkpoint was saved"
            raise NonFiniteLoss(f"loss {metrics['loss']} / gradient norm {metrics['grad_norm']} "
                                f"at step {step}: stopped without saving; {kept}")
        seconds = time.perf_counter() - start
        if compiled:
            window.append(seconds)
        else:  # the first step of a process compiles: not counted in the speed
            _say("step %d with compilation: %.1f s", step, seconds)
            compiled = True
        if step % config.log_every == 0 or step == config.train_steps:
            step_time = sum(window) / len(window) if window else seconds
            metrics.update(learning_rate=float(lr_fn(step - 1)), step_time_s=step_time,
                           tokens_per_s=tokens_per_step / step_time)
            window = []
            log.write(step, metrics)
            _say(_progress(step, config.train_steps, metrics))
        if (config.eval_every and step % config.eval_every == 0) or step == config.train_steps:
            run_eval(step, state["params"])
        stop = ckpts.should_stop(step)
        if step % config.checkpoint_every == 0 or step == config.train_steps or stop:
            ckpts.save(step, state, data_iter)
            saved = step
        if stop:
            ckpts.wait()
            _say("stopped by SIGTERM at step %d; checkpoint saved", step)
            break
    ckpts.wait()
    records = log.records if log.enabled else []
    log.close()
    _summary(records, trainer.model.cfg.thinks)
    return records


def _summary(records: list[dict], thinks: bool) -> None:
    """Held-out losses at the first and the last evaluation ("hardest decile": the tenth of the
    held-out tokens the starting model found hardest)."""
    evals = [r for r in records if "eval/loss_base" in r]
    if len(evals) < 2:
        return
    first, last = evals[0], evals[-1]
    print(f"held-out loss (nats/token), step {first['step']} -> step {last['step']}:")
    rows = (("base", "eval/loss_base"), ("with thinking", "eval/loss_think"),
            ("hardest decile, base", "eval/loss_base_hard"),
            ("hardest decile, with thinking", "eval/loss_think_hard"))
    for name, key in rows if thinks else rows[::2]:
        print(f"  {name + ':':31s}{first[key]:.4f} -> {last[key]:.4f}")


# ----------------------------------------------------------------------------- compile only

# Cloud TPU v4 slices are named by TensorCores, two per chip; JAX runs each chip as one
# ("megacore") device. Slice -> chips along x, y, z (TensorCores / 2 in all).
V4_SLICES = {"v4-8": "2x2x1", "v4-16": "2x2x2", "v4-32": "2x2x4", "v4-64": "2x4x4",
             "v4-128": "4x4x4", "v4-256": "4x4x8", "v4-512": "4x8x8", "v4-1024": "8x8x8",
             "v4-2048": "8x8x16", "v4-4096": "8x16x16"}
# HBM per device that the XLA TPU compiler (libtpu 0.0.51) lets a program use, as its
# out-of-memory error states it; compile-only devices report no memory stats. A v4 chip has
# 32 GiB, a v5e 16, a v6e 32.
HBM_GIB = {"TPU v4": 30.75, "TPU v5 lite": 15.75, "TPU v5": 95.73, "TPU v6 lite": 31.24}


class DoesNotFit(ValueError):
    """The compiled train step needs more memory per device than the device has."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def compile_devices(accelerator: str) -> tuple[str, list[jax.Device]]:
    """(topology, devices) to compile for: "cpu" (this host's CPU devices), a TPU v4 slice
    ("v4-32") or a TPU topology ("v4:2x4x4", "v5e:4x4"). TPU devices are compile-only
    descriptions from libtpu: no TPU is needed."""
    if accelerator == "cpu":
        return "cpu", jax.devices("cpu")
    topology = f"v4:{V4_SLICES[accelerator]}" if accelerator in V4_SLICES else accelerator
    if ":" not in topology:
        raise ValueError(f"--compile_only={accelerator}: expected cpu, a TPU v4 slice "
                         f"({', '.join(V4_SLICES)}) or a TPU topology such as v4:2x2x4")
    from jax.experimental import topologies

    megacore = {"chip_config_name": "megacore"} if topology.startswith("v4:") else {}
    try:
        devices = list(topologies.get_topology_desc(topology, "tpu", **megacore).devices)
    except (RuntimeError, jax.errors.JaxRuntimeError) as e:
        raise ValueError(f"--compile_only={accelerator}: no TPU topology {topology} "
                         f"({str(e).splitlines()[0]}); compiling for a TPU needs libtpu "
                         "(pip install libtpu)") from None
    if accelerator in V4_SLICES and len(devices) != int(accelerator[3:]) // 2:
        raise ValueError(f"{accelerator}: topology {topology} has {len(devices)} devices, "
                         f"expected {int(accelerator[3:]) // 2} chips")
    return topology, devices


def device_hbm_bytes(device: jax.Device) -> int | None:
    """Memory a program may use on `device`: its memory stats, else HBM_GIB by kind."""
    try:
        stats = device.memory_stats()
    except jax.errors.JaxRuntimeError:  # compile-only devices have none
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    gib = HBM_GIB.get(device.device_kind)
    return None if gib is None else int(gib * 2**30)


def _gib(n: float) -> float:
    return float(f"{n / 2**30:.4g}")


def compile_only(config: ml_collections.ConfigDict, accelerator: str,
                 hbm_bytes: int | None = None) -> dict:
    """Compile the run's train step for `accelerator` (see `compile_devices`) without running it
    or loading weights, and report XLA's per-device memory against the HBM (`hbm_bytes`, default
    `device_hbm_bytes`): `fits` is None where the HBM is unknown. Raises DoesNotFit, carrying the
    report, when the step needs more than the HBM or the TPU compiler runs out of it."""
    check_config(config)
    topology, devices = compile_devices(accelerator)
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch_size(config.batch_size, mesh)
    with tempfile.TemporaryDirectory() as workdir:  # a random model's tokenizer, then dropped
        model = config_lib.load_model(config, workdir)
    check_batch(model.cfg, config.seq_len)
    trainer = build(config, model, mesh)
    shape = (config.optim.grad_accum_steps, config.batch_size, config.seq_len)
    batch_sharding = sharding.batch_sharding(mesh, 1)
    batch = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding),
             "mask": jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=batch_sharding)}
    hbm = device_hbm_bytes(devices[0]) if hbm_bytes is None else hbm_bytes
    cfg = model.cfg
    report = {
        "accelerator": accelerator, "topology": topology, "devices": len(devices),
        "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape),
        "parameters": sum(math.prod(x.shape) for x in
                          jax.tree.leaves(trainer.abstract_state["params"])),
        "accum_batch_len": list(shape), "n_passes": cfg.n_passes, "n_ahead": cfg.n_ahead,
        "n_ahead_talk": cfg.n_ahead_talk, "hbm_gib": None if hbm is None else _gib(hbm)}
    start = time.perf_counter()
    try:
        compiled = trainer.lower_train_step(batch).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        report.update(compile_s=round(time.perf_counter() - start, 1), fits=False,
                      error=str(e).splitlines()[0])
        raise DoesNotFit(f"{accelerator}: the compiler ran out of device memory: "
                         f"{report['error']}", report) from None
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes)
    report.update(compile_s=round(time.perf_counter() - start, 1),
                  argument_gib=_gib(mem.argument_size_in_bytes),
                  output_gib=_gib(mem.output_size_in_bytes),
                  alias_gib=_gib(mem.alias_size_in_bytes), temp_gib=_gib(mem.temp_size_in_bytes),
                  total_gib=_gib(total), fits=None if hbm is None else total <= hbm)
    if report["fits"] is False:
        raise DoesNotFit(
            f"{accelerator}: the train step needs {report['total_gib']} GiB per device, more "
            f"than the {report['hbm_gib']} GiB of a {report['device_kind']} device (mesh "
            f"{' '.join(f'{a}={n}' for a, n in mesh.shape.items())}): split it over more "
            "devices or lower batch_size or seq_len", report)
    return report


# ----------------------------------------------------------------------------- command line

def define_flags() -> None:
    """The command line's flags (defined when this module runs as the program)."""
    config_flags.DEFINE_config_file("config", None, "run config file (configs/*.py)",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "checkpoints and logs; reused to resume")
    flags.DEFINE_string(
        "compile_only", None, "do not train: compile the train step for this accelerator (a TPU "
        "v4 slice such as v4-64, a TPU topology such as v4:2x4x4, or cpu) on this machine, print "
        "its per-device memory against the HBM as JSON, exit 1 if it does not fit (TPUs need "
        "libtpu)")


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error and exit with `code`."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors: a bad flag, an unknown --config.KEY (config_flags
    raises a bare KeyError/AttributeError for some), a config file that does not load; and a
    --help that exits 0 and shows the config's keys."""
    if any(a in HELP_FLAGS for a in argv[1:]):
        _help([a for a in argv if a not in HELP_FLAGS])
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e), 2)
    except (AttributeError, KeyError) as e:
        message = str(e)  # the key's name, quoted and escaped, and maybe a suggestion
        plain = message.replace("\\", "")
        named = [a.split("=", 1)[0] for a in argv if a.startswith("--config.") and any(
            f"'{part}'" in plain for part in a.split("=", 1)[0].split(".")[1:])]
        guess = re.search(r'Did you mean "([^"]+)"', message)
        hint = f" (did you mean {guess.group(1)!r}?)" if guess else ""
        fail(f"unknown config key {named[0] if named else message}{hint}", 2)
    _loaded_config()
    return rest


def _loaded_config() -> ml_collections.ConfigDict | None:
    """--config's ConfigDict (None if not given); a file that does not load is a one-line error
    (config_flags defers it to the first read)."""
    config = flags.FLAGS["config"].value
    try:
        config is None or config.keys()  # a config that failed to load raises on any access
        return config
    except OSError as e:
        cause = str(e.__cause__ or e).strip().splitlines()[-1].strip()
        fail(f"--config: the config file does not load ({cause}); name one of configs/*.py, "
             "for example --config=configs/tiny.py", 2)


def _help(argv: list[str]) -> None:
    """The program's doc, its flags, and how to see and set config keys; exits 0."""
    print((sys.modules["__main__"].__doc__ or "").strip() + "\n")
    print(flags.FLAGS.main_module_help())
    print("\nEvery key of the config file can be set with --config.KEY=VALUE, for example "
          "--config.train_steps=100 --config.quiet_star.n_ahead=8. Each run prints its resolved "
          "config first; --config=FILE --help lists FILE's keys:")
    try:
        flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError):
        sys.exit(0)
    config = flags.FLAGS["config"].present and _loaded_config()
    if config:
        print(config)
    sys.exit(0)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config, workdir, accelerator = (flags.FLAGS[k].value
                                    for k in ("config", "workdir", "compile_only"))
    if config is None:
        raise app.UsageError("--config is required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and jax log every detail at INFO
    if accelerator:
        try:
            report = compile_only(config, accelerator)
        except DoesNotFit as e:
            print(json.dumps(e.report), flush=True)
            fail(str(e))
        except (ValueError, FileNotFoundError) as e:
            fail(str(e))
        print(json.dumps(report), flush=True)
        return
    if not workdir:
        raise app.UsageError("--workdir is required (except with --compile_only)")
    try:
        run(config, workdir)
    except (ValueError, FileNotFoundError, NonFiniteLoss) as e:
        fail(str(e))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
