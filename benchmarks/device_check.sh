#!/usr/bin/env bash
# One accelerator check: the Quiet-STaR training step of `gpu_1b` (TinyLlama-1.1B's shape, bf16,
# batch 8 x L 256) and the same model's plain LM step (n_ahead 1): step time, tokens/s, MFU and
# what the thoughts cost; then decode ms/token with and without thinking. Prints one JSON object.
#
#     bash benchmarks/device_check.sh           # on a machine with one H100/H200 and JAX+CUDA
#     bash benchmarks/device_check.sh --small   # the `cpu` setups: checks the script on a CPU
#
# A machine without ml_collections gets it from benchmarks/wheels/ (nothing else the check
# imports is missing from a JAX+CUDA image). Sized to finish within 8 minutes on one H100.
set -euo pipefail
cd "$(dirname "$0")/.."
config=gpu_1b
steps=10
if [[ "${1:-}" == "--small" ]]; then config=cpu; steps=2; fi
python=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$python" -c "import ml_collections" 2>/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/qstar_site \
    benchmarks/wheels/*.whl >&2
  export PYTHONPATH="$PYTHONPATH:/tmp/qstar_site"
fi
out=$(mktemp -d)
"$python" benchmarks/train_step.py --config "$config" --steps "$steps" --skip_naive >"$out/quiet_star.json"
"$python" benchmarks/train_step.py --config "$config" --steps "$steps" --plain >"$out/plain.json"
"$python" benchmarks/generate.py --config "$config" --contexts 256 --tokens 32 --cached_only \
  >"$out/decode.json"
"$python" - "$out" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
runs = {name: json.loads((out / f"{name}.json").read_text()) for name in ("quiet_star", "plain")}
decode = json.loads((out / "decode.json").read_text())
step = {name: {k: r["ours"].get(k) for k in ("step_s", "tokens_per_s", "mfu", "memory_gib")}
        | {"model_flops_per_step": r["model_flops_per_step"]} for name, r in runs.items()}
row = decode["contexts"]["256"]
print(json.dumps({
    "device": runs["quiet_star"]["device"], "jax": runs["quiet_star"]["jax"],
    "config": runs["quiet_star"]["config"], "model": runs["quiet_star"]["model"],
    "batch_length": [runs["quiet_star"]["quiet_star"][k] for k in ("batch", "length")],
    "step": step,
    "quiet_star_over_plain_step_s": round(step["quiet_star"]["step_s"] / step["plain"]["step_s"], 2),
    "decode_ms_per_token_context_256": {
        "no_thinking": row["ms_per_token_no_thinking"],
        "thinking_sampled": row["sampled_thoughts"]["ms_per_token_thinking"],
        "thinking_greedy": row["greedy_thoughts"]["ms_per_token_thinking"]},
}, indent=2))
PY
