"""The `convert` command line: GGUF -> Hugging Face, training workdir -> Hugging Face, inspect.

    python -m qstar_jax.convert --help
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from qstar_jax import gguf_checkpoint, hf_checkpoint, loading
from qstar_jax.errors import InputError


def _run_from_gguf(args: argparse.Namespace) -> None:
    cfg, params, tok = gguf_checkpoint.from_gguf(args.gguf)
    hf_checkpoint.to_hf(params, cfg, args.out, tokenizer=tok, dtype=args.dtype)
    print(f"wrote {args.out} ({cfg.num_params:,} parameters)")


def _run_to_hf(args: argparse.Namespace) -> None:
    step = loading.export_checkpoint(args.checkpoint, args.step, args.out, args.dtype, args.ema)
    what = "the EMA parameters of step" if args.ema else "step"
    print(f"wrote {what} {step} of {args.checkpoint} to {args.out} ({args.dtype})")


def _run_inspect(args: argparse.Namespace) -> None:
    cfg, count, n_files, settings = hf_checkpoint.inspect(args.path)
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    print(f"parameters: {count:,} in {n_files} file(s)")
    if settings is not None:
        print("quiet-star:", json.dumps(settings, indent=2))


def _add_from_gguf(verbs) -> None:
    p = verbs.add_parser("from-gguf", help="GGUF file -> HF directory with tokenizer")
    p.add_argument("--gguf", required=True, help="llama-architecture .gguf file")
    p.add_argument("--out", required=True, help="new directory to write")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.set_defaults(run=_run_from_gguf)


def _add_to_hf(verbs) -> None:
    p = verbs.add_parser("to-hf", help="training checkpoint -> HF directory with tokenizer and "
                                       "Quiet-STaR settings")
    p.add_argument("--checkpoint", required=True,
                   help="training workdir (local or gs://) holding config.json and checkpoints/")
    p.add_argument("--step", type=int, default=None, help="saved step to export (default: newest)")
    p.add_argument("--out", required=True, help="new directory to write")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--ema", action="store_true",
                   help="an RLP run: write its EMA parameters (the no-think baseline) instead")
    p.set_defaults(run=_run_to_hf)


def _add_inspect(verbs) -> None:
    p = verbs.add_parser("inspect", help="print an HF directory's config and parameter count")
    p.add_argument("--path", required=True, help="HF checkpoint directory")
    p.set_defaults(run=_run_inspect)


VERBS = [_add_from_gguf, _add_to_hf, _add_inspect]  # each adds one subcommand to the parser
CLI_HELP = """Convert checkpoints. Subcommands (VERB --help for each one's flags):
  from-gguf  a GGUF file (llama architecture) -> a Hugging Face directory with its tokenizer
  to-hf      a training workdir's saved step -> a Hugging Face directory, with the Quiet-STaR
             weights and settings and the tokenizer
  inspect    print a Hugging Face directory's config and parameter count

  python -m qstar_jax.convert to-hf --checkpoint runs/tiny --out runs/tiny_hf"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qstar_jax.convert", description=CLI_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(metavar="VERB", required=True)
    for add in VERBS:
        add(verbs)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except InputError as e:  # a user mistake is one line; anything else keeps its traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
