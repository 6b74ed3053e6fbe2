"""HF checkpoints <-> qstar_jax: logits against transformers' own models, exact round trips,
the Quiet-STaR release layout and the error messages for bad checkpoints."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from test_loading import save_tiny_run

from qstar_jax import convert, directories, hf_checkpoint
from qstar_jax.errors import CheckpointError, CheckpointNotFoundError
from qstar_jax.model import Transformer
from qstar_jax.thoughts import QuietStarConfig, add_thought_params

L = 12
SMALL = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
             max_position_embeddings=64)
CASES = {
    "llama_gqa": (transformers.LlamaConfig, dict(
        rope_parameters={"rope_type": "default", "rope_theta": 5e4})),
    "llama_tied": (transformers.LlamaConfig, dict(
        tie_word_embeddings=True, num_key_value_heads=4, rms_norm_eps=3e-6)),
    "llama3_scaling": (transformers.LlamaConfig, dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "mistral_window": (transformers.MistralConfig, dict(
        sliding_window=4, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}
TOKENS = np.random.default_rng(0).integers(0, SMALL["vocab_size"], (2, L))
MASK = np.arange(L)[None, :] < np.array([[L], [L - 4]])  # second row right-padded


def random_hf_model(config_cls, overrides, seed=0):
    """A small transformers causal LM with every weight random (norm scales around 1)."""
    torch.manual_seed(seed)
    config = config_cls(**{**SMALL, **overrides}, attn_implementation="eager")
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


def hf_logits(model, tokens=TOKENS, mask=MASK):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(int)))
    return out.logits.float().numpy()


def our_logits(cfg, params, tokens=TOKENS, mask=MASK):
    return np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray(tokens),
                                             valid_BL=jnp.asarray(mask)))


def load_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32).eval()


def tensors_of(directory):
    """Every tensor of an HF directory's safetensors files, by name."""
    out = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        out.update(safetensors.numpy.load_file(file))
    return out


def saved_model(config_cls, overrides, path):
    """(a random HF model, `path` where it is saved, its logits)."""
    model = random_hf_model(config_cls, overrides)
    model.save_pretrained(path)
    return model, path, hf_logits(model)


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, tmp_path_factory):
    """(HF model, its saved directory, its logits) for each case."""
    return saved_model(*CASES[request.param], tmp_path_factory.mktemp(request.param))


def test_import_matches_transformers(saved):
    model, path, expected = saved
    cfg, params = hf_checkpoint.from_hf(path)
    assert cfg.vocab_size == SMALL["vocab_size"]
    assert cfg.n_kv_heads == model.config.num_key_value_heads
    assert cfg.tie_embeddings == model.config.tie_word_embeddings
    assert cfg.sliding_window == getattr(model.config, "sliding_window", None)
    got = our_logits(cfg, params)
    assert np.abs(got - expected)[MASK].max() <= 1e-4


def test_export_reproduces_every_tensor(saved, tmp_path):
    model, path, expected = saved
    cfg, params = hf_checkpoint.from_hf(path)
    hf_checkpoint.to_hf(params, cfg, tmp_path / "out")
    original, exported = tensors_of(path), tensors_of(tmp_path / "out")
    assert sorted(original) == sorted(exported)
    for name, w in original.items():
        assert exported[name].dtype == w.dtype and np.array_equal(exported[name], w), name
    reloaded = load_hf(tmp_path / "out")
    assert type(reloaded) is type(model)
    assert np.abs(hf_logits(reloaded) - expected)[MASK].max() <= 1e-6


def test_v4_style_config(saved, tmp_path):
    _, path, expected = saved
    v4 = tmp_path / "v4"
    v4.mkdir()
    for file in path.iterdir():
        (v4 / file.name).write_bytes(file.read_bytes())
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    if rope["rope_type"] != "default":
        config["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype")
    (v4 / "config.json").write_text(json.dumps(config))
    cfg, params = hf_checkpoint.from_hf(v4)
    assert cfg == hf_checkpoint.from_hf(path)[0]
    assert np.abs(our_logits(cfg, params) - expected)[MASK].max() <= 1e-4


