"""The `convert` command line: GGUF -> Hugging Face, training workdir -> Hugging Face, inspect.

    python -m qstar_jax.convert VERB --flag=value ...   (VERB --help lists its flags)
    python -m qstar_jax.convert to-hf --checkpoint runs/tiny --out runs/tiny_hf
"""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
from collections.abc import Callable, Sequence

from absl import flags

from qstar_jax import (
    checkpoint,
    cli,
    gguf_checkpoint,
    hf_checkpoint,
    loading,
    outputs,
    run_settings,
)

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Verb:
    """One subcommand: what it does (its line of --help), its flags and what runs it."""

    summary: str
    define: Callable[[flags.FlagValues], None]
    run: Callable[[flags.FlagValues], None]
    required: tuple[str, ...]


def _define_from_gguf(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("gguf", None, "llama-architecture .gguf file (required)", flag_values=fv)
    flags.DEFINE_string("out", None, "new directory to write (required)", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", DTYPES, "dtype of the written weights", flag_values=fv)


def _run_from_gguf(fv: flags.FlagValues) -> None:
    outputs.check_output_dir(fv.out)
    cfg, params, tok = gguf_checkpoint.from_gguf(fv.gguf)
    hf_checkpoint.to_hf(params, cfg, fv.out, tokenizer=tok, dtype=fv.dtype)
    print(f"wrote {fv.out} ({cfg.num_params:,} parameters)")


def _define_to_hf(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "training workdir (local or gs://) holding "
                        "config.json and checkpoints/ (required)", flag_values=fv)
    flags.DEFINE_integer("step", None, "saved step to export (default: the newest readable)",
                         flag_values=fv)
    flags.DEFINE_string("out", None, "new directory to write (required)", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", DTYPES, "dtype of the written weights", flag_values=fv)
    flags.DEFINE_bool("ema", False, "an RLP run: write its EMA parameters (the no-think "
                      "baseline) instead", flag_values=fv)


def _run_to_hf(fv: flags.FlagValues) -> None:
    outputs.check_output_dir(fv.out)
    step = loading.export_checkpoint(fv.checkpoint, fv.step, fv.out, fv.dtype, fv.ema)
    what = "the EMA parameters of step" if fv.ema else "step"
    print(f"wrote {what} {step} of {fv.checkpoint} to {fv.out} ({fv.dtype})")


def _define_inspect(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("path", None, "Hugging Face directory or training workdir (required)",
                        flag_values=fv)


def _run_inspect(fv: flags.FlagValues) -> None:
    if checkpoint.is_workdir(fv.path):
        _inspect_workdir(fv.path)
        return
    cfg, count, stored, n_files, settings = hf_checkpoint.inspect(fv.path)
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    kept = "" if stored == count else (
        f"; {stored:,} stored: start_embedding and end_embedding keep the authors' unused "
        "second row")
    print(f"parameters: {count:,} (the model's, as train counts them) in {n_files} file(s)"
          f"{kept}")
    if settings is not None:
        print("quiet-star:", json.dumps(settings, indent=2))


def _inspect_workdir(workdir: str) -> None:
    """A training workdir's newest saved step and model settings, and how to export it."""
    config = run_settings.load_config(workdir)
    step = checkpoint.saved_step(workdir)
    print(f"{workdir}: a training workdir, newest saved step {step}; python -m "
          f"qstar_jax.convert to-hf --checkpoint {workdir} --out DIR exports it")
    print("model:", json.dumps(config.model.to_dict(), indent=2))
    print("quiet-star:", json.dumps(config.quiet_star.to_dict(), indent=2))


VERBS = {
    "from-gguf": Verb("a GGUF file (llama architecture) -> a Hugging Face directory with its "
                      "tokenizer", _define_from_gguf, _run_from_gguf, ("gguf", "out")),
    "to-hf": Verb("a training workdir's saved step -> a Hugging Face directory, with the "
                  "Quiet-STaR weights and settings and the tokenizer", _define_to_hf, _run_to_hf,
                  ("checkpoint", "out")),
    "inspect": Verb("print a Hugging Face directory's config and parameter count, or a training "
                    "workdir's newest step and settings", _define_inspect, _run_inspect,
                    ("path",)),
}


def _usage() -> str:
    """The module doc and one line per subcommand."""
    verbs = "\n".join(textwrap.fill(verb.summary, 96, initial_indent=f"  {name:<10} ",
                                     subsequent_indent=" " * 13) for name, verb in VERBS.items())
    return f"{__doc__.strip()}\n\nSubcommands:\n{verbs}"


def main(argv: Sequence[str] | None = None) -> None:
    """Run the subcommand named first in `argv` (None: sys.argv[1:]) with its flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in cli.HELP_FLAGS:
        print(_usage())
        sys.exit(0)
    if not argv or argv[0] not in VERBS:
        named = f"unknown subcommand {argv[0]!r}" if argv and not argv[0].startswith("-") \
            else "no subcommand"
        cli.fail(f"{named}: name one of {', '.join(VERBS)} first (python -m qstar_jax.convert "
                 "--help)", cli.USAGE)
    verb = VERBS[argv[0]]
    fv = flags.FlagValues()
    verb.define(fv)
    doc = textwrap.fill(f"python -m qstar_jax.convert {argv[0]}: {verb.summary}", 96)
    cli.parse_command(fv, argv[1:], doc, verb.required)
    with cli.one_line_errors():
        verb.run(fv)


if __name__ == "__main__":
    main()
