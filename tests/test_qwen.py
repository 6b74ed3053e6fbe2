"""Qwen2/Qwen2.5 and Qwen3 checkpoints: logits against transformers' own models, exact round trips,
the thought tokens on Qwen's padded vocabulary, the rollout and its gradients against the naive
growing-mask reference, decoding with thoughts, configs/gpu.py:hf, and the refusals."""

import importlib.util
import json
import random
import re
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
import test_convert
import test_generate
import test_thoughts
import tokenizers
import torch
import transformers
from test_convert import (
    SMALL,
    edit_config,
    hf_logits,
    load_hf,
    our_logits,
    random_hf_model,
    saved_model,
    tensors_of,
)
from test_generate import WORDS, tiny_quiet_star
from test_thoughts import BASE_VOCAB as NAIVE_VOCAB
from test_thoughts import qs_config
from tokenizers import AddedToken, decoders, pre_tokenizers, trainers

from qstar_jax import hf_checkpoint, loading
from qstar_jax import tokenizer as tk
from qstar_jax.config import quiet_star_defaults
from qstar_jax.errors import CheckpointError
from qstar_jax.model import ModelConfig, abstract_params
from qstar_jax.thoughts import add_thought_params

ROOT = Path(__file__).resolve().parent.parent
CASES = {  # GQA everywhere (4 query heads, 2 key/value heads); biases drawn non-zero
    "qwen2_tied": (transformers.Qwen2Config, dict(
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        rms_norm_eps=3e-6)),
    "qwen3": (transformers.Qwen3Config, dict(  # head width 12, not 32 / 4
        head_dim=12, rope_parameters={"rope_type": "default", "rope_theta": 5e5})),
    "qwen3_bias_tied": (transformers.Qwen3Config, dict(
        head_dim=16, tie_word_embeddings=True, attention_bias=True, rms_norm_eps=1e-5)),
}


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, tmp_path_factory):
    """(HF model, its saved directory, its logits on a right-padded batch) for each case."""
    return saved_model(*CASES[request.param], tmp_path_factory.mktemp(request.param))


# test_convert's checks of Llama/Mistral checkpoints, run on this module's `saved` Qwen cases:
# logits <= 1e-4 from transformers' on a right-padded batch, every tensor back exactly, v4 keys.
test_qwen_import_matches_transformers = test_convert.test_import_matches_transformers
test_qwen_export_reproduces_every_tensor = test_convert.test_export_reproduces_every_tensor
test_qwen_v4_style_config = test_convert.test_v4_style_config


