"""RLP (`qstar_jax.rlp`) against the paper's equations, written out plainly.

The reference runs transformers' Llama on each position's own sequence, x[0..j], the start token,
the thought, the end token and the true tokens after j, one sequence at a time: the paper's
"context augmented with the thought". The EMA model scores the same text without the thought.
Rewards (eq. 5), group-relative advantages (eq. 7) and the clipped surrogate (eq. 8) are then
computed in torch, and autograd's gradients compared with ours.
"""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import safetensors.numpy
import torch
import transformers
from test_thoughts import (
    PAD,
    B,
    L,
    NaiveQuietStar,
    batch_tokens,
    forced_thoughts,
    grads_by_hf_name,
    qs_config,
    tiny_model,
)

from qstar_jax import (
    checkpoint,
    convert,
    hf_checkpoint,
    loading,
    rlp,
    run_settings,
    scoring,
    steps,
    train,
)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


class NaiveRLP:
    """The paper's algorithm on whole sequences, for thoughts given as [B, P, L, S] ids."""

    def __init__(self, path, ema_path, cfg):
        self.cfg = cfg
        load = lambda p: transformers.AutoModelForCausalLM.from_pretrained(  # noqa: E731
            p, attn_implementation="eager", dtype=torch.float32).eval()
        self.lm, self.ema = load(path), load(ema_path)
        extra = safetensors.numpy.load_file(f"{path}/model.safetensors")
        self.extra = {k: torch.tensor(v, requires_grad=True) for k, v in extra.items()
                      if k.startswith(("start_embedding", "end_embedding", "talk_head"))}

    mixing_weight = NaiveQuietStar.head  # the mixing head, as the Quiet-STaR reference has it

    def loss(self, tokens, thoughts, clip=0.2):
        cfg, lm = self.cfg, self.lm
        tok = torch.tensor(tokens, dtype=torch.long)
        embed = lm.model.embed_tokens
        start = self.extra["start_embedding"][0] * cfg.embedding_scale
        end = self.extra["end_embedding"][0] * cfg.embedding_scale
        p_count, s, t_talk = cfg.n_passes, cfg.n_sampled, cfg.n_ahead_talk
        counts = lambda x: x != PAD  # noqa: E731  a label that counts
        label = lambda j: tok[:, j] if j < L else torch.full((B,), PAD)  # noqa: E731

        # The no-think EMA model and the base pass of the model itself, on the text alone.
        with torch.no_grad():
            ema_lp = torch.log_softmax(self.ema(tok).logits, -1)
        h_base = lm.model(tok).last_hidden_state
        base_lp = torch.log_softmax(lm.lm_head(h_base), -1)
        n_j = L - t_talk
        reward = torch.zeros(B, p_count, n_j)
        logprob = torch.zeros(B, p_count, n_j, s)
        talk_ce = torch.zeros(B, p_count, t_talk, L)
        for j in range(L - 1):
            for p in range(p_count):
                thought = embed(torch.tensor(thoughts[:, p, j], dtype=torch.long))  # [B, S, D]
                after = [embed(tok[:, j + 1:j + t_talk])] if t_talk > 1 else []
                x = torch.cat([embed(tok[:, :j + 1]), start.expand(B, 1, -1), thought,
                               end.expand(B, 1, -1), *after], 1)
                h = lm.model(inputs_embeds=x).last_hidden_state
                thought_logits = lm.lm_head(h[:, j + 1:j + 1 + s]).clone()
                thought_logits[..., [cfg.start_thought_id, cfg.end_thought_id]] = -torch.inf
                lp = torch.log_softmax(thought_logits / cfg.thought_temperature, -1)
                chosen = torch.tensor(thoughts[:, p, j], dtype=torch.long)
                if j < n_j:
                    logprob[:, p, j] = lp.gather(-1, chosen[..., None])[..., 0]
                for t in range(t_talk):
                    if j + t + 1 >= L:
                        break
                    h_t = h[:, j + s + 2 + t]
                    if cfg.mixes:
                        w = self.mixing_weight(h_base[:, j + t], h_t)[:, None]
                        h_t = (1 - w) * h_base[:, j + t] + w * h_t
                    talk_lp = torch.log_softmax(lm.lm_head(h_t), -1)
                    target = label(j + 1 + t)
                    seen = counts(target)
                    got = talk_lp.gather(-1, target[:, None])[:, 0]
                    talk_ce[:, p, t, j] = -got * seen
                    if j < n_j:  # eq. 5, summed over the T next tokens
                        gain = got.detach() - ema_lp[:, j + t].gather(-1, target[:, None])[:, 0]
                        reward[:, p, j] += gain * seen
        g = p_count
        advantage = g / (g - 1) * (reward - reward.mean(1, keepdim=True))  # eq. 7
        ratio = torch.exp(logprob - logprob.detach())
        a = advantage[..., None]
        per_thought = -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a).mean(-1)
        valid = torch.stack([counts(label(j + 1)) for j in range(n_j)], 1)[:, None]  # [B, 1, J]
        n = valid.sum() * g
        policy = (per_thought * valid).sum() / n  # eq. 8, over every position's group
        labels = torch.cat([tok[:, 1:], torch.full((B, 1), PAD)], 1)
        ce0 = -base_lp.gather(-1, labels[..., None])[..., 0] * counts(labels)
        loss_base = ce0.sum() / counts(labels).sum()
        talk_counts = [sum(counts(label(j + 1 + t)).sum() for j in range(L)) for t in range(t_talk)]
        loss_talk = [talk_ce[:, :, t].sum() / (g * talk_counts[t]) for t in range(t_talk)]
        w0 = cfg.original_loss_weight
        nll = w0 * loss_base + (1 - w0) * sum(loss_talk) / t_talk
        ema_ce = -ema_lp.gather(-1, labels[..., None])[..., 0] * counts(labels)
        return dict(loss=policy + cfg.rlp_nll_weight * nll, policy_loss=policy,
                    reward_mean=(reward * valid).sum() / n, nll=nll, loss_base=loss_base,
                    loss_ema=ema_ce.sum() / counts(labels).sum(), logprob=logprob,
                    reward=reward, advantage=advantage)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Quiet-STaR model and an EMA of it some way off, both exported for transformers.

    Its layers' weights are 15x the init's 0.02 scale: there a thought moves the next token's
    log-prob by ~1e-4 against rewards of ~0.4, and an advantage, a difference of rewards, keeps
    float32 rounding of ~1e-3 of itself; at this scale thoughts change predictions by ~0.1."""
    mcfg, params = tiny_model()
    layers = params["decoder"]["layers"]
    for part in ("attn", "mlp"):
        layers[part] = jax.tree.map(lambda x: 15 * x, layers[part])
    keys = iter(jax.random.split(jax.random.key(11), 64))
    ema = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), params)
    cfg = qs_config(mcfg)
    paths = {}
    for name, tree in (("model", params), ("ema", ema)):
        paths[name] = tmp_path_factory.mktemp(name)
        hf_checkpoint.to_hf(tree, mcfg, paths[name], quiet_star=cfg)
    return mcfg, params, ema, paths


RLP_VARIANTS = {
    # The paper's: one next token, no mixing head, no next-token loss.
    "paper": dict(n_ahead=5, n_ahead_talk=1, n_passes=2),
    # The options: three rationales, two next tokens, the head kept and trained by the NLL,
    # sampling below temperature 1, the passes rematerialised.
    "options": dict(n_ahead=5, n_ahead_talk=2, n_passes=3, rlp_mixing_head=True,
                    rlp_nll_weight=0.5, thought_temperature=0.7),
    # Without rematerialised passes (the configs' path), one sampled thought token.
    "no_remat": dict(n_ahead=4, n_ahead_talk=1, n_passes=2, remat_passes=False),
}


@pytest.mark.parametrize("variant", list(RLP_VARIANTS))
def test_rlp_loss_and_gradients_match_the_papers_equations(models, tmp_path, variant):
    """Loss, rewards, the EMA's loss, thought log-probs and every parameter's gradient: values at
    rtol 1e-5, gradients at 1e-5 of each tensor's largest entry (as the Quiet-STaR reference)."""
    mcfg, params, ema, paths = models
    cfg = qs_config(mcfg, objective="rlp", **RLP_VARIANTS[variant])
    tokens, thoughts = batch_tokens(), forced_thoughts(cfg)
    naive = NaiveRLP(paths["model"], paths["ema"], cfg)
    ref = naive.loss(tokens, thoughts)
    ref["loss"].backward()
    tokens_j, thoughts_j = jnp.asarray(tokens), jnp.asarray(thoughts)

    @jax.jit
    def ours(p):
        return jax.value_and_grad(
            lambda p: rlp.rlp_loss(p, {"tokens": tokens_j}, jax.random.key(0), cfg, thoughts_j,
                                   ema_params=ema), has_aux=True)(p)

    (_, metrics), grads = ours(params)
    assert abs(ref["reward_mean"].item()) > 1e-3  # the EMA really differs from the model
    for name in ("loss", "policy_loss", "nll", "loss_base", "loss_ema"):
        np.testing.assert_allclose(metrics[name], ref[name].item(), rtol=1e-5, atol=1e-7,
                                   err_msg=name)
    # A reward is a difference of log-likelihoods: 1e-5 of their size, not of the difference.
    np.testing.assert_allclose(metrics["reward_mean"], ref["reward_mean"].item(),
                               atol=1e-5 * ref["loss_base"].item())
    ours_g = grads_by_hf_name(grads, cfg, tmp_path / "grads")
    theirs = {n: p.grad for n, p in naive.lm.named_parameters()}
    theirs.update({n: p.grad for n, p in naive.extra.items()})
    assert set(ours_g) == set(theirs)
    for name, g in theirs.items():
        g = np.zeros(ours_g[name].shape, np.float32) if g is None else g.numpy()
        scale = max(np.abs(g).max(), 1e-6)
        np.testing.assert_allclose(ours_g[name] / scale, g / scale, atol=1e-5, err_msg=name)
    # The update reaches the model through the thought tokens only (and, when asked, the NLL).
    assert np.abs(ours_g["model.layers.0.mlp.up_proj.weight"]).max() > 0
    assert np.abs(ours_g["start_embedding"]).max() > 0
    head_trains = cfg.rlp_mixing_head
    assert (np.abs(ours_g["talk_head.0.4.weight"]).max() > 0) == head_trains
    assert (np.abs(ours_g["end_embedding"]).max() > 0) == (cfg.rlp_nll_weight > 0)


