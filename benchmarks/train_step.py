"""Speed and memory of one Quiet-STaR training step, against the authors' way of computing it.

    python benchmarks/train_step.py [--config cpu|gpu_1b] [--steps 5] [--naive_steps 3]
                                    [--naive cached|rerun] [--skip_naive] [--peak_flops F]
                                    [--no_remat_passes] [--plain]
    python benchmarks/train_step.py --against DIR [--pairs 8]
    python benchmarks/train_step.py --against_authors DIR [--authors_python PY] [--pairs 8]
    python benchmarks/train_step.py --rlp [--config cpu] [--pairs 8]
    python benchmarks/train_step.py --check

A step is the loss (thoughts sampled), its gradient and the AdamW update of `qstar_jax.optim`,
jitted with parameters and optimizer state donated. Prints one JSON object: for our step
(`objective.quiet_star_loss`) and the naive one (`naive_rollout.naive_loss`: the authors' KV-cached
growing mask, or with `--naive rerun` the whole growing sequence re-run every pass) the compile
time, the median step time, tokens/s (B * L / step time), XLA's memory analysis of the compiled
step, the rise of the process's peak RSS, FLOP counts, MFU where the device's peak is known, and
the naive step's time and memory over ours. `--against DIR` times our step built from this
checkout and from the checkout DIR in two processes whose steps alternate, and prints the paired
ratio; `--against_authors DIR` does the same with the authors' own code (`authors_step.py`).
`--rlp` compiles the training step of `qstar_jax.steps` for both objectives (RLP keeps and
updates its EMA copy), prints XLA's memory analysis of each and times them in alternating steps
of one process, so that other load on the machine slows both alike. `--check` prints how far
both naive forms' losses and gradients are from ours on a tiny model with forced thoughts. See
README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from naive_rollout import naive_loss  # benchmarks/ is on the path when run as a script

from qstar_jax import optim, steps
from qstar_jax.model import ModelConfig, init_params
from qstar_jax.objective import quiet_star_loss
from qstar_jax.thoughts import N_THOUGHT_TOKENS, QuietStarConfig, add_thought_params

BASE_VOCAB = 32000
REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Setup:
    """A named benchmark: the model (without the thought tokens) and the batch it trains on."""

    model: ModelConfig
    batch: int
    length: int
    n_passes: int = 2
    n_ahead: int = 12
    n_ahead_talk: int = 4


SETUPS = {
    # Layers not rematerialised inside a pass: every chain pass already is, and at this size a
    # second, inner recomputation only repeats work.
    "cpu": Setup(ModelConfig(vocab_size=BASE_VOCAB, d_model=256, n_layers=4, n_heads=8,
                             n_kv_heads=2, ffn_dim=704, remat_policy="none"), batch=2, length=128),
    # The shape of TinyLlama-1.1B; bf16 compute, float32 parameters and optimizer state; the
    # paper's batch of 8. Its memory compiled for a CPU: benchmarks/RESULTS.md, "talk passes'
    # head after the scan" and "train step on CPU".
    "gpu_1b": Setup(ModelConfig(vocab_size=BASE_VOCAB, d_model=2048, n_layers=22, n_heads=32,
                                n_kv_heads=4, ffn_dim=5632, dtype="bfloat16"),
                    batch=8, length=256),
}

# Dense bf16 peak FLOP/s by a substring of jax's device_kind.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5e": 197e12}

LossFn = Callable[..., tuple[jax.Array, dict]]
NAIVE: dict[str, LossFn] = {
    "cached": naive_loss,
    "rerun": lambda *args: naive_loss(*args, rerun=True),
}


def quiet_star(setup: Setup) -> tuple[QuietStarConfig, Callable[[jax.Array], dict]]:
    """The Quiet-STaR config and a jitted random initialiser of its parameters."""
    base = setup.model
    model = base.replace(vocab_size=base.vocab_size + N_THOUGHT_TOKENS)
    cfg = QuietStarConfig(model, base.vocab_size, base.vocab_size + 1, pad_id=0,
                          n_ahead=setup.n_ahead, n_ahead_talk=setup.n_ahead_talk,
                          n_passes=setup.n_passes)

    def init(rng):
        decoder_rng, head_rng = jax.random.split(rng)
        return add_thought_params(init_params(base, decoder_rng), base, 1, head_rng)[1]

    return cfg, jax.jit(init)


def model_flops(cfg: QuietStarConfig, batch: int, length: int) -> float:
    """Useful FLOPs of one step (forward + backward = 3x forward), counted once per token.

    Matmuls: 2 * layer weights per token of every pass (the base pass once, P rationales of
    `n_chain_passes` chain passes), 2 * D * V per token whose logits are used (base, sampling and
    talk passes), the mixing head per talk token. Attention: 4 * N * H * E per query-key pair,
    L keys per base query and L + k per chain query at pass k.
    """
    m = cfg.model
    layer = m.n_layers * (m.d_model * m.head_dim * 2 * (m.n_heads + m.n_kv_heads)
                          + 3 * m.d_model * m.ffn_dim)
    chains = cfg.n_passes * batch * length if cfg.thinks else 0  # chain tokens per pass
    n_chain = cfg.n_chain_passes
    tokens = batch * length + chains * n_chain
    logit_tokens = batch * length + chains * (cfg.n_sampled + cfg.n_ahead_talk)
    pairs = batch * length * length + chains * sum(length + k for k in range(1, n_chain + 1))
    forward = (2 * layer * tokens + 2 * m.d_model * m.vocab_size * logit_tokens
               + 2 * (3 * m.d_model ** 2 + m.d_model) * chains * cfg.n_ahead_talk
               + 4 * m.n_layers * m.n_heads * m.head_dim * pairs)
    return 3.0 * forward


def make_step(loss_fn: LossFn, cfg: QuietStarConfig, optimizer: optax.GradientTransformation):
    """jit(step(params, opt_state, batch, rng) -> (params, opt_state, loss)), state donated."""

    def step(params, opt_state, batch, rng):
        grad_fn = jax.value_and_grad(lambda p: loss_fn(p, batch, rng, cfg), has_aux=True)
        (loss, _), grads = grad_fn(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def compile_step(step, *args) -> tuple[Callable, dict]:
    """The step compiled ahead of time for `args`, with its compile time and XLA's memory and
    FLOP counts."""
    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    memory = {"argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
              "temp": mem.temp_size_in_bytes, "alias": mem.alias_size_in_bytes}
    memory["peak"] = memory["argument"] + memory["output"] + memory["temp"] - memory["alias"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return compiled, {"compile_s": round(compile_s, 2), "memory_bytes": memory,
                      "memory_gib": round(memory["peak"] / 2 ** 30, 3),
                      "xla_flops_loop_bodies_once": (cost or {}).get("flops")}


def measure(step, params, opt_state, batch, rng, steps: int, flops: float,
            peak_flops: float | None) -> dict:
    """Compile ahead of time, then `steps` timed steps; figures of the compiled step."""
    rss_before = peak_rss_bytes()
    compiled, out = compile_step(step, params, opt_state, batch, rng)
    memory = out["memory_bytes"]
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    if limit and memory["peak"] > limit:
        out["skipped"] = (f"needs {memory['peak'] / 2 ** 30:.1f} GiB, "
                          f"the device has {limit / 2 ** 30:.1f}")
        return out
    if steps == 0:  # compile and memory figures only
        return out
    times = []
    cpu_start = time.process_time()
    for _ in range(steps):
        start = time.perf_counter()
        params, opt_state, loss = jax.block_until_ready(compiled(params, opt_state, batch, rng))
        times.append(time.perf_counter() - start)
    cores_busy = (time.process_time() - cpu_start) / sum(times)
    step_s = float(np.median(times))
    b, length = batch["tokens"].shape
    out.update(step_s=round(step_s, 4), steps=steps, step_s_range=[round(min(times), 3),
                                                                   round(max(times), 3)],
               host_cores_busy=round(cores_busy, 2),
               tokens_per_s=round(b * length / step_s, 1),
               peak_rss_growth_mib=round((peak_rss_bytes() - rss_before) / 2 ** 20, 1),
               loss=float(loss), mfu=round(flops / step_s / peak_flops, 4) if peak_flops else None)
    device_stats = jax.devices()[0].memory_stats()
    if device_stats and "peak_bytes_in_use" in device_stats:
        out["device_peak_bytes_in_use"] = device_stats["peak_bytes_in_use"]
    return out


def prepare(name: str, remat_passes: bool):
    """The named setup's Quiet-STaR config, parameter initialiser, optimizer and batch."""
    setup = SETUPS[name]
    cfg, init = quiet_star(setup)
    cfg = cfg.replace(remat_passes=remat_passes)
    optimizer = optim.make_optimizer(optim.default_config(), train_steps=1000)
    tokens = np.random.default_rng(0).integers(1, BASE_VOCAB, (setup.batch, setup.length))
    batch = {"tokens": jnp.asarray(tokens, jnp.int32),
             "mask": jnp.ones((setup.batch, setup.length), bool)}
    return setup, cfg, init, optimizer, batch