def test_unscanned_layers(saved):
    _, path, expected = saved
    cfg, params = hf_checkpoint.from_hf(path, scan_layers=False)
    assert not cfg.scan_layers and "layers_1" in params and "layers" not in params
    assert np.abs(our_logits(cfg, params) - expected)[MASK].max() <= 1e-4


def test_sharded_both_ways(tmp_path):
    model = random_hf_model(*CASES["llama_gqa"])
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / hf_checkpoint.INDEX).is_file()
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    cfg, params = hf_checkpoint.from_hf(tmp_path / "hf")
    assert np.abs(our_logits(cfg, params) - hf_logits(model))[MASK].max() <= 1e-4

    hf_checkpoint.to_hf(params, cfg, tmp_path / "out", max_shard_size=20_000)
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "out" / hf_checkpoint.INDEX).read_text())
    exported = tensors_of(tmp_path / "out")
    assert set(index["weight_map"]) == set(exported)
    assert index["metadata"]["total_size"] == sum(w.nbytes for w in exported.values())
    original = tensors_of(tmp_path / "hf")
    assert sorted(original) == sorted(exported)
    assert all(np.array_equal(exported[n], w) for n, w in original.items())
    assert np.array_equal(hf_logits(load_hf(tmp_path / "out")), hf_logits(model))


# ----------------------------------------------------------------------------- Quiet-STaR layout


@pytest.fixture(scope="module")
def quiet_star_export(tmp_path_factory):
    """A tiny Quiet-STaR model with a non-zero mixing head, exported with its settings."""
    model = random_hf_model(*CASES["mistral_window"])
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    base_cfg, base = hf_checkpoint.from_hf(path)
    cfg, params = add_thought_params(base, base_cfg, init_token_id=7, rng=jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(1), 8))
    params["mixing_head"] = jax.tree.map(
        lambda x: jax.random.normal(next(keys), x.shape), params["mixing_head"])
    params["end_embedding"] = params["end_embedding"] * 2  # distinguishable from the start one
    qcfg = QuietStarConfig(model=cfg, start_thought_id=102, end_thought_id=101, pad_id=0,
                           n_ahead=5, n_ahead_talk=3, n_passes=1, mixing_sigmoid=True)
    out = tmp_path_factory.mktemp("qstar") / "export"
    hf_checkpoint.to_hf(params, cfg, out, quiet_star=qcfg)
    return cfg, params, qcfg, out


def test_quiet_star_release_layout(quiet_star_export):
    cfg, params, qcfg, out = quiet_star_export
    d = cfg.d_model
    tensors = tensors_of(out)
    shapes = {n: list(tensors[n].shape) for n in tensors if not n.startswith(("model.", "lm_"))}
    assert shapes == {"start_embedding": [2, d], "end_embedding": [2, d],
                      "talk_head.0.0.weight": [d, 2 * d], "talk_head.0.0.bias": [d],
                      "talk_head.0.2.weight": [d, d], "talk_head.0.2.bias": [d],
                      "talk_head.0.4.weight": [1, d]}
    head = params["mixing_head"]
    head = jax.tree.map(np.asarray, head)
    assert np.array_equal(tensors["talk_head.0.0.weight"], head["hidden_0"]["kernel"].T)
    assert np.array_equal(tensors["talk_head.0.2.bias"], head["hidden_1"]["bias"])
    assert np.array_equal(tensors["talk_head.0.4.weight"][0], head["out"]["kernel"][:, 0])
    assert np.array_equal(tensors["end_embedding"][0], np.asarray(params["end_embedding"]))
    assert not tensors["start_embedding"][1].any()
    assert tensors["model.embed_tokens.weight"].shape == (103, d)

    assert json.loads((out / "added_tokens.json").read_text()) == {
        "<|startthought|>": 102, "<|endthought|>": 101}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["vocab_size"] == 103
    assert config["max_thoughts"] == 5 + 3 + 1
    for key in ("use_concat_talk_head", "use_complex_talk_head", "use_weighted_talk_head",
                "use_start_thought_token", "use_end_thought_token"):
        assert config[key] is True
    assert config["quiet_star"]["n_ahead"] == 5 and config["quiet_star"]["mixing_sigmoid"]


