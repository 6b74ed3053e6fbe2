"""Meshes and shardings: several meshes of 8 simulated CPU devices train exactly as one device
does, parameters really are split, and two processes on localhost train as one process does.

Multi-device runs happen in subprocesses (this process's jax may already have 1 device).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from qstar_jax import sharding

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
# configs/tiny.py with shorter rows and one layer. Its preset, "stable", has policy_loss_beta 1:
# the reference's 1e6 would turn float32 rounding of the first steps' near-zero rewards
# (differences of ~6.0 nats computed in a mesh-dependent order) into the largest gradient term.
# A learning rate that moves the mixing head at once; rewards are then compared at the precision
# of the losses they are differences of. That rate magnifies rounding: with the preset's REINFORCE
# temperature of 1 the third step's losses of two meshes differ by 3e-5 of their size, with the
# authors' 3 by less than 1e-5, the precision asked here.
OVERRIDES = {"seq_len": 16, "batch_size": 8, "train_steps": 3, "model.n_layers": 1,
             "quiet_star.reinforce_temperature": 3.0, "optim.warmup_steps": 0,
             "optim.learning_rate": 1e-2}


def subprocess_env(devices: int, cache: Path) -> dict:
    """Environment for a jax subprocess: simulated devices, little XLA optimisation (fast
    compiles; every run compared here uses the same flags) and a shared compilation cache."""
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
                         "--xla_backend_optimization_level=0",
            "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def start_python(code: str, args: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    """Start `code` in a fresh interpreter in `cwd`."""
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen, timeout: int = 600) -> dict:
    """The JSON a started interpreter prints after "RESULT"."""
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.split("RESULT", 1)[1])


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_cache")


@pytest.mark.parametrize("sizes, expected", [
    ({"data": -1, "fsdp": 1, "tensor": 1}, (8, 1, 1)),
    ({"data": 2, "fsdp": -1, "tensor": 2}, (2, 2, 2)),
    ({"data": 1, "fsdp": 4, "tensor": 2}, (1, 4, 2)),
])
def test_mesh_shape_fills_one_axis(sizes, expected):
    assert sharding.mesh_shape(sizes, 8) == expected


@pytest.mark.parametrize("sizes, message", [
    ({"data": 2, "fsdp": 2, "tensor": 1}, "needs 4 devices, but 8 are available"),
    ({"data": 3, "fsdp": -1, "tensor": 1}, "8 devices do not divide into 3"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one -1"),
    ({"data": 0, "fsdp": -1, "tensor": 1}, "not with 0"),
    ({"data": -2, "fsdp": 8, "tensor": 1}, "each size is positive"),
])
def test_mesh_shape_errors_name_the_problem(sizes, message):
    with pytest.raises(ValueError, match=message):
        sharding.mesh_shape(sizes, 8)


# configs/tpu_v4.py's mesh (data 1, fsdp and tensor chosen) on every v4 slice from v4-8 (4
# chips) to v4-512 (256): the 8 rows over fsdp, the rest to tensor; fewer devices than rows take
# the devices the rows divide into.
@pytest.mark.parametrize("n_devices, batch, expected", [
    (1, 8, (1, 1, 1)), (4, 8, (1, 4, 1)), (8, 8, (1, 8, 1)), (16, 8, (1, 8, 2)),
    (32, 8, (1, 8, 4)), (64, 8, (1, 8, 8)), (128, 8, (1, 8, 16)), (256, 8, (1, 8, 32)),
    (16, 12, (1, 4, 4)), (6, 8, (1, 2, 3)), (32, 64, (1, 32, 1)),
])
def test_chosen_mesh_splits_the_rows_then_gives_the_rest_to_tensor(n_devices, batch, expected):
    shape = sharding.mesh_shape({"data": 1, "fsdp": 0, "tensor": 0}, n_devices, batch)
    assert shape == expected
    data, fsdp, tensor = shape
    assert data * fsdp * tensor == n_devices and batch % (data * fsdp) == 0


@pytest.mark.parametrize("sizes, batch, expected", [
    ({"data": 0, "fsdp": 0, "tensor": 1}, 8, (1, 8, 1)),  # both batch axes chosen: fsdp
    ({"data": 0, "fsdp": 1, "tensor": 0}, 4, (4, 1, 2)),
    ({"data": 2, "fsdp": 0, "tensor": 0}, 4, (2, 2, 2)),  # 2 rows per data group, over fsdp
    ({"data": 1, "fsdp": 2, "tensor": 0}, 8, (1, 2, 4)),
])
def test_chosen_mesh_keeps_the_sizes_given(sizes, batch, expected):
    assert sharding.mesh_shape(sizes, 8, batch) == expected


def test_chosen_mesh_without_tensor_says_how_to_use_the_devices():
    with pytest.raises(ValueError, match=r"batch_size=4 splits over only 4 of the 8 devices.*"
                                         r"--config.mesh.tensor=0"):
        sharding.mesh_shape({"data": 1, "fsdp": 0, "tensor": 1}, 8, 4)


MESHES_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    sys.path.insert(0, sys.argv[3])
    import tiny
    from qstar_jax import loading, sharding, steps

    config = tiny.get_config()
    config.update_from_flattened_dict(json.loads(sys.argv[1]))
    model = loading.load_model(config, sys.argv[2])
    rng = np.random.default_rng(0)
    shape = (1, config.batch_size, config.seq_len)  # [A, B, L]
    batches = []
    for _ in range(config.train_steps):
        lengths = rng.integers(config.seq_len // 2, config.seq_len + 1, size=shape[:2])
        mask = np.arange(config.seq_len) < lengths[..., None]
        tokens = rng.integers(3, model.cfg.model.vocab_size - 2, size=shape)
        batches.append({"tokens": np.where(mask, tokens, model.tokenizer.pad_id).astype(np.int32),
                        "mask": mask})

    def spec(x):
        return list(x.sharding.spec) + [None] * (x.ndim - len(x.sharding.spec))

    out = {}
    one = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
    shapes = [tuple(s) for s in json.loads(sys.argv[4])]
    meshes = {str(s): one if s == (1, 1, 1) else jax.make_mesh(
              s, sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
              for s in shapes}
    for name, mesh in meshes.items():
        trainer = steps.build(config, model, mesh)
        state = trainer.init_state(config.seed)
        losses = []
        for b in batches:
            state, metrics = trainer.train_step(state, sharding.global_batch(b, mesh, 1))
            losses.append({k: float(v) for k, v in metrics.items()})
        params = state["params"]
        mu = state["opt_state"][1][0].mu  # clip state, then adamw's scale_by_adam
        out[name] = {"losses": losses, "specs": {
            "embedding": spec(params["decoder"]["embed"]["embedding"]),
            "q_proj": spec(params["decoder"]["layers"]["attn"]["q_proj"]["kernel"]),
            "mixing_out": spec(params["mixing_head"]["out"]["kernel"]),
            "mu_embedding": spec(mu["decoder"]["embed"]["embedding"]),
            "start": spec(params["start_embedding"]),
            "n_shards_q": len({str(s.index) for s in
                               params["decoder"]["layers"]["attn"]["q_proj"]["kernel"]
                               .addressable_shards})}}
    # A vocabulary tensor=4 does not divide stays unsplit along it (no padding).
    if (1, 1, 1) in shapes:
        print("RESULT" + json.dumps(out))
        sys.exit()
    mesh = jax.make_mesh((1, 2, 4), sharding.MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    abstract = model.abstract_params()
    specs = sharding.shardings(sharding.logical_specs(model.cfg), abstract, mesh)
    out["vocab_over_4"] = {"vocab": model.cfg.model.vocab_size,
                           "embedding": list(specs["decoder"]["embed"]["embedding"].spec)}
    print("RESULT" + json.dumps(out))
""")


