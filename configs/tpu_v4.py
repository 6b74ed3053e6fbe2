"""The paper's run: Mistral-7B on OpenWebMath, on a TPU v4 pod slice, weights sharded (FSDP).

    launch/train.sh --workdir gs://BUCKET/RUN --config configs/tpu_v4.py \
        --config.model.path=/path/to/Mistral-7B-v0.1 --config.data.path=/path/to/openwebmath

Batch 8 sequences (2 rationales each), 256-token random crops, n_ahead 12, n_ahead_talk 4, AdamW
lr 1e-6 with 20 warmup steps, weight decay 0.001, clip 1.0, 100 steps, bf16 compute (float32
master weights and optimizer state). The mesh is chosen for the slice: the batch rows over the
fsdp axis (weights sharded with them), the devices the batch cannot use to tensor parallelism;
--config.mesh.fsdp / --config.mesh.tensor set them by hand.

    python -m qstar_jax.train --config=configs/tpu_v4.py --compile_only=v4-64 \
        --config.model.path=mistral-7b

checks that the step fits a slice without a checkpoint (`compile_check.SHAPES` names shapes).
"""

import ml_collections

from qstar_jax import config, data, optim


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.train_steps = 100
    c.batch_size = 8
    c.seq_len = 256
    c.log_every = 1
    c.checkpoint_every = 25
    c.checkpoint_keep = 2
    c.eval_every = 25
    c.eval_batches = 8
    c.seed = 0
    c.distributed = True  # one process per TPU host
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=0, tensor=0))  # 0: chosen
    c.model = ml_collections.ConfigDict(dict(
        source="hf", path="",  # a Mistral-7B Hugging Face directory, --config.model.path
        dtype="bfloat16", param_dtype="float32", remat_policy="nothing_saveable",
        scan_layers=True))
    c.quiet_star = config.quiet_star_defaults(n_ahead=12, n_ahead_talk=4, n_passes=2)
    c.data = data.default_config()
    c.data.source = "parquet"
    c.data.path = ""  # OpenWebMath Parquet files, --config.data.path
    c.optim = optim.default_config()  # lr 1e-6, warmup 20, weight decay 0.001, clip 1.0
    return c