def test_qwen_settings_are_read_and_written_back(saved, tmp_path):
    model, path, _ = saved
    cfg, params = hf_checkpoint.from_hf(path)
    hf = model.config
    assert (cfg.n_heads, cfg.n_kv_heads) == (4, 2)
    assert cfg.head_dim == getattr(hf, "head_dim", hf.hidden_size // hf.num_attention_heads)
    assert cfg.tie_embeddings == hf.tie_word_embeddings
    assert cfg.qk_norm == (hf.model_type == "qwen3")
    assert cfg.qkv_bias == (hf.model_type == "qwen2" or hf.attention_bias)
    assert cfg.o_bias == (hf.model_type == "qwen3" and hf.attention_bias)
    assert (cfg.sliding_window, cfg.rope_theta, cfg.norm_eps) == (
        None, hf.rope_parameters["rope_theta"], hf.rms_norm_eps)
    biases = [w for n, w in tensors_of(path).items() if n.endswith("bias")]
    assert len(biases) == 2 * (4 if cfg.o_bias else 3 if cfg.qkv_bias else 0)
    assert all(np.abs(w).min() > 0 for w in biases)

    hf_checkpoint.to_hf(params, cfg, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == hf.model_type
    assert config["head_dim"] == cfg.head_dim and config["use_sliding_window"] is False
    assert config.get("attention_bias") == (hf.attention_bias if cfg.qk_norm else None)
    config.update(sliding_window=32768, max_window_layers=1)  # as Qwen2.5's: the window is off
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    assert hf_checkpoint.from_hf(tmp_path / "out")[0] == cfg


def test_sharded_both_ways(tmp_path):
    model = random_hf_model(*CASES["qwen3_bias_tied"])
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / hf_checkpoint.INDEX).is_file()
    cfg, params = hf_checkpoint.from_hf(tmp_path / "hf")
    hf_checkpoint.to_hf(params, cfg, tmp_path / "out", max_shard_size=20_000)
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1
    original, exported = tensors_of(tmp_path / "hf"), tensors_of(tmp_path / "out")
    assert sorted(original) == sorted(exported)
    assert all(np.array_equal(exported[n], w) for n, w in original.items())
    assert np.array_equal(hf_logits(load_hf(tmp_path / "out")), hf_logits(model))


def test_new_parameters_have_logical_axis_names():
    """So the mesh rules shard them; and num_params counts them."""
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                      head_dim=16, qkv_bias=True, o_bias=True, qk_norm=True)
    attn = abstract_params(cfg)["layers"]["attn"]
    names = {f"{k}/{p}": tuple(v.names) for k, leaf in attn.items() for p, v in leaf.items()}
    assert names == {
        "q_proj/kernel": ("layers", "embed", "heads", "head_dim"),
        "q_proj/bias": ("layers", "heads", "head_dim"),
        "k_proj/kernel": ("layers", "embed", "kv_heads", "head_dim"),
        "k_proj/bias": ("layers", "kv_heads", "head_dim"),
        "v_proj/kernel": ("layers", "embed", "kv_heads", "head_dim"),
        "v_proj/bias": ("layers", "kv_heads", "head_dim"),
        "o_proj/kernel": ("layers", "heads", "head_dim", "embed"),
        "o_proj/bias": ("layers", "embed"),
        "q_norm/scale": ("layers", "head_dim"),
        "k_norm/scale": ("layers", "head_dim"),
    }
    count = sum(x.size for x in jax.tree.leaves(abstract_params(cfg)))
    assert cfg.num_params == count


# ----------------------------------------------------------------------------- thought tokens


def write_qwen_style_tokenizer(path: Path) -> int:
    """A byte-level BPE tokenizer.json like Qwen's (control tokens after the merges, no BOS,
    <|endoftext|> pads) in `path`; returns its token count."""
    rnd = random.Random(0)
    texts = [" ".join(rnd.choice(WORDS) for _ in range(12)) + f" {rnd.randint(0, 99)}."
             for _ in range(200)]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
         "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return tok.get_vocab_size()


