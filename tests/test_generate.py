"""KV-cached "think, then speak" decoding against independent references: the parallel rollout's
evaluation-mode logits, the Transformer's full forward and naive re-run-everything loops."""

import random

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qstar_jax import generate, hf_checkpoint, loading
from qstar_jax import tokenizer as tk
from qstar_jax.generate import Decoder, Sampling
from qstar_jax.model import ModelConfig, Transformer, abstract_params
from qstar_jax.rollout import rollout
from qstar_jax.thoughts import QuietStarConfig, add_thought_params, mask_thought_logits

BASE_VOCAB = 60  # + 2 thought tokens
START, END = BASE_VOCAB, BASE_VOCAB + 1
CHARS = " abcdefghijklmnopqrstuvwxyz.,!?"  # the stand-in tokenizer's ids 1 .. 31


def tiny_quiet_star(base_vocab=BASE_VOCAB, window=None, n_ahead=5, seed=0, **model_fields):
    """A random Quiet-STaR model whose mixing head is NOT zero (so mixing is not a no-op).

    Weights are drawn with numpy into the abstract shapes: no initialiser to compile.
    `model_fields` set further ModelConfig fields (e.g. Qwen2's qkv_bias).
    """
    model = ModelConfig(vocab_size=base_vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                        ffn_dim=48, sliding_window=window, remat_policy="none", **model_fields)
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(abstract_params(model))

    def draw(path, x):
        name, noise = jax.tree_util.keystr(path), rng.standard_normal(x.shape)
        w = 1 + 0.1 * noise if "scale" in name else (0.3 if "lm_head" in name else 0.2) * noise
        return jnp.asarray(w, jnp.float32)

    decoder = jax.tree_util.tree_map_with_path(draw, shapes)
    model, params = add_thought_params(decoder, model, 3, jax.random.key(seed))
    d = model.d_model
    params["mixing_head"]["out"]["kernel"] = jnp.asarray(2 * rng.standard_normal((d, 1)),
                                                         jnp.float32)
    params["start_embedding"] = jnp.asarray(0.01 * rng.standard_normal(d), jnp.float32)
    params["end_embedding"] = jnp.asarray(0.01 * rng.standard_normal(d), jnp.float32)
    cfg = QuietStarConfig(model, base_vocab, base_vocab + 1, pad_id=0, n_ahead=n_ahead,
                          n_ahead_talk=1, n_passes=1)
    return cfg, params


class CharTokenizer:
    """A stand-in tokenizer: one id per character of CHARS; id 0 is EOS (or `eos_id`)."""

    bos_id = None

    def __init__(self, eos_id=0):
        self.eos_id = eos_id

    def encode(self, text, add_bos=False):
        return [CHARS.index(c) + 1 for c in text]

    def decode(self, ids):
        return "".join(CHARS[i - 1] if 1 <= i <= len(CHARS) else f"<{i}>" for i in ids)


@pytest.fixture(scope="module")
def model():
    return tiny_quiet_star()


def rows(tokens, lengths):
    return [list(map(int, tokens[b, :n])) for b, n in enumerate(lengths)]


def test_thinking_logits_equal_parallel_eval_logits(model):
    """Forced thoughts: the mixed logits of each decoding step = the rollout's talk logits."""
    cfg, params = model
    b, length, s = 2, 9, cfg.n_sampled
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, BASE_VOCAB, (b, length))
    thoughts = rng.integers(1, BASE_VOCAB, (b, 1, length, s))
    ref = jax.jit(lambda p, t, th: rollout(p, t, jnp.ones((b, length), bool), jax.random.key(0),
                                           cfg, thought_tokens=th, return_talk_logits=True)
                  )(params, jnp.asarray(tokens), jnp.asarray(thoughts))
    want = np.asarray(ref.talk_logits[:, 0, 0])  # [B, L, V]
    assert np.abs(want - np.asarray(ref.base_logits)).max() > 0.5  # mixing changes the logits

    prompt_lengths = [1, 4]  # rows of different lengths: the second is left-padded less
    dec = Decoder(cfg)
    state = dec.start(params, rows(tokens, prompt_lengths), length, jax.random.key(1))
    checked = 0
    for i in range(length):
        j = [min(n - 1 + i, length - 1) for n in prompt_lengths]  # position each row thinks at
        forced_token = jnp.asarray([tokens[r, min(j[r] + 1, length - 1)] for r in range(b)])
        forced_thought = jnp.asarray([thoughts[r, 0, j[r]] for r in range(b)])
        state, out = dec.step(params, state, forced_token, forced_thought)
        for r in range(b):
            if prompt_lengths[r] - 1 + i < length:
                np.testing.assert_allclose(out.logits_BV[r], want[r, j[r]], atol=1e-4, rtol=0)
                np.testing.assert_array_equal(out.thought_BM[r], thoughts[r, 0, j[r]])
                checked += 1
    assert checked == 2 * length - 3


