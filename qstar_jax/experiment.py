"""Does thinking help? Quiet-STaR against plain training from the same start, over seeds.

    python -m qstar_jax.experiment --config=configs/experiment.py --workdir=runs/exp --seeds=0,1,2

For each seed, two arms train for the config's steps from the same starting weights, data order
and optimizer settings: `quiet_star` (the config as it is) and `control` (the same with n_ahead 1
and n_ahead_talk 1: plain language-model training, no thoughts). Both score the same held-out
tokens, and the difficulty deciles come from the starting model's loss on them.

Thinking helps when the Quiet-STaR model with thinking has a lower held-out loss than the control
of the same seed, in every seed, over at least three seeds, by a mean more than twice its
standard error; judged overall and on the hardest decile. Writes `WORKDIR/seed_<s>/<arm>/` (each
a training workdir: rerun the same command to resume), `WORKDIR/summary.json` and
`WORKDIR/report.html`; prints the summary as one JSON line, then the decile table, the verdict
and the report's path.
"""

from __future__ import annotations

import dataclasses
import json
import math

import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from qstar_jax import cli, heldout, host_memory, loading, logs, outputs, report, train

ARMS = ("quiet_star", "control")
MIN_SEEDS = 3  # a claim that thinking helps needs at least this many seeds
SAME_START_RTOL = 1e-4  # the arms' step-0 held-out losses agree to this, or the start differs


