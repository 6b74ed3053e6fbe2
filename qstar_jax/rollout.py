"""The parallel thought rollout: every position's thoughts and talk, all rationales at once.

Phases: a base pass over the sequence; think passes, in which the chain of every position j takes
the start token, then draws its thought tokens one pass at a time; talk passes, which feed the
end token, then the true next tokens, and mix each chain state with the base state; and the
reshaping of the passes' outputs back to [B, P, ...]. The P rationales run side by side as
R = P * B rows (`to_rows`). With `remat_passes` the backward pass recomputes each pass against
the final chain buffer, so saved memory is linear in the passes.

Shapes: B batch, P rationales, R = P * B rows, L positions, S sampled thought tokens, T talk
offsets, X passes or talk offsets, D model width, V vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qstar_jax.model import KeyValues, Params, causal_context
from qstar_jax.thoughts import (
    ChainPrefix,
    QuietStarConfig,
    chain_pass,
    chain_reads,
    choose_thought,
    embed_tokens,
    entropy,
    head_logits,
    head_rows,
    hidden_passing,
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
    thought_tokens: jax.Array  # [B, P, L, S] int32
    # [B, P, L, S] log-prob at policy_temperature; its gradient is exact for any cotangent,
    # and cheapest with at most cfg.policy_rows nonzero rationales per position
    # (`policy_logprobs`)
    thought_logprobs: jax.Array
    talk_logprobs: jax.Array  # [B, P, T, L] log p_mix(x[j + 1 + t]) (0 past the end)
    mixing_weights: jax.Array  # [B, P, T, L]
    # [B, P, L, S] entropy (nats) of the distribution each thought token was drawn from, at
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
        raise ValueError(f"n_ahead_talk={cfg.n_ahead_talk} needs sequences longer than "
                         f"n_ahead_talk + 1 tokens; got length {length}")


# ----------------------------------------------------------------------------- row layout


def to_rows(x_PB: jax.Array, axis: int = 0) -> jax.Array:
    """[..., P, B, ...] -> [..., R, ...]: the rationales side by side as R = P * B rows,
    rationale-major (row p * B + b is rationale p of sequence b); `axis` is P's."""
    shape = x_PB.shape
    return x_PB.reshape(shape[:axis] + (shape[axis] * shape[axis + 1],) + shape[axis + 2:])


