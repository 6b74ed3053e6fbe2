"""The parallel rollout and objective against the authors' way of computing them.

The reference runs transformers' Llama on the whole growing sequence of chain tokens with the
`(k+1)L x (k+1)L` block mask of the authors' code, one forward per pass, and computes the spec's
losses in torch; its autograd gradients are compared with ours.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from qstar_jax import gradient_memory, hf_checkpoint
from qstar_jax import thoughts as thoughts_module
from qstar_jax.gradient_memory import check_reads_before_writes, policy_logprobs
from qstar_jax.model import ModelConfig, Transformer, init_params
from qstar_jax.objective import quiet_star_loss
from qstar_jax.rollout import rollout
from qstar_jax.rows import from_rows, to_rows
from qstar_jax.scoring import evaluation_config, token_losses
from qstar_jax.thoughts import (
    QuietStarConfig,
    add_thought_params,
    chain_reads,
    head_logits,
    head_rows,
    lm_logits,
    mask_thought_logits,
    sample,
    speakable_columns,
    speakable_head,
    speakable_index,
    speakable_token,
    token_logprob,
)

BASE_VOCAB, PAD = 40, 0
B, L = 2, 10


def tiny_model(seed=0, scan_layers=True, tie_embeddings=False):
    cfg = ModelConfig(vocab_size=BASE_VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_dim=48, rope_theta=1000.0, norm_eps=1e-6, scan_layers=scan_layers,
                      tie_embeddings=tie_embeddings)
    mcfg, params = add_thought_params(init_params(cfg, jax.random.key(seed)), cfg, 7,
                                      jax.random.key(seed + 1))
    # A non-zero mixing head, so the talk passes really mix.
    keys = iter(jax.random.split(jax.random.key(seed + 2), 10))
    params["mixing_head"] = jax.tree.map(
        lambda x: 0.3 * jax.random.normal(next(keys), x.shape), params["mixing_head"])
    params["end_embedding"] = params["end_embedding"] + 0.01
    return mcfg, params


def qs_config(mcfg, **kw):
    kw = {"n_ahead": 5, "n_ahead_talk": 3, "n_passes": 2, **kw}
    return QuietStarConfig(model=mcfg, start_thought_id=BASE_VOCAB,
                           end_thought_id=BASE_VOCAB + 1, pad_id=PAD, **kw)


def batch_tokens(seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(1, BASE_VOCAB, (B, L)).astype(np.int32)
    tokens[1, -3:] = PAD  # right padding, ignored as labels and masked as keys
    return tokens


def forced_thoughts(cfg, seed=1):
    rng = np.random.RandomState(seed)
    return rng.randint(1, BASE_VOCAB, (B, cfg.n_passes, L, cfg.n_sampled)).astype(np.int32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    mcfg, params = tiny_model()
    cfg = qs_config(mcfg)
    path = tmp_path_factory.mktemp("hf")
    hf_checkpoint.to_hf(params, mcfg, path, quiet_star=cfg)
    return cfg, params, path


@pytest.fixture(scope="module")
def tied_setup(tmp_path_factory):
    """A model whose output head is its input embedding, as SmolLM2's (the demo model)."""
    mcfg, params = tiny_model(seed=3, tie_embeddings=True)
    assert "lm_head" not in params["decoder"]
    cfg = qs_config(mcfg)
    path = tmp_path_factory.mktemp("hf_tied")
    hf_checkpoint.to_hf(params, mcfg, path, quiet_star=cfg)
    return cfg, params, path


# ----------------------------------------------------------------------------- naive reference


