"""Does thinking help? SmolLM2-135M-Instruct on GSM8K worked solutions, Quiet-STaR against the
same training without thoughts and with filler thoughts, sized so that the three arms of one seed
finish in about half an hour on a 2-core CPU (benchmarks/RESULTS.md, "Does thinking help?"):

    python -m qstar_jax.experiment --config=configs/experiment.py --workdir=runs/experiment \
        --seeds=0,1,2

The data are the first 2000 problems of the GSM8K training split shipped in `data/` (5% of them
held out by a hash of their text); Quiet-STaR uses the "fast_head" preset, which won on the
known-answer task (`config.PRESETS`; `configs/experiment.py:stable` without the faster mixing
head, `configs/experiment.py:reference` for the authors' settings).
"""

from pathlib import Path

import ml_collections

from qstar_jax import config, data, optim

GSM8K = Path(__file__).resolve().parents[1] / "data" / "gsm8k_train_2000.jsonl"


def get_config(preset: str = "fast_head") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.train_steps = 30
    c.batch_size = 2  # sequences per micro-batch
    c.seq_len = 96  # a held-out row is a problem's first 96 tokens: question, then solution
    c.log_every = 1
    c.checkpoint_every = 15
    c.checkpoint_keep = 1
    c.eval_every = 15
    c.eval_batches = 8  # 16 held-out problems, about 1500 scored tokens
    c.seed = 0
    c.distributed = False
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.model = ml_collections.ConfigDict(dict(
        source="demo", dtype="float32", param_dtype="float32",
        remat_policy="nothing_saveable",  # the layers' temporaries a third (configs/demo.py)
        scan_layers=True))
    # Three sampled thought tokens: the longest for which a seed's three arms take about half
    # an hour here.
    c.quiet_star = config.quiet_star_defaults(preset, n_ahead=6, n_ahead_talk=2, n_passes=2,
                                              remat_passes=False)
    c.data = data.default_config()
    c.data.source = "jsonl"
    c.data.path = str(GSM8K)
    c.optim = optim.default_config()
    c.optim.update(config.optim_preset(preset))
    c.optim.learning_rate = 3e-5
    c.optim.warmup_steps = 5
    return c