def from_rows(x_R: jax.Array, p: int, axis: int = 0) -> jax.Array:
    """[..., R, ...] -> [..., P, B, ...]: the inverse of `to_rows`."""
    shape = x_R.shape
    return x_R.reshape(shape[:axis] + (p, shape[axis] // p) + shape[axis + 1:])


def _every_rationale(x_B: jax.Array, p: int, axis: int = 0) -> jax.Array:
    """[..., B, ...] -> [..., R, ...]: the same values in every rationale's rows."""
    return to_rows(jnp.stack([x_B] * p, axis), axis)


def _pass_rows(x_BPX: jax.Array) -> jax.Array:
    """[B, P, X, ...] -> [X, R, ...]: per pass, its rows."""
    return to_rows(jnp.swapaxes(x_BPX, 0, 2), axis=1)


def _by_sequence(x_XR: jax.Array, p: int) -> jax.Array:
    """[X, R, ...] -> [B, P, X, ...]: the inverse of `_pass_rows`."""
    return jnp.swapaxes(from_rows(x_XR, p, axis=1), 0, 2)


# ----------------------------------------------------------------------------- pass steps


@flax.struct.dataclass
class ThinkInputs:
    """What think passes 1..S read besides the chain, each field stacked over them [S, ...]."""

    k: jax.Array  # [S] the pass index
    key: jax.Array  # [S] random keys to draw the thought tokens with
    forced_RL: jax.Array | None  # [S, R, L] thought tokens to use as `speakable_index`, or None


@flax.struct.dataclass
class ThinkOutputs:
    """What think passes give; each field stacked over the passes [S, R, L, ...]."""

    choice_RL: jax.Array  # the thought token drawn (or forced), as `speakable_index`
    logprob_RL: jax.Array  # its log-prob at policy_temperature
    h_RLD: jax.Array  # the chain state it was drawn from
    entropy_RL: jax.Array  # entropy of the distribution it was drawn from, at thought_temperature


@flax.struct.dataclass
class TalkInputs:
    """What talk passes read besides the chain, each field stacked over them [T, ...]."""

    k: jax.Array  # [T] the pass index, n_ahead - 1 + t
    x_RLD: jax.Array  # [T, R, L, D] the input: the end token (t = 0), then x[j + t]
    h_base_RLD: jax.Array  # [T, R, L, D] the base state at j + t, mixed with the chain state


# A pass step, run over the passes of one kind: step(params, base_kv, buffer, carry, inputs,
# replay) -> (params, buffer, carry, outputs). `inputs` is the pass's entry of
# ThinkInputs/TalkInputs; `replay` is None, or in the rematerialised backward pass the outputs of
# the forward pass, whose drawn tokens are used again. The params returned are `params` passed
# through (`chain_pass`), for the next pass.
PassStep = Callable[..., tuple[Params, KeyValues, Any, Any]]


def _think_step(cfg: QuietStarConfig, prefix: ChainPrefix, think_head_VD: jax.Array,
                params: Params, base_kv: KeyValues, buffer: KeyValues, x_RLD: jax.Array,
                inputs: ThinkInputs, replay: ThinkOutputs | None
                ) -> tuple[Params, KeyValues, jax.Array, ThinkOutputs]:
    """Passes 1..S: feed a token (the carry), draw the next thought token from the chain head."""
    h_RLD, buffer, params = chain_pass(params, cfg, base_kv, prefix, buffer, x_RLD, inputs.k)
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
    """Talk passes: the chain state mixed with the base state, and the mixing weight.

    The head is applied after the passes (`_talk_head`): its logits are then kept for the backward
    pass instead of recomputed with the pass.
    """
    h_RLD, buffer, params = chain_pass(params, cfg, base_kv, prefix, buffer, inputs.x_RLD, inputs.k)
    return params, buffer, carry, mix(params, cfg, inputs.h_base_RLD, h_RLD)


def _talk_head(params: Params, cfg: QuietStarConfig, argmax: bool,
               xs: tuple[jax.Array, jax.Array]
               ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """One talk offset's logits [R, L, V], target log-probs [R, L] and, with `argmax`, the most
    likely token other than the thought tokens [R, L] (read here, so that an evaluation does not
    keep every offset's logits).

    Offset by offset: the head's weight gradient then transposes one [R * L, V] logit gradient
    at a time, which is fast on a CPU (in an XLA CPU trace, one [2048, 32002] transposition took
    654 ms, four [512, 32002] ones 69 ms in all)."""
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
    `thought_tokens` [B, P, L, S] replaces sampling (tests, analysis; `filler_thoughts` puts
    pad_id everywhere); they are ordinary tokens,
    never the thought tokens' own ids: checked unless traced, and under jit such a token's
    log-prob is NaN (`speakable_index`).
    """
    b, length = tokens_BL.shape
    check_batch(cfg, length)
    positions_BL = jnp.broadcast_to(jnp.arange(length), (b, length))
    # Each phase takes the params the one before it passed through (`chain_pass`), so that the
    # backward pass sums the layer gradients of all of them in one buffer.
    h_base_BLD, base_kv, base_logits, params = _base_pass(params, cfg, tokens_BL, positions_BL,
                                                          mask_BL)
    if not cfg.thinks:
        no_thoughts = jnp.zeros((b, cfg.n_passes, length, 0))
        no_talk = jnp.zeros((b, cfg.n_passes, 0, length))
        return Rollout(base_logits, h_base_BLD, no_thoughts.astype(jnp.int32), no_thoughts,
                       no_talk, no_talk, no_thoughts)

    # Every row of a rationale reads the same base keys.
    p = cfg.n_passes
    if cfg.filler_thoughts and thought_tokens is None:
        thought_tokens = jnp.full((b, p, length, cfg.n_sampled), cfg.pad_id, jnp.int32)
    forced_SRL = None if thought_tokens is None else _forced_rows(thought_tokens, cfg)
    positions_RL = _every_rationale(positions_BL, p)
    prefix = ChainPrefix(positions_RL, positions_RL, _every_rationale(mask_BL, p))
    base_kv_R = KeyValues(_every_rationale(base_kv.k, p, 1), _every_rationale(base_kv.v, p, 1))
    kv_shape = base_kv_R.k.shape[:3] + (cfg.n_chain_passes,) + base_kv_R.k.shape[3:]
    buffer = KeyValues(jnp.zeros(kv_shape, base_kv.k.dtype), jnp.zeros(kv_shape, base_kv.v.dtype))

    buffer, think, params = _think_passes(params, cfg, prefix, base_kv_R, buffer, rng,
                                          forced_SRL)
    talk_logits_TRLV, talk_logprobs_TRL, w_TRL, argmax_TRL = _talk_passes(
        params, cfg, prefix, base_kv_R, buffer, _every_rationale(tokens_BL, p),
        _every_rationale(h_base_BLD, p), return_talk_argmax)

    per_token = lambda x_SRL: jnp.moveaxis(_by_sequence(x_SRL, p), 2, -1)  # noqa: E731 [B, P, L, S]
    return Rollout(
        base_logits=base_logits, base_hidden=h_base_BLD,
        thought_tokens=per_token(speakable_token(think.choice_RL, cfg)),
        thought_logprobs=per_token(think.logprob_RL),
        talk_logprobs=_by_sequence(talk_logprobs_TRL, p),
        mixing_weights=_by_sequence(w_TRL, p),
        thought_entropy=per_token(think.entropy_RL),
        talk_logits=_by_sequence(talk_logits_TRLV, p) if return_talk_logits else None,
        talk_argmax=_by_sequence(argmax_TRL, p) if return_talk_argmax else None,
    )


def _base_pass(params: Params, cfg: QuietStarConfig, tokens_BL: jax.Array,
               positions_BL: jax.Array, mask_BL: jax.Array
               ) -> tuple[jax.Array, KeyValues, jax.Array, Params]:
    """The causal pass over the sequence: hidden states [B, L, D], keys/values, logits
    [B, L, V], and `params` passed through (`hidden_passing`)."""
    ctx = causal_context(positions_BL, mask_BL, cfg.model.sliding_window)
    h_BLD, kv, params = hidden_passing(params, cfg, embed_tokens(params, cfg, tokens_BL),
                                       positions_BL, ctx)
    return h_BLD, kv, lm_logits(params, cfg, h_BLD), params


def _forced_rows(thought_tokens_BPLS: jax.Array, cfg: QuietStarConfig) -> jax.Array:
    """Forced thought tokens [B, P, L, S] as the think passes read them: [S, R, L] indices into
    `speakable_ids`."""
    b, length = thought_tokens_BPLS.shape[0], thought_tokens_BPLS.shape[2]
    expected = (b, cfg.n_passes, length, cfg.n_sampled)
    if tuple(thought_tokens_BPLS.shape) != expected:
        raise ValueError(f"thought_tokens has shape {tuple(thought_tokens_BPLS.shape)}, "
                         f"expected [B, n_passes, L, n_ahead - 3] = {expected}")
    if not isinstance(thought_tokens_BPLS, jax.core.Tracer) and np.isin(
            np.asarray(thought_tokens_BPLS), (cfg.start_thought_id, cfg.end_thought_id)).any():
        raise ValueError("thought_tokens contains the ids of <|startthought|> or "
                         "<|endthought|>, which a thought never contains")
    return speakable_index(_pass_rows(jnp.moveaxis(thought_tokens_BPLS, 3, 2)), cfg)


def _think_passes(params: Params, cfg: QuietStarConfig, prefix: ChainPrefix,
                  base_kv_R: KeyValues, buffer: KeyValues, rng: jax.Array,
                  forced_SRL: jax.Array | None) -> tuple[KeyValues, ThinkOutputs, Params]:
    """Passes 1 .. n_ahead - 2: the start token, then the thought tokens drawn (or forced).

    Returns the buffer holding the keys of all of them, the S drawing passes' outputs
    [S, R, L, ...], and `params` passed through. Thought logits leave out the thought tokens'
    head rows; drawn tokens are indices into `speakable_ids`. No gradient flows through drawing:
    `policy_logprobs` gives the log-probs theirs after the passes.
    """
    s = cfg.n_sampled
    speakable_VD = speakable_head(head_rows(params, cfg), cfg)
    step = functools.partial(_think_step, cfg, prefix, jax.lax.stop_gradient(speakable_VD))
    start_D, _ = start_end_embeddings(params, cfg)
    x_RLD = jnp.broadcast_to(start_D, prefix.start_BL.shape + start_D.shape)
    inputs = ThinkInputs(jnp.arange(1, s + 1), jax.random.split(rng, s), forced_SRL)
    params, buffer, x_RLD, out = _pass_scan(cfg)(step, params, base_kv_R, buffer, x_RLD, inputs)
    out = out.replace(logprob_RL=policy_logprobs(speakable_VD, out.h_RLD, out.choice_RL,
                                                 out.logprob_RL, cfg))
    # Pass n_ahead - 2 feeds the last drawn token; only its keys are needed.
    last = jax.checkpoint(chain_pass, static_argnums=(1,)) if cfg.remat_passes else chain_pass
    _, buffer, params = last(params, cfg, base_kv_R, prefix, buffer, x_RLD,
                             jnp.int32(cfg.n_ahead - 2))
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
        k=jnp.arange(cfg.n_ahead - 1, cfg.n_ahead - 1 + t_talk),
        x_RLD=jnp.stack([jnp.broadcast_to(end_D, h_base_RLD.shape)] + [
            embed_tokens(params, cfg, shifted(tokens_RL, t)) for t in range(1, t_talk)]),
        h_base_RLD=jnp.stack([shifted(h_base_RLD, t) for t in range(t_talk)]))
    targets_TRL = jnp.stack([shifted(tokens_RL, t + 1) for t in range(t_talk)])
    step = functools.partial(_talk_step, cfg, prefix)
    params, _, _, (h_mix_TRLD, w_TRL) = _pass_scan(cfg)(step, params, base_kv_R, buffer, (),
                                                        inputs)
    logits_TRLV, logprobs_TRL, argmax_TRL = jax.lax.map(
        functools.partial(_talk_head, params, cfg, argmax), (h_mix_TRLD, targets_TRL))
    return logits_TRLV, logprobs_TRL, w_TRL, argmax_TRL


# ----------------------------------------------------------------------------- policy gradient


def policy_logprobs(head_VD: jax.Array, h_SRLD: jax.Array, choices_SRL: jax.Array,
                    values_SRL: jax.Array, cfg: QuietStarConfig) -> jax.Array:
    """`values` (the thought tokens' log-probs at policy_temperature) with their gradient.

    `head_VD` is `speakable_head`'s rows and `choices` index `speakable_ids`. The gradient flows
    into the output head and the chain states `h` [S, R, L, D]. It is computed pass by pass on
    the `cfg.policy_rows` rationales of each position with the largest cotangents, the logits
    recomputed for those rows only: the REINFORCE cotangents (clamped advantages) are zero on
    the others. A cotangent on more rationales of a position (another loss term on the
    log-probs) is seen in the backward pass, which then takes all P: the gradient is exact for
    any cotangent.
    """
    temperature, p, m = cfg.policy_temperature, cfg.n_passes, cfg.policy_rows

    def logprob(head_VD, h, choices):
        return token_logprob(head_logits(head_VD, cfg, h), choices, temperature)

    def gradient(rows, head_VD, h_SRLD, choices_SRL, ct_SRL):
        """The gradient from the `rows` rationales of each position with the largest
        cotangents: exact when the others have none."""

        def one_pass(d_head, xs):
            h_PBLD, choices_PBL, ct_PBL = (from_rows(x, p) for x in xs)
            _, pick_BLM = jax.lax.top_k(jnp.moveaxis(jnp.abs(ct_PBL), 0, -1), rows)
            pick_MBL = jnp.moveaxis(pick_BLM, -1, 0)
            take = lambda x: jnp.take_along_axis(  # noqa: E731
                x, pick_MBL.reshape(pick_MBL.shape + (1,) * (x.ndim - 3)), 0)
            _, vjp = jax.vjp(lambda hd, h: logprob(hd, h, take(choices_PBL)), head_VD, take(h_PBLD))
            d_head_pass, d_h_MBLD = vjp(take(ct_PBL))
            # Back to all P rationales: each picked row to its own, zero on the others.
            chosen_MPBL = pick_MBL[:, None] == jnp.arange(p)[None, :, None, None]
            d_h_PBLD = jnp.sum(jnp.where(chosen_MPBL[..., None], d_h_MBLD[:, None], 0), 0)
            return d_head + d_head_pass, to_rows(d_h_PBLD)

        return jax.lax.scan(one_pass, jnp.zeros_like(head_VD), (h_SRLD, choices_SRL, ct_SRL))

    @jax.custom_vjp
    def with_gradient(head_VD, h_SRLD, choices_SRL, values_SRL):
        return values_SRL

    def forward(head_VD, h_SRLD, choices_SRL, values_SRL):
        return values_SRL, (head_VD, h_SRLD, choices_SRL)

    def backward(saved, ct_SRL):
        head_VD, h_SRLD, choices_SRL = saved
        if m == p:
            d_head, d_h_SRLD = gradient(p, head_VD, h_SRLD, choices_SRL, ct_SRL)
        else:
            # The most rationales of any position that carry a cotangent.
            reached = jnp.max(jnp.sum(from_rows(ct_SRL, p, axis=1) != 0, axis=1))
            d_head, d_h_SRLD = jax.lax.cond(
                reached <= m, functools.partial(gradient, m), functools.partial(gradient, p),
                head_VD, h_SRLD, choices_SRL, ct_SRL)
        return d_head, d_h_SRLD.astype(h_SRLD.dtype), None, jnp.zeros_like(ct_SRL)

    with_gradient.defvjp(forward, backward)
    return with_gradient(head_VD, h_SRLD, choices_SRL, jax.lax.stop_gradient(values_SRL))


# ----------------------------------------------------------------------------- pass scans


def _pass_scan(cfg: QuietStarConfig) -> Callable:
    """The loop over passes: a scan rematerialised against the final buffer, or unrolled."""
    return _scan_against_final_buffer if cfg.remat_passes else _unrolled


def _unrolled(step: PassStep, params: Params, base_kv: KeyValues, buffer: KeyValues, carry: Any,
              inputs: Any) -> tuple[Params, KeyValues, Any, Any]:
    """`step` over the passes (the leading axis of `inputs`), one after the other in the program:
    (params passed through, final buffer, final carry, stacked outputs). Each pass takes the
    params the pass before it passed through, which a scan cannot do without keeping a copy of
    them per pass for the backward pass (a carry is never hoisted out of the loop)."""
    ys = []
    for x in range(jax.tree.leaves(inputs)[0].shape[0]):
        params, buffer, carry, y = step(params, base_kv, buffer, carry,
                                        jax.tree.map(lambda a, x=x: a[x], inputs), None)
        ys.append(y)
    return params, buffer, carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)


def _scan(step: PassStep, params: Params, base_kv: KeyValues, buffer: KeyValues, carry: Any,
          inputs: Any, keep_carries: bool = False) -> tuple[KeyValues, Any, Any]:
    """jax.lax.scan of `step` over the passes (the leading axis of `inputs`): (final buffer,
    final carry, stacked outputs), and with `keep_carries` the carry each step received."""

    def body(state, inputs):
        buffer, carry = state
        _, buffer, next_carry, y = step(params, base_kv, buffer, carry, inputs, None)
        return (buffer, next_carry), ((carry, y) if keep_carries else y)

    (buffer, carry), ys = jax.lax.scan(body, (buffer, carry), inputs)
    return buffer, carry, ys


def check_reads_before_writes(reads_KC: np.ndarray) -> None:
    """Raise unless each chain pass k reads only buffer slots written before it (c < k - 1).

    `_scan_against_final_buffer` recomputes every pass against the final buffer; that equals the
    buffer the pass saw only in the slots written before it.
    """
    for k in range(1, reads_KC.shape[0]):
        late = np.flatnonzero(reads_KC[k, k - 1:])
        if late.size:
            raise ValueError(
                f"chain pass {k} reads buffer slot {k - 1 + late[0]}, written by pass "
                f"{k + late[0]} (at or after it): recomputing the pass against the final buffer "
                "would read keys it did not see; `chain_reads` must hide every slot c >= k - 1")


def _scan_against_final_buffer(step: PassStep, params: Params, base_kv: KeyValues,
                               buffer: KeyValues, carry: Any, inputs: Any
                               ) -> tuple[Params, KeyValues, Any, Any]:
    """`_scan` whose backward pass recomputes each pass against the final chain buffer, with
    `params` passed through first (as `_unrolled`).

    Pass k reads only buffer slots < k - 1 (`chain_reads`, checked here), and the final buffer
    holds exactly those values, so the backward pass needs one buffer, not one per pass: saved
    memory grows linearly with the number of passes. Each pass is recomputed in the backward
    pass (rematerialised) with the tokens it drew (`replay`), which are not drawn again. Only
    the float leaves of `inputs` are differentiated. The parameter gradient is summed in the
    cotangent of the params passed through, which each pass's backward adds to
    (`chain_pass`).
    """
    check_reads_before_writes(chain_reads(buffer.k.shape[3]))

    @jax.custom_vjp
    def run(params, base_kv, buffer, carry, inputs):
        return params, *_scan(step, params, base_kv, buffer, carry, inputs)

    def forward(params, base_kv, buffer, carry, inputs):
        buffer, carry_out, (carries, ys) = _scan(step, params, base_kv, buffer, carry, inputs,
                                                 keep_carries=True)
        return (params, buffer, carry_out, ys), (params, base_kv, buffer, carries, inputs, ys)

    def backward(saved, cotangents):
        params, base_kv, final_buffer, carries, inputs, ys = saved
        ct_params, ct_buffer, ct_carry, ct_ys = cotangents
        # Integer outputs (drawn tokens) have float0 cotangents, which cannot be scanned over.
        ct_ys = jax.tree.map(lambda y, ct: ct if _is_float(y) else jnp.zeros(y.shape[:1]),
                             ys, ct_ys)

        def body(acc, xs):
            ct_params, ct_base_kv, ct_buffer, ct_carry = acc
            carry, x, y, ct_y = xs
            ct_y = jax.tree.map(lambda y, ct: ct if _is_float(y) else np.zeros(
                y.shape, jax.dtypes.float0), y, ct_y)
            x_float, join = _float_leaves(x)
            _, vjp = jax.vjp(lambda p, kv, buf, c, xf: step(p, kv, buf, c, join(xf), y),
                             params, base_kv, final_buffer, carry, x_float)
            # The pass's parameter gradient comes added to ct_params (its params passed through).
            ct_params, d_base_kv, ct_buffer, ct_carry, d_x = vjp(
                (ct_params, ct_buffer, ct_carry, ct_y))
            return (ct_params, jax.tree.map(jnp.add, ct_base_kv, d_base_kv), ct_buffer,
                    ct_carry), d_x

        (d_params, d_base_kv, d_buffer, d_carry), d_floats = jax.lax.scan(
            body, (ct_params, jax.tree.map(jnp.zeros_like, base_kv), ct_buffer, ct_carry),
            (carries, inputs, ys, ct_ys), reverse=True)
        _, join = _float_leaves(inputs)  # no cotangent for the integer inputs
        return d_params, d_base_kv, d_buffer, d_carry, join(d_floats, others=False)

    run.defvjp(forward, backward)
    return run(params, base_kv, buffer, carry, inputs)


def _float_leaves(tree: Any) -> tuple[list, Callable[..., Any]]:
    """The float leaves of `tree`, and `join(floats, others=True)`: the tree with new float
    leaves and its other leaves (or None in their place)."""
    leaves, treedef = jax.tree.flatten(tree)
    is_float = [_is_float(x) for x in leaves]

    def join(floats: list, others: bool = True) -> Any:
        new = iter(floats)
        return jax.tree.unflatten(treedef, [next(new) if f else (x if others else None)
                                            for x, f in zip(leaves, is_float, strict=True)])

    return [x for x, f in zip(leaves, is_float, strict=True) if f], join


def _is_float(x: jax.Array) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)