@pytest.mark.parametrize("window", [None, 3])
def test_plain_logits_equal_full_forward(window):
    cfg, params = tiny_quiet_star(window=window)
    b, length = 2, 10
    tokens = np.random.default_rng(1).integers(1, BASE_VOCAB, (b, length))
    want = np.asarray(Transformer(cfg.model).apply({"params": params["decoder"]},
                                                   jnp.asarray(tokens)))
    prompt_lengths = [2, 5]
    dec = Decoder(cfg, thinking=False)
    state = dec.start(params, rows(tokens, prompt_lengths), length, jax.random.key(0))
    for i in range(length - 2):
        j = [n - 1 + i for n in prompt_lengths]
        forced = jnp.asarray([tokens[r, min(j[r] + 1, length - 1)] for r in range(b)])
        state, out = dec.step(params, state, forced)
        assert out.thought_BM.shape == (b, 0)
        for r in range(b):
            if j[r] < length:
                np.testing.assert_allclose(out.logits_BV[r], want[r, j[r]], atol=1e-4, rtol=0)


def naive_greedy(cfg, params, prompt, n_new, thinking):
    """Re-run the whole forward (Transformer, or the parallel rollout) for every new token."""
    width = len(prompt) + n_new
    eval_cfg = cfg.replace(greedy_thoughts=True)

    @jax.jit
    def last_logits(tokens_1L, valid_1L, last):
        if thinking:
            out = rollout(params, tokens_1L, valid_1L, jax.random.key(0), eval_cfg,
                          return_talk_logits=True)
            logits = out.talk_logits[0, 0, 0]
        else:
            logits = Transformer(cfg.model).apply({"params": params["decoder"]}, tokens_1L,
                                                  valid_BL=valid_1L)[0]
        return mask_thought_logits(logits[last], cfg)

    seq = list(prompt)
    for _ in range(n_new):
        tokens = np.zeros((1, width), np.int32)  # right padding cannot change earlier positions
        tokens[0, :len(seq)] = seq
        valid = np.arange(width)[None] < len(seq)
        seq.append(int(jnp.argmax(last_logits(tokens, valid, len(seq) - 1))))
    return seq[len(prompt):]


# Every generate() call below decodes a batch of two prompts for N_NEW tokens, so calls with the
# same model, sampling and thinking mode share one compiled prefill and step.
N_NEW = 6
PROMPTS = ["the cat", "a dog ran."]
GREEDY = dict(max_new_tokens=N_NEW, sampling=Sampling())


@pytest.mark.parametrize("thinking", [False, True])
def test_greedy_generation_equals_naive_loop(model, thinking):
    """Each row of a batch (two lengths, left-padded) equals re-running everything per token."""
    cfg, params = model
    cfg = cfg.replace(greedy_thoughts=True)
    tok = CharTokenizer(eos_id=-1)
    got = generate.generate(params, cfg, tok, PROMPTS, thinking=thinking, **GREEDY)
    for prompt, out in zip(PROMPTS, got, strict=True):
        assert out.tokens == naive_greedy(cfg, params, tok.encode(prompt), N_NEW, thinking)
        assert out.stop_reason == "length"
        assert out.text == tok.decode(out.tokens)
        assert [len(t) for t in out.thoughts] == [cfg.n_sampled if thinking else 0] * N_NEW


def test_stops_at_eos_and_stop_string(model):
    cfg, params = model
    cfg = cfg.replace(greedy_thoughts=True)
    free = generate.generate(params, cfg, CharTokenizer(eos_id=-1), PROMPTS, **GREEDY)[0].tokens
    k = next(i for i in range(1, N_NEW) if free[i] not in free[:i])
    at_eos = generate.generate(params, cfg, CharTokenizer(eos_id=free[k]), PROMPTS, **GREEDY)[0]
    assert (at_eos.tokens, at_eos.stop_reason) == (free[:k], "eos")

    text = CharTokenizer().decode(free)
    cut = generate.generate(params, cfg, CharTokenizer(eos_id=-1), PROMPTS,
                            stop=["never", text[k]], **GREEDY)[0]
    assert (cut.text, cut.stop_reason) == (text[:text.index(text[k])], "stop_string")
    assert cut.tokens == free[:len(cut.tokens)]


