"""Quiet-STaR parameters and the parallel thought rollout.

Parameters of a Quiet-STaR model: {"decoder": Transformer params (vocabulary incl. the two thought
tokens), "start_embedding": [D], "end_embedding": [D] (both stored divided by
`embedding_scale`), "mixing_head": MixingHead params}.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qstar_jax.model import (
    Context,
    KeyValues,
    Masks,
    ModelConfig,
    Params,
    Transformer,
    causal_context,
    visible,
)

N_THOUGHT_TOKENS = 2  # <|startthought|>, <|endthought|>


@dataclasses.dataclass(frozen=True)
class QuietStarConfig:
    """The decoder plus every Quiet-STaR option; defaults are the authors' code's behaviour."""

    model: ModelConfig  # vocabulary includes the two thought tokens
    start_thought_id: int
    end_thought_id: int
    pad_id: int  # labels equal to it are ignored (the reference pads with EOS)
    n_ahead: int = 12  # passes from the base pass to the end-of-thought pass, inclusive
    n_ahead_talk: int = 4  # true future tokens scored after each thought
    n_passes: int = 2  # rationales per position
    thought_temperature: float = 1.0
    greedy_thoughts: bool = False
    reinforce_temperature: float = 3.0
    policy_loss_beta: float = 1e6
    base_loss_beta: float = 1.0
    original_loss_weight: float = 0.5  # weight of the base-pass CE; talk CEs get 1 - it
    embedding_scale: float = 100.0
    remove_negative_rewards: bool = True
    use_trice_baseline: bool = True
    mixing_sigmoid: bool = False
    remat_passes: bool = True  # rematerialise each chain pass in the backward pass

    def __post_init__(self):
        if self.n_ahead > 1 and self.n_ahead < 3:
            raise ValueError(
                f"n_ahead={self.n_ahead}: a thought needs n_ahead >= 3 (or 1 for no thoughts)")
        if self.n_ahead < 1 or self.n_ahead_talk < 1 or self.n_passes < 1:
            raise ValueError("n_ahead, n_ahead_talk and n_passes must be >= 1")
        vocab = self.model.vocab_size
        for name in ("start_thought_id", "end_thought_id"):
            if not 0 <= getattr(self, name) < vocab:
                raise ValueError(f"{name}={getattr(self, name)} is outside the vocabulary "
                                 f"({vocab}): the model has no thought tokens")

    def replace(self, **changes) -> QuietStarConfig:
        return dataclasses.replace(self, **changes)

    @property
    def thinks(self) -> bool:
        return self.n_ahead > 1

    @property
    def n_sampled(self) -> int:
        """Sampled thought tokens between the start and end tokens."""
        return max(self.n_ahead - 3, 0)

    @property
    def policy_rows(self) -> int:
        """Rationales per position whose thought tokens can have a nonzero advantage.

        With the TRICE baseline and negative advantages dropped, a position's P advantages sum
        to zero before clamping, so at most P - 1 stay positive and the policy gradient skips
        the rest. In float32 this is exact for P = 2; for larger P, rounding of the mean can
        leave all P within a few ulps of zero, and the smallest is then skipped.
        """
        if self.use_trice_baseline and self.remove_negative_rewards and self.n_passes > 1:
            return self.n_passes - 1
        return self.n_passes

    @property
    def n_chain_passes(self) -> int:
        """Chain passes after the base pass: thought tokens, then teacher-forced talk tokens."""
        return self.n_ahead + self.n_ahead_talk - 2


class MixingHead(nn.Module):
    """Weight of the thought side from concat(h_base, h_thought): Linear-ReLU-Linear-ReLU-Linear."""

    d_model: int
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, h_base_D: jax.Array, h_thought_D: jax.Array) -> jax.Array:
        dense = lambda n, name, init, bias=True: nn.Dense(  # noqa: E731
            n, use_bias=bias, param_dtype=jnp.dtype(self.param_dtype), dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(init, ("mix_in", "mix_out")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mix_out",)), name=name,
        )
        x = jnp.concatenate([h_base_D, h_thought_D], axis=-1).astype(jnp.float32)
        x = nn.relu(dense(self.d_model, "hidden_0", nn.initializers.normal(0.02))(x))
        x = nn.relu(dense(self.d_model, "hidden_1", nn.initializers.normal(0.02))(x))
        return dense(1, "out", nn.initializers.zeros, bias=False)(x)[..., 0]


def add_thought_params(decoder_params: Params, cfg: ModelConfig, init_token_id: int,
                       rng: jax.Array, embedding_scale: float = 100.0
                       ) -> tuple[ModelConfig, Params]:
    """Turn a plain LM into a Quiet-STaR model: two new vocabulary rows, start/end embeddings, head.

    New embedding/head rows are the mean of the existing rows (their logits are always masked);
    start/end embeddings are the embedding of `init_token_id` (the first token of "---") divided
    by `embedding_scale`; the mixing head's last layer is zero, so the model starts as the LM.
    """
    grown = dict(decoder_params)
    table = decoder_params["embed"]["embedding"]
    grow = lambda m: jnp.concatenate([m, jnp.repeat(m.mean(0, keepdims=True), 2, 0)], 0)  # noqa: E731
    grown["embed"] = {"embedding": grow(table)}
    if not cfg.tie_embeddings:
        grown["lm_head"] = {"kernel": grow(decoder_params["lm_head"]["kernel"])}
    new_cfg = cfg.replace(vocab_size=cfg.vocab_size + N_THOUGHT_TOKENS)
    start = (table[init_token_id] / embedding_scale).astype(table.dtype)
    head = MixingHead(cfg.d_model, cfg.param_dtype).init(
        rng, jnp.zeros((1, cfg.d_model)), jnp.zeros((1, cfg.d_model)))["params"]
    params = {"decoder": grown, "start_embedding": start, "end_embedding": start,
              "mixing_head": nn.unbox(head)}
    return new_cfg, params


# ----------------------------------------------------------------------------- building blocks


def decoder(cfg: QuietStarConfig) -> Transformer:
    return Transformer(cfg.model)


def embed_tokens(params: Params, cfg: QuietStarConfig, tokens: jax.Array) -> jax.Array:
    """Token embeddings [..., D] (thought tokens use `start_end_embeddings`, not these rows)."""
    shape = tokens.shape
    x = decoder(cfg).apply({"params": params["decoder"]}, tokens.reshape(1, -1), method="embed")
    return x.reshape(*shape, -1)


def start_end_embeddings(params: Params, cfg: QuietStarConfig) -> tuple[jax.Array, jax.Array]:
    """Input embeddings [D] of <|startthought|> and <|endthought|> (stored / embedding_scale)."""
    dt = jnp.dtype(cfg.model.dtype)
    scale = cfg.embedding_scale
    return ((params["start_embedding"] * scale).astype(dt),
            (params["end_embedding"] * scale).astype(dt))


def hidden(params: Params, cfg: QuietStarConfig, x_BLD: jax.Array, positions_BL: jax.Array,
           ctx: Context) -> tuple[jax.Array, KeyValues]:
    """Decoder hidden states [B, L, D] (final norm applied) and new keys/values."""
    return decoder(cfg).apply({"params": params["decoder"]}, x_BLD, positions_BL, ctx,
                              method="hidden")


def head_rows(params: Params, cfg: QuietStarConfig) -> jax.Array:
    """The output head's weights [V, D]: the lm_head kernel, or the tied embedding."""
    if cfg.model.tie_embeddings:
        return params["decoder"]["embed"]["embedding"]
    return params["decoder"]["lm_head"]["kernel"]


