"""The command lines: one absl flag style, --help, and one exit-code rule. A command-line
mistake (a flag unknown, missing or of a bad value, a config that does not load) is one line
and exit 2; a user mistake found as the command runs (the project's error types) is one line and
exit 1; any other exception is a bug and keeps its full traceback.

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
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


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


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    """A second Ctrl-C in training (the first one saves and stops, `test_checkpoint`), or one
    anywhere else, stops the work at once."""
    with pytest.raises(SystemExit) as e, cli.one_line_errors():
        raise KeyboardInterrupt
    assert e.value.code == 130
    assert capsys.readouterr().err == ("error: stopped at once by Ctrl-C; what was saved before "
                                       "(checkpoints, files written) is kept\n")


def _command_mains(tmp_path: Path) -> list[tuple[str, object, list[str], str]]:
    """(name, module, argv, the loading function its main calls first that can fail)."""
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


NAMES = ["generate", "evaluate", "visualize", "convert"]


@pytest.mark.parametrize("name", NAMES)
def test_mains_let_bugs_through_and_print_mistakes_in_one_line(
        name, tmp_path, monkeypatch, capsys):
    _, module, argv, attribute = next(m for m in _command_mains(tmp_path) if m[0] == name)
    ckpt = argv[argv.index("--checkpoint") + 1]

    def broken(*args, **kwargs):
        raise ValueError("internal shape mismatch")

    monkeypatch.setattr(loading, attribute, broken)
    with pytest.raises(ValueError, match="internal shape mismatch") as e:
        module.main(argv)
    assert not isinstance(e.value, InputError)
    assert e.traceback[-1].name == "broken"

    def mistaken(*args, **kwargs):
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")

    monkeypatch.setattr(loading, attribute, mistaken)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    assert e.value.code == cli.FOUND == 1
    assert capsys.readouterr().err == f"error: {ckpt}: no such checkpoint directory\n"


def _exits(main, argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `main(argv)`, which must exit."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.mark.parametrize("name", NAMES)
def test_command_line_mistakes_are_one_line_and_exit_2(name, tmp_path, monkeypatch, capsys):
    """Before anything is loaded (loading is not reached: it would raise a bug)."""
    _, module, argv, attribute = next(m for m in _command_mains(tmp_path) if m[0] == name)
    monkeypatch.setattr(loading, attribute, lambda *a, **k: pytest.fail("loaded"))
    verb = argv[:1] if name == "convert" else []
    flags_given = argv[len(verb):]
    first = flags_given[0]
    for bad, message in [
            (flags_given + ["--nosuch=1"], "error: Unknown command line flag 'nosuch'"),
            (flags_given[2:], f"error: {first} is required"),
            (flags_given + ["--seed=x" if name != "convert" else "--dtype=int8"], "error: flag "),
            (flags_given + ["stray"], "error: unexpected arguments: stray"),
            (flags_given + [first], f"error: Missing value for flag {first}"),
    ]:
        code, out, err = _exits(module.main, verb + bad, capsys)
        assert (code, out) == (cli.USAGE, ""), (bad, err)
        assert err.startswith(message) and err.count("\n") == 1, (bad, err)


@pytest.mark.parametrize("name", NAMES)
def test_help_shows_the_doc_and_the_flags_and_exits_0(name, tmp_path, capsys):
    _, module, argv, _ = next(m for m in _command_mains(tmp_path) if m[0] == name)
    verb = argv[:1] if name == "convert" else []
    code, out, _ = _exits(module.main, verb + ["--help"], capsys)
    assert code == 0
    doc = (module.__doc__ if name != "convert" else "python -m qstar_jax.convert to-hf:")
    assert out.startswith(doc.strip().splitlines()[0]), out
    assert "\nflags:\n" in out and "  --checkpoint: " in out and "(required)" in out
    assert "--config" not in out  # these commands take no config file
    for flag in argv[len(verb)::2]:
        assert f"  {flag}: " in out, flag


def test_flags_take_absl_forms_and_each_call_starts_from_the_defaults():
    """--flag value and --flag=value; booleans --flag, --noflag, --flag=true/false; flags
    given to one call are not left over for the next (each builds its own FlagValues)."""
    fv = generate.command_flags()
    cli.parse_command(fv, ["--checkpoint", "c", "--prompt=p q", "--show_thoughts",
                           "--max_new_tokens", "3", "--top_p=0.5"], "")
    assert (fv.checkpoint, fv.prompt, fv.show_thoughts, fv.thoughts, fv.max_new_tokens,
            fv.top_p) == ("c", "p q", True, True, 3, 0.5)
    for forms, want in ((["--nothoughts"], False), (["--thoughts=false"], False),
                        (["--thoughts=true"], True), ([], True)):
        fv = generate.command_flags()
        cli.parse_command(fv, ["--checkpoint=c", "--prompt=p", *forms], "")
        assert (fv.thoughts, fv.show_thoughts, fv.max_new_tokens) == (want, False, 64), forms


def test_convert_takes_the_verb_first_and_its_flags_after(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(loading, "export_checkpoint", lambda *a: calls.append(a) or 7)
    out = str(tmp_path / "hf")
    convert.main(["to-hf", "--checkpoint", "runs/tiny", "--out", out, "--step", "7",
                  "--dtype=bfloat16", "--ema"])
    assert calls == [("runs/tiny", 7, out, "bfloat16", True)]
    assert capsys.readouterr().out == (f"wrote the EMA parameters of step 7 of runs/tiny to "
                                       f"{out} (bfloat16)\n")
    for argv, message in [([], "no subcommand"), (["--out=x", "to-hf"], "no subcommand"),
                          (["to-gguf"], "unknown subcommand 'to-gguf'")]:
        code, _, err = _exits(convert.main, argv, capsys)
        assert code == cli.USAGE and err == (f"error: {message}: name one of from-gguf, to-hf, "
                                             "inspect first (python -m qstar_jax.convert "
                                             "--help)\n")
    code, usage, _ = _exits(convert.main, ["--help"], capsys)
    assert code == 0 and usage.startswith(convert.__doc__.strip().splitlines()[0])
    assert all(f"\n  {verb}  " in usage for verb in ("from-gguf", "to-hf   ", "inspect "))


def test_the_earlier_spelling_of_a_renamed_flag_names_the_new_one(tmp_path, capsys):
    for module, argv in ((generate, ["--checkpoint=c", "--prompt=p"]),
                         (evaluate, ["--checkpoint=c", "--task=gsm8k", "--data=d"])):
        code, _, err = _exits(module.main, [*argv, "--no_thoughts"], capsys)
        assert (code, err) == (cli.USAGE, "error: --no_thoughts is now --nothoughts\n")
    code, _, err = _exits(generate.main, ["--checkpoint=c", "--prompt=p", "--show_thoughts",
                                          "--nothoughts"], capsys)
    assert (code, err) == (cli.USAGE, "error: --show_thoughts and --nothoughts exclude each "
                                      "other\n")


def _user_runs(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m qstar_jax.COMMAND ARGS`, as a user runs it."""
    return subprocess.run([sys.executable, "-m", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=ENV)


@pytest.mark.parametrize("config, message", [
    ("configs/demo.py:nope", "--config=configs/demo.py:nope: preset 'nope': expected one of "
                             "['reference', 'stable', 'fast_head', 'rlp']"),
    ("configs/tiny.py:stable", "--config=configs/tiny.py:stable: configs/tiny.py takes no preset "
                               "or other argument ('stable'); use --config=configs/tiny.py"),
    (None, "--config is required"),
])
def test_a_config_or_preset_that_does_not_load_is_one_line_and_exit_2(config, message, tmp_path):
    args = [f"--config={config}"] if config else []
    done = _user_runs("qstar_jax.train", *args, f"--workdir={tmp_path / 'run'}")
    assert (done.returncode, done.stdout) == (cli.USAGE, ""), done.stderr[-3000:]
    assert done.stderr == f"error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_convert_checks_out_before_any_work_as_a_user_runs_it(tmp_path):
    """--out under a file (the case of any location that cannot be written) is named before
    the checkpoint is read: the checkpoint here does not exist either."""
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "hf"
    done = _user_runs("qstar_jax.convert", "to-hf", "--checkpoint", str(tmp_path / "none"),
                      "--out", str(out))
    assert (done.returncode, done.stdout) == (cli.FOUND, "")
    assert done.stderr == (f"error: --out={out}: cannot write in {tmp_path / 'a_file'} (Not a "
                           "directory); choose a directory you can write to\n")


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
    user's mistake) is its one line and exit 1."""
    out = subprocess.run(
        [sys.executable, "-c", INJECTED, error, f"--config={ROOT}/configs/tiny.py",
         f"--workdir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
        timeout=120, env=ENV)
    err = out.stderr.strip()
    if error == "ValueError":
        assert out.returncode == 1
        assert "Traceback (most recent call last)" in err, err[-3000:]
        assert "qstar_jax/train.py\", line" in err and "in run\n" in err, err[-3000:]
        assert err.endswith(", in broken_load_model\nValueError: internal shape mismatch"), \
            err[-3000:]
    else:
        assert out.returncode == cli.FOUND
        assert err.splitlines()[-1] == "error: internal shape mismatch", err[-3000:]
        assert "Traceback" not in err, err[-3000:]
