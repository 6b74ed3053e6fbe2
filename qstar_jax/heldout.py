"""The fixed held-out set of a run: its rows, the starting model's per-token losses and the
difficulty deciles they define, kept in the workdir so that every evaluation (after a resume, and
in both arms of an experiment) scores the same tokens against the same difficulty.

Files under `workdir/heldout/`:
- `rows.npz`: the global rows {"tokens", "mask"} [W, B, L], the same for any number of processes;
- `start_loss.npy`: float32 [n], the starting model's base-pass loss of each valid held-out token,
  in evaluation order;
- `losses_<step>.npz`: each evaluation's per-token losses, "base" [n] and "talk" [T, n] (NaN
  where an offset has no target), the most likely next token of the base pass and after
  thinking, "base_argmax" and "think_argmax" [n], and the thought before each, "thoughts"
  [n, M].

Token i of these [n] arrays is the i-th valid target of the rows in order (`targets`).
"""

from __future__ import annotations

import io

import numpy as np
from etils import epath

from qstar_jax.errors import ConfigError, DataError, PathNotFoundError

DIRECTORY = "heldout"
ROWS = "rows.npz"
START_LOSS = "start_loss.npy"
N_DECILES = 10


def directory(workdir: str) -> epath.Path:
    return epath.Path(workdir) / DIRECTORY


def _write(path: epath.Path, save, value) -> None:
    """np.save/np.savez into `path` (local or remote) through a buffer, complete or not at all."""
    buffer = io.BytesIO()
    save(buffer, **value) if isinstance(value, dict) else save(buffer, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp"
    staging.write_bytes(buffer.getvalue())
    staging.replace(path)


def _read(path: epath.Path, fix: str = "delete it to choose the held-out set again, or start "
          "a new workdir"):
    try:
        return np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path} is unreadable ({e}): {fix}") from None


def read_rows(workdir: str) -> dict[str, np.ndarray] | None:
    """The saved held-out rows {"tokens", "mask"} [W, B, L] (W batches of B global rows), or
    None before the first evaluation."""
    path = directory(workdir) / ROWS
    if not path.exists():
        return None
    saved = _read(path)
    return {k: saved[k] for k in ("tokens", "mask")}


def write_rows(workdir: str, rows: dict[str, np.ndarray]) -> None:
    _write(directory(workdir) / ROWS, np.savez, rows)


def host_rows(rows: dict[str, np.ndarray], process_index: int = 0,
              process_count: int = 1) -> list[dict]:
    """Host `process_index`'s share of each saved batch (rows [i*B/n, (i+1)*B/n)), as batches."""
    n_rows = rows["tokens"].shape[1]
    if n_rows % process_count:
        raise ConfigError(f"the saved held-out batches have {n_rows} rows, which do not split "
                          f"over {process_count} processes")
    share = n_rows // process_count
    cut = slice(process_index * share, (process_index + 1) * share)
    return [{k: rows[k][b, cut] for k in ("tokens", "mask")}
            for b in range(rows["tokens"].shape[0])]


def read_start_loss(workdir: str) -> np.ndarray | None:
    """The starting model's per-token losses, or None before the first evaluation."""
    path = directory(workdir) / START_LOSS
    if not path.exists():
        return None
    loss = _read(path)
    if loss.dtype != np.float32 or loss.ndim != 1:
        raise DataError(f"{path} holds {loss.dtype} {loss.shape}, not float32 [tokens]: delete "
                        "it to choose the difficulty deciles again")
    return loss


def write_start_loss(workdir: str, loss: np.ndarray) -> None:
    _write(directory(workdir) / START_LOSS, np.save, np.asarray(loss, np.float32))


LOSS_KEYS = ("base", "talk", "base_argmax", "think_argmax", "thoughts")


def write_losses(workdir: str, step: int, arrays: dict[str, np.ndarray]) -> None:
    """Write an evaluation's per-token arrays (LOSS_KEYS; see the module doc)."""
    if sorted(arrays) != sorted(LOSS_KEYS):
        raise ValueError(f"write_losses takes {list(LOSS_KEYS)}, got {sorted(arrays)}")
    _write(directory(workdir) / f"losses_{step}.npz", np.savez, arrays)


def targets(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Where each scored token of the saved rows [W, B, L] sits, in the order of the per-token
    arrays: "row" and "position" j (of the flattened [N * B, L] rows) [n], the token x[j] the
    prediction is made at and the target x[j + 1] [n]. A target is valid where it is a real
    token (scoring.token_losses)."""
    tokens = rows["tokens"].reshape(-1, rows["tokens"].shape[-1])
    mask = rows["mask"].reshape(tokens.shape)
    valid = np.zeros_like(mask)
    valid[:, :-1] = mask[:, 1:]
    row, position = np.nonzero(valid)
    return {"row": row, "position": position, "token": tokens[row, position],
            "target": tokens[row, position + 1]}


def read_losses(workdir: str, step: int) -> dict[str, np.ndarray]:
    """The per-token losses of the evaluation at `step` (see the module doc)."""
    path = directory(workdir) / f"losses_{step}.npz"
    if not path.exists():
        raise PathNotFoundError(f"{path} does not exist: no evaluation at step {step} in {workdir}")
    saved = _read(path, "that evaluation's losses are lost; evaluate the step's checkpoint "
                  "again, or start a new workdir")
    return {k: saved[k] for k in LOSS_KEYS if k in saved}


def deciles(start_loss: np.ndarray) -> np.ndarray:
    """Difficulty decile (0 easiest .. 9 hardest) of each token [n], by the starting model's loss;
    a token at a decile's lower edge belongs to that decile."""
    edges = np.quantile(start_loss, np.arange(1, N_DECILES) / N_DECILES)
    return np.searchsorted(edges, start_loss, side="right").astype(np.int32)


def decile_means(decile: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Mean of `loss` [n] over the tokens of each decile [10] (NaN for an empty decile)."""
    counts = np.bincount(decile, minlength=N_DECILES)
    sums = np.bincount(decile, weights=loss, minlength=N_DECILES)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