def control_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same run without thoughts: plain language-model training on the same data."""
    control = _copy(config)
    control.quiet_star.n_ahead = 1
    control.quiet_star.n_ahead_talk = 1
    return control


def _copy(config: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
    copy = ml_collections.ConfigDict(config.to_dict())
    copy.update(changes)
    return copy


@dataclasses.dataclass
class SeedResult:
    """One seed's held-out losses at the start and after training, per token [n], and what the
    arms logged."""

    seed: int
    start: np.ndarray  # the starting model's base-pass loss; defines the deciles
    control: np.ndarray  # the control after training
    base: np.ndarray  # the Quiet-STaR model's base pass after training
    think: np.ndarray  # the Quiet-STaR model with thinking after training
    talk: np.ndarray  # [T, n] the Quiet-STaR model's loss at each talk offset (NaN: no target)
    curves: dict[str, list[dict]]  # arm -> metrics.jsonl records
    thoughts: list[str]  # decoded at the last evaluation

    @property
    def decile(self) -> np.ndarray:
        return heldout.deciles(self.start)

    def by_decile(self, loss: np.ndarray) -> np.ndarray:
        return heldout.decile_means(self.decile, loss)

    @property
    def hard(self) -> np.ndarray:
        return self.decile == heldout.N_DECILES - 1


def run_seed(config: ml_collections.ConfigDict, workdir: str, seed: int) -> SeedResult:
    """Train both arms of `seed` (resuming what is there) and read their held-out losses."""
    dirs = {arm: str(epath.Path(workdir) / f"seed_{seed}" / arm) for arm in ARMS}
    configs = {"quiet_star": _copy(config, seed=seed),
               "control": control_config(_copy(config, seed=seed))}
    for arm in ARMS:
        _say(f"=== seed {seed}: {arm} arm, in {dirs[arm]}")
        if arm == "control":  # the same held-out rows, deciles and (random model) tokenizer
            _share(dirs["quiet_star"], dirs["control"])
        records = train.run(configs[arm], dirs[arm])
        host_memory.release()  # the arm's freed memory, before the next arm's
        last = max((r["step"] for r in records), default=0)
        if last < config.train_steps:
            raise Interrupted(f"the {arm} arm of seed {seed} stopped at step {last} of "
                              f"{config.train_steps}; rerun the same command to resume")
    return read_seed(dirs, seed, config.train_steps)


class Interrupted(RuntimeError):
    """An arm stopped before its last step (SIGTERM); its checkpoint is kept."""


def _share(source: str, target: str) -> None:
    """Give `target` the held-out rows and starting losses of `source` (and a random model's
    tokenizer), unless it has its own already."""
    src, dst = epath.Path(source), epath.Path(target)
    files = [f for f in (src / heldout.DIRECTORY).iterdir()
             if f.name in (heldout.ROWS, heldout.START_LOSS)]
    files += list((src / loading.TOKENIZER_DIR).glob("*"))
    for f in files:
        copy = dst / f.relative_to(src)
        if not copy.exists():
            copy.parent.mkdir(parents=True, exist_ok=True)
            f.copy(copy)


def read_seed(dirs: dict[str, str], seed: int, final_step: int) -> SeedResult:
    """A seed's losses from its arms' workdirs; checks that both arms started alike."""
    start = {arm: heldout.read_losses(dirs[arm], 0)["base"] for arm in ARMS}
    if not np.allclose(start["quiet_star"], start["control"], rtol=SAME_START_RTOL, atol=1e-5):
        raise ValueError(f"seed {seed}: the arms' held-out losses at step 0 differ (mean "
                         f"{start['quiet_star'].mean():.5f} against {start['control'].mean():.5f})"
                         ": they did not start from the same weights and held-out rows")
    qs = heldout.read_losses(dirs["quiet_star"], final_step)
    control = heldout.read_losses(dirs["control"], final_step)
    curves = {arm: _records(dirs[arm]) for arm in ARMS}
    thoughts_path = epath.Path(dirs["quiet_star"]) / logs.THOUGHTS_FILE
    samples = [json.loads(line) for line in thoughts_path.read_text().splitlines()]
    return SeedResult(seed=seed, start=start["quiet_star"], control=control["base"],
                      base=qs["base"], think=qs["talk"][0], talk=qs["talk"], curves=curves,
                      thoughts=[t for s in samples if s["step"] == final_step
                                for t in s["thoughts"]])


def _records(workdir: str) -> list[dict]:
    path = epath.Path(workdir) / logs.METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- the verdict


def verdict(differences: list[float]) -> dict:
    """Whether thinking helps, from per-seed differences (with thinking minus control; below 0
    favours thinking): in every seed, over MIN_SEEDS or more, mean beyond twice its standard
    error."""
    d = np.asarray(differences, float)
    n = d.size
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else None  # None: one seed has no spread
    favours = int(np.sum(d < 0))
    holds = bool(n >= MIN_SEEDS and favours == n and -d.mean() > 2 * se)
    return {"seeds": n, "mean": float(d.mean()), "standard_error": se,
            "favours_thinking_in": favours, "holds": holds}


def sentence(what: str, v: dict) -> str:
    """One line a newcomer can read, from a `verdict`."""
    gain = -v["mean"]
    direction = "better" if gain > 0 else "worse"
    amount = f"{abs(gain):.4f} nats/token {direction} than the control"
    if v["holds"]:
        return (f"{what}: thinking helps. With thinking the model is {amount} (mean of "
                f"{v['seeds']} seeds, standard error {v['standard_error']:.4f}), in every seed.")
    if v["seeds"] < MIN_SEEDS:  # the verdict line says why that shows nothing yet
        return f"{what}: with thinking the model was {amount} (mean of {v['seeds']} seed(s))."
    return (f"{what}: not shown. With thinking the model is {amount} on average over "
            f"{v['seeds']} seeds (standard error {v['standard_error']:.4f}), better in "
            f"{v['favours_thinking_in']} of them.")


def verdict_line(overall: dict, hardest: dict) -> str:
    """The answer in one line, from the `verdict`s overall and on the hardest decile."""
    n = overall["seeds"]
    amount = lambda v: (f"{abs(v['mean']):.4f} nats/token "  # noqa: E731
                        f"{'better' if v['mean'] < 0 else 'worse'}")
    if n < MIN_SEEDS:
        return (f"Verdict ({n} seed{'s' * (n > 1)}): with thinking the model was "
                f"{amount(overall)} than the control overall and {amount(hardest)} on the "
                f"hardest decile; fewer than {MIN_SEEDS} seeds cannot show that thinking helps "
                "(run --seeds=0,1,2).")
    status = lambda v: "thinking helps" if v["holds"] else "not shown"  # noqa: E731
    detail = lambda v: (f"{amount(v)} (standard error {v['standard_error']:.4f}, better in "  # noqa: E731
                        f"{v['favours_thinking_in']} of {n} seeds)")
    return (f"Verdict ({n} seeds): overall {status(overall)}, hardest decile "
            f"{status(hardest)}. With thinking against the control: overall {detail(overall)}; "
            f"hardest decile {detail(hardest)}.")


def summarize(results: list[SeedResult], description: str) -> dict:
    """The numbers the experiment reports (JSON-able), means over seeds where not per seed."""
    mean = lambda f: np.mean([f(r) for r in results], 0)  # noqa: E731
    columns = {"start": lambda r: r.start, "control": lambda r: r.control,
               "quiet_star_base": lambda r: r.base, "quiet_star_think": lambda r: r.think}
    overall = {k: float(mean(lambda r, f=f: f(r).mean())) for k, f in columns.items()}
    deciles = {k: mean(lambda r, f=f: r.by_decile(f(r))) for k, f in columns.items()}
    hardest = {k: float(v[-1]) for k, v in deciles.items()}
    diff_all = [float(r.think.mean() - r.control.mean()) for r in results]
    diff_hard = [float(r.think[r.hard].mean() - r.control[r.hard].mean()) for r in results]
    verdicts = {"overall": verdict(diff_all), "hardest_decile": verdict(diff_hard)}
    talk = mean(lambda r: _finite_mean(r.talk))
    rows = [["overall", *overall.values(), overall["control"] - overall["quiet_star_think"]]]
    rows += [[f"decile {d + 1}" + (" (hardest)" if d == 9 else ""),
              *(float(v[d]) for v in deciles.values()),
              float(deciles["control"][d] - deciles["quiet_star_think"][d])] for d in range(10)]
    per_seed = [[r.seed, diff_all[i], diff_hard[i]] for i, r in enumerate(results)]
    return {
        "description": description,
        "seeds": [r.seed for r in results],
        "overall": overall, "hardest_decile": hardest,
        "by_decile": {k: [float(x) for x in v] for k, v in deciles.items()},
        "talk_loss_by_offset": [None if math.isnan(x) else float(x) for x in talk],
        "think_minus_control": {"overall": diff_all, "hardest_decile": diff_hard},
        "verdict": verdicts,
        "verdict_line": verdict_line(verdicts["overall"], verdicts["hardest_decile"]),
        "verdicts": [sentence("Overall", verdicts["overall"]),
                     sentence("Hardest decile", verdicts["hardest_decile"])],
        "table_header": ["held-out tokens", "start", "control", "Quiet-STaR base",
                         "Quiet-STaR with thinking", "gain (control - thinking)"],
        "table": rows,
        "per_seed_header": ["seed", "overall", "hardest decile"],
        "per_seed": per_seed,
    }


def _finite_mean(x_TN: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the finite entries [T] (NaN where there are none)."""
    finite = np.isfinite(x_TN)
    with np.errstate(invalid="ignore"):
        return np.where(finite, x_TN, 0).sum(-1) / finite.sum(-1)


