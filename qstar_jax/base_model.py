"""The base model of an experiment whose config has a `base_model` section: a plain language model
trained from scratch, then written as a Hugging Face directory that every arm of every seed
starts from (configs/known_answer.py: worked and bare rows of the task).

The stage trains the config's model, data and optimizer with the section's steps, batch, row
length, share of worked rows and learning rate, without thoughts, in `WORKDIR/base_model/` (rerun
to resume). The arms then load its last step as a plain model, so that their thought weights are
added to the trained embeddings (`quiet_star.init_text`'s row as it ended training).
"""

from __future__ import annotations

import jax
import ml_collections
from etils import epath

from qstar_jax import config as config_lib
from qstar_jax import hf_checkpoint, loading, logs, run_settings, train
from qstar_jax.errors import ConfigError
from qstar_jax.model import RUNTIME_FIELDS
from qstar_jax.thoughts import remove_thought_params

DIRECTORY = "base_model"
HF_DIR = "hf"  # under DIRECTORY: the plain model the arms load
SECTION_KEYS = ("train_steps", "batch_size", "seq_len", "worked_fraction", "learning_rate",
                "warmup_steps")


def _without_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    copy = ml_collections.ConfigDict(config.to_dict())
    del copy["base_model"]
    return copy


def stage_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run that trains the base model (see the module doc)."""
    section = config.base_model
    if sorted(section) != sorted(SECTION_KEYS):
        raise ConfigError(f"base_model has keys {sorted(section)}; expected exactly "
                          f"{list(SECTION_KEYS)}")
    c = _without_section(config)
    c.train_steps, c.batch_size, c.seq_len = (section.train_steps, section.batch_size,
                                              section.seq_len)
    c.data.worked_fraction = section.worked_fraction
    c.optim.learning_rate, c.optim.warmup_steps = section.learning_rate, section.warmup_steps
    c.optim.mixing_head_lr_scale = 1.0  # no mixing head trains here
    # No thoughts: the thought settings at their defaults, so that the arms' own settings do
    # not make another base model.
    c.quiet_star = config_lib.quiet_star_defaults(n_ahead=1, n_ahead_talk=1)
    c.eval_every, c.checkpoint_every = 0, section.train_steps
    return c


def arm_config(config: ml_collections.ConfigDict, hf_dir: str) -> ml_collections.ConfigDict:
    """`config` for the arms: its model loaded from the base model's directory `hf_dir`."""
    c = _without_section(config)
    c.model = ml_collections.ConfigDict(
        {"source": "hf", "path": hf_dir, **{k: config.model[k] for k in RUNTIME_FIELDS}})
    return c


def prepare(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Train the base model in `workdir/base_model` (resuming; nothing to do once it is
    written) and return the directory of the plain model the arms load."""
    stage_dir = epath.Path(workdir) / DIRECTORY
    hf_dir = stage_dir / HF_DIR
    stage = stage_config(config)
    _check_same_settings(stage, stage_dir)
    if hf_dir.exists():
        logs.say("base model: %s (trained before)", hf_dir)
        return str(hf_dir)
    logs.say("=== base model: a plain language model from scratch, %d steps, in %s",
             stage.train_steps, stage_dir)
    records = train.run(stage, str(stage_dir))
    last = max((r["step"] for r in records), default=0)
    if last < stage.train_steps:
        raise train.Interrupted(f"the base model stopped at step {last} of {stage.train_steps}; "
                                "rerun the same command to resume")
    _, model, params = loading.load_run(str(stage_dir), stage.train_steps)
    if jax.process_index() == 0:
        plain_cfg, plain = remove_thought_params(params, model.cfg)
        hf_checkpoint.to_hf(plain, plain_cfg, hf_dir, tokenizer=model.tokenizer)
    return str(hf_dir)


def _check_same_settings(stage: ml_collections.ConfigDict, stage_dir: epath.Path) -> None:
    """Refuse a base model that was (being) trained with other settings in `stage_dir`."""
    if not (stage_dir / run_settings.CONFIG_FILE).exists():
        return
    changed = run_settings.differences(run_settings.load_config(str(stage_dir)), stage)
    if changed:
        raise ConfigError(f"{stage_dir} holds a base model trained with other settings "
                          f"({run_settings.describe(changed)}): use a new --workdir, or delete "
                          "that directory to train it again")
