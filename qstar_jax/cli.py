"""The command lines' one-line errors; for train and experiment also flag parsing and --help."""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator

import ml_collections
from absl import flags

from qstar_jax.errors import InputError, RunStopped


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error and exit with `code`."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


@contextlib.contextmanager
def one_line_errors(code: int = 1) -> Iterator[None]:
    """Around a command's work: a user mistake (`InputError`) or a run that stopped short
    (`RunStopped`) is its one-line message and exit `code`; any other exception is a bug and
    propagates with its traceback."""
    try:
        yield
    except (InputError, RunStopped) as e:
        fail(str(e), code)


HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors: a bad flag, an unknown --config.KEY (config_flags
    raises a bare KeyError/AttributeError for some), a config file that does not load; and a
    --help that exits 0 and shows the config's keys."""
    if any(a in HELP_FLAGS for a in argv[1:]):
        _help([a for a in argv if a not in HELP_FLAGS])
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e), 2)
    except (AttributeError, KeyError) as e:
        message = str(e)  # the key's name, quoted and escaped, and maybe a suggestion
        plain = message.replace("\\", "")
        named = [a.split("=", 1)[0] for a in argv if a.startswith("--config.") and any(
            f"'{part}'" in plain for part in a.split("=", 1)[0].split(".")[1:])]
        guess = re.search(r'Did you mean "([^"]+)"', message)
        hint = f" (did you mean {guess.group(1)!r}?)" if guess else ""
        fail(f"unknown config key {named[0] if named else message}{hint}", 2)
    _loaded_config()
    return rest


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
             "for example --config=configs/tiny.py", 2)


def _help(argv: list[str]) -> None:
    """The program's doc, its flags, and how to see and set config keys; exits 0."""
    print((sys.modules["__main__"].__doc__ or "").strip() + "\n")
    print(flags.FLAGS.main_module_help())
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

