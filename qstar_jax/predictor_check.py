"""The predictor check: can the talk and mixing path use a good thought, before any REINFORCE?

On the known-answer task, the thought at every "=" is forced to the right steps, then to a wrong
thought of the same length (the steps of another held-out problem); every other thought is
filler. With each, only the mixing head trains, on the Quiet-STaR loss, for a few steps from the
starting model, and the answer loss and the mixing weight at the answers are read on held-out
rows before and after. A right thought that leaves the answer loss where a wrong one does means
the talk path cannot use thoughts, whatever REINFORCE finds.

Shapes: B rows (examples), L positions, M thought tokens, P rationales.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np
import optax

from qstar_jax import data, known_answer, loading
from qstar_jax.errors import ConfigError, DataError
from qstar_jax.model import Params
from qstar_jax.objective import quiet_star_loss
from qstar_jax.rollout import rollout
from qstar_jax.scoring import evaluation_config
from qstar_jax.thoughts import QuietStarConfig

KINDS = ("correct", "wrong")
STEPS = 30  # head-only updates per kind of thought


def forced_thoughts(tokens_BL: np.ndarray, cfg: QuietStarConfig, kind: str,
                    rationales: int) -> np.ndarray:
    """Thought tokens [B, P, L, M]: at each "=" the right steps ("correct") or those of the
    next row ("wrong", a different problem), the same in every rationale."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    right_BLM = known_answer.correct_steps(tokens_BL, cfg.n_sampled)
    if kind == "wrong":
        if len(right_BLM) < 2:
            raise DataError("a wrong thought needs at least 2 rows (another problem's steps)")
        right_BLM = np.roll(right_BLM, 1, axis=0)
    return np.repeat(right_BLM[:, None], rationales, axis=1)


@functools.partial(jax.jit, static_argnums=(3,))
def _answer_metrics(params: Params, tokens_BL: jax.Array, mask_BL: jax.Array,
                    cfg: QuietStarConfig, thoughts_BPLM: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """Per position [B, L]: -log p(x[j+1]) after the forced thought at j, and the mixing
    weight there (one rationale)."""
    ro = rollout(params, tokens_BL, mask_BL, jax.random.key(0), cfg, thoughts_BPLM)
    return -ro.talk_logprobs[:, 0, 0], ro.mixing_weights[:, 0, 0]


@functools.partial(jax.jit, static_argnums=(4, 5))
def _head_step(head: Params, opt_state, params: Params, batch: dict,
               cfg: QuietStarConfig, optimizer: optax.GradientTransformation,
               thoughts_BPLM: jax.Array):
    """One update of the mixing head alone on the Quiet-STaR loss with forced thoughts."""
    def loss(head):
        return quiet_star_loss({**params, "mixing_head": head}, batch, jax.random.key(0), cfg,
                               thoughts_BPLM)[0]

    value, grads = jax.value_and_grad(loss)(head)
    updates, opt_state = optimizer.update(grads, opt_state, head)
    return optax.apply_updates(head, updates), opt_state, value


def run(params: Params, cfg: QuietStarConfig, train_rows: list[dict], heldout_rows: dict,
        learning_rate: float) -> dict:
    """For each kind of thought: the held-out answer loss and mixing weight at the answers
    before and after the head trains one step per batch of `train_rows` ({"tokens", "mask"}
    [B, L] each); `heldout_rows` likewise, one batch."""
    eval_cfg = evaluation_config(cfg, talk_offsets=False)
    tokens, mask = heldout_rows["tokens"], heldout_rows["mask"]
    answers_BL = known_answer.answer_positions(tokens)
    if not answers_BL.any():
        raise DataError("the held-out rows hold no answer (no '=' token)")

    def read(head: Params, kind: str) -> dict:
        loss_BL, w_BL = _answer_metrics({**params, "mixing_head": head}, tokens, mask, eval_cfg,
                                        forced_thoughts(tokens, cfg, kind, 1))
        return {"answer_loss": float(np.asarray(loss_BL)[answers_BL].mean()),
                "mixing_weight": float(np.asarray(w_BL)[answers_BL].mean())}

    optimizer = optax.adam(learning_rate)
    out = {"steps": len(train_rows), "learning_rate": learning_rate}
    for kind in KINDS:
        head, opt_state = params["mixing_head"], optimizer.init(params["mixing_head"])
        before = read(head, kind)
        for batch in train_rows:
            thoughts = forced_thoughts(batch["tokens"], cfg, kind, cfg.n_rationales)
            head, opt_state, _ = _head_step(head, opt_state, params, batch, cfg, optimizer,
                                            thoughts)
        after = read(head, kind)
        out[kind] = {"before": before, "after": after}
    return out


def sentence(check: dict) -> str:
    """The check's outcome in one line."""
    c, w = check["correct"]["after"], check["wrong"]["after"]
    usable = c["answer_loss"] < w["answer_loss"]
    return (f"Predictor check ({check['steps']} head-only steps): with the right steps as the "
            f"thought the answer loss is {c['answer_loss']:.4f} (mixing weight "
            f"{c['mixing_weight']:.3f}), with a wrong thought {w['answer_loss']:.4f} (weight "
            f"{w['mixing_weight']:.3f}): the talk path "
            f"{'can' if usable else 'cannot'} use a good thought.")


def from_config(config: ml_collections.ConfigDict) -> dict:
    """`run` on the starting model of a known-answer config's Quiet-STaR arm: its training
    batches (the first STEPS) and held-out rows, the head at its learning rate in that arm."""
    if config.data.source != "known_answer":
        raise ConfigError("the predictor check needs the known-answer task (data.source)")
    model = loading.load_model(config, "")
    if model.load is None:
        raise ConfigError("the predictor check needs a trained starting model (model.source hf)")
    sizes = dict(seq_len=config.seq_len, global_batch=config.batch_size)
    batches = data.make_dataset(config.data, model.tokenizer, seed=config.seed, **sizes)
    train_rows = [next(batches) for _ in range(STEPS)]
    held = data.heldout_batches(config.data, model.tokenizer, num_batches=config.eval_batches,
                                **sizes)
    heldout_rows = {k: np.concatenate([b[k] for b in held]) for k in ("tokens", "mask")}
    head_rate = config.optim.learning_rate * config.optim.mixing_head_lr_scale
    return run(model.load(), model.cfg, train_rows, heldout_rows, head_rate)
