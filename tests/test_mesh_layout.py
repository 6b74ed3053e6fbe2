"""The mesh laid on a TPU slice's torus: hand-worked splits, chip distances measured here from the
devices' coordinates, and libtpu's own v4 topologies (every slice from v4-8 to v4-512) with the
run's chosen mesh, down to a compiled train step where `jax.make_mesh` cannot lay it.

libtpu is not imported into the test process (it would load into every JAX process of the suite):
`make setup` installs it in .venv/libtpu, and the tests that need it run a subprocess with it on
PYTHONPATH. Without it they skip, naming the install command.
"""

import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from qstar_jax import mesh_layout

ROOT = Path(__file__).resolve().parents[1]
LIBTPU = ROOT / ".venv" / "libtpu"
needs_libtpu = pytest.mark.skipif(
    not (LIBTPU / "libtpu").is_dir(),
    reason="libtpu not in .venv/libtpu (make setup installs it: pip install --target "
           ".venv/libtpu --no-deps libtpu==0.0.51)")


def chips(shape: tuple[int, ...]) -> list:
    """Stand-ins for one device per chip of a torus, ids in coordinate order."""
    return [types.SimpleNamespace(id=i, coords=list(c), core_on_chip=0)
            for i, c in enumerate(itertools.product(*map(range, shape)))]


def torus_hops(a, b, torus: tuple[int, ...]) -> int:
    """Links between two chips of a torus, the shorter way round each ring."""
    return sum(min(abs(u - v), n - abs(u - v))
               for u, v, n in zip(a.coords, b.coords, torus, strict=True))


def widest_group(devices_array: np.ndarray, axis: int, torus: tuple[int, ...]) -> int:
    """The most hops between two chips of one group along mesh `axis`."""
    groups = np.moveaxis(devices_array, axis, -1).reshape(-1, devices_array.shape[axis])
    return max((torus_hops(a, b, torus) for g in groups for a, b in itertools.combinations(g, 2)),
               default=0)


