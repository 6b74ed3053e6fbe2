"""Zero-shot evaluation: data files in the public layouts, the paper's renormalised answer
probability against a plain per-example reference, chain-of-thought voting and the CLI."""

import functools
import json
import os

import jax
import numpy as np
import pytest
import sentencepiece as spm
from test_generate import save_tiny_checkpoint

from qstar_jax import evaluate as ev
from qstar_jax import generate, loading
from qstar_jax.model import Transformer
from qstar_jax.rollout import rollout

GSM8K = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A farm sells 1,000 eggs a day for 2 days. How many eggs?",
     "answer": "1,000 * 2 = 2,000\n#### 2,000"},
    {"question": "What is 6 times 9?", "answer": "#### 54"},
]
CSQA_ORIGINAL = {"answerKey": "C", "id": "x1", "question": {
    "question_concept": "cat", "stem": "Where does a cat sleep?",
    "choices": [{"label": lb, "text": t} for lb, t in zip("ABCDE", [
        "ocean", "sky", "mat", "river", "tree"], strict=True)]}}
CSQA_FLAT = {"id": "x1", "question": "Where does a cat sleep?", "question_concept": "cat",
             "choices": {"label": list("ABCDE"), "text": ["ocean", "sky", "mat", "river", "tree"]},
             "answerKey": "C"}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "ckpt"
    save_tiny_checkpoint(path, greedy_thoughts=True)
    return str(path)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return loading.load_checkpoint(checkpoint)


def test_read_gsm8k_and_both_csqa_layouts(tmp_path):
    got = ev.read_examples(write_jsonl(tmp_path / "g.jsonl", GSM8K + [""]), "gsm8k")
    assert [e.answer for e in got] == ["7", "2,000", "54"]
    assert got[1].question == GSM8K[1]["question"]
    assert ev.read_examples(write_jsonl(tmp_path / "g2.jsonl", GSM8K), "gsm8k", limit=2) == got[:2]
    original = ev.read_examples(write_jsonl(tmp_path / "o.jsonl", [CSQA_ORIGINAL]), "csqa")
    flat = ev.read_examples(write_jsonl(tmp_path / "f.jsonl", [CSQA_FLAT]), "csqa")
    assert original == flat
    assert original[0].question == ("Where does a cat sleep?\n(A) ocean\n(B) sky\n(C) mat\n"
                                    "(D) river\n(E) tree")
    assert ev.direct_prompt(original[0]).endswith("(E) tree\nA:")


@pytest.mark.parametrize("task, rows, message", [
    ("gsm8k", [GSM8K[0], "{not json", GSM8K[1]], r"g\.jsonl:2: not valid JSON"),
    ("gsm8k", [GSM8K[0], {"question": "q?", "answer": "no final line"}], r":2: .*#### N"),
    ("gsm8k", [{"answer": "#### 3"}], r":1: 'question' is missing"),
    ("gsm8k", [{"question": "q", "answer": "#### three"}], r":1: .*not a number"),
    ("csqa", [CSQA_FLAT, dict(CSQA_FLAT, answerKey="")], r":2: answerKey '' is not one of"),
    ("csqa", [dict(CSQA_FLAT, choices={"label": ["A"], "text": []})], r":1: 'choices.label'"),
    ("gsm8k", [], r"no examples"),
])
def test_bad_data_files_name_the_line(tmp_path, task, rows, message):
    with pytest.raises(ValueError, match=message):
        ev.read_examples(write_jsonl(tmp_path / "g.jsonl", rows), task)


def test_undecodable_lines_name_the_file_line_and_column(tmp_path):
    broken = tmp_path / "broken.jsonl"  # a raw tab inside a string: JSON's control characters
    broken.write_text(json.dumps(GSM8K[0]) + '\n{"question": "a\tb", "answer": "#### 1"}\n')
    with pytest.raises(ValueError) as e:
        ev.read_examples(str(broken), "gsm8k")
    assert str(e.value) == f"{broken}:2: not valid JSON (Invalid control character at column 16)"
    noise = tmp_path / "noise.jsonl"
    noise.write_bytes(json.dumps(GSM8K[0]).encode() + b"\n\xf3\x80\xff junk\n")
    with pytest.raises(ValueError) as e:
        ev.read_examples(str(noise), "gsm8k")
    assert str(e.value) == (f"{noise}:2: not UTF-8 text (invalid byte at column 1); the file "
                            "must be JSONL")


