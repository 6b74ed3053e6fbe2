"""qstar_jax.data: reading sources, word problems, crops, packing, host shards, checkpointed state.

References are written here: a byte-level stand-in tokenizer, documents found again inside the
token rows by plain search, and word problems re-solved from their question text.
"""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qstar_jax import data, errors

BOS, EOS = 1, 2


class ByteTokenizer:
    """Stand-in tokenizer: byte b -> id b + 3; BOS 1, EOS 2, pad falls back to EOS."""

    bos_id, eos_id, pad_id = BOS, EOS, EOS

    def encode(self, text, add_bos=False):
        return [BOS] * add_bos + [b + 3 for b in text.encode("utf-8")]


def doc_ids(text):
    return [BOS] + [b + 3 for b in text.encode("utf-8")] + [EOS]


def config(**overrides):
    cfg = data.default_config()
    cfg.update(overrides)
    return cfg


def contains(haystack, needle):
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() == {"tokens", "mask"}
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture
def corpus(tmp_path):
    """A JSONL corpus of 40 documents of lengths 5 .. 200 characters, all distinct."""
    rng = np.random.default_rng(0)
    texts = [f"doc{i}:" + "".join(rng.choice(list("abcdefgh "), size=int(n)))
             for i, n in enumerate(rng.integers(1, 195, size=40))]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path), texts


# ----------------------------------------------------------------------------- word problems


def solve(question):
    """Re-solve a generated question from its sentences, independently of the generator."""
    value = None
    for sentence in re.findall(r"[^.?]+[.?]", question):
        s = sentence.strip()
        if m := re.fullmatch(r"\w+ has (\d+) \w+\.", s):
            value = int(m[1])
        elif m := re.fullmatch(r"\w+ buys (\d+) more \w+\.", s):
            value += int(m[1])
        elif m := re.fullmatch(r"\w+ gives (\d+) \w+ to \w+\.", s):
            value -= int(m[1])
        elif m := re.fullmatch(r"Then \w+ gets (\d+) boxes with (\d+) \w+ in each box\.", s):
            value += int(m[1]) * int(m[2])
        elif re.fullmatch(r"\w+ doubles the number of \w+ that \w+ has\.", s):
            value *= 2
        elif m := re.fullmatch(r"\w+ splits the \w+ equally into (\d+) bags and keeps one bag\.",
                               s):
            assert value % int(m[1]) == 0
            value //= int(m[1])
        else:
            assert s.startswith("How many"), s
    return value


def test_word_problems_are_correct_and_deterministic():
    problems = data.word_problems(300, seed=7)
    assert problems == data.word_problems(300, seed=7)
    assert problems[:50] == data.word_problems(50, seed=7)
    assert problems != data.word_problems(300, seed=8)
    assert len(set(problems)) > 290
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
           "/": lambda a, b: a / b}
    for text in problems:
        question, rest = text.split("\nAnswer: ")
        solution, answer = rest.split("\n#### ")
        equations = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", solution)
        assert len(equations) >= 2
        for a, op, b, c in equations:
            assert ops[op](int(a), int(b)) == int(c), (text, a, op, b, c)
        assert int(answer) == int(equations[-1][3]) == solve(question.removeprefix("Question: "))
        assert int(answer) > 0


# ----------------------------------------------------------------------------- reading sources


def test_text_files_directory_glob_and_skipped_documents(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first document\n\nstill the first")
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "sub" / "c.txt").write_text("nested")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    (tmp_path / "other.md").write_text("not a .txt file")
    docs = data.read_documents("text", str(tmp_path))
    assert docs.texts == ["first document\n\nstill the first", "second"]
    assert (docs.undecodable, docs.empty) == (1, 1)
    assert data.read_documents("text", str(tmp_path / "b.txt")).texts == ["second"]
    assert data.read_documents("text", f"{tmp_path}/s*/*.txt").texts == ["nested"]
    assert data.read_documents("text", f"{tmp_path}/*.md").texts == ["not a .txt file"]
    assert data.read_documents("text", str(tmp_path), max_documents=1).texts == [docs.texts[0]]


