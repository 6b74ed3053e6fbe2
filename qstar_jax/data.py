"""Training data: documents (files or synthetic word problems) -> token rows in grain batches.

Documents come from local or `gs://` paths (a file, a directory or a glob, read with
`etils.epath`): `.txt` files (each file is one document), `.jsonl` (one JSON object per line, the
text under `text_field`; a line that is not one is an error naming it, `json_files.read_jsonl`) or
`.parquet` (OpenWebMath's layout, a `text_field` column); or from the built-in generators of
arithmetic word problems and of the known-answer task's rows (`known_answer.py`). A hash of each
document's text decides whether it is held out, so the split does not depend on the seed, the
file order or the corpus size.

Training rows are random `seq_len` windows of single documents (a new window each epoch, as in the
Quiet-STaR paper; shorter documents are right-padded with pad_id and masked), or, with `packing`,
documents concatenated (each ends with EOS) and cut into `seq_len` chunks. A batch is
{"tokens": int32 [B_local, L], "mask": bool [B_local, L] (True = real token)}; host i of n gets
rows [i*B/n, (i+1)*B/n) of each global batch, and the iterator's state can be checkpointed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random

import grain
import ml_collections
import numpy as np
import pyarrow.parquet as pq
from absl import logging
from etils import epath

from qstar_jax import json_files, known_answer
from qstar_jax.errors import ConfigError, DataError, PathNotFoundError

SOURCES = ("synthetic", "known_answer", "text", "jsonl", "parquet")
_SUFFIX = {"text": ".txt", "jsonl": ".jsonl", "parquet": ".parquet"}
SYNTHETIC_SEED = 0  # the synthetic corpus is fixed; the training seed only shuffles and crops
# Few threads and a short buffer: each element is cheap, and the CPU also drives the accelerator.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)

Batch = dict[str, np.ndarray]


def default_config() -> ml_collections.ConfigDict:
    """The `data` section of a run config, with the synthetic corpus selected."""
    return ml_collections.ConfigDict(dict(
        source="synthetic",  # one of SOURCES
        path="",  # file, directory or glob (local or gs://); unused for "synthetic"
        text_field="text",  # JSONL key / Parquet column holding the document
        max_documents=0,  # read at most this many documents (0: all)
        num_synthetic=2000,  # word problems generated for "synthetic"
        heldout_fraction=0.05,  # share of documents held out for evaluation
        packing=False,  # pack documents into full rows instead of one random crop per row
    ))


# ----------------------------------------------------------------------------- reading documents


@dataclasses.dataclass
class Documents:
    """Texts read from a source and how many documents were skipped, and why."""

    texts: list[str]
    undecodable: int = 0  # a .txt file or Parquet value that is not UTF-8 text
    empty: int = 0  # empty or whitespace only


def resolve_paths(path: str, suffix: str) -> list[epath.Path]:
    """The files `path` names: itself, the `*suffix` files directly in a directory, or a glob's."""
    if not path:
        raise ConfigError(f"data.path is empty: name the {suffix} file, directory or glob to read")
    glob_at = min((i for i, c in enumerate(path) if c in "*?["), default=-1)
    if glob_at >= 0:
        cut = path.rfind("/", 0, glob_at) + 1
        files = [f for f in epath.Path(path[:cut] or ".").glob(path[cut:]) if f.is_file()]
    elif (p := epath.Path(path)).is_dir():
        files = [f for f in p.glob(f"*{suffix}") if f.is_file()]  # not recursive: cheap on GCS
    elif p.exists():
        files = [p]
    else:
        raise PathNotFoundError(f"data path {path!r} does not exist")
    if not files:
        raise DataError(f"data path {path!r} matches no {suffix} files")
    return sorted(files, key=str)


