"""How a run's arrays lie on devices: the ("data", "fsdp", "tensor") mesh, the rules that map the
model's logical axis names onto it, and the shardings of parameters, optimizer state and batches.

A parameter dimension that its mesh axes do not divide (a vocabulary of 49154 over tensor=4, a
mixing head's output of 1) is left unsharded along them rather than padded: jit's in/out
shardings must divide evenly, and such dimensions are few and small.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qstar_jax import mesh_layout
from qstar_jax.errors import ConfigError
from qstar_jax.model import abstract_params
from qstar_jax.thoughts import MixingHead, QuietStarConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both; fsdp also splits the weights

# Logical axis name -> mesh axes. Weights: embed over fsdp, the wide dims over tensor.
# Activations: batch over data x fsdp, heads/mlp over tensor, the rest replicated.
RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("mix_in", "fsdp"),
    ("mix_out", "tensor"),
)


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[None]:
    """Trace under the mesh and the logical rules, so the model's activation constraints apply."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        yield


AUTO = 0  # a mesh size of 0: chosen from the device count and the batch (see `mesh_shape`)


def mesh_shape(sizes: Mapping[str, int], n_devices: int,
               global_batch: int | None = None) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes for `n_devices`.

    A size of -1 fills the devices the others leave (at most one). Sizes of 0 (AUTO) are chosen:
    the batch axes that are AUTO take the most devices that split `global_batch` rows evenly
    (fsdp when both are AUTO), and an AUTO tensor axis the devices left over.
    """
    shape = [int(sizes[a]) for a in MESH_AXES]
    text = " x ".join(f"{a}={s}" for a, s in zip(MESH_AXES, shape, strict=True))
    if any(s < -1 for s in shape) or shape.count(-1) > 1 or (-1 in shape and AUTO in shape):
        raise ConfigError(f"mesh {text}: each size is positive, 0 (chosen) or -1 (the rest; "
                          "at most one -1, and not with 0)")
    known = math.prod(s for s in shape if s > 0)
    if AUTO in shape:
        if n_devices % known:
            raise ConfigError(f"mesh {text}: {n_devices} devices do not divide into {known}")
        return _chosen(shape, n_devices // known, global_batch, text)
    if -1 in shape:
        if n_devices % known:
            raise ConfigError(f"mesh {text}: {n_devices} devices do not divide into {known}")
        shape[shape.index(-1)] = n_devices // known
    elif known != n_devices:
        raise ConfigError(f"mesh {text} needs {known} devices, but {n_devices} are available")
    return tuple(shape)


def _chosen(shape: list[int], free: int, global_batch: int | None,
            text: str) -> tuple[int, int, int]:
    """`shape` with its AUTO sizes filled from the `free` devices the fixed sizes leave."""
    data, fsdp, tensor = shape
    batch_axes = [i for i in (1, 0) if shape[i] == AUTO]  # fsdp first
    split = 1
    if batch_axes:
        if global_batch is None:
            raise ValueError(f"mesh {text}: choosing the batch axes needs the batch size")
        rows = global_batch // math.prod(s for s in (data, fsdp) if s > 0)
        split = max(d for d in range(1, free + 1) if free % d == 0 and rows % d == 0)
    rest = free // split
    if tensor != AUTO and rest != 1:
        raise ConfigError(f"mesh {text}: batch_size={global_batch} splits over only {split} of "
                          f"the {free} devices left; set --config.mesh.tensor=0 to give the rest "
                          "to tensor parallelism, or a batch_size that they divide")
    for i in batch_axes:
        shape[i] = 1
    if batch_axes:
        shape[batch_axes[0]] = split
    if tensor == AUTO:
        shape[2] = rest
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None,
              global_batch: int | None = None) -> Mesh:
    """The run's mesh over `devices` (default: all devices of all processes; compile-only TPU
    devices for ahead-of-time compilation), axes in auto (GSPMD) mode; AUTO sizes are chosen
    for `global_batch` (see `mesh_shape`)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(sizes, len(devices), global_batch)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    on_torus = mesh_layout.layout(shape, devices)  # a TPU slice: its axes split where needed
    if on_torus is not None:
        return Mesh(on_torus, MESH_AXES, axis_types=axis_types)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def describe(mesh: Mesh, sizes: Mapping[str, int] | None = None) -> str:
    """One line naming the mesh, e.g. 'data=2 fsdp=2 tensor=2 over 8 cpu devices (1 process)',
    marking the sizes chosen because `sizes` (the config's) left them AUTO and, on a TPU slice,
    the physical axes each spans ('fsdp=8 (chosen; z 4, y 2 of 4)')."""
    def axis(i: int, name: str) -> str:
        notes = [n for n in ("chosen" if sizes is not None and sizes[name] == AUTO else "",
                             mesh_layout.placement(mesh.devices, i)) if n]
        return f"{name}={mesh.shape[name]}" + (f" ({'; '.join(notes)})" if notes else "")

    axes = " ".join(axis(i, name) for i, name in enumerate(mesh.axis_names))
    kind = mesh.devices.flat[0].device_kind
    return (f"{axes} over {mesh.devices.size} {kind} devices ({jax.process_count()} "
            f"process{'es' if jax.process_count() > 1 else ''})")


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    """Reject a global batch the data-parallel devices or the processes cannot split evenly."""
    dp = data_parallel_size(mesh)
    if global_batch % dp:
        raise ConfigError(f"batch_size={global_batch} is not divisible by the data-parallel size "
                          f"{dp} (mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
    if global_batch % jax.process_count():
        raise ConfigError(f"batch_size={global_batch} is not divisible by the number of "
                          f"processes {jax.process_count()}")


# ----------------------------------------------------------------------------- parameters


def logical_specs(cfg: QuietStarConfig) -> dict:
    """Logical axis names (a PartitionSpec per leaf) of the Quiet-STaR parameter tree."""
    head = jax.eval_shape(
        lambda r: MixingHead(cfg.model.d_model, cfg.model.param_dtype).init(
            r, jnp.zeros((1, cfg.model.d_model)), jnp.zeros((1, cfg.model.d_model))),
        jax.random.key(0))["params"]
    return {
        "decoder": nn.get_partition_spec(abstract_params(cfg.model)),
        "start_embedding": P("embed"),
        "end_embedding": P("embed"),
        "mixing_head": nn.get_partition_spec(head),
    }


def _divisible(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """`spec` with every mesh axis dropped from a dimension it does not divide evenly."""
    fixed = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        fixed.append(axes if dim % math.prod(mesh.shape[a] for a in names) == 0 else None)
    return P(*fixed)


def shardings(logical: Any, abstract: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree of logical PartitionSpecs and matching shapes (evenly split)."""
    mesh_specs = nn.logical_to_mesh(logical, RULES)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, _divisible(spec, x.shape, mesh)),
        mesh_specs, abstract, is_leaf=lambda x: isinstance(x, P))


def optimizer_shardings(optimizer: optax.GradientTransformation, abstract_opt_state: Any,
                        param_shardings: Any, mesh: Mesh) -> Any:
    """Optimizer state laid out like the parameters it mirrors; scalars (counts) replicated."""
    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(
        optimizer, lambda _, s: s, abstract_opt_state, param_shardings,
        transform_non_params=lambda _: replicated)


def put(tree: Any, tree_shardings: Any) -> Any:
    """device_put each host leaf with its sharding, one at a time, each into its own buffers
    (two leaves may be one host array, and the train step donates them separately)."""
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), tree, tree_shardings)


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Sequences (dimension `batch_axis`) split over data x fsdp, everything else whole."""
    return NamedSharding(mesh, P(*(None,) * batch_axis, BATCH_AXES))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh,
                 batch_axis: int = 0) -> dict[str, jax.Array]:
    """Global arrays from this process's rows of each field (dimension `batch_axis` is split)."""
    sharding = batch_sharding(mesh, batch_axis)
    out = {}
    for name, rows in local.items():
        rows = np.asarray(rows)
        shape = list(rows.shape)
        shape[batch_axis] *= jax.process_count()
        out[name] = jax.make_array_from_process_local_data(sharding, rows, tuple(shape))
    return out
