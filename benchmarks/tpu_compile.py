"""Does the paper's run fit a TPU slice? Compile the real train step for it on a CPU machine.

Mistral-7B-v0.1 (or Qwen3-8B, `--model qwen3-8b`) with configs/tpu_v4.py (batch 8 x 2
rationales, L 256, n_ahead 12, n_ahead_talk 4, float32 weights and AdamW state, bf16 compute)
needs no checkpoint here: this writes a stand-in Hugging Face directory with the model's
config.json and a tokenizer of its size (Qwen3's 151669 tokens for its 151936 embedding rows;
weights are never read), then runs `python -m qstar_jax.train --compile_only=ACCELERATOR` on it.
Needs `pip install libtpu` (not in the default install: every JAX start then prints TPU
warnings).

    python benchmarks/tpu_compile.py --accelerator v4-32 --config.mesh.tensor=2
    python benchmarks/tpu_compile.py --accelerator v4-64 --config.mesh.tensor=4
    python benchmarks/tpu_compile.py --model qwen3-8b --accelerator v4-32 --config.mesh.tensor=2

Other arguments are passed on to qstar_jax.train. Prints train's JSON line (per-device memory
against the HBM); exits 1 if the step does not fit.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import tokenizers
from absl import app
from tokenizers import models, pre_tokenizers

ROOT = Path(__file__).resolve().parents[1]
# Mistral-7B-v0.1's config.json (the fields qstar_jax reads, and a few more).
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rope_theta": 10000.0, "sliding_window": 4096,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
# Qwen3-8B's config.json (transformers 4 keys).
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
    "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
    "attention_bias": False, "max_position_embeddings": 40960, "rope_theta": 1000000,
    "rope_scaling": None, "use_sliding_window": False, "sliding_window": None,
    "max_window_layers": 36, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
}
# --model -> (config.json, tokenizer tokens).
MODELS = {"mistral-7b": (MISTRAL_7B, 32000), "qwen3-8b": (QWEN3_8B, 151669)}
SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Mistral's tokenizer


def write_stub(directory: str | Path, config: dict = MISTRAL_7B, tokens: int | None = None
               ) -> Path:
    """A Hugging Face directory with `config` and a word-level tokenizer of `tokens` tokens
    (default: the vocabulary size; no thought tokens, so they go after the embedding rows); no
    weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), tokens or config["vocab_size"])})
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIALS))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accelerator", default="v4-64",
                    help="a TPU v4 slice (v4-32, v4-64, ...) or a topology such as v4:2x4x4")
    ap.add_argument("--config", default=str(ROOT / "configs" / "tpu_v4.py"))
    ap.add_argument("--model", default="mistral-7b", choices=list(MODELS),
                    help="whose config.json and tokenizer size the stand-in directory has")
    args, rest = ap.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        stub = write_stub(Path(tmp) / args.model, *MODELS[args.model])
        argv = ["qstar_jax.train", f"--config={args.config}",
                f"--compile_only={args.accelerator}", f"--config.model.path={stub}", *rest]
        print(" ".join(["python -m", *argv]), file=sys.stderr, flush=True)
        from qstar_jax import cli, train

        sys.argv = argv  # config_flags reads the --config.KEY overrides from sys.argv
        train.define_flags()
        app.run(train.main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    main()
