"""Llama/Mistral/Qwen decoder in flax.linen: attention takes explicit keys/values, returns new ones.

There is no mutable cache: a call says what its new tokens may attend to besides each other (a
`Context` of shared prefix keys and per-token chain keys) and returns the keys/values it made, so
the thought rollout and KV-cached decoding drive the same layers step by step.

Attention over many keys (more than `ModelConfig.attention_block`, given as a `Span`) runs
block by block with an online softmax (`span_attention`): memory linear in the keys, forward and
backward.

Shapes (the package's letters, `qstar_jax/__init__.py`): B batch, L new tokens, S prefix keys,
C chain keys per token, D model width, H query heads, K key/value heads, G = H // K, E head
width, F ffn width, V vocabulary, N layers, X keys of one block, Z blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from qstar_jax.errors import ConfigError, ConfigTypeError

Params = dict[str, Any]
# The score or logit of what cannot happen (a hidden key, a token never drawn), package-wide.
NEG_INF = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama/Mistral/Qwen2/Qwen3-family decoder."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int = 0  # 0: d_model // n_heads
    rope_theta: float = 10000.0
    # Llama 3.1 frequency scaling: (factor, low_freq_factor, high_freq_factor, original_max_pos).
    rope_llama3_scaling: tuple[float, float, float, int] | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    sliding_window: int | None = None
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2; Qwen3's attention_bias)
    o_bias: bool = False  # a bias on the output projection (Qwen3's attention_bias)
    qk_norm: bool = False  # RMSNorm over each head of q and k before the rotary embedding (Qwen3)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "nothing_saveable"  # a jax.checkpoint_policies name, or "none"
    # Keys per block of `span_attention`: a `Span` of more keys is attended block by block
    # (memory linear in the keys), one of at most this many in one dense softmax.
    attention_block: int = 512

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.remat_policy != "none" and not hasattr(jax.checkpoint_policies, self.remat_policy):
            raise ConfigError(f"unknown remat_policy {self.remat_policy!r}")
        if self.attention_block < 1:
            raise ConfigError(f"attention_block={self.attention_block} must be >= 1")

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        d, f, e = self.d_model, self.ffn_dim, self.head_dim
        q_kv = self.n_heads + 2 * self.n_kv_heads
        attn = d * e * (q_kv + self.n_heads)
        attn += self.qkv_bias * q_kv * e + self.o_bias * d + self.qk_norm * 2 * e
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.n_layers * per_layer + self.vocab_size * d + head + d


# ModelConfig fields a run chooses (numerics, memory); the others describe the checkpoint.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy")


def check_runtime_overrides(overrides: dict) -> None:
    """A TypeError unless `overrides` (for a config read from a checkpoint) set RUNTIME_FIELDS
    only."""
    unknown = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if unknown:
        raise ConfigTypeError(f"only {', '.join(RUNTIME_FIELDS)} can be set on import, not "
                              f"{', '.join(unknown)} (those come from the checkpoint)")


def is_quiet_star(params: Params) -> bool:
    """Whether `params` are a Quiet-STaR model's ({"decoder": decoder parameters, plus the thought
    embeddings and mixing head}) rather than a plain decoder's."""
    return "decoder" in params


# ----------------------------------------------------------------------------- key/value context


@flax.struct.dataclass
class KeyValues:
    """Rotated keys and values of every layer: k, v [N, B, S, K, E] (chains: [N, B, L, C, K, E])."""

    k: jax.Array
    v: jax.Array


@flax.struct.dataclass
class Span:
    """Which keys each new token sees, as bounds instead of an [B, L, S] array: key s is seen by
    query l when it is valid and lo_BL[l] < key_pos_BS[s] <= hi_BL[l].

    Memory O(L + S), where a dense mask is O(L * S); `span_attention` builds each block's mask
    from it.
    """

    key_pos_BS: jax.Array
    hi_BL: jax.Array  # the last key position seen (causal)
    lo_BL: jax.Array | None = None  # keys at or below it are outside the sliding window
    key_valid_BS: jax.Array | None = None  # None: every key is a real token

    def dense(self) -> jax.Array:
        """The mask [B, L, S]."""
        k = self.key_pos_BS[:, None, :]
        mask = k <= self.hi_BL[:, :, None]
        if self.lo_BL is not None:
            mask &= k > self.lo_BL[:, :, None]
        if self.key_valid_BS is not None:
            mask &= self.key_valid_BS[:, None, :]
        return mask