def test_missing_data_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        ev.read_examples(str(tmp_path / "none.jsonl"), "gsm8k")
    with pytest.raises(ValueError, match="unknown task"):
        ev.read_examples(str(tmp_path / "none.jsonl"), "mmlu")


def symbol_pieces(checkpoint, symbols):
    """Independently, from sentencepiece itself: each symbol's piece, or its byte-fallback piece
    where the vocabulary has none (this one has no "▁5" or "▁C" pieces)."""
    sp = spm.SentencePieceProcessor(model_file=os.path.join(checkpoint, "tokenizer.model"))

    def piece(c):
        i = sp.piece_to_id(c)
        return i if i != sp.unk_id() else sp.piece_to_id(f"<0x{ord(c):02X}>")

    return sorted(piece(c) for c in symbols)


def test_allowed_ids_are_the_symbol_pieces(checkpoint, loaded):
    _, _, tok = loaded
    for task, symbols in (("gsm8k", "0123456789\n"), ("csqa", "ABCDE\n")):
        assert ev.allowed_ids(tok, task).tolist() == symbol_pieces(checkpoint, symbols)


class WholeNumberTokenizer:
    """A stand-in that writes a whole number as one token: digit-level scoring is impossible."""

    bos_id = None

    def encode(self, text, add_bos=False):
        import re
        return [hash(t) % 1000 for t in re.findall(r"\d+|.", text, re.S)]

    def decode(self, ids):
        return "".join({hash(t) % 1000: t for t in ["Q", ":", " ", "?", "\n", "A", "1", "12"] +
                        [str(d) for d in range(10)] + [f"1{d}" for d in range(10)]}[i]
                       for i in ids)


def test_tokenizer_merging_digits_is_refused():
    with pytest.raises(ValueError, match="one token per symbol"):
        ev.allowed_ids(WholeNumberTokenizer(), "gsm8k")


@functools.partial(jax.jit, static_argnums=(0, 1))
def full_logits(cfg, thinking, params, tokens_1L, valid_L):
    """Logits [L, V]: the rollout's evaluation-mode talk logits, or the plain forward's."""
    if thinking:
        out = rollout(params, tokens_1L, valid_L[None], jax.random.key(0),
                      cfg.replace(n_ahead_talk=1, n_passes=1), return_talk_logits=True)
        return out.talk_logits[0, 0, 0]
    return Transformer(cfg.model).apply({"params": params["decoder"]}, tokens_1L,
                                        valid_BL=valid_L[None])[0]


def reference_direct(cfg, params, tok, example, allowed, thinking):
    """Plain reference: full-vocabulary softmax at each answer token, renormalised by hand."""
    prompt = tok.encode(ev.direct_prompt(example), add_bos=True)
    ids = tok.encode(ev.direct_prompt(example) + f" {example.answer}\n", add_bos=True)
    assert ids[:len(prompt)] == prompt
    width = 96  # right padding, which cannot change earlier positions
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :len(ids)] = ids
    logits = np.asarray(full_logits(cfg, thinking, params, tokens, np.arange(width) < len(ids)))
    prob, best = 1.0, True
    for i in range(len(prompt), len(ids)):
        if ids[i] not in allowed:  # the space before the number, the comma inside it
            continue
        p = np.exp(logits[i - 1] - logits[i - 1].max())
        p = p / p.sum()
        prob *= p[ids[i]] / p[allowed].sum()
        best &= int(np.argmax(p[allowed])) == allowed.index(ids[i])
    return prob, best


@pytest.mark.parametrize("task", ["gsm8k", "csqa"])
def test_direct_score_equals_plain_reference(checkpoint, loaded, tmp_path, task):
    cfg, params, tok = loaded
    if task == "gsm8k":
        examples = ev.read_examples(write_jsonl(tmp_path / "g.jsonl", GSM8K), task)
        allowed = symbol_pieces(checkpoint, "0123456789\n")
    else:
        rows = [CSQA_FLAT, dict(CSQA_FLAT, answerKey="A"), dict(CSQA_FLAT, answerKey="E")]
        examples = ev.read_examples(write_jsonl(tmp_path / "c.jsonl", rows), task)
        allowed = symbol_pieces(checkpoint, "ABCDE\n")
    # Batches of two: the third example shares a batch with a padding row.
    got = ev.score_direct(params, cfg, tok, examples, task, batch_size=2)
    for example, result in zip(examples, got, strict=True):
        for name, thinking in (("thinking", True), ("no_thinking", False)):
            prob, best = reference_direct(cfg, params, tok, example, allowed, thinking)
            assert result[name]["prob"] == pytest.approx(prob, rel=1e-4, abs=1e-7)
            assert result[name]["argmax_correct"] == best
    # Mixing is not a no-op in this model: thinking changes the scores.
    assert any(abs(np.log(r["thinking"]["prob"] / r["no_thinking"]["prob"])) > 0.05 for r in got)
    if task == "gsm8k":
        assert [r["answer_tokens"] for r in got] == [2, 5, 3]  # digits + newline, no commas


