"""Blockwise attention over a `Span` of keys (`span_attention`) against a plain softmax written
here and against the dense `attend`: values, gradients, memory, and a whole rollout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_generate import tiny_quiet_star

from qstar_jax.model import NEG_INF, Masks, attend, span, span_attention
from qstar_jax.objective import quiet_star_loss

B, L, S, K, G, E = 2, 11, 13, 2, 2, 8


def plain_attention(q_BLKGE, k_BSKE, v_BSKE, mask_BLS):
    """Softmax over the seen keys, written out: (out [B,K,G,L,E], lse [B,K,G,L])."""
    s = jnp.einsum("blkge,bske->bkgls", q_BLKGE, k_BSKE)
    s = jnp.where(mask_BLS[:, None, None], s, -jnp.inf)
    lse = jax.scipy.special.logsumexp(s, axis=-1)
    return jnp.einsum("bkgls,bske->bkgle", jnp.exp(s - lse[..., None]), v_BSKE), lse


def random_qkv(seed=0, length=L, keys=S):
    rng = np.random.default_rng(seed)
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    return draw(B, length, K, G, E), draw(B, keys, K, E), draw(B, keys, K, E)


# Queries at positions 2..12 against keys 0..12: causal, windowed (from another position, as a
# chain pass's), padded (row 1's last three keys and its key 4).
KEY_POS = jnp.broadcast_to(jnp.arange(S), (B, S))
Q_POS = jnp.broadcast_to(jnp.arange(L) + 2, (B, L))
PADDED = jnp.ones((B, S), bool).at[1, -3:].set(False).at[1, 4].set(False)
SPANS = {
    "causal": span(Q_POS, KEY_POS),
    "window": span(Q_POS, KEY_POS, window=4, window_from_BL=Q_POS + 2),
    "padded": span(Q_POS, KEY_POS, PADDED),
    "padded-window": span(Q_POS, KEY_POS, PADDED, window=5),
}


def test_span_dense_mask_written_out():
    """`Span.dense` is the causal / window / padding rule, entry by entry."""
    mask = np.asarray(SPANS["padded-window"].dense())
    for b in range(B):
        for i in range(L):
            for j in range(S):
                q = int(Q_POS[b, i])
                assert mask[b, i, j] == (j <= q and q - j < 5 and bool(PADDED[b, j]))


@pytest.mark.parametrize("name", list(SPANS))
@pytest.mark.parametrize("block", [4, 5, 13, 16])  # 13 keys: 4 and 5 leave a partial block
def test_span_attention_values_and_gradients(name, block):
    sp = SPANS[name]
    q, k, v = random_qkv()
    out, lse = span_attention(q, k, v, sp, block)
    ref_out, ref_lse = plain_attention(q, k, v, sp.dense())
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-6)

    # Cotangents on both outputs: the log-sum-exp's is what merging relies on.
    rng = np.random.default_rng(2)
    w_out = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    w_lse = jnp.asarray(rng.standard_normal(lse.shape), jnp.float32)

    def loss(fn, q, k, v):
        o, s = fn(q, k, v)
        return jnp.sum(o * w_out) + jnp.sum(s * w_lse)

    ours = jax.grad(functools.partial(loss, lambda *a: span_attention(*a, sp, block)),
                    argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(functools.partial(loss, lambda *a: plain_attention(*a, sp.dense())),
                   argnums=(0, 1, 2))(q, k, v)
    for name_, a, b in zip("qkv", ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))),
                                   err_msg=name_)


def test_query_that_sees_nothing():
    """Zero output, NEG_INF log-sum-exp, finite gradients: it adds nothing when merged."""
    q, k, v = random_qkv()
    sp = span(Q_POS, KEY_POS, jnp.zeros((B, S), bool))
    out, lse = span_attention(q, k, v, sp, 4)
    assert float(jnp.max(jnp.abs(out))) == 0.0
    assert bool(jnp.all(lse == NEG_INF))
    grads = jax.grad(lambda q, k, v: jnp.sum(span_attention(q, k, v, sp, 4)[0]),
                     argnums=(0, 1, 2))(q, k, v)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def chain_inputs(seed=0, c=3):
    """attend's inputs for a chain pass: queries [B,L,H,E], new keys, prefix keys, chain keys."""
    rng = np.random.default_rng(seed)
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    q, k, v = draw(B, L, K * G, E), draw(B, L, K, E), draw(B, L, K, E)
    prefix = (draw(B, S, K, E), draw(B, S, K, E))
    chain = (draw(B, L, c, K, E), draw(B, L, c, K, E))
    chain_BLC = jnp.broadcast_to(jnp.arange(c) < 2, (B, L, c))
    return (q, k, v, prefix, chain), chain_BLC


