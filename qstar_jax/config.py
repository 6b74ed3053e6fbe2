"""A run config's `model` and `quiet_star` sections -> settings: the keys each model source takes,
and the QuietStarConfig of the `quiet_star` section (loading.load_model builds the model). The
keys every run config holds come from `run_config`, which each of configs/*.py starts from.

`model.source` picks the model: "random" (a Llama-style decoder of the given size), "hf" (a
Hugging Face directory at `model.path`) or "demo" (SmolLM2-135M-Instruct). Each source takes
exactly its own keys, so none is left unread.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from qstar_jax import data, optim
from qstar_jax import tokenizer as tokenizer_lib
from qstar_jax.errors import ConfigError
from qstar_jax.model import RUNTIME_FIELDS, ModelConfig
from qstar_jax.thoughts import QuietStarConfig

SIZE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
             "rope_theta", "tie_embeddings")
SOURCE_KEYS = {"random": SIZE_KEYS, "hf": ("path",), "demo": ()}
_NOT_SETTABLE = {"model", "start_thought_id", "end_thought_id", "pad_id"}  # from model/tokenizer


# Named settings (configs take one as `--config=FILE.py:NAME`): `quiet_star` options, and under
# "optim" the optimizer's. "reference": the authors' code. "stable": the spec's fixes that let
# the language model learn (benchmarks/RESULTS.md, "Does thinking help?"): a policy weight of 1,
# not 1e6, which otherwise turns the float32 noise of the first rewards into updates and,
# clipped, leaves the model's text loss almost untrained; and REINFORCE at the sampling
# temperature, so that its score function is that of the policy the thoughts were drawn from.
# "fast_head": "stable", and the mixing head learning 10x faster than the language model: at
# the model's rate the head, which starts at zero, is still near zero when the thoughts are
# already good, and on the known-answer task the answer loss with thinking ends far below that
# of "stable" (benchmarks/RESULTS.md, "Does the training learn to think?", "Every run that
# informed the settings").
# "rlp": the RLP objective (`rlp.py`), its options at their defaults (the paper's), on top of
# "fast_head": an experiment under it differs from one under "fast_head" in the objective only
# (the filler arm and the predictor check, trained with Quiet-STaR's NLL, read the rest).
STABLE = {"policy_loss_beta": 1.0, "reinforce_temperature": 1.0}
PRESETS = {
    "reference": {},
    "stable": STABLE,
    "fast_head": {**STABLE, "optim": {"mixing_head_lr_scale": 10.0}},
    "rlp": {**STABLE, "optim": {"mixing_head_lr_scale": 10.0}, "objective": "rlp"},
}


def _preset(name: str) -> dict:
    if name not in PRESETS:
        raise ConfigError(f"preset {name!r}: expected one of {list(PRESETS)}")
    return PRESETS[name]


def quiet_star_defaults(preset: str = "reference", **overrides) -> ml_collections.ConfigDict:
    """A `quiet_star` section: every QuietStarConfig option at its default, then the named
    `preset`'s (see PRESETS), then `overrides`."""
    section = {f.name: f.default for f in dataclasses.fields(QuietStarConfig)
               if f.name not in _NOT_SETTABLE}
    section.update({k: v for k, v in _preset(preset).items() if k != "optim"})
    unknown = sorted(set(overrides) - set(section))
    if unknown:
        raise ConfigError(f"quiet_star.{', quiet_star.'.join(unknown)}: not a QuietStarConfig "
                          "option")
    return ml_collections.ConfigDict({**section, **overrides})


def optim_preset(preset: str) -> dict:
    """The `optim` settings of the named preset (see PRESETS), to update an `optim` section."""
    return dict(_preset(preset).get("optim", {}))


