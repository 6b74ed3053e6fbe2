"""The Hugging Face checkpoint layout, both ways: an HF directory <-> (ModelConfig, parameters).

An HF directory (Llama, Mistral, Qwen2/Qwen2.5 or Qwen3; config.json in transformers 4 or 5
style; one or sharded safetensors) imports to (ModelConfig, params) and exports back tensor for
tensor. A Quiet-STaR model's extra weights travel in the layout of the authors' released
checkpoint: `start_embedding`, `end_embedding` [2, D] (row 0 used) and the talk head
`talk_head.0.{0,2,4}`; its settings travel in config.json's `quiet_star` block and its
thought-token ids in added_tokens.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from qstar_jax.directories import atomic_dir
from qstar_jax.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from qstar_jax.json_files import read_json
from qstar_jax.model import (
    ModelConfig,
    Params,
    check_runtime_overrides,
    is_quiet_star,
    join_layers,
    split_layers,
)
from qstar_jax.thoughts import QuietStarConfig
from qstar_jax.tokenizer import END_THOUGHT, START_THOUGHT, Tokenizer

# Written as max_position_embeddings (our decoder has no position limit; HF's default rope
# ignores it), unless Llama 3.1 scaling gives original * factor.
MAX_POSITIONS = 32768
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
INDEX = "model.safetensors.index.json"


# ----------------------------------------------------------------------------- config.json


def config_from_hf(raw: dict, source: str | os.PathLike) -> ModelConfig:
    """ModelConfig from a transformers config.json dict (v4 or v5 keys); `source` names the file."""

    def fail(key: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{source}: {key}: {problem}")

    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise fail("model_type", f"{model_type!r} is not supported ({', '.join(MODEL_TYPES)})")
    if raw.get("hidden_act", "silu") != "silu":
        raise fail("hidden_act", f"{raw['hidden_act']!r} is not supported (silu)")
    qwen = model_type in ("qwen2", "qwen3")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key) and not (key == "attention_bias" and model_type == "qwen3"):
            raise fail(key, f"biases are not supported for {model_type}")
    if qwen and (raw.get("use_sliding_window")
                 or "sliding_attention" in (raw.get("layer_types") or ())):
        raise fail("use_sliding_window", f"{model_type}'s sliding-window attention is not "
                   "supported (use_sliding_window must be false)")
    rope = raw.get("rope_parameters") or {}
    if raw.get("rope_scaling"):  # transformers 4
        rope = {**raw["rope_scaling"], **rope}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        try:
            scaling = (float(rope["factor"]), float(rope["low_freq_factor"]),
                       float(rope["high_freq_factor"]),
                       int(rope["original_max_position_embeddings"]))
        except KeyError as e:
            raise fail("rope_parameters", f"llama3 scaling without {e.args[0]!r}") from None
    elif rope_type != "default":
        raise fail("rope_parameters.rope_type",
                   f"{rope_type!r} is not supported (default, llama3)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0 or raw.get("partial_rotary_factor", 1) != 1:
        raise fail("partial_rotary_factor", "partial rotary embeddings are not supported")
    try:
        d, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        sizes = dict(vocab_size=int(raw["vocab_size"]), d_model=d,
                     n_layers=int(raw["num_hidden_layers"]), n_heads=heads,
                     ffn_dim=int(raw["intermediate_size"]))
    except KeyError as e:
        raise fail(e.args[0], "missing") from None
    window = raw.get("sliding_window", 4096) if model_type == "mistral" else None  # HF defaults
    head_dim = raw.get("head_dim") or (128 if model_type == "qwen3" else d // heads)
    attention_bias = model_type == "qwen3" and bool(raw.get("attention_bias"))
    try:
        return ModelConfig(
            **sizes,
            n_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            rope_llama3_scaling=scaling,
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            sliding_window=None if window is None else int(window),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias,
            qk_norm=model_type == "qwen3",
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def model_type_of(cfg: ModelConfig) -> str:
    """The transformers model_type that expresses `cfg`: qwen3 (per-head q/k norm), qwen2 (q/k/v
    biases), mistral (a sliding window), else llama."""
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window is not None else "llama"


def _inexpressible(cfg: ModelConfig, model_type: str) -> str | None:
    """What of `cfg` a config.json of `model_type` cannot express, or None."""
    if model_type not in MODEL_TYPES:
        return f"model_type {model_type!r} is not supported ({', '.join(MODEL_TYPES)})"
    qwen3 = model_type == "qwen3"
    checks = (
        (cfg.qk_norm != qwen3, f"qk_norm={cfg.qk_norm}"),
        (cfg.qkv_bias != (model_type == "qwen2" or qwen3 and cfg.o_bias),
         f"qkv_bias={cfg.qkv_bias}"),
        (cfg.o_bias and not qwen3, f"o_bias={cfg.o_bias}"),
        (cfg.sliding_window is not None and model_type != "mistral",
         f"sliding_window {cfg.sliding_window}"),
        (cfg.rope_llama3_scaling is not None and model_type != "llama", "Llama 3.1 rope scaling"),
    )
    problems = [what for bad, what in checks if bad]
    if problems:
        return (f"a {model_type} config.json cannot express {', '.join(problems)} (the config "
                f"reads as {model_type_of(cfg)})")
    return None


def _config_to_hf(cfg: ModelConfig, model_type: str, dtype: str,
                  tokenizer: Tokenizer | None) -> dict:
    """A transformers 5 config.json dict for `cfg`."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    max_positions = MAX_POSITIONS
    if cfg.rope_llama3_scaling is not None:
        factor, low, high, original = cfg.rope_llama3_scaling
        rope.update(rope_type="llama3", factor=factor, low_freq_factor=low,
                    high_freq_factor=high, original_max_position_embeddings=original)
        max_positions = int(original * factor)
    out = {
        "architectures": [f"{model_type.capitalize()}ForCausalLM"],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": dtype,
    }
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    else:  # qwen2, qwen3: no layer uses a window
        out.update(use_sliding_window=False, sliding_window=None,
                   max_window_layers=cfg.n_layers)
        if model_type == "qwen3":
            out["attention_bias"] = cfg.o_bias
    if tokenizer is not None:
        out.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                   pad_token_id=tokenizer.pad_id)
    return out