def read_documents(source: str, path: str, text_field: str = "text",
                   max_documents: int = 0) -> Documents:
    """All usable documents of a "text", "jsonl" or "parquet" source, in file order."""
    if source not in _SUFFIX:
        raise ConfigError(f"data.source={source!r} is not a file source (one of {list(_SUFFIX)})")
    for other, suffix in _SUFFIX.items():
        if other != source and path.endswith(suffix):
            raise ConfigError(f"data.path={path!r} ends in {suffix} but data.source={source}: "
                              f"set --config.data.source={other}")
    docs = Documents([])
    limit = max_documents or float("inf")

    def add(value) -> None:
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                value = None
        if isinstance(value, str):
            try:
                value.encode("utf-8")  # JSON escapes can hold lone surrogates
            except UnicodeEncodeError:
                value = None
        if value is None or not isinstance(value, str):
            docs.undecodable += 1
        elif not value.strip():
            docs.empty += 1
        else:
            docs.texts.append(value)

    for file in resolve_paths(path, _SUFFIX[source]):
        if len(docs.texts) >= limit:
            break
        if source == "text":
            add(file.read_bytes())
        elif source == "jsonl":
            for where, record in json_files.read_jsonl(file):
                if len(docs.texts) >= limit:
                    break
                add(_jsonl_text(record, text_field, where))
        else:
            with file.open("rb") as f:
                table = pq.ParquetFile(f)
                if text_field not in table.schema_arrow.names:
                    raise DataError(f"{file}: no column {text_field!r} (data.text_field); "
                                    f"columns: {table.schema_arrow.names}")
                for batch in table.iter_batches(columns=[text_field], batch_size=1024):
                    for value in batch.column(0).to_pylist():
                        if len(docs.texts) < limit:
                            add("" if value is None else value)
    return docs


def _jsonl_text(record: dict, text_field: str, where: str) -> str:
    """The text of one JSONL record ("" for null: an empty document)."""
    if text_field not in record:
        raise DataError(f"{where}: no {text_field!r} field (data.text_field)")
    value = "" if record[text_field] is None else record[text_field]
    if not isinstance(value, str):
        raise DataError(f"{where}: {text_field!r} is not a string (got {type(value).__name__})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: {text_field!r} is not valid Unicode ({e.reason} at "
                        f"character {e.start + 1})") from None
    return value


def load_documents(config: ml_collections.ConfigDict) -> list[str]:
    """The documents `config` (a `data` section) names; logs what was skipped."""
    if config.source not in SOURCES:
        raise ConfigError(f"data.source={config.source!r}: expected one of {list(SOURCES)}")
    if config.source == "synthetic":
        if config.num_synthetic < 1:
            raise ConfigError(f"data.num_synthetic={config.num_synthetic}: must be >= 1")
        return word_problems(config.num_synthetic, SYNTHETIC_SEED)
    docs = read_documents(config.source, config.path, config.text_field, config.max_documents)
    if not docs.texts:
        raise DataError(f"data path {config.path!r} holds no usable {config.source} documents "
                        f"({docs.undecodable} undecodable, {docs.empty} empty)")
    log = logging.warning if docs.undecodable or docs.empty else logging.info
    log("data: %d documents from %s (skipped %d undecodable, %d empty)", len(docs.texts),
        config.path, docs.undecodable, docs.empty)
    return docs.texts


def _text_hash(text: str) -> int:
    """A stable 64-bit hash of a document's text."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def is_heldout(text: str, fraction: float) -> bool:
    """Whether a document is held out: its text's hash is in the first `fraction` of the range."""
    return _text_hash(text) < fraction * 2**64


