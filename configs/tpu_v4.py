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

from qstar_jax import config


def get_config() -> ml_collections.ConfigDict:
    # optim at its defaults: lr 1e-6, warmup 20, weight decay 0.001, clip 1.0
    c = config.run_config(
        train_steps=100, batch_size=8, seq_len=256, log_every=1, checkpoint_every=25,
        eval_every=25, eval_batches=8,
        model=dict(
            source="hf", path="",  # a Mistral-7B Hugging Face directory, --config.model.path
            dtype="bfloat16", param_dtype="float32", remat_policy="nothing_saveable",
            scan_layers=True),
        quiet_star=dict(n_ahead=12, n_ahead_talk=4, n_passes=2))
    c.distributed = True  # one process per TPU host
    c.mesh.update(data=1, fsdp=0, tensor=0)  # 0: chosen
    c.data.source = "parquet"
    c.data.path = ""  # OpenWebMath Parquet files, --config.data.path
    return c
