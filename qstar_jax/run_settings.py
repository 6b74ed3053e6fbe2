"""A run's settings as its workdir keeps them: the first config, each change a resume made, and
which keys a resume may change.

`config.json` holds the resolved config of the run's first start and is never rewritten. Each
resume that changes a setting appends one line to `config_history.jsonl` (when, after which
saved step, each key's old and new value), so the settings of every step stay on record; the
run's current settings are the first config with those changes applied (`load_config`).

A resume compares its config with the current settings, key by key:
- FIXED keys shape the parameters, the optimizer state or the tokenizer, or set the objective,
  the data stream and the held-out rows: a change refuses the resume, naming each key.
- MAY_CHANGE keys (how long the run goes on, what it logs and keeps, how its arrays lie on the
  devices) are accepted, with one line saying what changed.
- Any other key (the optimizer's settings, the compute dtype) changes how the run continues: it
  is accepted only when asked for (`allow_changes`, the train command's --resume_with_changes).
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import ml_collections
from etils import epath

from qstar_jax.checkpoint import CHECKPOINT_DIR
from qstar_jax.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from qstar_jax.json_files import read_json, read_jsonl

CONFIG_FILE = "config.json"  # the resolved config of the run's first start
HISTORY_FILE = "config_history.jsonl"  # one line per resume that changed a setting

MAY_CHANGE = ("train_steps", "log_every", "eval_every", "checkpoint_every", "checkpoint_keep",
              "distributed", "mesh", "model.remat_policy")
FIXED = ("model", "quiet_star", "data", "seed", "batch_size", "seq_len", "eval_batches")
WITH_FLAG = ("model.dtype", "optim")  # the default for any key in neither list above
KINDS = {**{p: "fixed" for p in FIXED}, **{p: "may" for p in MAY_CHANGE},
         **{p: "flag" for p in WITH_FLAG}}


def kind(key: str) -> str:
    """"fixed", "may" or "flag" for a dotted config key: that of its longest listed prefix."""
    matches = [p for p in KINDS if key == p or key.startswith(p + ".")]
    return KINDS[max(matches, key=len)] if matches else "flag"


def flat(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """The config's values by dotted key, as JSON writes them (tuples as lists)."""
    tree = json.loads(config.to_json_best_effort()) if isinstance(
        config, ml_collections.ConfigDict) else config
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in flat(value).items()})
        else:
            out[key] = value
    return out


def differences(old: ml_collections.ConfigDict | dict, new: ml_collections.ConfigDict | dict
                ) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old value, new value)} where the two configs differ (None: no such key)."""
    a, b = flat(old), flat(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    """'key old -> new, ...' ('(none)' for a key one side lacks)."""
    show = lambda v: "(none)" if v is None else json.dumps(v)  # noqa: E731
    return ", ".join(f"{k} {show(a)} -> {show(b)}" for k, (a, b) in changes.items())


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's current settings: its first config with each recorded change applied."""
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such file (not a training workdir?)")
    config = read_json(path, CheckpointError)
    for record in _history(workdir):
        for key, (_, new) in record["changes"].items():
            _set(config, key, new)
    return ml_collections.ConfigDict(config)


def _history(workdir: str) -> list[dict]:
    path = epath.Path(workdir) / HISTORY_FILE
    return [entry for _, entry in read_jsonl(path)] if path.exists() else []


def _set(tree: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    if value is None:
        tree.pop(last, None)
    else:
        tree[last] = value


def check(workdir: str, config: ml_collections.ConfigDict, allow_changes: bool = False,
          main_process: bool = True) -> dict[str, tuple[Any, Any]]:
    """Write the first config of a new run, or check a resume's `config` against the current
    settings; returns what it changes, for `record` once the resume has its state. A ConfigError
    for a change to a FIXED key, or to any key not in MAY_CHANGE unless `allow_changes`."""
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        if main_process:
            path.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
        return {}
    changes = differences(load_config(workdir), config)
    fixed = {k: v for k, v in changes.items() if kind(k) == "fixed"}
    if fixed:
        others = {k: v for k, v in changes.items() if k not in fixed}
        also = f" (other keys that differ: {describe(others)})" if others else ""
        afresh = "train afresh in a new --workdir" if _newest_step(workdir) is not None else \
            f"delete {workdir} (it has no saved step) to start it with these"
        raise ConfigError(f"{workdir} holds a run whose settings a resume cannot change: "
                          f"{describe(fixed)}{also}; resume with the saved values (see {path}), "
                          f"or {afresh}")
    flagged = {k: v for k, v in changes.items() if kind(k) == "flag"}
    if flagged and not allow_changes:
        raise ConfigError(f"resuming {workdir} would change {describe(flagged)}: pass "
                          "--resume_with_changes to go on with the new values (recorded in "
                          f"{HISTORY_FILE}), or resume with the saved ones")
    return changes


def record(workdir: str, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append a resume's `changes` (from `check`) to the workdir's history."""
    entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "after_step": _newest_step(workdir), "changes": {k: list(v) for k, v in
                                                               changes.items()}}
    with (epath.Path(workdir) / HISTORY_FILE).open("a") as f:
        f.write(json.dumps(entry) + "\n")


def _newest_step(workdir: str) -> int | None:
    directory = epath.Path(workdir) / CHECKPOINT_DIR
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if \
        directory.exists() else []
    return max(steps, default=None)
