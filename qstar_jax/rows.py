"""The rationales side by side: [..., P, B, ...] as R = P * B rows, rationale-major, and back.

Shapes: B batch, P rationales, R = P * B rows, L positions, M or T passes of one kind (think
passes draw M thought tokens, talk passes score T offsets).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_rows(x_PB: jax.Array, axis: int = 0) -> jax.Array:
    """[..., P, B, ...] -> [..., R, ...]: row p * B + b is rationale p of sequence b; `axis` is
    P's."""
    shape = x_PB.shape
    return x_PB.reshape(shape[:axis] + (shape[axis] * shape[axis + 1],) + shape[axis + 2:])


def from_rows(x_R: jax.Array, p: int, axis: int = 0) -> jax.Array:
    """[..., R, ...] -> [..., P, B, ...]: the inverse of `to_rows`."""
    shape = x_R.shape
    return x_R.reshape(shape[:axis] + (p, shape[axis] // p) + shape[axis + 1:])


def every_rationale(x_B: jax.Array, p: int, axis: int = 0) -> jax.Array:
    """[..., B, ...] -> [..., R, ...]: the same values in every rationale's rows."""
    return to_rows(jnp.stack([x_B] * p, axis), axis)


def pass_rows(x_BPM: jax.Array) -> jax.Array:
    """[B, P, M, ...] -> [M, R, ...]: per pass, its rows."""
    return to_rows(jnp.swapaxes(x_BPM, 0, 2), axis=1)


def by_sequence(x_MR: jax.Array, p: int) -> jax.Array:
    """[M, R, ...] -> [B, P, M, ...]: the inverse of `pass_rows`."""
    return jnp.swapaxes(from_rows(x_MR, p, axis=1), 0, 2)
