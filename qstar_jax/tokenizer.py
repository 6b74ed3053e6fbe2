"""Text <-> token ids for the base model's vocabulary plus the two Quiet-STaR thought tokens.

One interface over three sources: a sentencepiece `tokenizer.model` (Llama 2, Mistral), a Hugging
Face `tokenizer.json` (SmolLM2, Llama 3, Qwen) and the tokenizer metadata of a GGUF file. The
thought tokens `<|startthought|>` / `<|endthought|>` take the two ids after the base vocabulary
unless the vocabulary or an `added_tokens.json` already places them (the authors' checkpoint:
32000/32001). The base vocabulary ends after the model's embedding rows when the matrix is padded
past the tokenizer's tokens (Qwen: 151936 rows, ~151665 tokens): see `_place_thought_ids`.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from qstar_jax.errors import DataError, PathNotFoundError, UnsupportedError
from qstar_jax.json_files import read_json

START_THOUGHT = "<|startthought|>"
END_THOUGHT = "<|endthought|>"
THOUGHT_TOKENS = (START_THOUGHT, END_THOUGHT)
_THOUGHT_RE = re.compile("(" + "|".join(map(re.escape, THOUGHT_TOKENS)) + ")")


class Tokenizer:
    """The common interface; `SentencePieceTokenizer` and `HFTokenizer` implement the backends.

    Control tokens (bos, eos, pad, ...) are dropped by `decode`, as sentencepiece does; thought
    tokens are kept and shown as their strings.
    """

    def __init__(self, *, own_tokens: int, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None, unk_id: int | None, thought_ids: tuple[int, int],
                 source: str):
        if pad_id is None:
            pad_id = eos_id  # the Quiet-STaR reference pads with EOS
        if pad_id is None:
            raise DataError(f"{source}: the tokenizer names neither a pad nor an eos token")
        # The base model's ids: the tokenizer's own, and padded embedding rows before the thoughts.
        self.base_vocab_size = max(own_tokens, min(thought_ids))
        self.start_thought_id, self.end_thought_id = thought_ids
        self.vocab_size = max(self.base_vocab_size, *(i + 1 for i in thought_ids))
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.source = source

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.source!r}, vocab_size={self.vocab_size}, "
                f"thought_ids={self.start_thought_id, self.end_thought_id})")

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; thought-token strings in it become the thought ids."""
        return self.encode_batch([text], add_bos)[0]

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """`encode` for each text (one call into the backend where it can batch)."""
        texts = [_check_text(t) for t in texts]
        if add_bos and self.bos_id is None:
            raise ValueError(f"{self.source}: add_bos=True, but this tokenizer has no BOS token")
        prefix = [self.bos_id] if add_bos else []
        return [prefix + ids for ids in self._encode_many(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a 1-D sequence of ids (a list, numpy or jax array)."""
        ids_L = np.asarray(ids if hasattr(ids, "shape") else list(ids))
        if ids_L.ndim != 1 or (ids_L.size and ids_L.dtype.kind not in "iu"):
            raise ValueError(f"decode takes a 1-D sequence of integer ids, got {ids_L.shape} "
                             f"of {ids_L.dtype}")
        if ids_L.size and (ids_L.min() < 0 or ids_L.max() >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got {ids_L.min()} .. "
                             f"{ids_L.max()}")
        return self._decode(ids_L.tolist())

    def save(self, directory: str) -> None:
        """Write the model file, added_tokens.json and transformers-readable configs."""
        os.makedirs(directory, exist_ok=True)
        self._save_model(directory)
        thought_ids = {START_THOUGHT: self.start_thought_id, END_THOUGHT: self.end_thought_id}
        specials = {name: self._token(i) for name, i in (
            ("bos_token", self.bos_id), ("eos_token", self.eos_id), ("unk_token", self.unk_id),
            ("pad_token", self.pad_id)) if i is not None}
        added = {str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                          "single_word": False, "special": True} for t, i in thought_ids.items()}
        config = {"tokenizer_class": self._hf_class, **specials, "add_bos_token": False,
                  "add_eos_token": False, "added_tokens_decoder": added,
                  "additional_special_tokens": list(THOUGHT_TOKENS)}
        for name, content in (
                ("added_tokens.json", thought_ids),
                ("special_tokens_map.json", {**specials,
                                             "additional_special_tokens": list(THOUGHT_TOKENS)}),
                ("tokenizer_config.json", config)):
            with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2, ensure_ascii=False)

    # Backend hooks.
    _hf_class: str

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _token(self, token_id: int) -> str:
        raise NotImplementedError

    def _save_model(self, directory: str) -> None:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model; thought tokens are spliced in around it.

    Only text at the very start gets sentencepiece's dummy-prefix space: text after a thought
    token is encoded as transformers' Llama tokenizer does (Metaspace, prepend_scheme="first").
    """

    _hf_class = "LlamaTokenizer"

    def __init__(self, model_proto: bytes, source: str, added: dict[str, int] | None = None,
                 special_ids: dict[str, int | None] | None = None, embedding_rows: int = 0):
        proto = sentencepiece_model_pb2.ModelProto()
        try:
            proto.ParseFromString(model_proto)
            self._sp = sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except Exception as e:  # protobuf and sentencepiece raise assorted types
            raise DataError(f"{source}: not a valid sentencepiece model ({e})") from e
        proto.normalizer_spec.add_dummy_prefix = False
        self._sp_inner = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self._proto = model_proto
        if special_ids is None:
            special_ids = {"bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "pad_id": sp.pad_id(),
                           "unk_id": sp.unk_id()}
        special_ids = {k: None if i is None or i < 0 else i for k, i in special_ids.items()}
        found = tuple(self._token_id(t) for t in THOUGHT_TOKENS)
        own = sp.get_piece_size()
        ids = _place_thought_ids(found, own, embedding_rows, added, self._token_id, source)
        super().__init__(own_tokens=own, thought_ids=ids, source=source, **special_ids)
        self._thought_of = dict(zip(ids, THOUGHT_TOKENS, strict=True))
        self._id_of = dict(zip(THOUGHT_TOKENS, ids, strict=True))

    def _token_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        out = []
        for text in texts:
            ids: list[int] = []
            for k, part in enumerate(_THOUGHT_RE.split(text)):
                if k % 2:
                    ids.append(self._id_of[part])
                elif part:
                    ids += (self._sp if k == 0 else self._sp_inner).encode(part)
            out.append(ids)
        return out

    def _decode(self, ids: list[int]) -> str:
        parts = []
        for is_thought, group in itertools.groupby(ids, key=self._thought_of.__contains__):
            group = list(group)
            if is_thought:
                parts += [self._thought_of[i] for i in group]
            else:
                parts.append((self._sp if not parts else self._sp_inner).decode(group))
        return "".join(parts)

    def _token(self, token_id: int) -> str:
        return self._thought_of.get(token_id) or self._sp.id_to_piece(token_id)

    def _save_model(self, directory: str) -> None:
        with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
            f.write(self._proto)


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (Hugging Face tokenizer.json) with the thought tokens added as
    special tokens, so that a saved tokenizer.json carries them too."""

    _hf_class = "PreTrainedTokenizerFast"

    def __init__(self, tokenizer: tokenizers.Tokenizer, source: str, *,
                 special_ids: dict[str, int | None], added: dict[str, int] | None = None,
                 embedding_rows: int = 0):
        extra = {i: t for i, t in tokenizer.get_added_tokens_decoder().items()
                 if t.content not in THOUGHT_TOKENS}
        own = 1 + max(i for t, i in tokenizer.get_vocab(with_added_tokens=True).items()
                      if t not in THOUGHT_TOKENS)
        found = tuple(tokenizer.token_to_id(t) for t in THOUGHT_TOKENS)
        ids = _place_thought_ids(found, own, embedding_rows, added, tokenizer.token_to_id, source)
        for token, i in sorted(zip(THOUGHT_TOKENS, ids, strict=True), key=lambda x: x[1]):
            if tokenizer.token_to_id(token) is None:
                tokenizer = _add_special_token(tokenizer, token, i, source)
            if tokenizer.token_to_id(token) != i:
                raise DataError(f"{source}: could not place {token} at id {i}")
        super().__init__(own_tokens=own, thought_ids=ids, source=source, **special_ids)
        self._tok = tokenizer
        self._hidden = {i for i, t in extra.items() if t.special}  # control tokens: not decoded

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i not in self._hidden],
                                skip_special_tokens=False)

    def _token(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)

    def _save_model(self, directory: str) -> None:
        self._tok.save(os.path.join(directory, "tokenizer.json"))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # what a tokenizer directory holds


def _add_special_token(tokenizer: tokenizers.Tokenizer, token: str, token_id: int,
                       source: str) -> tokenizers.Tokenizer:
    """`tokenizer` with `token` added as a special token at `token_id`.

    `tokenizers` numbers added tokens on from the size of the model's vocabulary, also when it
    reads a tokenizer.json. So a token placed past the padded rows of an embedding matrix goes
    into the model's vocabulary at its id (a new tokenizer), and so does every added token, to
    keep its id when the file is read again.
    """
    if token_id != tokenizer.get_vocab_size(with_added_tokens=True):
        spec = json.loads(tokenizer.to_str())
        vocab = spec.get("model", {}).get("vocab")
        if not isinstance(vocab, dict):
            raise DataError(f"{source}: cannot place {token} at id {token_id}: the tokenizer "
                            f"model {spec.get('model', {}).get('type')!r} has no vocabulary "
                            "map to put it in (BPE and WordLevel do)")
        vocab.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
        vocab[token] = token_id
        tokenizer = tokenizers.Tokenizer.from_str(json.dumps(spec))
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    return tokenizer


def load(path: str, embedding_rows: int = 0) -> Tokenizer:
    """A tokenizer from a directory (tokenizer.json or tokenizer.model, plus added_tokens.json and
    tokenizer_config.json when present) or from one .model / .json / .gguf file.

    `embedding_rows`: the rows of the model's embedding matrix; thought tokens the tokenizer does
    not place yet go after them when they outnumber its tokens (see `_place_thought_ids`).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        found = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise PathNotFoundError(f"{path}: directory holds none of {', '.join(TOKENIZER_FILES)}")
        path = os.path.join(path, found[0])
    elif not os.path.isfile(path):
        raise PathNotFoundError(f"{path}: no such tokenizer file or directory")
    directory = os.path.dirname(path)
    if path.endswith(".gguf"):
        return from_gguf(path)
    added = _read_added_tokens(os.path.join(directory, "added_tokens.json"))
    if path.endswith(".model"):
        with open(path, "rb") as f:
            return SentencePieceTokenizer(f.read(), path, added, embedding_rows=embedding_rows)
    if path.endswith(".json"):
        try:
            tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"{path}: not a valid tokenizer.json ({e})") from e
        names = _read_special_names(directory)
        ids = {f"{n}_id": tok.token_to_id(names[n]) if n in names else None
               for n in ("bos", "eos", "pad", "unk")}
        if missing := [t for n, t in names.items() if ids[f"{n}_id"] is None]:
            raise DataError(f"{directory}: special tokens {missing} named in the tokenizer "
                            f"config are not in {path}")
        return HFTokenizer(tok, path, special_ids=ids, added=added, embedding_rows=embedding_rows)
    raise UnsupportedError(f"{path}: unknown tokenizer file type (expected .model, .json or .gguf)")


def from_gguf(path_or_reader) -> Tokenizer:
    """The tokenizer a GGUF file's metadata describes (a path or an open `gguf.GGUFReader`)."""
    import gguf  # only needed here; the import takes a moment

    if isinstance(path_or_reader, (str, os.PathLike)):
        path = os.fspath(path_or_reader)
        if not os.path.isfile(path):
            raise PathNotFoundError(f"{path}: no such GGUF file")
        try:
            reader = gguf.GGUFReader(path)
        except Exception as e:  # bad magic, truncated file, ...
            raise DataError(f"{path}: not a readable GGUF file ({e})") from e
    else:
        reader, path = path_or_reader, str(getattr(path_or_reader, "path", "<GGUFReader>"))

    def field(key, default=None):
        f = reader.fields.get(f"tokenizer.ggml.{key}")
        return default if f is None else f.contents()

    kind = field("model")
    if field("tokens") is None:
        raise DataError(f"{path}: GGUF file has no tokenizer.ggml.tokens metadata")
    special_ids = {"bos_id": field("bos_token_id"), "eos_id": field("eos_token_id"),
                   "pad_id": field("padding_token_id"), "unk_id": field("unknown_token_id")}
    if kind == "gpt2":
        return HFTokenizer(_byte_level_bpe(field, path), path, special_ids=special_ids)
    if kind == "llama":
        proto = _sentencepiece_proto(field, special_ids)
        return SentencePieceTokenizer(proto, path, special_ids=special_ids)
    raise UnsupportedError(f"{path}: GGUF tokenizer model {kind!r} is not supported "
                           "(supported: 'gpt2' byte-level BPE, 'llama' sentencepiece)")


class VocabularyTooLarge(DataError):
    """The training text has too few distinct pieces for the vocabulary asked for."""

    def __init__(self, asked: int, most: int):
        super().__init__(f"a vocabulary of {asked} pieces is more than the text supports (at "
                         f"most {most}): lower the vocabulary size or give more text")
        self.most = most


# sentencepiece skips a "sentence" longer than this many bytes (its max_sentence_length default).
_SENTENCE_BYTES = 4192
# The most text it trains on: it needs about 4 bytes of memory a byte of it, and 256 MiB of text
# is plenty for the vocabularies of random models.
_SAMPLE_BYTES = 1 << 28


def train_sentencepiece(texts: Iterable[str], vocab_size: int, directory: str,
                        byte_fallback: bool = True) -> Tokenizer:
    """Train a Llama-style BPE sentencepiece model on `texts`, save it to `directory`, return it.

    For tests and random models; with byte_fallback the vocabulary needs >= ~320 pieces. Texts of
    any length can be given: `_training_sentences` cuts and samples them.
    """
    texts = [_check_text(t) for t in texts]
    if not any(texts):
        raise DataError("train_sentencepiece: no training text")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(texts), model_writer=model,
            vocab_size=vocab_size, model_type="bpe", byte_fallback=byte_fallback,
            split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, max_sentence_length=_SENTENCE_BYTES, minloglevel=2)
    except RuntimeError as e:
        most = re.search(r"<= (\d+)", str(e))
        if most:
            raise VocabularyTooLarge(vocab_size, int(most.group(1))) from None
        raise DataError(f"sentencepiece training with vocab_size={vocab_size} failed: {e}") from e
    tokenizer = SentencePieceTokenizer(model.getvalue(), os.path.join(directory, "tokenizer.model"))
    tokenizer.save(directory)
    return tokenizer


