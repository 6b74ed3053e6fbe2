"""Quiet-STaR building blocks: config, thought parameters, head, mixing, sampling, the chain pass.

What the parallel rollout (`rollout.py`) and decoding (`generate.py`) are both made of. Parameters
of a Quiet-STaR model: {"decoder": Transformer params (vocabulary incl. the two thought
tokens), "start_embedding": [D], "end_embedding": [D] (both stored divided by
`embedding_scale`), "mixing_head": MixingHead params}.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qstar_jax.errors import ConfigError
from qstar_jax.model import (
    NEG_INF,
    Context,
    KeyValues,
    Masks,
    ModelConfig,
    Params,
    Transformer,
    span,
)

N_THOUGHT_TOKENS = 2  # <|startthought|>, <|endthought|>
OBJECTIVES = ("quiet_star", "rlp")


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
    # The first token of this text gives the start/end thought embeddings their initial value
    # (the authors': "---"), when thought weights are added to a plain model.
    init_text: str = "---"
    # Every thought token is pad_id instead of drawn: thoughts of the same length that carry
    # nothing (the experiment's filler arm); there is then no policy to reinforce.
    filler_thoughts: bool = False
    remove_negative_rewards: bool = True
    use_trice_baseline: bool = True
    mixing_sigmoid: bool = False
    remat_passes: bool = True  # rematerialise each chain pass in the backward pass
    # "quiet_star" (the authors': NLL plus REINFORCE against the other rationales) or "rlp"
    # (`rlp.py`: information gain against an EMA of the model without thoughts, a clipped
    # group-relative update on the thought tokens only). The options below are RLP's.
    objective: str = "quiet_star"
    ema_decay: float = 0.999  # RLP: the no-think baseline's EMA, phi <- d * phi + (1 - d) * theta
    # RLP: the prediction after a thought is mixed with the base state as Quiet-STaR's (True), or
    # is the model's own prediction after the thought (False: the paper, which has no head)
    rlp_mixing_head: bool = False
    # RLP: weight of the NLL term (the base pass and talk passes, weighed by
    # original_loss_weight) added to the RLP loss; 0 is the paper's (no next-token loss)
    rlp_nll_weight: float = 0.0

    def __post_init__(self):
        if self.n_ahead > 1 and self.n_ahead < 3:
            raise ConfigError(
                f"n_ahead={self.n_ahead}: a thought needs n_ahead >= 3 (or 1 for no thoughts)")
        if self.n_ahead < 1 or self.n_ahead_talk < 1 or self.n_passes < 1:
            raise ConfigError("n_ahead, n_ahead_talk and n_passes must be >= 1")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective={self.objective!r}: expected one of {list(OBJECTIVES)}")
        if self.objective == "rlp":
            self._check_rlp()
        vocab = self.model.vocab_size
        for name in ("start_thought_id", "end_thought_id"):
            if not 0 <= getattr(self, name) < vocab:
                raise ConfigError(f"{name}={getattr(self, name)} is outside the vocabulary "
                                  f"({vocab}): the model has no thought tokens")

    def _check_rlp(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay={self.ema_decay} must be in [0, 1)")
        if not self.thinks:
            return  # no thoughts: plain next-token training (the experiment's control)
        if self.n_sampled < 1:
            raise ConfigError(f"objective='rlp' with n_ahead={self.n_ahead}: RLP trains the "
                              "thought tokens, so a thought needs one (n_ahead >= 4)")
        if self.filler_thoughts:
            raise ConfigError("objective='rlp' with filler_thoughts: filler thoughts are not "
                              "drawn, so RLP has nothing to train")
        if self.rlp_mixing_head and self.rlp_nll_weight == 0:
            raise ConfigError("rlp_mixing_head=True with rlp_nll_weight=0: nothing trains the "
                              "mixing head, whose weight then stays at 0 and hides every "
                              "thought; set rlp_nll_weight > 0")

    def replace(self, **changes) -> QuietStarConfig:
        return dataclasses.replace(self, **changes)

    @property
    def mixes(self) -> bool:
        """Whether the prediction after a thought is mixed with the base state (`mix`)."""
        return self.objective == "quiet_star" or self.rlp_mixing_head

    @property
    def policy_temperature(self) -> float:
        """The temperature of the thought log-probs the policy term trains: Quiet-STaR's
        reinforce_temperature, or for RLP the sampling policy's own (its importance ratios)."""
        return self.reinforce_temperature if self.objective == "quiet_star" else (
            self.thought_temperature)

    @property
    def thinks(self) -> bool:
        return self.n_ahead > 1

    @property
    def n_sampled(self) -> int:
        """Sampled thought tokens between the start and end tokens."""
        return max(self.n_ahead - 3, 0)

    @property
    def n_rationales(self) -> int:
        """Rationales per position (the config key is the authors' name, n_passes)."""
        return self.n_passes

    @property
    def policy_rows(self) -> int:
        """Rationales per position whose thought tokens can have a nonzero advantage
        (`gradient_memory.policy_logprobs` computes the policy gradient on these only).

        With the TRICE baseline and negative advantages dropped, a position's P advantages sum
        to zero before clamping, so at most P - 1 stay positive. In float32 this holds for
        P = 2; for larger P, rounding of the mean can leave all P a few ulps above zero.
        """
        if (self.objective == "quiet_star" and self.use_trice_baseline
                and self.remove_negative_rewards and self.n_rationales > 1):
            return self.n_rationales - 1
        return self.n_rationales

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


