"""Load a model: the one a run config names (for training), or a trained one for use.

`load_model` builds what a run config's `model` section names: `model.source` "random" (a
Llama-style decoder of the given size, with a sentencepiece tokenizer trained on the run's
training documents and kept in the workdir), "hf" (a Hugging Face directory at `model.path`, local
or gs://, plain or Quiet-STaR) or "demo" (SmolLM2-135M-Instruct, gguf_checkpoint.demo_dir).
`load_checkpoint` gives (QuietStarConfig, params, tokenizer) of any checkpoint for use: a training
workdir's saved step (which `export_checkpoint` writes as an HF directory), a Quiet-STaR HF
export, or a plain HF model with new thought parameters.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable

import jax
import ml_collections
from etils import epath
from jax.experimental import multihost_utils

from qstar_jax import checkpoint, data, hf_checkpoint, known_answer, run_settings
from qstar_jax import tokenizer as tokenizer_lib
from qstar_jax.config import SIZE_KEYS, check_model_keys, quiet_star_config, quiet_star_defaults
from qstar_jax.directories import copy_files, local_dir
from qstar_jax.errors import CheckpointError, CheckpointNotFoundError, ConfigError, DataError
from qstar_jax.gguf_checkpoint import demo_dir
from qstar_jax.model import RUNTIME_FIELDS, ModelConfig, Params, init_params, is_quiet_star
from qstar_jax.thoughts import N_THOUGHT_TOKENS, QuietStarConfig, add_thought_params

TOKENIZER_DIR = "tokenizer"  # in the workdir, for the random source


@dataclasses.dataclass(frozen=True)
class Model:
    """What a run needs to build its parameters.

    `load` gives host parameters of a pretrained model (Quiet-STaR layout); None means random
    initialisation with `random_params`, which is jittable so it can run directly sharded.
    """

    cfg: QuietStarConfig
    tokenizer: tokenizer_lib.Tokenizer | None  # None: a shape only (compile_check)
    init_token_id: int
    load: Callable[[], Params] | None

    def abstract_params(self) -> Params:
        """Shapes and dtypes of the Quiet-STaR parameters (ShapeDtypeStructs), nothing allocated."""
        return jax.eval_shape(lambda key: random_params(self.cfg, self.init_token_id, key),
                              jax.random.key(0))


def random_params(cfg: QuietStarConfig, init_token_id: int, rng: jax.Array) -> Params:
    """Random Quiet-STaR parameters: a decoder without the thought rows, then add_thought_params."""
    base = cfg.model.replace(vocab_size=cfg.model.vocab_size - N_THOUGHT_TOKENS)
    decoder_rng, head_rng = jax.random.split(rng)
    _, params = add_thought_params(init_params(base, decoder_rng), base, init_token_id, head_rng,
                                   cfg.embedding_scale)
    return params


def load_model(config: ml_collections.ConfigDict, workdir: str) -> Model:
    """The model `config` names (see the module doc); pretrained weights load only on `load()`."""
    model = config.model
    check_model_keys(model)
    runtime = {k: model[k] for k in RUNTIME_FIELDS}
    if model.source == "random":
        task_vocab = len(known_answer.VOCABULARY)
        if config.data.source == "known_answer" and model.vocab_size != task_vocab:
            raise ConfigError(f"model.vocab_size={model.vocab_size}: the known-answer task's "
                              f"tokenizer has {task_vocab} tokens; set it to that")
        tok = workdir_tokenizer(config, workdir)
        if (tok.start_thought_id, tok.end_thought_id) != (tok.vocab_size - 2, tok.vocab_size - 1):
            raise DataError(f"{tok}: a random model needs the thought tokens after the vocabulary")
        sizes = {k: model[k] for k in SIZE_KEYS if k != "vocab_size"}
        model_cfg = ModelConfig(vocab_size=tok.vocab_size, **sizes, **runtime)
        cfg = quiet_star_config(config.quiet_star, model_cfg, tok)
        return Model(cfg, tok, _init_token(tok, cfg.init_text), None)
    where = model.path if model.source == "hf" else "the demo model"
    # A gs:// directory is copied to the local cache; the demo model is converted there once.
    path = demo_dir() if model.source == "demo" else local_dir(model.path)
    model_cfg = hf_checkpoint.read_config(path, **runtime)
    tok = tokenizer_lib.load(str(path), embedding_rows=model_cfg.vocab_size)
    loaded = lambda: hf_checkpoint.from_hf(path, **runtime)[1]  # noqa: E731  read when needed
    # A plain model's thought tokens go after its embedding matrix, also where the matrix has
    # more rows than the tokenizer has tokens (Qwen): tokenizer._place_thought_ids.
    thought_ids = (tok.start_thought_id, tok.end_thought_id)
    if _has_thought_rows(tok, model_cfg):
        cfg = quiet_star_config(config.quiet_star, model_cfg, tok)
        return Model(cfg, tok, _init_token(tok, cfg.init_text),
                     lambda: _checked(loaded(), True, where))
    if sorted(thought_ids) != [model_cfg.vocab_size, model_cfg.vocab_size + 1]:
        raise CheckpointError(f"{tok}: thought tokens at {thought_ids}, but a model with "
                              f"{model_cfg.vocab_size} rows needs them at the next two ids")
    grown = model_cfg.replace(vocab_size=model_cfg.vocab_size + N_THOUGHT_TOKENS)
    cfg = quiet_star_config(config.quiet_star, grown, tok)
    init_token = _init_token(tok, cfg.init_text)

    def load() -> Params:
        decoder = _checked(loaded(), False, where)
        key = jax.random.key(config.seed)
        return add_thought_params(decoder, model_cfg, init_token, key, cfg.embedding_scale)[1]

    return Model(cfg, tok, init_token, load)


def _has_thought_rows(tok: tokenizer_lib.Tokenizer, model_cfg: ModelConfig) -> bool:
    """Whether the model's embedding has rows for the thought tokens (a Quiet-STaR checkpoint)."""
    return max(tok.start_thought_id, tok.end_thought_id) < model_cfg.vocab_size


