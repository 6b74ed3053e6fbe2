"""Zero-shot GSM8K and CommonsenseQA, scored as the Quiet-STaR paper and the authors' code do.

Direct mode: the prompt "Q: <question>\\nA:" is followed by the answer (" 18\\n", " C\\n") and the
model, thinking at every token (the parallel rollout in evaluation mode), is scored by the
probability of the answer tokens, each renormalised over the allowed set (digits and newline
for GSM8K, A-E and newline for CommonsenseQA): the mean over examples of their product is the
expected accuracy. Answer tokens outside the set (the comma of "1,234") are fed but not
scored, as in the authors' code. Chain-of-thought mode: "Let's think step by step.", generation,
"Therefore, the answer ... is", the first integer / letter, majority vote over samples.

    python -m qstar_jax.evaluate --checkpoint DIR --task gsm8k --data test.jsonl [--mode=cot]
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import re
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from qstar_jax import cli, generate, json_files, loading, outputs, scoring
from qstar_jax import tokenizer as tokenizer_lib
from qstar_jax.errors import ConfigError, DataError, PathNotFoundError
from qstar_jax.model import Params
from qstar_jax.thoughts import QuietStarConfig

TASKS = ("gsm8k", "csqa")
SYMBOLS = {"gsm8k": "0123456789", "csqa": "ABCDE"}  # allowed answer symbols, plus newline
COT_PROMPT = "\nA: Let's think step by step."
FINAL_ANSWER = {"gsm8k": "\nTherefore, the answer (arabic numerals) is",
                "csqa": "\nTherefore, among A through E, the answer is"}
COT_STOPS = ("Q:", "\n\n\n")  # the model starting a new question ends its reasoning
ANSWER_TOKENS = 12  # tokens generated after FINAL_ANSWER (the authors' answer_length)
LENGTH_BUCKET = 32  # direct-mode batches are padded to a multiple of this


@dataclasses.dataclass(frozen=True)
class Example:
    """One question: the text after "Q: " (CSQA: stem and labelled choices) and its answer."""

    question: str
    answer: str  # GSM8K: the final number as written ("1,234"); CSQA: the letter


# ----------------------------------------------------------------------------- data files


def _text(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {key!r} is missing or not a non-empty string")
    return value


def _gsm8k(obj: dict, where: str) -> Example:
    answer = _text(obj, "answer", where)
    if "####" not in answer:
        raise DataError(f"{where}: 'answer' has no final '#### N' line")
    final = answer.split("####")[-1].strip()
    if not re.fullmatch(r"-?[\d,]*\d(\.\d+)?", final):
        raise DataError(f"{where}: final answer {final!r} is not a number")
    return Example(_text(obj, "question", where).strip(), final)


def _csqa(obj: dict, where: str) -> Example:
    question = obj.get("question")
    if isinstance(question, dict):  # original layout: question.stem, question.choices[]
        stem = _text(question, "stem", where)
        choices = question.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise DataError(f"{where}: 'question.choices' is not a list of objects")
        pairs = [(c.get("label"), c.get("text")) for c in choices]
    else:  # Hugging Face export: question, choices.label[], choices.text[]
        stem = _text(obj, "question", where)
        choices = obj.get("choices")
        if not isinstance(choices, dict):
            raise DataError(f"{where}: 'choices' is not an object with 'label' and 'text'")
        labels, texts = choices.get("label"), choices.get("text")
        if not isinstance(labels, list) or not isinstance(texts, list) or len(labels) != len(texts):
            raise DataError(f"{where}: 'choices.label' and 'choices.text' are not lists of one "
                            "length")
        pairs = list(zip(labels, texts, strict=True))
    if not pairs or not all(isinstance(lb, str) and isinstance(t, str) for lb, t in pairs):
        raise DataError(f"{where}: choices need string labels and texts")
    key = obj.get("answerKey")
    labels = [lb for lb, _ in pairs]
    if key not in labels:
        raise DataError(f"{where}: answerKey {key!r} is not one of the labels {labels} "
                        "(an unlabelled test split?)")
    if not set(labels) <= set(SYMBOLS["csqa"]):
        raise DataError(f"{where}: labels {labels} are not among A-E")
    choice_lines = "\n".join(f"({lb}) {t}" for lb, t in pairs)
    return Example(f"{stem.strip()}\n{choice_lines}", key)


def read_examples(path: str, task: str, limit: int | None = None) -> list[Example]:
    """Examples of a GSM8K or CommonsenseQA JSONL file (public layouts), the first `limit`."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r} (expected one of {', '.join(TASKS)})")
    parse = _gsm8k if task == "gsm8k" else _csqa
    if not os.path.isfile(path):
        raise PathNotFoundError(f"{path}: no such data file")
    examples = []
    for where, obj in json_files.read_jsonl(path):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(parse(obj, where))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


