"""Training checkpoints (orbax): save (asynchronously on accelerators), keep the last few, resume
from the newest readable one, save and stop on SIGTERM or a first Ctrl-C (SIGINT; a second one
aborts at once), and read a saved step's parameters back.

A step holds three items: "params", "train" (optimizer state, step, rng) and "data" (the grain
iterator's position), and for RLP a fourth, "ema" (the no-think baseline's parameters), so a
resumed run continues exactly where the saved one was. An unreadable
newest step is set aside (never deleted) and the one before it used; if none is readable the run
stops with an error naming them, rather than silently starting afresh. Reading parameters back
(for export or use) skips unreadable steps the same way, without moving them.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from qstar_jax import host_memory
from qstar_jax.errors import CheckpointError, ConfigError

CHECKPOINT_DIR = "checkpoints"
SET_ASIDE_DIR = "unreadable_checkpoints"  # unreadable steps are moved here, never deleted


class _ClosedLoopIgnoresLateWork(asyncio.SelectorEventLoop):
    """The event loop of a restore: once closed, it drops what still arrives for it instead of
    raising or logging. When one array of a step is unreadable, orbax stops its loop and closes
    it while TensorStore's other reads of the step go on; each of them, finishing, hands its
    result to the closed loop from a TensorStore thread ("Event loop is closed", printed as an
    unraisable error, pages of them), asyncio logs "Task exception was never retrieved" for the
    reads' tasks, and the reads never started warn that their coroutines were never awaited.
    What matters reaches the caller as the restore's exception."""

    def close(self) -> None:
        for task in asyncio.all_tasks(self):
            coro = task.get_coro()
            if inspect.iscoroutine(coro) and inspect.getcoroutinestate(coro) == "CORO_CREATED":
                coro.close()  # never started, and now never will
        super().close()

    def call_soon_threadsafe(self, callback, *args, context=None):
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        except RuntimeError:
            if self.is_closed():
                return None
            raise

    def call_exception_handler(self, context: dict) -> None:
        if not self.is_closed():
            super().call_exception_handler(context)