def test_quiet_star_base_model_loads_in_transformers(quiet_star_export):
    cfg, params, _, out = quiet_star_export
    tokens = np.concatenate([TOKENS, [[101, 102]] * 2], axis=1)  # thought ids included
    mask = np.concatenate([MASK, MASK[:, -2:]], axis=1)
    expected = our_logits(cfg, params["decoder"], tokens, mask)
    got = hf_logits(load_hf(out), tokens, mask)
    assert np.abs(got - expected)[mask].max() <= 1e-4


def test_quiet_star_round_trip(quiet_star_export):
    cfg, params, qcfg, out = quiet_star_export
    cfg2, params2 = hf_checkpoint.from_hf(out)
    assert cfg2 == cfg
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(a, b), params, params2)))
    settings = hf_checkpoint.read_quiet_star_settings(out)
    assert QuietStarConfig(model=cfg2, **settings) == qcfg


def test_quiet_star_settings_from_added_tokens_only(quiet_star_export, tmp_path):
    """A release-style directory: ids from added_tokens.json, order checked, no quiet_star block."""
    _, _, _, out = quiet_star_export
    config = json.loads((out / "config.json").read_text())
    del config["quiet_star"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "added_tokens.json").write_text('{"<|endthought|>": 102, "<|startthought|>": 101}')
    assert hf_checkpoint.read_quiet_star_settings(tmp_path) == {"start_thought_id": 101,
                                                          "end_thought_id": 102}
    (tmp_path / "added_tokens.json").write_text('{"<|startthought|>": 101, "<|endthought|>": 101}')
    with pytest.raises(CheckpointError, match="added_tokens.json"):
        hf_checkpoint.read_quiet_star_settings(tmp_path)


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def copy_of(tmp_path):
    """A fresh editable copy of a small saved llama checkpoint."""
    model = random_hf_model(*CASES["llama_gqa"])
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        hf_checkpoint.from_hf(tmp_path / "nowhere")


@pytest.mark.parametrize("changes, key", [
    (dict(model_type="gpt2"), "model_type"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), "rope_type"),
])
def test_unsupported_config(copy_of, changes, key):
    edit_config(copy_of, **changes)
    with pytest.raises(CheckpointError, match=rf"config\.json: .*{key}"):
        hf_checkpoint.from_hf(copy_of)


def test_missing_tensor(copy_of):
    file = copy_of / "model.safetensors"
    tensors = safetensors.numpy.load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError,
                       match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.up_proj"):
        hf_checkpoint.from_hf(copy_of)


def test_wrong_shape(copy_of):
    file = copy_of / "model.safetensors"
    tensors = safetensors.numpy.load_file(file)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
    safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError,
                       match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj"
                             r"\.weight' has shape \[8, 32\], expected \[16, 32\]"):
        hf_checkpoint.from_hf(copy_of)


