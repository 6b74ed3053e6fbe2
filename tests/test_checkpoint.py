"""Checkpoints of a small hand-made state: keep the last K, restore state and data position,
set an unreadable newest step aside, refuse when none is readable, name arrays of other shapes,
and SIGTERM or a first Ctrl-C asks to stop (a second one stops at once)."""

import asyncio
import logging
import os
import signal
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qstar_jax import checkpoint, loading, run_settings
from qstar_jax.errors import CheckpointError


def make_state(step: int) -> dict:
    return {"params": {"w": jnp.arange(6.0).reshape(2, 3) * step, "b": jnp.full((3,), -step)},
            "opt_state": {"mu": jnp.ones((2, 3)) * step / 10, "count": jnp.int32(step)},
            "step": jnp.int32(step), "rng": jax.random.PRNGKey(step)}


def make_iterator():
    return iter(grain.MapDataset.range(1000).shuffle(seed=3).batch(4).to_iter_dataset())


def abstract(state: dict) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def save_steps(workdir, steps, keep=2) -> dict[int, np.ndarray]:
    """Save `steps` (two batches consumed before each); returns the batch after each save."""
    ckpts = checkpoint.Checkpoints(str(workdir), keep)
    it = make_iterator()
    following = {}
    for step in steps:
        next(it), next(it)
        ckpts.save(step, make_state(step), it)  # asynchronous on accelerators
        following[step] = next(it)
    ckpts.close()
    return following


def assert_state_equal(got: dict, want: dict) -> None:
    jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), np.asarray(w)),
                 got, want)


def test_restore_gives_the_newest_state_and_data_position_and_keeps_the_last_k(tmp_path):
    following = save_steps(tmp_path, [1, 2, 3])
    ckpts = checkpoint.Checkpoints(str(tmp_path), 2)
    assert sorted(ckpts.steps()) == [2, 3]
    it = make_iterator()
    restored = ckpts.restore(abstract(make_state(0)), it)
    ckpts.close()
    assert_state_equal(restored, make_state(3))
    np.testing.assert_array_equal(next(it), following[3])


def test_nothing_saved_restores_none(tmp_path):
    ckpts = checkpoint.Checkpoints(str(tmp_path), 2)
    assert ckpts.restore(abstract(make_state(0)), make_iterator()) is None
    ckpts.close()


def corrupt(step_dir) -> None:
    for f in step_dir.rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00junk" * (f.stat().st_size // 5 + 1))


def test_unreadable_newest_step_is_set_aside_and_the_previous_one_used(tmp_path, caplog):
    following = save_steps(tmp_path, [1, 2])
    corrupt(tmp_path / "checkpoints" / "2")
    ckpts = checkpoint.Checkpoints(str(tmp_path), 2)
    it = make_iterator()
    restored = ckpts.restore(abstract(make_state(0)), it)
    assert_state_equal(restored, make_state(1))
    np.testing.assert_array_equal(next(it), following[1])
    assert ckpts.steps() == [1]
    assert (tmp_path / "unreadable_checkpoints" / "2").is_dir()
    assert "checkpoint step 2" in caplog.text and "resuming from step 1" in caplog.text
    ckpts.save(2, make_state(2), it)  # the step number is free again
    following = next(it)
    ckpts.close()
    ckpts = checkpoint.Checkpoints(str(tmp_path), 2)  # and the new step 2 is what is restored
    it = make_iterator()
    assert_state_equal(ckpts.restore(abstract(make_state(0)), it), make_state(2))
    np.testing.assert_array_equal(next(it), following)
    assert ckpts.steps() == [1, 2]
    ckpts.close()


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_an_unreadable_step_is_read_past_without_noise_or_process_wide_hooks(tmp_path, capfd):
    """Truncated array files (a disk that filled up) of a step of many arrays: TensorStore's
    reads that finish after orbax gave up on the step print nothing (they did: an "Event loop
    is closed" traceback each), and the process's hooks, event loop policy and loggers are as
    before."""
    def state(step: int) -> dict:
        return {"params": {f"w{i}": jnp.full((128, 128), float(step + i)) for i in range(40)},
                "step": jnp.int32(step)}

    ckpts = checkpoint.Checkpoints(str(tmp_path), 2)
    for step in (1, 2):
        ckpts.save(step, state(step), make_iterator())
    ckpts.close()
    for f in (tmp_path / "checkpoints" / "2" / "params" / "d").iterdir():
        f.write_bytes(f.read_bytes()[:100])
    before = (sys.excepthook, sys.unraisablehook, asyncio.get_event_loop_policy(),
              logging.getLogger("asyncio").level)
    capfd.readouterr()
    step, params = checkpoint.restore_params(str(tmp_path), None, abstract(state(0)["params"]))
    time.sleep(1)  # reads still under way would report to the closed loop meanwhile
    assert step == 1
    assert_state_equal(params, state(1)["params"])
    assert (sys.excepthook, sys.unraisablehook, asyncio.get_event_loop_policy(),
            logging.getLogger("asyncio").level) == before
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]


