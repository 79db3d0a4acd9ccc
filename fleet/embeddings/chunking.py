"""Splitting long documents into chunks that each carry one idea (course Concept 9).

The rules, in the order they matter:

* Split at natural breaks: a Markdown heading starts a new section, a blank line ends a
  paragraph. A chunk that stops mid-sentence searches badly, so a paragraph too long for one
  chunk is split at sentence ends, and only a single run-on "sentence" is cut by words.
* A few hundred words per chunk (the model's window decides: all-MiniLM-L6-v2 reads 256 word
  pieces, so its chunks are smaller than text-embedding-3-small's).
* Consecutive chunks of one section overlap by a few sentences, so an idea that straddles the
  boundary is still found. Each chunk of a section repeats the section's heading, which is the
  context that makes a lone paragraph ("within 5 business days") mean something.
* Text that already fits stays one chunk, unchanged: a resolved ticket is never split.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+\S")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


@dataclass(frozen=True)
class ChunkPolicy:
    """How big a chunk may get and how much of the previous one it repeats (in words)."""

    max_words: int = 300
    overlap_words: int = 50

    def __post_init__(self) -> None:
        if self.max_words < 20:
            raise ValueError("max_words must be at least 20")
        if not 0 <= self.overlap_words < self.max_words // 2:
            raise ValueError("overlap_words must be >= 0 and less than half of max_words")


def word_count(text: str) -> int:
    return len(text.split())


def _sections(text: str) -> list[tuple[str | None, list[str]]]:
    """``[(heading or None, [paragraph, ...]), ...]`` in document order."""
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            sections[-1][1].append(" ".join(line.strip() for line in paragraph))
            paragraph.clear()

    for line in text.splitlines():
        if _HEADING.match(line):
            flush()
            sections.append((line.strip(), []))
        elif not line.strip():
            flush()
        else:
            paragraph.append(line)
    flush()
    return [(h, ps) for h, ps in sections if h is not None or ps]


def _units(paragraph: str, limit: int) -> list[str]:
    """A paragraph as pieces of at most ``limit`` words: whole, else sentences, else words."""
    if word_count(paragraph) <= limit:
        return [paragraph]
    units: list[str] = []
    for sentence in _SENTENCE_END.split(paragraph):
        words = sentence.split()
        if len(words) <= limit:
            units.append(sentence)
        else:
            units.extend(" ".join(words[i : i + limit]) for i in range(0, len(words), limit))
    return units


def _tail(units: list[tuple[int, str]], overlap_words: int) -> list[tuple[int, str]]:
    """The last units of a chunk, up to ``overlap_words`` words (cut by words if one is longer)."""
    if overlap_words == 0 or not units:
        return []
    kept: list[tuple[int, str]] = []
    total = 0
    for index, unit in reversed(units):
        n = word_count(unit)
        if total + n > overlap_words:
            if not kept:
                kept.append((index, " ".join(unit.split()[-overlap_words:])))
            break
        kept.insert(0, (index, unit))
        total += n
    return kept


def chunk_text(text: str, policy: ChunkPolicy | None = None) -> list[str]:
    """Split ``text`` into chunks per :class:`ChunkPolicy`; short text comes back as one chunk."""
    policy = policy or ChunkPolicy()
    stripped = text.strip()
    if not stripped:
        return []
    if word_count(stripped) <= policy.max_words:
        return [stripped]

    chunks: list[tuple[int, str]] = []  # (section number, text)
    pending: str | None = None  # a heading with no body of its own: it titles the next section
    for number, (own_heading, paragraphs) in enumerate(_sections(stripped)):
        heading = "\n\n".join(h for h in (pending, own_heading) if h) or None
        if not paragraphs:
            pending = heading
            continue
        pending = None
        head_words = word_count(heading) if heading else 0
        budget = max(policy.max_words - head_words, policy.max_words // 2)
        units = [
            (index, u)
            for index, p in enumerate(paragraphs)
            for u in _units(p, budget - policy.overlap_words)
        ]
        current: list[tuple[int, str]] = []  # (paragraph number, text)
        fresh = 0  # words in `current` that are not overlap carried from the previous chunk

        def emit(parts: list[tuple[int, str]], number: int = number,
                 heading: str | None = heading) -> None:
            body = parts[0][1]
            for (before, _), (index, text) in itertools.pairwise(parts):
                body += (" " if index == before else "\n\n") + text
            chunks.append((number, f"{heading}\n\n{body}" if heading else body))

        for index, unit in units:
            size = word_count(unit)
            if current and sum(word_count(t) for _, t in current) + size > budget and fresh:
                emit(current)
                current = _tail(current, policy.overlap_words)
                fresh = 0
            current.append((index, unit))
            fresh += size
        if fresh:
            emit(current)
    if pending:  # trailing headings with nothing under them
        chunks.append((len(chunks) + 1, pending))
    # Whole short sections next to each other share a chunk while they fit: a 30-word section
    # alone is too small to carry its meaning. Pieces of one split section never merge (they
    # already overlap and fill their budget).
    merged: list[tuple[int, str]] = []
    for number, text in chunks:
        if merged:
            last_number, last_text = merged[-1]
            single = sum(1 for n, _ in chunks if n == last_number) == 1 and sum(
                1 for n, _ in chunks if n == number) == 1
            if single and word_count(last_text) + word_count(text) <= policy.max_words:
                merged[-1] = (number, f"{last_text}\n\n{text}")
                continue
        merged.append((number, text))
    return [text for _, text in merged]
