"""What a training run shows and keeps: the progress line, metrics.jsonl, TensorBoard, summary."""

from __future__ import annotations

import json

import jax
import tensorboardX
from etils import epath

from qstar_jax import json_files

METRICS_FILE = "metrics.jsonl"
THOUGHTS_FILE = "thoughts.jsonl"  # {"step", "thoughts": [decoded samples]} per evaluation


def say(message: str, *args) -> None:
    """Progress for the person running the job: stdout of process 0 (library chatter is quieter)."""
    if jax.process_index() == 0:
        print(message % args if args else message, flush=True)


class MetricsLog:
    """metrics.jsonl and TensorBoard events (process 0). A resumed run first drops the lines
    after its starting step, so the file reads as if the run had never stopped; a fresh one
    starts the file anew. Local files are appended to; remote ones (gs://, no append) rewritten.
    """

    def __init__(self, workdir: str, start_step: int):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.path = epath.Path(workdir) / METRICS_FILE
        self.remote = "://" in workdir
        self.records: list[dict] = []
        if start_step and self.path.exists():
            self.records = [r for _, r in json_files.read_jsonl(self.path)
                            if r["step"] <= start_step]
        self._rewrite()
        self.tb = tensorboardX.SummaryWriter(str(epath.Path(workdir) / "tensorboard"),
                                             purge_step=start_step + 1 if start_step else None)

    def _rewrite(self) -> None:
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.records.append({"step": step, **metrics})
        if self.remote:
            self._rewrite()
        else:
            with self.path.open("a") as f:
                f.write(json.dumps(self.records[-1]) + "\n")
        for name, value in metrics.items():
            self.tb.add_scalar(name if "/" in name else f"train/{name}", value, step)
        self.tb.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def progress(step: int, total: int, m: dict) -> str:
    """The progress line; with thoughts, the loss is split into its NLL and policy term (times
    its weight), so that a growing policy term does not read as a diverging model. RLP's loss
    is its policy term (and, when asked, a weighted NLL): its split names both, and the EMA
    model's loss, its baseline."""
    talk = " ".join(f"{m[k]:.3f}" for k in sorted(m) if k.startswith("loss_talk_"))
    split = (f"(policy {m['policy_loss']:.3g}, nll {m['nll']:.4f}, ema {m['loss_ema']:.4f})  "
             if "loss_ema" in m else f"(nll {m['nll']:.4f} + policy {m['loss'] - m['nll']:.3g})  ")
    thinking = (split +
                f"base {m['loss_base']:.4f}  talk [{talk}]  reward {m['reward_mean']:.4f}  "
                f"w {m['mixing_weight_mean']:.3g}  ") if talk else ""
    return (f"step {step}/{total}  loss {m['loss']:.4f}  {thinking}|g| {m['grad_norm']:.3g}  "
            f"lr {m['learning_rate']:.3g}  {m['tokens_per_s']:.0f} tok/s  "
            f"{m['step_time_s']:.2f} s/step  "
            f"ETA {duration(m['step_time_s'] * (total - step))}")


def eval_line(step: int, seconds: float, metrics: dict, thinks: bool) -> str:
    """The line printed after a held-out evaluation."""
    head = f"eval at step {step} ({seconds:.1f} s): "
    if not thinks:
        return (head + f"loss {metrics['eval/loss_base']:.4f}  "
                f"hardest decile {metrics['eval/loss_base_hard']:.4f}")
    return (head + f"base {metrics['eval/loss_base']:.4f}  "
            f"thinking {metrics['eval/loss_think']:.4f}  "
            f"hardest decile: base {metrics['eval/loss_base_hard']:.4f}  "
            f"thinking {metrics['eval/loss_think_hard']:.4f}")


def append_thoughts(workdir: str, step: int, samples: list[str]) -> None:
    """Add an evaluation's decoded thoughts to thoughts.jsonl (rewritten whole: gs:// cannot
    append)."""
    path = epath.Path(workdir) / THOUGHTS_FILE
    kept = path.read_text() if path.exists() else ""
    path.write_text(kept + json.dumps({"step": step, "thoughts": samples}) + "\n")


def summary(records: list[dict], thinks: bool) -> None:
    """Held-out losses at the first and the last evaluation ("hardest decile": the tenth of the
    held-out tokens the starting model found hardest)."""
    evals = [r for r in records if "eval/loss_base" in r]
    if len(evals) < 2:
        return
    first, last = evals[0], evals[-1]
    print(f"held-out loss (nats/token), step {first['step']} -> step {last['step']}:")
    rows = (("base", "eval/loss_base"), ("with thinking", "eval/loss_think"),
            ("hardest decile, base", "eval/loss_base_hard"),
            ("hardest decile, with thinking", "eval/loss_think_hard"))
    for name, key in rows if thinks else rows[::2]:
        print(f"  {name + ':':31s}{first[key]:.4f} -> {last[key]:.4f}")