def test_meshes_train_like_one_device(tmp_path, jax_cache):
    from tiny import get_config

    from qstar_jax import loading

    config = get_config()
    config.update_from_flattened_dict(OVERRIDES)
    loading.workdir_tokenizer(config, str(tmp_path))  # shared by both subprocesses
    # Two interpreters, one per core, split the four compilations. Pure data parallelism is in
    # (2, 2, 2) and the batch split over eight devices in (1, 8, 1).
    args = [json.dumps(OVERRIDES), str(tmp_path), str(ROOT / "configs")]
    procs = [start_python(MESHES_SCRIPT, [*args, json.dumps(shapes)],
                          subprocess_env(8, jax_cache), tmp_path)
             for shapes in ([(1, 1, 1), (2, 2, 2)], [(1, 4, 2), (1, 8, 1)])]
    out = {k: v for proc in procs for k, v in result(proc).items()}
    reference = out.pop("(1, 1, 1)")["losses"]
    assert reference[-1]["mixing_weight_mean"] > 1e-3  # thinking changes the predictions
    for mesh, run in out.items():
        if mesh == "vocab_over_4":
            continue
        for step, (got, want) in enumerate(zip(run["losses"], reference, strict=True)):
            where = f"mesh {mesh}, step {step + 1}"
            for name in ("loss", "nll", "loss_base", "loss_talk_0", "loss_talk_1", "grad_norm",
                         "mixing_weight_mean"):
                np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=where)
            for name in ("reward_mean", "advantage_mean", "policy_loss"):
                np.testing.assert_allclose(got[name], want[name], rtol=0,
                                           atol=1e-5 * want["loss_base"], err_msg=where)
    # Parameters and optimizer state are split as the rules say.
    specs = out["(1, 4, 2)"]["specs"]
    assert specs["embedding"] == ["tensor", "fsdp"]  # [vocab, embed]
    assert specs["q_proj"] == [None, "fsdp", "tensor", None]  # [layers, embed, heads, head_dim]
    assert specs["mixing_out"] == ["fsdp", None]  # [mix_in, 1]: 1 is not split
    assert specs["mu_embedding"] == specs["embedding"]
    assert specs["start"] == ["fsdp"]
    assert specs["n_shards_q"] == 8
    assert out["(2, 2, 2)"]["specs"]["n_shards_q"] == 4  # fsdp x tensor; copies along data
    assert out["(1, 8, 1)"]["specs"]["n_shards_q"] == 8
    assert out["vocab_over_4"]["vocab"] % 4 != 0
    assert out["vocab_over_4"]["embedding"] == [None, "fsdp"]
