"""Milliseconds per generated token (fastest of N): KV-cached "think, then speak" against re-running
a parallel forward over the whole context for every new token, as the authors' code does.

    python benchmarks/generate.py [--config cpu|gpu_1b] [--contexts 128 512] [--tokens 32]
                                  [--cached_only]

Prints one JSON object. Model: `train_step.py`'s setup of that name (cpu: d_model 256, 4 layers,
8 heads, 2 kv heads, ffn 704, float32), vocabulary 32000 (+2 thought tokens), n_ahead 12, random
weights, batch 1. Thoughts sampled (the config's default) and greedy. Two re-run baselines
(skipped with --cached_only): the authors' forward (`naive_rollout`: growing block mask, one-hot
embeddings, Gumbel-max draws) and qstar_jax's own parallel rollout.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from naive_rollout import naive_loss  # benchmarks/ is on the path when run as a script
from train_step import SETUPS

from qstar_jax.generate import Decoder
from qstar_jax.model import ModelConfig, init_params
from qstar_jax.rollout import rollout
from qstar_jax.thoughts import QuietStarConfig, add_thought_params, mask_thought_logits


def build(base_cfg: ModelConfig) -> tuple[QuietStarConfig, dict]:
    base = init_params(base_cfg, jax.random.key(0))
    model, params = add_thought_params(base, base_cfg, 1, jax.random.key(1))
    cfg = QuietStarConfig(model, 32000, 32001, pad_id=0, n_ahead=12, n_ahead_talk=1, n_passes=1)
    return cfg, params


def fastest_ms(call, repeats: int) -> float:
    """Fastest wall time of `call()` in ms (the least disturbed by other load on the machine),
    after one untimed warm-up (compilation) call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def time_cached(params, cfg, context: int, tokens: int, thinking: bool) -> float:
    """ms per token of the jitted step after a prefill of `context` tokens."""
    dec = Decoder(cfg, thinking=thinking)
    prompt = np.random.default_rng(0).integers(1, 32000, context).tolist()
    state = dec.start(params, [prompt], tokens + 1, jax.random.key(0))

    def one_token():
        nonlocal state
        state, out = dec.step(params, state)
        int(out.token_B[0])  # the host reads every token, as generate() does

    return fastest_ms(one_token, tokens)


def time_rerun(params, cfg, context: int, tokens: int) -> float:
    """ms per token when every new token re-runs the parallel rollout over the whole context.

    A real loop grows the sequence by one each time (and recompiles); a fixed length measures
    the cost at this context without counting compilation.
    """

    @jax.jit
    def next_token(params, tokens_BL, rng):
        out = rollout(params, tokens_BL, jnp.ones(tokens_BL.shape, bool), rng, cfg,
                      return_talk_logits=True)
        return jnp.argmax(mask_thought_logits(out.talk_logits[0, 0, 0, -1], cfg))

    seq = jnp.asarray(np.random.default_rng(0).integers(1, 32000, (1, context)))
    return fastest_ms(lambda: int(next_token(params, seq, jax.random.key(0))), tokens)


def time_rerun_authors(params, cfg, context: int, tokens: int) -> float:
    """ms per token when every new token re-runs the authors' parallel forward over the context:
    the growing block mask, one-hot embeddings and Gumbel-max draws of `naive_rollout`."""
    batch = {"tokens": jnp.asarray(np.random.default_rng(0).integers(1, 32000, (1, context))),
             "mask": jnp.ones((1, context), bool)}
    forward = jax.jit(lambda params, rng: naive_loss(params, batch, rng, cfg)[0])
    return fastest_ms(lambda: float(forward(params, jax.random.key(0))), tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--tokens", type=int, default=32, help="timed tokens per setting")
    parser.add_argument("--rerun_tokens", type=int, default=3, help="timed re-runs per setting")
    parser.add_argument("--config", choices=sorted(SETUPS), default="cpu")
    parser.add_argument("--cached_only", action="store_true", help="no re-run baselines")
    args = parser.parse_args()
    model = SETUPS[args.config].model
    cfg, params = build(model)
    results = {}
    for context in args.contexts:
        plain = time_cached(params, cfg, context, args.tokens, thinking=False)
        row = {"ms_per_token_no_thinking": round(plain, 3)}
        for thoughts, c in (("sampled", cfg), ("greedy", cfg.replace(greedy_thoughts=True))):
            think = time_cached(params, c, context, args.tokens, thinking=True)
            row[f"{thoughts}_thoughts"] = {"ms_per_token_thinking": round(think, 3),
                                           "thinking_over_no_thinking": round(think / plain, 2)}
            if args.cached_only:
                continue
            rerun = time_rerun(params, c, context, args.rerun_tokens)
            authors = time_rerun_authors(params, c, context, args.rerun_tokens)
            row[f"{thoughts}_thoughts"].update({
                "ms_per_token_rerun_authors": round(authors, 2),
                "rerun_authors_over_thinking": round(authors / think, 1),
                "ms_per_token_rerun_parallel": round(rerun, 2),
                "rerun_over_thinking": round(rerun / think, 1),
            })
        results[str(context)] = row
    lo, hi = (str(c) for c in (min(args.contexts), max(args.contexts)))
    cost = lambda c: results[c]["sampled_thoughts"]["ms_per_token_thinking"]  # noqa: E731
    growth = {"context_ratio": round(int(hi) / int(lo), 2),
              "thinking_cost_ratio": round(cost(hi) / cost(lo), 2)}
    print(json.dumps({"device": jax.devices()[0].device_kind, "machine": platform.machine(),
                      "config": args.config,
                      "model": {k: getattr(model, k) for k in (
                          "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "dtype")}
                      | {"vocab_size": cfg.model.vocab_size, "n_ahead": cfg.n_ahead},
                      "contexts": results, "growth": growth}, indent=2))


if __name__ == "__main__":
    main()
