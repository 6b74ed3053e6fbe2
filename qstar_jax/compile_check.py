"""Compile the train step for an accelerator without running it: per-device memory against HBM.

    python -m qstar_jax.train --config=configs/tpu_v4.py --compile_only=v4-64 \
        --config.model.path=mistral-7b

compiles for a TPU slice on this machine (with libtpu, no TPU, no weights read) and reports the
memory XLA plans per device against the device's HBM. The model needs no checkpoint: a named
shape (SHAPES), a config.json, or a Hugging Face directory (without a tokenizer, the thought
tokens go right after the config's vocabulary).
"""

from __future__ import annotations

import math
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections

from qstar_jax import config as config_lib
from qstar_jax import hf_checkpoint, loading, sharding, steps
from qstar_jax import tokenizer as tokenizer_lib
from qstar_jax.errors import ConfigError
from qstar_jax.model import RUNTIME_FIELDS
from qstar_jax.rollout import check_batch
from qstar_jax.thoughts import N_THOUGHT_TOKENS

# Cloud TPU v4 slices are named by TensorCores, two per chip; JAX runs each chip as one
# ("megacore") device. Slice -> chips along x, y, z (TensorCores / 2 in all).
V4_SLICES = {"v4-8": "2x2x1", "v4-16": "2x2x2", "v4-32": "2x2x4", "v4-64": "2x4x4",
             "v4-128": "4x4x4", "v4-256": "4x4x8", "v4-512": "4x8x8", "v4-1024": "8x8x8",
             "v4-2048": "8x8x16", "v4-4096": "8x16x16"}
# HBM per device that the XLA TPU compiler (libtpu 0.0.51) lets a program use, as its
# out-of-memory error states it; compile-only devices report no memory stats. A v4 chip has
# 32 GiB, a v5e 16, a v6e 32.
HBM_GIB = {"TPU v4": 30.75, "TPU v5 lite": 15.75, "TPU v5": 95.73, "TPU v6 lite": 31.24}

# Model shapes by name: the config.json fields of the released checkpoints that the fit depends on.
SHAPES = {
    "mistral-7b": {
        "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "max_position_embeddings": 32768, "rope_theta": 10000.0,
        "sliding_window": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "llama-3.1-8b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "qwen3-8b": {
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096,
        "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "attention_bias": False,
        "max_position_embeddings": 40960, "rope_theta": 1000000.0, "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": 36, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False},
}


