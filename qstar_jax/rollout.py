"""The parallel thought rollout: every position's thoughts and talk, all rationales at once.

Phases: a base pass over the sequence; think passes, in which the chain of every position j takes
the start token, then draws its thought tokens one pass at a time; talk passes, which feed the
end token, then the true next tokens, and mix each chain state with the base state; and the
reshaping of the passes' outputs back to [B, P, ...]. The P rationales run side by side as
R = P * B rows (`rows.py`).

How the backward pass keeps memory low is `gradient_memory.py`'s alone; what it asks of this
module is that every pass take the params the pass before it returned, and that loops over
passes be its `pass_loop`.

Shapes: B batch, P rationales, R = P * B rows, L positions, M sampled thought tokens (one think
pass each), T talk offsets (one talk pass each), D model width, V vocabulary.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qstar_jax.errors import ConfigError, DataError
from qstar_jax.gradient_memory import (
    hidden_threaded,
    pass_loop,
    policy_logprobs,
    single_pass,
)
from qstar_jax.model import KeyValues, Params, causal_context
from qstar_jax.rows import by_sequence, every_rationale, pass_rows
from qstar_jax.thoughts import (
    ChainPrefix,
    QuietStarConfig,
    chain_pass,
    choose_thought,
    embed_tokens,
    entropy,
    head_logits,
    head_rows,
    lm_logits,
    mask_thought_logits,
    mix,
    speakable_head,
    speakable_index,
    speakable_token,
    start_end_embeddings,
    token_logprob,
)


@flax.struct.dataclass
class Rollout:
    """Everything the objective and analysis read from one parallel rollout."""

    base_logits: jax.Array  # [B, L, V] float32
    base_hidden: jax.Array  # [B, L, D]
    thought_tokens: jax.Array  # [B, P, L, M] int32
    thought_logprobs: jax.Array  # [B, P, L, M] log-prob at policy_temperature
    talk_logprobs: jax.Array  # [B, P, T, L] log p_mix(x[j + 1 + t]) (0 past the end)
    mixing_weights: jax.Array  # [B, P, T, L]
    # [B, P, L, M] entropy (nats) of the distribution each thought token was drawn from, at
    # thought_temperature: near 0 when thoughts collapse onto fixed tokens
    thought_entropy: jax.Array
    talk_logits: jax.Array | None = None  # [B, P, T, L, V], when asked
    talk_argmax: jax.Array | None = None  # [B, P, T, L] the most likely speakable token, when asked


def shifted(x_BL: jax.Array, t: int, fill=0) -> jax.Array:
    """x[:, j + t] at column j, `fill` past the end."""
    if t == 0:
        return x_BL
    pad = jnp.full(x_BL.shape[:1] + (t,) + x_BL.shape[2:], fill, x_BL.dtype)
    return jnp.concatenate([x_BL[:, t:], pad], axis=1)


def check_batch(cfg: QuietStarConfig, length: int) -> None:
    """Reject sequences too short for the thought window."""
    if cfg.n_ahead_talk >= length - 1:
        raise ConfigError(f"n_ahead_talk={cfg.n_ahead_talk} needs sequences longer than "
                          f"n_ahead_talk + 1 tokens; got length {length}")


# ----------------------------------------------------------------------------- pass steps


@flax.struct.dataclass
class ThinkInputs:
    """What think passes 1..M read besides the chain, each field stacked over them [M, ...]."""

    pass_index: jax.Array  # [M] the chain pass, 1..M
    key: jax.Array  # [M] random keys to draw the thought tokens with
    forced_RL: jax.Array | None  # [M, R, L] thought tokens to use as `speakable_index`, or None


@flax.struct.dataclass
class ThinkOutputs:
    """What think passes give; each field stacked over the passes [M, R, L, ...]."""

    choice_RL: jax.Array  # the thought token drawn (or forced), as `speakable_index`
    logprob_RL: jax.Array  # its log-prob at policy_temperature
    h_RLD: jax.Array  # the chain state it was drawn from
    entropy_RL: jax.Array  # entropy of the distribution it was drawn from, at thought_temperature


@flax.struct.dataclass
class TalkInputs:
    """What talk passes read besides the chain, each field stacked over them [T, ...]."""

    pass_index: jax.Array  # [T] the chain pass, n_ahead - 1 + t
    x_RLD: jax.Array  # [T, R, L, D] the input: the end token (t = 0), then x[j + t]
    h_base_RLD: jax.Array  # [T, R, L, D] the base state at j + t, mixed with the chain state


def _chain_pass(params: Params, cfg: QuietStarConfig, base_kv: KeyValues, prefix: ChainPrefix,
                buffer: KeyValues, x_RLD: jax.Array, pass_index: int | jax.Array
                ) -> tuple[jax.Array, KeyValues, Params]:
    """`chain_pass`, returning the params for the next pass (`hidden_threaded`)."""
    return chain_pass(params, cfg, base_kv, prefix, buffer, x_RLD, pass_index, hidden_threaded)


def _think_step(cfg: QuietStarConfig, prefix: ChainPrefix, think_head_VD: jax.Array,
                params: Params, base_kv: KeyValues, buffer: KeyValues, x_RLD: jax.Array,
                inputs: ThinkInputs, replay: ThinkOutputs | None
                ) -> tuple[Params, KeyValues, jax.Array, ThinkOutputs]:
    """Passes 1..M (a `gradient_memory.PassStep`): feed a token (the carry), draw the next
    thought token from the chain head."""
    h_RLD, buffer, params = _chain_pass(params, cfg, base_kv, prefix, buffer, x_RLD,
                                        inputs.pass_index)
    logits = head_logits(think_head_VD, cfg, jax.lax.stop_gradient(h_RLD))
    if replay is not None:  # the backward pass: the token drawn in the forward pass
        choice_RL = replay.choice_RL
    elif inputs.forced_RL is not None:
        choice_RL = inputs.forced_RL
    else:
        choice_RL = choose_thought(logits, inputs.key, cfg)
    choice_RL = jax.lax.stop_gradient(choice_RL)
    logprob_RL = token_logprob(logits, choice_RL, cfg.policy_temperature)
    x_next = embed_tokens(params, cfg, speakable_token(choice_RL, cfg))
    return params, buffer, x_next, ThinkOutputs(choice_RL, logprob_RL, h_RLD,
                                                entropy(logits, cfg.thought_temperature))


def _talk_step(cfg: QuietStarConfig, prefix: ChainPrefix, params: Params, base_kv: KeyValues,
               buffer: KeyValues, carry: tuple, inputs: TalkInputs, replay: Any
               ) -> tuple[Params, KeyValues, tuple, tuple[jax.Array, jax.Array]]:
    """Talk passes (a `gradient_memory.PassStep`): the chain state mixed with the base state,
    and the mixing weight.

    The head is applied after the passes (`_talk_head`): its logits are then kept for the backward
    pass instead of recomputed with the pass.
    """
    h_RLD, buffer, params = _chain_pass(params, cfg, base_kv, prefix, buffer, inputs.x_RLD,
                                        inputs.pass_index)
    return params, buffer, carry, mix(params, cfg, inputs.h_base_RLD, h_RLD)


def _talk_head(params: Params, cfg: QuietStarConfig, argmax: bool,
               xs: tuple[jax.Array, jax.Array]
               ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """One talk offset's logits [R, L, V], target log-probs [R, L] and, with `argmax`, the most
    likely token other than the thought tokens [R, L] (read here, so that an evaluation does not
    keep every offset's logits).

    Offset by offset: the head's weight gradient then transposes one [R * L, V] logit gradient
    at a time, which an XLA CPU trace showed to be much faster than one transposition of all
    offsets' (benchmarks/RESULTS.md, "talk passes' head after the scan")."""
    h_mix_RLD, targets_RL = xs
    logits_RLV = lm_logits(params, cfg, h_mix_RLD)
    most_likely = (jnp.argmax(mask_thought_logits(logits_RLV, cfg), -1).astype(jnp.int32)
                   if argmax else None)
    return logits_RLV, token_logprob(logits_RLV, targets_RL), most_likely


# ----------------------------------------------------------------------------- phases


def rollout(params: Params, tokens_BL: jax.Array, mask_BL: jax.Array, rng: jax.Array,
            cfg: QuietStarConfig, thought_tokens: jax.Array | None = None,
            return_talk_logits: bool = False, return_talk_argmax: bool = False) -> Rollout:
    """Base pass once, then the chain passes of every position in parallel for each rationale.

    The chain of position j sees the base keys x[0..j] (one shared causal prefix) and its own
    earlier chain keys (a per-position buffer), merged in one softmax: O(L^2 + L*k) time per pass,
    and memory linear in L when L exceeds `model.attention_block` (`model.span_attention`).
    `thought_tokens` [B, P, L, M] replaces sampling (tests, analysis; `filler_thoughts` puts
    pad_id everywhere); they are ordinary tokens, never the thought tokens' own ids: checked
    unless traced, and under jit such a token's log-prob is NaN (`speakable_index`).
    """
    b, length = tokens_BL.shape
    check_batch(cfg, length)
    positions_BL = jnp.broadcast_to(jnp.arange(length), (b, length))
    # Each phase takes the params the phase before it returned (`gradient_memory`).
    h_base_BLD, base_kv, base_logits, params = _base_pass(params, cfg, tokens_BL, positions_BL,
                                                          mask_BL)
    if not cfg.thinks:
        no_thoughts = jnp.zeros((b, cfg.n_rationales, length, 0))
        no_talk = jnp.zeros((b, cfg.n_rationales, 0, length))
        return Rollout(base_logits, h_base_BLD, no_thoughts.astype(jnp.int32), no_thoughts,
                       no_talk, no_talk, no_thoughts)

    # Every row of a rationale reads the same base keys.
    p = cfg.n_rationales
    if cfg.filler_thoughts and thought_tokens is None:
        thought_tokens = jnp.full((b, p, length, cfg.n_sampled), cfg.pad_id, jnp.int32)
    forced_MRL = None if thought_tokens is None else _forced_rows(thought_tokens, cfg)
    positions_RL = every_rationale(positions_BL, p)
    prefix = ChainPrefix(positions_RL, positions_RL, every_rationale(mask_BL, p))
    base_kv_R = KeyValues(every_rationale(base_kv.k, p, 1), every_rationale(base_kv.v, p, 1))
    kv_shape = base_kv_R.k.shape[:3] + (cfg.n_chain_passes,) + base_kv_R.k.shape[3:]
    buffer = KeyValues(jnp.zeros(kv_shape, base_kv.k.dtype), jnp.zeros(kv_shape, base_kv.v.dtype))

    buffer, think, params = _think_passes(params, cfg, prefix, base_kv_R, buffer, rng,
                                          forced_MRL)
    talk_logits_TRLV, talk_logprobs_TRL, w_TRL, argmax_TRL = _talk_passes(
        params, cfg, prefix, base_kv_R, buffer, every_rationale(tokens_BL, p),
        every_rationale(h_base_BLD, p), return_talk_argmax)

    per_token = lambda x_MRL: jnp.moveaxis(by_sequence(x_MRL, p), 2, -1)  # noqa: E731 [B, P, L, M]
    return Rollout(
        base_logits=base_logits, base_hidden=h_base_BLD,
        thought_tokens=per_token(speakable_token(think.choice_RL, cfg)),
        thought_logprobs=per_token(think.logprob_RL),
        talk_logprobs=by_sequence(talk_logprobs_TRL, p),
        mixing_weights=by_sequence(w_TRL, p),
        thought_entropy=per_token(think.entropy_RL),
        talk_logits=by_sequence(talk_logits_TRLV, p) if return_talk_logits else None,
        talk_argmax=by_sequence(argmax_TRL, p) if return_talk_argmax else None,
    )


def _base_pass(params: Params, cfg: QuietStarConfig, tokens_BL: jax.Array,
               positions_BL: jax.Array, mask_BL: jax.Array
               ) -> tuple[jax.Array, KeyValues, jax.Array, Params]:
    """The causal pass over the sequence: hidden states [B, L, D], keys/values, logits
    [B, L, V], and the params for the next pass (`hidden_threaded`)."""
    ctx = causal_context(positions_BL, mask_BL, cfg.model.sliding_window)
    h_BLD, kv, params = hidden_threaded(params, cfg, embed_tokens(params, cfg, tokens_BL),
                                        positions_BL, ctx)
    return h_BLD, kv, lm_logits(params, cfg, h_BLD), params


def _forced_rows(thought_tokens_BPLM: jax.Array, cfg: QuietStarConfig) -> jax.Array:
    """Forced thought tokens [B, P, L, M] as the think passes read them: [M, R, L] indices into
    `speakable_ids`."""
    b, length = thought_tokens_BPLM.shape[0], thought_tokens_BPLM.shape[2]
    expected = (b, cfg.n_rationales, length, cfg.n_sampled)
    if tuple(thought_tokens_BPLM.shape) != expected:
        raise DataError(f"thought_tokens has shape {tuple(thought_tokens_BPLM.shape)}, "
                        f"expected [B, n_passes, L, n_ahead - 3] = {expected}")
    if not isinstance(thought_tokens_BPLM, jax.core.Tracer) and np.isin(
            np.asarray(thought_tokens_BPLM), (cfg.start_thought_id, cfg.end_thought_id)).any():
        raise DataError("thought_tokens contains the ids of <|startthought|> or "
                        "<|endthought|>, which a thought never contains")
    return speakable_index(pass_rows(jnp.moveaxis(thought_tokens_BPLM, 3, 2)), cfg)


def _think_passes(params: Params, cfg: QuietStarConfig, prefix: ChainPrefix,
                  base_kv_R: KeyValues, buffer: KeyValues, rng: jax.Array,
                  forced_MRL: jax.Array | None) -> tuple[KeyValues, ThinkOutputs, Params]:
    """Passes 1 .. n_ahead - 2: the start token, then the thought tokens drawn (or forced).

    Returns the buffer holding the keys of all of them, the M drawing passes' outputs
    [M, R, L, ...], and the params for the next pass. Thought logits leave out the thought tokens'
    head rows; drawn tokens are indices into `speakable_ids`. No gradient flows through drawing:
    `policy_logprobs` gives the log-probs theirs after the passes.
    """
    m = cfg.n_sampled
    speakable_VD = speakable_head(head_rows(params, cfg), cfg)
    step = functools.partial(_think_step, cfg, prefix, jax.lax.stop_gradient(speakable_VD))
    start_D, _ = start_end_embeddings(params, cfg)
    x_RLD = jnp.broadcast_to(start_D, prefix.start_BL.shape + start_D.shape)
    inputs = ThinkInputs(jnp.arange(1, m + 1), jax.random.split(rng, m), forced_MRL)
    params, buffer, x_RLD, out = pass_loop(cfg)(step, params, base_kv_R, buffer, x_RLD, inputs)
    out = out.replace(logprob_RL=policy_logprobs(speakable_VD, out.h_RLD, out.choice_RL,
                                                 out.logprob_RL, cfg))
    # Pass n_ahead - 2 feeds the last drawn token; only its keys are needed.
    _, buffer, params = single_pass(cfg, _chain_pass)(params, cfg, base_kv_R, prefix, buffer,
                                                      x_RLD, jnp.int32(cfg.n_ahead - 2))
    return buffer, out, params


def _talk_passes(params: Params, cfg: QuietStarConfig, prefix: ChainPrefix,
                 base_kv_R: KeyValues, buffer: KeyValues, tokens_RL: jax.Array,
                 h_base_RLD: jax.Array, argmax: bool = False
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """Passes n_ahead - 1 ..: the end token, then the true tokens x[j + 1], x[j + 2], ...

    The state of talk offset t is mixed with the base state at j + t and scored against
    x[j + 1 + t]: logits [T, R, L, V], target log-probs [T, R, L], mixing weights [T, R, L],
    and with `argmax` the most likely tokens [T, R, L] (else None).
    """
    t_talk = cfg.n_ahead_talk
    _, end_D = start_end_embeddings(params, cfg)
    inputs = TalkInputs(
        pass_index=jnp.arange(cfg.n_ahead - 1, cfg.n_ahead - 1 + t_talk),
        x_RLD=jnp.stack([jnp.broadcast_to(end_D, h_base_RLD.shape)] + [
            embed_tokens(params, cfg, shifted(tokens_RL, t)) for t in range(1, t_talk)]),
        h_base_RLD=jnp.stack([shifted(h_base_RLD, t) for t in range(t_talk)]))
    targets_TRL = jnp.stack([shifted(tokens_RL, t + 1) for t in range(t_talk)])
    step = functools.partial(_talk_step, cfg, prefix)
    params, _, _, (h_mix_TRLD, w_TRL) = pass_loop(cfg)(step, params, base_kv_R, buffer, (),
                                                       inputs)
    logits_TRLV, logprobs_TRL, argmax_TRL = jax.lax.map(
        functools.partial(_talk_head, params, cfg, argmax), (h_mix_TRLD, targets_TRL))
    return logits_TRLV, logprobs_TRL, w_TRL, argmax_TRL