def fewest_hops(size: int, torus: tuple[int, ...]) -> int:
    """The smallest widest-group distance of any box of `size` chips that tiles the torus."""
    best = None
    for box in itertools.product(*(range(1, n + 1) for n in torus)):
        if math.prod(box) == size and all(n % b == 0 for b, n in zip(box, torus, strict=True)):
            hops = sum(min(b - 1, n // 2) for b, n in zip(box, torus, strict=True))
            best = hops if best is None else min(best, hops)
    return best


@pytest.mark.parametrize("mesh, torus, tensor, fsdp", [
    # v4-128 with batch 8: an 8 is no product of 4s, so y is split: tensor gets 2 of its 4 chips.
    ((1, 8, 8), (4, 4, 4), [1, 2, 4], [4, 2, 1]),
    # v4-32: whole axes suffice; tensor 2 takes the axis of 2.
    ((1, 8, 2), (2, 2, 4), [1, 2, 1], [2, 1, 4]),
    # tensor 2 of a 4x4x4 with fsdp 32: two neighbouring chips of one ring.
    ((1, 32, 2), (4, 4, 4), [1, 1, 2], [4, 4, 2]),
])
def test_assignment_splits_physical_axes_as_worked_by_hand(mesh, torus, tensor, fsdp):
    table = mesh_layout.assignment(mesh, torus)
    assert table[:, 2].tolist() == tensor and table[:, 1].tolist() == fsdp
    assert table[:, 0].tolist() == [1, 1, 1]
    assert np.prod(table, axis=1).tolist() == list(torus)


@pytest.mark.parametrize("mesh, torus", [((1, 8, 8), (4, 4, 4)), ((2, 4, 2), (2, 2, 4)),
                                         ((1, 8, 32), (4, 8, 8)), ((1, 4, 1), (2, 2, 1))])
def test_layout_holds_each_chip_once_with_tensor_groups_as_close_as_they_can_be(mesh, torus):
    devices = chips(torus)
    laid = mesh_layout.layout(mesh, devices)
    assert laid.shape == mesh
    assert sorted(d.id for d in laid.flat) == list(range(len(devices)))
    assert widest_group(laid, 2, torus) == fewest_hops(mesh[2], torus)


def test_devices_without_a_torus_get_no_layout():
    cpus = [types.SimpleNamespace(id=i) for i in range(8)]
    assert mesh_layout.layout((1, 4, 2), cpus) is None
    assert mesh_layout.placement(np.array(cpus, dtype=object).reshape(1, 4, 2), 1) == ""
    holes = chips((2, 2, 2))[:-1] + [types.SimpleNamespace(id=7, coords=[5, 5, 5], core_on_chip=0)]
    assert mesh_layout.layout((1, 4, 2), holes) is None  # not a box: no torus to lay on


def test_placement_names_the_physical_axes_of_a_mesh_axis():
    torus = (4, 4, 4)
    laid = mesh_layout.layout((1, 8, 8), chips(torus))
    assert mesh_layout.placement(laid, 2) == "y 2 of 4, z 4"
    assert mesh_layout.placement(laid, 1) == "x 4, y 2 of 4"
    assert mesh_layout.placement(laid, 0) == ""


# ----------------------------------------------------------------------------- libtpu's slices

SLICES_SCRIPT = textwrap.dedent("""
    import json, sys
    from qstar_jax import compile_check, sharding

    sizes = {"data": 1, "fsdp": 0, "tensor": 0}  # configs/tpu_v4.py's mesh: chosen
    out = {}
    for name in sys.argv[1:]:
        topology, devices = compile_check.compile_devices(name)
        mesh = sharding.make_mesh(sizes, devices, 8)  # configs/tpu_v4.py's batch
        out[name] = {"topology": topology, "line": sharding.describe(mesh, sizes),
                     "coords": [[list(d.coords) for d in row] for row in
                                mesh.devices.reshape(-1, mesh.shape["tensor"])],
                     "ids": [d.id for d in mesh.devices.flat], "shape": list(mesh.devices.shape)}
    print("RESULT" + json.dumps(out))
""")

EXPECTED = {  # slice -> the mesh line's axes, read and checked by hand against the torus
    "v4-8": "data=1 fsdp=4 (chosen; x 2, y 2) tensor=1 (chosen)",
    "v4-16": "data=1 fsdp=8 (chosen; x 2, y 2, z 2) tensor=1 (chosen)",
    "v4-32": "data=1 fsdp=8 (chosen; x 2, z 4) tensor=2 (chosen; y 2)",
    "v4-64": "data=1 fsdp=8 (chosen; x 2, y 4) tensor=4 (chosen; z 4)",
    "v4-128": "data=1 fsdp=8 (chosen; x 4, y 2 of 4) tensor=8 (chosen; y 2 of 4, z 4)",
    "v4-256": "data=1 fsdp=8 (chosen; z 8) tensor=16 (chosen; x 4, y 4)",
    "v4-512": "data=1 fsdp=8 (chosen; y 8) tensor=32 (chosen; x 4, z 8)",
}


def libtpu_env() -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{ROOT}{os.pathsep}{LIBTPU}",
            "TPU_SKIP_MDS_QUERY": "1"}


def run_with_libtpu(script: str, args: list[str], tmp_path: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, *args], env=libtpu_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


@needs_libtpu
def test_every_v4_slice_lays_the_chosen_mesh_on_its_torus(tmp_path):
    out = run_with_libtpu(SLICES_SCRIPT, list(EXPECTED), tmp_path)
    for name, want in EXPECTED.items():
        got = out[name]
        torus = tuple(map(int, got["topology"].split(":")[1].split("x")))
        assert got["line"].startswith(want + " over "), (name, got["line"])
        assert sorted(got["ids"]) == list(range(math.prod(torus))), name
        tensor = got["shape"][2]
        rows = [[types.SimpleNamespace(coords=c) for c in row] for row in got["coords"]]
        widest = max((torus_hops(a, b, torus) for row in rows
                      for a, b in itertools.combinations(row, 2)), default=0)
        assert widest == fewest_hops(tensor, torus), name


COMPILE_SCRIPT = textwrap.dedent("""
    import json, sys
    import ml_collections
    sys.path.insert(0, sys.argv[1])
    from tpu_v4 import get_config
    from qstar_jax import compile_check

    with open("config.json", "w") as f:  # configs/tiny.py's shape as a config.json alone
        json.dump({"model_type": "llama", "vocab_size": 384, "hidden_size": 64,
                   "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                   "max_position_embeddings": 256}, f)
    config = get_config()
    config.model.path = "config.json"
    config.update_from_flattened_dict({"seq_len": 16, "quiet_star.n_ahead": 3,
                                       "quiet_star.n_ahead_talk": 2, "distributed": False})
    print("RESULT" + json.dumps(compile_check.compile_only(config, sys.argv[2])))
""")


@needs_libtpu
def test_the_step_compiles_with_no_mesh_flags_where_make_mesh_cannot_lay_it(tmp_path):
    """v4-128 (4x4x4) with batch 8: fsdp 8 and tensor 8, neither a product of its 4s."""
    report = run_with_libtpu(COMPILE_SCRIPT, [str(ROOT / "configs"), "v4-128"], tmp_path)
    assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 8}
    assert report["devices"] == 64 and report["device_kind"] == "TPU v4"
    assert report["fits"] is True and report["total_gib"] > 0
