"""benchmarks/step_products.py counts the products a compiled program runs."""

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _bench():
    sys.path.insert(0, str(BENCHMARKS))  # its imports of train_step and naive_rollout
    try:
        spec = importlib.util.spec_from_file_location("step_products",
                                                      BENCHMARKS / "step_products.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_products_counted_through_nested_loops():
    """One product outside any loop, one in a loop of 5, one in a loop of 3 inside it: run 1, 5
    and 15 times, whatever XLA makes of the loops."""
    bench = _bench()

    def f(x, w_outer, w_inner):
        y = x @ w_outer.T  # [8, 16] x [12, 16]^T, once

        def outer(h, _):
            h = jnp.tanh(h @ w_outer)  # [8, 12] x [12, 16], 5 times

            def inner(g, _):
                return jnp.tanh(g @ w_inner), None  # [8, 16] x [16, 16], 15 times

            h, _ = jax.lax.scan(inner, h, None, length=3)
            return h[:, :12], None

        h, _ = jax.lax.scan(outer, y, None, length=5)
        return h

    args = (jnp.ones((8, 16)), jnp.ones((12, 16)), jnp.ones((16, 16)))
    hlo = jax.jit(f).lower(*args).compile().as_text()
    counts = {}
    for product, n in bench.executed_products(hlo).items():
        key = (product.lhs, product.rhs)
        counts[key] = counts.get(key, 0) + n
    assert counts == {((8, 16), (12, 16)): 1, ((8, 12), (12, 16)): 5, ((8, 16), (16, 16)): 15}
    by_shape = {(p.lhs, p.rhs): p for p in bench.executed_products(hlo)}
    # 2 * 8 * 16 * 12: [8, 16] contracted with [12, 16] over the 16.
    assert bench.product_flops(by_shape[((8, 16), (12, 16))]) == 3072


def test_a_conditional_counts_its_cheapest_branch():
    """lax.cond between one [8, 16] x [16, 16] product and three: counted once, not four times
    (the branch taken is known only at run time; the cheaper one is what the step runs)."""
    bench = _bench()

    def f(pred, x, w):
        return jax.lax.cond(pred, lambda x: x @ w, lambda x: x @ w @ w @ w, x)

    hlo = jax.jit(f).lower(True, jnp.ones((8, 16)), jnp.ones((16, 16))).compile().as_text()
    assert "conditional" in hlo
    assert sum(bench.executed_products(hlo).values()) == 1
