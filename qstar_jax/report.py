"""The experiment's report: one self-contained HTML page, its plots (matplotlib) embedded as PNG.

`render(summary, seeds)` takes the experiment's summary (JSON-able: the table rows, the verdicts;
one summary per thinking arm, the others under `other_thinking_arms`) and, per seed, what its
arms logged: training and held-out metrics per step, and per thinking arm the gain from thinking
per difficulty decile and a few decoded thoughts. The plots show every arm that ran; the tables
and verdicts come in a section per thinking arm, titled by its objective.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np
from matplotlib.figure import Figure

PLOTS = ("learning curves", "gain by difficulty decile", "thinking diagnostics")
ANSWER_PLOT = "answer tokens"  # a fourth plot, for the known-answer task


def _png(fig: Figure) -> str:
    """A figure as an <img> with its PNG inlined."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(fig.get_suptitle())}" src="data:image/png;base64,{data}">'


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [r for r in records if key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]


def _mean_over_seeds(seeds: list[dict], arm: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, mean of `key` over the seeds) at the steps every seed logged it."""
    series = [dict(zip(*_series(s["curves"][arm], key), strict=True)) for s in seeds]
    steps = sorted(set.intersection(*(set(x) for x in series)))
    return np.array(steps), np.array([np.mean([x[t] for x in series]) for t in steps])


def _running_mean(x: np.ndarray, width: int) -> np.ndarray:
    """Mean of each value with up to `width - 1` before it (a trailing window)."""
    sums = np.cumsum(np.concatenate([[0.0], x]))
    lo = np.maximum(np.arange(1, x.size + 1) - width, 0)
    return (sums[1:] - sums[lo]) / (np.arange(1, x.size + 1) - lo)


SMOOTH_STEPS = 5  # training losses of a small batch are noisy: a trailing mean over this many
NAMES = {"quiet_star": "Quiet-STaR", "rlp": "RLP"}  # the thinking arms, by their objective
THINKING_COLOURS = {"quiet_star": ("tab:orange", "tab:green"), "rlp": ("tab:purple", "tab:red")}
ARM_COLOURS = {"quiet_star": "tab:green", "rlp": "tab:red", "control": "tab:blue",
               "filler": "tab:gray"}


def _thinking_arms(seeds: list[dict]) -> list[str]:
    """The thinking arms that ran, in their order (quiet_star before rlp)."""
    return [a for a in NAMES if a in seeds[0]["curves"]]


def _curves(seeds: list[dict]) -> list[tuple[str, str, str, str, str, str]]:
    """(arm, training key, held-out key, label, colour, style) of every arm that ran."""
    curves = [("control", "loss_base", "eval/loss_base", "no thoughts (control)", "tab:blue",
               "-")]
    for arm in _thinking_arms(seeds):
        base, think = THINKING_COLOURS[arm]
        curves += [(arm, "loss_base", "eval/loss_base", f"{NAMES[arm]}, base pass", base, "--"),
                   (arm, "loss_talk_0", "eval/loss_think", f"{NAMES[arm]}, with thinking",
                    think, "-")]
    curves.append(("filler", "loss_talk_0", "eval/loss_think", "filler thoughts", "tab:gray",
                   ":"))
    return [c for c in curves if c[0] in seeds[0]["curves"]]


def learning_curves(seeds: list[dict]) -> Figure:
    """Training cross-entropy per step and held-out loss per evaluation, means over seeds, every
    arm on one axis."""
    fig = Figure(figsize=(11, 4))
    fig.suptitle("learning curves")
    train_ax, eval_ax = fig.subplots(1, 2)
    for arm, train_key, eval_key, label, colour, style in _curves(seeds):
        steps, values = _mean_over_seeds(seeds, arm, train_key)
        train_ax.plot(steps, _running_mean(values, SMOOTH_STEPS), style, color=colour,
                      label=label)
        steps, values = _mean_over_seeds(seeds, arm, eval_key)
        eval_ax.plot(steps, values, style, color=colour, marker="o", markersize=4, label=label)
    train_ax.set(title=f"training batches (mean of the last {SMOOTH_STEPS} steps)",
                 xlabel="step", ylabel="cross-entropy (nats/token)")
    eval_ax.set(title="held-out tokens", xlabel="step", ylabel="nats/token")
    for ax in (train_ax, eval_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.text(0.5, -0.02, f"means over {len(seeds)} seed(s)", ha="center", fontsize=8)
    return fig


def gain_by_decile(seeds: list[dict]) -> Figure:
    """Held-out loss of the control minus each thinking arm with thinking, per difficulty decile
    of the starting model (above 0: thinking predicts better), one panel per thinking arm."""
    arms = list(seeds[0]["gain_by_decile"])
    fig = Figure(figsize=(7 * len(arms), 4))
    fig.suptitle("gain by difficulty decile")
    axes = np.atleast_1d(fig.subplots(1, len(arms), sharey=True))
    x = np.arange(1, 11)
    for ax, arm in zip(axes, arms, strict=True):
        gains = np.array([s["gain_by_decile"][arm] for s in seeds], float)
        ax.bar(x, np.nanmean(gains, 0), color=THINKING_COLOURS[arm][0], alpha=0.35,
               label="mean over seeds")
        for s, g in zip(seeds, gains, strict=True):
            ax.plot(x, g, "o-", markersize=3, alpha=0.8, label=f"seed {s['seed']}")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set(xticks=x, xlabel="difficulty decile of the starting model (10 = hardest)",
               ylabel=f"control - {NAMES[arm]} with thinking (nats/token)",
               title=f"{NAMES[arm]}: above 0, thinking predicts better than plain training")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def diagnostics(seeds: list[dict]) -> Figure:
    """Each thinking arm's reward, mixing weight, reinforced share and thought entropy."""
    arms = _thinking_arms(seeds)
    fig = Figure(figsize=(11, 6))
    fig.suptitle("thinking diagnostics")
    rlp = "rlp" in arms  # RLP's reward is over its EMA without thoughts; w is 1 without a head
    panels = (("reward_mean", "reward (nats gained over the "
               + ("base pass; RLP: the EMA)" if rlp else "base pass)")),
              ("mixing_weight_mean", "mixing weight w (0: thoughts unused"
               + ("; RLP, no head: 1)" if rlp else ")")),
              ("advantage_positive", "share of thoughts reinforced"),
              ("thought_entropy", "entropy of the thought tokens (nats)"))
    styles = dict(zip(arms, ("-", "--"), strict=False))
    for ax, (key, title) in zip(fig.subplots(2, 2).flat, panels, strict=True):
        for arm in arms:
            for seed in seeds:
                steps, values = _series(seed["curves"][arm], key)
                label = (f"{NAMES[arm]}, seed {seed['seed']}" if len(arms) > 1
                         else f"seed {seed['seed']}")
                ax.plot(steps, values, styles[arm], alpha=0.8, label=label)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def answer_tokens(summaries: list[dict]) -> Figure:
    """The known-answer task over the evaluations, means over seeds, from the summary of each
    thinking arm: every arm's loss and accuracy on the answer tokens, and the share of each
    thinking arm's thoughts with the right steps."""
    fig = Figure(figsize=(13, 3.8))
    fig.suptitle(ANSWER_PLOT)
    loss_ax, accuracy_ax, steps_ax = fig.subplots(1, 3)
    loss, accuracy = {}, {}
    for part in summaries:
        curves = part["answer_tokens"]["curves"]
        loss.update({a: v for a, v in curves["loss"].items() if a not in loss})
        accuracy.update({a: v for a, v in curves["accuracy"].items() if a not in accuracy})
        arm = part.get("thinking_arm", "quiet_star")
        steps_ax.plot(curves["steps"], curves["correct_steps"], "o-", markersize=3,
                      color=ARM_COLOURS[arm], label=arm)
    steps = summaries[0]["answer_tokens"]["curves"]["steps"]
    for arm in [a for a in (*NAMES, "control", "filler") if a in loss]:
        loss_ax.plot(steps, loss[arm], "o-", markersize=3, color=ARM_COLOURS[arm], label=arm)
        accuracy_ax.plot(steps, accuracy[arm], "o-", markersize=3, color=ARM_COLOURS[arm],
                         label=arm)
    loss_ax.axhline(np.log(10), color="black", linewidth=0.8, linestyle=":",
                    label="ln 10 (a guess)")
    loss_ax.set(title="answer loss (with thinking)", xlabel="step", ylabel="nats")
    accuracy_ax.set(title="answer accuracy (most likely token)", xlabel="step", ylim=(0, 1.02))
    steps_ax.set(title="thoughts at '=' with the right steps", xlabel="step", ylim=(0, 1.02))
    for ax in (loss_ax, accuracy_ax, steps_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _table(rows: list[list], header: list[str]) -> str:
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _summaries(summary: dict) -> list[dict]:
    return [summary, *summary.get("other_thinking_arms", {}).values()]


def _section(part: dict, several: bool) -> str:
    """One thinking arm's tables and verdicts, under a heading naming its objective."""
    arm = part.get("thinking_arm", "quiet_star")
    name = NAMES[arm]
    answers = part.get("answer_tokens")
    out = f"<h2>{html.escape(name)} (the {arm} arm)</h2>\n"
    if several:
        out += f"<p><b>{html.escape(part['verdict_line'])}</b></p>\n"
        if answers:
            out += f"<p><b>{html.escape(answers['verdict_line'])}</b></p>\n"
        out += f"<ul>{''.join(f'<li>{html.escape(v)}</li>' for v in part['verdicts'])}</ul>\n"
    if answers:
        arms = list(answers["loss"])
        out += f"""<h3>Answer tokens (the known-answer task)</h3>
<p>{"".join(f"{html.escape(v)}<br>" for v in answers["verdicts"])}</p>
{_table([[a, answers["loss"][a], answers["accuracy"][a]] for a in arms],
        ["arm", "answer loss (nats)", "answer accuracy"])}
<p>Targets: {html.escape(", ".join(f"{k}: {'yes' if v else 'no'}"
                                      for k, v in answers["targets"].items()))}</p>
{_table(answers["per_seed"], answers["per_seed_header"])}
"""
    out += f"""<h3>Held-out loss by difficulty decile (mean over seeds)</h3>
{_table(part["table"], part["table_header"])}
<h3>{html.escape(name)}: held-out loss at each talk offset</h3>
{_table([[t, v] for t, v in enumerate(part["talk_loss_by_offset"]) if v is not None],
        ["offset t (predicts x[j+1+t] after the thought at j)", "nats/token"])}
<h3>Per seed: {html.escape(name)} with thinking minus control</h3>
{_table(part["per_seed"], part["per_seed_header"])}
"""
    return out


def render(summary: dict, seeds: list[dict]) -> str:
    """The report page (see the module doc); each thinking arm's summary holds its decile
    table rows (`table`), its answer (`verdict_line`) and one sentence per question
    (`verdicts`)."""
    parts = _summaries(summary)
    several = len(parts) > 1
    figures = [learning_curves(seeds), gain_by_decile(seeds), diagnostics(seeds)]
    if all(part.get("answer_tokens") for part in parts):
        figures.append(answer_tokens(parts))
    check_html = ""
    if check := summary.get("predictor_check"):
        check_html = f"""<h2>Predictor check (before any REINFORCE)</h2>
{_table([[kind, check[kind]["before"]["answer_loss"], check[kind]["after"]["answer_loss"],
          check[kind]["after"]["mixing_weight"]] for kind in ("correct", "wrong")],
        ["forced thought at '='", "answer loss before", f"after {check['steps']} head steps",
         "mixing weight after"])}"""
    headline = "".join(
        f"<p><b>{html.escape((NAMES[p.get('thinking_arm', 'quiet_star')] + ': ') * several)}"
        f"{html.escape(p['verdict_line'])}</b></p>\n"
        + (f"<p><b>{html.escape(p['answer_tokens']['verdict_line'])}</b></p>\n"
           if p.get("answer_tokens") else "") for p in parts)
    # With several thinking arms each section lists its own verdicts.
    verdicts = "" if several else "<ul>" + "".join(
        f"<li>{html.escape(v)}</li>" for v in summary["verdicts"]) + "</ul>"
    thoughts = "".join(
        f"<h3>seed {s['seed']}, {html.escape(NAMES[arm])}</h3>"
        f"<pre>{html.escape(chr(10).join(lines))}</pre>"
        for s in seeds for arm, lines in s["thoughts"].items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Does thinking help?</title>
<style>body{{font-family:sans-serif;max-width:1150px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
img{{max-width:100%;display:block;margin:1em 0}}pre{{background:#f6f6f6;padding:8px;
white-space:pre-wrap}}</style></head><body>
<h1>Does thinking help?</h1>
{headline}
{verdicts}
<p>{html.escape(summary["description"])}</p>
{check_html}
{"".join(_section(p, several) for p in parts)}
<h2>Plots</h2>
{"".join(_png(f) for f in figures)}
<h2>Thoughts at the last evaluation</h2>
{thoughts}
</body></html>
"""
