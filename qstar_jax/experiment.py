"""Does thinking help? Quiet-STaR or RLP against plain training from the same start, over seeds.

    python -m qstar_jax.experiment --config=configs/experiment.py --workdir=runs/exp --seeds=0,1,2

For each seed, the arms train for the config's steps from the same starting weights, data order
and optimizer settings. The thinking arms: `quiet_star` (the config as it is, trained with the
Quiet-STaR objective) and `rlp` (the same thought settings trained with the RLP objective,
`rlp.py`). The others: `control` (n_ahead 1 and n_ahead_talk 1: plain language-model training,
no thoughts) and `filler` (thoughts of the same length whose tokens are all pad_id: the extra
computation without any content, trained with the NLL). By default the arms are the config's
own thinking arm (its `quiet_star.objective`: `configs/experiment.py:rlp` runs `rlp`), the
control and the filler arm; `--arms=quiet_star,rlp,control,filler` runs both thinking arms
against one control and one filler arm. All score the same held-out tokens, and the difficulty
deciles come from the starting model's loss on them.

Thinking helps when a thinking arm's model with thinking has a lower held-out loss than the
control of the same seed, in every seed, over at least three seeds, by a mean more than twice
its standard error; judged overall and on the hardest decile (and against the filler arm:
whether the thoughts' content helps), for each thinking arm apart. A config with a
`base_model` section (configs/known_answer.py) first trains the model every arm starts from
(`base_model.py`); on the known-answer task the experiment also runs the predictor check
(`predictor_check.py`, at the Quiet-STaR objective whichever arms run) and judges the answer
tokens apart (`answer_tokens` in the summary). Writes `WORKDIR/seed_<s>/<arm>/` (each a training
workdir: rerun the same command to resume), `WORKDIR/summary.json` and `WORKDIR/report.html`;
prints the summary as one JSON line, then the tables, the verdicts and the report's path.

`summary.json` is the first thinking arm's summary (quiet_star before rlp: the "primary", whose
held-out rows every arm shares), with `thinking_arm` naming it and, when a second thinking arm
ran, that arm's summary of the same layout under `other_thinking_arms[name]`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable

import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from qstar_jax import (
    base_model,
    cli,
    heldout,
    host_memory,
    json_files,
    known_answer,
    loading,
    logs,
    outputs,
    predictor_check,
    report,
    train,
)
from qstar_jax import config as config_lib
from qstar_jax.errors import ConfigError, DataError
from qstar_jax.model import ModelConfig

ARMS = ("quiet_star", "rlp", "control", "filler")
THINKING_ARMS = ("quiet_star", "rlp")  # each named after its objective
NAMES = {"quiet_star": "Quiet-STaR", "rlp": "RLP"}  # a thinking arm's objective, as people write it
SHORT_NAMES = {"quiet_star": "QS", "rlp": "RLP"}  # in the terminal's narrow columns
MIN_SEEDS = 3  # a claim that thinking helps needs at least this many seeds
SAME_START_RTOL = 1e-4  # the arms' step-0 held-out losses agree to this, or the start differs


def objective(config: ml_collections.ConfigDict) -> str:
    """The config's training objective (`quiet_star.objective`): its own thinking arm."""
    return config.quiet_star.get("objective", "quiet_star")


