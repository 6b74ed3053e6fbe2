"""The authors' PyTorch Quiet-STaR training step on `train_step.py`'s `cpu` setup, timed.

    python benchmarks/authors_step.py --authors_dir DIR [--steps 4]
    python benchmarks/train_step.py --against_authors DIR --authors_python PY   # paired

`train_step.py`'s figures are ratios to our own rewrite of the authors' algorithm; this script
times their code itself on the same machine, so that a speed-up over it is measured, not quoted.
DIR holds the two files of their repository (ezelikman/quiet-star) that patch transformers'
Mistral: `modeling_mistral.py` and `configuration_mistral.py`. They need transformers 4.37, so
run this in an environment of its own, not the project's:

    python3 -m venv /tmp/authors
    /tmp/authors/bin/pip install torch==2.13.0 transformers==4.37.2 pandas seaborn matplotlib \
        wandb termcolor reportlab tqdm
    /tmp/authors/bin/python benchmarks/authors_step.py --authors_dir DIR

The model is built as their `quiet-star-train.py` builds Mistral-7B, with the `cpu` setup's shape
(d_model 256, 4 layers, 8 heads, 2 kv heads, ffn 704, vocabulary 32000 grown by the two thought
tokens, float32, random weights) and its batch (2 x 128 random tokens, n_passes 2, n_ahead 12,
n_ahead_talk 4). A step is their forward with labels, `loss.backward()`, clipping to norm 1 and a
`torch.optim.AdamW` update (their lr 1e-6 and weight decay 0.001), as `train_step.py`'s step.
Their run-length guard (`kill_after`) is off and their wandb logging goes to a disabled run.
Prints one JSON object: step times, their median and the process's peak RSS. `--serve` is the
worker of `train_step.py --against_authors`, which steps it in turn with our step.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import sys
import time
from pathlib import Path

try:
    import torch
    import transformers
    import wandb
except ImportError as error:
    raise SystemExit(f"{error}: run this in its own environment, set up as the docstring says "
                     "(python benchmarks/authors_step.py --help)") from None

BASE_VOCAB = 32000
THOUGHT_TOKENS = ("<|startthought|>", "<|endthought|>")


def load_authors_modules(directory: Path):
    """Their configuration and modeling modules, imported as transformers' Mistral modules.

    The modeling file imports the configuration relatively (`from .configuration_mistral`) in
    one version of their repository and by its bare name in another: both names resolve to
    theirs.
    """
    modules = []
    for name in ("configuration_mistral", "modeling_mistral"):
        path = directory / f"{name}.py"
        if not path.is_file():
            raise SystemExit(f"--authors_dir {directory}: {path.name} is missing")
        full = f"transformers.models.mistral.{name}"
        spec = importlib.util.spec_from_file_location(full, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except ImportError as error:
            raise SystemExit(f"{path} does not import with transformers "
                             f"{transformers.__version__} ({error}); it needs transformers 4.37 "
                             "and the packages the docstring lists") from None
        modules.append(module)
    return modules


class Tokenizer:
    """What their model reads of a tokenizer: the thought tokens' ids, pad/eos/bos, and the id of
    "---", whose embedding starts the thought embeddings (any fixed id, for random weights)."""

    pad_token_id = eos_token_id = 2  # quiet-star-train.py pads with EOS
    bos_token_id = 1
    dashes_id = 7395

    def __len__(self) -> int:
        return BASE_VOCAB + len(THOUGHT_TOKENS)

    def convert_tokens_to_ids(self, token: str) -> int:
        return BASE_VOCAB + THOUGHT_TOKENS.index(token) if token in THOUGHT_TOKENS else 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if text != "---":
            raise ValueError(f"this stand-in tokenizer encodes only '---', not {text!r}")
        return [self.dashes_id]


def build_model(directory: Path, n_ahead: int = 12, n_ahead_talk: int = 4, n_passes: int = 2):
    """Their MistralForCausalLM, configured as `quiet-star-train.py`'s `model_init` does."""
    configuration, modeling = load_authors_modules(directory)
    config = configuration.MistralConfig(
        vocab_size=BASE_VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, intermediate_size=704, max_thoughts=n_ahead + n_ahead_talk + 1,
        merged_talk_heads=True, merged_lm_and_talk_heads=False, merged_lm_and_think_heads=True,
        use_concat_talk_head=True, use_shallow_think=True, use_shallow_talk=False,
        use_complex_think_head=False, use_complex_talk_head=True, use_weighted_talk_head=True)
    model = modeling.MistralForCausalLM(config).to(torch.float32)
    tokenizer = Tokenizer()
    model.resize_token_embeddings(len(tokenizer))
    accumulation = n_passes  # their full batch of 8 in n_passes-sized pieces
    settings = dict(
        tokenizer=tokenizer, gumbel_detach=True, include_policy_loss=True,
        use_end_thought_token=True, use_start_thought_token=True, n_ahead=n_ahead,
        n_ahead_talk=n_ahead_talk, n_passes=n_passes, n_tokens_print=accumulation,
        gradient_accumulation_steps=accumulation, residual_think_head=False,
        optimize_lm_head_only_at_start=False, gumbel_temperature=1, wandb_enabled=True,
        original_mode=False, config_params={}, run_start=int(time.time()), kill_after=None)
    for name, value in settings.items():
        setattr(model, name, value)
    return model.train()


class Trainer:
    """Their model, a fixed batch and AdamW: `step()` takes one training step, timed."""

    def __init__(self, directory: Path):
        torch.manual_seed(0)
        self.model = build_model(directory)
        self.tokens = torch.randint(1, BASE_VOCAB, (2, 128),
                                    generator=torch.Generator().manual_seed(0))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-6, weight_decay=0.001)

    def step(self) -> dict:
        """Forward with labels, backward, clip to norm 1, AdamW: its time, loss and peak RSS."""
        start = time.perf_counter()
        loss = self.model(input_ids=self.tokens, attention_mask=torch.ones_like(self.tokens),
                          labels=self.tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return {"step_s": time.perf_counter() - start, "loss": float(loss.detach()),
                "peak_rss_gib": peak_rss_gib()}


def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3)  # KiB


def serve(trainer: Trainer) -> None:
    """Worker of `train_step.py --against_authors`: one untimed step, its figures as a JSON
    line, then one step per line read from stdin, its figures printed as a JSON line."""
    first = trainer.step()
    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": torch.get_num_threads(), "first_loss": first["loss"]}),
          flush=True)
    for _ in sys.stdin:
        print(json.dumps(trainer.step()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--authors_dir", type=Path, required=True,
                        help="holds their modeling_mistral.py and configuration_mistral.py")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: at least one step is needed")
    torch.set_num_threads(args.threads)
    # Their forward logs to wandb every n_passes calls and then empties its running metrics, which
    # hold tensors of the step: logging stays on, to a run that records nothing.
    wandb.init(mode="disabled")
    trainer = Trainer(args.authors_dir)
    if args.serve:
        serve(trainer)
        return
    steps = [trainer.step() for _ in range(args.steps)]
    times = [s["step_s"] for s in steps]
    print(json.dumps({
        "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "step_s": round(statistics.median(times), 3), "step_s_all": [round(t, 3) for t in times],
        "peak_rss_gib": peak_rss_gib(), "losses": [s["loss"] for s in steps],
    }, indent=2))


if __name__ == "__main__":
    main()