def remove_thought_params(params: Params, cfg: QuietStarConfig) -> tuple[ModelConfig, Params]:
    """The plain LM inside a Quiet-STaR model whose thought tokens are its last two ids: the
    decoder without their rows (the inverse of `add_thought_params`)."""
    v = cfg.model.vocab_size
    if {cfg.start_thought_id, cfg.end_thought_id} != {v - 2, v - 1}:
        raise ConfigError(f"thought ids {cfg.start_thought_id, cfg.end_thought_id} are not the "
                          f"last two of the vocabulary ({v}): their rows cannot be cut off")
    cut = lambda m: m[:v - N_THOUGHT_TOKENS]  # noqa: E731
    decoder = dict(params["decoder"])
    decoder["embed"] = {"embedding": cut(decoder["embed"]["embedding"])}
    if not cfg.model.tie_embeddings:
        decoder["lm_head"] = {"kernel": cut(decoder["lm_head"]["kernel"])}
    return cfg.model.replace(vocab_size=v - N_THOUGHT_TOKENS), decoder


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


# hidden's signature, with the params it was given returned too (`chain_pass`'s `forward`).
Forward = Callable[[Params, QuietStarConfig, jax.Array, jax.Array, Context],
                   tuple[jax.Array, KeyValues, Params]]


def hidden_keeping_params(params: Params, cfg: QuietStarConfig, x_BLD: jax.Array,
                          positions_BL: jax.Array, ctx: Context
                          ) -> tuple[jax.Array, KeyValues, Params]:
    """`hidden`, and `params` returned as they are: a plain `Forward`."""
    return *hidden(params, cfg, x_BLD, positions_BL, ctx), params


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
    return jnp.where(thought_V, jnp.asarray(NEG_INF, logits_V.dtype), logits_V)