def benchmark(name: str, steps: int, naive_steps: int, naive: str | None,
              peak_flops: float | None, remat_passes: bool = True) -> dict:
    """Our step, then the naive one (`naive` a key of NAIVE, None: ours only)."""
    setup, cfg, init, optimizer, batch = prepare(name, remat_passes)
    device = jax.devices()[0]
    if peak_flops is None:
        peak_flops = next((v for k, v in PEAK_FLOPS.items() if k in device.device_kind), None)
    flops = model_flops(cfg, setup.batch, setup.length)
    result = {
        "config": name, "device": device.device_kind, "machine": platform.machine(),
        "jax": jax.__version__,
        "model": {k: getattr(setup.model, k) for k in (
            "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "dtype", "param_dtype")}
        | {"vocab_size": cfg.model.vocab_size, "params": cfg.model.num_params},
        "quiet_star": {"batch": setup.batch, "length": setup.length, "n_passes": cfg.n_passes,
                       "n_ahead": cfg.n_ahead, "n_ahead_talk": cfg.n_ahead_talk},
        "model_flops_per_step": flops, "peak_flops": peak_flops,
        "remat_passes": remat_passes,
    }
    paths = [("ours", quiet_star_loss, steps)]
    if naive is not None:
        paths.append(("naive", NAIVE[naive], naive_steps))
        result["naive_form"] = naive
    for path, loss_fn, n in paths:
        # With no timed steps nothing runs: shapes are enough, and nothing is allocated.
        params = init(jax.random.key(0)) if n else jax.eval_shape(init, jax.random.key(0))
        opt_state = optimizer.init(params) if n else jax.eval_shape(optimizer.init, params)
        result[path] = measure(make_step(loss_fn, cfg, optimizer), params, opt_state, batch,
                               jax.random.key(1), n, flops, peak_flops)
        del params
    if naive is not None:
        ours, theirs = result["ours"], result["naive"]
        if "step_s" in ours and "step_s" in theirs:
            result["speedup"] = round(theirs["step_s"] / ours["step_s"], 2)
        result["memory_ratio"] = round(
            theirs["memory_bytes"]["peak"] / ours["memory_bytes"]["peak"], 2)
    return result


def compiled_ours(name: str, remat_passes: bool) -> tuple[Callable, dict, tuple]:
    """Our step for the named setup, compiled, with `compile_step`'s figures and the arguments
    of a first call: (params, opt_state, batch, rng), the state initialised."""
    _, cfg, init, optimizer, batch = prepare(name, remat_passes)
    params, rng = init(jax.random.key(0)), jax.random.key(1)
    opt_state = optimizer.init(params)
    compiled, figures = compile_step(make_step(quiet_star_loss, cfg, optimizer), params,
                                     opt_state, batch, rng)
    return compiled, figures, (params, opt_state, batch, rng)


def serve(name: str, remat_passes: bool) -> None:
    """Worker of `paired`: compile our step and take one step, print its figures as a JSON line,
    then take one timed step per line read from stdin and print its time as a JSON line."""
    compiled, figures, (params, opt_state, batch, rng) = compiled_ours(name, remat_passes)
    params, opt_state, loss = jax.block_until_ready(compiled(params, opt_state, batch, rng))
    packages = {str(Path(module.__file__).resolve().parent) for name, module in sys.modules.items()
                if name.split(".")[0] == "qstar_jax"}
    figures.update(packages=sorted(packages), device=jax.devices()[0].device_kind,
                   first_loss=float(loss))
    print(json.dumps(figures), flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        params, opt_state, loss = jax.block_until_ready(compiled(params, opt_state, batch, rng))
        print(json.dumps({"step_s": time.perf_counter() - start, "loss": float(loss),
                          "peak_rss_gib": round(peak_rss_bytes() / 2 ** 30, 3)}), flush=True)


def paired(commands: dict[str, tuple[list[str], dict[str, str]]], pairs: int,
           check_first: Callable[[str, dict], None] = lambda side, first: None) -> dict:
    """Two workers (`serve`'s protocol; `commands`: side -> (command, extra environment)),
    started one after the other, then stepped in turn, `pairs` steps each, the side that goes
    first swapped every pair. Prints nothing; returns each side's first line, step times and
    last peak RSS, and the median of the per-pair ratios (second side over first).

    Separate runs of the same code on a shared machine differ by tens of percent; steps taken in
    turn see the same load, and the median of the per-pair ratios narrows with the number of
    pairs (two copies of one revision: 0.92-1.02 over 2-3 pairs).
    """
    if pairs < 1:
        raise SystemExit(f"--pairs {pairs}: at least one pair is needed")
    # Both workers hold the device (this process never touches it): neither may reserve most of
    # a GPU's memory up front.
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"} | dict(os.environ)
    workers: dict[str, subprocess.Popen] = {}
    result: dict = {"pairs": pairs}

    def reply(side: str) -> dict:
        line = workers[side].stdout.readline()
        if not line:
            raise SystemExit(f"the {side} worker ({' '.join(commands[side][0])}) exited with "
                             f"code {workers[side].wait()}; its error is above")
        return json.loads(line)

    sides = list(commands)
    steps: dict[str, list[dict]] = {side: [] for side in sides}
    try:
        for side in sides:
            command, extra_env = commands[side]
            workers[side] = subprocess.Popen(command, env=env | extra_env, stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, text=True)
            result[side] = reply(side)
            check_first(side, result[side])
        for i in range(pairs):
            for side in sides if i % 2 == 0 else sides[::-1]:
                workers[side].stdin.write("step\n")
                workers[side].stdin.flush()
                steps[side].append(reply(side))
    finally:
        for proc in workers.values():
            proc.kill()
            proc.wait()
    for side in sides:
        times = [s["step_s"] for s in steps[side]]
        result[side].update(step_s=round(float(np.median(times)), 4),
                            step_s_all=[round(x, 3) for x in times],
                            peak_rss_gib=steps[side][-1]["peak_rss_gib"])
    first, second = sides
    ratios = [b["step_s"] / a["step_s"] for a, b in zip(steps[first], steps[second], strict=True)]
    result[f"{second}_over_{first}"] = round(float(np.median(ratios)), 3)
    result[f"{second}_over_{first}_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
    return result


def _serve_command(name: str, remat_passes: bool) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", "--config", name]
    return command if remat_passes else command + ["--no_remat_passes"]


def against_checkout(name: str, against: str, pairs: int, remat_passes: bool = True) -> dict:
    """Our step built from this checkout and from the checkout `against`, each in its own
    process (`serve`, with its checkout first on PYTHONPATH), stepped in turn (`paired`)."""
    roots = {"ours": REPO, "against": Path(against).resolve()}
    if not (roots["against"] / "qstar_jax" / "__init__.py").is_file():
        raise SystemExit(f"--against {against}: no qstar_jax package there; give the root of "
                         "another checkout (e.g. made by `git worktree add DIR REV`)")
    command = _serve_command(name, remat_passes)

    def check_first(side: str, first: dict) -> None:
        # A module missing from DIR is found by the installed package instead, silently.
        if first["packages"] != [str(roots[side] / "qstar_jax")]:
            raise SystemExit(f"the {side} worker imported qstar_jax from {first['packages']}, "
                             f"not only from {roots[side]}: is it a whole checkout?")

    commands = {side: (command, {"PYTHONPATH": str(root)}) for side, root in roots.items()}
    return {"config": name} | paired(commands, pairs, check_first)


def against_authors(authors_dir: str, python: str, pairs: int) -> dict:
    """Our `cpu` step and the authors' PyTorch step (`authors_step.py --serve`, run by `python`,
    an environment with their dependencies), stepped in turn (`paired`); the speed-up is the
    median of the per-pair ratios, the memory ratio that of the two processes' peak RSS."""
    if not Path(python).is_file():
        raise SystemExit(f"--authors_python {python}: no such file; set up the authors' "
                         "environment as benchmarks/authors_step.py's docstring says")
    missing = [name for name in ("modeling_mistral.py", "configuration_mistral.py")
               if not (Path(authors_dir) / name).is_file()]
    if missing:
        raise SystemExit(f"--against_authors {authors_dir}: {', '.join(missing)} missing; give "
                         "the directory of their two files (ezelikman/quiet-star)")
    authors = [python, str(Path(__file__).resolve().parent / "authors_step.py"), "--serve",
               "--authors_dir", str(Path(authors_dir).resolve())]
    result = paired({"ours": (_serve_command("cpu", True), {}), "authors": (authors, {})}, pairs)
    result["rss_authors_over_ours"] = round(
        result["authors"]["peak_rss_gib"] / result["ours"]["peak_rss_gib"], 2)
    return {"config": "cpu"} | result


def check() -> dict:
    """Max differences between the naive losses/gradients and ours: tiny model, forced thoughts."""
    base = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
    cfg, init = quiet_star(Setup(base, batch=2, length=10, n_ahead=5, n_ahead_talk=3))
    params = init(jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(2), 10))  # a head that really mixes
    params["mixing_head"] = jax.tree.map(
        lambda x: 0.3 * jax.random.normal(next(keys), x.shape), params["mixing_head"])
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 40, (2, 10))
    tokens[1, -3:] = cfg.pad_id  # right padding: ignored labels, masked keys
    batch = {"tokens": jnp.asarray(tokens, jnp.int32)}
    thoughts = jnp.asarray(rng.integers(1, 40, (2, cfg.n_passes, 10, cfg.n_sampled)), jnp.int32)

    def loss_and_grads(loss_fn):
        f = lambda p: loss_fn(p, batch, jax.random.key(0), cfg, thoughts)  # noqa: E731
        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    (_, ours), grads = loss_and_grads(quiet_star_loss)
    grad_scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
    out = {"loss": float(ours["loss"])}
    for form, loss_fn in NAIVE.items():
        (_, theirs), their_grads = loss_and_grads(loss_fn)
        out[f"naive_{form}"] = {
            "max_abs_diff": {k: float(abs(theirs[k] - ours[k])) for k in theirs},
            "loss_rel_diff": float(abs(theirs["loss"] - ours["loss"]) / abs(ours["loss"])),
            "grad_max_abs_diff_over_max_grad": max(
                float(jnp.abs(a - b).max()) for a, b in zip(
                    jax.tree.leaves(grads), jax.tree.leaves(their_grads), strict=True)
            ) / grad_scale,
        }
    return out


def against_rlp(name: str, pairs: int, remat_passes: bool) -> dict:
    """The train step (`steps.train_step`) under objective "rlp" against "quiet_star": XLA's
    memory analysis of each, and `pairs` steps of each, alternating."""
    _, cfg, init, optimizer, batch = prepare(name, remat_passes)
    batch_UBL = jax.tree.map(lambda x: x[None], batch)
    result, compiled, states = {"config": name, "device": jax.devices()[0].device_kind}, {}, {}
    for objective in ("quiet_star", "rlp"):
        cfg_o = cfg.replace(objective=objective)
        params = init(jax.random.key(0))
        state = {"params": params, "opt_state": optimizer.init(params),
                 "step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(0)}
        if objective == "rlp":
            state["ema_params"] = jax.tree.map(jnp.copy, params)
        step = jax.jit(functools.partial(steps.train_step, cfg=cfg_o, optimizer=optimizer),
                       donate_argnums=0, compiler_options=steps.CPU_COMPILER_OPTIONS)
        compiled[objective], figures = compile_step(step, state, batch_UBL)
        memory = figures["memory_bytes"]
        result[objective] = {"compile_s": figures["compile_s"],
                             "argument_gib": round(memory["argument"] / 2 ** 30, 4),
                             "temp_gib": round(memory["temp"] / 2 ** 30, 4),
                             "peak_gib": figures["memory_gib"], "times": []}
        states[objective], _ = jax.block_until_ready(compiled[objective](state, batch_UBL))
    for _ in range(pairs):
        for objective in ("quiet_star", "rlp"):
            start = time.perf_counter()
            states[objective], _ = jax.block_until_ready(
                compiled[objective](states[objective], batch_UBL))
            result[objective]["times"].append(time.perf_counter() - start)
    for objective in ("quiet_star", "rlp"):
        times = result[objective].pop("times")
        result[objective].update(step_s=round(float(np.median(times)), 4),
                                 step_s_range=[round(min(times), 3), round(max(times), 3)])
    result["rlp_over_quiet_star"] = {"step_time": round(
        result["rlp"]["step_s"] / result["quiet_star"]["step_s"], 3), "peak_memory": round(
        result["rlp"]["peak_gib"] / result["quiet_star"]["peak_gib"], 3)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(SETUPS), default="cpu")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps of our path (0: compile and memory only)")
    parser.add_argument("--naive_steps", type=int, default=3,
                        help="timed steps of the naive path (0: compile and memory only)")
    parser.add_argument("--naive", choices=sorted(NAIVE), default="cached",
                        help="cached: the authors' code (L new tokens a pass against the "
                        "growing keys); rerun: the whole (k+1)L sequence re-run at pass k")
    parser.add_argument("--skip_naive", action="store_true", help="time our step only")
    parser.add_argument("--peak_flops", type=float, help="device peak FLOP/s for MFU "
                        "(default: bf16 peak of a known device kind)")
    parser.add_argument("--plain", action="store_true",
                        help="the same model trained without thoughts (n_ahead 1, n_ahead_talk 1,"
                        " one rationale): what the thoughts cost")
    parser.add_argument("--no_remat_passes", action="store_true",
                        help="keep every chain pass's activations instead of recomputing them "
                        "in the backward pass (QuietStarConfig.remat_passes=False)")
    parser.add_argument("--against", metavar="DIR",
                        help="time our step from this checkout and from the checkout DIR, "
                        "steps alternating in two processes; print the paired ratio")
    parser.add_argument("--against_authors", metavar="DIR",
                        help="time our cpu step and the authors' code (their two files in DIR, "
                        "run by --authors_python), steps alternating; print the paired ratios")
    parser.add_argument("--authors_python", default="/tmp/authors/bin/python",
                        help="python of the authors' environment (authors_step.py)")
    parser.add_argument("--pairs", type=int, default=8,
                        help="steps per side with --against or --against_authors (default 8)")
    parser.add_argument("--rlp", action="store_true",
                        help="the train step under objective rlp against quiet_star: memory, "
                        "and --pairs steps of each, alternating")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # --against's
    parser.add_argument("--check", action="store_true",
                        help="compare the naive losses and gradients with ours, then exit")
    args = parser.parse_args()
    if args.check:
        print(json.dumps(check(), indent=2))
        return
    if args.serve:
        serve(args.config, not args.no_remat_passes)
        return
    if args.rlp:
        print(json.dumps(against_rlp(args.config, args.pairs, not args.no_remat_passes),
                         indent=2))
        return
    if args.against:
        print(json.dumps(against_checkout(args.config, args.against, args.pairs,
                                          not args.no_remat_passes), indent=2))
        return
    if args.against_authors:
        print(json.dumps(against_authors(args.against_authors, args.authors_python, args.pairs),
                         indent=2))
        return
    if args.plain:
        SETUPS[args.config] = dataclasses.replace(SETUPS[args.config], n_ahead=1, n_ahead_talk=1,
                                                  n_passes=1)
    naive = None if args.skip_naive or args.plain else args.naive
    print(json.dumps(benchmark(args.config, args.steps, args.naive_steps, naive,
                               args.peak_flops, not args.no_remat_passes), indent=2))


if __name__ == "__main__":
    main()