def test_failed_export_leaves_nothing(copy_of, tmp_path):
    cfg, params = hf_checkpoint.from_hf(copy_of)

    class BrokenTokenizer:
        bos_id, eos_id, pad_id = 1, 2, 2

        def save(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        hf_checkpoint.to_hf(params, cfg, tmp_path / "export", tokenizer=BrokenTokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with pytest.raises(FileExistsError, match="ckpt"):
        hf_checkpoint.to_hf(params, cfg, copy_of)


def test_cli_inspect(copy_of, capsys):
    convert.main(["inspect", "--path", str(copy_of)])
    out = capsys.readouterr().out
    n = sum(w.size for w in tensors_of(copy_of).values())
    assert f"parameters: {n:,}" in out and '"n_kv_heads": 2' in out


def test_cli_inspect_of_a_training_workdir(tmp_path, capsys):
    """A workdir is no HF directory: inspect says what it is, its newest step, its model and
    Quiet-STaR settings, and how to export it."""
    workdir = tmp_path / "run"
    model, _ = save_tiny_run(workdir, (3, 5))
    convert.main(["inspect", "--path", str(workdir)])
    out = capsys.readouterr().out
    head, rest = out.split("\n", 1)
    assert head == (f"{workdir}: a training workdir, newest saved step 5; python -m "
                    f"qstar_jax.convert to-hf --checkpoint {workdir} --out DIR exports it")
    model_part, quiet_star_part = rest.split("quiet-star: ")
    assert json.loads(model_part.removeprefix("model: "))["d_model"] == model.cfg.model.d_model
    assert json.loads(quiet_star_part)["n_ahead"] == model.cfg.n_ahead == 4


def test_cli_checks_out_before_the_conversion(copy_of, tmp_path, capsys, monkeypatch):
    """An --out that exists with files, or under a file, is one line (exit 1) before the
    training workdir is read (here it does not exist) or the GGUF file opened."""
    def never(*args, **kwargs):
        raise AssertionError("the conversion started")

    monkeypatch.setattr(convert.gguf_checkpoint, "from_gguf", never)
    (tmp_path / "a_file").write_text("")
    for out, message in [
            (copy_of, f"--out={copy_of}: already exists and is not an empty directory; choose a "
                      "new path"),
            (tmp_path / "a_file" / "hf", f"--out={tmp_path / 'a_file' / 'hf'}: cannot write in "
                                         f"{tmp_path / 'a_file'} (Not a directory); choose a "
                                         "directory you can write to")]:
        for argv in (["to-hf", "--checkpoint", str(tmp_path / "none")],
                     ["from-gguf", "--gguf", str(tmp_path / "none.gguf")]):
            with pytest.raises(SystemExit) as e:
                convert.main([*argv, "--out", str(out)])
            assert e.value.code == 1
            assert capsys.readouterr().err == f"error: {message}\n"
    (tmp_path / "empty").mkdir()
    with pytest.raises(AssertionError, match="the conversion started"):  # an empty one will do
        convert.main(["from-gguf", "--gguf", "x.gguf", "--out", str(tmp_path / "empty")])
    with pytest.raises(AssertionError, match="the conversion started"):  # made with parents
        convert.main(["from-gguf", "--gguf", "x.gguf", "--out", str(tmp_path / "new" / "hf")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "ckpt", "empty"]


# ----------------------------------------------------------------------------- remote directories


@pytest.fixture
def remote(tmp_path, monkeypatch):
    """A `fake://` URI scheme that etils.epath serves from tmp_path/bucket, and a fresh cache."""
    from etils import epath
    from etils.epath import register

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "fake://",
                        lambda uri: epath.Path(bucket / uri.split("://", 1)[1]))
    monkeypatch.setenv("QSTAR_CACHE", str(tmp_path / "cache"))
    return bucket


def upload(directory: Path, bucket: Path, name: str) -> None:
    (bucket / name).mkdir()
    for file in directory.iterdir():
        (bucket / name / file.name).write_bytes(file.read_bytes())


def test_local_dir_copies_a_remote_directory_once(remote, copy_of, tmp_path):
    upload(copy_of, remote, "model")
    (remote / "model" / "checkpoint-10").mkdir()  # subdirectories stay behind
    (remote / "model" / "checkpoint-10" / "optimizer.pt").write_bytes(b"x")

    local = directories.local_dir("fake://model/")
    assert local.parent == tmp_path / "cache" / "remote" and local.name.startswith("model-")
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in copy_of.iterdir())
    original, copied = tensors_of(copy_of), tensors_of(local)
    assert sorted(copied) == sorted(original)
    assert all(np.array_equal(copied[n], w) for n, w in original.items())
    assert hf_checkpoint.from_hf(local)[0] == hf_checkpoint.from_hf(copy_of)[0]

    (remote / "model" / "config.json").write_text("changed")  # the cached copy is used as is
    assert directories.local_dir("fake://model") == local
    assert json.loads((local / "config.json").read_text())["model_type"] == "llama"
    assert [p.name for p in local.parent.iterdir()] == [local.name]  # no partial copies left

    assert directories.local_dir(str(copy_of)) == copy_of  # local paths are not copied
    assert directories.local_dir(copy_of) == copy_of
    with pytest.raises(CheckpointNotFoundError, match="fake://nowhere"):
        directories.local_dir("fake://nowhere")


def test_local_dir_without_the_filesystem_library_names_it(monkeypatch, tmp_path):
    from etils.epath import register

    monkeypatch.setenv("QSTAR_CACHE", str(tmp_path / "cache"))

    def missing(uri):
        raise ImportError("Please install gcsfs to access Google Storage")

    monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "fake://", missing)
    with pytest.raises(CheckpointError, match=r"fake://model: .*gcsfs.*\[tpu\]"):
        directories.local_dir("fake://model")