def test_extract_answer():
    assert ev.extract_answer("gsm8k", " $1,234.50 in total, or 7") == "1234"
    assert ev.extract_answer("gsm8k", " no number") is None
    assert ev.extract_answer("gsm8k", "2,000") == ev.extract_answer("gsm8k", "2000")
    assert ev.extract_answer("csqa", " (C) mat, not A") == "C"
    assert ev.extract_answer("csqa", " Because cats like mats.") is None


def test_cot_prompts_and_majority_vote(monkeypatch):
    """The two prompts of zero-shot chain of thought (Kojima et al.) for each task, and the
    majority vote: the first vote is not the majority, so picking it would be wrong."""
    calls, scripted = [], []

    def fake_generate(params, cfg, tokenizer, prompts, **kwargs):
        calls.append((list(prompts), kwargs))
        return [generate.Generation(t, [], [], "length") for t in scripted[len(calls) - 1]]

    monkeypatch.setattr(generate, "generate", fake_generate)
    scripted[:] = [["First, 3. Then 4.  \n", "I guess", "It is 7"], [" 12", " 7.", " 7 apples"]]
    example = ev.Example("Tom has 3 apples and buys 4 more. How many?", "7")
    got = ev.score_cot(None, None, None, example, "gsm8k", samples=3, thinking=True,
                       temperature=0.9, max_new_tokens=50)
    assert got["votes"] == ["12", "7", "7"]
    assert (got["prediction"], got["correct"]) == ("7", True)
    first, second = calls
    prompt = "Q: Tom has 3 apples and buys 4 more. How many?\nA: Let's think step by step."
    assert first[0] == [prompt] * 3
    assert first[1]["stop"] == ("Q:", "\n\n\n") and first[1]["max_new_tokens"] == 50
    assert first[1]["thinking"] and first[1]["sampling"].temperature == 0.9
    # The rationale's trailing whitespace goes before the answer trigger.
    assert second[0][0] == prompt + "First, 3. Then 4.\nTherefore, the answer (arabic numerals) is"
    assert second[1]["max_new_tokens"] == ev.ANSWER_TOKENS

    calls.clear()
    scripted[:] = [["Cats sit on mats.", "Birds fly.", "Mats are soft."],
                   [" (B) sky", " (C) mat", " C"]]
    question = "Where does a cat sleep?\n(A) ocean\n(B) sky\n(C) mat\n(D) river\n(E) tree"
    got = ev.score_cot(None, None, None, ev.Example(question, "C"), "csqa", samples=3,
                       thinking=False, temperature=0.9, max_new_tokens=50)
    assert (got["votes"], got["prediction"], got["correct"]) == (["B", "C", "C"], "C", True)
    prompt = f"Q: {question}\nA: Let's think step by step."
    assert calls[0][0] == [prompt] * 3
    assert calls[1][0] == [prompt + r + "\nTherefore, among A through E, the answer is"
                           for r in scripted[0]]


def test_cli_direct(checkpoint, tmp_path, capsys):
    data = write_jsonl(tmp_path / "g.jsonl", GSM8K)
    out = tmp_path / "results.jsonl"
    ev.main(["--checkpoint", checkpoint, "--task", "gsm8k", "--data", data, "--limit", "2",
             "--batch_size", "2", "--out", str(out)])
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["examples"] == len(records) == 2
    for name in ("thinking", "no_thinking"):
        want = np.mean([r[name]["prob"] for r in records])
        assert summary[name]["expected_accuracy"] == pytest.approx(want)
        correct = sum(r[name]["argmax_correct"] for r in records)
        assert summary[name]["argmax_correct"] == correct
        assert summary[name]["argmax_accuracy"] == correct / 2
    # The running accuracy: the count alone ("2/2") would read like a perfect score.
    assert captured.err.endswith(
        f"gsm8k direct: 2/2 examples, expected accuracy so far: thinking "
        f"{summary['thinking']['expected_accuracy']:.2f}, no_thinking "
        f"{summary['no_thinking']['expected_accuracy']:.2f}\n")

    ev.main(["--checkpoint", checkpoint, "--task", "gsm8k", "--data", data, "--limit=1",
             "--batch_size", "1", "--nothoughts"])
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "no_thinking" in summary and "thinking" not in summary
    assert captured.err.endswith(f"gsm8k direct: 1/1 examples, expected accuracy so far: "
                                 f"no_thinking {records[0]['no_thinking']['prob']:.2f}\n")


