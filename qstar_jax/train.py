"""Quiet-STaR training on a mesh of devices, with checkpoints, held-out evaluation and logs.

    python -m qstar_jax.train --config=configs/tiny.py --workdir=runs/tiny [--config.KEY=VALUE ...]

Writes under the workdir: checkpoints/, config.json (the resolved config of the first start),
config_history.jsonl (the settings resumes changed), metrics.jsonl (one JSON object per logged
step; "eval/..." keys for held-out evaluations), tensorboard/ and, for a random model,
tokenizer/. Run it again with the same workdir to resume (`run_settings`: which settings a resume
may change); SIGTERM or Ctrl-C saves and stops after the step in flight.

    python -m qstar_jax.train --config=configs/tpu_v4.py --compile_only=v4-64 [--config...]

compiles the train step for a TPU slice on this machine (with libtpu, no TPU, no weights read) and
prints its memory per device against the HBM; exit status 1 if it does not fit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_flags

from qstar_jax import (
    checkpoint,
    cli,
    compile_check,
    data,
    heldout,
    loading,
    logs,
    optim,
    outputs,
    run_settings,
    sharding,
    steps,
)
from qstar_jax import config as config_lib
from qstar_jax.errors import ConfigError, DataError, RunStopped
from qstar_jax.rollout import check_batch
from qstar_jax.tokenizer import END_THOUGHT, START_THOUGHT

SAMPLE_THOUGHTS = 3  # decoded thoughts logged at each evaluation


class NonFiniteLoss(RunStopped):
    """The loss or gradient became NaN/inf; the run stops without saving that state."""


class Interrupted(RunStopped):
    """A run stopped before its last step (SIGTERM, Ctrl-C); its checkpoint is kept."""


@dataclasses.dataclass
class Evaluation:
    """One held-out evaluation: logged metrics, decoded thoughts, and the per-token arrays of the
    valid tokens in a fixed order (`heldout.LOSS_KEYS`): losses `base` [n] and `talk` [T, n]
    (NaN where an offset has no target), the most likely tokens `base_argmax`, `think_argmax`
    [n] and the `thoughts` [n, M] before them."""

    metrics: dict
    samples: list[str]
    base: np.ndarray
    talk: np.ndarray
    base_argmax: np.ndarray
    think_argmax: np.ndarray
    thoughts: np.ndarray

    def per_token(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in heldout.LOSS_KEYS}


def evaluate_heldout(trainer: steps.Trainer, params, batches: list[dict], seed: int,
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
        raise DataError(f"the starting model's losses cover {start.size} held-out tokens, this "
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
    return Evaluation(metrics, samples, base, talk, cat("base_argmax")[valid_BL],
                      cat("think_argmax")[valid_BL], cat("thoughts")[valid_BL])


def _thought_samples(trainer: steps.Trainer, tokens_L: np.ndarray, valid_L: np.ndarray,
                     thoughts_LM: np.ndarray) -> list[str]:
    """'<context> <|startthought|>thought<|endthought|> -> next' at a few positions of a row
    (`valid_L`: where the next token is real)."""
    tok = trainer.model.tokenizer
    positions = np.flatnonzero(valid_L)
    if not positions.size:
        return []
    picks = positions[np.linspace(0, positions.size - 1, SAMPLE_THOUGHTS).astype(int)]
    return [f"{tok.decode(tokens_L[max(0, j - 12):j + 1])!r} {START_THOUGHT}"
            f"{tok.decode(thoughts_LM[j])!r}{END_THOUGHT} -> {tok.decode(tokens_L[j + 1:j + 2])!r}"
            for j in np.unique(picks)]


# ----------------------------------------------------------------------------- the run


def _batches(data_iter: Iterator[dict], trainer: steps.Trainer, accum: int) -> dict:
    """The next `accum` host batches, stacked [A, B_local, L] and made global."""
    local = [next(data_iter) for _ in range(accum)]
    stacked = {k: np.stack([b[k] for b in local]) for k in ("tokens", "mask")}
    return sharding.global_batch(stacked, trainer.mesh, batch_axis=1)


def _global_rows(local: list[dict]) -> dict[str, np.ndarray]:
    """Every host's rows of the batches, stacked [W, B, L] in global row order."""
    rows = {}
    for k in ("tokens", "mask"):
        by_row = np.stack([b[k] for b in local]).swapaxes(0, 1)  # [B_local, N, L]
        if jax.process_count() > 1:
            by_row = np.asarray(multihost_utils.process_allgather(by_row, tiled=True))
        rows[k] = by_row.swapaxes(0, 1)
    return rows


def run(config: ml_collections.ConfigDict, workdir: str, allow_changes: bool = False
        ) -> list[dict]:
    """Train per `config` in `workdir` (resuming if it holds checkpoints); returns the logged
    records of process 0 (metrics.jsonl). A resume may change only some settings, and others
    with `allow_changes` (`run_settings`)."""
    config_lib.check_run_config(config)
    config_lib.check_model_keys(config.model)
    if config.distributed:
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as e:
            raise ConfigError(
                f"distributed=True, but this machine is not a host of a TPU pod ({e}): such runs "
                "are started on every host by launch/train.sh; to run this config on one "
                "machine, add --config.distributed=False") from None
    mesh = sharding.make_mesh(config.mesh, global_batch=config.batch_size)
    sharding.check_batch_size(config.batch_size, mesh)
    outputs.prepare_workdir(workdir, jax.process_index())
    logs.say("config:\n%s", config)
    logs.say("mesh: %s", sharding.describe(mesh, config.mesh))
    changes = run_settings.check(workdir, config, allow_changes, jax.process_index() == 0)
    model = loading.load_model(config, workdir)
    check_batch(model.cfg, config.seq_len)
    trainer = steps.build(config, model, mesh)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(trainer.abstract_state["params"]))
    logs.say("model: %s parameters%s", f"{n_params:,}", " (the thought parameters included: "
             "start and end embeddings, mixing head)" if trainer.model.cfg.thinks else "")

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
    ckpts = checkpoint.Checkpoints(workdir, config.checkpoint_keep,
                                   checkpoint.largest_array_bytes(trainer.abstract_state))
    try:
        return _loop(config, workdir, trainer, ckpts, data_iter, heldout_rows, changes)
    finally:
        ckpts.close()