# ----------------------------------------------------------------------------- direct scoring


def direct_prompt(example: Example) -> str:
    return f"Q: {example.question}\nA:"


def answer_tokens(tokenizer, prompt: str, answer: str) -> tuple[list[int], int, list[str]]:
    """(ids of prompt + " answer\\n", index of the first answer token, its tokens' pieces).

    Leading tokens that are only a space (Mistral's "▁" before digits) belong to the context.
    """
    add_bos = tokenizer.bos_id is not None
    head = tokenizer.encode(prompt, add_bos=add_bos)
    ids = tokenizer.encode(f"{prompt} {answer}\n", add_bos=add_bos)
    if ids[:len(head)] != head:
        raise DataError(f"the tokenizer merges the end of {prompt[-20:]!r} with the answer "
                        f"{answer!r}: the answer tokens cannot be told apart")
    pieces = tokenizer_lib.token_pieces(tokenizer, head, ids[len(head):])
    start = len(head)
    while pieces and pieces[0].isspace() and "\n" not in pieces[0]:
        pieces.pop(0)
        start += 1
    return ids, start, pieces


def allowed_ids(tokenizer, task: str) -> np.ndarray:
    """The token ids of the allowed symbols as this tokenizer writes them in the answer slot.

    For Mistral's tokenizer: the ten digit tokens and <0x0A> (GSM8K), ▁A .. ▁E and <0x0A> (CSQA),
    the authors' lists. A tokenizer that merges symbols into one token is refused.
    """
    symbols = SYMBOLS[task]
    found = set()
    for c in symbols:
        # A symbol first in the answer and, for numbers, after another digit.
        for answer in [c] + ([f"1{c}"] if task == "gsm8k" else []):
            ids, start, pieces = answer_tokens(tokenizer, "Q: ?\nA:", answer)
            if [p.strip() for p in pieces] != [*answer, ""] or pieces[-1] != "\n":
                raise DataError(f"{task}: direct scoring needs one token per symbol and one for "
                                f"the newline; this tokenizer writes {answer!r} + newline as "
                                f"{pieces}")
            found.update(ids[start:])
    return np.array(sorted(found), np.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "thinking"))
def _allowed_logprobs(params: Params, tokens_BL: jax.Array, mask_BL: jax.Array, rng: jax.Array,
                      allowed_A: jax.Array, cfg: QuietStarConfig, thinking: bool):
    """Log-probs [B, L, A] renormalised over the allowed ids: (base, thinking or None)."""
    base, think = scoring.next_token_logits(params, tokens_BL, mask_BL, rng, cfg, thinking)
    renorm = lambda logits: jax.nn.log_softmax(logits[..., allowed_A], -1)  # noqa: E731
    return renorm(base), None if think is None else renorm(think)


def _score(logp_LA: np.ndarray, ids: Sequence[int], positions: Sequence[int],
           index_of: dict[int, int]) -> dict:
    """Probability of the answer tokens at `positions` and whether each is the allowed argmax."""
    logp = [logp_LA[i - 1, index_of[ids[i]]] for i in positions]
    best = all(int(np.argmax(logp_LA[i - 1])) == index_of[ids[i]] for i in positions)
    return {"prob": float(np.exp(np.sum(logp))), "argmax_correct": best}