class NaiveQuietStar:
    """The authors' algorithm: every pass re-runs the model on [x, chain_1, ..., chain_k].

    Variants are read from `cfg` and written out plainly: `cfg.mixing_sigmoid` squashes the
    head's output through a sigmoid; `cfg.model.sliding_window` drops every key `window` or more
    positions before its query in the block mask (the checkpoint at `path` need not have one).
    A tied checkpoint ties `lm.lm_head` to the embedding in transformers.
    """

    def __init__(self, path, cfg):
        self.cfg = cfg
        self.lm = transformers.AutoModelForCausalLM.from_pretrained(
            path, attn_implementation="eager", dtype=torch.float32).eval()
        extra = safetensors.numpy.load_file(f"{path}/model.safetensors")
        self.extra = {k: torch.tensor(v, requires_grad=True) for k, v in extra.items()
                      if k.startswith(("start_embedding", "end_embedding", "talk_head"))}

    def head(self, h_base, h_thought):
        w = lambda n: self.extra[f"talk_head.0.{n}.weight"]  # noqa: E731
        b = lambda n: self.extra[f"talk_head.0.{n}.bias"]  # noqa: E731
        x = torch.cat([h_base, h_thought], -1)
        x = torch.relu(x @ w(0).T + b(0))
        x = torch.relu(x @ w(2).T + b(2))
        x = (x @ w(4).T)[..., 0]
        return torch.sigmoid(x) if self.cfg.mixing_sigmoid else x

    def block_mask(self, k, valid):
        """[B, 1, (k+1)L, (k+1)L] additive mask: base causal; chain j sees x[:j+1], its chain.

        Block blk holds position i + blk at row i; with a sliding window a key at position m
        is seen from position q only if q - m < window."""
        n = (k + 1) * L
        allowed = torch.zeros(B, n, n, dtype=torch.bool)
        causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
        window = self.cfg.model.sliding_window
        i = torch.arange(L)
        for blk in range(k + 1):
            seen = causal.clone()
            if window is not None:
                seen &= (i[:, None] + blk - i[None, :]) < window
            allowed[:, blk * L:(blk + 1) * L, :L] = seen[None] & valid[:, None, :]
            for prev in range(1, blk + 1):
                own = torch.eye(L).bool() & (window is None or blk - prev < window)
                allowed[:, blk * L:(blk + 1) * L, prev * L:(prev + 1) * L] = own
        neg = torch.finfo(torch.float32).min
        return torch.where(allowed, 0.0, neg)[:, None]

    def loss(self, tokens, thoughts):
        cfg, lm = self.cfg, self.lm
        tok = torch.tensor(tokens, dtype=torch.long)
        valid = tok != PAD
        embed = lm.model.embed_tokens
        scale = cfg.embedding_scale
        start = self.extra["start_embedding"][0] * scale
        end = self.extra["end_embedding"][0] * scale
        mask_ids = [cfg.start_thought_id, cfg.end_thought_id]
        out = {}

        def forward(blocks, k):
            x = torch.cat(blocks, 1)
            pos = torch.cat([torch.arange(L) + i for i in range(k + 1)])[None].expand(B, -1)
            h = lm.model(inputs_embeds=x, position_ids=pos,
                         attention_mask=self.block_mask(k, valid)).last_hidden_state
            return h[:, k * L:]

        h_base = forward([embed(tok)], 0)
        base_logits = lm.lm_head(h_base)
        out["base_logits"] = base_logits
        labels = torch.cat([tok[:, 1:], torch.full((B, 1), PAD)], 1)
        ce0 = torch.nn.functional.cross_entropy(
            base_logits.transpose(1, 2), labels, reduction="none") * (labels != PAD)
        n_talk, s = cfg.n_ahead_talk, cfg.n_sampled
        ce_talk = torch.zeros(B, cfg.n_passes, n_talk, L)
        logprobs = torch.zeros(B, cfg.n_passes, L, s)
        talk_logits = []
        for p in range(cfg.n_passes):
            blocks = [embed(tok)]
            for k in range(1, cfg.n_chain_passes + 1):
                if k == 1:
                    x = start.expand(B, L, -1)
                elif k <= cfg.n_ahead - 2:
                    x = embed(torch.tensor(thoughts[:, p, :, k - 2], dtype=torch.long))
                elif k == cfg.n_ahead - 1:
                    x = end.expand(B, L, -1)
                else:
                    shift = k - cfg.n_ahead + 1
                    x = embed(torch.cat([tok[:, shift:], torch.full((B, shift), PAD)], 1))
                blocks.append(x)
                h = forward(blocks, k)
                if k <= s:
                    logits = lm.lm_head(h).clone()
                    logits[..., mask_ids] = -1e10
                    lp = torch.log_softmax(logits / cfg.reinforce_temperature, -1)
                    chosen = torch.tensor(thoughts[:, p, :, k - 1], dtype=torch.long)
                    logprobs[:, p, :, k - 1] = lp.gather(-1, chosen[..., None])[..., 0]
                t = k - (cfg.n_ahead - 1)
                if t >= 0:
                    hb = torch.cat([h_base[:, t:], torch.zeros(B, t, h.shape[-1])], 1)
                    w = self.head(hb, h)[..., None]
                    logits = lm.lm_head((1 - w) * hb + w * h)
                    talk_logits.append(logits)
                    tgt = torch.cat([tok[:, t + 1:], torch.full((B, t + 1), PAD)], 1)
                    ce = torch.nn.functional.cross_entropy(
                        logits.transpose(1, 2), tgt, reduction="none")
                    ce_talk[:, p, t] = ce * (tgt != PAD)
        out["talk_logits"] = talk_logits
        label_count = lambda t: (torch.cat(  # noqa: E731
            [tok[:, t + 1:], torch.full((B, t + 1), PAD)], 1) != PAD).sum()
        loss_base = ce0.sum() / label_count(0)
        loss_talk = [ce_talk[:, :, t].sum() / (cfg.n_passes * label_count(t))
                     for t in range(n_talk)]
        nll = 0.5 * loss_base + 0.5 * sum(loss_talk) / n_talk
        j = L - n_talk - 1
        reward = sum(ce0[:, None, t:t + j] - ce_talk[:, :, t, :j] for t in range(n_talk))
        adv = reward - reward.mean(1, keepdim=True) if cfg.use_trice_baseline else reward
        adv = adv.clamp(min=0).detach()
        policy = (-adv[..., None] * logprobs[:, :, :j]).mean()
        out["logprobs"] = logprobs
        out.update(loss=nll + cfg.policy_loss_beta * policy, nll=nll, loss_base=loss_base,
                   policy_loss=policy, reward_mean=reward.mean(),
                   **{f"loss_talk_{t}": v for t, v in enumerate(loss_talk)})
        return out


