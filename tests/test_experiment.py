"""`python -m qstar_jax.experiment`: the arms from one start, the decile table and the verdict
worked by hand, the control arm's losses against transformers' cross-entropy, the report in a
headless browser, and the RLP arm beside Quiet-STaR (its config, the arms asked for, a run of
both thinking arms against one control)."""

import base64
import dataclasses
import html.parser
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from test_sharding import subprocess_env

from qstar_jax import experiment, heldout, loading, report
from qstar_jax import tokenizer as tk

ROOT = Path(__file__).resolve().parents[1]
# configs/tiny.py, smaller (as in test_train.py); 2 seeds keep it short and still have a spread.
RUN = {"train_steps": 4, "seq_len": 16, "model.n_layers": 1, "log_every": 1,
       "checkpoint_every": 4, "eval_every": 2, "eval_batches": 2,
       "quiet_star.policy_loss_beta": 1.0}


# ----------------------------------------------------------------------------- by hand


def test_deciles_and_their_means_by_hand():
    start = np.array([7, 0, 19, 3, 12, 5, 16, 9, 1, 14, 11, 2, 18, 6, 10, 4, 13, 8, 15, 17],
                     np.float32)
    decile = heldout.deciles(start)
    np.testing.assert_array_equal(decile, start.astype(int) // 2)  # two tokens per decile
    loss = 2.0 * start  # decile d holds losses 4d and 4d + 2
    np.testing.assert_allclose(heldout.decile_means(decile, loss), 4 * np.arange(10) + 1)
    # An empty decile is NaN, not 0.
    means = heldout.decile_means(np.array([0, 0, 9]), np.array([1.0, 3.0, 5.0]))
    assert means[0] == 2.0 and means[9] == 5.0 and np.isnan(means[1:9]).all()


def seed_result(seed: int, control_shift: float, think_shift: float) -> experiment.SeedResult:
    """Twenty tokens, start loss 0..19 (two per decile); the control and the thinking model are
    the start lowered by a constant, and thinking by 1 more on the hardest two tokens."""
    start = np.arange(20, dtype=np.float32)
    think = start - think_shift
    think[-2:] -= 1.0
    return experiment.SeedResult(
        seed=seed, start=start, control=start - control_shift, base=start - control_shift,
        think=think, talk=np.stack([think, np.full(20, np.nan)]),
        curves={"quiet_star": [], "control": []}, thoughts=[])


def test_summary_table_and_verdicts_by_hand():
    results = [seed_result(0, 0.5, 0.6), seed_result(1, 0.5, 0.8)]
    summary = experiment.summarize(results, "by hand")
    overall = summary["table"][0]
    # start 9.5; control 9.0; thinking 9.5 - 0.7 (mean shift) - 2/20 = 8.7; gain 0.3.
    assert overall[0] == "overall"
    np.testing.assert_allclose(overall[1:], [9.5, 9.0, 9.0, 8.7, 0.3], rtol=1e-5)
    hardest = summary["table"][-1]
    assert hardest[0] == "decile 10 (hardest)"
    # Tokens 18 and 19: start 18.5, control 18.0, thinking 18.5 - 0.7 - 1 = 16.8.
    np.testing.assert_allclose(hardest[1:], [18.5, 18.0, 18.0, 16.8, 1.2], rtol=1e-5)
    np.testing.assert_allclose(summary["table"][1][1:], [0.5, 0.0, 0.0, -0.2, 0.2], atol=1e-5)
    np.testing.assert_allclose(summary["think_minus_control"]["overall"], [-0.2, -0.4],
                               rtol=1e-5)
    np.testing.assert_allclose(summary["think_minus_control"]["hardest_decile"], [-1.1, -1.3],
                               rtol=1e-5)
    np.testing.assert_allclose(summary["talk_loss_by_offset"][0], 8.7, rtol=1e-5)
    assert summary["talk_loss_by_offset"][1] is None  # no offset-1 target anywhere
    assert summary["verdict"]["overall"]["holds"] is False  # two seeds are too few
    assert summary["thinking_arm"] == "quiet_star" and "other_thinking_arms" not in summary
    assert list(summary["overall"]) == ["start", "control", "quiet_star_base", "quiet_star_think"]
    assert summary["table_header"][3:5] == ["Quiet-STaR base", "Quiet-STaR with thinking"]
    assert summary["verdicts"][0] == ("Overall: with thinking the model was 0.3000 nats/token "
                                      "better than the control (mean of 2 seed(s)).")
    assert summary["verdict_line"] == (
        "Verdict (2 seeds): with thinking the model was 0.3000 nats/token better than the "
        "control overall and 1.2000 nats/token better on the hardest decile; fewer than 3 seeds "
        "cannot show that thinking helps (run --seeds=0,1,2).")
    json.dumps(summary, allow_nan=False)


def rlp_result(seed: int, think_shift: float) -> experiment.SeedResult:
    """`seed_result`'s seed as the RLP arm sees it: the same start and control, its own
    thinking model (the start lowered by `think_shift`)."""
    r = seed_result(seed, 0.5, think_shift)
    think = np.arange(20, dtype=np.float32) - think_shift
    return dataclasses.replace(r, arm="rlp", base=r.start - 0.1, think=think,
                               talk=np.stack([think, np.full(20, np.nan)]))


def test_each_thinking_arm_has_its_own_summary_by_hand():
    by_arm = {"quiet_star": [seed_result(0, 0.5, 0.6), seed_result(1, 0.5, 0.8)],
              "rlp": [rlp_result(0, 0.2), rlp_result(1, 0.4)]}
    summary = experiment.summarize_arms(by_arm, "by hand")
    assert summary["thinking_arm"] == "quiet_star"
    assert summary == {**experiment.summarize(by_arm["quiet_star"], "by hand"),
                       "other_thinking_arms": summary["other_thinking_arms"]}
    rlp = summary["other_thinking_arms"]["rlp"]
    assert rlp == experiment.summarize(by_arm["rlp"], "by hand")
    assert rlp["thinking_arm"] == "rlp" and set(rlp) == set(summary) - {"other_thinking_arms"}
    assert list(rlp["overall"]) == ["start", "control", "rlp_base", "rlp_think"]
    assert rlp["table_header"][3:5] == ["RLP base", "RLP with thinking"]
    # start 9.5; control 9.0; RLP base 9.4; RLP thinking 9.5 - 0.3 (mean shift) = 9.2.
    np.testing.assert_allclose(rlp["table"][0][1:], [9.5, 9.0, 9.4, 9.2, -0.2], rtol=1e-5)
    np.testing.assert_allclose(rlp["think_minus_control"]["overall"], [0.3, 0.1], atol=1e-5)
    assert rlp["verdicts"][0] == ("Overall: with thinking the model was 0.2000 nats/token "
                                  "worse than the control (mean of 2 seed(s)).")
    with pytest.raises(ValueError, match="one thinking arm"):
        experiment.summarize([by_arm["quiet_star"][0], by_arm["rlp"][1]], "mixed")
    json.dumps(summary, allow_nan=False)


@pytest.mark.parametrize("differences, holds, favours", [
    ([-0.10, -0.12, -0.09], True, 3),  # mean -0.103, SE 0.009
    ([-0.10, -0.12, 0.01], False, 2),  # one seed against
    ([-0.10, -0.12], False, 2),  # too few seeds
    ([-0.30, -0.01, -0.01], False, 3),  # mean -0.107 within 2 SE (0.097) of 0
    ([0.1, 0.2, 0.3], False, 0),
])
def test_verdict_needs_three_seeds_all_favouring_and_two_standard_errors(differences, holds,
                                                                         favours):
    v = experiment.verdict(differences)
    assert v["holds"] is holds and v["favours_thinking_in"] == favours
    d = np.array(differences)
    np.testing.assert_allclose(v["standard_error"], d.std(ddof=1) / np.sqrt(d.size))
    line = experiment.sentence("Overall", v)
    assert ("thinking helps." in line) is holds
    summary_line = experiment.verdict_line(v, v)
    assert summary_line.startswith(f"Verdict ({d.size} seeds): ")
    assert ("overall thinking helps, hardest decile thinking helps" in summary_line) is holds


# ----------------------------------------------------------------------------- the report


class Images(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))


