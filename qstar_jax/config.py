"""A run config's `model` and `quiet_star` sections -> the model they name: QuietStarConfig,
tokenizer and a way to get parameters. Shared by train, generate and evaluate.

`model.source` picks the model: "random" (a Llama-style decoder of the given size, with a
sentencepiece tokenizer trained on the run's training documents and kept in the workdir), "hf"
(a Hugging Face directory at `model.path`, local or gs://, plain or Quiet-STaR) or "demo"
(SmolLM2-135M-Instruct from convert.demo_model). Each source takes exactly its own keys, so none
is left unread.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable

import jax
import ml_collections
from etils import epath
from jax.experimental import multihost_utils

from qstar_jax import convert, data
from qstar_jax import tokenizer as tokenizer_lib
from qstar_jax.model import ModelConfig, Params, init_params
from qstar_jax.thoughts import N_THOUGHT_TOKENS, QuietStarConfig, add_thought_params

RUNTIME_KEYS = ("dtype", "param_dtype", "remat_policy", "scan_layers")
SIZE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
             "rope_theta", "tie_embeddings")
SOURCE_KEYS = {"random": SIZE_KEYS, "hf": ("path",), "demo": ()}
TOKENIZER_DIR = "tokenizer"  # in the workdir, for the random source
INIT_TEXT = "---"  # its first token's embedding initialises the start/end thought embeddings
_NOT_SETTABLE = {"model", "start_thought_id", "end_thought_id", "pad_id"}  # from model/tokenizer


@dataclasses.dataclass(frozen=True)
class Model:
    """What a run needs to build its parameters.

    `load` gives host parameters of a pretrained model (Quiet-STaR layout); None means random
    initialisation with `random_params`, which is jittable so it can run directly sharded.
    """

    cfg: QuietStarConfig
    tokenizer: tokenizer_lib.Tokenizer
    init_token_id: int
    load: Callable[[], Params] | None


# Named settings of the `quiet_star` section (configs take one as `--config=FILE.py:NAME`).
# "reference": the authors' code. "stable": the spec's fixes that let the language model learn
# (benchmarks/RESULTS.md, "Does thinking help?"): a policy weight of 1, not 1e6, which otherwise
# turns the float32 noise of the first rewards into updates and, clipped, leaves the model's
# text loss almost untrained; and REINFORCE at the sampling temperature, so that its score
# function is that of the policy the thoughts were drawn from.
PRESETS = {
    "reference": {},
    "stable": {"policy_loss_beta": 1.0, "reinforce_temperature": 1.0},
}


def quiet_star_defaults(preset: str = "reference", **overrides) -> ml_collections.ConfigDict:
    """A `quiet_star` section: every QuietStarConfig option at its default, then the named
    `preset` (see PRESETS), then `overrides`."""
    if preset not in PRESETS:
        raise ValueError(f"quiet_star preset {preset!r}: expected one of {list(PRESETS)}")
    section = {f.name: f.default for f in dataclasses.fields(QuietStarConfig)
               if f.name not in _NOT_SETTABLE}
    section.update(PRESETS[preset])
    unknown = sorted(set(overrides) - set(section))
    if unknown:
        raise ValueError(f"quiet_star.{', quiet_star.'.join(unknown)}: not a QuietStarConfig "
                         "option")
    return ml_collections.ConfigDict({**section, **overrides})


def check_model_keys(model: ml_collections.ConfigDict) -> None:
    """model.source is known, the section holds exactly that source's keys, and a Hugging Face
    source names its directory."""
    if model.source not in SOURCE_KEYS:
        raise ValueError(f"model.source={model.source!r}: expected one of {list(SOURCE_KEYS)}")
    expected = {"source", *RUNTIME_KEYS, *SOURCE_KEYS[model.source]}
    missing, extra = sorted(expected - set(model)), sorted(set(model) - expected)
    if missing:
        raise ValueError(f"model.source={model.source!r} needs model.{', model.'.join(missing)}")
    if extra:
        raise ValueError(f"model.{', model.'.join(extra)} not used by model.source="
                         f"{model.source!r}")
    if model.source == "hf" and not model.path:
        raise ValueError("model.path is empty: pass --config.model.path=DIR (a Hugging Face "
                         "checkpoint directory)")



def quiet_star_config(section: ml_collections.ConfigDict, model_cfg: ModelConfig,
                      tokenizer: tokenizer_lib.Tokenizer) -> QuietStarConfig:
    """QuietStarConfig from the `quiet_star` section; token ids come from the tokenizer."""
    fields = {f.name for f in dataclasses.fields(QuietStarConfig)}
    unknown = sorted(set(section) - (fields - _NOT_SETTABLE))
    if unknown:
        raise ValueError(f"quiet_star.{', quiet_star.'.join(unknown)}: not a QuietStarConfig "
                         "option (token ids come from the tokenizer)")
    return QuietStarConfig(model=model_cfg, start_thought_id=tokenizer.start_thought_id,
                           end_thought_id=tokenizer.end_thought_id, pad_id=tokenizer.pad_id,
                           **section.to_dict())


def random_params(cfg: QuietStarConfig, init_token_id: int, rng: jax.Array) -> Params:
    """Random Quiet-STaR parameters: a decoder without the thought rows, then add_thought_params."""
    base = cfg.model.replace(vocab_size=cfg.model.vocab_size - N_THOUGHT_TOKENS)
    decoder_rng, head_rng = jax.random.split(rng)
    _, params = add_thought_params(init_params(base, decoder_rng), base, init_token_id, head_rng,
                                   cfg.embedding_scale)
    return params


def abstract_params(model: Model) -> Params:
    """Shapes and dtypes of the model's parameters (ShapeDtypeStructs), nothing allocated."""
    return jax.eval_shape(lambda key: random_params(model.cfg, model.init_token_id, key),
                          jax.random.key(0))