class DoesNotFit(ConfigError):
    """The compiled train step needs more memory per device than the device has: settings to
    change (the mesh, batch_size, seq_len)."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def compile_devices(accelerator: str) -> tuple[str, list[jax.Device]]:
    """(topology, devices) to compile for: "cpu" (this host's CPU devices), a TPU v4 slice
    ("v4-32") or a TPU topology ("v4:2x4x4", "v5e:4x4"). TPU devices are compile-only
    descriptions from libtpu: no TPU is needed."""
    if accelerator == "cpu":
        return "cpu", jax.devices("cpu")
    topology = f"v4:{V4_SLICES[accelerator]}" if accelerator in V4_SLICES else accelerator
    if ":" not in topology:
        raise ConfigError(f"--compile_only={accelerator}: expected cpu, a TPU v4 slice "
                          f"({', '.join(V4_SLICES)}) or a TPU topology such as v4:2x2x4")
    from jax.experimental import topologies

    megacore = {"chip_config_name": "megacore"} if topology.startswith("v4:") else {}
    try:
        devices = list(topologies.get_topology_desc(topology, "tpu", **megacore).devices)
    except (RuntimeError, jax.errors.JaxRuntimeError) as e:
        raise ConfigError(f"--compile_only={accelerator}: no TPU topology {topology} "
                          f"({str(e).splitlines()[0]}); compiling for a TPU needs libtpu: "
                          "make setup puts it in .venv/libtpu, so run with PYTHONPATH=.venv/libtpu "
                          "(elsewhere: pip install libtpu==0.0.51)") from None
    if accelerator in V4_SLICES and len(devices) != int(accelerator[3:]) // 2:
        raise RuntimeError(f"{accelerator}: libtpu's topology {topology} has {len(devices)} "
                           f"devices, V4_SLICES expects {int(accelerator[3:]) // 2} chips")
    return topology, devices


def device_hbm_bytes(device: jax.Device) -> int | None:
    """Memory a program may use on `device`: its memory stats, else HBM_GIB by kind."""
    try:
        stats = device.memory_stats()
    except jax.errors.JaxRuntimeError:  # compile-only devices have none
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    gib = HBM_GIB.get(device.device_kind)
    return None if gib is None else int(gib * 2**30)


def _gib(n: float) -> float:
    return float(f"{n / 2**30:.4g}")


def compile_only(config: ml_collections.ConfigDict, accelerator: str,
                 hbm_bytes: int | None = None) -> dict:
    """Compile the run's train step for `accelerator` (see `compile_devices`) without running it
    or loading weights, and report XLA's per-device memory against the HBM (`hbm_bytes`, default
    `device_hbm_bytes`): `fits` is None where the HBM is unknown. Raises DoesNotFit, carrying the
    report, when the step needs more than the HBM or the TPU compiler runs out of it."""
    config_lib.check_run_config(config)
    topology, devices = compile_devices(accelerator)
    mesh = sharding.make_mesh(config.mesh, devices, config.batch_size)
    sharding.check_batch_size(config.batch_size, mesh)
    model = _weightless_model(config)
    check_batch(model.cfg, config.seq_len)
    trainer = steps.build(config, model, mesh)
    shape = (config.optim.grad_accum_steps, config.batch_size, config.seq_len)
    batch_sharding = sharding.batch_sharding(mesh, 1)
    batch = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding),
             "mask": jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=batch_sharding)}
    hbm = device_hbm_bytes(devices[0]) if hbm_bytes is None else hbm_bytes
    cfg = model.cfg
    report = {
        "accelerator": accelerator, "topology": topology, "devices": len(devices),
        "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape),
        "mesh_line": sharding.describe(mesh, config.mesh),
        "parameters": sum(math.prod(x.shape) for x in
                          jax.tree.leaves(trainer.abstract_state["params"])),
        "accum_batch_len": list(shape), "n_passes": cfg.n_passes, "n_ahead": cfg.n_ahead,
        "n_ahead_talk": cfg.n_ahead_talk, "hbm_gib": None if hbm is None else _gib(hbm)}
    start = time.perf_counter()
    try:
        compiled = trainer.lower_train_step(batch).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        report.update(compile_s=round(time.perf_counter() - start, 1), fits=False,
                      error=str(e).splitlines()[0])
        raise DoesNotFit(f"{accelerator}: the compiler ran out of device memory: "
                         f"{report['error']}", report) from None
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes)
    report.update(compile_s=round(time.perf_counter() - start, 1),
                  argument_gib=_gib(mem.argument_size_in_bytes),
                  output_gib=_gib(mem.output_size_in_bytes),
                  alias_gib=_gib(mem.alias_size_in_bytes), temp_gib=_gib(mem.temp_size_in_bytes),
                  total_gib=_gib(total), fits=None if hbm is None else total <= hbm)
    if report["fits"] is False:
        raise DoesNotFit(
            f"{accelerator}: the train step needs {report['total_gib']} GiB per device, more "
            f"than the {report['hbm_gib']} GiB of a {report['device_kind']} device (mesh "
            f"{' '.join(f'{a}={n}' for a, n in mesh.shape.items())}): split it over more "
            "devices or lower batch_size or seq_len", report)
    return report


def _weightless_model(config: ml_collections.ConfigDict) -> loading.Model:
    """The model `config` names, shapes only. `model.path` may also name one of SHAPES or a
    config.json; a directory without a tokenizer has the thought tokens after its vocabulary."""
    source, path = config.model.source, config.model.get("path", "")
    if source == "hf" and not path:
        raise ConfigError("model.path is empty: pass --config.model.path=PATH, a Hugging Face "
                          f"directory, its config.json, or a shape ({', '.join(SHAPES)})")
    config_lib.check_model_keys(config.model)
    tokenizer_dir = source == "hf" and os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, n)) for n in tokenizer_lib.TOKENIZER_FILES)
    if source != "hf" or tokenizer_dir:
        with tempfile.TemporaryDirectory() as workdir:  # a random model's tokenizer, dropped
            return loading.load_model(config, workdir)
    runtime = {k: config.model[k] for k in RUNTIME_FIELDS}
    if path in SHAPES:
        model_cfg = hf_checkpoint.config_from_hf(SHAPES[path], f"shape {path}").replace(**runtime)
    elif os.path.isdir(path) or (os.path.isfile(path) and os.path.basename(path) == "config.json"):
        directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
        model_cfg = hf_checkpoint.read_config(directory, **runtime)
    else:
        raise ConfigError(f"model.path={path}: no such directory, config.json or shape "
                          f"({', '.join(SHAPES)})")
    vocab = model_cfg.vocab_size
    ids = config_lib.ThoughtIds(start_thought_id=vocab, end_thought_id=vocab + 1, pad_id=0)
    grown = model_cfg.replace(vocab_size=vocab + N_THOUGHT_TOKENS)
    return loading.Model(config_lib.quiet_star_config(config.quiet_star, grown, ids),
                         tokenizer=None, init_token_id=0, load=None)
