"""How the rollout's backward pass stays small; nothing here changes a value or a gradient.

Three tricks, each behind one function the rollout calls, each with the invariant it relies on
checked here:

- `hidden_threaded`: a decoder pass that returns the params it was given. Each pass of the
  rollout takes the params the pass before it returned, and the backward pass adds every pass's
  layer gradients into one buffer in place, instead of one full gradient per pass summed at the
  end. Exact because the layers are recomputed as "nothing_saveable" rematerialisation does
  (`threads_layer_gradients`).
- `pass_loop`: the passes of one kind, unrolled, or (`remat_passes`) scanned with each pass
  recomputed in the backward pass against the final chain buffer, so saved memory is linear in
  the passes. Exact because pass k reads only buffer slots written before it
  (`check_reads_before_writes`).
- `policy_logprobs`: the thought tokens' log-probs, whose gradient is computed only on the
  rationales of each position that carry a cotangent (`QuietStarConfig.policy_rows`), checked
  in the backward pass, which takes all rationales when more carry one.

tests/test_rollout.py compares every combination with the plain path (no scan, no remat, no
threading).

Shapes (`qstar_jax/__init__.py`): B batch, P rationales, Q picked rationales, R = P * B rows,
L positions, M thought tokens (think passes), D model width, N layers, I chain passes, C chain
buffer slots; the leading axis of a pass loop's inputs counts its passes (M or T).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qstar_jax.model import Block, Context, KeyValues, Masks, Params, dense_if_small, layer_kv
from qstar_jax.rows import from_rows, to_rows
from qstar_jax.thoughts import (
    QuietStarConfig,
    chain_reads,
    decoder,
    head_logits,
    hidden,
    token_logprob,
)

# ----------------------------------------------------------------------------- layer gradients


def hidden_threaded(params: Params, cfg: QuietStarConfig, x_BLD: jax.Array,
                    positions_BL: jax.Array, ctx: Context
                    ) -> tuple[jax.Array, KeyValues, Params]:
    """`thoughts.hidden`, and `params` passed through unchanged.

    With `threads_layer_gradients`, the backward pass adds each layer's parameter gradient into
    the cotangent of the returned params, in place: calls that take their params from the call
    before them then sum all their layer gradients in one buffer, where calls on the same params
    would each fill a gradient of all the layers, all summed at the end. The gradients are the
    same either way.
    """
    if not threads_layer_gradients(cfg):
        h_BLD, kv = hidden(params, cfg, x_BLD, positions_BL, ctx)
        return h_BLD, kv, params
    model_cfg, decoder_params = cfg.model, params["decoder"]
    masks = dense_if_small(ctx.masks, model_cfg.attention_block)
    x_BLD, k, v, layers = _layer_stack(model_cfg, decoder_params["layers"], x_BLD, positions_BL,
                                       masks, layer_kv(ctx.prefix), layer_kv(ctx.chain))
    h_BLD = decoder(cfg).apply({"params": decoder_params}, x_BLD,
                               method=lambda module, x: module.final_norm(x))
    return h_BLD, KeyValues(k, v), {**params, "decoder": {**decoder_params, "layers": layers}}


def threads_layer_gradients(cfg: QuietStarConfig) -> bool:
    """Whether `hidden_threaded` sums the layer gradients into its returned params' cotangent:
    only for scanned layers rematerialised as "nothing_saveable", which `_layer_stack_bwd`
    reproduces (each layer recomputed from its input alone)."""
    return cfg.model.scan_layers and cfg.model.remat_policy == "nothing_saveable"


def _block(cfg, layer: Params, x_BLD: jax.Array, prefix, chain, positions_BL: jax.Array,
           masks: Masks) -> tuple[jax.Array, tuple]:
    return Block(cfg).apply({"params": layer}, x_BLD, (prefix, chain), positions_BL, masks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _layer_stack(cfg, layers: Params, x_BLD: jax.Array, positions_BL: jax.Array, masks: Masks,
                 prefix, chain) -> tuple[jax.Array, jax.Array, jax.Array, Params]:
    """The scanned layers: (output [B, L, D], new keys and values [N, ...], `layers`)."""
    x_BLD, (k, v), _ = _run_layers(cfg, layers, x_BLD, positions_BL, masks, prefix, chain)
    return x_BLD, k, v, layers


def _run_layers(cfg, layers, x_BLD, positions_BL, masks, prefix, chain):
    """The layer scan: (output, keys/values, each layer's input [N, B, L, D])."""
    def body(x_BLD, xs):
        layer, prefix_i, chain_i = xs
        y_BLD, kv = _block(cfg, layer, x_BLD, prefix_i, chain_i, positions_BL, masks)
        return y_BLD, (kv, x_BLD)

    x_BLD, (kv, inputs_NBLD) = jax.lax.scan(body, x_BLD, (layers, prefix, chain))
    return x_BLD, kv, inputs_NBLD


def _layer_stack_fwd(cfg, layers, x_BLD, positions_BL, masks, prefix, chain):
    x_BLD, (k, v), inputs_NBLD = _run_layers(cfg, layers, x_BLD, positions_BL, masks, prefix,
                                             chain)
    # Only the layers' inputs are kept: each layer is recomputed in the backward pass, as
    # "nothing_saveable" rematerialisation does.
    return (x_BLD, k, v, layers), (layers, inputs_NBLD, positions_BL, masks, prefix, chain)


def _layer_stack_bwd(cfg, saved, cotangents):
    layers, inputs_NBLD, positions_BL, masks, prefix, chain = saved
    ct_x_BLD, ct_k, ct_v, ct_layers = cotangents

    def body(carry, xs):
        ct_x_BLD, total = carry
        i, layer, x_BLD, prefix_i, chain_i, ct_k_i, ct_v_i = xs
        _, vjp = jax.vjp(lambda p, x, a, b: _block(cfg, p, x, a, b, positions_BL, masks),
                         layer, x_BLD, prefix_i, chain_i)
        d_layer, ct_x_BLD, d_prefix_i, d_chain_i = vjp((ct_x_BLD, (ct_k_i, ct_v_i)))
        # Layer i's gradient added to row i of the running total, in place.
        total = jax.tree.map(lambda t, d: jax.lax.dynamic_update_index_in_dim(
            t, jax.lax.dynamic_index_in_dim(t, i, keepdims=False) + d, i, 0), total, d_layer)
        return (ct_x_BLD, total), (d_prefix_i, d_chain_i)

    (ct_x_BLD, total), (d_prefix, d_chain) = jax.lax.scan(
        body, (ct_x_BLD, ct_layers),
        (jnp.arange(cfg.n_layers), layers, inputs_NBLD, prefix, chain, ct_k, ct_v), reverse=True)
    return total, ct_x_BLD, None, None, d_prefix, d_chain


_layer_stack.defvjp(_layer_stack_fwd, _layer_stack_bwd)


# ----------------------------------------------------------------------------- pass loops

# A pass step, run over the passes of one kind: step(params, base_kv, buffer, carry, inputs,
# replay) -> (params, buffer, carry, outputs). `inputs` is the pass's entry of the stacked
# inputs; `replay` is None, or in the rematerialised backward pass the outputs of the forward
# pass, whose drawn tokens are used again. The params returned are `params` passed through
# (`hidden_threaded`), for the next pass.
PassStep = Callable[..., tuple[Params, KeyValues, Any, Any]]
PassLoop = Callable[[PassStep, Params, KeyValues, KeyValues, Any, Any],
                    tuple[Params, KeyValues, Any, Any]]


def pass_loop(cfg: QuietStarConfig) -> PassLoop:
    """The loop over passes: loop(step, params, base_kv, buffer, carry, inputs) -> (params
    passed through, final buffer, final carry, outputs stacked over the passes)."""
    return _scan_against_final_buffer if cfg.remat_passes else _unrolled


def single_pass(cfg: QuietStarConfig, chain_pass: Callable) -> Callable:
    """`chain_pass` (cfg its second argument), recomputed in the backward pass with
    `remat_passes` as the passes of `pass_loop` are."""
    return jax.checkpoint(chain_pass, static_argnums=(1,)) if cfg.remat_passes else chain_pass


def _unrolled(step: PassStep, params: Params, base_kv: KeyValues, buffer: KeyValues, carry: Any,
              inputs: Any) -> tuple[Params, KeyValues, Any, Any]:
    """`step` over the passes (the leading axis of `inputs`), one after the other in the program.

    Each pass takes the params the pass before it passed through, which a scan cannot do
    without keeping a copy of them per pass for the backward pass (a carry is never hoisted out
    of the loop)."""
    ys = []
    for i in range(jax.tree.leaves(inputs)[0].shape[0]):
        params, buffer, carry, y = step(params, base_kv, buffer, carry,
                                        jax.tree.map(lambda a, i=i: a[i], inputs), None)
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


def check_reads_before_writes(reads_IC: np.ndarray) -> None:
    """Raise unless each chain pass k reads only buffer slots written before it (c < k - 1).

    `_scan_against_final_buffer` recomputes every pass against the final buffer; that equals the
    buffer the pass saw only in the slots written before it.
    """
    for k in range(1, reads_IC.shape[0]):
        late = np.flatnonzero(reads_IC[k, k - 1:])
        if late.size:
            raise AssertionError(
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
    (`hidden_threaded`).
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


# ----------------------------------------------------------------------------- policy gradient


def policy_logprobs(head_VD: jax.Array, h_MRLD: jax.Array, choices_MRL: jax.Array,
                    values_MRL: jax.Array, cfg: QuietStarConfig) -> jax.Array:
    """`values` (the thought tokens' log-probs at policy_temperature) with their gradient.

    `head_VD` is `speakable_head`'s rows and `choices` index `speakable_ids`. The gradient flows
    into the output head and the chain states `h` [M, R, L, D]. It is computed pass by pass on
    the `cfg.policy_rows` rationales of each position with the largest cotangents, the logits
    recomputed for those rows only: the REINFORCE cotangents (clamped advantages) are zero on
    the others. The backward pass counts the rationales of each position that carry a
    cotangent, and when any has more (another loss term on the log-probs, or rounding; see
    `policy_rows`) it takes all P: the gradient is exact for any cotangent.
    """
    temperature, p, q = cfg.policy_temperature, cfg.n_rationales, cfg.policy_rows

    def logprob(head_VD, h, choices):
        return token_logprob(head_logits(head_VD, cfg, h), choices, temperature)

    def gradient(rows, head_VD, h_MRLD, choices_MRL, ct_MRL):
        """The gradient from the `rows` rationales of each position with the largest
        cotangents: exact when the others have none."""

        def one_pass(d_head, xs):
            h_PBLD, choices_PBL, ct_PBL = (from_rows(x, p) for x in xs)
            _, pick_BLQ = jax.lax.top_k(jnp.moveaxis(jnp.abs(ct_PBL), 0, -1), rows)
            pick_QBL = jnp.moveaxis(pick_BLQ, -1, 0)
            take = lambda x: jnp.take_along_axis(  # noqa: E731
                x, pick_QBL.reshape(pick_QBL.shape + (1,) * (x.ndim - 3)), 0)
            _, vjp = jax.vjp(lambda hd, h: logprob(hd, h, take(choices_PBL)), head_VD, take(h_PBLD))
            d_head_pass, d_h_QBLD = vjp(take(ct_PBL))
            # Back to all P rationales: each picked row to its own, zero on the others.
            chosen_QPBL = pick_QBL[:, None] == jnp.arange(p)[None, :, None, None]
            d_h_PBLD = jnp.sum(jnp.where(chosen_QPBL[..., None], d_h_QBLD[:, None], 0), 0)
            return d_head + d_head_pass, to_rows(d_h_PBLD)

        return jax.lax.scan(one_pass, jnp.zeros_like(head_VD), (h_MRLD, choices_MRL, ct_MRL))

    @jax.custom_vjp
    def with_gradient(head_VD, h_MRLD, choices_MRL, values_MRL):
        return values_MRL

    def forward(head_VD, h_MRLD, choices_MRL, values_MRL):
        return values_MRL, (head_VD, h_MRLD, choices_MRL)

    def backward(saved, ct_MRL):
        head_VD, h_MRLD, choices_MRL = saved
        if q == p:
            d_head, d_h_MRLD = gradient(p, head_VD, h_MRLD, choices_MRL, ct_MRL)
        else:
            # The most rationales of any position that carry a cotangent.
            reached = jnp.max(jnp.sum(from_rows(ct_MRL, p, axis=1) != 0, axis=1))
            d_head, d_h_MRLD = jax.lax.cond(
                reached <= q, functools.partial(gradient, q), functools.partial(gradient, p),
                head_VD, h_MRLD, choices_MRL, ct_MRL)
        return d_head, d_h_MRLD.astype(h_MRLD.dtype), None, jnp.zeros_like(ct_MRL)

    with_gradient.defvjp(forward, backward)
    return with_gradient(head_VD, h_MRLD, choices_MRL, jax.lax.stop_gradient(values_MRL))
