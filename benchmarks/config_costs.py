"""Each config's wall time and peak memory on this machine, run as a user runs it.

    python benchmarks/config_costs.py                       # tiny, known_answer, demo
    python benchmarks/config_costs.py experiment --steps 3  # a shortened run: its peak memory

Each command runs in a new temporary workdir: `train` for configs that train one model, and
`experiment` with one seed (every arm, and the base model where the config has one) for the
experiment configs. The peak is the largest resident set of the command's process tree, sampled
every 0.2 s. `--steps N` sets train_steps (and the base model's) to N: the peak of a step is
reached in the first ones, but the time is then not the config's. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import psutil

COMMANDS = {  # config -> the command's module and flags, with one seed for the experiments
    "tiny": ("qstar_jax.train", []),
    "known_answer": ("qstar_jax.experiment", ["--seeds=0"]),
    "demo": ("qstar_jax.experiment", ["--seeds=0"]),
    "experiment": ("qstar_jax.experiment", ["--seeds=0"]),
}
BASE_STEPS = {"known_answer": "--config.base_model.train_steps"}  # configs with a base model


def peak_run(argv: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak resident GiB of the process tree, exit status) of a command."""
    began = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.2)
    if proc.returncode:
        print(proc.stderr.read()[-2000:], file=sys.stderr)
    return time.perf_counter() - began, peak / 2**30, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", default=["tiny", "known_answer", "demo"],
                        choices=list(COMMANDS))
    parser.add_argument("--steps", type=int, help="train_steps for a shortened run")
    args = parser.parse_args()
    results = {}
    for name in args.configs:
        module, extra = COMMANDS[name]
        steps = [] if args.steps is None else [f"--config.train_steps={args.steps}"] + (
            [f"{BASE_STEPS[name]}={args.steps}"] if name in BASE_STEPS else [])
        with tempfile.TemporaryDirectory() as workdir:
            seconds, gib, status = peak_run([
                sys.executable, "-m", module, f"--config=configs/{name}.py",
                f"--workdir={workdir}/run", *extra, *steps])
        results[name] = {"command": f"{module} {' '.join(extra + steps)}".strip(),
                         "seconds": round(seconds, 1), "peak_gib": round(gib, 2),
                         "exit_status": status}
        print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)
    print(json.dumps({"load_average": os.getloadavg(), "cpus": os.cpu_count(),
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