def _checked(params: Params, thoughts: bool, source: str) -> Params:
    if is_quiet_star(params) != thoughts:
        kind = "Quiet-STaR" if thoughts else "plain"
        raise CheckpointError(f"{source}: its tokenizer says a {kind} model, its weights say "
                              "otherwise")
    return params


def _init_token(tok: tokenizer_lib.Tokenizer, text: str) -> int:
    """The first token of `text` (quiet_star.init_text)."""
    ids = tok.encode(text)
    if not ids:
        raise ConfigError(f"quiet_star.init_text={text!r} encodes to no tokens with {tok}")
    return ids[0]


def workdir_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> tokenizer_lib.Tokenizer:
    """The random model's tokenizer: `workdir/tokenizer` if there, else trained and saved there.

    Process 0 trains (model.vocab_size pieces, the training documents); the others wait, then read.
    """
    target = epath.Path(workdir) / TOKENIZER_DIR
    if not target.exists() and jax.process_index() == 0:
        texts, _ = data.load_splits(config.data)
        staging = target.parent / f".{TOKENIZER_DIR}.tmp"
        with tempfile.TemporaryDirectory() as tmp:
            try:
                if config.data.source == "known_answer":
                    known_answer.save_tokenizer(tmp)
                else:
                    tokenizer_lib.train_sentencepiece(texts, config.model.vocab_size, tmp)
            except tokenizer_lib.VocabularyTooLarge as e:
                raise ConfigError(
                    f"model.vocab_size={config.model.vocab_size} is more than the training "
                    f"text supports for the random model's tokenizer (at most {e.most} pieces): "
                    f"set --config.model.vocab_size={e.most} or less, or give more text"
                ) from None
            copy_files(epath.Path(tmp), staging)
        staging.rename(target)  # appears complete or not at all
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("qstar_jax: tokenizer written")
    return read_tokenizer(target)


def read_tokenizer(directory: epath.Path) -> tokenizer_lib.Tokenizer:
    """tokenizer.load for a local or remote (gs://) directory."""
    with tempfile.TemporaryDirectory() as tmp:
        copy_files(directory, epath.Path(tmp))
        return tokenizer_lib.load(tmp)