def span(q_pos_BL: jax.Array, k_pos_BS: jax.Array, k_valid_BS: jax.Array | None = None,
         window: int | None = None, window_from_BL: jax.Array | None = None) -> Span:
    """Causal visibility: key position <= query position, key valid, and within `window` of
    `window_from_BL` (default the query position): q - k < window."""
    anchor = q_pos_BL if window_from_BL is None else window_from_BL
    return Span(k_pos_BS, q_pos_BL, None if window is None else anchor - window, k_valid_BS)


@flax.struct.dataclass
class Masks:
    """Which keys each new token sees: a dense [B, L, S] bool array or a `Span` per key set.
    `self_BLL` None: each new token sees only its own key."""

    prefix_BLS: jax.Array | Span | None = None
    chain_BLC: jax.Array | None = None
    self_BLL: jax.Array | Span | None = None


@flax.struct.dataclass
class Context:
    """What a call's new tokens attend to: shared prefix keys, per-token chain keys, each other."""

    masks: Masks
    prefix: KeyValues | None = None  # [N, B, S, K, E], shared by all new tokens
    chain: KeyValues | None = None  # [N, B, L, C, K, E], private to each new token


def visible(q_pos_BL: jax.Array, k_pos_BS: jax.Array, k_valid_BS: jax.Array | None = None,
            window: int | None = None) -> jax.Array:
    """Causal visibility [B, L, S]: key position <= query position, key valid, within the window."""
    return span(q_pos_BL, k_pos_BS, k_valid_BS, window).dense()


def causal_context(positions_BL: jax.Array, valid_BL: jax.Array | None = None,
                   window: int | None = None) -> Context:
    """Context of an ordinary causal pass over a sequence (padding keys masked when given)."""
    return Context(Masks(self_BLL=span(positions_BL, positions_BL, valid_BL, window)))


# ----------------------------------------------------------------------------- layers


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def _init(names: Sequence[str], scale: float = 0.02):
    return nn.with_logical_partitioning(nn.initializers.normal(scale), tuple(names))


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies [E/2] of the rotary embedding (with Llama 3.1 scaling when set)."""
    e = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
    if cfg.rope_llama3_scaling is None:
        return inv_freq
    factor, low, high, original = cfg.rope_llama3_scaling
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = original / low, original / high
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x_BLHE: jax.Array, positions_BL: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in the Hugging Face (rotate-half) layout, computed in float32."""
    angles = positions_BL[..., None].astype(jnp.float32) * inv_freq  # [B, L, E/2]
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    x = x_BLHE.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(x_BLHE.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, whose logical name is `axis` ("head_dim" for Qwen3's q/k)."""

    eps: float
    dtype: str
    param_dtype: str
    axis: str = "embed"

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (self.axis,)),
            (x.shape[-1],),
            _dtype(self.param_dtype),
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale * x32.astype(_dtype(self.dtype))).astype(_dtype(self.dtype))