def grads_by_hf_name(grads, cfg, path):
    hf_checkpoint.to_hf(grads, cfg.model, path, quiet_star=cfg)
    return safetensors.numpy.load_file(f"{path}/model.safetensors")


# ----------------------------------------------------------------------------- tests


# The variants the configs use, each against the naive reference. Float32 throughout: values at
# rtol 1e-5, logits and thought log-probs at atol 1e-5, and gradients at 1e-5 of each tensor's
# largest entry, except where the TRICE baseline cancels (see the test).
NAIVE_VARIANTS = {
    # The authors' settings without the baseline, at the 1e6 policy weight: the advantages are
    # rewards, no cancellation, so the weighted policy gradient is exact to 1e-5 too.
    "untied-remat-no_baseline": (False, dict(use_trice_baseline=False)),
    # The demo's path: tied embeddings (SmolLM2), `remat_passes=False` (configs/demo.py), TRICE.
    "tied-no_remat-trice2": (True, dict(remat_passes=False, policy_loss_beta=1.0)),
    # Three rationales under TRICE (two carry the policy gradient), the bounded mixing weight,
    # and a sliding window of 7 that drops base keys from positions 7 on (chains reach 15); the
    # chains' own keys, at most 5 positions back, stay inside it.
    "sigmoid-window-trice3": (False, dict(mixing_sigmoid=True, n_passes=3, policy_loss_beta=1.0,
                                          sliding_window=7)),
    # Attention over the base keys block by block (`span_attention`, blocks of 4 keys: L = 10 is
    # not a multiple), in the base pass and every chain pass, under the sliding window; TRICE at
    # policy weight 1 (at 1e6 the blocks' float32 rounding, ~2e-5 of an entry, is amplified
    # past 1e-5 of the largest gradient entry in one of the head's 1344).
    "blockwise-window-trice2": (False, dict(policy_loss_beta=1.0, sliding_window=7,
                                            attention_block=4)),
}


@pytest.mark.parametrize("variant", list(NAIVE_VARIANTS))
def test_rollout_loss_and_gradients_match_naive_growing_mask(request, tmp_path, variant):
    """Losses, metrics, logits, thought log-probs and every parameter's gradient.

    With the TRICE baseline a rationale's advantage is the difference of nearly equal rewards:
    float32 rounding of ~1e-7 in each is ~1e-4 relative in the policy term, and at the default
    1e6 policy weight that swamps everything else in the loss and its gradient (the untied
    variant checks the weighted gradient without the baseline). With the baseline the variants
    weigh the policy term 1: its gradient, through the rows that carry it, then sits beside the
    NLL's at the same scale, and both are checked at 1e-5; the policy term's value keeps 5e-4.
    One exception: the start embedding, which every thought log-prob reads at pass 1. Its policy
    gradient sums advantage-weighted terms ~50x its total (without the baseline it is ~40, with
    it ~0.5; measured), so the advantages' rounding is ~1e-4 of it: 2e-4 there, and only there.
    """
    tied, changes = NAIVE_VARIANTS[variant]
    cfg, params, path = request.getfixturevalue("tied_setup" if tied else "setup")
    changes = dict(changes)
    model = dict(sliding_window=changes.pop("sliding_window", None),
                 attention_block=changes.pop("attention_block", cfg.model.attention_block))
    cfg = cfg.replace(model=cfg.model.replace(**model), **changes)
    assert cfg.model.tie_embeddings == tied
    tokens, thoughts = batch_tokens(), forced_thoughts(cfg)
    naive = NaiveQuietStar(path, cfg)
    ref = naive.loss(tokens, thoughts)
    ref["loss"].backward()
    tokens_j, thoughts_j = jnp.asarray(tokens), jnp.asarray(thoughts)

    @jax.jit
    def ours(p):
        (_, metrics), grads = jax.value_and_grad(
            lambda p: quiet_star_loss(p, {"tokens": tokens_j}, jax.random.key(0), cfg, thoughts_j),
            has_aux=True)(p)
        ro = rollout(p, tokens_j, tokens_j != PAD, jax.random.key(0), cfg, thoughts_j,
                     return_talk_logits=True)
        return metrics, grads, ro

    metrics, grads, ro = ours(params)
    assert ref["policy_loss"].item() != 0.0  # the REINFORCE term is exercised
    names = ["nll", "loss_base"] + [f"loss_talk_{t}" for t in range(cfg.n_ahead_talk)]
    cancels = cfg.use_trice_baseline and cfg.policy_loss_beta > 1
    for name in names + ([] if cancels else ["loss"]):
        np.testing.assert_allclose(metrics[name], ref[name].item(), rtol=1e-5, err_msg=name)
    # A reward is a difference of cross-entropies: 1e-5 of their size, not of the difference.
    np.testing.assert_allclose(metrics["reward_mean"], ref["reward_mean"].item(),
                               atol=1e-5 * ref["loss_base"].item())
    for name in ["policy_loss"] + (["loss"] if cancels else []):
        np.testing.assert_allclose(metrics[name], ref[name].item(), rtol=5e-4, err_msg=name)
    np.testing.assert_allclose(ro.thought_logprobs, ref["logprobs"].detach(), atol=1e-5)
    np.testing.assert_allclose(ro.base_logits, ref["base_logits"].detach(), rtol=1e-5, atol=1e-5)
    rows = tokens != PAD  # padded chains see other (masked) keys; never scored
    for i, logits in enumerate(ref["talk_logits"]):
        p, t = divmod(i, cfg.n_ahead_talk)
        np.testing.assert_allclose(np.asarray(ro.talk_logits[:, p, t])[rows],
                                   logits.detach().numpy()[rows], rtol=1e-5, atol=1e-5,
                                   err_msg=f"{p} {t}")

    ours_g = grads_by_hf_name(grads, cfg, tmp_path / "grads")
    theirs = {n: p.grad for n, p in naive.lm.named_parameters()}  # a tied head is one tensor
    theirs.update({n: p.grad for n, p in naive.extra.items()})
    assert set(ours_g) == set(theirs)
    assert ("lm_head.weight" in theirs) != tied
    for name, g in theirs.items():
        g = g.numpy()
        scale = max(np.abs(g).max(), 1e-6)
        tol = 2e-4 if name == "start_embedding" and cfg.use_trice_baseline else 1e-5
        np.testing.assert_allclose(ours_g[name] / scale, g / scale, atol=tol, err_msg=name)
    for name in ["start_embedding", "end_embedding", "talk_head.0.0.weight",
                 "talk_head.0.4.weight", "model.embed_tokens.weight",
                 "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"]:
        assert np.abs(ours_g[name]).max() > 0, name  # every part of the model learns