def qwen_style_directory(path: Path, config_cls=transformers.Qwen2Config, **overrides) -> int:
    """A random model with a Qwen-style tokenizer and an embedding matrix padded past its tokens
    to a multiple of 64 rows, saved at `path`; returns the tokenizer's token count."""
    n_tokens = write_qwen_style_tokenizer(path)
    rows = -(-n_tokens // 64) * 64 + 64  # at least 64 padded rows
    random_hf_model(config_cls, {**overrides, "vocab_size": rows}).save_pretrained(path)
    return n_tokens


def hf_run_config(path) -> ml_collections.ConfigDict:
    """A run config whose model is the HF directory `path`, in float32."""
    return ml_collections.ConfigDict(dict(
        seed=0, quiet_star=quiet_star_defaults(n_ahead=4, n_ahead_talk=2),
        model=dict(source="hf", path=str(path), dtype="float32", param_dtype="float32",
                   remat_policy="none", scan_layers=True)))


def test_thought_tokens_go_after_the_padded_matrix(tmp_path):
    """Tokenizer, loaded model, export and transformers agree on every id, thoughts included."""
    n_tokens = qwen_style_directory(tmp_path / "qwen")
    rows = json.loads((tmp_path / "qwen" / "config.json").read_text())["vocab_size"]
    assert rows > n_tokens
    model = loading.load_model(hf_run_config(tmp_path / "qwen"), str(tmp_path / "run"))
    tok, cfg = model.tokenizer, model.cfg
    assert (tok.start_thought_id, tok.end_thought_id) == (rows, rows + 1)
    assert (cfg.start_thought_id, cfg.end_thought_id) == (rows, rows + 1)
    assert cfg.model.vocab_size == tok.vocab_size == rows + 2
    assert tok.pad_id == n_tokens - 3 and tok.eos_id == n_tokens - 1 and tok.bos_id is None
    text = "the cat sat 42.<|startthought|> so<|endthought|> dog<|im_end|>"
    ids = tok.encode(text)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "qwen")
    plain = text.replace("<|startthought|>", "").replace("<|endthought|>", "")
    assert tok.encode(plain) == hf_tok.encode(plain)
    assert ids.count(rows) == ids.count(rows + 1) == 1
    assert tok.decode(ids) == text.replace("<|im_end|>", "")  # control tokens are not shown
    params = model.load()
    table = np.asarray(params["decoder"]["embed"]["embedding"])
    assert table.shape == (rows + 2, SMALL["hidden_size"])
    original = tensors_of(tmp_path / "qwen")["model.embed_tokens.weight"]
    np.testing.assert_array_equal(table[:rows], original)

    out = tmp_path / "export"
    hf_checkpoint.to_hf(params, cfg.model, out, tokenizer=tok, quiet_star=cfg)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["vocab_size"] == rows + 2
    assert json.loads((out / "added_tokens.json").read_text()) == {
        tk.START_THOUGHT: rows, tk.END_THOUGHT: rows + 1}
    again = tk.load(str(out))
    assert (again.start_thought_id, again.end_thought_id, again.vocab_size) == (
        rows, rows + 1, rows + 2)
    assert again.base_vocab_size == tok.base_vocab_size == rows
    assert again.encode(text) == ids and again.decode(ids) == tok.decode(ids)
    exported_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert exported_tok.encode(text) == ids
    assert exported_tok.convert_tokens_to_ids([tk.START_THOUGHT, tk.END_THOUGHT]) == [rows,
                                                                                       rows + 1]
    got_cfg, got_params, got_tok = loading.load_checkpoint(str(out))
    assert got_cfg == cfg.replace(model=got_cfg.model) and got_cfg.model == cfg.model
    jax.tree.map(np.testing.assert_array_equal, got_params, params)
    assert got_tok.encode(text) == ids
    tokens, mask = np.asarray([ids]), np.ones((1, len(ids)), bool)
    expected = our_logits(cfg.model, params["decoder"], tokens, mask)
    assert np.abs(hf_logits(load_hf(out), tokens, mask) - expected).max() <= 1e-4


def module_at(relative: str):
    """The Python file at `relative` (to the repository) as a module."""
    spec = importlib.util.spec_from_file_location(Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpu_config(path: Path) -> ml_collections.ConfigDict:
    """configs/gpu.py:hf with model.path `path`."""
    config = module_at("configs/gpu.py").get_config("hf")
    config.model.path = str(path)
    return config


def test_configs_gpu_hf_on_a_qwen3_shaped_directory(tmp_path):
    """configs/gpu.py:hf on a Qwen3-0.6B-shaped directory (tied head, head width != D / H)."""
    qwen_style_directory(tmp_path / "qwen3", transformers.Qwen3Config, head_dim=16,
                         tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=2)
    model = loading.load_model(gpu_config(tmp_path / "qwen3"), str(tmp_path / "run"))
    m = model.cfg.model
    assert (m.qk_norm, m.tie_embeddings, m.head_dim, m.dtype) == (True, True, 16, "bfloat16")
    assert model.cfg.n_ahead == 12 and model.cfg.n_ahead_talk == 4
    params = model.load()
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
        lambda x: (x.shape, x.dtype), model.abstract_params())