def load_model(config: ml_collections.ConfigDict, workdir: str) -> Model:
    """The model `config` names (see the module doc); pretrained weights load only on `load()`."""
    model = config.model
    check_model_keys(model)
    runtime = {k: model[k] for k in RUNTIME_KEYS}
    if model.source == "random":
        tok = workdir_tokenizer(config, workdir)
        if (tok.start_thought_id, tok.end_thought_id) != (tok.vocab_size - 2, tok.vocab_size - 1):
            raise ValueError(f"{tok}: a random model needs the thought tokens after the vocabulary")
        sizes = {k: model[k] for k in SIZE_KEYS if k != "vocab_size"}
        model_cfg = ModelConfig(vocab_size=tok.vocab_size, **sizes, **runtime)
        return Model(quiet_star_config(config.quiet_star, model_cfg, tok), tok,
                     _init_token(tok), None)
    where = model.path if model.source == "hf" else "the demo model"
    if model.source == "demo":
        model_cfg, params, tok = convert.demo_model(**runtime)
        loaded = lambda: params  # noqa: E731
    else:
        path = convert.local_dir(model.path)  # a gs:// directory is copied to the local cache
        model_cfg = convert.read_config(path, **runtime)
        tok = tokenizer_lib.load(str(path))
        loaded = lambda: convert.from_hf(path, **runtime)[1]  # noqa: E731
    thought_ids = (tok.start_thought_id, tok.end_thought_id)
    if max(thought_ids) < model_cfg.vocab_size:  # a Quiet-STaR checkpoint: thought rows present
        return Model(quiet_star_config(config.quiet_star, model_cfg, tok), tok, _init_token(tok),
                     lambda: _checked(loaded(), True, where))
    if sorted(thought_ids) != [model_cfg.vocab_size, model_cfg.vocab_size + 1]:
        raise ValueError(f"{tok}: thought tokens at {thought_ids}, but a model with "
                         f"{model_cfg.vocab_size} rows needs them at the next two ids")
    grown = model_cfg.replace(vocab_size=model_cfg.vocab_size + N_THOUGHT_TOKENS)
    cfg = quiet_star_config(config.quiet_star, grown, tok)
    init_token = _init_token(tok)

    def load() -> Params:
        decoder = _checked(loaded(), False, where)
        key = jax.random.key(config.seed)
        return add_thought_params(decoder, model_cfg, init_token, key, cfg.embedding_scale)[1]

    return Model(cfg, tok, init_token, load)


def _checked(params: Params, thoughts: bool, source: str) -> Params:
    if ("decoder" in params) != thoughts:
        kind = "Quiet-STaR" if thoughts else "plain"
        raise ValueError(f"{source}: its tokenizer says a {kind} model, its weights say otherwise")
    return params


def _init_token(tok: tokenizer_lib.Tokenizer) -> int:
    ids = tok.encode(INIT_TEXT)
    if not ids:
        raise ValueError(f"{tok}: {INIT_TEXT!r} encodes to no tokens")
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
                tokenizer_lib.train_sentencepiece(texts, config.model.vocab_size, tmp)
            except tokenizer_lib.VocabularyTooLarge as e:
                raise ValueError(
                    f"model.vocab_size={config.model.vocab_size} is more than the training "
                    f"text supports for the random model's tokenizer (at most {e.most} pieces): "
                    f"set --config.model.vocab_size={e.most} or less, or give more text"
                ) from None
            convert.copy_files(epath.Path(tmp), staging)
        staging.rename(target)  # appears complete or not at all
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("qstar_jax: tokenizer written")
    return read_tokenizer(target)


def read_tokenizer(directory: epath.Path) -> tokenizer_lib.Tokenizer:
    """tokenizer.load for a local or remote (gs://) directory."""
    with tempfile.TemporaryDirectory() as tmp:
        convert.copy_files(directory, epath.Path(tmp))
        return tokenizer_lib.load(tmp)