def test_bf16_compute_matches_float32_reference(setup):
    """bf16 compute with float32 parameters (configs/gpu.py, configs/tpu_v4.py) against the
    naive reference in float32.

    bf16 keeps 8 significant bits, so each rounding is up to 2^-9 ~ 2e-3 relative, and every
    matmul input, norm and residual add of 2 layers and up to 7 chain passes is rounded. The
    errors are independent and add in quadrature, so logits land within ~1e-2 of their largest
    size (measured: 4e-3 base, up to 2e-2 on talk logits, 4e-4 absolute on thought log-probs of
    size ~4); the losses, averages over many tokens near log V, within ~4e-5 (measured). The
    bounds leave 2-5x room and are far below what a wrong mask, mixing weight or pass order
    gives (tens of percent of a logit). The policy term is left out: under the TRICE baseline
    it is a difference of nearly equal rewards, which bf16 does not resolve. bf16 must really
    run: the logits differ from float32's by far more than float32 rounding (1e-6).
    """
    cfg, params, path = setup
    cfg16 = cfg.replace(model=cfg.model.replace(dtype="bfloat16"))
    tokens, thoughts = batch_tokens(), forced_thoughts(cfg)
    ref = NaiveQuietStar(path, cfg).loss(tokens, thoughts)
    tokens_j, thoughts_j = jnp.asarray(tokens), jnp.asarray(thoughts)

    @jax.jit
    def ours(p):
        _, metrics = quiet_star_loss(p, {"tokens": tokens_j}, jax.random.key(0), cfg16, thoughts_j)
        ro = rollout(p, tokens_j, tokens_j != PAD, jax.random.key(0), cfg16, thoughts_j,
                     return_talk_logits=True)
        return metrics, ro

    metrics, ro = ours(params)
    for name in ["nll", "loss_base"] + [f"loss_talk_{t}" for t in range(cfg.n_ahead_talk)]:
        np.testing.assert_allclose(metrics[name], ref[name].item(), rtol=2e-4, err_msg=name)

    def relative_error(got, want):
        return np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()

    base = relative_error(ro.base_logits, ref["base_logits"].detach().numpy())
    assert 1e-4 < base < 1e-2, base
    rows = tokens != PAD
    for i, logits in enumerate(ref["talk_logits"]):
        p, t = divmod(i, cfg.n_ahead_talk)
        err = relative_error(np.asarray(ro.talk_logits[:, p, t])[rows],
                             logits.detach().numpy()[rows])
        assert err < 4e-2, (p, t, err)
    np.testing.assert_allclose(ro.thought_logprobs, ref["logprobs"].detach(), atol=2e-3)


