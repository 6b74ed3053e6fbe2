"""Does the training learn to think? A task whose right thought is known (`qstar_jax.known_answer`):
the sum mod 10 of `data.steps` digits, which a small model writes out step by step but cannot
compute in one pass. The experiment first trains a base model from scratch on worked and bare
rows (`base_model`), then, from it, Quiet-STaR, the control and the filler arm on bare rows:

    python -m qstar_jax.experiment --config=configs/known_answer.py --workdir=runs/known \
        --seeds=0,1,2

`--config.data.steps=N` sets the difficulty; the row length and the thought length follow it.
"""

import ml_collections

from qstar_jax import config, known_answer

STEPS = 4  # digits per row: the running sums a thought must hold


def get_config(preset: str = "fast_head") -> ml_collections.ConfigDict:
    steps = ml_collections.FieldReference(STEPS)
    c = config.run_config(
        preset, train_steps=120,
        batch_size=32,  # bare rows per step
        seq_len=steps + 3,  # the digits, "=", the answer, EOS
        log_every=10, checkpoint_every=120, eval_every=10,
        eval_batches=8,  # 256 held-out problems, one answer token each
        model=dict(
            source="random", vocab_size=len(known_answer.VOCABULARY), d_model=64, n_layers=2,
            n_heads=4, n_kv_heads=2, ffn_dim=256, rope_theta=10000.0, tie_embeddings=False,
            dtype="float32", param_dtype="float32", remat_policy="none", scan_layers=True),
        # A thought of `steps` tokens between a start and an end token that both start as the
        # bar that opens and closes a worked row's steps; one talk token: the answer after the
        # thought.
        quiet_star=dict(n_ahead=steps + 3, n_ahead_talk=1, n_passes=2, init_text=known_answer.BAR,
                        remat_passes=False))
    c.checkpoint_keep = 1
    c.data.source = "known_answer"
    c.data.num_synthetic = 8000
    c.data.steps = steps
    c.data.worked_fraction = 0.0  # Quiet-STaR trains on bare rows only
    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 5
    # The base model every arm starts from: a plain language model trained from scratch on
    # worked and bare rows (rows of the worked length).
    c.base_model = ml_collections.ConfigDict(dict(
        train_steps=3000, batch_size=32, seq_len=steps * 2 + 5, worked_fraction=0.5,
        learning_rate=3e-3, warmup_steps=20))
    return c
