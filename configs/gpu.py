"""One GPU, bf16 compute: a random ~1.1B Llama (TinyLlama's shape, with a sentencepiece vocabulary
trained on the data), or a local Hugging Face checkpoint:

    python -m qstar_jax.train --config=configs/gpu.py --workdir=runs/gpu
    python -m qstar_jax.train --config=configs/gpu.py:hf --config.model.path=/ckpt --workdir=...

Quiet-STaR settings are the paper's; data are the synthetic word problems unless --config.data.*
names a corpus.
"""

import ml_collections

from qstar_jax import config
from qstar_jax.errors import ConfigError


def get_config(model: str = "random") -> ml_collections.ConfigDict:
    runtime = dict(dtype="bfloat16", param_dtype="float32", remat_policy="nothing_saveable",
                   scan_layers=True)
    if model == "random":
        section = dict(
            source="random", vocab_size=768, d_model=2048, n_layers=22, n_heads=32,
            n_kv_heads=4, ffn_dim=5632, rope_theta=10000.0, tie_embeddings=False, **runtime)
    elif model == "hf":
        section = dict(source="hf", path="", **runtime)
    else:
        raise ConfigError(f"configs/gpu.py:{model}: expected 'random' or 'hf'")
    # quiet_star at its defaults: n_ahead 12, n_ahead_talk 4, n_passes 2
    return config.run_config(
        train_steps=100,
        batch_size=8,  # sequences per micro-batch
        seq_len=256, log_every=5, checkpoint_every=50, eval_every=50, eval_batches=8,
        model=section)