def load_splits(config: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents), disjoint by content."""
    if not 0.0 <= config.heldout_fraction < 1.0:
        raise ConfigError(f"data.heldout_fraction={config.heldout_fraction}: must be in [0, 1)")
    held = lambda text: is_heldout(text, config.heldout_fraction)  # noqa: E731
    if config.source == "known_answer":  # held out by problem, never seen worked
        train, heldout = known_answer.splits(config, held)
    else:
        train, heldout = [], []
        for text in load_documents(config):
            (heldout if held(text) else train).append(text)
    if not train:
        why = (_one_document(config) if len(heldout) == 1 else
               f"all {len(heldout)} documents are held out at data.heldout_fraction="
               f"{config.heldout_fraction}: lower it, or give more documents")
        raise DataError(f"data: no training documents: {why}")
    return train, heldout


def _one_document(config: ml_collections.ConfigDict) -> str:
    """Why a split is empty when the source gives one document, and what to do."""
    if config.source == "text":
        return (f"data.path={config.path!r} gives one .txt file, which is one document, and a "
                "document goes whole to training or to the held-out split: point data.path at a "
                "directory of .txt files (one document each), or at a .jsonl file of documents "
                "with --config.data.source=jsonl")
    where = (f"data.path={config.path!r}" if config.source in _SUFFIX else
             f"data.num_synthetic={config.num_synthetic}")
    return (f"{where} gives one {config.source} document, and a document goes whole to training "
            "or to the held-out split: give more documents")


def _no_heldout(config: ml_collections.ConfigDict, train: list[str]) -> DataError:
    """The error for an empty held-out split: why, and the heldout_fraction that would do."""
    fraction = config.heldout_fraction
    if fraction == 0:
        why = (f"data.heldout_fraction={fraction} holds none out, and evaluation needs some: set "
               f"it above 0 (the default is {default_config().heldout_fraction})")
    elif len(train) == 1:
        why = _one_document(config)
    elif config.source == "known_answer":  # its split hashes the problems, not the rows
        why = (f"none of the {len(train)} problems falls in data.heldout_fraction={fraction}: "
               "raise it or data.num_synthetic")
    else:
        what = {"text": ".txt files (one document each)",
                "synthetic": "word problems (data.num_synthetic)"}.get(config.source, "documents")
        least = math.ceil(min(map(_text_hash, train)) / 2**64 * 1000) / 1000
        why = (f"a document is held out where a hash of its text falls in the first "
               f"data.heldout_fraction={fraction} of its range, and none of these {len(train)} "
               f"{what} does ({len(train) * fraction:.2g} expected): set "
               f"--config.data.heldout_fraction={least} or more, or give more documents")
    return DataError(f"data: no held-out documents: {why}")


# ----------------------------------------------------------------------------- synthetic problems


_NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farah", "Gus", "Hana", "Ivan", "Jade", "Kofi",
          "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tess")
_ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards")


def word_problems(n: int, seed: int = 0) -> list[str]:
    """`n` GSM8K-style problems: question, worked solution with the arithmetic, "#### answer".

    Deterministic in (`n`, `seed`); the first k problems do not depend on `n`.
    """
    rng = random.Random(seed)
    return [_word_problem(rng) for _ in range(n)]


def _word_problem(rng: random.Random) -> str:
    name, friend = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    value = rng.randint(5, 60)
    question, steps = [f"{name} has {value} {item}."], []
    for _ in range(rng.randint(2, 4)):
        kind = rng.choice(("buy", "give", "boxes", "double", "share"))
        divisors = [d for d in range(2, 6) if value % d == 0]
        if kind == "give" and value > 1:
            b = rng.randint(1, value - 1)
            question.append(f"{name} gives {b} {item} to {friend}.")
            steps.append(f"After giving {b} away, {name} has {value} - {b} = {value - b} {item}.")
            value -= b
        elif kind == "boxes":
            boxes, each = rng.randint(2, 6), rng.randint(2, 12)
            question.append(f"Then {name} gets {boxes} boxes with {each} {item} in each box.")
            steps.append(f"The boxes hold {boxes} * {each} = {boxes * each} {item}.")
            steps.append(f"So {name} has {value} + {boxes * each} = {value + boxes * each} {item}.")
            value += boxes * each
        elif kind == "double":
            question.append(f"{friend} doubles the number of {item} that {name} has.")
            steps.append(f"Doubling gives {value} * 2 = {value * 2} {item}.")
            value *= 2
        elif kind == "share" and divisors:
            d = rng.choice(divisors)
            question.append(f"{name} splits the {item} equally into {d} bags and keeps one bag.")
            steps.append(f"One bag holds {value} / {d} = {value // d} {item}.")
            value //= d
        else:  # "buy", or a step that does not apply to the current number
            b = rng.randint(2, 30)
            question.append(f"{name} buys {b} more {item}.")
            steps.append(f"After buying {b} more, {name} has {value} + {b} = {value + b} {item}.")
            value += b
    question.append(f"How many {item} does {name} have now?")
    return "Question: " + " ".join(question) + "\nAnswer: " + "\n".join(steps) + f"\n#### {value}"


# ----------------------------------------------------------------------------- tokens and batches


def document_tokens(tokenizer, text: str) -> np.ndarray:
    """int32 ids of one document: BOS (when the tokenizer has one), the text, EOS."""
    if tokenizer.eos_id is None:
        raise DataError("data: the tokenizer has no EOS token to end documents with")
    ids = tokenizer.encode(text, add_bos=tokenizer.bos_id is not None)
    return np.asarray([*ids, tokenizer.eos_id], np.int32)


def crop(document_ids: np.ndarray, seq_len: int, pad_id: int, start: int = 0) -> Batch:
    """The window [start, start + seq_len) of a document, right-padded with pad_id and masked."""
    window = document_ids[start:start + seq_len]
    tokens_L = np.full(seq_len, pad_id, np.int32)
    tokens_L[:len(window)] = window
    return {"tokens": tokens_L, "mask": np.arange(seq_len) < len(window)}


def _host_rows(global_batch: int, process_index: int, process_count: int) -> int:
    """Rows per host, after checking the split is possible."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"data: process_index={process_index} is not in [0, {process_count})")
    if global_batch < 1 or global_batch % process_count:
        raise ConfigError(f"data: global batch {global_batch} does not split evenly over "
                          f"{process_count} hosts")
    return global_batch // process_count