def _training_sentences(texts: list[str]) -> Iterator[str]:
    """The "sentences" sentencepiece trains on: each text cut to fit (`_cut`), and where the texts
    hold more than _SAMPLE_BYTES, texts in a fixed random order up to that much.

    Sampling here rather than with sentencepiece's input_sentence_size: that counts sentences, not
    bytes, and draws a different sample each run.
    """
    order = range(len(texts))
    if sum(len(t.encode("utf-8")) for t in texts) > _SAMPLE_BYTES:
        order = random.Random(0).sample(order, len(texts))
    budget = _SAMPLE_BYTES
    for i in order:
        for sentence in _cut(texts[i].encode("utf-8"), _SENTENCE_BYTES):
            if len(sentence) > budget:
                return
            budget -= len(sentence)
            yield sentence.decode("utf-8")


def _cut(text: bytes, limit: int) -> Iterator[bytes]:
    """UTF-8 `text` in pieces of at most `limit` bytes, each whole characters.

    A cut falls at the last space that fits, and drops it: the dummy-prefix space sentencepiece
    puts before each sentence stands in for it, so every word is trained on as in the whole text.
    Only a stretch without spaces is cut after its last character that fits.
    """
    start = 0
    while len(text) - start > limit:
        space = text.rfind(b" ", start + 1, start + limit + 1)
        if space != -1:
            yield text[start:space]
            start = space + 1
            continue
        end = start + limit
        while text[end] & 0xC0 == 0x80:  # a continuation byte: inside a character
            end -= 1
        yield text[start:end]
        start = end
    yield text[start:]


# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> how text is split before byte-level BPE.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2, _DIGITS = "gpt2", "digits"  # GPT-2's regex; each digit alone, then GPT-2's regex
_GGUF_PRE = {None: _GPT2, "default": _GPT2, "gpt2": _GPT2, "smollm": _DIGITS,
             "starcoder": _DIGITS, "refact": _DIGITS, "codeshell": _DIGITS,
             "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
             "qwen2": _QWEN2_SPLIT}


def _byte_level_bpe(field, path: str) -> tokenizers.Tokenizer:
    """GPT-2 style BPE from GGUF metadata, built as transformers' GGUF converter builds it.

    One difference: for "smollm" (and llama.cpp's other digit-splitting names) digits are split
    one by one first, as llama.cpp and SmolLM2's own tokenizer.json do; transformers 5.23 ignores
    the name and uses the plain GPT-2 split, which differs on whitespace before digits.
    """
    pre = field("pre")
    if pre not in _GGUF_PRE:
        raise UnsupportedError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported "
                               f"(supported: {sorted(k for k in _GGUF_PRE if k)})")
    tokens = field("tokens")
    types = field("token_type") or [1] * len(tokens)
    byte_char = _bytes_to_unicode()
    spell = set(byte_char.values())
    vocab = {t if set(t) <= spell else "".join(byte_char[b] for b in t.encode()): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in field("merges", [])]
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    split = _GGUF_PRE[pre]
    if split == _GPT2:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif split == _DIGITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # Control tokens (type 3) and user-defined ones (type 4) are matched whole in the text.
    typed = list(zip(tokens, types, strict=True))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, k in typed if k == 3 and set(t) <= spell])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, k in typed if k == 4 and t in vocab])
    return tok


