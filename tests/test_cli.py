"""The command lines' errors: a user mistake (the project's error types) is one line and a
non-zero exit; any other exception is a bug and keeps its full traceback.

Each command is run with the function it calls first replaced by one that raises: a
ValueError of the kind JAX raises on a shape mismatch, then a project error of the same place.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qstar_jax import cli, convert, evaluate, generate, loading, visualize
from qstar_jax.errors import CheckpointError, ConfigError, InputError, RunStopped

ROOT = Path(__file__).resolve().parents[1]


def test_one_line_errors_are_the_project_types_only(capsys):
    for error, code in ((ConfigError("batch_size=3: not divisible"), 1),
                        (RunStopped("loss nan at step 9"), 2)):
        with pytest.raises(SystemExit) as e, cli.one_line_errors(code):
            raise error
        assert e.value.code == code
        assert capsys.readouterr().err == f"error: {error}\n"
    for bug in (ValueError("internal shape mismatch"), TypeError("x"), KeyError("y"),
                FileNotFoundError("z")):
        with pytest.raises(type(bug)), cli.one_line_errors():
            raise bug
    assert capsys.readouterr().err == ""


def _argparse_mains(tmp_path: Path) -> list[tuple[str, object, list[str], str]]:
    """(name, module, argv, the module attribute its main calls first that can fail)."""
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"question": "1 + 1?", "answer": "#### 2"}) + "\n")
    text = tmp_path / "page.txt"
    text.write_text("a page of text")
    ckpt = str(tmp_path / "ckpt")
    return [
        ("generate", generate, ["--checkpoint", ckpt, "--prompt", "x"], "load_checkpoint"),
        ("evaluate", evaluate, ["--checkpoint", ckpt, "--task", "gsm8k", "--data", str(data)],
         "load_checkpoint"),
        ("visualize", visualize, ["--checkpoint", ckpt, "--text", str(text), "--out",
                                  str(tmp_path / "r.html")], "load_checkpoint"),
        ("convert", convert, ["to-hf", "--checkpoint", ckpt, "--out", str(tmp_path / "hf")],
         "export_checkpoint"),
    ]


@pytest.mark.parametrize("name", ["generate", "evaluate", "visualize", "convert"])
def test_argparse_mains_let_bugs_through_and_print_mistakes_in_one_line(
        name, tmp_path, monkeypatch, capsys):
    _, module, argv, attribute = next(m for m in _argparse_mains(tmp_path) if m[0] == name)

    def broken(*args, **kwargs):
        raise ValueError("internal shape mismatch")

    monkeypatch.setattr(loading, attribute, broken)
    with pytest.raises(ValueError, match="internal shape mismatch") as e:
        module.main(argv)
    assert not isinstance(e.value, InputError)
    assert e.traceback[-1].name == "broken"

    def mistaken(*args, **kwargs):
        raise CheckpointError(f"{argv[2]}: no such checkpoint directory")

    monkeypatch.setattr(loading, attribute, mistaken)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    assert e.value.code != 0
    message = capsys.readouterr().err if name != "convert" else e.value.code
    assert message.strip() == f"error: {argv[2]}: no such checkpoint directory"


INJECTED = textwrap.dedent("""
    import sys
    from absl import app
    from qstar_jax import cli, errors, loading, train

    def broken_load_model(config, workdir):
        raise getattr(errors, sys.argv[1], ValueError)("internal shape mismatch")

    loading.load_model = broken_load_model
    train.define_flags()
    app.run(train.main, argv=["train", *sys.argv[2:]], flags_parser=cli.parse_flags)
""")


@pytest.mark.parametrize("error", ["ValueError", "DataError"])
def test_train_keeps_the_traceback_of_a_bug_and_not_of_a_mistake(error, tmp_path):
    """The run's model loading raises; a ValueError (a bug in the code, as JAX's shape and
    sharding errors are) keeps its traceback down to the raising function, a DataError (a
    user's mistake) is its one line."""
    out = subprocess.run(
        [sys.executable, "-c", INJECTED, error, f"--config={ROOT}/configs/tiny.py",
         f"--workdir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode != 0
    err = out.stderr.strip()
    if error == "ValueError":
        assert "Traceback (most recent call last)" in err, err[-3000:]
        assert "qstar_jax/train.py\", line" in err and "in run\n" in err, err[-3000:]
        assert err.endswith(", in broken_load_model\nValueError: internal shape mismatch"), \
            err[-3000:]
    else:
        assert err.splitlines()[-1] == "error: internal shape mismatch", err[-3000:]
        assert "Traceback" not in err, err[-3000:]
