"""Real English text that ships with Python itself (the topic pages of the Python documentation in
``pydoc_data``), for calibration, perplexity and synthetic tasks. Nothing is downloaded."""
from __future__ import annotations

import re
from functools import lru_cache


@lru_cache(maxsize=1)
def english_text() -> str:
    """About 450 kB of English prose and code from the Python documentation, in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@lru_cache(maxsize=1)
def english_sentences() -> tuple[str, ...]:
    """Prose sentences of 4-40 words (lines that look like code or tables are dropped)."""
    sentences = []
    for paragraph in re.split(r"\n\s*\n", english_text()):
        lines = paragraph.strip().splitlines()
        if not lines or any(line.startswith(("   ", ">>>", "...", "+", "=", "*")) for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            words = sentence.split()
            if 4 <= len(words) <= 40 and re.fullmatch(r"[A-Za-z][\w ,;:'()\-\"]*[.!?]", sentence):
                sentences.append(sentence)
    return tuple(sentences)


def english_words(min_length: int = 3) -> tuple[str, ...]:
    """Distinct lowercase alphabetic words of the corpus, in first-seen order."""
    seen = dict.fromkeys(word.lower() for word in re.findall(r"[A-Za-z]+", english_text())
                         if len(word) >= min_length)
    return tuple(seen)
