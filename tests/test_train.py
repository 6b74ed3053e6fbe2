"""`python -m qstar_jax.train` end to end on configs/tiny.py: logs and checkpoints, SIGTERM and
resume (bit-exact), an unreadable checkpoint, a NaN loss, bad input, two processes, export.

Runs happen in subprocesses with a shared compilation cache, so a rerun of the same setting does
not compile again.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from test_sharding import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
# configs/tiny.py, smaller; its policy_loss_beta of 1 lets runs on other meshes be compared
# (see test_sharding.py).
RUN = {"train_steps": 8, "seq_len": 16, "model.n_layers": 1, "log_every": 1,
       "checkpoint_every": 3, "eval_every": 4, "eval_batches": 1}
TIMING = ("step_time_s", "tokens_per_s")  # the only logged values that may differ between runs


def flags(overrides: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    return subprocess_env(1, tmp_path_factory.mktemp("jax_cache"))


def train(workdir: Path, env: dict, **overrides) -> subprocess.CompletedProcess:
    """Run the training command line to completion."""
    return subprocess.run(command(workdir, overrides), env=env, cwd=workdir.parent,
                          capture_output=True, text=True, timeout=300)


def command(workdir: Path, overrides: dict) -> list[str]:
    return [sys.executable, "-m", "qstar_jax.train", f"--config={ROOT}/configs/tiny.py",
            f"--workdir={workdir}", *flags({**RUN, **overrides})]


def logged_steps(workdir: Path) -> list[int]:
    """Training steps in metrics.jsonl so far (a line being written is skipped)."""
    path, steps = workdir / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def records(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def launched(tmp_path_factory, env) -> dict:
    """RUN uninterrupted on one device, and on two processes of two CPU devices each (batch and
    weights split over both), started together to use both cores."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    workdir.parent.mkdir(exist_ok=True)
    one = subprocess.Popen(command(workdir, {}), env=env, cwd=workdir.parent,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pair_dir = tmp_path_factory.mktemp("two_processes") / "run"
    pair_env = subprocess_env(2, tmp_path_factory.mktemp("cache"))
    overrides = json.dumps({**RUN, "mesh.data": 2, "mesh.fsdp": 2})
    port = str(free_port())
    pair = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_SCRIPT, port, str(i), overrides,
                              str(pair_dir), str(ROOT / "configs")], env=pair_env,
                             cwd=pair_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
            for i in range(2)]
    return {"one": (one, workdir), "two": (pair, pair_dir)}


@pytest.fixture(scope="module")
def reference(launched) -> Path:
    proc, workdir = launched["one"]
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    (workdir / "stdout.txt").write_text(stdout)
    return workdir


def test_run_logs_metrics_tensorboard_and_checkpoints(reference):
    logged = records(reference)
    train_steps = [r["step"] for r in logged if "loss" in r]
    assert train_steps == list(range(1, 9))
    for r in logged:
        if "loss" in r:
            assert {"loss", "loss_base", "loss_talk", "loss_talk_0", "loss_talk_1", "policy_loss",
                    "reward_mean", "grad_norm", "learning_rate"} <= set(r)
            assert np.isfinite(r["loss"])
    assert [r["step"] for r in logged if "eval/loss_base" in r] == [0, 4, 8]
    lines = (reference / "metrics.jsonl").read_text().splitlines()
    run = json.loads((reference / "config.json").read_text())
    tokens_per_step = run["batch_size"] * run["seq_len"] * run["optim"]["grad_accum_steps"]
    for r in map(json.loads, lines):
        if "loss" in r:  # throughput is the step's tokens over its measured time
            assert 0 < r["step_time_s"] < 600
            assert r["tokens_per_s"] == pytest.approx(tokens_per_step / r["step_time_s"])
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    assert checkpoint_steps(reference) == [6, 8]  # every 3 steps and at the end, last 2 kept
    assert json.loads((reference / "config.json").read_text())["seq_len"] == 16
    assert (reference / "tokenizer" / "tokenizer.model").is_file()
    stdout = (reference / "stdout.txt").read_text()
    assert "mesh: data=1 fsdp=1 tensor=1" in stdout and "parameters" in stdout
    assert "step 8/8" in stdout and "tok/s" in stdout and "ETA" in stdout
    assert "<|startthought|>" in stdout  # sample thoughts
    assert "held-out loss (nats/token), step 0 -> step 8:" in stdout
    assert "  with thinking:" in stdout
    # The starting model's per-token losses define the deciles; each evaluation's are kept.
    start = np.load(reference / "heldout" / "start_loss.npy")
    evals = [r for r in logged if "eval/loss_base" in r]
    assert start.dtype == np.float32 and start.size == evals[0]["eval/tokens"]
    step0 = np.load(reference / "heldout" / "losses_0.npz")
    np.testing.assert_array_equal(step0["base"], start)
    hard = start >= np.quantile(start, 0.9)
    np.testing.assert_allclose(evals[0]["eval/loss_base_hard"], start[hard].mean(), rtol=1e-6)
    last = np.load(reference / "heldout" / "losses_8.npz")
    np.testing.assert_allclose(evals[-1]["eval/loss_think_hard"], last["talk"][0][hard].mean(),
                               rtol=1e-6)
    np.testing.assert_allclose(evals[-1]["eval/loss_talk_1"], np.nanmean(last["talk"][1]),
                               rtol=1e-6)
    rows = np.load(reference / "heldout" / "rows.npz")
    scored_rows = rows["mask"][..., 1:].any(-1).sum()
    assert np.isnan(last["talk"][1]).sum() == scored_rows  # offset 1 of each row's last token
    thoughts = [json.loads(x) for x in (reference / "thoughts.jsonl").read_text().splitlines()]
    assert [t["step"] for t in thoughts] == [0, 4, 8]
    assert all("<|startthought|>" in x for t in thoughts for x in t["thoughts"])