def test_evaluation_losses_match_naive_growing_mask(setup):
    """`scoring.token_losses` (what every held-out evaluation reports) per token: the base pass,
    and each talk offset after the thought it sampled, as the naive reference computes them."""
    cfg, params, path = setup
    tokens = batch_tokens()
    mask = tokens != PAD
    ours = jax.jit(token_losses, static_argnums=4)(params, jnp.asarray(tokens), jnp.asarray(mask),
                                                   jax.random.key(3), cfg)
    assert ours.thoughts.shape == (B, L, cfg.n_sampled)
    naive = NaiveQuietStar(path, evaluation_config(cfg))
    ref = naive.loss(tokens, np.asarray(ours.thoughts)[:, None])  # the thoughts ours sampled

    def cross_entropy(logits, t):  # -log p(x[j+1+t]) at j, where that token is real
        logp = torch.log_softmax(logits.detach().double(), -1).numpy()
        target = np.concatenate([tokens[:, t + 1:], np.full((B, t + 1), PAD)], 1)
        ce = -np.take_along_axis(logp, target[..., None], -1)[..., 0]
        return np.where(target != PAD, ce, 0.0), target != PAD

    base, valid = cross_entropy(ref["base_logits"], 0)
    np.testing.assert_array_equal(ours.valid[:, 0], valid)
    np.testing.assert_allclose(ours.base, base, rtol=1e-5, atol=1e-5)
    for t, logits in enumerate(ref["talk_logits"]):
        talk, valid = cross_entropy(logits, t)
        np.testing.assert_array_equal(ours.valid[:, t], valid)
        np.testing.assert_allclose(ours.talk[:, t], talk, rtol=1e-5, atol=1e-5, err_msg=str(t))
    assert np.abs(np.asarray(ours.think) - np.asarray(ours.base)).max() > 1e-3  # thoughts count


@pytest.mark.parametrize("trice, bonus", [(True, False), (False, False), (True, True)])
def test_policy_gradient_on_the_rows_that_carry_it(setup, trice, bonus):
    """The thought log-probs' gradient equals plain autodiff, for any cotangent.

    With the TRICE baseline at most one of a position's two rationales has a positive advantage
    and only that row is recomputed; without it every row is. A second term on every
    rationale's log-probs (`bonus`, an entropy bonus say) reaches both rows: all are recomputed.
    """
    cfg, params, _ = setup
    cfg = cfg.replace(use_trice_baseline=trice)
    s, r, d = cfg.n_sampled, cfg.n_passes * B, cfg.model.d_model
    keys = jax.random.split(jax.random.key(5), 5)
    h_SRLD = jax.random.normal(keys[0], (s, r, L, d))
    tokens_SRL = jax.random.randint(keys[1], (s, r, L), 1, BASE_VOCAB)
    ct_SRL = jax.random.normal(keys[2], (s, r, L))
    if trice:  # zero on one random rationale of each position, as clamped advantages are
        zero_SBL = jax.random.bernoulli(keys[3], 0.5, (s, B, L))
        ct_SRL = ct_SRL * jnp.concatenate([zero_SBL, ~zero_SBL], 1)
    if bonus:
        ct_SRL = ct_SRL + 0.1 * jax.random.normal(keys[4], (s, r, L))

    def plain(p, h):
        logits = mask_thought_logits(lm_logits(p, cfg, h), cfg)
        logprobs = jax.nn.log_softmax(logits / cfg.reinforce_temperature, -1)
        return jnp.take_along_axis(logprobs, tokens_SRL[..., None], -1)[..., 0]

    values, vjp = jax.vjp(plain, params, h_SRLD)
    want_params, want_h = vjp(ct_SRL)

    def ours(p, h):
        return policy_logprobs(speakable_head(head_rows(p, cfg), cfg), h,
                               speakable_index(tokens_SRL, cfg), plain(p, h), cfg)

    got_values, vjp = jax.vjp(ours, params, h_SRLD)
    got_params, got_h = vjp(ct_SRL)
    assert cfg.policy_rows == (1 if trice else 2)
    np.testing.assert_allclose(got_values, values, atol=1e-6)
    np.testing.assert_allclose(got_h, want_h, atol=1e-6)
    want_head = want_params["decoder"]["lm_head"]["kernel"]
    np.testing.assert_allclose(got_params["decoder"]["lm_head"]["kernel"], want_head,
                               atol=1e-6 * np.abs(want_head).max())
    assert np.abs(got_h).max() > 0