def test_cli_cot(checkpoint, tmp_path, capsys):
    rows = [CSQA_ORIGINAL, dict(CSQA_ORIGINAL, answerKey="A")]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "results.jsonl"
    # Thinking generation has its own tests; here the plain mode keeps compilation short.
    ev.main(["--checkpoint", checkpoint, "--task", "csqa", "--data", data, "--mode", "cot",
             "--cot_samples", "2", "--max_new_tokens", str(ev.ANSWER_TOKENS), "--nothoughts",
             "--out", str(out)])
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["cot_samples"] == 2 and len(records) == 2 and "thinking" not in summary
    right = 0
    for r, row in zip(records, rows, strict=True):
        votes, prediction = r["no_thinking"]["votes"], r["no_thinking"]["prediction"]
        assert len(votes) == len(r["no_thinking"]["reasoning"]) == 2
        assert votes.count(prediction) == max(map(votes.count, votes))  # a majority
        assert r["no_thinking"]["correct"] == (prediction == row["answerKey"])  # the data's key
        right += prediction == row["answerKey"]
    assert summary["no_thinking"] == {"accuracy": right / 2, "correct": right}
    first = float(records[0]["no_thinking"]["correct"])
    assert captured.err.endswith(
        f"\rcsqa cot: 1/2 examples, accuracy so far: no_thinking {first:.2f}"
        f"\rcsqa cot: 2/2 examples, accuracy so far: no_thinking {right / 2:.2f}\n")


def test_cli_errors(checkpoint, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [GSM8K[0], GSM8K[1], "[1, 2"])
    with pytest.raises(SystemExit) as e:
        ev.main(["--checkpoint", checkpoint, "--task", "gsm8k", "--data", bad])
    assert e.value.code == 1  # found as the command runs
    assert "bad.jsonl:3: not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.main(["--checkpoint", checkpoint, "--task", "gsm8k", "--data",
                 str(tmp_path / "missing.jsonl")])
    assert "no such data file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        ev.main(["--checkpoint", checkpoint, "--task", "gsm8k", "--data", bad, "--limit", "0"])
    assert e.value.code == 2  # a bad flag value
    assert capsys.readouterr().err == "error: flag --limit=0: 0 is not a positive integer\n"


def test_cli_checks_the_output_path_before_any_work(tmp_path, capsys):
    """A missing --out directory is named before the data or the model are read (neither
    exists here), so no evaluation is lost to it."""
    out = tmp_path / "missing_dir" / "results.jsonl"
    with pytest.raises(SystemExit) as e:
        ev.main(["--checkpoint", str(tmp_path / "no_model"), "--task", "gsm8k", "--data",
                 str(tmp_path / "no_data.jsonl"), "--out", str(out)])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out={out}: the directory ") and "does not exist" in err


def test_output_paths_are_checked_and_leave_nothing(tmp_path):
    from qstar_jax import outputs

    outputs.check_output_file(str(tmp_path / "new.jsonl"))
    assert list(tmp_path.iterdir()) == []  # checked, not created
    (tmp_path / "old.jsonl").write_text("kept")
    outputs.check_output_file(str(tmp_path / "old.jsonl"))
    assert (tmp_path / "old.jsonl").read_text() == "kept"
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="a_file/r.jsonl: the directory .* does not exist"):
        outputs.check_output_file(str(tmp_path / "a_file" / "r.jsonl"))
    with pytest.raises(ValueError, match="--workdir=.*a_file/run: cannot write there"):
        outputs.prepare_workdir(str(tmp_path / "a_file" / "run"))
    outputs.prepare_workdir(str(tmp_path / "deep" / "run"))
    assert list((tmp_path / "deep" / "run").iterdir()) == []