def test_no_readable_step_is_an_error_naming_them(tmp_path):
    save_steps(tmp_path, [1, 2])
    for step in (1, 2):
        corrupt(tmp_path / "checkpoints" / str(step))
    ckpts = checkpoint.Checkpoints(str(tmp_path), 2)
    with pytest.raises(CheckpointError, match=r"no readable checkpoint .*step 2: .*"
                                                         r"step 1: "):
        ckpts.restore(abstract(make_state(0)), make_iterator())
    ckpts.close()
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                  if p.name.isdigit()) == [1, 2]


def test_sigterm_requests_a_stop_and_close_restores_the_handler(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    ckpts = checkpoint.Checkpoints(str(tmp_path), 1)
    assert not ckpts.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert ckpts.should_stop(2)
    ckpts.close()
    assert signal.getsignal(signal.SIGTERM) == before


def test_restore_params_names_a_missing_step(tmp_path):
    save_steps(tmp_path, [1, 2])
    params = abstract(make_state(0))["params"]
    step, restored = checkpoint.restore_params(str(tmp_path), None, params)
    assert step == 2
    assert_state_equal(restored, make_state(2)["params"])
    with pytest.raises(CheckpointError, match=r"no step 7 \(saved: \[1, 2\]\)"):
        checkpoint.restore_params(str(tmp_path), 7, params)


def test_a_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
    """`--workdir=runs/demo` (what `make demo` passes): orbax wants absolute paths."""
    monkeypatch.chdir(tmp_path)
    save_steps("runs/demo", [1, 2])
    ckpts = checkpoint.Checkpoints("runs/demo", 2)
    restored = ckpts.restore(abstract(make_state(0)), make_iterator())
    ckpts.close()
    assert_state_equal(restored, make_state(2))
    assert sorted(p.name for p in (tmp_path / "runs" / "demo" / "checkpoints").iterdir()) == \
        ["1", "2"]


def test_a_first_ctrl_c_requests_a_stop_and_a_second_interrupts_at_once(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    ckpts = checkpoint.Checkpoints(str(tmp_path), 1)
    assert not ckpts.should_stop(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert ckpts.should_stop(2) and ckpts.stop_signal == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs between bytecodes, after the signal arrives
    ckpts.close()
    assert signal.getsignal(signal.SIGINT) == before


def test_saved_arrays_of_other_shapes_are_named_not_set_aside(tmp_path):
    """A state whose arrays differ from the saved ones (another model size, another optimizer)
    is a LayoutMismatch naming them, and the saved steps stay where they are."""
    save_steps(tmp_path, [1, 2])
    other = make_state(0)
    other["params"]["w"] = jnp.zeros((3, 3))
    del other["opt_state"]["mu"]
    ckpts = checkpoint.Checkpoints(str(tmp_path), 2)
    try:
        with pytest.raises(checkpoint.LayoutMismatch) as e:
            ckpts.restore(abstract(other), make_iterator())
    finally:
        ckpts.close()
    assert e.value.differences == ("params/w: saved [2, 3], now [3, 3]; "
                                   "train/opt_state/mu: saved [2, 3], now none")
    assert "settings that shape the model or the optimizer state differ" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]


def test_loading_a_run_without_saved_steps_fails_before_building_the_model(tmp_path):
    """A random-model run builds its tokenizer into the workdir; with no step saved, nothing is
    built or written: the error names the missing checkpoints."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
    from tiny import get_config

    run_settings.check(str(tmp_path), get_config())
    (tmp_path / checkpoint.CHECKPOINT_DIR).mkdir()
    with pytest.raises(CheckpointError, match="no saved checkpoints"):
        loading.load_run(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.CHECKPOINT_DIR,
                                                          run_settings.CONFIG_FILE]


def test_on_cpu_a_save_is_written_when_it_returns(tmp_path):
    """On CPU the host copy being written shares RAM with the next step's buffers, so save()
    returns once the step is on disk: another reader finds it before any wait()."""
    ckpts = checkpoint.Checkpoints(str(tmp_path), 2)
    try:
        ckpts.save(3, make_state(3), make_iterator())
        assert checkpoint.saved_step(str(tmp_path)) == 3
    finally:
        ckpts.close()


def test_saves_bounded_to_the_largest_array_read_back_as_unbounded_ones(tmp_path):
    """On CPU, with `largest_array` given, a save writes its arrays one at a time: the same
    checkpoint, restored either way, with the data position."""
    state = make_state(5)
    largest = checkpoint.largest_array_bytes(state)
    assert largest == 6 * 4  # params w, float32 [2, 3]
    for writer, reader in [(largest, None), (None, largest)]:
        workdir = tmp_path / f"{writer}_{reader}"
        ckpts = checkpoint.Checkpoints(str(workdir), 2, largest_array=writer)
        it = make_iterator()
        next(it)
        ckpts.save(5, state, it)
        following = next(it)
        ckpts.close()
        ckpts = checkpoint.Checkpoints(str(workdir), 2, largest_array=reader)
        it = make_iterator()
        restored = ckpts.restore(abstract(state), it)
        ckpts.close()
        assert_state_equal(restored, state)
        np.testing.assert_array_equal(next(it), following)
        _, params = checkpoint.restore_params(str(workdir), None, abstract(state)["params"])
        assert_state_equal(params, state["params"])