def run_config(preset: str = "reference", *, train_steps: int, batch_size: int, seq_len: int,
               log_every: int, checkpoint_every: int, eval_every: int, eval_batches: int,
               model: dict, quiet_star: dict | None = None) -> ml_collections.ConfigDict:
    """Every key of a run config: the run's length, batch and schedule as given; seed 0, one
    process, every device on the data axis, the last 2 checkpoints kept; the `model` section as
    given; `quiet_star` from quiet_star_defaults(preset, **quiet_star); `data` and `optim` at
    their defaults, `optim` with the preset's settings. A config file then sets what its run
    does differently."""
    c = ml_collections.ConfigDict()
    c.train_steps = train_steps
    c.batch_size = batch_size
    c.seq_len = seq_len
    c.log_every = log_every
    c.checkpoint_every = checkpoint_every
    c.checkpoint_keep = 2
    c.eval_every = eval_every
    c.eval_batches = eval_batches
    c.seed = 0
    c.distributed = False
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.model = ml_collections.ConfigDict(model)
    c.quiet_star = quiet_star_defaults(preset, **(quiet_star or {}))
    c.data = data.default_config()
    c.optim = optim.default_config()
    c.optim.update(optim_preset(preset))
    return c


def check_model_keys(model: ml_collections.ConfigDict) -> None:
    """model.source is known, the section holds exactly that source's keys, and a Hugging Face
    source names its directory."""
    if model.source not in SOURCE_KEYS:
        raise ConfigError(f"model.source={model.source!r}: expected one of {list(SOURCE_KEYS)}")
    expected = {"source", *RUNTIME_FIELDS, *SOURCE_KEYS[model.source]}
    missing, extra = sorted(expected - set(model)), sorted(set(model) - expected)
    if missing:
        raise ConfigError(f"model.source={model.source!r} needs model.{', model.'.join(missing)}")
    if extra:
        raise ConfigError(f"model.{', model.'.join(extra)} not used by model.source="
                          f"{model.source!r}")
    if model.source == "hf" and not model.path:
        raise ConfigError("model.path is empty: pass --config.model.path=DIR (a Hugging Face "
                          "checkpoint directory)")


@dataclasses.dataclass(frozen=True)
class ThoughtIds:
    """The token ids a QuietStarConfig takes from a tokenizer, for a model that has none."""

    start_thought_id: int
    end_thought_id: int
    pad_id: int


def quiet_star_config(section: ml_collections.ConfigDict, model_cfg: ModelConfig,
                      tokenizer: tokenizer_lib.Tokenizer | ThoughtIds) -> QuietStarConfig:
    """QuietStarConfig from the `quiet_star` section; token ids come from the tokenizer."""
    fields = {f.name for f in dataclasses.fields(QuietStarConfig)}
    unknown = sorted(set(section) - (fields - _NOT_SETTABLE))
    if unknown:
        raise ConfigError(f"quiet_star.{', quiet_star.'.join(unknown)}: not a QuietStarConfig "
                          "option (token ids come from the tokenizer)")
    return QuietStarConfig(model=model_cfg, start_thought_id=tokenizer.start_thought_id,
                           end_thought_id=tokenizer.end_thought_id, pad_id=tokenizer.pad_id,
                           **section.to_dict())


def check_run_config(config: ml_collections.ConfigDict) -> None:
    """Reject run settings no run can use, naming them."""
    if "base_model" in config:
        raise ConfigError("this config's runs start from a base model that the experiment trains "
                          "first: run it with python -m qstar_jax.experiment --config=...")
    for key in ("train_steps", "batch_size", "seq_len", "log_every", "checkpoint_every",
                "checkpoint_keep", "eval_batches"):
        if config[key] < 1:
            raise ConfigError(f"{key}={config[key]} must be >= 1")
    if config.eval_every < 0:
        raise ConfigError(f"eval_every={config.eval_every} must be >= 0 (0: only at start and end)")
    if config.optim.grad_accum_steps < 1:
        raise ConfigError(f"optim.grad_accum_steps={config.optim.grad_accum_steps} must be >= 1")
