"""The known-answer task: lists of digits whose answer, their sum mod 10, needs the running sums.

A bare row is `steps` digits, "=", then the answer: "3582=8". Its worked form writes the running
sums mod 10 between two bars first: "3582=|3868|8". Why this task checks the training:
- each written step (the sum so far plus the next digit, mod 10) is a lookup that a small decoder
  learns in minutes, while the answer from the digits alone needs every addition in one forward
  pass, which a two-layer model trained as briefly does not learn: its loss on bare answers stays
  near ln 10;
- the right thought is known exactly (the running sums), so every sampled thought can be graded;
- the thought that predicts a bare row's answer sits at "=". Opened by a start token whose
  embedding starts as the bar's (`quiet_star.init_text = "|"`), `steps` sampled tokens and an end
  token that is also a bar, it reads as a worked row does, so the answer after it is the worked
  row's answer: whether thoughts help is then a question of the training alone.

The base model learns both forms from scratch (`data.worked_fraction` of the rows worked);
Quiet-STaR then trains on bare rows only. Held-out rows are bare, chosen by a hash of the problem,
so no held-out problem is ever seen worked.
"""

from __future__ import annotations

import json
import os
import random

import ml_collections
import numpy as np
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

from qstar_jax.errors import ConfigError

PAD, EOS, EQUALS, BAR = "<pad>", "<eos>", "=", "|"
VOCABULARY = (PAD, EOS, *"0123456789", EQUALS, BAR)
ID = {token: i for i, token in enumerate(VOCABULARY)}  # the task tokenizer's ids
DIGIT_IDS = np.asarray([ID[str(d)] for d in range(10)], np.int32)
SEED = 0  # the problems are fixed; the training seed only shuffles them


def running_sums(digits: list[int]) -> list[int]:
    """The steps: the sum mod 10 of the first i digits, for i = 1 .. n."""
    sums, total = [], 0
    for d in digits:
        total = (total + d) % 10
        sums.append(total)
    return sums


def bare(digits: list[int]) -> str:
    """'3582=8': the digits, then the answer."""
    return "".join(map(str, digits)) + EQUALS + str(running_sums(digits)[-1])


def worked(digits: list[int]) -> str:
    """'3582=|3868|8': the digits, the steps between bars, then the answer."""
    steps = "".join(map(str, running_sums(digits)))
    return "".join(map(str, digits)) + EQUALS + BAR + steps + BAR + str(running_sums(digits)[-1])


def problems(n: int, steps: int, seed: int = SEED) -> list[list[int]]:
    """`n` random lists of `steps` digits (deterministic in the arguments)."""
    rng = random.Random(seed)
    return [[rng.randrange(10) for _ in range(steps)] for _ in range(n)]


TASK_KEYS = ("steps", "worked_fraction")  # the keys a `data` section of this source adds


def check_config(config: ml_collections.ConfigDict) -> None:
    """The `data` section's task keys are there and usable."""
    if missing := [k for k in TASK_KEYS if k not in config]:
        raise ConfigError(f"data.source='known_answer' needs data.{', data.'.join(missing)} "
                          "(configs/known_answer.py has them)")
    if config.steps < 2:
        raise ConfigError(f"data.steps={config.steps}: the task needs at least 2 digits")
    if not 0.0 <= config.worked_fraction <= 1.0:
        raise ConfigError(f"data.worked_fraction={config.worked_fraction}: must be in [0, 1]")
    if config.num_synthetic < 1:
        raise ConfigError(f"data.num_synthetic={config.num_synthetic}: must be >= 1")


def splits(config: ml_collections.ConfigDict, is_heldout) -> tuple[list[str], list[str]]:
    """(training rows, held-out rows) of a `data` section: `num_synthetic` problems of `steps`
    digits, held out by `is_heldout(bare text)`; `worked_fraction` of the training rows worked,
    every held-out row bare."""
    check_config(config)
    rng = random.Random(SEED + 1)
    train, heldout = [], []
    for digits in problems(config.num_synthetic, config.steps):
        if is_heldout(bare(digits)):
            heldout.append(bare(digits))
        else:
            train.append(worked(digits) if rng.random() < config.worked_fraction else bare(digits))
    return train, heldout


def save_tokenizer(directory: str) -> None:
    """Write the task's character tokenizer (tokenizer.json and its special tokens) to
    `directory`; `tokenizer.load` reads it, with the thought tokens after its 14 ids."""
    os.makedirs(directory, exist_ok=True)
    tok = tokenizers.Tokenizer(models.WordLevel(dict(ID), unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in (PAD, EOS)])
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": EOS, "pad_token": PAD}, f)


# ----------------------------------------------------------------------------- grading

def answer_positions(tokens_BL: np.ndarray) -> np.ndarray:
    """bool [..., L]: the positions j whose token is "=", where x[j + 1] is the answer."""
    return np.asarray(tokens_BL) == ID[EQUALS]


def correct_steps(tokens_BL: np.ndarray, steps: int) -> np.ndarray:
    """The right thought at each "=" [B, L, steps]: the running sums of the `steps` digits
    before it, as token ids; pad ids at the other positions."""
    tokens_BL = np.asarray(tokens_BL)
    value = {int(i): d for d, i in enumerate(DIGIT_IDS)}
    out = np.full(tokens_BL.shape + (steps,), ID[PAD], np.int32)
    for n, j in zip(*np.nonzero(answer_positions(tokens_BL)), strict=True):
        digits = [value.get(int(t), 0) for t in tokens_BL[n, max(j - steps, 0):j]]
        if digits:
            out[n, j, :len(digits)] = DIGIT_IDS[running_sums(digits)]
    return out