def _sentencepiece_proto(field, special_ids: dict[str, int | None]) -> bytes:
    """A Llama-style BPE sentencepiece model from GGUF metadata (pieces, scores, piece types)."""
    tokens = field("tokens")
    scores = field("scores") or [0.0] * len(tokens)
    types = field("token_type") or [1] * len(tokens)  # GGUF and sentencepiece share type numbers
    proto = sentencepiece_model_pb2.ModelProto()
    for t, s, k in zip(tokens, scores, types, strict=True):
        proto.pieces.add(piece=t, score=s, type=k if k in (1, 2, 3, 4, 5, 6) else 1)
    spec = proto.trainer_spec
    spec.model_type, spec.vocab_size = spec.BPE, len(tokens)
    spec.byte_fallback = 6 in types
    for name in ("unk", "bos", "eos"):  # sentencepiece finds its special tokens by piece name
        i = special_ids[f"{name}_id"]
        setattr(spec, f"{name}_id", -1 if i is None else i)
        if i is not None:
            setattr(spec, f"{name}_piece", tokens[i])
    norm = proto.normalizer_spec
    norm.name, norm.remove_extra_whitespaces = "identity", False
    norm.add_dummy_prefix = bool(field("add_space_prefix", True))
    return proto.SerializeToString()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def _place_thought_ids(found: tuple[int | None, ...], own: int, rows: int,
                       added: dict[str, int] | None, token_id, source: str) -> tuple[int, int]:
    """Thought ids: where the vocabulary has them, else as added_tokens.json says, else after it.

    The base vocabulary ends after the tokenizer's `own` tokens, or after the model's embedding
    `rows` where these are more. So on a padded matrix (Qwen: 151936 rows for ~151665 tokens) the
    thought tokens go after the matrix, at ids 151936/151937, as on Llama and Mistral: the matrix
    grows by two rows, and the padded rows stay unused. added_tokens.json may also place them
    right after the tokenizer's own tokens (the authors' checkpoint, read with its grown
    matrix). Its other entries must already be in the vocabulary at the ids it gives.
    """
    added = dict(added or {})
    wanted = tuple(added.pop(t, None) for t in THOUGHT_TOKENS)
    for token, i in added.items():
        if token_id(token) != i:
            raise DataError(f"{source}: added token {token!r} (id {i}) is not in the vocabulary; "
                            "only the thought tokens can be added")
    if None in wanted and wanted != (None, None):
        raise DataError(f"{source}: added_tokens.json gives only one of the thought tokens")
    if None not in found:
        if None not in wanted and wanted != found:
            raise DataError(f"{source}: added_tokens.json gives thought ids {wanted}, "
                            f"the vocabulary has them at {found}")
        return found
    if found != (None, None):
        raise DataError(f"{source}: the vocabulary has only one of the thought tokens")
    base = max(own, rows)
    ids = wanted if None not in wanted else (base, base + 1)
    if sorted(ids) not in ([own, own + 1], [base, base + 1]):
        rows_too = f" or after the {rows} embedding rows" if rows > own else ""
        raise DataError(f"{source}: thought-token ids {ids} must be the two ids after the "
                        f"vocabulary ({own} and {own + 1}, either order){rows_too}")
    return ids