@pytest.mark.parametrize("name", ["window", "padded-window"])
@pytest.mark.parametrize("block", [4, 13])
def test_attend_merges_blockwise_prefix_with_chain_and_own_key(name, block):
    """A chain pass's attention: prefix keys blockwise, merged with the chain keys and the own
    key through the log-sum-exp, equals the one dense softmax over all of them."""
    sp = SPANS[name]
    (q, k, v, prefix, chain), chain_BLC = chain_inputs()

    def run(q, k, v, prefix, chain, blockwise):
        masks = Masks(prefix_BLS=sp if blockwise else sp.dense(), chain_BLC=chain_BLC)
        return attend(q, k, v, masks, prefix, chain, block if blockwise else 512)

    args = (q, k, v, prefix, chain)
    np.testing.assert_allclose(run(*args, True), run(*args, False), rtol=1e-5, atol=1e-6)
    w = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.float32)
    grad = lambda blockwise: jax.grad(  # noqa: E731
        lambda *a: jnp.sum(run(*a, blockwise) * w), argnums=(0, 1, 2, 3, 4))(*args)
    for a, b in zip(jax.tree.leaves(grad(True)), jax.tree.leaves(grad(False)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_attend_blockwise_self_attention_with_padding():
    """A base pass's causal self-attention with right padding, blockwise against dense."""
    q, k, v = random_qkv(keys=L)
    q = q.reshape(B, L, K * G, E)
    pos = jnp.broadcast_to(jnp.arange(L), (B, L))
    sp = span(pos, pos, jnp.ones((B, L), bool).at[1, -3:].set(False), window=6)
    dense = attend(q, k, v, Masks(self_BLL=sp.dense()), None, None, S)
    np.testing.assert_allclose(attend(q, k, v, Masks(self_BLL=sp), None, None, 3), dense,
                               rtol=1e-5, atol=1e-6)


def test_backward_memory_is_linear_in_keys():
    """The compiled gradient of blockwise attention over L queries and L keys: its temporaries
    double when L doubles (O(L * block)), where the dense softmax's quadruple (O(L^2))."""

    def temporaries(length, block=32):
        q, k, v = (jnp.zeros(x.shape[:1] + (length,) + x.shape[2:]) for x in random_qkv())
        pos = jnp.broadcast_to(jnp.arange(length), (B, length))
        loss = lambda q, k, v: jnp.sum(span_attention(q, k, v, span(pos, pos), block)[0])  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temporaries(512), temporaries(1024)
    assert large < 2.5 * small, (small, large)
    assert large < B * K * G * 1024 * 1024 * 4 / 4  # a quarter of one dense score array


def test_rollout_blockwise_equals_dense():
    """The whole loss and its gradient with the base keys attended in blocks of 3 (base pass and
    every chain pass) against the dense path, under a sliding window and right padding."""
    cfg, params = tiny_quiet_star(window=6, n_ahead=5)
    cfg = cfg.replace(n_passes=2, n_ahead_talk=2)
    tokens = np.random.default_rng(0).integers(1, 60, (2, 14)).astype(np.int32)
    tokens[1, -4:] = 0
    batch = {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(tokens != 0)}

    def loss_and_grads(block):
        c = cfg.replace(model=cfg.model.replace(attention_block=block))
        fn = lambda p: quiet_star_loss(p, batch, jax.random.key(0), c)  # noqa: E731
        return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

    (loss, metrics), grads = loss_and_grads(3)
    (ref_loss, ref_metrics), ref_grads = loss_and_grads(512)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for name in ref_metrics:
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))