def thinking_curves(steps: range, slope: float) -> list[dict]:
    """A thinking arm's metrics.jsonl records, made up: training losses and diagnostics per
    step, held-out losses at steps 0 and 5."""
    return [{"step": s, "loss_base": 3 - 0.1 * s, "loss_talk_0": 3 - slope * s,
             "reward_mean": 0.01 * s, "mixing_weight_mean": 0.002 * s,
             "advantage_positive": 0.4, "thought_entropy": 5 - 0.1 * s} for s in steps] + [
        {"step": s, "eval/loss_base": 3.1 - 0.1 * s, "eval/loss_think": 3.0 - slope * s}
        for s in (0, 5)]


def report_inputs(rlp: bool = False) -> tuple[dict, list[dict]]:
    """A summary and the seeds' logs as `experiment.run` hands them to the report (`rlp`:
    with an RLP arm beside Quiet-STaR)."""
    by_arm = {"quiet_star": [seed_result(0, 0.5, 0.6), seed_result(1, 0.5, 0.8)]}
    if rlp:
        by_arm["rlp"] = [rlp_result(0, 0.2), rlp_result(1, 0.4)]
    steps = range(1, 6)
    for i, r in enumerate(by_arm["quiet_star"]):
        r.curves["quiet_star"] = thinking_curves(steps, 0.12)
        r.curves["control"] = [{"step": s, "loss_base": 3 - 0.11 * s} for s in steps]
        r.curves["control"] += [{"step": s, "eval/loss_base": 3.1 - 0.11 * s} for s in (0, 5)]
        if rlp:
            r.curves["rlp"] = thinking_curves(steps, 0.09)
            by_arm["rlp"][i].curves = r.curves
    summary = experiment.summarize_arms(by_arm, "a report <made> by hand")
    seeds = [{"seed": results[0].seed, "curves": results[0].curves,
              "thoughts": {arm: [f"'a' <|startthought|>'{arm}'"] for arm in by_arm},
              "gain_by_decile": {arm: list(r.by_decile(r.control) - r.by_decile(r.think))
                                 for arm, r in zip(by_arm, results, strict=True)}}
             for results in zip(*by_arm.values(), strict=True)]
    return summary, seeds


CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))),
                None)


def pictures(page: str) -> dict[str, Image.Image]:
    """The page's images by their alt text, each decoded and checked not to be blank."""
    parser = Images()
    parser.feed(page)
    out = {}
    for image in parser.images:
        header, data = image["src"].split(",", 1)
        assert header == "data:image/png;base64"
        picture = Image.open(io.BytesIO(base64.b64decode(data)))
        picture.load()  # decodes: a broken PNG raises here
        assert picture.size[0] > 400 and len(picture.getcolors(2**24)) > 20  # not blank
        out[image["alt"]] = picture
    assert len(out) == len(parser.images)
    return out


def test_report_holds_every_plot_and_loads_in_a_headless_browser(tmp_path):
    summary, seeds = report_inputs()
    page = report.render(summary, seeds)
    assert list(pictures(page)) == list(report.PLOTS)
    assert "a report &lt;made&gt; by hand" in page and "decile 10 (hardest)" in page
    assert "<h2>Quiet-STaR (the quiet_star arm)</h2>" in page and "RLP" not in page
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI has no headless Chromium: .ci/run installs the chromium package")
        pytest.skip("no headless Chromium on this machine")
    out = tmp_path / "report.html"
    out.write_text(page)
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu"]
    # Each image is replaced by its decoded width, so the DOM shows that the browser drew it.
    script = tmp_path / "probe.html"
    script.write_text(page.replace("</body>", (
        "<script>window.onload = () => { for (const i of document.images) "
        "i.setAttribute('data-width', i.naturalWidth); "
        "document.body.setAttribute('data-loaded', 'yes'); };</script></body>")))
    dom = subprocess.run(browser + ["--virtual-time-budget=5000", "--dump-dom", script.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert 'data-loaded="yes"' in dom
    drawn = Images()
    drawn.feed(dom)
    assert len(drawn.images) == len(report.PLOTS)
    assert all(int(i["data-width"]) > 400 for i in drawn.images)


def test_the_report_has_a_section_and_curves_per_thinking_arm():
    summary, seeds = report_inputs(rlp=True)
    page = report.render(summary, seeds)
    one = pictures(report.render(*report_inputs()))
    both = pictures(page)
    assert list(both) == list(report.PLOTS)
    assert both["gain by difficulty decile"].size[0] > one["gain by difficulty decile"].size[0]
    rlp = summary["other_thinking_arms"]["rlp"]
    for part, name in ((summary, "Quiet-STaR"), (rlp, "RLP")):
        arm = part["thinking_arm"]
        assert f"<h2>{name} (the {arm} arm)</h2>" in page
        assert f"<b>{name}: {part['verdict_line']}</b>" in page
        assert f"<th>{name} with thinking</th>" in page
        assert html.escape(f"'a' <|startthought|>'{arm}'") in page
    # Each section's decile table, its overall row as worked by hand.
    row = lambda *v: "<tr><td>overall</td>" + "".join(f"<td>{x:.4f}</td>" for x in v)  # noqa: E731
    rlp_at = page.index("<h2>RLP (the rlp arm)</h2>")
    assert page.index(row(9.5, 9.0, 9.0, 8.7, 0.3)) < rlp_at
    assert page.index(row(9.5, 9.0, 9.4, 9.2, -0.2)) > rlp_at
    learning = report._curves(seeds)
    assert [c[3] for c in learning] == [
        "no thoughts (control)", "Quiet-STaR, base pass", "Quiet-STaR, with thinking",
        "RLP, base pass", "RLP, with thinking"]


# ----------------------------------------------------------------------------- the arms


def test_the_default_arms_follow_the_objective_and_arms_are_checked():
    config, rlp_config = experiment_config(), experiment_config("rlp")
    assert experiment.default_arms(config) == ("quiet_star", "control", "filler")
    assert experiment.default_arms(rlp_config) == ("rlp", "control", "filler")
    assert experiment.check_arms(config, ("filler", "control", "rlp", "quiet_star")) == (
        experiment.ARMS)
    assert experiment.check_arms(rlp_config, ("control", "rlp")) == ("rlp", "control")
    for arms, message in [(("rlp", "filler"), "control is needed"),
                          (("control", "filler"), "a thinking arm .* is needed"),
                          (("rlp", "control", "shuffled"), r"unknown arm\(s\) shuffled")]:
        with pytest.raises(ValueError, match=message):
            experiment.check_arms(config, arms)
    with pytest.raises(ValueError, match="this config is RLP's"):
        experiment.check_arms(rlp_config, ("quiet_star", "rlp", "control"))


def experiment_config(*preset: str):
    sys.path.insert(0, str(ROOT / "configs"))
    try:
        return __import__("experiment").get_config(*preset)
    finally:
        sys.path.remove(str(ROOT / "configs"))


# ----------------------------------------------------------------------------- end to end


def run_experiment(workdir: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    """The command line on configs/tiny.py with RUN, seeds 0 and 1 (and `args`), to
    completion."""
    out = subprocess.run(
        [sys.executable, "-m", "qstar_jax.experiment", f"--config={ROOT}/configs/tiny.py",
         f"--workdir={workdir}", "--seeds=0,1", *(f"--config.{k}={v}" for k, v in RUN.items()),
         *args],
        env=env, cwd=workdir.parent, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    workdir = tmp_path_factory.mktemp("experiment") / "exp"
    return workdir, run_experiment(workdir, subprocess_env(1, tmp_path_factory.mktemp("cache")))


def test_both_arms_start_alike_and_the_run_reports(ran):
    workdir, out = ran
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == f"report: {workdir / 'report.html'}"
    assert lines[-2].startswith("Verdict (2 seeds): with thinking the model was ")
    assert lines[-2].endswith("fewer than 3 seeds cannot show that thinking helps (run "
                              "--seeds=0,1,2).")
    assert lines[-3].startswith("Against the filler arm, overall: with thinking the model was ")
    assert lines[-4].startswith("Quiet-STaR held-out loss at each talk offset t ")
    assert lines[-5].startswith("decile 10 (hardest) ")
    last = json.loads(next(x for x in lines if x.startswith('{"seeds"')))
    assert last["seeds"] == [0, 1] and set(last["verdict"]) == {"overall", "hardest_decile"}
    assert last["report"] == str(workdir / "report.html")
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["thinking_arm"] == "quiet_star" and "other_thinking_arms" not in summary
    assert not (workdir / "seed_0" / "rlp").exists()  # the default arms: the config's own
    for seed in (0, 1):
        arms = {arm: workdir / f"seed_{seed}" / arm for arm in ("quiet_star", "control", "filler")}
        rows = {arm: np.load(d / "heldout" / "rows.npz") for arm, d in arms.items()}
        np.testing.assert_array_equal(rows["control"]["tokens"], rows["quiet_star"]["tokens"])
        start = {arm: np.load(d / "heldout" / "losses_0.npz")["base"] for arm, d in arms.items()}
        np.testing.assert_allclose(start["control"], start["quiet_star"], rtol=1e-5)
        logs = {arm: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
                for arm, d in arms.items()}
        # Step 1: the same weights on the same batch give the same base-pass loss.
        first = {arm: next(r for r in log if r["step"] == 1 and "loss" in r)
                 for arm, log in logs.items()}
        np.testing.assert_allclose(first["control"]["loss_base"],
                                   first["quiet_star"]["loss_base"], rtol=1e-5)
        assert first["control"]["loss"] == first["control"]["loss_base"]  # no other term
        assert "policy_loss" in first["quiet_star"] and "thought_entropy" in first["quiet_star"]
        qs_final = np.load(arms["quiet_star"] / "heldout" / "losses_4.npz")
        ctl_final = np.load(arms["control"] / "heldout" / "losses_4.npz")
        np.testing.assert_allclose(summary["think_minus_control"]["overall"][seed],
                                   qs_final["talk"][0].mean() - ctl_final["base"].mean(),
                                   rtol=1e-5)
        filler_final = np.load(arms["filler"] / "heldout" / "losses_4.npz")
        np.testing.assert_allclose(summary["think_minus_filler"]["overall"][seed],
                                   qs_final["talk"][0].mean() - filler_final["talk"][0].mean(),
                                   rtol=1e-5)
        pad = tk.load(str(arms["filler"] / loading.TOKENIZER_DIR)).pad_id
        assert filler_final["thoughts"].size and (filler_final["thoughts"] == pad).all()
        assert first["filler"]["loss"] == first["filler"]["nll"]  # no policy term
    page = (workdir / "report.html").read_text()
    assert page.count("<img") == len(report.PLOTS)
    assert "RLP" not in page


def test_the_control_arm_scores_transformers_cross_entropy(ran, tmp_path):
    """The control's held-out losses after training, per token, are those of transformers'
    Llama loaded from the exported control checkpoint: plain language modelling."""
    workdir, _ = ran
    control = workdir / "seed_0" / "control"
    loading.export_checkpoint(str(control), None, str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                              dtype=torch.float32).eval()
    rows = np.load(control / "heldout" / "rows.npz")
    tokens = torch.tensor(rows["tokens"].reshape(-1, rows["tokens"].shape[-1]), dtype=torch.long)
    mask = rows["mask"].reshape(tokens.shape)
    with torch.no_grad():
        logits = model(tokens, attention_mask=torch.tensor(mask, dtype=torch.long)).logits
    logp = torch.log_softmax(logits.double(), -1)[:, :-1]
    ce = -torch.gather(logp, 2, tokens[:, 1:, None])[..., 0].numpy()
    expected = ce[mask[:, 1:]]  # row by row, position by position, as evaluations order them
    saved = np.load(control / "heldout" / "losses_4.npz")
    np.testing.assert_allclose(saved["base"], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(saved["talk"][0], saved["base"])  # no thoughts: the same


def test_a_rerun_trains_nothing_and_reports_the_same(ran, tmp_path_factory):
    workdir, first = ran
    out = run_experiment(workdir, subprocess_env(1, tmp_path_factory.mktemp("cache")))
    assert out.stdout.count("already complete at step 4") == 6  # two seeds, three arms
    tail = lambda text: text[text.index('{"seeds"'):]  # noqa: E731  the JSON line onwards
    assert tail(out.stdout) == tail(first.stdout)


@pytest.mark.parametrize("args, message", [
    (["--seeds=0,x"], "--seeds=0,x: expected integers"),
    (["--seeds=1,1"], "name distinct seeds"),
    (["--config.quiet_star.n_ahead=1", "--config.quiet_star.n_ahead_talk=1"],
     "the Quiet-STaR arm needs thoughts"),
    (["--arms=quiet_star,control,shuffled"], "--arms: unknown arm(s) shuffled"),
    (["--arms=quiet_star,filler"], "--arms: control is needed"),
    (["--arms=rlp,filler"], "--arms: control is needed"),
    (["--arms=control,filler"], "--arms: a thinking arm (quiet_star or rlp) is needed"),
    (["--config.quiet_star.objective=rlp", "--arms=quiet_star,control"],
     "this config is RLP's (quiet_star.objective='rlp'): its thinking arm is rlp"),
    (["--config.quiet_star.objective=rlp", "--config.quiet_star.n_ahead=3"],
     "the rlp arm: objective='rlp' with n_ahead=3"),
    (["--arms=quiet_star,rlp,control", "--config.quiet_star.n_passes=1"],
     "the rlp arm: quiet_star.n_passes=1"),
])
def test_bad_arguments_are_one_line(args, message, tmp_path):
    out = subprocess.run([sys.executable, "-m", "qstar_jax.experiment",
                          f"--config={ROOT}/configs/tiny.py", f"--workdir={tmp_path / 'x'}",
                          *args], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_both_thinking_arms_against_one_control(tmp_path_factory):
    """--arms=quiet_star,rlp,control: one control for both thinking arms; Quiet-STaR is the
    primary (its held-out rows, its summary at the top), RLP's summary of the same layout sits
    under other_thinking_arms, its per-seed numbers those of its own held-out losses."""
    workdir = tmp_path_factory.mktemp("both") / "exp"
    out = run_experiment(workdir, subprocess_env(1, tmp_path_factory.mktemp("cache")),
                         "--arms=quiet_star,rlp,control")
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["thinking_arm"] == "quiet_star" and list(summary["other_thinking_arms"]) == [
        "rlp"]
    rlp = summary["other_thinking_arms"]["rlp"]
    assert rlp["thinking_arm"] == "rlp"
    assert set(rlp) == set(summary) - {"other_thinking_arms", "report"}
    assert set(rlp["verdict"]) == {"overall", "hardest_decile"}
    assert rlp["verdict_line"].startswith("Verdict (2 seeds): ")
    assert list(rlp["overall"]) == ["start", "control", "rlp_base", "rlp_think"]
    for seed in (0, 1):
        arms = {arm: workdir / f"seed_{seed}" / arm for arm in ("quiet_star", "rlp", "control")}
        assert sorted(p.name for p in arms["quiet_star"].parent.iterdir()) == sorted(arms)
        rows = {arm: np.load(d / "heldout" / "rows.npz")["tokens"] for arm, d in arms.items()}
        np.testing.assert_array_equal(rows["rlp"], rows["quiet_star"])
        final = {arm: np.load(d / "heldout" / "losses_4.npz") for arm, d in arms.items()}
        start = np.load(arms["quiet_star"] / "heldout" / "losses_0.npz")["base"]
        hard = heldout.deciles(start) == heldout.N_DECILES - 1
        think, control = final["rlp"]["talk"][0], final["control"]["base"]
        np.testing.assert_allclose(rlp["think_minus_control"]["overall"][seed],
                                   think.mean() - control.mean(), rtol=1e-5)
        np.testing.assert_allclose(rlp["think_minus_control"]["hardest_decile"][seed],
                                   think[hard].mean() - control[hard].mean(), rtol=1e-5)
        np.testing.assert_allclose(summary["think_minus_control"]["overall"][seed],
                                   final["quiet_star"]["talk"][0].mean() - control.mean(),
                                   rtol=1e-5)
        assert not np.allclose(think, final["quiet_star"]["talk"][0])  # trained otherwise
        records = [json.loads(x) for x in (arms["rlp"] / "metrics.jsonl").read_text().splitlines()]
        first = next(r for r in records if r["step"] == 1 and "loss" in r)
        assert first["mixing_weight_mean"] == 1.0 and "loss_ema" in first  # RLP's own metrics
    np.testing.assert_allclose(rlp["overall"]["rlp_think"], np.mean(
        [np.load(workdir / f"seed_{s}" / "rlp" / "heldout" / "losses_4.npz")["talk"][0].mean()
         for s in (0, 1)]), rtol=1e-5)
    page = (workdir / "report.html").read_text()
    assert page.count("<img") == len(report.PLOTS)
    assert "<h2>RLP (the rlp arm)</h2>" in page and "<th>RLP with thinking</th>" in page
    assert html.escape(f"RLP: {rlp['verdict_line']}") in page
    lines = out.stdout.strip().splitlines()
    assert "=== the rlp arm (RLP)" in lines and lines[-2] == rlp["verdict_line"]
    assert any(x.startswith("RLP held-out loss at each talk offset t ") for x in lines)
    line = json.loads(next(x for x in lines if x.startswith('{"seeds"')))
    assert line["thinking_arm"] == "quiet_star"
    assert line["other_thinking_arms"]["rlp"]["verdict"] == rlp["verdict"]
