"""A tiny random model on synthetic word problems: the whole training system on a laptop CPU in
well under two minutes (a sentencepiece tokenizer is trained on the data and kept in the workdir).

    python -m qstar_jax.train --config=configs/tiny.py --workdir=runs/tiny
"""

import ml_collections

from qstar_jax import config


def get_config() -> ml_collections.ConfigDict:
    c = config.run_config(
        "stable",  # a policy weight of 1 (the authors' 1e6 swamps the loss of a small model)
        train_steps=30,
        batch_size=8,  # sequences per micro-batch, over all devices
        seq_len=32, log_every=5, checkpoint_every=10,
        eval_every=15,  # also evaluated before the first and after the last step
        eval_batches=2,
        model=dict(
            source="random", vocab_size=384, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
            ffn_dim=128, rope_theta=10000.0, tie_embeddings=False,
            dtype="float32", param_dtype="float32", remat_policy="none", scan_layers=True),
        quiet_star=dict(n_ahead=4, n_ahead_talk=2, n_passes=2))
    c.data.num_synthetic = 1000
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 5
    return c