def _read_json(path: Path):
    """A checkpoint's JSON file (`json_files.read_json`, its errors CheckpointErrors)."""
    return read_json(path, CheckpointError, CheckpointNotFoundError)


def read_config(path: str | os.PathLike, **overrides) -> ModelConfig:
    """The ModelConfig of an HF directory (config.json only), with RUNTIME_FIELDS overrides."""
    check_runtime_overrides(overrides)
    path = _existing_dir(path)
    file = path / "config.json"
    return config_from_hf(_read_json(file), file).replace(**overrides)

# ----------------------------------------------------------------------------- tensor layout


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor: our parameter path, its HF shape, and the two layout maps."""

    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _same(w):
    return w


def _transposed(w):
    return w.T


def _layer_tensors(cfg: ModelConfig) -> dict[str, _Tensor]:
    """HF names (after `model.layers.<i>.`) of one decoder layer's tensors."""
    d, f, e, h, k = cfg.d_model, cfg.ffn_dim, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads

    def heads_in(name, n):  # HF [n*E, D] <-> ours [D, n, E]
        return _Tensor(("attn", f"{name}_proj", "kernel"), (n * e, d),
                       lambda w: w.T.reshape(d, n, e), lambda x: x.reshape(d, n * e).T)

    def bias_in(name, n):  # HF [n*E] <-> ours [n, E]
        return _Tensor(("attn", f"{name}_proj", "bias"), (n * e,),
                       lambda w: w.reshape(n, e), lambda x: x.reshape(n * e))

    out = {}
    for name, n in (("q", h), ("k", k), ("v", k)):
        out[f"self_attn.{name}_proj.weight"] = heads_in(name, n)
        if cfg.qkv_bias:
            out[f"self_attn.{name}_proj.bias"] = bias_in(name, n)
    out["self_attn.o_proj.weight"] = _Tensor(  # HF [D, H*E] <-> ours [H, E, D]
        ("attn", "o_proj", "kernel"), (d, h * e),
        lambda w: w.T.reshape(h, e, d), lambda x: x.reshape(h * e, d).T)
    if cfg.o_bias:
        out["self_attn.o_proj.bias"] = _Tensor(("attn", "o_proj", "bias"), (d,), _same, _same)
    if cfg.qk_norm:
        for name in ("q", "k"):
            out[f"self_attn.{name}_norm.weight"] = _Tensor(("attn", f"{name}_norm", "scale"),
                                                           (e,), _same, _same)
    for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
        out[f"mlp.{name}_proj.weight"] = _Tensor(("mlp", f"{name}_proj", "kernel"), shape,
                                                 _transposed, _transposed)
    out["input_layernorm.weight"] = _Tensor(("attn_norm", "scale"), (d,), _same, _same)
    out["post_attention_layernorm.weight"] = _Tensor(("mlp_norm", "scale"), (d,), _same, _same)
    return out