def test_clipped_surrogate_and_group_advantages_by_hand():
    """Eq. 7 and eq. 8 on numbers small enough to check by hand, with ratios inside and outside
    the clip range."""
    reward = jnp.array([[[1.0], [2.0], [6.0]]])  # [B=1, P=3, J=1], mean 3
    np.testing.assert_allclose(rlp.group_advantages(reward)[0, :, 0],
                               [1.5 * -2, 1.5 * -1, 1.5 * 3], rtol=1e-6)
    # Equal to the reward minus the mean of the other rationales' (leave-one-out).
    np.testing.assert_allclose(rlp.group_advantages(reward)[0, :, 0], [1 - 4, 2 - 3.5, 6 - 1.5],
                               rtol=1e-6)
    adv = jnp.array([[[2.0], [-1.0]]])  # [1, 2, 1]
    old = jnp.zeros((1, 2, 1, 2))
    new = jnp.log(jnp.array([[[[1.5, 0.9]], [[0.5, 1.1]]]]))  # ratios
    loss = rlp.clipped_surrogate(new, old, adv)
    # A = 2 > 0: min(1.5 A, 1.2 A) takes the clipped 1.2, min(0.9 A, 0.9 A) = 0.9 A.
    # A = -1 < 0: min(-0.5, -0.8) takes the clipped -0.8, min(-1.1, -1.1) = -1.1.
    np.testing.assert_allclose(loss[0, :, 0], [-(1.2 * 2 + 0.9 * 2) / 2, -(-0.8 + -1.1) / 2],
                               rtol=1e-6)
    grad = jax.grad(lambda x: rlp.clipped_surrogate(x, old, adv).sum())(new)
    # Clipped tokens get no gradient; the others -A * r / S.
    np.testing.assert_allclose(grad[0, :, 0], [[0.0, -2 * 0.9 / 2], [0.0, 1.1 / 2]], rtol=1e-6)