def attend(q_BLHE: jax.Array, k_BLKE: jax.Array, v_BLKE: jax.Array, masks: Masks,
           prefix: tuple[jax.Array, jax.Array] | None,
           chain: tuple[jax.Array, jax.Array] | None, block: int) -> jax.Array:
    """One softmax over prefix keys [B,S,K,E], chain keys [B,L,C,K,E] and the new keys [B,L,K,E].

    Prefix or new keys under a `Span` of more than `block` keys are attended by `span_attention`
    and merged with the rest through their log-sum-exp: the same softmax, computed in parts.
    """
    b, n, h, e = q_BLHE.shape
    kh = k_BLKE.shape[2]
    q = q_BLHE.reshape(b, n, kh, h // kh, e) * (1.0 / math.sqrt(e))  # [B, L, K, G, E]
    # Each block: (scores [B,K,G,L,X], mask broadcastable to it, probs [B,K,G,L,X] -> out).
    blocks, spans = [], []

    def every_token(keys_BSKE, values_BSKE, mask):
        """Keys all new tokens may see (the prefix, or the new keys themselves)."""
        if isinstance(mask, Span) and keys_BSKE.shape[1] > block:
            spans.append((keys_BSKE, values_BSKE, mask))
            return
        mask = mask.dense() if isinstance(mask, Span) else mask
        blocks.append((jnp.einsum("blkge,bske->bkgls", q, keys_BSKE), mask[:, None, None],
                       lambda p: jnp.einsum("bkgls,bske->bkgle", p, values_BSKE)))

    if prefix is not None:
        every_token(*prefix, masks.prefix_BLS)
    if chain is not None:
        ck, cv = chain
        blocks.append((jnp.einsum("blkge,blcke->bkglc", q, ck), masks.chain_BLC[:, None, None],
                       lambda p, v=cv: jnp.einsum("bkglc,blcke->bkgle", p, v)))
    if masks.self_BLL is None:  # each new token sees only its own new key
        own = jnp.einsum("blkge,blke->bkgl", q, k_BLKE)[..., None]
        v_BK1LE = v_BLKE.transpose(0, 2, 1, 3)[:, :, None]
        blocks.append((own, True, lambda p: p * v_BK1LE))
    else:
        every_token(k_BLKE, v_BLKE, masks.self_BLL)
    parts = [span_attention(q, keys, values, mask, block) for keys, values, mask in spans]
    if blocks:
        parts.append(_softmax_blocks(blocks, v_BLKE.dtype))
    out_BKGLE = parts[0][0] if len(parts) == 1 else _merge(parts)
    return out_BKGLE.astype(v_BLKE.dtype).transpose(0, 3, 1, 2, 4).reshape(b, n, h, e)


def _softmax_blocks(blocks: list, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """One softmax over the blocks' scores: (out [B,K,G,L,E] in `dtype`, log-sum-exp
    [B,K,G,L] float32, unused and not computed when nothing is merged)."""
    logits = jnp.concatenate(
        [jnp.where(mask, s.astype(jnp.float32), NEG_INF) for s, mask, _ in blocks], axis=-1)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out_BKGLE, start = 0.0, 0
    for scores, _, combine in blocks:
        width = scores.shape[-1]
        out_BKGLE = out_BKGLE + combine(probs[..., start:start + width])
        start += width
    return out_BKGLE, jax.nn.logsumexp(logits, axis=-1)


def _merge(parts: list[tuple[jax.Array, jax.Array]]) -> jax.Array:
    """Outputs [B,K,G,L,E] of softmaxes over disjoint key sets, each with its log-sum-exp
    [B,K,G,L], as the one softmax over all of them would give (float32)."""
    lse = functools.reduce(jnp.logaddexp, [lse for _, lse in parts])
    return sum(jnp.exp(part_lse - lse)[..., None] * out.astype(jnp.float32)
               for out, part_lse in parts)


# ----------------------------------------------------------------------------- span attention


def span_attention(q_BLKGE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, span: Span,
                   block: int) -> tuple[jax.Array, jax.Array]:
    """Softmax attention of (scaled) queries over the keys `span` lets them see, `block` keys at
    a time: (out [B,K,G,L,E], log-sum-exp [B,K,G,L]), float32.

    An online softmax (running max, sum and output) scanned over key blocks, each block's mask
    built from `span`; S need not be a multiple of `block` (the last block is padded with
    invalid keys). The backward pass recomputes each block's scores from the saved output and
    log-sum-exp (flash attention's), so memory is O(L * block + S) both ways, never O(L * S). A
    query that sees no key gets out 0 and log-sum-exp NEG_INF: it adds nothing when merged.
    """
    return _span_attention(block, q_BLKGE, k_BSKE, v_BSKE, span)


def _key_blocks(block: int, k_BSKE: jax.Array, v_BSKE: jax.Array,
                span: Span) -> tuple[jax.Array, ...]:
    """Keys, values [Z, B, X, K, E], key positions and valid flags [Z, B, X]: Z = ceil(S / X)
    blocks of X keys, the last padded with invalid keys."""
    s = k_BSKE.shape[1]
    n = -(-s // block)
    valid_BS = (jnp.ones(span.key_pos_BS.shape, bool) if span.key_valid_BS is None
                else span.key_valid_BS)

    def split(x_BS):
        pad = [(0, 0), (0, n * block - s)] + [(0, 0)] * (x_BS.ndim - 2)
        x = jnp.pad(x_BS, pad)  # padding: zeros, False (invalid) for the valid flags
        return jnp.moveaxis(x.reshape((x.shape[0], n, block) + x.shape[2:]), 1, 0)

    return split(k_BSKE), split(v_BSKE), split(span.key_pos_BS), split(valid_BS)


def _block_scores(q_BLKGE: jax.Array, span: Span, k_BXKE: jax.Array, pos_BX: jax.Array,
                  valid_BX: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scores [B,K,G,L,X] float32 of one key block (NEG_INF where `span` hides the key) and the
    mask [B,1,1,L,X]."""
    mask = span.replace(key_pos_BS=pos_BX, key_valid_BS=valid_BX).dense()[:, None, None]
    scores = jnp.einsum("blkge,bxke->bkglx", q_BLKGE, k_BXKE).astype(jnp.float32)
    return jnp.where(mask, scores, NEG_INF), mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _span_attention(block, q_BLKGE, k_BSKE, v_BSKE, span):
    return _span_forward(block, q_BLKGE, k_BSKE, v_BSKE, span)[0]


def _span_forward(block, q_BLKGE, k_BSKE, v_BSKE, span):
    b, length, kh, g, e = q_BLKGE.shape

    def body(carry, xs):
        m_BKGL, sum_BKGL, o_BKGLE = carry
        k_BXKE, v_BXKE, pos_BX, valid_BX = xs
        s, mask = _block_scores(q_BLKGE, span, k_BXKE, pos_BX, valid_BX)
        m_new = jnp.maximum(m_BKGL, jnp.max(s, -1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        rescale = jnp.exp(m_BKGL - m_new)
        o_BKGLE = o_BKGLE * rescale[..., None] + jnp.einsum(
            "bkglx,bxke->bkgle", p.astype(v_BXKE.dtype), v_BXKE,
            preferred_element_type=jnp.float32)
        return (m_new, sum_BKGL * rescale + jnp.sum(p, -1), o_BKGLE), None

    init = (jnp.full((b, kh, g, length), NEG_INF), jnp.zeros((b, kh, g, length)),
            jnp.zeros((b, kh, g, length, e)))
    (m, total, o), _ = jax.lax.scan(body, init, _key_blocks(block, k_BSKE, v_BSKE, span))
    seen = total > 0
    total = jnp.where(seen, total, 1.0)
    out_BKGLE = o / total[..., None]
    lse_BKGL = jnp.where(seen, m + jnp.log(total), NEG_INF)
    return (out_BKGLE, lse_BKGL), (q_BLKGE, k_BSKE, v_BSKE, span, out_BKGLE, lse_BKGL)


def _span_backward(block, saved, cotangents):
    q_BLKGE, k_BSKE, v_BSKE, span, out_BKGLE, lse_BKGL = saved
    d_out_BKGLE, d_lse_BKGL = cotangents
    # d score = p * (d p - sum(d out * out) + d lse), per block, p = exp(score - lse).
    delta_BKGL = jnp.sum(d_out_BKGLE * out_BKGLE, -1) - d_lse_BKGL
    d_out = d_out_BKGLE.astype(v_BSKE.dtype)
    f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)

    def body(d_q_BLKGE, xs):
        k_BXKE, v_BXKE, pos_BX, valid_BX = xs
        s, mask = _block_scores(q_BLKGE, span, k_BXKE, pos_BX, valid_BX)
        p = jnp.where(mask, jnp.exp(s - lse_BKGL[..., None]), 0.0)
        d_v_BXKE = f32("bkglx,bkgle->bxke", p.astype(v_BXKE.dtype), d_out)
        d_p = f32("bkgle,bxke->bkglx", d_out, v_BXKE)
        d_s = (p * (d_p - delta_BKGL[..., None])).astype(k_BXKE.dtype)
        d_q_BLKGE = d_q_BLKGE + f32("bkglx,bxke->blkge", d_s, k_BXKE)
        d_k_BXKE = f32("bkglx,blkge->bxke", d_s, q_BLKGE)
        return d_q_BLKGE, (d_k_BXKE, d_v_BXKE)

    d_q, (d_k, d_v) = jax.lax.scan(body, jnp.zeros(q_BLKGE.shape, jnp.float32),
                                   _key_blocks(block, k_BSKE, v_BSKE, span))
    s = k_BSKE.shape[1]
    joined = lambda x_ZBX: jnp.moveaxis(x_ZBX, 0, 1).reshape(  # noqa: E731
        (x_ZBX.shape[1], -1) + x_ZBX.shape[3:])[:, :s]
    return (d_q.astype(q_BLKGE.dtype), joined(d_k).astype(k_BSKE.dtype),
            joined(d_v).astype(v_BSKE.dtype), None)


_span_attention.defvjp(_span_forward, _span_backward)


def dense_if_small(masks: Masks, block: int) -> Masks:
    """Spans of at most `block` keys as dense masks (what `attend` makes of them), built once
    for all layers rather than in each."""
    small = lambda m: m.dense() if isinstance(m, Span) and m.key_pos_BS.shape[1] <= block else m  # noqa: E731
    return masks.replace(prefix_BLS=small(masks.prefix_BLS), self_BLL=small(masks.self_BLL))


class Projection(nn.Module):
    """A weight of any rank applied by einsum (a 3-D kernel keeps its logical axis names), plus a
    bias over the kernel's output axes when `use_bias` (e.g. [H, E] for "bld,dhe->blhe")."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    equation: str
    dtype: str
    param_dtype: str
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        pdt, dt = _dtype(self.param_dtype), _dtype(self.dtype)
        kernel = self.param("kernel", _init(self.axes), self.shape, pdt)
        y = jnp.einsum(self.equation, x.astype(dt), kernel.astype(dt))
        if not self.use_bias:
            return y
        inputs, out = self.equation.split("->")
        kept = [i for i, c in enumerate(inputs.split(",")[1]) if c in out]
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                 tuple(self.axes[i] for i in kept)),
            tuple(self.shape[i] for i in kept), pdt)
        return y + bias.astype(dt)


class Attention(nn.Module):
    """The one place q, k, v are projected (biases, per-head q/k norm, rotary), so the parallel
    rollout and KV-cached decoding get the same keys; `attend` does the rest."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD, positions_BL, masks: Masks, prefix, chain):
        cfg = self.cfg
        d, e = cfg.d_model, cfg.head_dim

        def proj(name, heads, axes):
            return Projection((d, heads, e), ("embed", axes, "head_dim"), "bld,dhe->blhe",
                              cfg.dtype, cfg.param_dtype, cfg.qkv_bias, name=name)(x_BLD)

        def head_norm(name, x_BLHE):
            if not cfg.qk_norm:
                return x_BLHE
            return RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, "head_dim", name=name)(x_BLHE)

        inv_freq = rope_frequencies(cfg)
        q = apply_rope(head_norm("q_norm", proj("q_proj", cfg.n_heads, "heads")), positions_BL,
                       inv_freq)
        k = apply_rope(head_norm("k_norm", proj("k_proj", cfg.n_kv_heads, "kv_heads")),
                       positions_BL, inv_freq)
        v = proj("v_proj", cfg.n_kv_heads, "kv_heads")
        q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", None))
        out = attend(q, k, v, masks, prefix, chain, cfg.attention_block)
        y = Projection((cfg.n_heads, e, d), ("heads", "head_dim", "embed"), "blhe,hed->bld",
                       cfg.dtype, cfg.param_dtype, cfg.o_bias, name="o_proj")(out)
        return y, k, v


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD):
        cfg = self.cfg
        dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)

        def dense(name, features, axes):
            return nn.Dense(features, use_bias=False, dtype=dt, param_dtype=pdt,
                            kernel_init=_init(axes), name=name)

        gate = dense("gate_proj", cfg.ffn_dim, ("embed", "mlp"))(x_BLD)
        up = dense("up_proj", cfg.ffn_dim, ("embed", "mlp"))(x_BLD)
        h_BLF = nn.with_logical_constraint(nn.silu(gate) * up,
                                           ("act_batch", "act_length", "act_mlp"))
        return dense("down_proj", cfg.d_model, ("mlp", "embed"))(h_BLF)


class Block(nn.Module):
    """Pre-norm decoder layer. Carry: x [B, L, D]; returns the layer's new keys/values."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD, prefix_chain, positions_BL, masks: Masks):
        cfg = self.cfg
        prefix, chain = prefix_chain
        norm = lambda name: RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name=name)  # noqa: E731
        y, k, v = Attention(cfg, name="attn")(norm("attn_norm")(x_BLD), positions_BL, masks,
                                              prefix, chain)
        x_BLD = x_BLD + y
        x_BLD = x_BLD + MLP(cfg, name="mlp")(norm("mlp_norm")(x_BLD))
        x_BLD = nn.with_logical_constraint(x_BLD, ("act_batch", "act_length", "act_embed"))
        return x_BLD, (k, v)


class Transformer(nn.Module):
    """The decoder. `apply({'params': p}, tokens_BL)` gives float32 logits [B, L, V]."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        self.embedder = nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=pdt,
            embedding_init=_init(("vocab", "embed"), 1.0), name="embed",
        )
        block = Block
        if cfg.remat_policy != "none":
            block = nn.remat(Block, policy=getattr(jax.checkpoint_policies, cfg.remat_policy),
                             prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast), length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, name="layers")
        else:
            self.layers = [block(cfg, name=f"layers_{i}") for i in range(cfg.n_layers)]
        self.final_norm = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="final_norm")
        if not cfg.tie_embeddings:  # one row per token [V, D], like the embedding and HF
            self.lm_head = Projection((cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                                      "...d,vd->...v", cfg.dtype, cfg.param_dtype, name="lm_head")

    def __call__(self, tokens_BL: jax.Array, positions_BL: jax.Array | None = None,
                 valid_BL: jax.Array | None = None) -> jax.Array:
        """Plain causal LM logits [B, L, V]; `valid_BL` masks padding keys (HF attention_mask)."""
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
        ctx = causal_context(positions_BL, valid_BL, self.cfg.sliding_window)
        h_BLD, _ = self.hidden(self.embed(tokens_BL), positions_BL, ctx)
        return self.logits(h_BLD)

    def embed(self, tokens_BL: jax.Array) -> jax.Array:
        """Token embeddings [B, L, D] in the compute dtype."""
        x = self.embedder(tokens_BL)
        return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

    def hidden(self, x_BLD: jax.Array, positions_BL: jax.Array,
               ctx: Context) -> tuple[jax.Array, KeyValues]:
        """Final-normed hidden states [B, L, D] and the new keys/values [N, B, L, K, E]."""

        masks = dense_if_small(ctx.masks, self.cfg.attention_block)
        if self.cfg.scan_layers:
            prefix_chain = (layer_kv(ctx.prefix), layer_kv(ctx.chain))
            x_BLD, (k, v) = self.layers(x_BLD, prefix_chain, positions_BL, masks)
        else:
            ks, vs = [], []
            for i, layer in enumerate(self.layers):
                prefix_chain = (layer_kv(ctx.prefix, i), layer_kv(ctx.chain, i))
                x_BLD, (k, v) = layer(x_BLD, prefix_chain, positions_BL, masks)
                ks.append(k)
                vs.append(v)
            k, v = jnp.stack(ks), jnp.stack(vs)
        return self.final_norm(x_BLD), KeyValues(k, v)

    def logits(self, h_BLD: jax.Array) -> jax.Array:
        """Output-head logits [..., V] in float32."""
        if self.cfg.tie_embeddings:
            out = self.embedder.attend(h_BLD)
        else:
            out = self.lm_head(h_BLD)
        return out.astype(jnp.float32)


def layer_kv(kv: KeyValues | None, i: int | None = None) -> tuple[jax.Array, jax.Array] | None:
    """Keys and values of every layer as the layer scan reads them ([N, ...] each), or of layer
    `i`; None without any."""
    if kv is None:
        return None
    return (kv.k, kv.v) if i is None else (kv.k[i], kv.v[i])


# ----------------------------------------------------------------------------- parameters


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Random parameters (plain arrays) for `cfg`."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return nn.unbox(Transformer(cfg).init(rng, tokens)["params"])


def abstract_params(cfg: ModelConfig) -> Params:
    """Shapes, dtypes and logical axis names of the parameters, without allocating them."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda r: Transformer(cfg).init(r, tokens), jax.random.key(0))["params"]


def split_layers(params: Params, cfg: ModelConfig) -> tuple[Params, list[Params]]:
    """(non-layer parameters, one parameter tree per layer), for either layout."""
    rest = {k: v for k, v in params.items() if not k.startswith("layers")}
    if cfg.scan_layers:
        layers = [jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(cfg.n_layers)]
    else:
        layers = [params[f"layers_{i}"] for i in range(cfg.n_layers)]
    return rest, layers


def join_layers(rest: Params, layers: Sequence[Params], cfg: ModelConfig) -> Params:
    """Inverse of `split_layers`: stacked under "layers" when scanned, else "layers_<i>"."""
    params = dict(rest)
    if cfg.scan_layers:
        params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    else:
        params.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
    return params