def test_a_second_loss_term_on_thought_logprobs_gets_its_whole_gradient(setup, tmp_path):
    """With the TRICE baseline the policy gradient recomputes one rationale per position; a term
    on every rationale's thought log-probs still gets the naive reference's autograd gradient."""
    cfg, params, path = setup
    assert cfg.policy_rows < cfg.n_passes
    tokens, thoughts = batch_tokens(), forced_thoughts(cfg)
    weights = np.random.RandomState(2).normal(size=thoughts.shape).astype(np.float32)
    naive = NaiveQuietStar(path, cfg)
    (torch.tensor(weights) * naive.loss(tokens, thoughts)["logprobs"]).sum().backward()

    def bonus(p):
        ro = rollout(p, jnp.asarray(tokens), jnp.asarray(tokens != PAD), jax.random.key(0), cfg,
                     jnp.asarray(thoughts))
        return jnp.sum(weights * ro.thought_logprobs)

    ours = grads_by_hf_name(jax.jit(jax.grad(bonus))(params), cfg, tmp_path / "grads")
    theirs = {n: p.grad for n, p in naive.lm.named_parameters()}
    theirs.update({n: p.grad for n, p in naive.extra.items()})
    for name, g in theirs.items():
        g = np.zeros_like(ours[name]) if g is None else g.numpy()
        scale = max(np.abs(g).max(), 1e-6)
        np.testing.assert_allclose(ours[name] / scale, g / scale, atol=1e-5, err_msg=name)
    assert np.abs(ours["model.layers.0.self_attn.q_proj.weight"]).max() > 0


def test_chain_mask_that_shows_a_later_slot_is_caught(setup, monkeypatch):
    """The rematerialised pass scan recomputes each pass against the final chain buffer, right
    only while pass k reads no slot written at or after it: a mask that leaks one is named."""
    check_reads_before_writes(chain_reads(6))
    own_slot = chain_reads(6) | np.eye(7, 6, -1, dtype=bool)  # pass k also reads slot k - 1
    with pytest.raises(AssertionError, match="chain pass 1 reads buffer slot 0, written by pass 1"):
        check_reads_before_writes(own_slot)
    cfg, params, _ = setup
    tokens = jnp.asarray(batch_tokens())
    leaky = lambda n: np.ones((n + 1, n), bool)  # noqa: E731
    monkeypatch.setattr(thoughts_module, "chain_reads", leaky)
    monkeypatch.setattr(gradient_memory, "chain_reads", leaky)
    with pytest.raises(AssertionError, match="chain pass 1 reads buffer slot 0"):
        rollout(params, tokens, tokens != PAD, jax.random.key(0), cfg)


def test_chain_sees_nothing_of_the_future(setup):
    cfg, params, _ = setup
    tokens = batch_tokens()
    j = 4
    changed = tokens.copy()
    changed[:, j + 1:] = (changed[:, j + 1:] + 5) % BASE_VOCAB + 1
    run = jax.jit(lambda t: rollout(params, t, jnp.ones(t.shape, bool), jax.random.key(3), cfg))
    a, b = run(jnp.asarray(tokens)), run(jnp.asarray(changed))  # one compile for both
    np.testing.assert_array_equal(a.thought_tokens[:, :, :j + 1], b.thought_tokens[:, :, :j + 1])
    np.testing.assert_allclose(a.thought_logprobs[:, :, :j + 1], b.thought_logprobs[:, :, :j + 1],
                               atol=1e-6)
    assert not np.allclose(a.thought_logprobs[:, :, j + 1:], b.thought_logprobs[:, :, j + 1:])