def test_train_step_keeps_an_ema_of_the_parameters():
    """Four updates: phi_0 = theta_0, then phi_k = d phi_(k-1) + (1 - d) theta_k, in numpy."""
    mcfg, params = tiny_model()
    cfg = qs_config(mcfg, objective="rlp", n_ahead_talk=1, ema_decay=0.8)
    optimizer = optax.adam(1e-2)
    state = {"params": params, "opt_state": optimizer.init(params),
             "step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(0),
             "ema_params": params}
    batch = {"tokens": jnp.asarray(batch_tokens())[None]}
    step = jax.jit(lambda s: steps.train_step(s, batch, cfg=cfg, optimizer=optimizer))
    ema = jax.tree.map(np.asarray, params)
    for _ in range(4):
        state, metrics = step(state)
        ema = jax.tree.map(lambda e, p: 0.8 * e + 0.2 * np.asarray(p), ema, state["params"])
        jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-6,
                                                                  atol=1e-7),
                     state["ema_params"], ema)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), params,
                         state["params"])
    assert max(jax.tree.leaves(moved)) > 1e-3  # the model moved, and the EMA followed it


def tiny_rlp_config(**changes) -> ml_collections.ConfigDict:
    import tiny  # configs/tiny.py

    c = tiny.get_config()
    c.train_steps, c.checkpoint_every, c.eval_every, c.log_every = 6, 3, 0, 1
    c.seq_len, c.model.n_layers, c.eval_batches = 16, 1, 1
    c.quiet_star.objective = "rlp"
    c.update(changes)
    return c