class _RestoreLoops(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _ClosedLoopIgnoresLateWork()


@contextlib.contextmanager
def _restore_loops() -> Iterator[None]:
    """Orbax's restores inside make their event loops as `_ClosedLoopIgnoresLateWork` (orbax
    asks asyncio for a new loop per call); the previous policy is back on exit, and the loops
    made meanwhile keep dropping late work after it."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_RestoreLoops())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


ITEMS = {"params": "params", "ema_params": "ema"}  # state entries saved as their own items


def _split(state: dict) -> tuple[dict, dict]:
    """The state as (its own items by item name, the "train" item: everything else)."""
    own = {item: state[key] for key, item in ITEMS.items() if key in state}
    return own, {k: v for k, v in state.items() if k not in ITEMS}


def _joined(restored: Any, items: list[str]) -> dict:
    by_item = {item: key for key, item in ITEMS.items()}
    return {**{by_item[item]: restored[item] for item in items}, **restored.train}


def _newest_readable(steps: list[int], restore: Callable[[int], Any]
                     ) -> tuple[int | None, Any, list[tuple[int, str]]]:
    """Try `restore(step)` for `steps` in turn: (the first step that reads, what it restored, the
    (step, error) of each unreadable one before it); (None, None, failures) if none reads. The
    libraries' noise about unreadable steps is dropped (`_restore_loops`)."""
    failed: list[tuple[int, str]] = []
    for step in steps:
        try:
            with _restore_loops():
                return step, restore(step), failed
        except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many kinds)
            failed.append((step, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
    return None, None, failed


def _warn_unreadable(directory: epath.Path, failed: list[tuple[int, str]]) -> None:
    for step, message in failed:
        logging.warning("checkpoint step %d in %s is unreadable (%s)", step, directory, message)


def _none_readable(directory: epath.Path, failed: list[tuple[int, str]]) -> str:
    listed = "; ".join(f"step {s}: {m}" for s, m in failed)
    return f"no readable checkpoint in {directory} ({listed})"


class LayoutMismatch(CheckpointError):
    """The saved arrays are not those the run's settings make: a settings question, not an
    unreadable checkpoint. `differences` names the first arrays that differ."""

    def __init__(self, step_dir: epath.Path, differences: str):
        self.differences = differences
        super().__init__(
            f"{step_dir} holds arrays of other shapes than this run's settings make "
            f"({differences}): the settings that shape the model or the optimizer state differ "
            "from those the checkpoints were saved with; resume with those, or train afresh in "
            "a new --workdir")


class Checkpoints:
    """The checkpoints of one workdir, and the SIGTERM / Ctrl-C watch that saves before stopping.

    `largest_array`: the bytes of the largest array a save writes (`largest_array_bytes`), or
    None. Given, a save on CPU writes the arrays of each item one at a time, up to that size:
    the host copies being written are what a save adds to the process's memory, and orbax
    otherwise copies every array before writing them (a second copy of the whole state).
    """

    def __init__(self, workdir: str, keep: int, largest_array: int | None = None):
        if keep < 1:
            raise ConfigError(f"checkpoint_keep={keep} must be >= 1")
        self.workdir = _absolute(workdir)
        self.keep = keep
        self._synchronous = jax.default_backend() == "cpu"
        self._largest_array = largest_array
        self._manager = self._open()
        self.stop_signal: str | None = None  # the name of the signal that asked to stop
        self._old_handlers: dict[int, Any] = {}
        if jax.process_count() == 1:  # several processes: jax's preemption service listens
            self._old_handlers = {sig: signal.signal(sig, self._on_stop_signal)
                                  for sig in (signal.SIGTERM, signal.SIGINT)}

    def _open(self) -> ocp.CheckpointManager:
        # On CPU the host copy being written shares RAM with the next step's buffers: there the
        # save finishes before training goes on, so that the copy is not part of the step's peak.
        options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                               enable_async_checkpointing=not self._synchronous)
        handlers = None
        if self._synchronous and self._largest_array is not None:
            # orbax's bound on the bytes being written, in GB (10^9 bytes); an array is written
            # only when it is below the bound, so the bound is one byte more than the largest.
            bounded = lambda: ocp.StandardCheckpointHandler(  # noqa: E731
                save_concurrent_gb=(self._largest_array + 1) / 1e9)
            handlers = {**{item: bounded() for item in ITEMS.values()}, "train": bounded(),
                        "data": grain.checkpoint.CheckpointHandler()}
        return ocp.CheckpointManager(self.workdir / CHECKPOINT_DIR, options=options,
                                     item_handlers=handlers)

    def _on_stop_signal(self, signum, frame) -> None:
        self.stop_signal = signal.Signals(signum).name
        if signum == signal.SIGINT:  # a second Ctrl-C raises KeyboardInterrupt, as usual
            signal.signal(signal.SIGINT, signal.default_int_handler)
            logging.warning("Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C "
                            "again to stop at once, without saving)")
        else:
            logging.warning("SIGTERM: saving a checkpoint after this step, then stopping")

    @property
    def stopped_by(self) -> str:
        """What asked the run to stop, as its user knows it: "Ctrl-C", "SIGTERM", or
        "preemption" (several processes, where jax's preemption service listens)."""
        return {"SIGINT": "Ctrl-C", None: "preemption"}.get(self.stop_signal, self.stop_signal)

    def should_stop(self, step: int) -> bool:
        """True once SIGTERM or Ctrl-C arrived (at a step all processes agree on): save, then
        stop."""
        if jax.process_count() > 1:
            return self._manager.reached_preemption(step)
        return self.stop_signal is not None

    def steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: dict, data_iter: grain.DatasetIterator) -> None:
        """Start saving `state` (returns once it is copied off the devices and writes continue;
        on CPU once it is written)."""
        own, train = _split(state)
        self._manager.save(step, args=ocp.args.Composite(
            **{item: ocp.args.StandardSave(tree) for item, tree in own.items()},
            train=ocp.args.StandardSave(train), data=grain.checkpoint.CheckpointSave(data_iter)))
        if self._synchronous:  # written: hand back the heap pages its buffers left
            host_memory.release()

    def restore(self, abstract_state: dict, data_iter: grain.DatasetIterator) -> dict | None:
        """The newest readable state (data_iter moved to its position), or None if none saved;
        a LayoutMismatch if the newest saved arrays are not those of `abstract_state`."""
        own, train = _split(abstract_state)
        if self.steps():
            _check_layout(self._manager.directory / str(max(self.steps())), {**own, "train": train})
        step, restored, failed = _newest_readable(
            sorted(self.steps(), reverse=True),
            lambda step: self._manager.restore(step, args=ocp.args.Composite(
                **{item: ocp.args.StandardRestore(tree) for item, tree in own.items()},
                train=ocp.args.StandardRestore(train),
                data=grain.checkpoint.CheckpointRestore(data_iter))))
        _warn_unreadable(self._manager.directory, failed)
        if step is None:
            if failed:
                raise CheckpointError(f"{_none_readable(self._manager.directory, failed)}; move "
                                      "them away to start afresh")
            return None
        if failed:
            self._set_aside([s for s, _ in failed])
            logging.warning("resuming from step %d instead", step)
        return _joined(restored, list(own))

    def _set_aside(self, steps: list[int]) -> None:
        """Move unreadable steps out of the manager's way (to SET_ASIDE_DIR), keeping them."""
        aside = self.workdir / SET_ASIDE_DIR
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target = aside / str(step)
                (self._manager.directory / str(step)).rename(target)
                logging.warning("moved unreadable checkpoint step %d to %s", step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("qstar_jax: unreadable checkpoints set aside")
        self._manager.close()
        self._manager = self._open()

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{"a/b/0/c": shape} of a tree's arrays (or their metadata), one path spelling for dicts,
    sequences and named tuples alike."""
    name = lambda k: str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))  # noqa: E731
    return {"/".join(name(k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree) if hasattr(leaf, "shape")}


def _check_layout(step_dir: epath.Path, abstract_items: dict[str, Any]) -> None:
    """A LayoutMismatch naming the first differences when the arrays saved at `step_dir` are not
    those of `abstract_items` (by item: the state this run's settings make). Orbax would call
    the step unreadable, and it is no reason to set steps aside. Where the metadata cannot be
    read nothing is said: the restore then tells what is wrong with the step."""
    differ = []
    for item, tree in abstract_items.items():
        try:
            with _restore_loops():  # its reads of a truncated step end as a restore's do
                saved = _shapes(ocp.StandardCheckpointHandler().metadata(step_dir / item))
        except Exception:  # noqa: BLE001  (an unreadable step: the restore reports it)
            return
        now = _shapes(tree)
        shown = lambda shapes, k: list(shapes[k]) if k in shapes else "none"  # noqa: E731
        differ += [f"{item}/{k}: saved {shown(saved, k)}, now {shown(now, k)}"
                   for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)]
    if differ:
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise LayoutMismatch(step_dir, f"{'; '.join(differ[:3])}{more}")


def is_workdir(path: str) -> bool:
    """Whether the local directory `path` is a training workdir (it holds checkpoints/), not a
    model directory."""
    return os.path.isdir(os.path.join(path, CHECKPOINT_DIR))


def largest_array_bytes(abstract_state: Any) -> int:
    """The bytes of the largest array (leaf with a shape and dtype) of `abstract_state`."""
    return max(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))


@contextlib.contextmanager
def _orbax_logs_off() -> Iterator[None]:
    """Reading saved steps back, orbax logs that a read-only manager is read only, and an
    unreadable step's file contents as errors; what matters reaches the caller as exceptions and
    becomes one warning or error here."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.FATAL)
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def _read_only(workdir: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(_absolute(workdir) / CHECKPOINT_DIR,
                                 options=ocp.CheckpointManagerOptions(read_only=True))


def _pick_step(manager: ocp.CheckpointManager, step: int | None) -> int:
    steps = list(manager.all_steps())
    if not steps:
        raise CheckpointError(f"{manager.directory}: no saved checkpoints")
    if step is not None and step not in steps:
        raise CheckpointError(f"{manager.directory}: no step {step} (saved: {sorted(steps)})")
    return max(steps) if step is None else step


def saved_step(workdir: str, step: int | None = None) -> int:
    """`step` if the workdir has it saved (None: the newest saved step); else CheckpointError."""
    with _orbax_logs_off():
        manager = _read_only(workdir)
        try:
            return _pick_step(manager, step)
        finally:
            manager.close()


def restore_params(workdir: str, step: int | None, abstract_params: Any,
                   item: str = "params") -> tuple[int, Any]:
    """(step, parameters) of a saved step, gathered onto the host CPU; `item` "ema": an RLP
    run's EMA parameters instead.

    `step` None: the newest readable step; each unreadable newer one is a warning and is left
    where it is. A given `step` that cannot be read is a CheckpointError naming it.
    """
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu),
                          abstract_params)
    with _orbax_logs_off():
        manager = _read_only(workdir)
        try:
            _pick_step(manager, step)  # no saved step, or not the one asked for: an error
            saved = sorted(manager.all_steps(), reverse=True)
            found, restored, failed = _newest_readable(
                saved if step is None else [step],
                lambda s: manager.restore(s, args=ocp.args.Composite(
                    **{item: ocp.args.StandardRestore(target)})))
        finally:
            manager.close()
    if found is None and step is not None:
        others = [s for s in sorted(saved) if s != step]
        raise CheckpointError(
            f"{manager.directory}: step {step} is unreadable ({failed[0][1]}); pick another of "
            f"the saved steps {others}, or no step for the newest readable one")
    _warn_unreadable(manager.directory, failed)
    if found is None:
        raise CheckpointError(_none_readable(manager.directory, failed))
    if failed:
        logging.warning("using step %d, the newest readable one", found)
    return found, restored[item]


def _absolute(workdir: str) -> epath.Path:
    """The workdir as orbax needs it: local paths made absolute, remote (gs://) ones as given."""
    return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))
