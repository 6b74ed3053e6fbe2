"""The command lines' flags, --help and one-line errors, with one exit-code rule for every command.

Every command takes absl flags (`--flag=value` or `--flag value`; booleans `--flag`, `--noflag`,
`--flag=false`). Exit 2 (USAGE): the command line itself is wrong (a flag unknown, missing or of
a bad value, an unknown --config key, a config that does not load). Exit 1 (FOUND): what the
command finds wrong as it runs (an `InputError` such as a missing checkpoint, or `RunStopped`).
Exit 130 (INTERRUPTED): Ctrl-C that stopped the work at once (training saves on a first Ctrl-C;
`checkpoint.Checkpoints`).
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator, Sequence

import ml_collections
from absl import flags

from qstar_jax.errors import InputError, RunStopped

USAGE, FOUND = 2, 1  # the exit codes of a command-line mistake and of one found at run time
INTERRUPTED = 130  # the shell's for SIGINT
HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")
RENAMED = {"no_thoughts": "--nothoughts"}  # spellings of the earlier argparse flags


def fail(message: str, code: int = FOUND) -> None:
    """Print a one-line error and exit with `code`."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


@contextlib.contextmanager
def one_line_errors(code: int = FOUND) -> Iterator[None]:
    """Around a command's work: a user mistake (`InputError`) or a run that stopped short
    (`RunStopped`) is its one-line message and exit `code`, and Ctrl-C one line and exit
    INTERRUPTED; any other exception is a bug and propagates with its traceback."""
    try:
        yield
    except (InputError, RunStopped) as e:
        fail(str(e), code)
    except KeyboardInterrupt:
        fail("stopped at once by Ctrl-C; what was saved before (checkpoints, files written) "
             "is kept", INTERRUPTED)


def parse_command(flag_values: flags.FlagValues, argv: Sequence[str] | None, doc: str,
                  required: Sequence[str] = ()) -> None:
    """Parse a command's own flags from `argv` (no program name; None: sys.argv[1:]).

    --help prints `doc` and the flags and exits 0; a flag unknown, renamed, of a bad value or
    `required` and missing, or an argument that is no flag, is one line and exit USAGE.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in HELP_FLAGS for a in argv):
        _help(doc, _flags_help(flag_values.get_help(include_special_flags=False)))
        sys.exit(0)
    try:
        rest = flag_values(["", *argv])[1:]
    except flags.UnrecognizedFlagError as e:
        new = RENAMED.get(e.flagname)
        fail(f"--{e.flagname} is now {new}" if new else str(e), USAGE)
    except (flags.Error, ValueError) as e:  # ValueError: a value given to --noFLAG
        fail(str(e), USAGE)
    if rest:
        fail(f"unexpected arguments: {' '.join(rest)} (a flag's value with spaces needs quotes)",
             USAGE)
    missing = [f"--{name}" for name in required if flag_values[name].value is None]
    if missing:
        fail(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required", USAGE)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing of the global FLAGS (train, experiment) with one-line errors: a bad
    flag, an unknown --config.KEY (config_flags raises a bare KeyError/AttributeError for some),
    a config file or preset that does not load; and a --help that exits 0 and shows the
    config's keys."""
    if any(a in HELP_FLAGS for a in argv[1:]):
        _help(sys.modules["__main__"].__doc__ or "",
              _flags_help(flags.FLAGS.main_module_help()))
        _config_help([a for a in argv if a not in HELP_FLAGS])
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        fail(_config_problem(e) or str(e), USAGE)
    except (AttributeError, KeyError) as e:
        message = str(e)  # the key's name, quoted and escaped, and maybe a suggestion
        plain = message.replace("\\", "")
        named = [a.split("=", 1)[0] for a in argv if a.startswith("--config.") and any(
            f"'{part}'" in plain for part in a.split("=", 1)[0].split(".")[1:])]
        guess = re.search(r'Did you mean "([^"]+)"', message)
        hint = f" (did you mean {guess.group(1)!r}?)" if guess else ""
        fail(f"unknown config key {named[0] if named else message}{hint}", USAGE)
    _loaded_config()
    return rest


def _config_problem(error: flags.Error) -> str | None:
    """The one line of a --config whose get_config refused its argument: a preset it does not
    know (an InputError), or an argument to a config that takes none. None for anything else
    (a bug in a config file keeps its traceback)."""
    match = re.match(r"flag --config=(.*?): Error whilst parsing config file", str(error), re.S)
    reraised = error.__context__  # config_flags re-raises with the traceback as its text
    original = reraised.__context__ if reraised is not None else None
    if not match or original is None:
        return None
    value = match.group(1)
    path, _, argument = value.partition(":")
    if isinstance(original, InputError):
        return f"--config={value}: {original}"
    if isinstance(original, TypeError) and re.fullmatch(
            r"get_config\(\) takes 0 positional arguments but 1 was given", str(original)):
        return (f"--config={value}: {path} takes no preset or other argument ({argument!r}); "
                f"use --config={path}")
    return None


def _loaded_config() -> ml_collections.ConfigDict | None:
    """--config's ConfigDict (None if not given); a file that does not load is a one-line error
    (config_flags defers it to the first read)."""
    config = flags.FLAGS["config"].value
    try:
        config is None or config.keys()  # a config that failed to load raises on any access
        return config
    except OSError as e:
        cause = str(e.__cause__ or e).strip().splitlines()[-1].strip()
        fail(f"--config: the config file does not load ({cause}); name one of configs/*.py, "
             "for example --config=configs/tiny.py", USAGE)


def _flags_help(absl_help: str) -> str:
    """absl's help of one module's flags, under a plain heading instead of the module's name."""
    lines = absl_help.strip().splitlines()
    return "\n".join(["flags:", *lines[1:]])


def _help(doc: str, flags_help: str) -> None:
    """A command's doc and its flags."""
    print(doc.strip() + "\n")
    print(flags_help)


def _config_help(argv: list[str]) -> None:
    """How to see and set config keys, and with --config=FILE its keys; exits 0."""
    print("\nEvery key of the config file can be set with --config.KEY=VALUE, for example "
          "--config.train_steps=100 --config.quiet_star.n_ahead=8. Each run prints its resolved "
          "config first; --config=FILE --help lists FILE's keys:")
    try:
        flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError):
        sys.exit(0)
    config = flags.FLAGS["config"].present and _loaded_config()
    if config:
        print(config)
    sys.exit(0)