def score_direct(params: Params, cfg: QuietStarConfig, tokenizer, examples: Sequence[Example],
                 task: str, thinking: bool = True, batch_size: int = 8, seed: int = 0,
                 progress=None) -> list[dict]:
    """Per example: "no_thinking" (and "thinking") {"prob", "argmax_correct"}, and the scored
    answer tokens. Thoughts are sampled (or greedy) as the config says, one per position.
    `progress(done, total, expected_accuracy so far)` is called after each batch."""
    allowed = allowed_ids(tokenizer, task)
    index_of = {int(t): a for a, t in enumerate(allowed)}
    encoded = []
    for ex in examples:
        ids, start, _ = answer_tokens(tokenizer, direct_prompt(ex), ex.answer)
        positions = [i for i in range(start, len(ids)) if ids[i] in index_of]
        encoded.append((ids, positions))
    results = []
    for first in range(0, len(encoded), batch_size):
        chunk = encoded[first:first + batch_size]
        width = -(-max(len(ids) for ids, _ in chunk) // LENGTH_BUCKET) * LENGTH_BUCKET
        tokens = np.full((batch_size, width), cfg.pad_id, np.int32)
        mask = np.zeros((batch_size, width), bool)
        for row, (ids, _) in enumerate(chunk):
            tokens[row, :len(ids)], mask[row, :len(ids)] = ids, True
        rng = jax.random.fold_in(jax.random.key(seed), first)
        base, think = jax.device_get(_allowed_logprobs(params, jnp.asarray(tokens),
                                                       jnp.asarray(mask), rng,
                                                       jnp.asarray(allowed), cfg, thinking))
        for row, (ids, positions) in enumerate(chunk):
            result = {"answer_tokens": len(positions),
                      "no_thinking": _score(base[row], ids, positions, index_of)}
            if think is not None:
                result["thinking"] = _score(think[row], ids, positions, index_of)
            results.append(result)
        if progress:
            progress(len(results), len(encoded), expected_accuracy(results))
    return results


def expected_accuracy(scores: Sequence[dict]) -> dict[str, float]:
    """The mean answer probability of direct scores, per thinking mode scored."""
    return {name: float(np.mean([s[name]["prob"] for s in scores]))
            for name in ("thinking", "no_thinking") if name in scores[0]}


# ----------------------------------------------------------------------------- chain of thought


def extract_answer(task: str, text: str) -> str | None:
    """GSM8K: the first integer (commas dropped), as the authors' code; CSQA: the first A-E."""
    if task == "gsm8k":
        match = re.search(r"\d+", text.replace(",", ""))
        return str(int(match.group())) if match else None
    match = re.search(r"\b([A-E])\b", text)
    return match.group(1) if match else None


def score_cot(params: Params, cfg: QuietStarConfig, tokenizer, example: Example, task: str, *,
              samples: int, thinking: bool, temperature: float, max_new_tokens: int,
              seed: int = 0) -> dict:
    """Zero-shot chain of thought with a majority vote over `samples` sampled rationales."""
    prompt = f"Q: {example.question}{COT_PROMPT}"
    sampling = generate.Sampling(temperature)
    common = dict(sampling=sampling, thinking=thinking)
    reasoning = generate.generate(params, cfg, tokenizer, [prompt] * samples,
                                  max_new_tokens=max_new_tokens, seed=seed, stop=COT_STOPS,
                                  **common)
    finals = [(prompt + r.text).rstrip() + FINAL_ANSWER[task] for r in reasoning]
    answers = generate.generate(params, cfg, tokenizer, finals, max_new_tokens=ANSWER_TOKENS,
                                seed=seed + 1, **common)
    votes = [extract_answer(task, a.text) for a in answers]
    prediction = collections.Counter(votes).most_common(1)[0][0]
    gold = extract_answer(task, example.answer)
    return {"prediction": prediction, "correct": prediction == gold, "votes": votes,
            "reasoning": [r.text for r in reasoning], "final": [a.text for a in answers]}


# ----------------------------------------------------------------------------- command line


def _progress(label: str, measure: str = "accuracy"):
    """A progress line on stderr, rewritten in place: the examples done and the `measure` so far
    per thinking mode (the count alone would read like a score)."""
    def show(done: int, total: int, accuracy: dict[str, float]) -> None:
        so_far = ", ".join(f"{name} {value:.2f}" for name, value in accuracy.items())
        sys.stderr.write(f"\r{label}: {done}/{total} examples, {measure} so far: {so_far}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


def evaluate(params: Params, cfg: QuietStarConfig, tokenizer, examples: Sequence[Example],
             task: str, *, mode: str = "direct", thinking_modes: Sequence[bool] = (True, False),
             batch_size: int = 8, cot_samples: int = 8, temperature: float = 0.9,
             max_new_tokens: int = 384, seed: int = 0) -> tuple[dict, list[dict]]:
    """(summary, per-example records) for each thinking mode asked (True: with thinking)."""
    records = [{"index": i, "question": ex.question, "answer": ex.answer}
               for i, ex in enumerate(examples)]
    summary: dict = {"task": task, "mode": mode, "examples": len(examples)}
    if mode == "direct":
        show = _progress(f"{task} direct", "expected accuracy")
        scores = score_direct(params, cfg, tokenizer, examples, task,
                              thinking=(True in thinking_modes), batch_size=batch_size,
                              seed=seed, progress=show)
        for record, score in zip(records, scores, strict=True):
            record.update(score)
        summary["answer_tokens_scored"] = sum(s["answer_tokens"] for s in scores)
        for name, accuracy in expected_accuracy(scores).items():
            correct = [s[name]["argmax_correct"] for s in scores]
            summary[name] = {"expected_accuracy": accuracy,
                             "argmax_accuracy": float(np.mean(correct)),
                             "argmax_correct": sum(correct)}
    elif mode == "cot":
        summary.update(cot_samples=cot_samples, temperature=temperature)
        for thinking in thinking_modes:
            name = "thinking" if thinking else "no_thinking"
            show = _progress(f"{task} cot")
            for i, (record, ex) in enumerate(zip(records, examples, strict=True)):
                record[name] = score_cot(params, cfg, tokenizer, ex, task, samples=cot_samples,
                                         thinking=thinking, temperature=temperature,
                                         max_new_tokens=max_new_tokens, seed=seed + 1000 * i)
                show(i + 1, len(examples),
                     {name: float(np.mean([r[name]["correct"] for r in records[:i + 1]]))})
            correct = [r[name]["correct"] for r in records]
            summary[name] = {"accuracy": float(np.mean(correct)), "correct": int(sum(correct))}
    else:
        raise ConfigError(f"unknown mode {mode!r} (expected direct or cot)")
    return summary, records


def command_flags() -> flags.FlagValues:
    """This command's flags, on their own FlagValues (see generate.command_flags)."""
    fv = flags.FlagValues()
    flags.DEFINE_string("checkpoint", None, "HF-format Quiet-STaR directory or training workdir "
                        "(required)", flag_values=fv)
    flags.DEFINE_enum("task", None, TASKS, "the benchmark (required)", flag_values=fv)
    flags.DEFINE_string("data", None, "GSM8K or CommonsenseQA JSONL file (required)",
                        flag_values=fv)
    flags.DEFINE_integer("limit", None, "evaluate the first N examples", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_bool("thoughts", True, "score the model with thinking too (--nothoughts: "
                      "only without)", flag_values=fv)
    flags.DEFINE_string("out", None, "write per-example results here (JSONL)", flag_values=fv)
    flags.DEFINE_enum("mode", "direct", ("direct", "cot"), "answer probability, or chain of "
                      "thought with a vote", flag_values=fv)
    flags.DEFINE_integer("cot_samples", 8, "votes per question (cot)", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_float("temperature", 0.9, "sampling temperature of the chain of thought "
                       "(0: greedy)", lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 384, "reasoning tokens before the final-answer "
                         "prompt (cot)", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("batch_size", 8, "sequences per forward (direct)", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the sampled thoughts", flag_values=fv)
    return fv


def main(argv: Sequence[str] | None = None) -> None:
    """Evaluate, print the summary as JSON and write the per-example records to --out."""
    fv = command_flags()
    cli.parse_command(fv, argv, __doc__, required=("checkpoint", "task", "data"))
    with cli.one_line_errors():
        if fv.out:
            outputs.check_output_file(fv.out)  # before the evaluation, not after
        examples = read_examples(fv.data, fv.task, fv.limit)
        cfg, params, tok = loading.load_checkpoint(fv.checkpoint)
        modes = (True, False) if fv.thoughts else (False,)
        summary, records = evaluate(
            params, cfg, tok, examples, fv.task, mode=fv.mode, thinking_modes=modes,
            batch_size=fv.batch_size, cot_samples=fv.cot_samples, temperature=fv.temperature,
            max_new_tokens=fv.max_new_tokens, seed=fv.seed)
    summary["n_ahead"] = cfg.n_ahead
    if fv.out:
        with open(fv.out, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
