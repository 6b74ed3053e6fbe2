"""GGUF import: the SmolLM2-135M-Instruct demo model against transformers' own GGUF loading, and
a tiny GGUF written here the way llama.cpp writes one, converted by the command line."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from qstar_jax import convert, gguf_checkpoint, hf_checkpoint
from qstar_jax import tokenizer as tokenizer_lib
from qstar_jax.model import Transformer

TEXT = "The quick brown fox jumps over the lazy dog. Quiet thoughts help."


@pytest.fixture(scope="module")
def demo():
    """(cfg, params, tokenizer) from the demo cache (converted from the GGUF on first use)."""
    path = gguf_checkpoint.demo_dir()
    cfg, params = hf_checkpoint.from_hf(path)
    return cfg, params, tokenizer_lib.load(str(path))


@pytest.fixture(scope="module")
def hf_gguf():
    """transformers' model and tokenizer read from the same GGUF file."""
    file = gguf_checkpoint._demo_gguf()
    kwargs = dict(gguf_file=file.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        file.parent, dtype=torch.float32, **kwargs).eval()
    return model, transformers.AutoTokenizer.from_pretrained(file.parent, **kwargs)


def test_demo_cache_is_an_hf_directory(demo, qstar_cache):
    cfg, _, tok = demo
    cache = gguf_checkpoint.demo_cache_dir()
    assert str(cache).startswith(qstar_cache)
    files = {p.name for p in cache.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".")]  # no partial copy
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_embeddings and cfg.vocab_size == 49152 and tok.eos_id == 2


def test_greedy_continuation_names_paris(demo):
    cfg, params, tok = demo
    prompt = tok.encode("The capital of France is")
    n_new = 4
    model = Transformer(cfg)

    @jax.jit
    def next_token(params, tokens_1T, n):  # causal: the zeros after position n - 1 do not matter
        return jnp.argmax(model.apply({"params": params}, tokens_1T)[0, n - 1])

    tokens = np.zeros((1, len(prompt) + n_new), np.int32)
    tokens[0, :len(prompt)] = prompt
    for n in range(len(prompt), len(prompt) + n_new):
        tokens[0, n] = next_token(params, tokens, n)
    assert "Paris" in tok.decode(tokens[0, len(prompt):])


def test_logits_match_transformers_gguf(demo, hf_gguf):
    cfg, params, tok = demo
    ids = tok.encode(TEXT)
    ours = np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray([ids])))
    with torch.no_grad():
        theirs = hf_gguf[0](torch.tensor([ids])).logits.numpy()
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-3
    assert tok.decode(ids) == TEXT


@pytest.mark.parametrize("text", [TEXT, "Hello, world! I'm SmolLM;  twice\n\tindented <|im_end|>"])
def test_tokenization_matches_transformers_gguf(demo, hf_gguf, text):
    tok = demo[2]
    expected = hf_gguf[1](text, add_special_tokens=False)["input_ids"]
    assert tok.encode(text) == expected


def llama_cpp_permute(w, n_heads):
    """llama.cpp's convert_hf_to_gguf.py reordering of query/key rows, written out plainly."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def test_cli_from_gguf(tmp_path, capsys):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5e4})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.ndim == 1 else 0.0, 0.2)
    hf = {k: v.numpy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(tmp_path / "tiny.gguf", "llama")
    for add, value in [("block_count", 2), ("embedding_length", 32), ("feed_forward_length", 48),
                       ("head_count", 4), ("head_count_kv", 2), ("rope_freq_base", 5e4),
                       ("layer_norm_rms_eps", 1e-5), ("tokenizer_model", "gpt2"),
                       ("token_list", ["<eos>"] + [chr(ord("a") + i % 26) * (1 + i // 26)
                                                   for i in range(63)]),
                       ("eos_token_id", 0)]:
        getattr(writer, f"add_{add}")(value)
    writer.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", hf["model.norm.weight"])
    writer.add_tensor("output.weight", hf["lm_head.weight"])
    parts = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(2):
        for ours, theirs in parts.items():
            w = hf[f"model.layers.{i}.{theirs}.weight"]
            if ours in ("attn_q", "attn_k"):
                w = llama_cpp_permute(w, 4 if ours == "attn_q" else 2)
            writer.add_tensor(f"blk.{i}.{ours}.weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    args = ["from-gguf", "--gguf", str(tmp_path / "tiny.gguf"), "--out", str(tmp_path / "hf")]
    convert.main(args)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[0, 5, 9, 33, 2, 61, 7]])
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, model(ids).logits)
    with pytest.raises(SystemExit) as e:
        convert.main(args)
    assert e.value.code == 1 and "already exists" in capsys.readouterr().err