def _loop(config, workdir, trainer: steps.Trainer, ckpts: checkpoint.Checkpoints, data_iter,
          heldout_rows: list[dict], changes: dict) -> list[dict]:
    try:
        state = ckpts.restore(trainer.abstract_state, data_iter)
    except checkpoint.LayoutMismatch as e:
        if not changes:
            raise
        raise ConfigError(f"the saved state cannot take this resume's changes "
                          f"({run_settings.describe(changes)}): its arrays differ "
                          f"({e.differences}); resume without those changes") from None
    if changes:
        if jax.process_index() == 0:
            run_settings.record(workdir, changes)
        logs.say("resuming with changed settings: %s (recorded in %s)",
                 run_settings.describe(changes), run_settings.HISTORY_FILE)
    fresh = state is None
    if fresh:
        state = trainer.init_state(config.seed)
    step = int(state["step"])
    if step >= config.train_steps:
        logs.say("the run in %s is already complete at step %d: nothing to train. Train it further "
             "with --config.train_steps=N (N > %d), or afresh in a new --workdir.", workdir, step,
             step)
    else:
        logs.say("starting at step %d of %d%s", step, config.train_steps,
             "" if fresh else f" (resumed from {workdir})")
    log = logs.MetricsLog(workdir, step)
    lr_fn = optim.learning_rate_fn(config.optim, config.train_steps)
    tokens_per_step = config.optim.grad_accum_steps * config.batch_size * config.seq_len
    saved = step if not fresh else None
    start_loss = heldout.read_start_loss(workdir)

    def run_eval(at: int, params) -> None:
        nonlocal start_loss
        began = time.perf_counter()
        result = evaluate_heldout(trainer, params, heldout_rows, config.seed, start_loss)
        main_process = jax.process_index() == 0
        if start_loss is None:  # the first evaluation: its base losses define the difficulty
            start_loss = result.base
            if main_process:
                heldout.write_start_loss(workdir, start_loss)
        if main_process:
            heldout.write_losses(workdir, at, result.per_token())
            logs.append_thoughts(workdir, at, result.samples)
        log.write(at, result.metrics)
        logs.say(logs.eval_line(at, time.perf_counter() - began, result.metrics,
                                trainer.model.cfg.thinks))
        for sample in result.samples:
            logs.say("thought: %s", sample)
        log.text(at, "thoughts", "\n\n".join(result.samples))

    if fresh:
        (epath.Path(workdir) / logs.THOUGHTS_FILE).unlink(missing_ok=True)  # from a crashed run
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
            logs.say("step %d with compilation: %.1f s", step, seconds)
            compiled = True
        if step % config.log_every == 0 or step == config.train_steps:
            step_time = sum(window) / len(window) if window else seconds
            metrics.update(learning_rate=float(lr_fn(step - 1)), step_time_s=step_time,
                           tokens_per_s=tokens_per_step / step_time)
            window = []
            log.write(step, metrics)
            logs.say(logs.progress(step, config.train_steps, metrics))
        if (config.eval_every and step % config.eval_every == 0) or step == config.train_steps:
            run_eval(step, state["params"])
        stop = ckpts.should_stop(step)
        if step % config.checkpoint_every == 0 or step == config.train_steps or stop:
            ckpts.save(step, state, data_iter)
            saved = step
        if stop:
            ckpts.wait()
            logs.say("stopped by %s at step %d; checkpoint saved", ckpts.stopped_by, step)
            break
    ckpts.wait()
    records = log.records if log.enabled else []
    log.close()
    logs.summary(records, trainer.model.cfg.thinks)
    return records


# ----------------------------------------------------------------------------- command line

def define_flags() -> None:
    """The command line's flags (defined when this module runs as the program)."""
    config_flags.DEFINE_config_file("config", None, "run config file (configs/*.py)",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "checkpoints and logs; reused to resume")
    flags.DEFINE_bool("resume_with_changes", False, "resume even where the config changes "
                      "settings a resume keeps unless asked (the optimizer's, model.dtype); each "
                      "change is recorded in the workdir's config_history.jsonl")
    flags.DEFINE_string(
        "compile_only", None, "do not train: compile the train step for this accelerator (a TPU "
        "v4 slice such as v4-64, a TPU topology such as v4:2x4x4, or cpu) on this machine, print "
        "its per-device memory against the HBM as JSON, exit 1 if it does not fit (TPUs need "
        "libtpu)")



def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}", cli.USAGE)
    config, workdir, accelerator = (flags.FLAGS[k].value
                                    for k in ("config", "workdir", "compile_only"))
    if config is None:
        cli.fail("--config is required", cli.USAGE)
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and jax log every detail at INFO
    if accelerator:
        with cli.one_line_errors():
            try:
                report = compile_check.compile_only(config, accelerator)
            except compile_check.DoesNotFit as e:
                print(json.dumps(e.report), flush=True)
                raise
        print(json.dumps(report), flush=True)
        return
    if not workdir:
        cli.fail("--workdir is required (except with --compile_only)", cli.USAGE)
    with cli.one_line_errors():
        run(config, workdir, flags.FLAGS.resume_with_changes)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
