"""Loading a trained model from a training workdir. `convert to-hf` on a workdir whose newest step
is unreadable falls back to the newest readable one and says so; a step asked for that cannot be
read is a one-line error. Both run as a user runs them, and show no library tracebacks. The demo
model's weights are read only when a run asks for them."""

import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_checkpoint import corrupt
from test_generate import WORDS

from qstar_jax import (
    checkpoint,
    data,
    gguf_checkpoint,
    hf_checkpoint,
    loading,
    run_settings,
    thoughts,
)
from qstar_jax import config as config_lib
from qstar_jax import tokenizer as tk


def save_tiny_run(workdir: Path, steps: tuple[int, ...]) -> tuple[loading.Model, dict]:
    """A workdir as training leaves it (config.json, tokenizer/ and orbax checkpoints/), with a
    random model's parameters saved at `steps`; returns the model and {step: parameters}."""
    rnd = random.Random(0)
    tk.train_sentencepiece([" ".join(rnd.choice(WORDS) for _ in range(12)) for _ in range(200)],
                           vocab_size=330, directory=str(workdir / loading.TOKENIZER_DIR))
    config = ml_collections.ConfigDict(dict(
        seed=0, data=data.default_config(),
        model=dict(source="random", vocab_size=330, d_model=32, n_layers=2, n_heads=4,
                   n_kv_heads=2, ffn_dim=48, rope_theta=1e4, tie_embeddings=False,
                   dtype="float32", param_dtype="float32", remat_policy="none",
                   scan_layers=True),
        quiet_star=config_lib.quiet_star_defaults(n_ahead=4)))
    run_settings.check(str(workdir), config)
    model = loading.load_model(config, str(workdir))
    rng = np.random.default_rng(0)  # any values will do; no initialiser to compile
    saved = {}
    saver = checkpoint.Checkpoints(str(workdir), keep=2)
    for step in steps:
        saved[step] = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                                   model.abstract_params())
        saver.save(step, {"params": saved[step], "step": step},
                   iter(grain.MapDataset.range(4).to_iter_dataset()))
    saver.close()
    return model, saved


def test_load_training_workdir(tmp_path):
    model, saved = save_tiny_run(tmp_path / "run", (7,))
    cfg, got, tok = loading.load_checkpoint(str(tmp_path / "run"))
    assert cfg == model.cfg and cfg.n_ahead == 4
    assert tok.vocab_size == cfg.model.vocab_size == 332
    jax.tree.map(np.testing.assert_array_equal, got, saved[7])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    """A run with steps 7 and 9 saved, step 9 unreadable."""
    workdir = tmp_path_factory.mktemp("loading") / "run"
    save_tiny_run(workdir, (7, 9))
    corrupt(workdir / checkpoint.CHECKPOINT_DIR / "9")
    return str(workdir)


def convert(*args: str) -> subprocess.CompletedProcess:
    """`python -m qstar_jax.convert ARGS`, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "qstar_jax.convert", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def assert_quiet(stderr: str) -> None:
    for noise in ("Traceback", "Exception ignored", "Event loop is closed",
                  "Task exception was never retrieved", "read only"):
        assert noise not in stderr, stderr


def test_to_hf_falls_back_to_the_newest_readable_step_and_says_which(workdir, tmp_path):
    out = tmp_path / "hf"
    done = convert("to-hf", "--checkpoint", workdir, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"wrote step 7 of {workdir} to {out} (float32)"
    assert_quiet(done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, done.stderr
    assert "checkpoint step 9" in lines[0] and "is unreadable" in lines[0]
    assert "using step 7, the newest readable one" in lines[1]
    assert (out / "config.json").is_file()
    # Export only reads: the unreadable step stays where it was.
    assert sorted(int(p.name) for p in (Path(workdir) / checkpoint.CHECKPOINT_DIR).iterdir()
                  if p.name.isdigit()) == [7, 9]


def test_to_hf_of_an_unreadable_step_asked_for_is_a_one_line_error(workdir, tmp_path):
    out = tmp_path / "hf"
    done = convert("to-hf", "--checkpoint", workdir, "--step", "9", "--out", str(out))
    assert done.returncode != 0
    assert_quiet(done.stderr)
    assert done.stdout == ""
    message = done.stderr.strip()
    assert "\n" not in message, message
    assert message.startswith("error: ") and "step 9 is unreadable" in message
    assert "pick another of the saved steps [7]" in message
    assert not out.exists()


def test_the_demo_model_reads_its_weights_only_when_loaded(monkeypatch, tmp_path):
    """load_model gives the demo model's shapes and tokenizer without its weights: a run reads
    them once, into its state, and keeps no host copy through training."""
    spec = importlib.util.spec_from_file_location(
        "demo_config", Path(__file__).resolve().parents[1] / "configs" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    gguf_checkpoint.demo_dir()  # converted into the test cache, if not already
    reads = []

    def counted(read):
        return lambda *args, **kwargs: reads.append(args) or read(*args, **kwargs)

    monkeypatch.setattr(hf_checkpoint, "from_hf", counted(hf_checkpoint.from_hf))
    model = loading.load_model(demo.get_config(), str(tmp_path))
    assert reads == [] and model.cfg.model.vocab_size == model.tokenizer.vocab_size == 49154
    params = model.load()
    assert len(reads) == 1
    assert params["decoder"]["embed"]["embedding"].shape == (49154, 576)


def readme_snippet() -> str:
    """The README's Python example, as written."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return readme.split("In Python:\n\n```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("kind", ["export", "plain"])
def test_the_readme_python_example_runs_as_written(kind, workdir, tmp_path, monkeypatch, capsys):
    """On a Quiet-STaR export and on a plain model directory (the export without its thought
    parameters) at the path the README names."""
    hf_dir = tmp_path / "runs" / "tiny_hf"
    if kind == "export":
        loading.export_checkpoint(workdir, None, str(hf_dir))
    else:
        _, model, params = loading.load_run(workdir)
        plain_cfg, plain = thoughts.remove_thought_params(params, model.cfg)
        hf_checkpoint.to_hf(plain, plain_cfg, hf_dir, tokenizer=model.tokenizer)
    monkeypatch.chdir(tmp_path)
    names = {}
    exec(compile(readme_snippet(), "README.md", "exec"), names)
    printed = capsys.readouterr().out.splitlines()
    metrics, out, cfg = names["metrics"], names["out"], names["cfg"]
    assert printed[0] == (f"base {metrics['loss_base']:.3f} nats/token, with thinking "
                          f"{metrics['loss_talk']:.3f}")
    assert 0 < float(metrics["loss_base"]) < 20 and np.isfinite(float(names["loss"]))
    assert cfg.n_ahead == (4 if kind == "export" else 12)  # the run's, or the authors' default
    assert 1 <= len(out.tokens) == len(out.thoughts) and printed[1].count("<|startthought|>") \
        == len(out.thoughts)