def mix(params: Params, cfg: QuietStarConfig, h_base_D: jax.Array,
        h_thought_D: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mixed hidden state (1 - w) * h_base + w * h_thought and the weight w [...]; without
    mixing (`cfg.mixes`) the thought state itself, w = 1."""
    if not cfg.mixes:
        return h_thought_D, jnp.ones(h_thought_D.shape[:-1], jnp.float32)
    w = MixingHead(cfg.model.d_model, cfg.model.param_dtype).apply(
        {"params": params["mixing_head"]}, h_base_D, h_thought_D)
    if cfg.mixing_sigmoid:
        w = jax.nn.sigmoid(w)
    w_ = w[..., None].astype(h_base_D.dtype)
    return (1 - w_) * h_base_D + w_ * h_thought_D, w


def speakable_ids(cfg: QuietStarConfig) -> np.ndarray:
    """Vocabulary ids other than the two thought tokens [V - 2], ascending: what a thought may
    contain (and `sample` draws indices into)."""
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


def _speakable_first(cfg: QuietStarConfig) -> np.ndarray:
    """Every vocabulary id [V]: `speakable_ids`, then the two thought ids, lower first."""
    return np.concatenate([speakable_ids(cfg),
                           sorted((cfg.start_thought_id, cfg.end_thought_id))]).astype(np.int32)


def speakable_index(tokens: jax.Array, cfg: QuietStarConfig) -> jax.Array:
    """Position of each token id in `speakable_ids`, defined for every id, also under jit.

    A thought never contains a thought id; one maps past the end of `speakable_ids` (the lower
    of the two to V - 2, the higher to V - 1), where `token_logprob` over the thought logits
    [..., V - 2] reads NaN and `speakable_token` gives the id back. With the thought tokens last
    in the vocabulary every id is its own index.
    """
    low, high = sorted((cfg.start_thought_id, cfg.end_thought_id))
    v = cfg.model.vocab_size
    index = tokens - (tokens > low) - (tokens > high)
    index = jnp.where(tokens == low, v - 2, jnp.where(tokens == high, v - 1, index))
    return index.astype(jnp.int32)


def speakable_token(index: jax.Array, cfg: QuietStarConfig) -> jax.Array:
    """The token id at each index of `speakable_index` [...] (its inverse, for every id)."""
    return index if _thoughts_last(cfg) else jnp.asarray(_speakable_first(cfg))[index]


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
        logits = jnp.pad(logits, pad, constant_values=NEG_INF)
    logits_ZX = logits.reshape(logits.shape[:-1] + (n_blocks, block))  # Z blocks of X tokens
    mass_Z = jnp.sum(jnp.exp((logits_ZX - m[..., None]) / temperature), -1)
    cdf_Z = jnp.cumsum(mass_Z, -1)
    tiny = jnp.finfo(jnp.float32).tiny  # u > 0: a zero-probability first token is never drawn
    u = jax.random.uniform(rng, cdf_Z.shape[:-1] + (1,), minval=tiny) * cdf_Z[..., -1:]
    blk = jnp.minimum(jnp.sum(cdf_Z < u, -1, keepdims=True), n_blocks - 1)
    u_in = u - (jnp.take_along_axis(cdf_Z, blk, -1) - jnp.take_along_axis(mass_Z, blk, -1))
    p_X = jnp.exp((jnp.take_along_axis(logits_ZX, blk[..., None], -2)[..., 0, :] - m)
                  / temperature)
    idx = jnp.sum(jnp.cumsum(p_X, -1) < u_in, -1, keepdims=True)
    # Rounding can put u_in just outside the block's mass: stay on its positive entries.
    positive = p_X > 0
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


# ----------------------------------------------------------------------------- chain pass


@flax.struct.dataclass
class ChainPrefix:
    """Where a set of chains sits against the base tokens they attend to.

    The chain at base position j (`start_BL`) puts pass k at position j + k; it sees the base
    keys at positions <= j that are valid (and within the sliding window of j + k).
    """

    start_BL: jax.Array  # base position j of each chain
    key_positions_BS: jax.Array  # position of each base key
    key_valid_BS: jax.Array  # the base key is a real token


def chain_reads(n_slots: int) -> np.ndarray:
    """Which chain-buffer slots pass i reads: [n_slots + 1, n_slots] bool by i, static.

    Pass i >= 1 writes its keys to slot i - 1 and reads the slots of the passes before it,
    c < i - 1 (`gradient_memory.check_reads_before_writes` relies on it).
    """
    i_I1 = np.arange(n_slots + 1)[:, None]
    return np.arange(n_slots)[None, :] < i_I1 - 1


def chain_pass(params: Params, cfg: QuietStarConfig, base_kv: KeyValues, prefix: ChainPrefix,
               buffer: KeyValues, x_BLD: jax.Array, pass_index: int | jax.Array,
               forward: Forward = hidden_keeping_params
               ) -> tuple[jax.Array, KeyValues, Params]:
    """Pass i = `pass_index` >= 1 of every chain: hidden states [B, L, D], the chain buffer
    with the new keys/values in slot i - 1, and the params `forward` returned.

    Each chain's token attends to the base keys/values `base_kv` [N, B, S, K, E] it sees
    (`prefix`) and to its own chain's keys in `buffer` [N, B, L, C, K, E] that `chain_reads`
    lets pass i see, merged in one softmax.
    """
    q_pos_BL = prefix.start_BL + pass_index
    seen = span(prefix.start_BL, prefix.key_positions_BS, prefix.key_valid_BS,
                cfg.model.sliding_window, window_from_BL=q_pos_BL)
    n_slots = buffer.k.shape[3]
    chain_BLC = jnp.broadcast_to(jnp.asarray(chain_reads(n_slots))[pass_index],
                                 q_pos_BL.shape + (n_slots,))
    ctx = Context(Masks(prefix_BLS=seen, chain_BLC=chain_BLC), prefix=base_kv, chain=buffer)
    h_BLD, new, params = forward(params, cfg, x_BLD, q_pos_BL, ctx)
    slot = lambda buf, x: jax.lax.dynamic_update_index_in_dim(  # noqa: E731
        buf, x.astype(buf.dtype), pass_index - 1, 3)
    return h_BLD, KeyValues(slot(buffer.k, new.k), slot(buffer.v, new.v)), params