# The published config.json files (transformers 4 keys) and the models' parameter counts.
PUBLISHED = {
    "Qwen2.5-0.5B": ({
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896,
        "initializer_range": 0.02, "intermediate_size": 4864, "max_position_embeddings": 32768,
        "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14,
        "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936}, 494_032_768),
    "Qwen3-0.6B": ({
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
        "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
        "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 151936}, 596_049_920),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_configs_gpu_hf_at_the_published_shapes(name, tmp_path):
    """configs/gpu.py:hf on a directory with the published config.json and a Qwen-style tokenizer
    (no weights): the decoder has transformers' parameters, plus the two thought rows."""
    raw, count = PUBLISHED[name]
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**raw))
    assert sum(p.numel() for p in hf.parameters()) == count
    write_qwen_style_tokenizer(tmp_path / name)
    (tmp_path / name / "config.json").write_text(json.dumps(raw))
    cfg = hf_checkpoint.read_config(tmp_path / name)
    assert cfg.num_params == count
    model = loading.load_model(gpu_config(tmp_path / name), str(tmp_path / "run"))
    assert model.cfg.model == cfg.replace(vocab_size=151938, dtype="bfloat16")
    assert (model.cfg.start_thought_id, model.cfg.end_thought_id) == (151936, 151937)
    decoder = model.abstract_params()["decoder"]
    assert sum(x.size for x in jax.tree.leaves(decoder)) == count + 2 * cfg.d_model


def test_named_shape_qwen3_8b_has_thought_tokens_after_the_matrix():
    """--compile_only's model.path=qwen3-8b reads through configs/tpu_v4.py as Qwen3-8B (the
    parameter count of transformers' model of that config) plus two thought rows after its
    151936-row matrix."""
    from qstar_jax import compile_check

    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**compile_check.SHAPES["qwen3-8b"]))
    config = module_at("configs/tpu_v4.py").get_config()
    config.model.path = "qwen3-8b"
    model = compile_check._weightless_model(config)
    assert (model.cfg.start_thought_id, model.cfg.end_thought_id) == (151936, 151937)
    assert model.cfg.model.qk_norm and model.cfg.model.head_dim == 128
    decoder = model.abstract_params()["decoder"]
    hf_count = sum(p.numel() for p in hf.parameters())
    assert hf_count == 8_190_735_360
    assert sum(x.size for x in jax.tree.leaves(decoder)) == hf_count + 2 * 2 * 4096


# ----------------------------------------------------------------------------- rollout, decoding


# The checks of the Llama rollout against the naive growing-mask reference, and of decoding against
# the parallel evaluation-mode logits, run on Qwen models: they take this module's fixtures
# `setup` (Qwen3) and `model` (Qwen2).
test_qwen2_thinking_logits_equal_parallel_eval_logits = (
    test_generate.test_thinking_logits_equal_parallel_eval_logits)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A Qwen3 Quiet-STaR model (q/k norm, biases, tied head, head width 12) as test_thoughts'
    naive reference takes it: (QuietStarConfig, params, its HF export)."""
    hf = random_hf_model(transformers.Qwen3Config, dict(
        vocab_size=NAIVE_VOCAB, head_dim=12, attention_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, rms_norm_eps=1e-6))
    with torch.no_grad():  # logits of a few units, so that 1e-5 is float32 rounding's scale
        hf.model.embed_tokens.weight.mul_(0.1)
    base_dir = tmp_path_factory.mktemp("qwen3_base")
    hf.save_pretrained(base_dir)
    base_cfg, base = hf_checkpoint.from_hf(base_dir)
    mcfg, params = add_thought_params(base, base_cfg, 7, jax.random.key(1))
    keys = iter(jax.random.split(jax.random.key(2), 10))
    params["mixing_head"] = jax.tree.map(
        lambda x: 0.3 * jax.random.normal(next(keys), x.shape), params["mixing_head"])
    params["end_embedding"] = params["end_embedding"] + 0.01
    cfg = qs_config(mcfg)
    path = tmp_path_factory.mktemp("qwen3_qstar")
    hf_checkpoint.to_hf(params, mcfg, path, quiet_star=cfg)
    assert json.loads((path / "config.json").read_text())["model_type"] == "qwen3"
    return cfg, params, path


@pytest.fixture(scope="module")
def tied_setup(setup):
    """test_thoughts' name for a tied model: the Qwen3 model is one."""
    return setup


@pytest.mark.parametrize("variant", ["tied-no_remat-trice2"])
def test_qwen3_rollout_loss_and_gradients_match_naive_growing_mask(request, tmp_path, variant):
    """test_thoughts' naive growing-mask check (losses, logits, thought log-probs, every
    parameter's gradient) on the tied Qwen3 model, in the tied variant."""
    test_thoughts.test_rollout_loss_and_gradients_match_naive_growing_mask(request, tmp_path,
                                                                           variant)


@pytest.fixture(scope="module")
def model():
    """A Qwen2-shaped Quiet-STaR model (q/k/v biases) for test_generate's decoding check."""
    cfg, params = tiny_quiet_star(qkv_bias=True, head_dim=12)
    assert hf_checkpoint.model_type_of(cfg.model) == "qwen2"
    assert np.abs(params["decoder"]["layers"]["attn"]["k_proj"]["bias"]).min() > 0
    return cfg, params


# ----------------------------------------------------------------------------- refusals


@pytest.fixture
def qwen_dir(tmp_path):
    """A fresh editable copy of a small saved Qwen2 checkpoint."""
    random_hf_model(*CASES["qwen2_tied"]).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def one_line_error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        hf_checkpoint.from_hf(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(path)), message
    return message


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe", "gemma", "gemma3_text", "phi3"])
def test_unsupported_model_type_names_it_and_the_supported_ones(qwen_dir, model_type):
    edit_config(qwen_dir, model_type=model_type)
    message = one_line_error(qwen_dir)
    assert f"model_type: {model_type!r} is not supported (llama, mistral, qwen2, qwen3)" in message


@pytest.mark.parametrize("model_type, changes", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    ("qwen3", dict(use_sliding_window=True, sliding_window=4)),
    ("qwen3", dict(layer_types=["full_attention", "sliding_attention"])),
])
def test_sliding_window_is_refused(qwen_dir, model_type, changes):
    edit_config(qwen_dir, model_type=model_type, **changes)
    assert "use_sliding_window must be false" in one_line_error(qwen_dir)