def test_local_dir_failed_copy_leaves_nothing(remote, copy_of, tmp_path):
    upload(copy_of, remote, "model")
    copied = []

    def copy_then_fail(src, dst, length=0):
        copied.append(dst.name)
        if len(copied) == 2:
            raise OSError("connection reset")
        dst.write(src.read())

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(directories.shutil, "copyfileobj", copy_then_fail)
        with pytest.raises(OSError, match="connection reset"):
            directories.local_dir("fake://model")
    assert list((tmp_path / "cache" / "remote").iterdir()) == []
    local = directories.local_dir("fake://model")  # the next call copies everything
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in copy_of.iterdir())


def test_load_model_reads_a_remote_hf_directory(remote, tmp_path):
    """config.load_model with model.path a URI: the model, tokenizer and weights arrive."""
    import ml_collections

    from qstar_jax import config as config_lib
    from qstar_jax import loading
    from qstar_jax import tokenizer as tokenizer_lib
    from qstar_jax.model import ModelConfig, init_params

    words = "the cat sat on a mat dog ran fast why because think answer is and so".split()
    rnd = np.random.default_rng(0)
    tok = tokenizer_lib.train_sentencepiece(
        [" ".join(rnd.choice(words, 12)) for _ in range(200)], 330, str(tmp_path / "tok"))
    cfg = ModelConfig(vocab_size=tok.base_vocab_size, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2, ffn_dim=48, remat_policy="none")
    params = init_params(cfg, jax.random.key(0))
    hf_checkpoint.to_hf(params, cfg, tmp_path / "hf", tokenizer=tok)
    upload(tmp_path / "hf", remote, "plain")

    config = ml_collections.ConfigDict(dict(
        seed=0, quiet_star=config_lib.quiet_star_defaults(n_ahead=4),
        model=dict(source="hf", path="fake://plain", dtype="float32", param_dtype="float32",
                   remat_policy="none", scan_layers=True)))
    model = loading.load_model(config, str(tmp_path / "run"))
    assert model.cfg.model == cfg.replace(vocab_size=cfg.vocab_size + 2)
    assert model.tokenizer.encode("the cat sat") == tok.encode("the cat sat")
    loaded = model.load()["decoder"]
    jax.tree.map(np.testing.assert_array_equal, loaded["layers"], params["layers"])
    np.testing.assert_array_equal(loaded["embed"]["embedding"][:cfg.vocab_size],
                                  params["embed"]["embedding"])