def make_dataset(config: ml_collections.ConfigDict, tokenizer, *, seq_len: int,
                 global_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this host's training batches (see module doc)."""
    if seq_len < 1:
        raise ConfigError(f"data: seq_len={seq_len} must be >= 1")
    rows = _host_rows(global_batch, process_index, process_count)
    train, _ = load_splits(config)
    docs = grain.MapDataset.source(train).shuffle(seed=seed).repeat()  # reshuffled every epoch
    pad_id = tokenizer.pad_id
    if not config.packing:
        def random_crop(text: str, rng: np.random.Generator) -> Batch:
            document_ids = document_tokens(tokenizer, text)
            start = rng.integers(max(len(document_ids) - seq_len, 0) + 1)
            return crop(document_ids, seq_len, pad_id, start)

        # Chunk c of `rows` rows is host (c % n)'s share of global batch c // n.
        crops = docs.random_map(random_crop, seed=seed).batch(rows)
        return iter(crops[process_index::process_count].to_iter_dataset(_READ_OPTIONS))

    def packed_row(row: Batch) -> Batch:
        mask_L = row["tokens_segment_ids"] > 0
        return {"tokens": np.where(mask_L, row["tokens"], pad_id).astype(np.int32), "mask": mask_L}

    lo = process_index * rows
    # Every host packs the whole global batch (packing is sequential) and keeps its rows.
    packed = grain.experimental.ConcatThenSplitIterDataset(
        docs.map(lambda text: {"tokens": document_tokens(tokenizer, text)})
        .to_iter_dataset(_READ_OPTIONS), length_struct={"tokens": seq_len})
    batches = packed.map(packed_row).batch(global_batch)
    return iter(batches.map(lambda b: {k: v[lo:lo + rows] for k, v in b.items()}))


def heldout_batches(config: ml_collections.ConfigDict, tokenizer, *, seq_len: int,
                    global_batch: int, num_batches: int | None = None, process_index: int = 0,
                    process_count: int = 1) -> list[Batch]:
    """This host's rows of fixed evaluation batches: the first window of each held-out document.

    One pass over the held-out split (at most `num_batches` batches); the last batch is filled up
    with fully masked rows so every batch has the same shape.
    """
    rows = _host_rows(global_batch, process_index, process_count)
    train, heldout = load_splits(config)
    if not heldout:
        raise _no_heldout(config, train)
    if num_batches is not None and num_batches < 1:
        raise ConfigError(f"data: num_batches={num_batches} must be >= 1")
    count = -(-len(heldout) // global_batch)
    count = count if num_batches is None else min(count, num_batches)
    batches = []
    for b in range(count):
        start = b * global_batch + process_index * rows
        docs = [document_tokens(tokenizer, t) for t in heldout[start:start + rows]]
        docs += [np.zeros(0, np.int32)] * (rows - len(docs))  # fully masked filler rows
        crops = [crop(document_ids, seq_len, tokenizer.pad_id) for document_ids in docs]
        batches.append({k: np.stack([c[k] for c in crops]) for k in ("tokens", "mask")})
    return batches
