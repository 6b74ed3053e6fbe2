"""Where thinking helps: a self-contained HTML page of a text, each token coloured by how much
thinking changed its log-likelihood (evaluation-mode mixed log p minus base log p), with the
thought that preceded it on hover.

    python -m qstar_jax.visualize --checkpoint DIR --text FILE --out report.html
"""

from __future__ import annotations

import dataclasses
import functools
import html
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from qstar_jax import cli, generate, loading, outputs, scoring
from qstar_jax.errors import ConfigError, DataError, PathNotFoundError
from qstar_jax.model import Params
from qstar_jax.thoughts import QuietStarConfig
from qstar_jax.tokenizer import token_pieces


@dataclasses.dataclass
class TokenScore:
    """One token of the text; the scores are None for a first token (nothing predicts it)."""

    token: int
    piece: str  # the text it adds
    delta: float | None = None  # log p_mixed - log p_base
    logp_base: float | None = None
    thought: list[int] | None = None  # the thought at the position before it


@functools.partial(jax.jit, static_argnames=("cfg",))
def _window(params: Params, tokens_1L: jax.Array, mask_1L: jax.Array, rng: jax.Array,
            cfg: QuietStarConfig):
    """Per position j: log p_mixed(x[j+1]), log p_base(x[j+1]), the thought at j [L, M]."""
    losses = scoring.token_losses(params, tokens_1L, mask_1L, rng, cfg, talk_offsets=False)
    return -losses.think[0], -losses.base[0], losses.thoughts[0]


def score_text(params: Params, cfg: QuietStarConfig, tokenizer, text: str, window: int = 256,
               seed: int = 0) -> list[TokenScore]:
    """Every token of `text` with the change thinking makes to its log-likelihood.

    Long texts are cut into windows of `window` tokens overlapping by one, so every token but
    the very first is predicted (within its window's context).
    """
    if not cfg.thinks:
        raise ConfigError(f"the model does not think (n_ahead={cfg.n_ahead})")
    if window < 3:
        raise ConfigError(f"window must be >= 3 tokens, got {window}")
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    ids = bos + tokenizer.encode(text)
    if len(ids) == len(bos):
        raise DataError("the text has no tokens")
    scores: dict[int, tuple[float, float, list[int]]] = {}
    for n, start in enumerate(range(0, max(len(ids) - 1, 1), window - 1)):
        chunk = ids[start:start + window]
        tokens = np.full((1, window), cfg.pad_id, np.int32)
        tokens[0, :len(chunk)] = chunk
        mask = np.arange(window)[None] < len(chunk)
        mixed, base, thoughts = jax.device_get(_window(
            params, jnp.asarray(tokens), jnp.asarray(mask),
            jax.random.fold_in(jax.random.key(seed), n), cfg))
        for j in range(len(chunk) - 1):
            scores[start + j + 1] = (float(mixed[j]), float(base[j]), thoughts[j].tolist())
    pieces = token_pieces(tokenizer, bos, ids[len(bos):])
    out = []
    for i, (token, piece) in enumerate(zip(ids[len(bos):], pieces, strict=True), len(bos)):
        score = TokenScore(token, piece)
        if i in scores:
            mixed, base, thought = scores[i]
            score.delta, score.logp_base, score.thought = mixed - base, base, thought
        out.append(score)
    return out


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60em; margin: 2em auto; color: #222; }
.text { white-space: pre-wrap; font-family: ui-monospace, monospace; line-height: 1.7; }
.tok:hover { outline: 1px solid #333; }
.legend span { padding: 0 .4em; }
"""


def _colour(delta: float, scale: float) -> str:
    """Green where thinking raised the log-likelihood, red where it lowered it."""
    alpha = min(1.0, abs(delta) / scale) if scale > 0 else 0.0
    rgb = "0, 170, 0" if delta > 0 else "220, 0, 0"
    return f"background-color: rgba({rgb}, {alpha:.3f})"


def render_html(scores: Sequence[TokenScore], tokenizer, cfg: QuietStarConfig,
                title: str) -> str:
    """The page: a summary, a legend and one <span class="tok"> per token."""
    deltas = np.array([s.delta for s in scores if s.delta is not None], np.float64)
    scale = float(np.abs(deltas).max()) if deltas.size else 0.0
    spans = []
    for s in scores:
        if s.delta is None:
            spans.append(f'<span class="tok" title="first token: not predicted">'
                         f"{html.escape(s.piece)}</span>")
            continue
        thought = generate.thought_text(tokenizer, cfg, s.thought)
        tip = (f"token {s.piece!r}\nlog p change from thinking: {s.delta:+.4f}\n"
               f"log p without thinking: {s.logp_base:.4f}\nthought: {thought}")
        style = _colour(s.delta, scale) if s.delta != 0 else ""
        spans.append(f'<span class="tok" data-delta="{s.delta:.6g}" style="{style}" '
                     f'title="{html.escape(tip)}">{html.escape(s.piece)}</span>')
    summary = (f"{len(scores)} tokens; {deltas.size} predicted: thinking raised the "
               f"log-likelihood of {int((deltas > 0).sum())}, lowered it for "
               f"{int((deltas < 0).sum())}; mean change {deltas.mean() if deltas.size else 0:+.4f}"
               f" nats per token. Hover over a token to see its thought.")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n<p>{html.escape(summary)}</p>\n"
            f'<p class="legend"><span style="{_colour(1, 1)}">thinking helped</span>'
            f'<span style="{_colour(-1, 1)}">thinking hurt</span> (full colour: a change of '
            f"{scale:.3f} nats)</p>\n"
            f'<div class="text">{"".join(spans)}</div>\n</body>\n</html>\n')


def read_text(path: str) -> str:
    """The text of a UTF-8 file; a missing, undecodable or empty file is an error."""
    if not os.path.isfile(path):
        raise PathNotFoundError(f"{path}: no such text file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    if not text.strip():
        raise DataError(f"{path}: the text file is empty")
    return text


def command_flags() -> flags.FlagValues:
    """This command's flags, on their own FlagValues (see generate.command_flags)."""
    fv = flags.FlagValues()
    flags.DEFINE_string("checkpoint", None, "HF-format Quiet-STaR directory or training workdir "
                        "(required)", flag_values=fv)
    flags.DEFINE_string("text", None, "UTF-8 text file to score (required)", flag_values=fv)
    flags.DEFINE_string("out", None, "HTML file to write (required)", flag_values=fv)
    flags.DEFINE_integer("window", 256, "tokens per forward pass", lower_bound=3,
                         flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the sampled thoughts", flag_values=fv)
    return fv


def main(argv: Sequence[str] | None = None) -> None:
    """Score --text and write the page to --out."""
    fv = command_flags()
    cli.parse_command(fv, argv, __doc__, required=("checkpoint", "text", "out"))
    with cli.one_line_errors():
        outputs.check_output_file(fv.out)  # before the scoring, not after
        text = read_text(fv.text)
        cfg, params, tok = loading.load_checkpoint(fv.checkpoint)
        scores = score_text(params, cfg, tok, text, window=fv.window, seed=fv.seed)
    page = render_html(scores, tok, cfg, f"Where thinking helps: {os.path.basename(fv.text)}")
    with open(fv.out, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"wrote {fv.out} ({len(scores)} tokens)")


if __name__ == "__main__":
    main()
