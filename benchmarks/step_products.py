"""The matrix products of our compiled training step, timed alone: the floor they set for the step.

    python benchmarks/step_products.py [--repeats 7]

Reads every dot of the compiled step (`train_step.py`'s `cpu` setup) in XLA's optimised HLO and
how many times it runs (loop trip counts), then times one jitted program that runs each product
that many times back to back, on random operands, and our step itself, in turns. Prints one JSON
object: the products' GFLOP, their time alone, the step's time, and the step over its products.
See README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from train_step import compiled_ours  # benchmarks/ is on the path


class Product(NamedTuple):
    """One dot: operand shapes, element type and dimension numbers."""

    lhs: tuple[int, ...]
    rhs: tuple[int, ...]
    dtype: str  # HLO's name: f32, bf16, ...
    lhs_contract: tuple[int, ...]
    rhs_contract: tuple[int, ...]
    lhs_batch: tuple[int, ...]
    rhs_batch: tuple[int, ...]

    @property
    def dimension_numbers(self) -> tuple:
        return (self.lhs_contract, self.rhs_contract), (self.lhs_batch, self.rhs_batch)


_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%(\S+) = ")
_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16, "f64": jnp.float64}


def _split_type(rest: str) -> tuple[str, str]:
    """(type, remainder) of an instruction's right-hand side; tuple types hold spaces."""
    if not rest.startswith("("):
        head, _, tail = rest.partition(" ")
        return head, tail
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return rest[:i + 1], rest[i + 2:]
    raise ValueError(f"unbalanced type in HLO: {rest[:80]}")


def _shape(hlo_type: str) -> tuple[str, tuple[int, ...]]:
    match = re.match(r"(\w+)\[([\d,]*)\]", hlo_type)
    if match is None:
        raise ValueError(f"not an array type: {hlo_type[:80]}")
    return match.group(1), tuple(int(d) for d in match.group(2).split(",") if d)


def _dims(line: str, key: str) -> tuple[int, ...]:
    match = re.search(key + r"=\{([\d,]*)\}", line)
    return tuple(int(d) for d in match.group(1).split(",") if d) if match else ()


def parse_computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """Instruction lines of each computation of an HLO module, and the entry's name."""
    computations, current, entry = {}, None, None
    for line in hlo.splitlines():
        header = re.match(r"^(ENTRY )?%(\S+) ", line)
        if header and line.rstrip().endswith("{"):
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and _INSTRUCTION.match(line):
            computations[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def executed_products(hlo: str) -> Counter:
    """How many times one run of the module executes each dot, by its shapes and dimensions."""
    computations, entry = parse_computations(hlo)
    counts: Counter = Counter()

    def walk(name: str, times: int) -> None:
        shapes = {}
        for line in computations[name]:
            target = _INSTRUCTION.match(line).group(1)
            hlo_type, rest = _split_type(line[_INSTRUCTION.match(line).end():])
            if not hlo_type.startswith("("):
                shapes[target] = _shape(hlo_type)
            opcode = re.match(r"[\w-]+", rest).group(0)
            if opcode == "dot":
                lhs, rhs = re.findall(r"%([\w.\-]+)", rest.split(")")[0])[:2]
                (dtype, lhs_shape), (_, rhs_shape) = shapes[lhs], shapes[rhs]
                counts[Product(lhs_shape, rhs_shape, dtype, _dims(line, "lhs_contracting_dims"),
                               _dims(line, "rhs_contracting_dims"), _dims(line, "lhs_batch_dims"),
                               _dims(line, "rhs_batch_dims"))] += times
            elif opcode == "conditional":
                # Which branch runs is decided at run time; count the one of fewest FLOPs. In
                # the step that is the policy gradient's row branch (`rollout.policy_logprobs`),
                # the one taken when only the REINFORCE term reaches the thought log-probs.
                listed = re.search(r"branch_computations=\{([^}]*)\}", line)
                branches = re.findall(r"%([\w.\-]+)", listed.group(1)) if listed else \
                    re.findall(r"(?:true|false)_computation=%([\w.\-]+)", line)
                if not branches:
                    raise ValueError(f"conditional {target}: no branch computations found")
                counted = [_walked(branch) for branch in branches]
                cheapest = min(counted, key=lambda c: sum(
                    product_flops(p) * n for p, n in c.items()))
                for product, n in cheapest.items():
                    counts[product] += n * times
            elif opcode == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                if trips is None:
                    raise ValueError(f"while loop {target} has no known trip count")
                walk(re.search(r"body=%([\w.\-]+)", line).group(1), times * int(trips.group(1)))
            else:
                for called in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line):
                    walk(called, times)

    def _walked(name: str) -> Counter:
        """The products one run of computation `name` executes, counted apart."""
        nonlocal counts
        outer, counts = counts, Counter()
        walk(name, 1)
        counts, inner = outer, counts
        return inner

    walk(entry, 1)
    return counts