def default_arms(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The arms run without --arms: the config's own thinking arm, the control and the filler."""
    return (objective(config), "control", "filler")


def check_arms(config: ml_collections.ConfigDict, arms: tuple[str, ...]) -> tuple[str, ...]:
    """`arms` in ARMS order, or a ConfigError: unknown names, no control, no thinking
    arm, or a quiet_star arm asked of a config that is RLP's."""
    if unknown := sorted(set(arms) - set(ARMS)):
        raise ConfigError(f"--arms: unknown arm(s) {', '.join(unknown)}; expected some of "
                          f"{', '.join(ARMS)}")
    if "control" not in arms:
        raise ConfigError("--arms: control is needed (the verdict compares each thinking arm "
                          "with control)")
    if not set(arms) & set(THINKING_ARMS):
        raise ConfigError(f"--arms: a thinking arm ({' or '.join(THINKING_ARMS)}) is needed (the "
                          "verdict compares it with control)")
    if "quiet_star" in arms:
        _quiet_star_objective(config)
    return tuple(a for a in ARMS if a in arms)


def _quiet_star_objective(config: ml_collections.ConfigDict) -> None:
    if objective(config) == "rlp":
        raise ConfigError("--arms: the quiet_star arm trains the config as it is, and this config "
                          "is RLP's (quiet_star.objective='rlp'): its thinking arm is rlp; drop "
                          ":rlp from --config to run Quiet-STaR")


def _with_objective(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    copy = _copy(config)
    copy.quiet_star.objective = name
    return copy


def control_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same run without thoughts: plain language-model training on the same data."""
    control = _with_objective(config, "quiet_star")
    control.quiet_star.n_ahead = 1
    control.quiet_star.n_ahead_talk = 1
    return control


def filler_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same run with thoughts whose tokens are all pad_id: as long, with nothing in them,
    trained with the Quiet-STaR objective (whose NLL is all that trains: RLP has no drawn
    thoughts to reinforce here)."""
    filler = _with_objective(config, "quiet_star")
    filler.quiet_star.filler_thoughts = True
    return filler


def quiet_star_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config as it is; refused for a config whose objective is RLP's."""
    _quiet_star_objective(config)
    return _copy(config)


def rlp_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same thought settings, data, optimizer and seed, trained with the RLP objective."""
    return _with_objective(config, "rlp")


def arm_config(config: ml_collections.ConfigDict, arm: str, seed: int) -> ml_collections.ConfigDict:
    """The config of one arm of `seed`: they differ only in their thought settings."""
    make = {"quiet_star": quiet_star_config, "rlp": rlp_config, "control": control_config,
            "filler": filler_config}[arm]
    return make(_copy(config, seed=seed))


def _check_arm_settings(config: ml_collections.ConfigDict, arms: tuple[str, ...]) -> None:
    """Each arm's `quiet_star` section is one QuietStarConfig takes, and the RLP arm has the
    rationales its advantage compares: checked before any arm trains, not when its turn comes."""
    probe = ModelConfig(vocab_size=2, d_model=1, n_layers=1, n_heads=1, n_kv_heads=1, ffn_dim=1)
    for arm in arms:
        section = arm_config(config, arm, config.seed).quiet_star
        try:
            config_lib.quiet_star_config(section, probe, config_lib.ThoughtIds(0, 1, 0))
        except ConfigError as e:  # QuietStarConfig's checks of the section
            raise ConfigError(f"the {arm} arm: {e}") from None
        if arm == "rlp" and section.n_passes < 2:
            raise ConfigError(f"the rlp arm: quiet_star.n_passes={section.n_passes}, and RLP's "
                              "advantage compares the rationales of a position: it needs "
                              "n_passes >= 2")


def _copy(config: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
    copy = ml_collections.ConfigDict(config.to_dict())
    copy.update(changes)
    return copy


@dataclasses.dataclass
class AnswerScores:
    """A seed's held-out answer tokens of the known-answer task, per arm and evaluation step."""

    steps: list[int]  # the evaluation steps
    loss: dict[str, list[float]]  # arm -> answer loss with thinking (the control: without)
    accuracy: dict[str, list[float]]  # arm -> share of answers that are the most likely token
    correct_steps: dict[str, list[float]]  # thinking arm -> share of its thoughts with the steps


@dataclasses.dataclass
class SeedResult:
    """One seed's held-out losses at the start and after training, per token [n], and what the
    arms logged, as seen by one thinking arm (`arm`)."""

    seed: int
    start: np.ndarray  # the starting model's base-pass loss; defines the deciles
    control: np.ndarray  # the control after training
    base: np.ndarray  # the thinking arm's base pass after training
    think: np.ndarray  # the thinking arm with thinking after training
    talk: np.ndarray  # [T, n] the thinking arm's loss at each talk offset (NaN: no target)
    curves: dict[str, list[dict]]  # arm -> metrics.jsonl records, every arm of the seed
    thoughts: list[str]  # the thinking arm's, decoded at the last evaluation
    filler: np.ndarray | None = None  # the filler arm with its thoughts after training
    answers: AnswerScores | None = None  # the known-answer task's answer tokens
    arm: str = "quiet_star"  # the thinking arm whose losses base, think and talk are

    @property
    def decile(self) -> np.ndarray:
        return heldout.deciles(self.start)

    def by_decile(self, loss: np.ndarray) -> np.ndarray:
        return heldout.decile_means(self.decile, loss)

    @property
    def hard(self) -> np.ndarray:
        return self.decile == heldout.N_DECILES - 1


def _thinking(arms: Iterable[str]) -> list[str]:
    """The thinking arms among `arms`, in ARMS order: the first is the primary."""
    return [a for a in ARMS if a in arms and a in THINKING_ARMS]


def run_seed(config: ml_collections.ConfigDict, workdir: str, seed: int,
             arms: tuple[str, ...] | None = None, allow_changes: bool = False
             ) -> dict[str, SeedResult]:
    """Train the `arms` of `seed` (resuming what is there; None: `default_arms`) and read their
    held-out losses, one SeedResult per thinking arm."""
    arms = check_arms(config, default_arms(config) if arms is None else arms)
    dirs = {arm: str(epath.Path(workdir) / f"seed_{seed}" / arm) for arm in arms}
    primary = _thinking(arms)[0]
    for arm in arms:
        _say(f"=== seed {seed}: {arm} arm, in {dirs[arm]}")
        if arm != primary:  # the same held-out rows, deciles and (random model) tokenizer
            _share(dirs[primary], dirs[arm])
        records = train.run(arm_config(config, arm, seed), dirs[arm], allow_changes)
        host_memory.release()  # the arm's freed memory, before the next arm's
        last = max((r["step"] for r in records), default=0)
        if last < config.train_steps:
            raise train.Interrupted(f"the {arm} arm of seed {seed} stopped at step {last} of "
                                    f"{config.train_steps}; rerun the same command to resume")
    steps = config.data.steps if config.data.source == "known_answer" else None
    return read_seed(dirs, seed, config.train_steps, steps)


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


def read_seed(dirs: dict[str, str], seed: int, final_step: int,
              task_steps: int | None = None) -> dict[str, SeedResult]:
    """A seed's losses from its arms' workdirs, one SeedResult per thinking arm in ARMS order
    (`task_steps`: the known-answer task's digits, whose answer tokens are then scored apart);
    checks that every arm started as the first thinking arm did."""
    thinking = _thinking(dirs)
    primary = thinking[0]
    start = {arm: heldout.read_losses(d, 0)["base"] for arm, d in dirs.items()}
    for arm in dirs:
        if not np.allclose(start[primary], start[arm], rtol=SAME_START_RTOL, atol=1e-5):
            raise DataError(f"seed {seed}: the {arm} arm's held-out losses at step 0 differ "
                            f"from the {primary} arm's (mean {start[arm].mean():.5f} against "
                            f"{start[primary].mean():.5f}): they did not start from the "
                            "same weights and held-out rows")
    final = {arm: heldout.read_losses(d, final_step) for arm, d in dirs.items()}
    curves = {arm: _records(d) for arm, d in dirs.items()}
    answers = None if task_steps is None else answer_scores(dirs, curves, task_steps)
    out = {}
    for arm in thinking:
        thoughts_path = epath.Path(dirs[arm]) / logs.THOUGHTS_FILE
        samples = [s for _, s in json_files.read_jsonl(thoughts_path)]
        out[arm] = SeedResult(
            seed=seed, start=start[primary], control=final["control"]["base"],
            base=final[arm]["base"], think=final[arm]["talk"][0], talk=final[arm]["talk"],
            curves=curves,
            thoughts=[t for s in samples if s["step"] == final_step for t in s["thoughts"]],
            filler=final["filler"]["talk"][0] if "filler" in final else None,
            answers=answers, arm=arm)
    return out


def answer_scores(dirs: dict[str, str], curves: dict[str, list[dict]],
                  task_steps: int) -> AnswerScores:
    """The answer tokens' loss and accuracy per arm at every evaluation, and the share of each
    thinking arm's thoughts at "=" that hold the right steps."""
    thinking = _thinking(dirs)
    rows = heldout.read_rows(dirs[thinking[0]])
    at = heldout.targets(rows)
    answer = known_answer.answer_positions(at["token"])
    tokens = rows["tokens"].reshape(-1, rows["tokens"].shape[-1])
    right_nS = known_answer.correct_steps(tokens, task_steps)[at["row"], at["position"]][answer]
    steps = sorted({r["step"] for r in curves[thinking[0]] if "eval/loss_base" in r})
    loss, accuracy, correct = {}, {}, {}
    for arm, d in dirs.items():
        per_step = [heldout.read_losses(d, s) for s in steps]
        # With thinking; a model that does not think (the control) scores its base pass there.
        loss[arm] = [float(x["talk"][0][answer].mean()) for x in per_step]
        accuracy[arm] = [float(np.mean(x["think_argmax"][answer] == at["target"][answer]))
                         for x in per_step]
        if arm in thinking:
            correct[arm] = [float(np.mean(np.all(x["thoughts"][answer] == right_nS, -1)))
                            for x in per_step]
    return AnswerScores(steps, loss, accuracy, correct)


def _records(workdir: str) -> list[dict]:
    return [r for _, r in json_files.read_jsonl(epath.Path(workdir) / logs.METRICS_FILE)]


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


def sentence(what: str, v: dict, against: str = "the control") -> str:
    """One line a newcomer can read, from a `verdict` of thinking against `against`."""
    gain = -v["mean"]
    direction = "better" if gain > 0 else "worse"
    amount = f"{abs(gain):.4f} nats/token {direction} than {against}"
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
    """The numbers the experiment reports for one thinking arm (JSON-able), means over seeds
    where not per seed; its columns are named by arm (`{arm}_base`, `{arm}_think`)."""
    arm = _one_arm(results)
    name = NAMES[arm]
    mean = lambda f: np.mean([f(r) for r in results], 0)  # noqa: E731
    columns = {"start": lambda r: r.start, "control": lambda r: r.control,
               f"{arm}_base": lambda r: r.base, f"{arm}_think": lambda r: r.think}
    filler = all(r.filler is not None for r in results)
    if filler:
        columns["filler_think"] = lambda r: r.filler
    overall = {k: float(mean(lambda r, f=f: f(r).mean())) for k, f in columns.items()}
    deciles = {k: mean(lambda r, f=f: r.by_decile(f(r))) for k, f in columns.items()}
    hardest = {k: float(v[-1]) for k, v in deciles.items()}
    diff_all = [float(r.think.mean() - r.control.mean()) for r in results]
    diff_hard = [float(r.think[r.hard].mean() - r.control[r.hard].mean()) for r in results]
    verdicts = {"overall": verdict(diff_all), "hardest_decile": verdict(diff_hard)}
    talk = mean(lambda r: _finite_mean(r.talk))
    rows = [["overall", *overall.values(), overall["control"] - overall[f"{arm}_think"]]]
    rows += [[f"decile {d + 1}" + (" (hardest)" if d == 9 else ""),
              *(float(v[d]) for v in deciles.values()),
              float(deciles["control"][d] - deciles[f"{arm}_think"][d])] for d in range(10)]
    per_seed = [[r.seed, diff_all[i], diff_hard[i]] for i, r in enumerate(results)]
    sentences = [sentence("Overall", verdicts["overall"]),
                 sentence("Hardest decile", verdicts["hardest_decile"])]
    summary = {
        "thinking_arm": arm,
        "description": description,
        "seeds": [r.seed for r in results],
        "overall": overall, "hardest_decile": hardest,
        "by_decile": {k: [float(x) for x in v] for k, v in deciles.items()},
        "talk_loss_by_offset": [None if math.isnan(x) else float(x) for x in talk],
        "think_minus_control": {"overall": diff_all, "hardest_decile": diff_hard},
        "verdict": verdicts,
        "verdict_line": verdict_line(verdicts["overall"], verdicts["hardest_decile"]),
        "verdicts": sentences,
        "table_header": ["held-out tokens", "start", "control", f"{name} base",
                         f"{name} with thinking", *(["filler with its thoughts"] * filler),
                         "gain (control - thinking)"],
        "table": rows,
        "per_seed_header": ["seed", "overall", "hardest decile"],
        "per_seed": per_seed,
    }
    if filler:
        against = [float(r.think.mean() - r.filler.mean()) for r in results]
        summary["think_minus_filler"] = {"overall": against}
        summary["verdict_filler"] = {"overall": verdict(against)}
        sentences.append(sentence("Against the filler arm, overall", verdict(against),
                                  "the filler arm"))
    if all(r.answers is not None for r in results):
        summary["answer_tokens"] = answer_summary(results)
        sentences.extend(summary["answer_tokens"]["verdicts"])
    return summary


def summarize_arms(by_arm: dict[str, list[SeedResult]], description: str) -> dict:
    """The summary of the first thinking arm in ARMS order (see `summarize`), with each other
    thinking arm's own summary under `other_thinking_arms[arm]`."""
    arms = _thinking(by_arm)
    summary = summarize(by_arm[arms[0]], description)
    if len(arms) > 1:
        summary["other_thinking_arms"] = {a: summarize(by_arm[a], description)
                                          for a in arms[1:]}
    return summary


def thinking_summaries(summary: dict) -> list[dict]:
    """The summary of every thinking arm that ran, the primary first."""
    return [summary, *summary.get("other_thinking_arms", {}).values()]


def _one_arm(results: list[SeedResult]) -> str:
    arms = {r.arm for r in results}
    if len(arms) != 1:
        raise ValueError(f"one summary is of one thinking arm, not of {sorted(arms)}")
    return arms.pop()


def answer_summary(results: list[SeedResult]) -> dict:
    """The known-answer task's answer tokens for one thinking arm: losses and accuracies of it
    and of the arms without a policy (means over seeds after training), the verdicts of
    thinking against the control and the filler arm, the issue's targets per seed, and the
    curves over the evaluations (means over seeds)."""
    think = _one_arm(results)
    arms = [a for a in results[0].answers.loss if a == think or a not in THINKING_ARMS]
    last = lambda r, key, arm: getattr(r.answers, key)[arm][-1]  # noqa: E731
    loss = {a: float(np.mean([last(r, "loss", a) for r in results])) for a in arms}
    accuracy = {a: float(np.mean([last(r, "accuracy", a) for r in results])) for a in arms}
    against = {other: [last(r, "loss", think) - last(r, "loss", other) for r in results]
               for other in arms if other != think}
    verdicts = {other: verdict(d) for other, d in against.items()}
    thinking = [last(r, "loss", think) for r in results]
    control = [last(r, "loss", "control") for r in results]
    correct = [(r.answers.correct_steps[think][0], r.answers.correct_steps[think][-1])
               for r in results]
    targets = {
        "half_of_control_in_every_seed": all(q <= c / 2 for q, c in zip(thinking, control,
                                                                      strict=True)),
        "correct_steps_rise_in_every_seed": all(end > begin for begin, end in correct),
        "verdict_holds": verdicts["control"]["holds"],
    }
    if "filler" in against:
        targets["below_filler_in_every_seed"] = all(d < 0 for d in against["filler"])
    curve = lambda key, arm: list(np.mean([getattr(r.answers, key)[arm]  # noqa: E731
                                           for r in results], 0))
    n = len(results)
    status = ("thinking helps" if verdicts["control"]["holds"] else
              "fewer than 3 seeds cannot show it" if n < MIN_SEEDS else "not shown")
    others = ", ".join(f"{loss[o]:.4f} for the {o} arm" for o in against)
    line = (f"Answer tokens ({n} seed{'s' * (n > 1)}): {status}. With thinking the answer loss "
            f"is {loss[think]:.4f} nats against {others}; the answer is the most likely "
            f"token in {accuracy[think]:.0%} of the held-out rows with thinking, "
            f"{accuracy['control']:.0%} for the control.")
    return {
        "verdict_line": line,
        "loss": loss, "accuracy": accuracy,
        "think_minus": against, "verdict": verdicts,
        "verdicts": [sentence("Answer tokens", verdicts["control"])] + [
            sentence(f"Answer tokens against the {o} arm", v, f"the {o} arm")
            for o, v in verdicts.items() if o != "control"],
        "targets": targets,
        "per_seed_header": ["seed", *(f"{a} loss" for a in arms),
                            *(f"{a} accuracy" for a in arms),
                            "correct steps at the start", "correct steps after training"],
        "per_seed": [[r.seed, *(last(r, "loss", a) for a in arms),
                      *(last(r, "accuracy", a) for a in arms), *c]
                     for r, c in zip(results, correct, strict=True)],
        "curves": {"steps": results[0].answers.steps,
                   "loss": {a: curve("loss", a) for a in arms},
                   "accuracy": {a: curve("accuracy", a) for a in arms},
                   "correct_steps": list(np.mean([r.answers.correct_steps[think]
                                                  for r in results], 0))},
    }


def _finite_mean(x: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the finite entries (NaN where there are none)."""
    finite = np.isfinite(x)
    with np.errstate(invalid="ignore"):
        return np.where(finite, x, 0).sum(-1) / finite.sum(-1)


def print_table(summary: dict) -> None:
    """For the terminal, per thinking arm (a section each when several ran): the decile
    table, the answer tokens' table and the verdicts."""
    sections = thinking_summaries(summary)
    for part in sections:
        arm = part.get("thinking_arm", "quiet_star")
        name, short = NAMES[arm], SHORT_NAMES[arm]
        if len(sections) > 1:
            print(f"\n=== the {arm} arm ({name})")
        filler = "filler_think" in part["overall"]
        header = ["", "start", "control", f"{short} base", f"{short} think",
                  *(["filler"] * filler), "gain"]
        legend = f"{short}: {name}; " if short != name else ""
        print("\nheld-out loss (nats/token), mean over seeds " + str(part["seeds"]) +
              f"; control: trained without thoughts; {legend}"
              + ("filler: thoughts of pad tokens; " if filler else "")
              + f"gain = control - {short} think")
        print(f"{header[0]:22s}" + "".join(f"{h:>10s}" for h in header[1:]))
        for row in part["table"]:
            print(f"{row[0]:22s}" + "".join(f"{v:10.4f}" for v in row[1:]))
        print(f"{name} held-out loss at each talk offset t (x[j+1+t] after the thought at j): " +
              "  ".join(f"t={t}: {v:.4f}" for t, v in enumerate(part["talk_loss_by_offset"])
                        if v is not None))
        if answers := part.get("answer_tokens"):
            print("answer tokens after training, mean over seeds: " + "; ".join(
                f"{a} loss {answers['loss'][a]:.4f}, accuracy {answers['accuracy'][a]:.3f}"
                for a in answers["loss"]))
            shares = answers["curves"]["correct_steps"]
            print(f"thoughts at '=' with the right steps: {shares[0]:.3f} at the start, "
                  f"{shares[-1]:.3f} after training ({name} arm)")
            print("targets: " + ", ".join(f"{k} {'yes' if v else 'NO'}"
                                           for k, v in answers["targets"].items()))
        for line in part["verdicts"][2:]:
            print(line)
        print(part["verdict_line"])
        if answers:
            print(answers["verdict_line"])


# ----------------------------------------------------------------------------- command line

def define_flags() -> None:
    """The command line's flags (defined when this module runs as the program)."""
    config_flags.DEFINE_config_file("config", None, "run config file (configs/*.py)",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "one training workdir per seed and arm, the summary "
                        "and the report; reused to resume")
    flags.DEFINE_list("seeds", ["0"], "training seeds, each a set of arms (3 or more to judge "
                      "whether thinking helps)")
    flags.DEFINE_list("arms", None, f"the arms of each seed, some of {','.join(ARMS)}: control "
                      "and at least one thinking arm (quiet_star, rlp); default: the config's "
                      "own thinking arm (its quiet_star.objective), control and filler")
    flags.DEFINE_bool("resume_with_changes", False, "resume the arms even where the config "
                      "changes settings a resume keeps unless asked (the optimizer's, "
                      "model.dtype), as train's flag of that name")


def _say(message: str) -> None:
    print(message, flush=True)


PREDICTOR_CHECK = "predictor_check.json"


def _predictor_check(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The predictor check of a known-answer config (`predictor_check.py`), once per workdir.
    It tests the base model with forced thoughts through the mixing head, whatever objective
    the arms train with: the config is checked at objective "quiet_star", so that a config
    and its `:rlp` variant share one check."""
    path = epath.Path(workdir) / PREDICTOR_CHECK
    if path.exists():
        return json_files.read_json(path)
    _say("=== predictor check: forced right and wrong thoughts, only the mixing head trains")
    check = predictor_check.from_config(_with_objective(config, "quiet_star"))
    path.write_text(json.dumps(check, indent=1))
    _say(predictor_check.sentence(check))
    return check


def describe(config: ml_collections.ConfigDict, seeds: list[int], arms: tuple[str, ...],
             started: bool) -> str:
    """The summary's one-paragraph description of the runs behind it."""
    q = config.quiet_star
    thinking = _thinking(arms)
    settings = []
    if "quiet_star" in thinking:
        settings.append(f"Quiet-STaR's policy weight {q.policy_loss_beta:g}")
    if "rlp" in thinking:
        settings.append(f"RLP's EMA decay {q.get('ema_decay', 0.999):g}, NLL weight "
                        f"{q.get('rlp_nll_weight', 0.0):g}"
                        + (", with the mixing head" if q.get("rlp_mixing_head") else ""))
    return (
        f"{len(seeds)} seed(s) x {config.train_steps} steps of batch {config.batch_size} x "
        f"{config.seq_len} tokens"
        + (", from a base model trained from scratch first (base_model)" if started else "")
        + f"; {' and '.join(NAMES[a] for a in thinking)} with n_ahead {q.n_ahead} "
        f"({q.n_ahead - 3} sampled thought tokens), n_ahead_talk {q.n_ahead_talk}, "
        f"{q.n_passes} rationales, {'; '.join(settings)}; the control trains the same model on "
        "the same batches without thoughts"
        + ("; the filler arm with thoughts of pad tokens only, trained with the NLL"
           if "filler" in arms else "")
        + ". Difficulty deciles: the starting model's per-token loss on the held-out tokens.")


SUMMARY_LINE_KEYS = ("seeds", "thinking_arm", "overall", "hardest_decile", "think_minus_control",
                     "verdict", "answer_tokens")  # the JSON line printed, per thinking arm


def run(config: ml_collections.ConfigDict, workdir: str, seeds: list[int],
        arms: tuple[str, ...] | None = None, allow_changes: bool = False) -> dict:
    """The base model (if the config has one), the predictor check (known-answer task), the
    arms of every seed (None: `default_arms`; resumed with `allow_changes` as `train.run`),
    then summary.json, report.html and the summary (returned)."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds={','.join(map(str, seeds))}: name distinct seeds")
    arms = check_arms(config, default_arms(config) if arms is None else arms)
    if config.quiet_star.n_ahead < 3:
        raise ConfigError(f"quiet_star.n_ahead={config.quiet_star.n_ahead}: the "
                          f"{NAMES[_thinking(arms)[0]]} arm needs thoughts (n_ahead >= 3); the "
                          "control arm is made from it")
    _check_arm_settings(config, arms)
    outputs.prepare_workdir(workdir)  # before hours of training, not after
    out = epath.Path(workdir)
    report_path, summary_path = out / "report.html", out / "summary.json"
    started = "base_model" in config
    if started:
        config = base_model.arm_config(config, base_model.prepare(config, workdir))
    check = (_predictor_check(config, workdir) if config.data.source == "known_answer"
             and config.model.source == "hf" else None)
    per_seed = [run_seed(config, workdir, seed, arms, allow_changes) for seed in seeds]
    by_arm = {arm: [results[arm] for results in per_seed] for arm in _thinking(arms)}
    summary = summarize_arms(by_arm, describe(config, seeds, arms, started))
    if check is not None:
        summary["predictor_check"] = check
        summary["verdicts"].append(predictor_check.sentence(check))
    seeds_data = [{"seed": results[_thinking(arms)[0]].seed,
                   "curves": results[_thinking(arms)[0]].curves,
                   "thoughts": {arm: r.thoughts for arm, r in results.items()},
                   "gain_by_decile": {arm: list(r.by_decile(r.control) - r.by_decile(r.think))
                                      for arm, r in results.items()}}
                  for results in per_seed]
    report_path.write_text(report.render(summary, seeds_data))
    summary["report"] = str(report_path)
    summary_path.write_text(json.dumps(summary, indent=1))
    line = {k: summary[k] for k in SUMMARY_LINE_KEYS if k in summary}
    if others := summary.get("other_thinking_arms"):
        line["other_thinking_arms"] = {arm: {k: part[k] for k in SUMMARY_LINE_KEYS[2:]
                                             if k in part} for arm, part in others.items()}
    print(json.dumps({**line, "report": summary["report"]}))
    print_table(summary)
    print(f"report: {report_path}")
    return summary


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}", cli.USAGE)
    config, workdir, seeds, arms = (flags.FLAGS[k].value
                                    for k in ("config", "workdir", "seeds", "arms"))
    if config is None or not workdir:
        cli.fail("--config and --workdir are required", cli.USAGE)
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        seeds = [int(s) for s in seeds]
    except ValueError:
        cli.fail(f"--seeds={','.join(seeds)}: expected integers such as 0,1,2", cli.USAGE)
    with cli.one_line_errors():
        run(config, workdir, seeds, None if arms is None else tuple(arms),
            flags.FLAGS.resume_with_changes)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