@pytest.fixture(scope="module")
def configs_on_path():
    import sys

    sys.path.insert(0, str(ROOT / "configs"))
    yield
    sys.path.remove(str(ROOT / "configs"))


def test_a_resumed_rlp_run_is_bitwise_an_uninterrupted_one(configs_on_path, tmp_path, capsys):
    """The EMA is checkpointed and restored: resumed from step 3, step 6 equals the step 6 of the
    run that never stopped, parameters and EMA alike; `to-hf --ema` writes that EMA."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    config = tiny_rlp_config()
    records = train.run(config, str(whole))
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in lines if json.loads(line)["step"] <= 3))
    again = train.run(config, str(resumed))
    losses = lambda rs: [(r["step"], r["loss"], r["reward_mean"])  # noqa: E731
                         for r in rs if "reward_mean" in r and r["step"] > 3]
    assert losses(again) == losses(records) and len(losses(records)) == 3
    _, model, _ = loading.load_run(str(whole))
    abstract = model.abstract_params()
    read = lambda d, item: checkpoint.restore_params(str(d), 6, abstract, item)[1]  # noqa: E731
    for item in ("params", "ema"):
        jax.tree.map(np.testing.assert_array_equal, read(whole, item), read(resumed, item))
    ema6, params6 = read(whole, "ema"), read(whole, "params")
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                            params6, ema6))) > 0

    convert.main(["to-hf", "--checkpoint", str(whole), "--out", str(tmp_path / "ema_hf"),
                  "--ema"])
    _, exported, _ = loading.load_checkpoint(str(tmp_path / "ema_hf"))
    jax.tree.map(np.testing.assert_array_equal, exported, ema6)

    # A run of the other objective keeps no EMA: one line, before any checkpoint is read.
    other = tmp_path / "quiet_star_run"
    other.mkdir()
    saved = json.loads((whole / run_settings.CONFIG_FILE).read_text())
    saved["quiet_star"]["objective"] = "quiet_star"
    (other / run_settings.CONFIG_FILE).write_text(json.dumps(saved))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["to-hf", "--checkpoint", str(other), "--out", str(tmp_path / "out"),
                      "--ema"])
    assert exit_info.value.code == 1 and "keeps no EMA parameters" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (dict(objective="grpo"), "objective='grpo': expected one of"),
    (dict(n_ahead=3), "a thought needs one"),
    (dict(filler_thoughts=True), "filler thoughts are not drawn"),
    (dict(rlp_mixing_head=True), "nothing trains the mixing head"),
    (dict(ema_decay=1.0), "ema_decay=1.0 must be in [0, 1)"),
])
def test_rlp_settings_that_cannot_train_are_named(change, message):
    mcfg, _ = tiny_model()
    with pytest.raises(ValueError, match=re.escape(message)):
        qs_config(mcfg, **{"objective": "rlp", **change})


def test_one_rationale_per_position_is_refused_for_training_not_for_scoring():
    """Held-out scoring thinks once per position; the RLP update needs a group."""
    mcfg, params = tiny_model()
    cfg = qs_config(mcfg, objective="rlp", n_passes=1, n_ahead_talk=1)
    tokens = jnp.asarray(batch_tokens())
    with pytest.raises(ValueError, match="needs n_passes >= 2"):
        rlp.rlp_loss(params, {"tokens": tokens}, jax.random.key(0), cfg, ema_params=params)
    losses = scoring.token_losses(params, tokens, tokens != PAD, jax.random.key(0), cfg)
    assert np.isfinite(np.asarray(losses.think)).all()