def test_sampled_decoding_compiles_once_and_never_speaks_thought_tokens(model):
    cfg, params = model
    # Make the thought tokens by far the likeliest output: they must still never be chosen.
    params = dict(params, decoder=dict(params["decoder"]))
    kernel = params["decoder"]["lm_head"]["kernel"]
    params["decoder"]["lm_head"] = {"kernel": kernel.at[jnp.array([START, END])].set(
        100 * jnp.abs(kernel).max())}
    sampling = Sampling(temperature=1.0, top_p=0.95)
    tok = CharTokenizer(eos_id=-1)
    for seed, prompts in enumerate([PROMPTS, ["other words", "x"]]):
        out = generate.generate(params, cfg, tok, prompts, max_new_tokens=N_NEW,
                                sampling=sampling, seed=seed)
        for g in out:
            assert len(g.tokens) == N_NEW
            assert not (set(g.tokens) | {t for th in g.thoughts for t in th}) & {START, END}
    dec = generate.decoder(cfg, sampling, True)
    assert dec.step._cache_size() == 1  # one compilation for every token of both calls
    assert dec.prefill._cache_size() == 1


def test_sampling_distributions():
    n = 20000
    logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
    logits_BV = jnp.broadcast_to(logits, (n, 4))
    key = jax.random.key(0)
    draw = lambda s: np.bincount(np.asarray(generate.choose(logits_BV, key, s)), minlength=4) / n  # noqa: E731
    np.testing.assert_allclose(draw(Sampling(1.0)), [0.5, 0.3, 0.15, 0.05], atol=0.015)
    tempered = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    np.testing.assert_allclose(draw(Sampling(0.5)), tempered / tempered.sum(), atol=0.015)
    # top_p 0.7: the nucleus is {0, 1} (0.5 < 0.7 <= 0.8), renormalised.
    np.testing.assert_allclose(draw(Sampling(1.0, 0.7)), [0.625, 0.375, 0, 0], atol=0.015)
    np.testing.assert_array_equal(draw(Sampling(1.0, 0.01)), [1, 0, 0, 0])
    np.testing.assert_array_equal(draw(Sampling(0.0)), [1, 0, 0, 0])
    masked = logits_BV.at[:, 0].set(-1e10)  # a zero-probability first token is never drawn
    assert np.asarray(generate.sample(key, masked)).min() >= 1
    with pytest.raises(ValueError, match="top_p"):
        Sampling(1.0, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(-1.0)


# ----------------------------------------------------------------------------- checkpoints, CLI

WORDS = "the cat sat on a mat dog ran fast why because think answer is and so".split()


def save_tiny_checkpoint(directory, seed=0, greedy_thoughts=False):
    """A random Quiet-STaR model with a sentencepiece tokenizer, saved as an HF export."""
    rnd = random.Random(seed)
    texts = [" ".join(rnd.choice(WORDS) for _ in range(12)) + f" {rnd.randint(0, 9999)}.\n"
             for _ in range(300)] + ["Q: A: (A) (B) (C) (D) (E) 0123456789 #### ,\n"]
    tok = tk.train_sentencepiece(texts, vocab_size=360, directory=str(directory) + "_tok")
    cfg, params = tiny_quiet_star(base_vocab=tok.base_vocab_size, seed=seed)
    assert (tok.start_thought_id, tok.end_thought_id) == (cfg.start_thought_id,
                                                          cfg.end_thought_id)
    cfg = cfg.replace(pad_id=tok.pad_id, greedy_thoughts=greedy_thoughts)
    hf_checkpoint.to_hf(params, cfg.model, directory, tokenizer=tok, quiet_star=cfg)
    return cfg, params, tok


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "ckpt"
    save_tiny_checkpoint(path)
    return str(path)


def test_load_checkpoint_round_trip(tmp_path):
    cfg, params, _ = save_tiny_checkpoint(tmp_path / "ckpt", seed=1)
    got_cfg, got_params, tok = loading.load_checkpoint(str(tmp_path / "ckpt"))
    assert got_cfg.replace(model=cfg.model) == cfg
    assert (tok.start_thought_id, tok.end_thought_id) == (cfg.start_thought_id,
                                                          cfg.end_thought_id)
    jax.tree.map(np.testing.assert_array_equal, got_params, params)


def test_cli_prints_prompt_continuation_and_thoughts(checkpoint, capsys):
    generate.main(["--checkpoint", checkpoint, "--prompt", "the cat sat", "--show_thoughts",
                   "--max_new_tokens", "4"])
    printed = capsys.readouterr().out
    cfg, params, tok = loading.load_checkpoint(checkpoint)
    want = generate.generate(params, cfg, tok, ["the cat sat"], max_new_tokens=4)[0]
    context = tok.encode("the cat sat")
    continuation = tok.decode(context + want.tokens)[len(tok.decode(context)):]
    text, thoughts = printed.split("\n--- thoughts")
    assert text == "the cat sat" + continuation + "\n"
    lines = thoughts.strip().splitlines()[1:]
    assert len(lines) == len(want.tokens)
    assert all("<|startthought|>" in line and "<|endthought|>" in line for line in lines)


def test_cli_without_thoughts_and_errors(checkpoint, capsys, tmp_path, monkeypatch):
    """The sampling flags reach the decoder, and what it returns is what is printed."""
    calls, decode = [], generate.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        out = decode(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(generate, "generate", spy)
    generate.main(["--checkpoint", checkpoint, "--prompt", "dog", "--nothoughts",
                   "--max_new_tokens", "3", "--temperature", "0.7", "--top_p", "0.9",
                   "--seed", "5"])
    kwargs, out = calls
    assert kwargs["sampling"] == generate.Sampling(temperature=0.7, top_p=0.9)
    assert (kwargs["thinking"], kwargs["max_new_tokens"], kwargs["seed"]) == (False, 3, 5)
    tok = loading.load_checkpoint(checkpoint)[2]
    assert capsys.readouterr().out == tok.decode(tok.encode("dog") + out[0].tokens) + "\n"
    monkeypatch.undo()
    with pytest.raises(SystemExit) as e:
        generate.main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"])
    assert e.value.code == 1  # found as the command runs
    assert "no such checkpoint directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        generate.main(["--checkpoint", checkpoint, "--prompt", "x", "--top_p", "0"])
    assert e.value.code == 2  # a bad flag value
    assert capsys.readouterr().err == "error: top_p must lie in (0, 1], got 0.0\n"


def test_cli_prints_no_terminal_control_characters(checkpoint, capsys, monkeypatch):
    """Tokens that decode to an escape sequence (ESC [31m: red), a C1 control (CSI) or a
    carriage return never reach the terminal raw: the prompt and continuation are printed
    without their control characters (newlines and tabs stay), the thoughts as Python reprs."""
    cfg, _, tok = loading.load_checkpoint(checkpoint)
    spoken = tok.encode("\x1b[31mred\x9b2J\tcat\rdog\nend")
    assert tok.decode(spoken) == "\x1b[31mred\x9b2J\tcat\rdog\nend"  # byte fallback
    escape = tok.encode("\x1b[0m")
    thoughts = [(escape * cfg.n_sampled)[:cfg.n_sampled]] * len(spoken)
    monkeypatch.setattr(generate, "generate", lambda *a, **k: [
        generate.Generation(tok.decode(spoken), spoken, thoughts, "length")])
    generate.main(["--checkpoint", checkpoint, "--prompt", "say \x1b]0;title\x07",
                   "--show_thoughts"])
    printed = capsys.readouterr().out
    assert not {"\x1b", "\x9b", "\r", "\x07"} & set(printed)
    text = printed.split("\n--- thoughts")[0]
    assert text == "say ]0;title [31mred2J\tcatdog\nend\n"  # (sentencepiece's ▁ before them)
    assert "<|startthought|>" in printed and "\\x1b" in printed  # thoughts: escaped, as repr


def test_printable_keeps_text_and_drops_controls():
    kept = "plain, naïve 東京 😀\n\tindented"
    assert generate.printable(kept) == kept
    controls = "".join(map(chr, [*range(0, 9), *range(11, 32), *range(127, 160)]))
    assert generate.printable(f"a{controls}b") == "ab"
