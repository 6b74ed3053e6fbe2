"""Think, then speak: KV-cached decoding with one Quiet-STaR thought before every new token.

The prompt is prefilled once into a fixed-size key/value cache. Each new token then costs one
thought at the last position (start embedding, n_ahead - 3 sampled tokens, end embedding) on top
of the cache, a mix of the end-of-thought state with the last base state (the evaluation
semantics: n_ahead_talk = 1), and one pass of the chosen token, whose keys alone join the cache.
The per-token step is one jitted function with static shapes.

    python -m qstar_jax.generate --checkpoint DIR --prompt "..." [--show_thoughts | --nothoughts]
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from qstar_jax import cli, loading
from qstar_jax.errors import ConfigError, DataError
from qstar_jax.model import NEG_INF, Context, KeyValues, Masks, Params, span
from qstar_jax.thoughts import (
    ChainPrefix,
    QuietStarConfig,
    chain_pass,
    choose_thought,
    embed_tokens,
    hidden,
    lm_logits,
    mask_thought_logits,
    mix,
    sample,
    speakable_columns,
    speakable_token,
    start_end_embeddings,
)
from qstar_jax.tokenizer import token_pieces

PROMPT_BUCKET = 64  # prompts are left-padded to a multiple of this, to reuse compilations
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but newline and tab, DEL, C1


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How spoken tokens are chosen: temperature 0 is greedy; top_p < 1 keeps the nucleus."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must lie in (0, 1], got {self.top_p}")


@flax.struct.dataclass
class DecodeState:
    """The cache of every token so far (left-padded rows) and the last token's base state.

    S cache slots, B rows; slot `length` is the next to fill (the same for every row).
    """

    kv: KeyValues  # [N, B, S, K, E]
    valid_BS: jax.Array  # slot holds a real token
    positions_BS: jax.Array  # position id of each slot
    length: jax.Array  # int32 scalar
    h_last_BD: jax.Array  # base hidden state of the last token
    pos_last_B: jax.Array  # position id of the last token
    rng: jax.Array


@flax.struct.dataclass
class Step:
    """What one decoding step produced, per row."""

    token_B: jax.Array  # the spoken token
    logits_BV: jax.Array  # the (mixed, when thinking) logits it was chosen from, unmasked
    thought_BM: jax.Array  # the sampled thought tokens (M = 0 without thinking)


def empty_state(cfg: QuietStarConfig, batch: int, max_len: int, rng: jax.Array) -> DecodeState:
    """A cache of `max_len` empty slots; the first `extend` writes the prompt."""
    m = cfg.model
    shape = (m.n_layers, batch, max_len, m.n_kv_heads, m.head_dim)
    dt = jnp.dtype(m.dtype)
    return DecodeState(
        kv=KeyValues(jnp.zeros(shape, dt), jnp.zeros(shape, dt)),
        valid_BS=jnp.zeros((batch, max_len), bool),
        positions_BS=jnp.zeros((batch, max_len), jnp.int32),
        length=jnp.int32(0), h_last_BD=jnp.zeros((batch, m.d_model), dt),
        pos_last_B=jnp.full((batch,), -1, jnp.int32), rng=rng)


def extend(params: Params, state: DecodeState, tokens_BL: jax.Array, valid_BL: jax.Array, *,
           cfg: QuietStarConfig) -> DecodeState:
    """Append L tokens (left-padded rows): they attend to the cache and causally to each other.

    The last column must be a real token in every row: its base state becomes `h_last_BD`.
    """
    window = cfg.model.sliding_window
    positions_BL = (state.pos_last_B[:, None] + jnp.cumsum(valid_BL, 1)).astype(jnp.int32)
    masks = Masks(prefix_BLS=span(positions_BL, state.positions_BS, state.valid_BS, window),
                  self_BLL=span(positions_BL, positions_BL, valid_BL, window))
    h_BLD, new = hidden(params, cfg, embed_tokens(params, cfg, tokens_BL), positions_BL,
                        Context(masks, prefix=state.kv))
    put = lambda buf, x, axis: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
        buf, x.astype(buf.dtype), state.length, axis)
    return state.replace(
        kv=KeyValues(put(state.kv.k, new.k, 2), put(state.kv.v, new.v, 2)),
        valid_BS=put(state.valid_BS, valid_BL, 1),
        positions_BS=put(state.positions_BS, positions_BL, 1),
        length=state.length + tokens_BL.shape[1],
        h_last_BD=h_BLD[:, -1], pos_last_B=positions_BL[:, -1])


def think(params: Params, cfg: QuietStarConfig, state: DecodeState, rng: jax.Array,
          forced_BM: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """One thought after the last token: (end-of-thought hidden state [B, D], thought [B, M]).

    Pass k (1 .. n_ahead-1) sits at position j + k and sees the cache (x[0..j]) plus the
    thought's own earlier keys: the parallel rollout's attention at position j, for one chain.
    """
    m = cfg.model
    b, s, c = state.h_last_BD.shape[0], cfg.n_sampled, cfg.n_ahead - 1
    prefix = ChainPrefix(state.pos_last_B[:, None], state.positions_BS, state.valid_BS)
    start_D, end_D = start_end_embeddings(params, cfg)
    shape = state.kv.k.shape[:2] + (1, c) + state.kv.k.shape[3:]  # [N, B, 1, C, K, E]
    buffer = KeyValues(jnp.zeros(shape, state.kv.k.dtype), jnp.zeros(shape, state.kv.v.dtype))

    def one_pass(buffer: KeyValues, x_B1D: jax.Array, k) -> tuple[jax.Array, KeyValues]:
        h_B1D, buffer, _ = chain_pass(params, cfg, state.kv, prefix, buffer, x_B1D, k)
        return h_B1D, buffer

    def think_step(carry, xs):
        buffer, x_B1D = carry
        k, key, forced_B = xs
        h_B1D, buffer = one_pass(buffer, x_B1D, k)
        if forced_BM is None:
            logits_BV = speakable_columns(lm_logits(params, cfg, h_B1D[:, 0]), cfg)
            choice_B = choose_thought(logits_BV, key, cfg)
            token_B = speakable_token(choice_B, cfg)
        else:
            token_B = forced_B
        return (buffer, embed_tokens(params, cfg, token_B[:, None])), token_B

    forced_MB = (jnp.zeros((s, b), jnp.int32) if forced_BM is None
                 else forced_BM.astype(jnp.int32).T)
    x0 = jnp.broadcast_to(start_D, (b, 1, m.d_model))
    (buffer, x_last), thought_MB = jax.lax.scan(
        think_step, (buffer, x0), (jnp.arange(1, s + 1), jax.random.split(rng, s), forced_MB))
    _, buffer = one_pass(buffer, x_last, cfg.n_ahead - 2)  # keys of the last sampled token
    h_end, _ = one_pass(buffer, jnp.broadcast_to(end_D, (b, 1, m.d_model)), cfg.n_ahead - 1)
    return h_end[:, 0], thought_MB.T


def choose(logits_BV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """Next tokens [B]: argmax at temperature 0, else a draw from the (top-p) softmax."""
    if sampling.temperature == 0:
        return jnp.argmax(logits_BV, -1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
    if sampling.top_p < 1:
        sorted_BV = jnp.sort(logits_BV, -1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, -1)
        # Keep the smallest prefix whose mass reaches top_p: rank i stays if the mass before it
        # is still short of top_p.
        kept_B = jnp.sum(jnp.cumsum(probs_BV, -1) - probs_BV < sampling.top_p, -1)
        threshold_B1 = jnp.take_along_axis(sorted_BV, kept_B[:, None] - 1, -1)
        logits_BV = jnp.where(logits_BV < threshold_B1, NEG_INF, logits_BV)
    return sample(rng, logits_BV)


def step(params: Params, state: DecodeState, forced_token_B: jax.Array | None = None,
         forced_thought_BM: jax.Array | None = None, *, cfg: QuietStarConfig,
         sampling: Sampling, thinking: bool) -> tuple[DecodeState, Step]:
    """Think (unless `thinking` is off), choose the next token, speak it into the cache.

    `forced_token_B` / `forced_thought_BM` replace the choices (teacher forcing, for scoring).
    """
    rng, think_key, speak_key = jax.random.split(state.rng, 3)
    b = state.h_last_BD.shape[0]
    if thinking:
        h_end_BD, thought_BM = think(params, cfg, state, think_key, forced_thought_BM)
        h_BD, _ = mix(params, cfg, state.h_last_BD, h_end_BD)
    else:
        h_BD, thought_BM = state.h_last_BD, jnp.zeros((b, 0), jnp.int32)
    logits_BV = lm_logits(params, cfg, h_BD)
    if forced_token_B is None:
        token_B = choose(mask_thought_logits(logits_BV, cfg), speak_key, sampling)
    else:
        token_B = forced_token_B.astype(jnp.int32)
    state = extend(params, state.replace(rng=rng), token_B[:, None], jnp.ones((b, 1), bool),
                   cfg=cfg)
    return state, Step(token_B, logits_BV, thought_BM)


class Decoder:
    """The jitted prefill and per-token step for one model config, sampling and thinking mode."""

    def __init__(self, cfg: QuietStarConfig, sampling: Sampling = Sampling(),
                 thinking: bool = True):
        if thinking and not cfg.thinks:
            raise ConfigError(f"thinking needs n_ahead >= 3, the config has n_ahead={cfg.n_ahead}")
        self.cfg = cfg.replace(n_ahead_talk=1, n_passes=1)
        self.prefill = jax.jit(functools.partial(extend, cfg=self.cfg), donate_argnums=(1,))
        self.step = jax.jit(functools.partial(step, cfg=self.cfg, sampling=sampling,
                                              thinking=thinking), donate_argnums=(1,))

    def start(self, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
              rng: jax.Array) -> DecodeState:
        """Left-pad the prompts (to a multiple of PROMPT_BUCKET) and prefill them."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise DataError("every prompt needs at least one token")
        width = -(-max(len(p) for p in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET
        tokens = np.zeros((len(prompts), width), np.int32)
        valid = np.zeros((len(prompts), width), bool)
        for row, p in enumerate(prompts):
            tokens[row, width - len(p):] = p
            valid[row, width - len(p):] = True
        state = empty_state(self.cfg, len(prompts), width + max_new_tokens, rng)
        return self.prefill(params, state, jnp.asarray(tokens), jnp.asarray(valid))


@functools.lru_cache(maxsize=16)
def decoder(cfg: QuietStarConfig, sampling: Sampling, thinking: bool) -> Decoder:
    """A shared Decoder per setting, so repeated calls reuse its compilations."""
    return Decoder(cfg, sampling, thinking)


@dataclasses.dataclass
class Generation:
    """One prompt's continuation: its text (cut before a stop string), tokens and thoughts."""

    text: str
    tokens: list[int]
    thoughts: list[list[int]]  # one thought per generated token
    stop_reason: str  # "eos", "stop_string" or "length"


def generate(params: Params, cfg: QuietStarConfig, tokenizer, prompts: Sequence[str], *,
             max_new_tokens: int, sampling: Sampling = Sampling(), thinking: bool = True,
             seed: int = 0, stop: Sequence[str] = ()) -> list[Generation]:
    """Continue each prompt (batched), thinking before every token unless `thinking` is off.

    Stops a row at EOS, at the first stop string in its continuation, or after max_new_tokens.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    dec = decoder(cfg, sampling, thinking)
    add_bos = tokenizer.bos_id is not None
    ids = [tokenizer.encode(p, add_bos=add_bos) for p in prompts]
    state = dec.start(params, ids, max_new_tokens, jax.random.key(seed))
    tokens = [[] for _ in prompts]
    thoughts = [[] for _ in prompts]
    reasons: list[str | None] = [None] * len(prompts)
    texts = [""] * len(prompts)
    for _ in range(max_new_tokens):
        state, out = dec.step(params, state)
        token_B, thought_BM = np.asarray(out.token_B), np.asarray(out.thought_BM)
        for row in range(len(prompts)):
            if reasons[row] is not None:
                continue
            if int(token_B[row]) == tokenizer.eos_id:
                reasons[row] = "eos"
                continue
            tokens[row].append(int(token_B[row]))
            thoughts[row].append(thought_BM[row].tolist())
            texts[row] = tokenizer.decode(tokens[row])
            hits = [texts[row].index(s) for s in stop if s in texts[row]]
            if hits:
                texts[row], reasons[row] = texts[row][:min(hits)], "stop_string"
        if all(r is not None for r in reasons):
            break
    return [Generation(text, toks, th, reason or "length")
            for text, toks, th, reason in zip(texts, tokens, thoughts, reasons, strict=True)]


def thought_text(tokenizer, cfg: QuietStarConfig, thought: Sequence[int]) -> str:
    """A thought as text, between its start and end tokens."""
    ids = [cfg.start_thought_id, *thought, cfg.end_thought_id]
    return tokenizer.decode(ids)


def printable(text: str) -> str:
    """`text` without the control characters (ESC, CR, DEL, C1) that would drive a terminal:
    model output is printed, not interpreted. Newlines and tabs stay."""
    return CONTROL.sub("", text)


def command_flags() -> flags.FlagValues:
    """This command's flags, on their own FlagValues: commands imported together never share
    one, and each main() call parses from the defaults."""
    fv = flags.FlagValues()
    flags.DEFINE_string("checkpoint", None, "HF-format Quiet-STaR directory or training workdir "
                        "(required)", flag_values=fv)
    flags.DEFINE_string("prompt", None, "the text to continue (required)", flag_values=fv)
    flags.DEFINE_bool("show_thoughts", False, "after the continuation, print each token with "
                      "its thought", flag_values=fv)
    flags.DEFINE_bool("thoughts", True, "think before every token (--nothoughts: plain "
                      "KV-cached decoding)", flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_float("temperature", 0.0, "0: greedy", flag_values=fv)
    flags.DEFINE_float("top_p", 1.0, "nucleus sampling: keep the smallest set of tokens of this "
                       "much probability", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the sampled thoughts and tokens", flag_values=fv)
    return fv


def main(argv: Sequence[str] | None = None) -> None:
    """Continue --prompt and print the prompt with its continuation (and the thoughts)."""
    fv = command_flags()
    cli.parse_command(fv, argv, __doc__, required=("checkpoint", "prompt"))
    if fv.show_thoughts and not fv.thoughts:
        cli.fail("--show_thoughts and --nothoughts exclude each other", cli.USAGE)
    with cli.one_line_errors(cli.USAGE):
        sampling = Sampling(fv.temperature, fv.top_p)
    with cli.one_line_errors():
        cfg, params, tok = loading.load_checkpoint(fv.checkpoint)
        out = generate(params, cfg, tok, [fv.prompt], max_new_tokens=fv.max_new_tokens,
                       sampling=sampling, thinking=fv.thoughts, seed=fv.seed)[0]
    context = tok.encode(fv.prompt, add_bos=tok.bos_id is not None)
    pieces = token_pieces(tok, context, out.tokens)
    print(printable(fv.prompt + "".join(pieces)))
    if fv.show_thoughts:
        print("\n--- thoughts (token <- thought that preceded it) ---")
        for piece, thought in zip(pieces, out.thoughts, strict=True):
            print(f"{piece!r}\t<- {thought_text(tok, cfg, thought)!r}")


if __name__ == "__main__":
    main()
