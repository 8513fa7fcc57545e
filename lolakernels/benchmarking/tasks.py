"""Small text-transformation tasks on real English, for training and evaluating LoRA adapters.

Every task maps a short input taken from the packaged corpus (:mod:`lolakernels.corpus`, the
Python documentation) to an answer computed from it: upper-casing a phrase, reversing its word
order, ROT13 of a word, and so on. Answers are short (a few tokens), so an adapter learns a task
in a few hundred steps on a CPU, and exact-match accuracy measures it unambiguously.

    from lolakernels.benchmarking.tasks import TASKS
    task = TASKS["reverse_words"]
    for prompt, answer in task.examples(4, seed=0, split="eval"):
        ...                                   # prompt ends with "\\n"; the model continues with answer
    task.is_correct(answer, generated_text)   # exact match after stripping surrounding whitespace

Inputs come in two kinds: *phrases* (3-6 consecutive lowercase words of a corpus sentence) and
*words* (single corpus words of 3-8 letters). Each kind is split once into a training and an
evaluation pool: evaluation phrases come from sentences that give no training phrase and never
equal a training phrase; evaluation words are never training words. So held-out accuracy
measures the task, not memorised inputs.
"""
from __future__ import annotations

import codecs
import hashlib
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Literal

from .. import corpus

Split = Literal["train", "eval"]

# One sentence (or word) in EVAL_EVERY goes to the evaluation pool.
EVAL_EVERY = 5
PHRASE_WORDS = (3, 6)
WORD_LETTERS = (3, 8)


def _held_out(text: str) -> bool:
    """Stable across runs and Python versions (unlike hash()): the split never moves."""
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % EVAL_EVERY == 0


@lru_cache(maxsize=1)
def _phrase_pools() -> dict[str, tuple[str, ...]]:
    """Distinct phrases of PHRASE_WORDS words per split, in a fixed order."""
    pools: dict[str, dict[str, None]] = {"train": {}, "eval": {}}
    low, high = PHRASE_WORDS
    for sentence in corpus.english_sentences():
        words = [word.lower() for word in re.findall(r"[A-Za-z]+", sentence)]
        pool = pools["eval" if _held_out(sentence) else "train"]
        for length in range(low, high + 1):
            for start in range(0, len(words) - length + 1):
                pool.setdefault(" ".join(words[start:start + length]))
    train = tuple(pools["train"])
    seen = set(train)
    return {"train": train, "eval": tuple(p for p in pools["eval"] if p not in seen)}


@lru_cache(maxsize=1)
def _word_pools() -> dict[str, tuple[str, ...]]:
    """Distinct corpus words of WORD_LETTERS letters per split, in a fixed order."""
    low, high = WORD_LETTERS
    words = [word for word in corpus.english_words(min_length=low) if len(word) <= high]
    return {"train": tuple(w for w in words if not _held_out(w)),
            "eval": tuple(w for w in words if _held_out(w))}


def input_pool(kind: Literal["phrase", "word"], split: Split) -> tuple[str, ...]:
    """Every input of one kind in one split (phrases: ~tens of thousands; words: ~hundreds)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if kind == "phrase":
        return _phrase_pools()[split]
    if kind == "word":
        return _word_pools()[split]
    raise ValueError(f"kind must be 'phrase' or 'word', got {kind!r}")


@dataclass(frozen=True)
class Task:
    """One task: an instruction, the kind of input it reads and the function computing answers.

    The prompt is ``f"{instruction}\\n{input}\\n"``; the answer is the text that should follow
    (the training code appends the tokenizer's end-of-sequence token).
    """

    name: str
    instruction: str
    input_kind: Literal["phrase", "word"]
    solve: Callable[[str], str]

    def prompt(self, text: str) -> str:
        return f"{self.instruction}\n{text}\n"

    def examples(self, count: int, seed: int = 0, split: Split = "train") -> list[tuple[str, str]]:
        """``count`` (prompt, answer) pairs from ``split``, deterministic in (task, count, seed, split).

        Inputs are drawn without replacement while the pool lasts, then the pool is reshuffled
        (training runs longer than the word pool repeat words; evaluation sets never repeat).
        """
        pool = input_pool(self.input_kind, split)
        if split == "eval" and count > len(pool):
            raise ValueError(f"{self.name}: asked for {count} evaluation examples, the pool has {len(pool)}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        inputs: list[str] = []
        while len(inputs) < count:
            inputs += rng.sample(pool, min(len(pool), count - len(inputs)))
        return [(self.prompt(text), self.solve(text)) for text in inputs]

    def is_correct(self, answer: str, generated: str) -> bool:
        """Exact match, ignoring whitespace around the generated text."""
        return generated.strip() == answer.strip()

    def fingerprint(self) -> str:
        """Changes whenever the prompts or answers change (keys cached adapters)."""
        sample = self.examples(16, seed=0) + self.examples(16, seed=0, split="eval")
        return hashlib.sha256(repr((self.name, sample)).encode()).hexdigest()[:16]


_VOWELS = set("aeiou")


def _words(text: str) -> list[str]:
    return text.split()


_TASK_LIST = [
    Task("uppercase", "Write the text in uppercase.", "phrase", str.upper),
    Task("title_case", "Capitalize the first letter of every word.", "phrase",
         lambda t: " ".join(w[:1].upper() + w[1:] for w in _words(t))),
    Task("reverse_words", "Reverse the order of the words.", "phrase", lambda t: " ".join(reversed(_words(t)))),
    Task("first_letters", "Write the first letter of each word.", "phrase", lambda t: "".join(w[0] for w in _words(t))),
    Task("last_word", "Write the last word.", "phrase", lambda t: _words(t)[-1]),
    Task("word_count", "Count the words.", "phrase", lambda t: str(len(_words(t)))),
    Task("sort_words", "Sort the words alphabetically.", "phrase", lambda t: " ".join(sorted(_words(t)))),
    Task("double_words", "Repeat every word twice.", "phrase", lambda t: " ".join(w + " " + w for w in _words(t))),
    Task("snake_case", "Join the words with underscores.", "phrase", lambda t: "_".join(_words(t))),
    Task("spell_word", "Spell the word with spaces between the letters.", "word", lambda w: " ".join(w)),
    Task("drop_vowels", "Remove the vowels from the word.", "word",
         lambda w: "".join(c for c in w if c not in _VOWELS)),
    Task("rot13", "Encode the word with ROT13.", "word", lambda w: codecs.encode(w, "rot13")),
]

TASKS: dict[str, Task] = {task.name: task for task in _TASK_LIST}
"""Every task by name, in a fixed order (the quality benchmark trains one adapter per task)."""
