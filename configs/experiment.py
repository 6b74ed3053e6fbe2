"""Does thinking help? SmolLM2-135M-Instruct on GSM8K worked solutions, Quiet-STaR against the
same training without thoughts and with filler thoughts, sized so that the three arms of one seed
run on a 2-core CPU (their run times: benchmarks/RESULTS.md, "Does thinking help?"):

    python -m qstar_jax.experiment --config=configs/experiment.py --workdir=runs/experiment \
        --seeds=0,1,2

The data are the first 2000 problems of the GSM8K training split shipped in `data/` (5% of them
held out by a hash of their text); Quiet-STaR uses the "fast_head" preset, which won on the
known-answer task (`config.PRESETS`; `configs/experiment.py:stable` without the faster mixing
head, `configs/experiment.py:reference` for the authors' settings).
"""

from pathlib import Path

import ml_collections

from qstar_jax import config

GSM8K = Path(__file__).resolve().parents[1] / "data" / "gsm8k_train_2000.jsonl"


def get_config(preset: str = "fast_head") -> ml_collections.ConfigDict:
    c = config.run_config(
        preset, train_steps=30,
        batch_size=2,  # sequences per micro-batch
        seq_len=96,  # a held-out row is a problem's first 96 tokens: question, then solution
        log_every=1, checkpoint_every=15, eval_every=15,
        eval_batches=8,  # 16 held-out problems, about 1500 scored tokens
        model=dict(
            source="demo", dtype="float32", param_dtype="float32",
            remat_policy="nothing_saveable",  # the layers' temporaries cut (configs/demo.py)
            scan_layers=True),
        # Three sampled thought tokens: the longest thought for which a seed's three arms still
        # fit the CPU time this experiment is sized for (benchmarks/RESULTS.md, "Does thinking
        # help on real text with what the known-answer task taught?").
        quiet_star=dict(n_ahead=6, n_ahead_talk=2, n_passes=2, remat_passes=False))
    c.checkpoint_keep = 1
    c.data.source = "jsonl"
    c.data.path = str(GSM8K)
    c.optim.learning_rate = 3e-5
    c.optim.warmup_steps = 5
    return c