def load_run(workdir: str, step: int | None = None, ema: bool = False
             ) -> tuple[int, Model, Params]:
    """(step, model, parameters) of a saved step of a run (None: the newest readable one);
    `ema`: an RLP run's EMA parameters (its no-think baseline) instead of the model's.

    The model is rebuilt from the run's saved config.json, after a step is found to be saved.
    """
    config = run_settings.load_config(workdir)
    if ema and config.quiet_star.get("objective", "quiet_star") != "rlp":
        raise CheckpointError(f"{workdir}: trained with objective="
                              f"{config.quiet_star.get('objective', 'quiet_star')!r}, which keeps "
                              "no EMA parameters (only objective='rlp' does); leave out --ema")
    checkpoint.saved_step(workdir, step)
    with jax.default_device(jax.devices("cpu")[0]):
        model = load_model(config, workdir)
    step, params = checkpoint.restore_params(workdir, step, model.abstract_params(),
                                             "ema" if ema else "params")
    return step, model, params


def export_checkpoint(workdir: str, step: int | None, out_dir: str,
                      dtype: str = "float32", ema: bool = False) -> int:
    """Write a saved step (None: the newest readable one) as a Hugging Face directory, with
    tokenizer and Quiet-STaR settings; returns the step written. `ema`: an RLP run's EMA
    parameters instead of the model's."""
    step, model, params = load_run(workdir, step, ema)
    hf_checkpoint.to_hf(params, model.cfg.model, out_dir, tokenizer=model.tokenizer,
                        quiet_star=model.cfg, dtype=dtype)
    return step


def load_checkpoint(path: str, step: int | None = None, seed: int = 0
                    ) -> tuple[QuietStarConfig, Params, tokenizer_lib.Tokenizer]:
    """(QuietStarConfig, params, Tokenizer) of any checkpoint, ready to think: a training
    workdir's saved `step` (None: its newest readable one), a Quiet-STaR HF export with its
    settings, or a plain HF model given new thought parameters (`plain_model_thoughts`)."""
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"{path}: no such checkpoint directory")
    if checkpoint.is_workdir(path):
        _, model, params = load_run(path, step)
        return model.cfg, params, model.tokenizer
    if step is not None:
        raise ConfigError(f"{path}: an HF directory holds one model, not saved steps (step {step})")
    model_cfg = hf_checkpoint.read_config(path)
    if not _has_thought_rows(tokenizer_lib.load(path, embedding_rows=model_cfg.vocab_size),
                             model_cfg):
        return plain_model_thoughts(path, seed)
    return _load_hf(path)


def plain_model_thoughts(path: str, seed: int = 0
                         ) -> tuple[QuietStarConfig, Params, tokenizer_lib.Tokenizer]:
    """A plain HF model with new thought parameters, as training starts from it: the authors'
    settings (the "reference" preset), the start and end embeddings from quiet_star.init_text,
    the mixing head drawn from `seed` (its output starts near 0: the model's own predictions)."""
    runtime = {f.name: f.default for f in dataclasses.fields(ModelConfig)
               if f.name in RUNTIME_FIELDS}
    config = ml_collections.ConfigDict(dict(
        model=dict(source="hf", path=path, **{**runtime, "remat_policy": "none"}),
        quiet_star=quiet_star_defaults(), seed=seed))
    model = load_model(config, workdir=path)
    return model.cfg, model.load(), model.tokenizer


def _load_hf(path: str) -> tuple[QuietStarConfig, Params, tokenizer_lib.Tokenizer]:
    model_cfg, params = hf_checkpoint.from_hf(path, remat_policy="none")
    if not is_quiet_star(params):
        raise CheckpointError(f"{path}: its tokenizer has thought tokens, but its weights have no "
                              "start_embedding, end_embedding and talk_head tensors")
    settings = hf_checkpoint.read_quiet_star_settings(path)
    tok = tokenizer_lib.load(path)
    settings.setdefault("pad_id", tok.pad_id)
    cfg = QuietStarConfig(model=model_cfg, **settings)
    ours, theirs = ((tok.start_thought_id, tok.end_thought_id),
                    (cfg.start_thought_id, cfg.end_thought_id))
    if ours != theirs:
        raise CheckpointError(f"{path}: tokenizer thought ids {ours} differ from the checkpoint's "
                              f"{theirs}")
    return cfg, params, tok