def product_flops(product: Product) -> int:
    """2 x (batch x lhs free x contracted) x rhs free."""
    return 2 * math.prod(product.lhs) * math.prod(
        d for i, d in enumerate(product.rhs)
        if i not in product.rhs_contract + product.rhs_batch)


def products_program(counts: Counter, with_products: bool) -> Callable[[list], jax.Array]:
    """jit(f(operands) -> scalar): each product run its count of times in a fori_loop.

    The smaller operand is scaled by a loop-carried scalar so that no product is hoisted out of
    its loop; `with_products=False` runs only that scaling (the control, subtracted)."""
    products = list(counts)

    def run(operands):
        acc = jnp.zeros((), jnp.float32)
        for product, (a, b) in zip(products, operands, strict=True):

            def body(_, acc, a=a, b=b, dims=product.dimension_numbers):
                nudge = (1 + acc * 1e-30).astype(a.dtype)
                if a.size <= b.size:
                    a = scaled = a * nudge
                else:
                    b = scaled = b * nudge
                if not with_products:
                    return acc + 1e-30 * jnp.sum(scaled).astype(jnp.float32)
                out = jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
                return acc + 1e-30 * out.reshape(-1)[0]

            acc = jax.lax.fori_loop(0, counts[product], body, acc)
        return acc

    return jax.jit(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if jax.default_backend() != "cpu":
        parser.error(f"reads the CPU backend's dots; this backend is {jax.default_backend()} "
                     "(other backends rewrite products into library calls)")

    compiled, _, (params, opt_state, batch, rng) = compiled_ours("cpu", remat_passes=True)
    counts = executed_products(compiled.as_text())
    keys = iter(jax.random.split(jax.random.key(2), 2 * len(counts)))
    operands = [tuple(jax.random.normal(next(keys), shape, _DTYPES[p.dtype])
                      for shape in (p.lhs, p.rhs)) for p in counts]
    timed = {"products": products_program(counts, True), "control": products_program(counts, False)}

    def step():
        nonlocal params, opt_state
        params, opt_state, _ = compiled(params, opt_state, batch, rng)
        return params

    runs = {name: (lambda f=f: f(operands)) for name, f in timed.items()} | {"step": step}
    times = {name: [] for name in runs}
    for run in runs.values():  # compile and warm up
        jax.block_until_ready(run())
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append(time.perf_counter() - start)
    median = {name: float(np.median(t)) for name, t in times.items()}
    products_s = median["products"] - median["control"]
    gflop = sum(n * product_flops(p) for p, n in counts.items()) / 1e9
    print(json.dumps({
        "config": "cpu", "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "repeats": args.repeats, "distinct_products": len(counts),
        "products_run": sum(counts.values()), "products_gflop": round(gflop, 1),
        "products_s": round(products_s, 3), "products_gflop_per_s": round(gflop / products_s, 1),
        "control_s": round(median["control"], 4), "step_s": round(median["step"], 3),
        "step_over_products": round(median["step"] / products_s, 2),
        "all_s": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