def print_table(summary: dict) -> None:
    """The decile table and the verdicts, for the terminal."""
    header = ["", "start", "control", "QS base", "QS think", "gain"]
    print("\nheld-out loss (nats/token), mean over seeds " + str(summary["seeds"]) +
          "; control: trained without thoughts; QS: Quiet-STaR; gain = control - QS think")
    print(f"{header[0]:22s}" + "".join(f"{h:>10s}" for h in header[1:]))
    for row in summary["table"]:
        print(f"{row[0]:22s}" + "".join(f"{v:10.4f}" for v in row[1:]))
    print("Quiet-STaR held-out loss at each talk offset t (x[j+1+t] after the thought at j): " +
          "  ".join(f"t={t}: {v:.4f}" for t, v in enumerate(summary["talk_loss_by_offset"])
                    if v is not None))
    print(summary["verdict_line"])


# ----------------------------------------------------------------------------- command line

def define_flags() -> None:
    """The command line's flags (defined when this module runs as the program)."""
    config_flags.DEFINE_config_file("config", None, "run config file (configs/*.py)",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "one training workdir per seed and arm, the summary "
                        "and the report; reused to resume")
    flags.DEFINE_list("seeds", ["0"], "training seeds, each a pair of arms (3 or more to judge "
                      "whether thinking helps)")


def _say(message: str) -> None:
    print(message, flush=True)


def run(config: ml_collections.ConfigDict, workdir: str, seeds: list[int]) -> dict:
    """Both arms of every seed, then summary.json, report.html and the summary (returned)."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds={','.join(map(str, seeds))}: name distinct seeds")
    if config.quiet_star.n_ahead < 3:
        raise ValueError(f"quiet_star.n_ahead={config.quiet_star.n_ahead}: the Quiet-STaR arm "
                         "needs thoughts (n_ahead >= 3); the control arm is made from it")
    outputs.prepare_workdir(workdir)  # before hours of training, not after
    out = epath.Path(workdir)
    report_path, summary_path = out / "report.html", out / "summary.json"
    results = [run_seed(config, workdir, seed) for seed in seeds]
    q = config.quiet_star
    description = (f"{len(seeds)} seed(s) x {config.train_steps} steps of batch "
                   f"{config.batch_size} x {config.seq_len} tokens; Quiet-STaR with n_ahead "
                   f"{q.n_ahead} ({q.n_ahead - 3} sampled thought tokens), n_ahead_talk "
                   f"{q.n_ahead_talk}, {q.n_passes} rationales, policy weight "
                   f"{q.policy_loss_beta:g}; the control trains the same model on the same "
                   "batches without thoughts. Difficulty deciles: the starting model's per-token "
                   "loss on the held-out tokens.")
    summary = summarize(results, description)
    seeds_data = [{"seed": r.seed, "curves": r.curves, "thoughts": r.thoughts,
                   "gain_by_decile": list(r.by_decile(r.control) - r.by_decile(r.think))}
                  for r in results]
    report_path.write_text(report.render(summary, seeds_data))
    summary["report"] = str(report_path)
    summary_path.write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("seeds", "overall", "hardest_decile",
                                                 "think_minus_control", "verdict", "report")}))
    print_table(summary)
    print(f"report: {report_path}")
    return summary


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config, workdir, seeds = (flags.FLAGS[k].value for k in ("config", "workdir", "seeds"))
    if config is None or not workdir:
        raise app.UsageError("--config and --workdir are required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        seeds = [int(s) for s in seeds]
    except ValueError:
        cli.fail(f"--seeds={','.join(seeds)}: expected integers such as 0,1,2", 2)
    try:
        run(config, workdir, seeds)
    except (ValueError, FileNotFoundError, train.NonFiniteLoss, Interrupted) as e:
        cli.fail(str(e))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
