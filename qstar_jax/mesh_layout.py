"""Where the mesh's axes lie on a TPU slice's physical torus: each mesh axis gets whole physical
axes or parts of them, tensor parallelism the closest chips.

`jax.make_mesh` gives each mesh axis whole physical axes and fails when a size is not a product
of them (an 8 on a 4x4x4 v4-128). Here every split of the physical axes among the mesh axes is
tried: a physical axis of 4 may carry tensor 2 inside fsdp 2, the tensor part the faster-varying
one, so that each tensor group's chips are neighbours. Of the splits that fit, the one whose
tensor group spans the fewest hops wins, then the one whose fsdp group does, then the one that
splits the fewest physical axes (whole axes keep their wraparound links for ring collectives).

Devices without coordinates (CPU, GPU) have no torus: `layout` returns None for them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

PHYSICAL_NAMES = "xyzc"  # torus axes by coordinate, then the cores of one chip if several


def physical_shape(devices: Sequence[Any]) -> tuple[int, ...] | None:
    """The torus the devices fill ((x, y, z), and the cores of a chip where a chip has several
    devices), or None when they have no coordinates or do not fill a box one device a place."""
    if not devices or not all(hasattr(d, "coords") for d in devices):
        return None
    places = [_place(d) for d in devices]
    shape = tuple(max(p[i] for p in places) + 1 for i in range(len(places[0])))
    if math.prod(shape) != len(devices) or len(set(places)) != len(devices):
        return None
    return shape


def _place(device: Any) -> tuple[int, ...]:
    return (*device.coords, getattr(device, "core_on_chip", 0))


def _hops(part: int, whole: int) -> int:
    """Hops between the farthest two chips of `part` consecutive ones on a ring of `whole`."""
    return whole // 2 if part == whole and whole > 2 else part - 1


def _factorings(n: int, bounds: Sequence[int]) -> list[tuple[int, ...]]:
    """Each way to write n as a product of one divisor of each bound, in order."""
    if not bounds:
        return [()] if n == 1 else []
    return [(f, *rest) for f in range(1, bounds[0] + 1)
            if bounds[0] % f == 0 and n % f == 0
            for rest in _factorings(n // f, bounds[1:])]


def assignment(mesh_shape: Sequence[int], torus: Sequence[int]) -> np.ndarray:
    """[physical axis, mesh axis] -> the part of that physical axis the mesh axis gets (rows
    multiply to `torus`, columns to `mesh_shape`), mesh axes ordered as the mesh's, the last the
    most communication-heavy (tensor)."""
    best, best_cost = None, None
    tensor, *outer = reversed(range(len(mesh_shape)))  # tensor first, then fsdp, then data
    for t in _factorings(mesh_shape[tensor], torus):
        left = [p // f for p, f in zip(torus, t, strict=True)]
        for parts in _outer_parts([mesh_shape[i] for i in outer], left):
            columns = {tensor: t, **dict(zip(outer, parts, strict=True))}
            table = np.array([columns[i] for i in range(len(mesh_shape))]).T
            cost = (*(sum(_hops(f, p) for f, p in zip(table[:, i], torus, strict=True))
                      for i in (tensor, *outer)),
                    sum(1 for row, p in zip(table, torus, strict=True) for f in row if 1 < f < p))
            if best_cost is None or cost < best_cost:
                best, best_cost = table, cost
    if best is None:  # the device count is not the mesh's: mesh_shape checked it before
        raise ValueError(f"mesh {tuple(mesh_shape)} does not fit the torus {tuple(torus)}")
    return best


def _outer_parts(sizes: list[int], left: list[int]) -> list[list[tuple[int, ...]]]:
    if not sizes:
        return [[]] if all(p == 1 for p in left) else []
    return [[f, *rest] for f in _factorings(sizes[0], left)
            for rest in _outer_parts(sizes[1:], [p // g for p, g in zip(left, f, strict=True)])]


def layout(mesh_shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray | None:
    """The devices as an array of `mesh_shape`, laid on their torus by `assignment`, or None when
    they have no torus (`physical_shape`)."""
    torus = physical_shape(devices)
    if torus is None:
        return None
    table = assignment(mesh_shape, torus)
    out = np.empty(tuple(mesh_shape), dtype=object)
    for device in devices:
        index = [0] * len(mesh_shape)
        for p, c in enumerate(_place(device)):
            # A physical coordinate as digits, the last mesh axis's the fastest-varying.
            for i in reversed(range(len(mesh_shape))):
                index[i] = index[i] * table[p, i] + c % table[p, i]
                c //= table[p, i]
        out[tuple(index)] = device
    return out


def placement(devices_array: np.ndarray, axis: int) -> str:
    """The physical axes the devices along mesh axis `axis` span (from index 0 of the others),
    e.g. "x 4, y 2 of 4"; "" where the devices have no torus."""
    torus = physical_shape(list(devices_array.flat))
    if torus is None or devices_array.shape[axis] == 1:
        return ""
    line = devices_array[tuple(slice(None) if i == axis else 0
                               for i in range(devices_array.ndim))]
    spans = [len({_place(d)[p] for d in line}) for p in range(len(torus))]
    return ", ".join(f"{PHYSICAL_NAMES[p]} {n}" + (f" of {torus[p]}" if n < torus[p] else "")
                     for p, n in enumerate(spans) if n > 1)