def _read_added_tokens(path: str) -> dict[str, int] | None:
    """added_tokens.json ({token: id}) if the file exists."""
    if not os.path.isfile(path):
        return None
    content = read_json(path)
    if not isinstance(content, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in content.items()):
        raise DataError(f"{path}: expected a JSON object mapping token strings to integer ids")
    return content


def _read_special_names(directory: str) -> dict[str, str]:
    """bos/eos/pad/unk token strings from tokenizer_config.json, else special_tokens_map.json."""
    names = dict.fromkeys(("bos", "eos", "pad", "unk"))
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(directory, file)
        content = read_json(path) if os.path.isfile(path) else {}
        for name in ("bos", "eos", "pad", "unk"):
            value = content.get(f"{name}_token")
            if isinstance(value, dict):  # older files: {"content": "<s>", ...}
                value = value.get("content")
            if isinstance(value, str) and names[name] is None:
                names[name] = value
    return {n: t for n, t in names.items() if t is not None}


def _check_text(text: str) -> str:
    """The text itself, after checking that it is a str that can be written as UTF-8."""
    if not isinstance(text, str):
        raise TypeError(f"expected text as str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"text is not valid Unicode at position {e.start}: {e.reason}") from e
    return text


def token_pieces(tokenizer: Tokenizer, context: Sequence[int], ids: Sequence[int]) -> list[str]:
    """The text each of `ids` adds after `context`, decoded in place (leading spaces kept).

    A token that ends inside a multi-byte character adds "" and the one completing it the whole
    character, so the pieces always join to the decoded text.
    """
    pieces, stable = [], tokenizer.decode(list(context))
    for i in range(len(ids)):
        text = tokenizer.decode([*context, *ids[:i + 1]])
        if text.endswith("\ufffd") or not text.startswith(stable):
            pieces.append("")  # an incomplete character: wait for the rest
            continue
        pieces.append(text[len(stable):])
        stable = text
    if pieces:
        pieces[-1] += tokenizer.decode([*context, *ids])[len(stable):]  # a truncated tail
    return pieces