def _top_tensors(cfg: ModelConfig) -> dict[str, _Tensor]:
    """HF names of the tensors outside the layers."""
    d, v = cfg.d_model, cfg.vocab_size
    out = {"model.embed_tokens.weight": _Tensor(("embed", "embedding"), (v, d), _same, _same),
           "model.norm.weight": _Tensor(("final_norm", "scale"), (d,), _same, _same)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = _Tensor(("lm_head", "kernel"), (v, d), _same, _same)
    return out


def _row0(w):
    return w[0]


def _with_zero_row(x):
    return np.stack([x, np.zeros_like(x)])


def _thought_tensors(d: int) -> dict[str, _Tensor]:
    """The Quiet-STaR extras in the released checkpoint's layout (embedding row 1 is unused)."""
    out = {f"{name}_embedding": _Tensor((f"{name}_embedding",), (2, d), _row0, _with_zero_row)
           for name in ("start", "end")}
    for i, (layer, shape) in enumerate((("hidden_0", (d, 2 * d)), ("hidden_1", (d, d)))):
        out[f"talk_head.0.{2 * i}.weight"] = _Tensor(("mixing_head", layer, "kernel"), shape,
                                                     _transposed, _transposed)
        out[f"talk_head.0.{2 * i}.bias"] = _Tensor(("mixing_head", layer, "bias"), (d,), _same,
                                                   _same)
    out["talk_head.0.4.weight"] = _Tensor(("mixing_head", "out", "kernel"), (1, d), _transposed,
                                          _transposed)
    return out


def _get(tree: Params, path: tuple[str, ...], where: str) -> Any:
    node = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise CheckpointError(f"{where}: no parameter {'/'.join(path)}")
        node = node[key]
    return node


def _put(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------- import


class _TensorFiles:
    """The tensors of an HF directory's safetensors (one file or sharded), read lazily."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / INDEX
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no weight_map")
            self.source = index
            self.file_of = {name: directory / file for name, file in weight_map.items()}
        elif (directory / "model.safetensors").is_file():
            self.source = directory / "model.safetensors"
            with safetensors.safe_open(self.source, framework="numpy") as f:
                self.file_of = dict.fromkeys(f.keys(), self.source)
        else:
            raise CheckpointNotFoundError(
                f"{directory}: neither model.safetensors nor {INDEX} (save the model with "
                "safe_serialization=True)")
        self._open = contextlib.ExitStack()
        self._handles: dict[Path, Any] = {}

    def __enter__(self) -> _TensorFiles:
        return self

    def __exit__(self, *exc) -> None:
        self._open.close()

    def _handle(self, name: str):
        file = self.file_of[name]
        if file not in self._handles:
            if not file.is_file():
                raise CheckpointNotFoundError(f"{file}: no such file (listed in {self.source})")
            self._handles[file] = self._open.enter_context(
                safetensors.safe_open(file, framework="numpy"))
        if name not in self._handles[file].keys():
            raise CheckpointError(f"{file}: no tensor {name!r} (listed in {self.source})")
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor `name`, checked to have `shape`."""
        if name not in self.file_of:
            raise CheckpointError(f"{self.source}: tensor {name!r} is missing (expected shape "
                                  f"{list(shape)})")
        found = self.shape(name)
        if found != shape:
            raise CheckpointError(f"{self.file_of[name]}: tensor {name!r} has shape "
                                  f"{list(found)}, expected {list(shape)} from config.json")
        return self._handle(name).get_tensor(name)


def params_from_tensors(get: Callable[[str, tuple[int, ...]], np.ndarray], cfg: ModelConfig,
                        thoughts: bool) -> Params:
    """Our parameters from HF-named tensors (`get(name, shape)`, from any file format), built on
    the host CPU."""
    dtype = np.dtype(jnp.dtype(cfg.param_dtype))

    def convert(name: str, t: _Tensor) -> jax.Array:
        return jnp.asarray(t.to_ours(get(name, t.hf_shape)).astype(dtype))

    with jax.default_device(jax.devices("cpu")[0]):
        rest: dict = {}
        for name, t in _top_tensors(cfg).items():
            _put(rest, t.path, convert(name, t))
        layers = []
        for i in range(cfg.n_layers):
            layer: dict = {}
            for name, t in _layer_tensors(cfg).items():
                _put(layer, t.path, convert(f"model.layers.{i}.{name}", t))
            layers.append(layer)
        decoder = join_layers(rest, layers, cfg)
        if not thoughts:
            return decoder
        params: dict = {"decoder": decoder}
        for name, t in _thought_tensors(cfg.d_model).items():
            _put(params, t.path, convert(name, t))
        return params


def _expected_names(cfg: ModelConfig, thoughts: bool) -> set[str]:
    names = set(_top_tensors(cfg))
    names |= {f"model.layers.{i}.{n}" for i in range(cfg.n_layers) for n in _layer_tensors(cfg)}
    return names | (set(_thought_tensors(cfg.d_model)) if thoughts else set())


def _check_names(found: set[str], cfg: ModelConfig, thoughts: bool, source: Path) -> None:
    """Refuse tensors this model would silently drop (a tied model's copied head is allowed)."""
    harmless = {"lm_head.weight"} if cfg.tie_embeddings else set()
    extra = sorted(n for n in found - _expected_names(cfg, thoughts) - harmless
                   if not n.endswith("rotary_emb.inv_freq"))
    if extra:
        more = " ..." if len(extra) > 5 else ""
        raise CheckpointError(f"{source}: unexpected tensors {extra[:5]}{more} (config.json "
                              "describes a different model)")


def _existing_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{path}: no such checkpoint directory")
    return path


def from_hf(path: str | os.PathLike, **overrides) -> tuple[ModelConfig, Params]:
    """(ModelConfig, params) of a local HF directory; Quiet-STaR params when it holds the extras.

    `overrides` set RUNTIME_FIELDS of the config (e.g. scan_layers=False, param_dtype="bfloat16").
    Parameters are placed on the host CPU device; shard them onto accelerators afterwards.
    """
    cfg = read_config(path, **overrides)
    path = Path(path)
    with _TensorFiles(path) as files:
        thoughts = "start_embedding" in files.file_of
        _check_names(set(files.file_of), cfg, thoughts, files.source)
        return cfg, params_from_tensors(files.get, cfg, thoughts)


def read_quiet_star_settings(path: str | os.PathLike) -> dict[str, Any]:
    """Thought-token ids (added_tokens.json) and the config.json `quiet_star` block, if any.

    Returns keyword arguments for QuietStarConfig (all but `model`).
    """
    path = _existing_dir(path)
    added_file, config_file = path / "added_tokens.json", path / "config.json"
    added, config = _read_json(added_file), _read_json(config_file)
    ids = {}
    for key, token in (("start_thought_id", START_THOUGHT), ("end_thought_id", END_THOUGHT)):
        value = added.get(token) if isinstance(added, dict) else None
        if type(value) is not int or not 0 <= value < config.get("vocab_size", 0):
            raise CheckpointError(f"{added_file}: {token!r} must map to an id inside the "
                                  f"vocabulary ({config.get('vocab_size')}), got {value!r}")
        ids[key] = value
    if ids["start_thought_id"] == ids["end_thought_id"]:
        raise CheckpointError(f"{added_file}: both thought tokens have id {ids['end_thought_id']}")
    block = dict(config.get("quiet_star") or {})
    known = {f.name for f in dataclasses.fields(QuietStarConfig)} - {"model"}
    unknown = sorted(set(block) - known)
    if unknown:
        raise CheckpointError(f"{config_file}: quiet_star: unknown settings {unknown}")
    for key, value in ids.items():
        if block.get(key, value) != value:
            raise CheckpointError(f"{config_file}: quiet_star.{key}={block[key]} disagrees with "
                                  f"{added_file} ({value})")
    return {**block, **ids}


# ----------------------------------------------------------------------------- export


def _hf_tensors(params: Params, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, host array) of every tensor, shapes checked against `cfg`."""
    thoughts = is_quiet_star(params)
    host = jax.device_get(params)
    decoder = host["decoder"] if thoughts else host
    rest, layers = split_layers(decoder, cfg)
    named = [(name, t, rest) for name, t in _top_tensors(cfg).items()]
    for i, layer in enumerate(layers):
        named += [(f"model.layers.{i}.{name}", t, layer)
                  for name, t in _layer_tensors(cfg).items()]
    if thoughts:
        named += [(name, t, host) for name, t in _thought_tensors(cfg.d_model).items()]
    for name, t, tree in named:
        x = np.asarray(_get(tree, t.path, "params"))
        try:
            w = t.to_hf(x)
        except ValueError:  # a reshape of the wrong size
            w = None
        if w is None or w.shape != t.hf_shape:
            raise CheckpointError(f"params: {'/'.join(t.path)} has shape {list(x.shape)}, which "
                                  f"does not give {name} {list(t.hf_shape)} for the config")
        yield name, w


def _write_safetensors(tensors: list[tuple[str, np.ndarray]], directory: Path, dtype: np.dtype,
                       max_shard_size: int) -> None:
    """model.safetensors, or shards of at most `max_shard_size` bytes (unless one tensor is
    larger) plus model.safetensors.index.json."""
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    size = 0
    for name, w in tensors:
        nbytes = w.size * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, w))
        size += nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for file, shard in zip(files, shards, strict=True):  # save(): bytes, so the umask applies
        (directory / file).write_bytes(safetensors.numpy.save(
            {name: np.ascontiguousarray(w.astype(dtype)) for name, w in shard},
            metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(w.size for _, w in tensors) * dtype.itemsize},
                 "weight_map": {name: file for file, shard in zip(files, shards, strict=True)
                                for name, _ in shard}}
        _write_json(directory / INDEX, index)


def _write_json(path: Path, content: Any) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _added_thought_ids(cfg: ModelConfig, quiet_star: QuietStarConfig | None,
                 tokenizer: Tokenizer | None) -> tuple[int, int]:
    """The thought-token ids added_tokens.json records: the settings', else the tokenizer's, else
    the last two rows of the vocabulary."""
    if quiet_star is not None:
        return quiet_star.start_thought_id, quiet_star.end_thought_id
    if tokenizer is not None:
        return tokenizer.start_thought_id, tokenizer.end_thought_id
    return cfg.vocab_size - 2, cfg.vocab_size - 1


def to_hf(params: Params, cfg: ModelConfig, path: str | os.PathLike, *,
          tokenizer: Tokenizer | None = None, quiet_star: QuietStarConfig | None = None,
          dtype: str = "float32", max_shard_size: int = 2**30,
          model_type: str | None = None) -> None:
    """Write an HF directory that transformers loads (AutoModelForCausalLM.from_pretrained).

    Quiet-STaR params ({"decoder", ...}) also write the released checkpoint's extra tensors,
    config keys and added_tokens.json. `model_type`: one of MODEL_TYPES that expresses `cfg`
    (default: `model_type_of(cfg)`). The directory appears complete or not at all.
    """
    path = Path(path)
    model_type = model_type or model_type_of(cfg)
    if problem := _inexpressible(cfg, model_type):
        raise CheckpointError(f"to_hf: {problem}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"to_hf: dtype {dtype!r} is not one of float32, bfloat16, float16")
    thoughts = is_quiet_star(params)
    if quiet_star is not None:
        if not thoughts:
            raise ValueError("to_hf: quiet_star given, but params hold no Quiet-STaR weights "
                             "(no 'decoder' key)")
        if quiet_star.model.vocab_size != cfg.vocab_size:
            raise ValueError(f"to_hf: quiet_star.model.vocab_size {quiet_star.model.vocab_size} "
                             f"!= cfg.vocab_size {cfg.vocab_size}")
    tensors = list(_hf_tensors(params, cfg))
    config = _config_to_hf(cfg, model_type, dtype, tokenizer)
    if thoughts:
        config.update(use_concat_talk_head=True, use_complex_talk_head=True,
                      use_weighted_talk_head=True, use_start_thought_token=True,
                      use_end_thought_token=True)
        if quiet_star is not None:
            config["max_thoughts"] = quiet_star.n_ahead + quiet_star.n_ahead_talk + 1
            config["quiet_star"] = {f.name: getattr(quiet_star, f.name)
                                    for f in dataclasses.fields(quiet_star) if f.name != "model"}
    with atomic_dir(path) as tmp:
        _write_safetensors(tensors, tmp, np.dtype(jnp.dtype(dtype)), max_shard_size)
        _write_json(tmp / "config.json", config)
        if tokenizer is not None:
            tokenizer.save(str(tmp))
            _write_json(tmp / "generation_config.json",
                        {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                         "pad_token_id": tokenizer.pad_id})
        if thoughts:
            start, end = _added_thought_ids(cfg, quiet_star, tokenizer)
            _write_json(tmp / "added_tokens.json", {START_THOUGHT: start, END_THOUGHT: end})



def inspect(path: str | os.PathLike
            ) -> tuple[ModelConfig, int, int, int, dict[str, Any] | None]:
    """(config, the model's parameter count, the count stored, safetensors file count,
    Quiet-STaR settings or None for a plain model) of an HF directory, its tensors not read.
    The two counts differ by the second rows of start_embedding and end_embedding, which the
    authors' layout stores and never uses."""
    cfg = read_config(path)
    with _TensorFiles(Path(path)) as files:
        stored = sum(math.prod(files.shape(n)) for n in files.file_of)
        unused = sum(files.shape(n)[1] for n in ("start_embedding", "end_embedding")
                     if n in files.file_of and files.shape(n)[0] == 2)
        thoughts = "start_embedding" in files.file_of
        n_files = len(set(files.file_of.values()))
    settings = read_quiet_star_settings(path) if thoughts else None
    return cfg, stored - unused, stored, n_files, settings