def test_without_thoughts_loss_is_plain_cross_entropy(setup):
    cfg, params, _ = setup
    cfg1 = cfg.replace(n_ahead=1, n_ahead_talk=1, n_passes=1)
    tokens = batch_tokens()
    loss, _ = quiet_star_loss(params, {"tokens": jnp.asarray(tokens)}, jax.random.key(0), cfg1)
    logits = np.asarray(Transformer(cfg.model).apply({"params": params["decoder"]},
                                                     jnp.asarray(tokens)), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = [-logp[b, i, tokens[b, i + 1]] for b in range(B) for i in range(L - 1)
           if tokens[b, i + 1] != PAD]
    np.testing.assert_allclose(loss, np.mean(nll), rtol=1e-5)


def test_reinforce_terms_by_hand(setup):
    from qstar_jax.objective import reinforce_terms

    cfg = setup[0].replace(n_ahead_talk=2, n_passes=2, n_ahead=4)  # S = 1, L = 5 -> J = 2
    ce0 = jnp.array([[1.0, 2.0, 3.0, 4.0, 0.0]])
    ce_talk = jnp.array([[[[0.5, 2.5, 1.0, 0, 0], [1.0, 1.0, 2.0, 0, 0]],
                          [[1.5, 1.0, 1.0, 0, 0], [2.0, 4.0, 2.0, 0, 0]]]])  # [B=1, P=2, T=2, L=5]
    logprob = jnp.array([[[[-1.0], [-2.0], [-9.0], [-9.0], [-9.0]],
                          [[-0.5], [-1.0], [-9.0], [-9.0], [-9.0]]]])  # [1, 2, 5, 1]
    # r[p, j] = (ce0[j] - ce_talk[p,0,j]) + (ce0[j+1] - ce_talk[p,1,j])
    # p0: j0 = (1-.5)+(2-1) = 1.5, j1 = (2-2.5)+(3-1) = 1.5
    # p1: j0 = (1-1.5)+(2-2) = -0.5, j1 = (2-1)+(3-4) = 0.0
    reward, adv, policy = reinforce_terms(ce0, ce_talk, logprob, cfg)
    np.testing.assert_allclose(reward, [[[1.5, 1.5], [-0.5, 0.0]]])
    # baseline per position: j0 0.5, j1 0.75 -> advantages p0 [1.0, 0.75], p1 [-1, -0.75] -> 0
    np.testing.assert_allclose(adv, [[[1.0, 0.75], [0.0, 0.0]]])
    # policy = mean(-adv * logprob) over (p, j) = (1*1 + 0.75*2 + 0 + 0) / 4
    np.testing.assert_allclose(policy, 2.5 / 4)
    _, adv_raw, _ = reinforce_terms(ce0, ce_talk, logprob,
                                    cfg.replace(remove_negative_rewards=False,
                                                use_trice_baseline=False))
    np.testing.assert_allclose(adv_raw, reward)


@pytest.mark.parametrize("thought_ids", [(BASE_VOCAB, BASE_VOCAB + 1), (5, 2)])
def test_forced_thoughts_ignore_rng_and_sampling_avoids_thought_tokens(setup, thought_ids):
    """Also with the thought tokens inside the vocabulary rather than at its end."""
    cfg, params, _ = setup
    cfg = cfg.replace(start_thought_id=thought_ids[0], end_thought_id=thought_ids[1])
    tokens = jnp.asarray(batch_tokens())
    forced = forced_thoughts(cfg)
    thoughts = jnp.asarray(np.where(np.isin(forced, thought_ids), 1, forced))
    run = jax.jit(lambda p, r, th: quiet_star_loss(p, {"tokens": tokens}, r, cfg, th)[0])
    assert float(run(params, jax.random.key(1), thoughts)) == float(
        run(params, jax.random.key(2), thoughts))
    # Forced tokens come back as given.
    forced = jax.jit(lambda th: rollout(params, tokens, tokens != PAD, jax.random.key(1), cfg,
                                        th).thought_tokens)(thoughts)
    np.testing.assert_array_equal(forced, thoughts)
    # Make the thought tokens by far the likeliest: sampling must still never pick them.
    rigged = jax.tree.map(lambda x: x, params)
    kernel = rigged["decoder"]["lm_head"]["kernel"]
    rigged["decoder"]["lm_head"]["kernel"] = kernel.at[np.array(thought_ids)].set(50.0)
    for greedy in (False, True):
        drawn_cfg = cfg.replace(greedy_thoughts=greedy)
        drawn = jax.jit(lambda p, c=drawn_cfg: rollout(
            p, tokens, tokens != PAD, jax.random.key(4), c).thought_tokens)(rigged)
        assert drawn.shape == (B, cfg.n_passes, L, cfg.n_sampled)
        drawn = np.asarray(drawn)
        assert not np.isin(drawn, thought_ids).any()
        assert drawn.min() >= 0 and drawn.max() < cfg.model.vocab_size
        if not greedy:
            assert len(np.unique(drawn)) > 3  # really sampled


@pytest.mark.parametrize("thought_ids", [(BASE_VOCAB, BASE_VOCAB + 1), (5, 2)])
def test_thought_logits_are_the_full_logits_without_the_thought_tokens(setup, thought_ids):
    cfg, params, _ = setup
    cfg = cfg.replace(start_thought_id=thought_ids[0], end_thought_id=thought_ids[1])
    h = jax.random.normal(jax.random.key(0), (3, cfg.model.d_model))
    keep = np.array([i for i in range(cfg.model.vocab_size) if i not in thought_ids])
    full = Transformer(cfg.model).apply({"params": params["decoder"]}, h, method="logits")
    np.testing.assert_allclose(lm_logits(params, cfg, h), full, rtol=1e-6, atol=1e-6)
    got = head_logits(speakable_head(head_rows(params, cfg), cfg), cfg, h)
    np.testing.assert_allclose(got, full[:, keep], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(speakable_columns(full, cfg), full[:, keep])
    np.testing.assert_array_equal(speakable_index(jnp.asarray(keep), cfg), np.arange(keep.size))
    np.testing.assert_array_equal(speakable_token(jnp.arange(keep.size), cfg), keep)


@pytest.mark.parametrize("thought_ids", [(BASE_VOCAB, BASE_VOCAB + 1), (5, 2), (BASE_VOCAB + 1, 3)])
def test_speakable_index_is_defined_for_every_id_under_jit(setup, thought_ids):
    """A permutation of the vocabulary with the thought ids last, the lower first; its inverse
    is `speakable_token`."""
    cfg = setup[0].replace(start_thought_id=thought_ids[0], end_thought_id=thought_ids[1])
    v = cfg.model.vocab_size
    index = jax.jit(lambda t: speakable_index(t, cfg))(jnp.arange(v))
    np.testing.assert_array_equal(np.sort(index), np.arange(v))
    assert (index[min(thought_ids)], index[max(thought_ids)]) == (v - 2, v - 1)
    np.testing.assert_array_equal(jax.jit(lambda i: speakable_token(i, cfg))(index), np.arange(v))


def test_forced_thought_id_under_jit_gives_nan_logprob(setup):
    """Traced forced thoughts are not checked: a thought id among them is fed as itself, comes
    back as given, and its log-prob under the thought distribution (which excludes it) is NaN."""
    cfg, params, _ = setup
    cfg = cfg.replace(start_thought_id=5, end_thought_id=2)
    tokens = jnp.asarray(batch_tokens())
    forced = forced_thoughts(cfg)
    forced = np.where(np.isin(forced, (5, 2)), 1, forced)
    forced[0, 1, 3, 0] = cfg.end_thought_id
    ro = jax.jit(lambda th: rollout(params, tokens, tokens != PAD, jax.random.key(0), cfg, th))(
        jnp.asarray(forced))
    np.testing.assert_array_equal(ro.thought_tokens, forced)
    nan = np.isnan(np.asarray(ro.thought_logprobs))
    assert nan[0, 1, 3, 0] and nan.sum() == 1


def test_rows_are_rationale_major():
    x_PB = jnp.arange(2 * 3 * 4).reshape(1, 2, 3, 4)
    x_R = to_rows(x_PB, axis=1)
    assert x_R.shape == (1, 6, 4)
    np.testing.assert_array_equal(x_R[0, 1 * 3 + 2], x_PB[0, 1, 2])  # row p * B + b
    np.testing.assert_array_equal(from_rows(x_R, 2, axis=1), x_PB)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_token_logprob_and_its_gradient_match_log_softmax(temperature):
    logits = jax.random.normal(jax.random.key(0), (2, 3, 50)) * 4
    logits = logits.at[0, 0, 7].set(-1e10)  # a masked entry
    tokens = jax.random.randint(jax.random.key(1), (2, 3), 0, 50)
    ct = jax.random.normal(jax.random.key(2), (2, 3))

    def reference(x):
        logprobs = jax.nn.log_softmax(x / temperature, -1)
        return jnp.take_along_axis(logprobs, tokens[..., None], -1)[..., 0]

    want, want_vjp = jax.vjp(reference, logits)
    got, got_vjp = jax.vjp(lambda x: token_logprob(x, tokens, temperature), logits)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_vjp(ct)[0], want_vjp(ct)[0], rtol=1e-6, atol=1e-7)
    assert float(got_vjp(ct)[0][0, 0, 7]) == 0.0


@pytest.mark.parametrize("change, message", [
    ({"n_ahead": 2}, "n_ahead=2"),
    ({"start_thought_id": 99}, "start_thought_id=99"),
])
def test_inconsistent_settings_are_named(setup, change, message):
    cfg = setup[0]
    with pytest.raises(ValueError, match=message):
        cfg.replace(**change)


def test_short_batch_and_wrong_thought_shape_are_named(setup):
    cfg, params, _ = setup
    short = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="n_ahead_talk=3"):
        quiet_star_loss(params, {"tokens": short}, jax.random.key(0), cfg)
    tokens = jnp.asarray(batch_tokens())
    with pytest.raises(ValueError, match="thought_tokens has shape"):
        quiet_star_loss(params, {"tokens": tokens}, jax.random.key(0), cfg,
                        thought_tokens=jnp.zeros((B, 1, L, 2), jnp.int32))
    with pytest.raises(ValueError, match="never contains"):
        rollout(params, tokens, tokens != PAD, jax.random.key(0), cfg,
                jnp.full((B, cfg.n_passes, L, cfg.n_sampled), cfg.end_thought_id, jnp.int32))