@pytest.mark.parametrize("changes, problem", [
    (dict(model_type="qwen3", head_dim=8, attention_bias=True),
     r"tensor 'model\.layers\.0\.self_attn\.o_proj\.bias' is missing"),
    (dict(model_type="qwen3", head_dim=8),
     r"unexpected tensors \['model\.layers\.0\.self_attn\.k_proj\.bias'"),
    (dict(model_type="llama"), r"unexpected tensors \['model\.layers\.0\.self_attn\.k_proj\.bias'"),
    (dict(head_dim=16), r"q_proj\.weight' has shape \[32, 32\], expected \[64, 32\]"),
], ids=["qwen3_with_bias", "qwen3", "llama", "head_dim"])
def test_tensors_that_do_not_match_the_config(qwen_dir, changes, problem):
    edit_config(qwen_dir, **changes)
    message = one_line_error(qwen_dir)
    assert re.search(problem, message), message


def test_export_refuses_a_model_type_that_cannot_express_the_config(tmp_path):
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=48,
                      qk_norm=True)
    params = {}  # refused before any tensor is read
    with pytest.raises(ValueError, match=r"^to_hf: a qwen2 config\.json cannot express "
                                         r"qk_norm=True, qkv_bias=False \(the config reads as "
                                         r"qwen3\)$"):
        hf_checkpoint.to_hf(params, cfg, tmp_path / "out", model_type="qwen2")
    with pytest.raises(ValueError, match=r"^to_hf: model_type 'gemma' is not supported"):
        hf_checkpoint.to_hf(params, cfg, tmp_path / "out", model_type="gemma")
    assert not (tmp_path / "out").exists()