def test_missing_unmatched_and_unusable_paths_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="nowhere.*does not exist"):
        data.read_documents("text", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"\*\.jsonl.*matches no"):
        data.read_documents("jsonl", f"{tmp_path}/*.jsonl")
    with pytest.raises(ValueError, match="matches no .parquet"):
        data.read_documents("parquet", str(tmp_path))
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=f"{tmp_path}.*no usable text documents"):
        data.load_documents(config(source="text", path=str(tmp_path)))
    with pytest.raises(ValueError, match="data.source='csv'"):
        data.load_documents(config(source="csv"))


def test_jsonl_source(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"body": "one", "text": "x"}).encode(), b"",
             json.dumps({"body": ""}).encode(), json.dumps({"body": None}).encode(),
             json.dumps({"body": "two\nlines"}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    docs = data.read_documents("jsonl", str(path), text_field="body")
    assert docs.texts == ["one", "two\nlines"]
    assert (docs.undecodable, docs.empty) == (0, 2)
    with pytest.raises(ValueError, match=r"d\.jsonl:1: no 'content' field"):
        data.read_documents("jsonl", str(path), text_field="content")


@pytest.mark.parametrize("line, message", [
    (b"{not json", "not valid JSON (Expecting property name enclosed in double quotes at "
                   "column 2)"),
    (b'{"body": "caf\xe9"}', "not UTF-8 text (invalid byte at column 14); the file must be JSONL"),
    (b'["body"]', "expected a JSON object, got list"),
    (json.dumps({"body": 3}).encode(), "'body' is not a string (got int)"),
    (json.dumps({"body": "\ud800"}).encode(), "'body' is not valid Unicode (surrogates not allowed "
                                               "at character 1)"),
])
def test_a_bad_jsonl_line_is_an_error_naming_it(tmp_path, line, message):
    """As evaluate's task files: a corpus is not read with lines silently dropped."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps({"body": "one"}).encode() + b"\n\n" + line + b"\n")
    with pytest.raises(errors.DataError) as e:
        data.read_documents("jsonl", str(path), text_field="body")
    assert str(e.value) == f"{path}:3: {message}"


def test_parquet_source(tmp_path):
    pq.write_table(pa.table({"text": ["alpha", None, "", "beta"], "id": [1, 2, 3, 4]}),
                   tmp_path / "train-0.parquet")
    pq.write_table(pa.table({"text": pa.array([b"gamma", b"\xff"], pa.binary()), "id": [5, 6]}),
                   tmp_path / "train-1.parquet")
    docs = data.read_documents("parquet", f"{tmp_path}/train-*.parquet")
    assert docs.texts == ["alpha", "beta", "gamma"]
    assert (docs.undecodable, docs.empty) == (1, 2)
    with pytest.raises(ValueError, match=r"train-0\.parquet: no column 'content'.*'id'"):
        data.read_documents("parquet", str(tmp_path), text_field="content")


# ----------------------------------------------------------------------------- batches


def test_crops_are_windows_of_documents(corpus):
    path, texts = corpus
    cfg = config(source="jsonl", path=path, heldout_fraction=0.0)
    it = data.make_dataset(cfg, ByteTokenizer(), seq_len=64, global_batch=4, seed=3)
    docs = {t: doc_ids(t) for t in texts}
    seen = set()
    for batch in take(it, 30):  # three epochs of 40 documents
        assert batch["tokens"].dtype == np.int32 and batch["mask"].dtype == bool
        assert batch["tokens"].shape == batch["mask"].shape == (4, 64)
        for tokens, mask in zip(batch["tokens"].tolist(), batch["mask"].tolist(), strict=True):
            n = sum(mask)
            assert mask == [True] * n + [False] * (64 - n)
            assert tokens[n:] == [EOS] * (64 - n)
            owners = [t for t, ids in docs.items() if contains(ids, tokens[:n])]
            assert len(owners) == 1
            ids = docs[owners[0]]
            assert n == min(64, len(ids))
            seen.add((owners[0], next(i for i in range(len(ids)) if ids[i:i + n] == tokens[:n])))
    long_docs = [t for t in texts if len(doc_ids(t)) > 80]
    starts = {s for t, s in seen if t == long_docs[0]}
    assert len(starts) >= 2  # a new random window each epoch
    assert {t for t, _ in seen} == set(texts)


def test_crops_without_bos_token(corpus):
    path, texts = corpus

    class NoBos(ByteTokenizer):
        bos_id = None

        def encode(self, text, add_bos=False):
            assert not add_bos
            return super().encode(text)

    batch = next(data.make_dataset(config(source="jsonl", path=path, heldout_fraction=0.0),
                                   NoBos(), seq_len=400, global_batch=40, seed=0))
    rows = {tuple(t[m]) for t, m in zip(batch["tokens"], batch["mask"], strict=True)}
    assert rows == {tuple(doc_ids(t)[1:]) for t in texts}  # one epoch, each document whole


def test_seeded_shuffle(corpus):
    path, _ = corpus
    cfg = config(source="jsonl", path=path)
    run = lambda seed: take(data.make_dataset(  # noqa: E731
        cfg, ByteTokenizer(), seq_len=32, global_batch=4, seed=seed), 3)
    assert_batches_equal(run(5), run(5))
    assert not np.array_equal(run(5)[0]["tokens"], run(6)[0]["tokens"])


def test_packing_concatenates_whole_documents(corpus):
    path, texts = corpus
    cfg = config(source="jsonl", path=path, heldout_fraction=0.0, packing=True)
    it = data.make_dataset(cfg, ByteTokenizer(), seq_len=48, global_batch=2, seed=1)
    stream = []
    while len(stream) < sum(len(doc_ids(t)) for t in texts) + 48:
        batch = next(it)
        assert batch["mask"].all() and batch["tokens"].shape == (2, 48)
        stream += batch["tokens"].reshape(-1).tolist()
    docs, current = [], []
    for token in stream:
        current.append(token)
        if token == EOS:
            docs.append(current)
            current = []
    first_epoch = docs[:len(texts)]
    assert sorted(first_epoch) == sorted(doc_ids(t) for t in texts)
    assert first_epoch != [doc_ids(t) for t in texts]  # shuffled


@pytest.mark.parametrize("packing", [False, True])
def test_hosts_split_the_global_batch(corpus, packing):
    path, _ = corpus
    cfg = config(source="jsonl", path=path, packing=packing)
    kw = dict(seq_len=24, global_batch=8, seed=11)
    whole = take(data.make_dataset(cfg, ByteTokenizer(), **kw), 12)
    for n in (2, 4):
        hosts = [take(data.make_dataset(cfg, ByteTokenizer(), process_index=i, process_count=n,
                                        **kw), 12) for i in range(n)]
        for step, batch in enumerate(whole):
            for k in ("tokens", "mask"):
                parts = [h[step][k] for h in hosts]
                assert all(p.shape == (8 // n, 24) for p in parts)
                np.testing.assert_array_equal(np.concatenate(parts), batch[k])
    with pytest.raises(ValueError, match="global batch 8 does not split evenly over 3 hosts"):
        data.make_dataset(cfg, ByteTokenizer(), process_count=3, **kw)


@pytest.mark.parametrize("packing", [False, True])
def test_restored_state_reproduces_the_following_batches(corpus, packing):
    path, _ = corpus
    cfg = config(source="jsonl", path=path, packing=packing)
    make = lambda: data.make_dataset(  # noqa: E731
        cfg, ByteTokenizer(), seq_len=40, global_batch=4, seed=2, process_index=1,
        process_count=2)
    it = make()
    take(it, 13)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = take(it, 6)
    restored = make()
    take(restored, 2)
    restored.set_state(state)
    assert_batches_equal(take(restored, 6), expected)


def test_heldout_split_and_batches(corpus):
    path, texts = corpus
    cfg = config(source="jsonl", path=path, heldout_fraction=0.3)
    train, heldout = data.load_splits(cfg)
    assert sorted(train + heldout) == sorted(texts)
    assert not set(train) & set(heldout) and 4 <= len(heldout) <= 24
    batches = data.heldout_batches(cfg, ByteTokenizer(), seq_len=32, global_batch=4)
    assert len(batches) == -(-len(heldout) // 4)
    rows = [(t, m) for b in batches
            for t, m in zip(b["tokens"].tolist(), b["mask"].tolist(), strict=True)]
    for i, (tokens, mask) in enumerate(rows):
        ids = doc_ids(heldout[i])[:32] if i < len(heldout) else []
        assert tokens == ids + [EOS] * (32 - len(ids))
        assert mask == [True] * len(ids) + [False] * (32 - len(ids))
    host = data.heldout_batches(cfg, ByteTokenizer(), seq_len=32, global_batch=4, num_batches=2,
                                process_index=1, process_count=2)
    assert len(host) == 2
    for b, mine in zip(batches[:2], host, strict=True):
        np.testing.assert_array_equal(mine["tokens"], b["tokens"][2:])
    trained = {tuple(t[m]) for b in take(data.make_dataset(
        cfg, ByteTokenizer(), seq_len=400, global_batch=len(train), seed=0), 1)
        for t, m in zip(b["tokens"], b["mask"], strict=True)}
    assert trained == {tuple(doc_ids(t)) for t in train}
    with pytest.raises(ValueError, match="no held-out documents"):
        data.heldout_batches(config(source="jsonl", path=path, heldout_fraction=0.0),
                             ByteTokenizer(), seq_len=32, global_batch=4)



def heldout_error(**overrides):
    """The message of the error heldout_batches (the train command's call) raises for a config."""
    with pytest.raises(errors.InputError) as caught:
        data.heldout_batches(config(**overrides), ByteTokenizer(), seq_len=32, global_batch=4)
    return str(caught.value)


@pytest.mark.parametrize("fraction", [0.05, 0.99])
def test_one_text_file_is_one_document_and_the_error_says_so(tmp_path, fraction):
    book = tmp_path / "book.txt"
    book.write_text("Chapter one.\n" + "It was a long book.\n" * 200)
    message = heldout_error(source="text", path=str(book), heldout_fraction=fraction)
    # The one document went to training (no held-out split) or to held-out (no training split).
    split = "training" if data.is_heldout(book.read_text(), fraction) else "held-out"
    assert message.startswith(f"data: no {split} documents: data.path='{book}' gives one .txt "
                              "file, which is one document")
    assert "a directory of .txt files" in message and "--config.data.source=jsonl" in message


def test_a_jsonl_path_with_the_text_source_names_the_source_to_set(corpus):
    path, _ = corpus
    message = heldout_error(source="text", path=path)
    assert message == (f"data.path={path!r} ends in .jsonl but data.source=text: "
                       "set --config.data.source=jsonl")


def test_too_few_documents_to_hold_one_out_gives_a_fraction_that_does(tmp_path):
    texts = [t for t in (f"note {i}: short text" for i in range(40))
             if not data.is_heldout(t, 0.05)][:5]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text)
    message = heldout_error(source="text", path=str(tmp_path))
    assert "none of these 5 .txt files (one document each) does (0.25 expected)" in message
    suggested = float(re.search(r"heldout_fraction=([\d.]+) or more", message)[1])
    train, heldout = data.load_splits(config(source="text", path=str(tmp_path),
                                             heldout_fraction=suggested))
    assert heldout and train  # the suggestion works and leaves training documents
    assert "data.heldout_fraction=0.0 holds none out" in heldout_error(
        source="text", path=str(tmp_path), heldout_fraction=0.0)

def test_synthetic_source_with_the_sentencepiece_tokenizer(tmp_path):
    from qstar_jax import tokenizer as tokenizer_lib

    problems = data.word_problems(200, data.SYNTHETIC_SEED)
    tok = tokenizer_lib.train_sentencepiece(problems, 400, str(tmp_path))
    cfg = config(num_synthetic=200)
    batch = next(data.make_dataset(cfg, tok, seq_len=512, global_batch=8, seed=0))
    for tokens, mask in zip(batch["tokens"], batch["mask"], strict=True):
        ids = tokens[mask].tolist()
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids) in problems
