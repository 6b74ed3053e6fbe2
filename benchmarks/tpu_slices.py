"""Per-device memory of a config's train step on every TPU v4 slice, compiled here with libtpu.

    python benchmarks/tpu_slices.py                                  # Mistral-7B, v4-8 .. v4-512
    python benchmarks/tpu_slices.py --slices v4-128 --seq_lens 256,4096 --model qwen3-8b

Runs `python -m qstar_jax.train --config=CONFIG --compile_only=SLICE` once per slice and length,
each in a process of its own (a 7B compile holds about 8 GiB of host memory), with .venv/libtpu
on PYTHONPATH, no mesh flags: the mesh is the one the run chooses and lays on the slice's torus.
Prints one JSON object: per slice and length the mesh, its line's physical axes, and XLA's
argument / temporary / total GiB per device against the HBM, or the compiler's refusal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLICES = ("v4-8", "v4-16", "v4-32", "v4-64", "v4-128", "v4-256", "v4-512")


def compile_one(config: str, model: str, accelerator: str, seq_len: int,
                extra: list[str]) -> dict:
    """The --compile_only report of one slice and length (its JSON line, or the error line)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / ".venv" / "libtpu")])}
    argv = [sys.executable, "-m", "qstar_jax.train", f"--config={config}",
            f"--compile_only={accelerator}", f"--config.model.path={model}",
            f"--config.seq_len={seq_len}", *extra]
    began = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = round(time.perf_counter() - began, 1)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    report = json.loads(lines[-1]) if lines else {}
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    keep = ("mesh_line", "argument_gib", "temp_gib", "total_gib", "hbm_gib", "fits", "compile_s")
    return {**{k: report.get(k) for k in keep}, "wall_s": seconds, "exit_status": proc.returncode,
            **({"error": errors[-1]} if errors else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tpu_v4.py")
    parser.add_argument("--model", default="mistral-7b", help="model.path: a named shape or dir")
    parser.add_argument("--slices", default=",".join(SLICES))
    parser.add_argument("--seq_lens", default="256,4096")
    parser.add_argument("extra", nargs="*", help="more train flags, e.g. --config.KEY=VALUE")
    args = parser.parse_args()
    if not (ROOT / ".venv" / "libtpu" / "libtpu").is_dir():
        sys.exit("error: no .venv/libtpu: make setup installs it (or pip install --target "
                 ".venv/libtpu --no-deps libtpu==0.0.51)")
    out = {}
    for accelerator in args.slices.split(","):
        for seq_len in map(int, args.seq_lens.split(",")):
            out[f"{accelerator} L{seq_len}"] = compile_one(args.config, args.model, accelerator,
                                                           seq_len, args.extra)
            print(json.dumps({f"{accelerator} L{seq_len}": out[f"{accelerator} L{seq_len}"]}),
                  file=sys.stderr, flush=True)
    print(json.dumps({"config": args.config, "model": args.model, "results": out}, indent=1))


if __name__ == "__main__":
    main()