def test_ctrl_c_saves_and_a_resumed_run_logs_the_same_losses(reference, tmp_path, env):
    """SIGINT to the training process. SIGTERM takes the same handler (test_checkpoint sends
    both), so one signal's run from start to resume stands for both."""
    workdir = tmp_path / "run"
    proc = subprocess.Popen(command(workdir, {}), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while 2 not in logged_steps(workdir):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    stopped = [line for line in stdout.splitlines() if "stopped by Ctrl-C at step" in line]
    assert stopped, stdout[-2000:]
    stop_step = int(stopped[0].split("at step ")[1].split(";")[0])
    assert 2 <= stop_step < 8
    assert checkpoint_steps(workdir)[-1] == stop_step

    out = train(workdir, env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"starting at step {stop_step} of 8 (resumed" in out.stdout
    assert records(workdir) == records(reference)  # bit for bit


def settings_kept(workdir: Path, reference: Path) -> None:
    """The workdir's first config is the reference's, byte for byte, and no step moved."""
    name = "config.json"
    assert (workdir / name).read_bytes() == (reference / name).read_bytes()
    assert not (workdir / "unreadable_checkpoints").exists()
    assert checkpoint_steps(workdir) == checkpoint_steps(reference)


@pytest.mark.parametrize("overrides, named", [
    ({"quiet_star.n_ahead": 3, "optim.learning_rate": 0.5},
     "quiet_star.n_ahead 4 -> 3 (other keys that differ: optim.learning_rate 0.001 -> 0.5)"),
    ({"model.d_model": 32}, "model.d_model 64 -> 32"),
])
def test_a_resume_that_changes_a_fixed_setting_is_refused_in_one_line(reference, tmp_path, env,
                                                                      overrides, named):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    out = train(workdir, env, **overrides)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: {workdir} holds a run whose settings a resume cannot change: {named}; resume "
        f"with the saved values (see {workdir}/config.json), or train afresh in a new --workdir")
    settings_kept(workdir, reference)
    assert not (workdir / "config_history.jsonl").exists()


def test_a_resume_goes_further_freely_and_changes_the_optimizer_when_asked(reference, tmp_path,
                                                                           env):
    """Further steps are a change a resume may make; a new learning rate needs
    --resume_with_changes; a change the saved optimizer state cannot take is named as such."""
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    faster = {"train_steps": 9, "optim.learning_rate": 0.5}
    out = train(workdir, env, **faster)
    assert out.returncode == 1, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: resuming {workdir} would change optim.learning_rate 0.001 -> 0.5: pass "
        "--resume_with_changes to go on with the new values (recorded in config_history.jsonl), "
        "or resume with the saved ones")
    out = subprocess.run([*command(workdir, faster), "--resume_with_changes"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("resuming with changed settings: optim.learning_rate 0.001 -> 0.5, train_steps 8 -> "
            "9 (recorded in config_history.jsonl)") in out.stdout
    assert records(workdir)[:len(records(reference))] == records(reference)
    assert logged_steps(workdir)[-1] == 9
    history = (workdir / "config_history.jsonl").read_text().splitlines()
    assert [json.loads(x)["changes"] for x in history] == [
        {"optim.learning_rate": [0.001, 0.5], "train_steps": [8, 9]}]

    out = subprocess.run([*command(workdir, {**faster, "optim.grad_clip_norm": 0}),
                          "--resume_with_changes"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith(
        "error: the saved state cannot take this resume's changes (optim.grad_clip_norm 1.0 -> "
        "0.0): its arrays differ (train/opt_state/0/count: saved none, now []")
    assert len((workdir / "config_history.jsonl").read_text().splitlines()) == 1
    assert not (workdir / "unreadable_checkpoints").exists()


def corrupt(step_dir: Path) -> None:
    """Overwrite every file of a saved step with junk of the same length."""
    for f in step_dir.rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00junk" * (f.stat().st_size // 5 + 1))


def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, env):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    corrupt(workdir / "checkpoints" / "8")
    out = train(workdir, env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoint step 8" in out.stderr and "unreadable" in out.stderr
    assert "resuming from step 6 instead" in out.stderr
    assert "starting at step 6 of 8" in out.stdout
    assert (workdir / "unreadable_checkpoints" / "8").is_dir()  # set aside, not deleted
    assert checkpoint_steps(workdir) == [6, 8]
    assert records(workdir) == records(reference)


def test_a_resumed_run_scores_the_held_out_set_fixed_at_its_first_evaluation(reference,
                                                                              tmp_path, env):
    """Resumed from step 6, the step-8 evaluation reads the workdir's held-out rows and starting
    losses, not new ones: with one row masked out and the deciles redrawn by hand, its numbers
    are those of the saved set."""
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    shutil.rmtree(workdir / "checkpoints" / "8")
    rows = dict(np.load(workdir / "heldout" / "rows.npz"))
    rows["mask"][0, 0] = False  # batch 0, row 0 no longer scored
    np.savez(workdir / "heldout" / "rows.npz", **rows)
    kept = int(rows["mask"][:, :, 1:].sum())
    start = np.arange(kept, dtype=np.float32)  # difficulty: the later a token, the harder
    np.save(workdir / "heldout" / "start_loss.npy", start)
    out = train(workdir, env)
    assert out.returncode == 0, out.stderr[-3000:]
    last = [r for r in records(workdir) if "eval/loss_base" in r][-1]
    assert last["step"] == 8 and last["eval/tokens"] == kept
    losses = np.load(workdir / "heldout" / "losses_8.npz")
    hardest = start >= np.quantile(start, 0.9)
    np.testing.assert_allclose(last["eval/loss_base_hard"], losses["base"][hardest].mean(),
                               rtol=1e-6)
    assert np.array_equal(np.load(workdir / "heldout" / "start_loss.npy"), start)


def test_held_out_files_that_do_not_fit_are_named(tmp_path):
    from qstar_jax import heldout

    assert heldout.read_start_loss(str(tmp_path)) is None  # none saved yet
    (tmp_path / "heldout").mkdir()
    path = tmp_path / "heldout" / "start_loss.npy"
    path.write_bytes(b"\x00junk")
    with pytest.raises(ValueError, match="start_loss.npy is unreadable"):
        heldout.read_start_loss(str(tmp_path))
    np.save(path, np.arange(4))
    with pytest.raises(ValueError, match="not float32"):
        heldout.read_start_loss(str(tmp_path))
    np.save(path, np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(heldout.read_start_loss(str(tmp_path)), np.arange(4))


def test_a_truncated_checkpoint_is_one_warning_without_library_noise(reference, tmp_path, env):
    """Truncated array files (a disk that filled up) make TensorStore's callbacks and asyncio
    print pages of tracebacks unless silenced; the user sees the step named, then the resume."""
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    for f in (workdir / "checkpoints" / "8" / "params" / "d").iterdir():
        f.write_bytes(f.read_bytes()[:100])
    out = train(workdir, env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "starting at step 6 of 8" in out.stdout
    assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr, \
        out.stderr[-3000:]
    warnings = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(warnings) == 3, warnings  # unreadable, moved aside, resuming from step 6
    assert "checkpoint step 8" in warnings[0] and "unreadable" in warnings[0]


def test_no_readable_checkpoint_is_an_error_naming_them(reference, tmp_path, env):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    for step in (6, 8):
        corrupt(workdir / "checkpoints" / str(step))
    out = train(workdir, env)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no readable checkpoint in") and "step 8:" in last \
        and "step 6:" in last, last
    assert checkpoint_steps(workdir) == [6, 8]  # nothing deleted, nothing new


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(reference, tmp_path, env):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    # Resume at step 8 with a NaN learning rate: step 9's update makes every weight NaN, so step
    # 10's loss is NaN (and no checkpoint is due before it).
    changes = {"train_steps": 12, "optim.learning_rate": "nan", "checkpoint_every": 100}
    out = subprocess.run([*command(workdir, changes),
                          "--resume_with_changes"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: loss nan") and "at step 10" in last, last
    assert "last checkpoint (step 8) is kept" in last
    assert checkpoint_steps(workdir) == [6, 8]
    assert max(r["step"] for r in records(workdir)) == 9  # the last finite step is logged


@pytest.mark.parametrize("overrides, devices, message", [
    ({"model.nope": 1}, 1, "error: unknown config key --config.model.nope"),
    ({"batch_size": 4}, 8, "error: batch_size=4 is not divisible by the data-parallel size 8"),
    ({"mesh.data": 3}, 8, "error: mesh data=3 x fsdp=1 x tensor=1 needs 3 devices, but 8 are"),
])
def test_bad_input_is_a_one_line_error(tmp_path, tmp_path_factory, overrides, devices, message):
    env = subprocess_env(devices, tmp_path_factory.mktemp("cache"))
    out = train(tmp_path / "run", env, **overrides)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith(message), out.stderr[-1000:]


@pytest.mark.parametrize("args, message", [
    (["--config=configs/nope.py"], "error: --config: the config file does not load ([Errno 2] "
     "No such file or directory: 'configs/nope.py'); name one of configs/*.py"),
    (["--config=TINY", "--config.quiet_star.n_ahaed=3"],
     "error: unknown config key --config.quiet_star.n_ahaed (did you mean 'n_ahead'?)"),
    (["--config=TINY", "--workdir=/proc/qstar_run"],
     "error: --workdir=/proc/qstar_run: cannot write there (No such file or directory)"),
    (["--config=TINY", "--workdir=a_file/run"],
     "error: --workdir=a_file/run: cannot write there (Not a directory)"),
    (["--config=TPU"], "error: model.path is empty: pass --config.model.path=DIR"),
    (["--config=TPU", "--config.model.path=."], "error: distributed=True, but this machine is "
     "not a host of a TPU pod"),
])
def test_mistakes_on_the_command_line_are_one_line_before_any_work(args, message, tmp_path):
    """Nothing is created: the workdir is checked after the config, the model path and the
    distribution setting, and before anything is written."""
    (tmp_path / "a_file").write_text("")
    named = {"TINY": f"{ROOT}/configs/tiny.py", "TPU": f"{ROOT}/configs/tpu_v4.py"}
    args = [a.split("=")[0] + "=" + named.get(a.split("=")[1], a.split("=")[1]) for a in args]
    if not any(a.startswith("--workdir") for a in args):
        args.append("--workdir=run")
    out = subprocess.run([sys.executable, "-m", "qstar_jax.train", *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode != 0
    assert out.stderr.strip().startswith(message), out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_vocabulary_larger_than_the_text_allows_names_the_key_and_the_fix(tmp_path):
    from tiny import get_config

    from qstar_jax import loading

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("a cat sat.\nthe dog ran.\nhi there.\n")
    config = get_config()
    config.data.update(source="text", path=str(tmp_path / "corpus"), heldout_fraction=0.0)
    with pytest.raises(ValueError, match=r"^model.vocab_size=384 is more than the training text "
                       r"supports .* \(at most (\d+) pieces\): set --config.model.vocab_size=\1 or "
                       "less, or give more text$"):
        loading.workdir_tokenizer(config, str(tmp_path / "run"))


def test_help_exits_0_and_shows_how_to_set_config_keys(tmp_path):
    def helps(*args):
        out = subprocess.run([sys.executable, "-m", "qstar_jax.train", *args, "--help"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    plain = helps()
    assert plain.startswith("Quiet-STaR training on a mesh of devices")
    assert "--workdir" in plain and "--config.KEY=VALUE" in plain
    with_config = helps(f"--config={ROOT}/configs/tiny.py")
    assert "train_steps: 30" in with_config and "n_ahead: 4" in with_config


@pytest.mark.parametrize("overrides, message", [
    ({"seq_len": 3}, "n_ahead_talk=2 needs sequences longer than"),
    ({"model.source": "hf"}, r"model.source='hf' needs model.path"),
    ({"quiet_star.n_ahead": 2}, "n_ahead=2: a thought needs n_ahead >= 3"),
    ({"checkpoint_every": 0}, "checkpoint_every=0 must be >= 1"),
    ({"optim.grad_accum_steps": 0}, "optim.grad_accum_steps=0 must be >= 1"),
])
def test_bad_settings_are_value_errors_naming_them(tmp_path, overrides, message):
    from tiny import get_config

    from qstar_jax import train as train_lib

    config = get_config()
    config.update_from_flattened_dict(overrides)
    with pytest.raises(ValueError, match=message):
        train_lib.run(config, str(tmp_path))


TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2,
                               process_id=int(sys.argv[2]))
    sys.path.insert(0, sys.argv[5])
    import tiny
    from qstar_jax import train
    config = tiny.get_config()
    config.update_from_flattened_dict(json.loads(sys.argv[3]))
    train.run(config, sys.argv[4])
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(launched) -> Path:
    procs, workdir = launched["two"]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    assert "2 processes" in outs[0][0]
    return workdir


def test_two_processes_train_like_one(reference, two_processes):
    got, want = records(two_processes), records(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        for name in ("loss", "nll", "loss_base", "loss_talk", "grad_norm", "eval/loss_base",
                     "eval/loss_think"):
            if name in w:
                np.testing.assert_allclose(g[name], w[name], rtol=1e-5, err_msg=f"{g['step']}")
    assert checkpoint_steps(two_processes) == [6, 8]


def test_export_writes_a_checkpoint_transformers_scores_as_training_did(two_processes,
                                                                       tmp_path, capsys,
                                                                       caplog):
    """The exported step-8 model, run by transformers, gives the held-out base loss the run
    logged at step 8 (computed there from parameters split over two processes)."""
    import torch
    import transformers

    from qstar_jax import convert, data, run_settings
    from qstar_jax import tokenizer as tokenizer_lib

    out = tmp_path / "hf"
    convert.main(["to-hf", "--checkpoint", str(two_processes), "--out", str(out)])
    assert f"wrote step 8 of {two_processes} to {out}" in capsys.readouterr().out
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
    config = run_settings.load_config(str(two_processes))
    tok = tokenizer_lib.load(str(out))
    batch = data.heldout_batches(config.data, tok, seq_len=config.seq_len,
                                 global_batch=config.batch_size, num_batches=1)[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(batch["tokens"]).long()).logits.numpy()
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    targets, valid = batch["tokens"][:, 1:], batch["mask"][:, 1:]
    ce = -np.take_along_axis(logp[:, :-1], targets[..., None], -1)[..., 0]
    logged = [r for r in records(two_processes) if r["step"] == 8 and "eval/loss_base" in r][0]
    np.testing.assert_allclose(ce[valid].mean(), logged["eval/loss_base"], rtol=1e-4)
    settings = json.loads((out / "config.json").read_text())["quiet_star"]
    assert settings["n_ahead"] == 4 and settings["policy_loss_beta"] == 1.0
    added = json.loads((out / "added_tokens.json").read_text())
    assert added == {"<|startthought|>": tok.base_vocab_size,
                     "<|endthought|>": tok.base_vocab_size + 1}


def test_export_writes_the_step_and_dtype_asked_for(two_processes, tmp_path, capsys):
    import jax.numpy as jnp
    import safetensors

    from qstar_jax import checkpoint, convert, hf_checkpoint, loading, run_settings

    out = tmp_path / "hf"
    convert.main(["to-hf", "--checkpoint", str(two_processes), "--step", "6", "--dtype",
                  "bfloat16", "--out", str(out)])
    assert f"wrote step 6 of {two_processes}" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safetensors.safe_open(out / "model.safetensors", framework="numpy") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
    exported = np.asarray(hf_checkpoint.from_hf(out)[1]["decoder"]["embed"]["embedding"])
    workdir = str(two_processes)
    model = loading.load_model(run_settings.load_config(workdir), workdir)
    for step in (6, 8):
        _, saved = checkpoint.restore_params(workdir, step, model.abstract_params())
        rounded = np.asarray(saved["decoder"]["embed"]["embedding"]).astype(jnp.bfloat16)
        assert np.array_equal(exported, rounded.astype(np.float32)) == (step == 6), step

    with pytest.raises(SystemExit) as e:
        convert.main(["to-hf", "--checkpoint", workdir, "--step", "7", "--out",
                      str(tmp_path / "step7")])
    assert e.value.code == 1 and "no step 7 (saved: [6, 8])" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        convert.main(["to-hf", "--checkpoint", workdir, "--out", str(out)])
    assert e.value.code == 1 and "already exists" in capsys.readouterr().err


def test_export_of_a_directory_without_a_run_is_a_one_line_error(tmp_path, capsys):
    from qstar_jax import convert

    with pytest.raises(SystemExit) as e:
        convert.main(["to-hf", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "hf")])
    assert e.value.code == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith(f"error: {tmp_path}") and "\n" not in message
    assert "not a training workdir" in message and not (tmp_path / "hf").exists()


HF_SCRIPT = textwrap.dedent("""
    import json, sys
    import ml_collections
    sys.path.insert(0, sys.argv[3])
    import tiny
    from qstar_jax import train
    config = tiny.get_config()
    config.update_from_flattened_dict(json.loads(sys.argv[1]))
    config.model = ml_collections.ConfigDict(dict(
        source="hf", path=sys.argv[2], dtype="float32", param_dtype="float32",
        remat_policy="none", scan_layers=True))
    train.run(config, sys.argv[4])
""")


def test_training_resumes_from_an_exported_quiet_star_checkpoint(two_processes, tmp_path):
    """model.source="hf" on the exported step-8 model: its first held-out evaluation is the one
    the run logged at step 8 (thinking included: the mixing head and thought embeddings load),
    on the same held-out set when given the run's."""
    from qstar_jax import loading

    hf = tmp_path / "hf"
    loading.export_checkpoint(str(two_processes), 8, str(hf))
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "heldout").mkdir()
    for name in ("rows.npz", "start_loss.npy"):  # the run's held-out set and deciles
        shutil.copy(two_processes / "heldout" / name, workdir / "heldout")
    env = subprocess_env(1, tmp_path / "cache")
    overrides = json.dumps({**RUN, "train_steps": 1})
    out = subprocess.run([sys.executable, "-c", HF_SCRIPT, overrides, str(hf),
                          str(ROOT / "configs"), str(workdir)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    first = records(workdir)[0]
    logged = [r for r in records(two_processes) if r["step"] == 8 and "eval/loss_base" in r][0]
    assert first["step"] == 0
    for name in ("eval/loss_base", "eval/loss_think", "eval/loss_base_hard"):
        np.testing.assert_allclose(first[name], logged[name], rtol=1e-5, err_msg=name)


TOP_KEYS = {"train_steps", "batch_size", "seq_len", "log_every", "checkpoint_every",
            "checkpoint_keep", "eval_every", "eval_batches", "seed", "distributed", "mesh",
            "model", "quiet_star", "data", "optim"}


@pytest.mark.parametrize("name", ["tiny", "demo", "gpu", "gpu:hf", "tpu_v4"])
def test_every_config_holds_exactly_the_keys_a_run_reads(name):
    import dataclasses
    import importlib

    from qstar_jax import config as config_lib
    from qstar_jax import data, optim

    module, _, arg = name.partition(":")
    config = importlib.import_module(module).get_config(*([arg] if arg else []))
    assert set(config) == TOP_KEYS
    assert set(config.mesh) == {"data", "fsdp", "tensor"}
    if config.model.source == "hf":  # the checkpoint path comes by flag
        config.model.path = "/checkpoints/model"
    config_lib.check_model_keys(config.model)
    # Every QuietStarConfig option but those the model and tokenizer fix, named here.
    from qstar_jax.thoughts import QuietStarConfig

    options = {f.name for f in dataclasses.fields(QuietStarConfig)}
    assert set(config.quiet_star) == options - {"model", "start_thought_id", "end_thought_id",
                                                 "pad_id"}
    assert set(config.data) == set(data.default_config())
    assert set(config.optim) == set(optim.default_config())


@pytest.mark.parametrize("name", ["tiny", "gpu"])
def test_random_model_configs_train_their_tokenizer_on_their_default_data(name, tmp_path):
    """A random model's vocabulary must fit the text its config trains on by default, or the run
    stops before its first step."""
    import importlib

    from qstar_jax import data
    from qstar_jax import tokenizer as tokenizer_lib

    config = importlib.import_module(name).get_config()
    texts, _ = data.load_splits(config.data)
    tok = tokenizer_lib.train_sentencepiece(texts, config.model.vocab_size, str(tmp_path))
    assert tok.base_vocab_size == config.model.vocab_size  # before the two thought tokens


def test_gpu_config_is_a_one_billion_parameter_model():
    """Counted over the tensors the model creates (shapes only), not by formula; the formula
    `num_params` (what the run reports) must agree."""
    import math

    import jax
    from gpu import get_config

    from qstar_jax.model import ModelConfig, init_params

    m = get_config().model
    cfg = ModelConfig(vocab_size=m.vocab_size + 2, d_model=m.d_model, n_layers=m.n_layers,
                      n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, ffn_dim=m.ffn_dim)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    counted = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    assert 0.9e9 < counted < 1.2e9
    assert cfg.num_params == counted


COMPILE_SCRIPT = textwrap.dedent("""
    import json, sys
    import ml_collections
    sys.path.insert(0, sys.argv[2])
    from tiny import get_config
    from qstar_jax import compile_check

    config = get_config()
    config.update_from_flattened_dict(json.loads(sys.argv[1]))
    # configs/tiny.py's shape as a config.json alone: no weights, no tokenizer
    with open("config.json", "w") as f:
        json.dump({"model_type": "llama", "vocab_size": 384, "hidden_size": 64,
                   "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                   "max_position_embeddings": 256}, f)
    config.model = ml_collections.ConfigDict(dict(
        source="hf", path="config.json", dtype="float32", param_dtype="float32",
        remat_policy="none", scan_layers=True))
    out = {"large": compile_check.compile_only(config, "cpu", hbm_bytes=2**40)}
    try:
        compile_check.compile_only(config, "cpu", hbm_bytes=2**20)
    except compile_check.DoesNotFit as e:
        out["small"] = {"message": str(e), "report": e.report}
    print("RESULT" + json.dumps(out))
""")


def test_compile_only_reports_memory_per_device_against_the_hbm(env, tmp_path):
    """The real train step of a model given by its config.json alone, compiled without running
    for this host's CPU device: XLA's memory figures, and DoesNotFit with them when the HBM is
    smaller (the second compile is cached)."""
    overrides = {**RUN, "quiet_star.n_ahead": 3}  # the shortest thought: a faster compile
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, json.dumps(overrides),
                           str(ROOT / "configs")], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    large = out["large"]
    assert large["devices"] == 1 and large["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert large["accum_batch_len"] == [1, 8, 16] and large["parameters"] > 0
    for key in ("argument_gib", "output_gib", "temp_gib", "total_gib"):
        assert large[key] > 0, key
    # Arguments: float32 parameters and AdamW's two moments, plus the batch and a few scalars.
    state_gib = 3 * 4 * large["parameters"] / 2**30  # the report rounds to 4 digits
    assert state_gib * (1 - 1e-3) <= large["argument_gib"] <= state_gib * (1 + 1e-3) + 1e-4
    assert large["total_gib"] == pytest.approx(
        large["argument_gib"] + large["output_gib"] - large["alias_gib"] + large["temp_gib"],
        rel=1e-3)
    assert large["fits"] is True and large["hbm_gib"] == 1024
    small = out["small"]
    assert small["report"]["fits"] is False and small["report"]["hbm_gib"] < large["total_gib"]
    assert small["message"].startswith(f"cpu: the train step needs {large['total_gib']} GiB per "
                                       "device, more than the 0.0009766 GiB")


def test_compile_only_devices_of_v4_slices_are_chips(monkeypatch):
    """v4-N counts TensorCores: N/2 chips, one JAX device each, in a megacore topology whose
    dimensions multiply to the chips. Without libtpu (CI) an error says that it is needed, and
    a stand-in for libtpu's description (one device per chip of the topology asked) checks the
    mapping; with libtpu, its own description."""
    import importlib.util
    import math
    import types

    from jax.experimental import topologies

    from qstar_jax import compile_check

    with pytest.raises(ValueError, match="expected cpu, a TPU v4 slice"):
        compile_check.compile_devices("v4-12")
    if importlib.util.find_spec("libtpu") is None:
        with pytest.raises(ValueError, match=r"no TPU topology v4:2x2x4 .*pip install libtpu"):
            compile_check.compile_devices("v4-32")
        asked = []

        def described(topology, platform, **kwargs):
            asked.append((topology, platform, kwargs))
            chips = math.prod(map(int, topology.split(":")[1].split("x")))
            device = types.SimpleNamespace(device_kind="TPU v4")
            return types.SimpleNamespace(devices=[device] * chips)

        monkeypatch.setattr(topologies, "get_topology_desc", described)
    for name, topology, chips in (("v4-32", "v4:2x2x4", 16), ("v4-64", "v4:2x4x4", 32),
                                  ("v4-8", "v4:2x2x1", 4)):
        found, devices = compile_check.compile_devices(name)
        assert (found, len(devices), devices[0].device_kind) == (topology, chips, "TPU v4")
    if importlib.util.find_spec("libtpu") is None:
        assert all(kw == {"chip_config_name": "megacore"} and platform == "tpu"
                   for _, platform, kw in asked)


def test_named_shape_is_mistral_7b_with_thought_tokens_added():
    """--compile_only's model.path=mistral-7b reads as Mistral-7B-v0.1 plus the two thought tokens
    (ids 32000, 32001) through configs/tpu_v4.py, with no checkpoint."""
    import math

    import jax
    from tpu_v4 import get_config

    from qstar_jax import compile_check

    config = get_config()
    config.model.path = "mistral-7b"
    model = compile_check._weightless_model(config)
    m = model.cfg.model
    assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim,
            m.sliding_window, m.tie_embeddings) == (32002, 4096, 32, 32, 8, 14336, 4096, False)
    assert (model.cfg.start_thought_id, model.cfg.end_thought_id) == (32000, 32001)
    assert (model.cfg.n_ahead, model.cfg.n_ahead_talk, model.cfg.n_passes) == (12, 4, 2)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(model.abstract_params()))
    assert 7.2e9 < n_params < 7.4e9  # Mistral-7B's 7.24e9, plus two rows and the mixing head
    config.model.path = "llama-3.1-8b"
    m = compile_check._weightless_model(config).cfg.model
    assert (m.vocab_size, m.rope_theta, m.rope_llama3_scaling) == (128258, 500000.0,
                                                                   (8.0, 1.0, 4.0, 8192))
    config.model.path = "mistral-8b"
    with pytest.raises(ValueError, match="no such directory, config.json or shape"):
        compile_check._weightless_model(config)


def test_inspect_of_an_export_counts_the_parameters_train_counted(reference, tmp_path, capsys):
    from qstar_jax import convert

    convert.main(["to-hf", "--checkpoint", str(reference), "--out", str(tmp_path / "hf")])
    convert.main(["inspect", "--path", str(tmp_path / "hf")])
    out = capsys.readouterr().out
    counted = re.search(r"model: ([\d,]+) parameters \(the thought parameters included",
                        (reference / "stdout.txt").read_text()).group(1)
    stored = int(counted.replace(",", "")) + 2 * 64  # the authors' unused rows, d_model 64
    assert (f"parameters: {counted} (the model's, as train counts them) in 1 file(s); "
            f"{stored:,} stored: start_embedding and end_embedding keep the authors' unused "
            "second row") in out


def test_own_documents_as_a_user_gives_them(tmp_path, env):
    """A directory of ordinary 25 KB .txt documents trains a random model's tokenizer and its
    steps; one .txt file, or a .jsonl file under the text source, is one line saying why not."""
    import random

    corpus, rng = tmp_path / "corpus", random.Random(0)
    corpus.mkdir()
    words = "the river ran past a mill where seven cats slept near warm stones today".split()
    for i in range(30):
        lines = (" ".join(rng.choices(words, k=rng.randint(4, 18))) for _ in range(420))
        (corpus / f"doc{i}.txt").write_text("\n".join(lines))
    assert min(f.stat().st_size for f in corpus.iterdir()) > 20_000
    (tmp_path / "docs.jsonl").write_text('{"text": "a"}\n')
    text = {"data.source": "text", "train_steps": 2, "data.heldout_fraction": 0.2}
    out = train(tmp_path / "run", env, **text, **{"data.path": corpus})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "tokenizer").is_dir() and logged_steps(tmp_path / "run") == [1, 2]
    for path, message in (
            (corpus / "doc0.txt", "gives one .txt file, which is one document"),
            (tmp_path / "docs.jsonl", "ends in .jsonl but data.source=text: set "
             "--config.data.source=jsonl")):
        out = train(tmp_path / path.stem, env, **text, **{"data.path": path})
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, last