def head_logits(rows_VD: jax.Array, cfg: QuietStarConfig, h: jax.Array) -> jax.Array:
    """Logits [..., V'] of states h [..., D] against head rows [V', D], float32."""
    dt = jnp.dtype(cfg.model.dtype)
    return jnp.einsum("...d,vd->...v", h.astype(dt), rows_VD.astype(dt)).astype(jnp.float32)


def lm_logits(params: Params, cfg: QuietStarConfig, h: jax.Array) -> jax.Array:
    """Output-head logits [..., V] in float32."""
    return head_logits(head_rows(params, cfg), cfg, h)


def mask_thought_logits(logits_V: jax.Array, cfg: QuietStarConfig) -> jax.Array:
    """Logits with the two thought tokens made impossible (they are never sampled or spoken)."""
    ids_V = jax.lax.broadcasted_iota(jnp.int32, logits_V.shape, logits_V.ndim - 1)
    thought_V = (ids_V == cfg.start_thought_id) | (ids_V == cfg.end_thought_id)
    return jnp.where(thought_V, jnp.asarray(-1e10, logits_V.dtype), logits_V)


def mix(params: Params, cfg: QuietStarConfig, h_base_D: jax.Array,
        h_thought_D: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mixed hidden state (1 - w) * h_base + w * h_thought and the weight w [...]."""
    w = MixingHead(cfg.model.d_model, cfg.model.param_dtype).apply(
        {"params": params["mixing_head"]}, h_base_D, h_thought_D)
    if cfg.mixing_sigmoid:
        w = jax.nn.sigmoid(w)
    w_ = w[..., None].astype(h_base_D.dtype)
    return (1 - w_) * h_base_D + w_ * h_thought_D, w


def speakable_ids(cfg: QuietStarConfig) -> np.ndarray:
    """Vocabulary ids other than the two thought tokens [V - 2], ascending: what a thought may
    contain."""
    thought = [cfg.start_thought_id, cfg.end_thought_id]
    return np.delete(np.arange(cfg.model.vocab_size, dtype=np.int32), thought)


def _thoughts_last(cfg: QuietStarConfig) -> bool:
    """Whether the thought tokens are the vocabulary's last two ids (`speakable_ids` a range)."""
    v = cfg.model.vocab_size
    return {cfg.start_thought_id, cfg.end_thought_id} == {v - 2, v - 1}


def _speakable_slice(x: jax.Array, cfg: QuietStarConfig, axis: int) -> jax.Array:
    """`x` at `speakable_ids` along its vocabulary axis."""
    if _thoughts_last(cfg):
        return jax.lax.slice_in_dim(x, 0, cfg.model.vocab_size - N_THOUGHT_TOKENS, axis=axis)
    return jnp.take(x, jnp.asarray(speakable_ids(cfg)), axis=axis)


def speakable_head(rows_VD: jax.Array, cfg: QuietStarConfig) -> jax.Array:
    """`head_rows` restricted to `speakable_ids` [V - 2, D].

    Thought logits of many rows (a training pass) are computed without the thought tokens' rows
    instead of masked afterwards: the same distribution, and the softmax and sampling then read
    the logits directly. A few rows (a decoding step) use `speakable_columns` instead, which
    copies less.
    """
    return _speakable_slice(rows_VD, cfg, 0)


def speakable_columns(logits_V: jax.Array, cfg: QuietStarConfig) -> jax.Array:
    """Full logits [..., V] cut to `speakable_ids` [..., V - 2]."""
    return _speakable_slice(logits_V, cfg, logits_V.ndim - 1)


def speakable_index(tokens: jax.Array, cfg: QuietStarConfig) -> jax.Array:
    """Position of each (non-thought) token id in `speakable_ids`."""
    return (tokens - (tokens > cfg.start_thought_id) - (tokens > cfg.end_thought_id)).astype(
        jnp.int32)


def speakable_token(index: jax.Array, cfg: QuietStarConfig) -> jax.Array:
    """The token id at each position of `speakable_ids` (inverse of `speakable_index`)."""
    return index if _thoughts_last(cfg) else jnp.asarray(speakable_ids(cfg))[index]


def _block_size(v: int) -> int:
    """A block width for `sample` that divides the vocabulary when it can (no padding)."""
    return next((k for k in range(256, 63, -1) if v % k == 0), 128)


def sample(rng: jax.Array, logits_BV: jax.Array, temperature: float = 1.0,
           block: int | None = None) -> jax.Array:
    """A draw [...] from softmax(logits [..., V] / temperature) by inverting its CDF with one
    uniform per row.

    The same distribution as jax.random.categorical without its V Gumbel draws per row, which
    dominate a training step on a CPU. The CDF is inverted in two levels (which block of `block`
    tokens, then which token in it): the logits are read by two reductions and one gather, and
    nothing of their size is written.
    """
    v = logits_BV.shape[-1]
    block = _block_size(v) if block is None else block
    logits = logits_BV.astype(jnp.float32)
    m = jnp.max(logits, -1, keepdims=True)
    n_blocks = -(-v // block)
    if n_blocks * block != v:
        pad = [(0, 0)] * (logits.ndim - 1) + [(0, n_blocks * block - v)]
        logits = jnp.pad(logits, pad, constant_values=-jnp.inf)
    logits_NK = logits.reshape(logits.shape[:-1] + (n_blocks, block))  # N blocks of K tokens
    mass_N = jnp.sum(jnp.exp((logits_NK - m[..., None]) / temperature), -1)
    cdf_N = jnp.cumsum(mass_N, -1)
    tiny = jnp.finfo(jnp.float32).tiny  # u > 0: a zero-probability first token is never drawn
    u = jax.random.uniform(rng, cdf_N.shape[:-1] + (1,), minval=tiny) * cdf_N[..., -1:]
    blk = jnp.minimum(jnp.sum(cdf_N < u, -1, keepdims=True), n_blocks - 1)
    u_in = u - (jnp.take_along_axis(cdf_N, blk, -1) - jnp.take_along_axis(mass_N, blk, -1))
    p_K = jnp.exp((jnp.take_along_axis(logits_NK, blk[..., None], -2)[..., 0, :] - m)
                  / temperature)
    idx = jnp.sum(jnp.cumsum(p_K, -1) < u_in, -1, keepdims=True)
    # Rounding can put u_in just outside the block's mass: stay on its positive entries.
    positive = p_K > 0
    first = jnp.argmax(positive, -1, keepdims=True)
    last = block - 1 - jnp.argmax(positive[..., ::-1], -1, keepdims=True)
    return (blk * block + jnp.clip(idx, first, last))[..., 0].astype(jnp.int32)


def choose_thought(logits: jax.Array, key: jax.Array, cfg: QuietStarConfig) -> jax.Array:
    """The next thought token [...] as an index into `speakable_ids`, from logits over them
    [..., V - 2]: the argmax with `greedy_thoughts`, else a draw at `thought_temperature`."""
    if cfg.greedy_thoughts:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    return sample(key, logits, cfg.thought_temperature)


def entropy(logits_V: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Entropy in nats [...] of softmax(logits [..., V] / temperature), float32, no gradient."""
    z = jax.lax.stop_gradient(logits_V).astype(jnp.float32) / temperature
    z = z - jnp.max(z, -1, keepdims=True)
    e = jnp.exp(z)
    total = jnp.sum(e, -1)
    return jnp.log(total) - jnp.sum(e * z, -1) / total


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def token_logprob(logits_V: jax.Array, token: jax.Array, temperature: float = 1.0) -> jax.Array:
    """log softmax(logits / temperature)[token], float32.

    Its gradient (onehot - softmax) * cotangent / temperature is written out, so that the
    backward pass reads the logits once and writes their gradient once.
    """
    return _token_logprob_forward(logits_V, token, temperature)[0]


def _token_logprob_forward(logits_V, token, temperature):
    logits = logits_V.astype(jnp.float32)
    m = jnp.max(logits, -1, keepdims=True)
    lse = m / temperature + jnp.log(jnp.sum(jnp.exp((logits - m) / temperature), -1,
                                            keepdims=True))
    picked = jnp.take_along_axis(logits, token[..., None], -1) / temperature
    return (picked - lse)[..., 0], (logits_V, token, lse)


def _token_logprob_backward(temperature, saved, ct):
    logits_V, token, lse = saved
    logits = logits_V.astype(jnp.float32)
    ids_V = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    onehot = jnp.where(ids_V == token[..., None], 1.0, 0.0)
    d_logits = (onehot - jnp.exp(logits / temperature - lse)) * (ct[..., None] / temperature)
    return d_logits.astype(logits_V.dtype), None


token_logprob.defvjp(_token_logprob_forward, _token_logprob_backward)


# ----------------------------------------------------------------------------- parallel rollout


@flax.struct.dataclass
class Rollout:
    """Everything the objective and analysis read from one parallel rollout.

    B batch, P rationales, L positions, S sampled thought tokens, T talk offsets, V vocabulary.
    """

    base_logits: jax.Array  # [B, L, V] float32
    base_hidden: jax.Array  # [B, L, D]
    thought_tokens: jax.Array  # [B, P, L, S] int32
    # [B, P, L, S] log-prob at reinforce_temperature; its gradient is exact for cotangents
    # with at most cfg.policy_rows nonzero rationales per position (`policy_logprobs`)
    thought_logprobs: jax.Array
    talk_logprobs: jax.Array  # [B, P, T, L] log p_mix(x[j + 1 + t]) (0 past the end)
    mixing_weights: jax.Array  # [B, P, T, L]
    # [B, P, L, S] entropy (nats) of the distribution each thought token was drawn from, at
    # thought_temperature: near 0 when thoughts collapse onto fixed tokens
    thought_entropy: jax.Array
    talk_logits: jax.Array | None = None  # [B, P, T, L, V], when asked


def _shift(x_BL: jax.Array, t: int, fill=0) -> jax.Array:
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


def rollout(params: Params, tokens_BL: jax.Array, mask_BL: jax.Array, rng: jax.Array,
            cfg: QuietStarConfig, thought_tokens: jax.Array | None = None,
            return_talk_logits: bool = False) -> Rollout:
    """Base pass once, then the chain passes of every position in parallel for each rationale.

    The chain of position j sees the base keys x[0..j] (one shared causal prefix) and its own
    earlier chain keys (a per-position buffer), merged in one softmax: O(L^2 + L*k) per pass.
    `thought_tokens` [B, P, L, S] replaces sampling (tests, analysis); they are ordinary tokens,
    never the thought tokens' own ids (checked unless traced).
    """
    b, length = tokens_BL.shape
    check_batch(cfg, length)
    mcfg = cfg.model
    positions_BL = jnp.broadcast_to(jnp.arange(length), (b, length))
    base_ctx = causal_context(positions_BL, mask_BL, mcfg.sliding_window)
    h_base, base_kv = hidden(params, cfg, embed_tokens(params, cfg, tokens_BL), positions_BL,
                             base_ctx)
    base_logits = lm_logits(params, cfg, h_base)
    s, t_talk = cfg.n_sampled, cfg.n_ahead_talk
    if not cfg.thinks:
        no_thoughts = jnp.zeros((b, cfg.n_passes, length, 0))
        no_talk = jnp.zeros((b, cfg.n_passes, 0, length))
        return Rollout(base_logits, h_base, no_thoughts.astype(jnp.int32), no_thoughts, no_talk,
                       no_talk, no_thoughts)

    # The rationales run side by side as R = P * B rows (rationale-major); every row of a
    # rationale reads the same base keys.
    p, n_chain = cfg.n_passes, cfg.n_chain_passes
    rows = lambda x, axis=0: jnp.concatenate([x] * p, axis)  # noqa: E731  [B, ...] -> [R, ...]
    r = p * b
    positions_RL, mask_RL, h_base_RLD = rows(positions_BL), rows(mask_BL), rows(h_base)
    base_kv_R = KeyValues(rows(base_kv.k, 1), rows(base_kv.v, 1))  # [N, R, L, K, E]
    kv_shape = base_kv_R.k.shape[:3] + (n_chain,) + base_kv_R.k.shape[3:]  # [N, R, L, C, K, E]
    start_D, end_D = start_end_embeddings(params, cfg)

    def chain_pass(params, base_kv, buffer: KeyValues, x_RLD, k: int | jax.Array):
        """Pass k >= 1: one new token per chain; its keys go to buffer slot k - 1."""
        q_pos = positions_RL + k
        prefix = visible(positions_RL, positions_RL, mask_RL)
        if mcfg.sliding_window is not None:
            prefix &= (q_pos[:, :, None] - positions_RL[:, None, :]) < mcfg.sliding_window
        chain = jnp.broadcast_to(jnp.arange(n_chain) < k - 1, (r, length, n_chain))
        ctx = Context(Masks(prefix_BLS=prefix, chain_BLC=chain), prefix=base_kv, chain=buffer)
        h_RLD, kv = hidden(params, cfg, x_RLD, q_pos, ctx)
        slot = lambda buf, new: jax.lax.dynamic_update_index_in_dim(buf, new, k - 1, 3)  # noqa: E731
        return h_RLD, KeyValues(slot(buffer.k, kv.k), slot(buffer.v, kv.v))

    # Thought logits leave out the thought tokens' head rows; sampled tokens are indices into
    # `speakable_ids`. No gradient flows through sampling: `policy_logprobs` gives the log-probs
    # theirs after the scan.
    speakable_VD = speakable_head(head_rows(params, cfg), cfg)
    think_head = jax.lax.stop_gradient(speakable_VD)

    def think_step(params, base_kv, buffer, x_RLD, floats, ints, replay):
        """Passes 1..S: feed a token, draw the next thought token from the chain head."""
        k, key, forced_RL = ints
        h_RLD, buffer = chain_pass(params, base_kv, buffer, x_RLD, k)
        logits = head_logits(think_head, cfg, jax.lax.stop_gradient(h_RLD))
        if replay is not None:  # the backward pass: the token drawn in the forward pass
            choice_RL = replay[0]
        elif thought_tokens is not None:
            choice_RL = forced_RL
        else:
            choice_RL = choose_thought(logits, key, cfg)
        choice_RL = jax.lax.stop_gradient(choice_RL)
        logprob = token_logprob(logits, choice_RL, cfg.reinforce_temperature)
        x_next = embed_tokens(params, cfg, speakable_token(choice_RL, cfg))
        return buffer, x_next, (choice_RL, logprob, h_RLD, entropy(logits, cfg.thought_temperature))

    def talk_step(params, base_kv, buffer, carry, floats, ints, replay):
        """Passes n_ahead-1 ..: end token then true tokens; the state mixed with the base state.

        The head is applied after the scan (`talk_head`): its logits are then kept for the
        backward pass instead of recomputed with the pass.
        """
        x_RLD, h_base_RLD = floats
        h_RLD, buffer = chain_pass(params, base_kv, buffer, x_RLD, ints)
        return buffer, carry, mix(params, cfg, h_base_RLD, h_RLD)

    scan = _scan_against_final_buffer if cfg.remat_passes else _scan

    if thought_tokens is None:
        forced_SRL = jnp.zeros((s, r, length), jnp.int32)
    else:
        expected = (b, p, length, s)
        if tuple(thought_tokens.shape) != expected:
            raise ValueError(f"thought_tokens has shape {tuple(thought_tokens.shape)}, "
                             f"expected [B, n_passes, L, n_ahead - 3] = {expected}")
        if not isinstance(thought_tokens, jax.core.Tracer) and np.isin(
                np.asarray(thought_tokens), (cfg.start_thought_id, cfg.end_thought_id)).any():
            raise ValueError("thought_tokens contains the ids of <|startthought|> or "
                             "<|endthought|>, which a thought never contains")
        forced_SRL = speakable_index(jnp.transpose(thought_tokens, (3, 1, 0, 2)).reshape(
            s, r, length), cfg)
    buffer = KeyValues(jnp.zeros(kv_shape, base_kv.k.dtype), jnp.zeros(kv_shape, base_kv.v.dtype))
    x0 = jnp.broadcast_to(start_D, h_base_RLD.shape)
    think_ints = (jnp.arange(1, s + 1), jax.random.split(rng, s), forced_SRL)
    buffer, x_last, (choices_SRL, logprobs_SRL, h_SRLD, entropy_SRL) = scan(
        think_step, params, base_kv_R, buffer, x0, (), think_ints)
    logprobs_SRL = policy_logprobs(speakable_VD, h_SRLD, choices_SRL, logprobs_SRL, cfg)
    # Pass n_ahead-2 feeds the last sampled token; only its keys are needed.
    lone = jax.checkpoint(chain_pass) if cfg.remat_passes else chain_pass
    _, buffer = lone(params, base_kv_R, buffer, x_last, jnp.int32(cfg.n_ahead - 2))

    # Talk inputs: <|endthought|>, then x[j+1], x[j+2], ...; base states and targets shifted.
    tokens_RL = rows(tokens_BL)
    talk_x = jnp.stack([jnp.broadcast_to(end_D, h_base_RLD.shape)] + [
        embed_tokens(params, cfg, _shift(tokens_RL, t)) for t in range(1, t_talk)])
    talk_h_base = jnp.stack([_shift(h_base_RLD, t) for t in range(t_talk)])
    talk_targets_TRL = jnp.stack([_shift(tokens_RL, t + 1) for t in range(t_talk)])
    talk_k = jnp.arange(cfg.n_ahead - 1, cfg.n_ahead - 1 + t_talk)
    _, _, (h_mix_TRLD, w_TRL) = scan(talk_step, params, base_kv_R, buffer, (),
                                     (talk_x, talk_h_base), talk_k)

    def talk_head(xs):
        """One talk offset's logits [R, L, V] and target log-probs [R, L].

        Offset by offset: the head's weight gradient then transposes one [R * L, V] logit
        gradient at a time, which is fast on a CPU (in an XLA CPU trace, one [2048, 32002]
        transposition took 654 ms, four [512, 32002] ones 69 ms in all)."""
        h_mix_RLD, targets_RL = xs
        logits_RLV = lm_logits(params, cfg, h_mix_RLD)
        return logits_RLV, token_logprob(logits_RLV, targets_RL)

    talk_logits_TRLV, talk_logprobs_TRL = jax.lax.map(talk_head, (h_mix_TRLD, talk_targets_TRL))

    # [X, R, ...] (X: passes or talk offsets) -> [B, P, X, ...]
    split = lambda x: jnp.moveaxis(x.reshape(x.shape[:1] + (p, b) + x.shape[2:]),  # noqa: E731
                                   (0, 1, 2), (2, 1, 0))
    last_s = lambda x: jnp.moveaxis(split(x), 2, -1)  # noqa: E731  [B, P, S, L] -> [B, P, L, S]
    return Rollout(
        base_logits=base_logits, base_hidden=h_base,
        thought_tokens=last_s(speakable_token(choices_SRL, cfg)),
        thought_logprobs=last_s(logprobs_SRL),
        talk_logprobs=split(talk_logprobs_TRL),
        mixing_weights=split(w_TRL),
        thought_entropy=last_s(entropy_SRL),
        talk_logits=split(talk_logits_TRLV) if return_talk_logits else None,
    )


# ----------------------------------------------------------------------------- policy gradient


def policy_logprobs(head_VD: jax.Array, h_SRLD: jax.Array, choices_SRL: jax.Array,
                    values_SRL: jax.Array, cfg: QuietStarConfig) -> jax.Array:
    """`values` (the thought tokens' log-probs at reinforce_temperature) with their gradient.

    `head_VD` is `speakable_head`'s rows and `choices` index `speakable_ids`. The gradient flows
    into the output head and the chain states `h` [S, R, L, D] (rows rationale-major, R = P * B).
    It is computed pass by pass on the `cfg.policy_rows` rationales of each position with the
    largest cotangents, the logits recomputed for those rows only: the REINFORCE cotangents
    (advantage-weighted) are zero on the others.
    """
    temperature, p, m = cfg.reinforce_temperature, cfg.n_passes, cfg.policy_rows

    def logprob(head_VD, h, choices):
        return token_logprob(head_logits(head_VD, cfg, h), choices, temperature)

    @jax.custom_vjp
    def with_gradient(head_VD, h_SRLD, choices_SRL, values_SRL):
        return values_SRL

    def forward(head_VD, h_SRLD, choices_SRL, values_SRL):
        return values_SRL, (head_VD, h_SRLD, choices_SRL)

    def backward(saved, ct_SRL):
        head_VD, h_SRLD, choices_SRL = saved
        r, length = h_SRLD.shape[1:3]
        by_rationale = lambda x: x.reshape((p, r // p) + x.shape[1:])  # noqa: E731 [P, B, L, ...]

        def one_pass(d_head, xs):
            h_PBLD, choices_PBL, ct_PBL = map(by_rationale, xs)
            _, pick_BLM = jax.lax.top_k(jnp.moveaxis(jnp.abs(ct_PBL), 0, -1), m)
            pick_MBL = jnp.moveaxis(pick_BLM, -1, 0)
            take = lambda x: jnp.take_along_axis(  # noqa: E731
                x, pick_MBL.reshape(pick_MBL.shape + (1,) * (x.ndim - 3)), 0)
            _, vjp = jax.vjp(lambda hd, h: logprob(hd, h, take(choices_PBL)), head_VD, take(h_PBLD))
            d_head_pass, d_h_MBLD = vjp(take(ct_PBL))
            # Back to all P rationales: each picked row to its own, zero on the others.
            chosen_MPBL = pick_MBL[:, None] == jnp.arange(p)[None, :, None, None]
            d_h_PBLD = jnp.sum(jnp.where(chosen_MPBL[..., None], d_h_MBLD[:, None], 0), 0)
            return d_head + d_head_pass, d_h_PBLD.reshape(r, length, -1)

        d_head, d_h_SRLD = jax.lax.scan(one_pass, jnp.zeros_like(head_VD),
                                        (h_SRLD, choices_SRL, ct_SRL))
        return d_head, d_h_SRLD.astype(h_SRLD.dtype), None, jnp.zeros_like(ct_SRL)

    with_gradient.defvjp(forward, backward)
    return with_gradient(head_VD, h_SRLD, choices_SRL, jax.lax.stop_gradient(values_SRL))


# ----------------------------------------------------------------------------- pass scans


def _scan(step, params, base_kv, buffer, carry, floats, ints, keep_carries: bool = False):
    """jax.lax.scan of `step(params, base_kv, buffer, carry, float_x, int_x, None) -> (buffer,
    carry, y)` over the leading axis of `floats` and `ints`: (final buffer, final carry, ys), and
    with `keep_carries` the carry each step received, stacked."""

    def body(state, xs):
        buffer, carry = state
        buffer, next_carry, y = step(params, base_kv, buffer, carry, *xs, None)
        return (buffer, next_carry), ((carry, y) if keep_carries else y)

    (buffer, carry), ys = jax.lax.scan(body, (buffer, carry), (floats, ints))
    return buffer, carry, ys


def _scan_against_final_buffer(step, params, base_kv, buffer, carry, floats, ints):
    """`_scan` whose backward pass recomputes each pass against the final chain buffer.

    Pass k reads only buffer slots < k - 1 (the chain mask hides the rest), and the final buffer
    holds exactly those values, so the backward pass needs one buffer, not one per pass: saved
    memory grows linearly with the number of passes. Each pass is recomputed in the backward
    pass (rematerialised) with the tokens it drew (`replay`), which are not drawn again.
    """

    @jax.custom_vjp
    def run(params, base_kv, buffer, carry, floats, ints):
        return _scan(step, params, base_kv, buffer, carry, floats, ints)

    def forward(params, base_kv, buffer, carry, floats, ints):
        buffer, carry_out, (carries, ys) = _scan(step, params, base_kv, buffer, carry, floats,
                                                 ints, keep_carries=True)
        return (buffer, carry_out, ys), (params, base_kv, buffer, carries, floats, ints, ys)

    def backward(saved, cotangents):
        params, base_kv, final_buffer, carries, floats, ints, ys = saved
        ct_buffer, ct_carry, ct_ys = cotangents
        # Integer outputs (drawn tokens) have float0 cotangents, which cannot be scanned over.
        ct_ys = jax.tree.map(lambda y, ct: ct if _is_float(y) else jnp.zeros(y.shape[:1]),
                             ys, ct_ys)

        def body(acc, xs):
            ct_params, ct_base_kv, ct_buffer, ct_carry = acc
            carry, x_float, x_int, y, ct_y = xs
            ct_y = jax.tree.map(lambda y, ct: ct if _is_float(y) else np.zeros(
                y.shape, jax.dtypes.float0), y, ct_y)
            _, vjp = jax.vjp(lambda p, kv, buf, c, xf: step(p, kv, buf, c, xf, x_int, y),
                             params, base_kv, final_buffer, carry, x_float)
            d_params, d_base_kv, ct_buffer, ct_carry, d_x = vjp((ct_buffer, ct_carry, ct_y))
            add = lambda a, b: jax.tree.map(jnp.add, a, b)  # noqa: E731
            return (add(ct_params, d_params), add(ct_base_kv, d_base_kv), ct_buffer,
                    ct_carry), d_x

        zeros = lambda t: jax.tree.map(jnp.zeros_like, t)  # noqa: E731
        (d_params, d_base_kv, d_buffer, d_carry), d_floats = jax.lax.scan(
            body, (zeros(params), zeros(base_kv), ct_buffer, ct_carry),
            (carries, floats, ints, ys, ct_ys), reverse=True)
        return d_params, d_base_kv, d_buffer, d_carry, d_floats, None

    run.defvjp(forward, backward)
    return run(params, base_kv, buffer, carry, floats, ints)


def _is_float(x: jax.Array) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)