@pytest.mark.parametrize("temperature, block", [(1.0, 128), (0.5, 128), (1.0, None)])
def test_sampler_draws_from_the_softmax_across_blocks(temperature, block):
    """The two-level inverse-CDF sampler against exact probabilities over a 300-token vocabulary
    (three blocks of 128, the last padded; or by default two blocks of 150), including
    zero-probability tokens at block edges."""
    v, n = 300, 200_000
    logits = np.random.default_rng(0).normal(size=v) * 1.5
    for never in (0, 127, 128, 255, 256, 299):
        logits[never] = -1e10
    probs = np.exp((logits - logits.max()) / temperature)
    probs /= probs.sum()
    logits_NV = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, v))
    counts = np.bincount(np.asarray(sample(jax.random.key(3), logits_NV, temperature, block)),
                         minlength=v)
    assert counts.shape == (v,)
    assert counts[[0, 127, 128, 255, 256, 299]].sum() == 0
    # Pearson chi-square over 300 - 6 cells: mean 293, sd ~24; a wrong sampler is far off.
    live = probs > 0
    chi2 = np.sum((counts[live] - n * probs[live]) ** 2 / (n * probs[live]))
    assert chi2 < 293 + 6 * 24, chi2
    # Rows are independent draws: a batch of different rows gets each row's own distribution.
    rows = jnp.asarray([[0.0, -1e10, -1e10], [-1e10, -1e10, 0.0]])
    np.testing.assert_array_equal(sample(jax.random.key(0), rows, block=2), [0, 2])
