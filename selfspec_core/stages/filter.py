"""Filters for generated records: length, obvious non-text, a missing input, blacklist, plugin hooks,
ROUGE-L dedup.

Each check returns a short reason (counted in the stage's funnel) or ``None`` to keep the record.
:class:`InstructionFilter` runs them in the order of cost, cheapest first, so the ROUGE-L comparison
against the whole pool only runs for records that passed everything else.

:class:`RougeLDeduplicator` gives the same F-measure as ``rouge_score.rouge_scorer.RougeScorer(["rougeL"])``
(Self-Instruct's near-duplicate check), with the same tokenizer and the same floating-point formula,
but each pool item is tokenized once and the longest common subsequences against the whole pool are
computed in one bit-parallel rapidfuzz call instead of a Python dynamic program per pair.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq
from rouge_score.tokenizers import DefaultTokenizer

from selfspec_core.errors import SelfspecError
from selfspec_core.plugins import manager as plugins

# A line that starts like source code, markup or SQL rather than prose.
_CODE_LINE = re.compile(
    r"^\s*(?:def \w+\s*\(|class \w+\s*[:(]|import \w|from [\w.]+ import |#include|"
    r"function\s*\w*\s*\(|(?:var|let|const) \w+\s*=|"
    r"SELECT .+ FROM |</?[a-zA-Z][\w-]*(?:\s[^>]*)?>)",
    re.M,
)
_CODE_SYMBOLS = frozenset("{}<>;\\`")
_MIN_CODE_SYMBOLS = 8  # a few "<" or ";" are normal prose ("p < 0.05; n = 30")
_MAX_CODE_SYMBOL_SHARE = 0.1
_MIN_LETTER_SHARE = 0.4  # of non-space characters; "Compute 12.5% of 1,200." has 0.45
# Decoding debris: the replacement character and control characters other than tab and newlines.
_INVALID_CHARS = re.compile(r"[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_WORD = re.compile(r"\w+")
_MAX_PHRASE_WORDS = 8
_MIN_WORDS_FOR_DIVERSITY = 30
_MIN_DISTINCT_WORD_SHARE = 0.3


# An instruction that points at text it should come with ("the following passage", "these two
# sentences", "the data provided"). With an empty input the task cannot be done: small models
# often write the instruction and forget the input. Matches none of the seeds without an input.
_REFERS_TO_INPUT = re.compile(
    r"\b(?:the|this|these|those)\s+(?:[\w-]+\s+){0,2}?(?:following|given|above|input|passages?|abstracts?|texts?|"
    r"sentences?|paragraphs?|articles?|excerpts?|statements?|tables?|reports?|headlines?|notes?|documents?|"
    r"filings?|transcripts?|premise|hypothesis|pair|updates?|study|study's|findings|data)\b"
    r"|\b(?:below|provided|as follows)\b",
    re.I,
)


def missing_input_reason(instruction: str, input_text: str) -> str | None:
    """``missing_input`` when the instruction refers to an input that is not there."""
    if not input_text.strip() and _REFERS_TO_INPUT.search(instruction):
        return "missing_input"
    return None


def word_count(text: str) -> int:
    return len(text.split())


def length_reason(text: str, min_words: int, max_words: int) -> str | None:
    words = word_count(text)
    if words == 0:
        return "empty"
    if words < min_words:
        return "too_short"
    if words > max_words:
        return "too_long"
    return None


def looks_like_code(text: str) -> bool:
    if "```" in text or _CODE_LINE.search(text):
        return True
    visible = [c for c in text if not c.isspace()]
    symbols = sum(c in _CODE_SYMBOLS for c in visible)
    return symbols >= _MIN_CODE_SYMBOLS and symbols > _MAX_CODE_SYMBOL_SHARE * len(visible)


def is_repetitive(text: str) -> bool:
    """A phrase repeated back to back (a generation loop), or long text of very few distinct words.

    Only phrases with a letter count, so a table row of years ("2019 2018 2019 2018") is not a loop.
    """
    words = _WORD.findall(text.lower())
    for size in range(1, _MAX_PHRASE_WORDS + 1):
        needed = 4 if size == 1 else 3  # "very very very" happens in prose; four times does not
        for start in range(len(words) - size * needed + 1):
            phrase = words[start : start + size]
            if not any(w.isalpha() for w in phrase):
                continue
            if all(words[start + k * size : start + (k + 1) * size] == phrase for k in range(1, needed)):
                return True
    lettered = [w for w in words if any(c.isalpha() for c in w)]
    return len(lettered) >= _MIN_WORDS_FOR_DIVERSITY and len(set(lettered)) < _MIN_DISTINCT_WORD_SHARE * len(lettered)


def letter_share(text: str) -> float:
    visible = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in visible) / len(visible) if visible else 0.0


def non_text_reason(instruction: str, input_text: str = "") -> str | None:
    """``invalid_chars``, ``code``, ``repetition`` or ``non_letters`` for output that is not a written task.

    Inputs may be tables of figures, so only the instruction must be mostly letters.
    """
    if _INVALID_CHARS.search(instruction) or _INVALID_CHARS.search(input_text):
        return "invalid_chars"
    if looks_like_code(instruction) or looks_like_code(input_text):
        return "code"
    if is_repetitive(instruction) or is_repetitive(input_text):
        return "repetition"
    if letter_share(instruction) < _MIN_LETTER_SHARE:
        return "non_letters"
    return None


def blacklist_pattern(domain: str) -> re.Pattern | None:
    """One word-boundary, case-insensitive pattern for the words of every plugin's ``blacklist_words``."""
    words: set[str] = set()
    for _, answer in plugins.results("blacklist_words", (list, tuple, set), str, domain=domain):
        for word in answer:
            if word.strip():
                words.add(" ".join(word.lower().split()))
    if not words:
        return None
    alternatives = sorted((r"\s+".join(map(re.escape, w.split())) for w in words), key=lambda a: (-len(a), a))
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")\b", re.I)


def plugin_reason(domain: str, stage: str, record: dict) -> str | None:
    """The first rejection from any plugin's ``filter_record``, as ``plugin:<name>:<reason>``."""
    for plugin, reason in plugins.results("filter_record", str, domain=domain, stage=stage, record=record):
        return f"plugin:{plugin}:{reason}"
    return None


def dedup_text(record: dict) -> str:
    """The text compared for near-duplicates: the instruction with its input.

    Comparing instructions alone (Self-Instruct) would drop every new sentiment or NER task whose
    instruction repeats a seed's wording with a new input, and those are the domain's bread and
    butter; a copied example (same instruction and input) is still dropped.
    """
    if record.get("mode") == "input":  # the instruction is a seed's: only the input is new
        return record["input"]
    return f"{record['instruction']}\n{record.get('input') or ''}".strip()


class RougeLDeduplicator:
    """A growing pool of texts and the ROUGE-L F-measure of a candidate against all of it.

    Tokens become integer ids and each tokenized text a string of code points (one per token), so
    rapidfuzz's bit-parallel LCS over strings computes the token-level LCS. A candidate's tokens that
    are not in the pool all map to one code point that never occurs in the pool: they cannot match.
    """

    _UNSEEN = "\U0010ffff"
    _MAX_VOCABULARY = 0x10FFFF - 0x800  # code points, minus the surrogates and the unseen marker

    def __init__(self, threshold: float, texts: Iterable[str] = ()):
        self.threshold = threshold
        self._tokenize = DefaultTokenizer(use_stemmer=False).tokenize
        self._ids: dict[str, str] = {}
        self._pool: list[str] = []
        self._lengths = np.zeros(64, dtype=np.float64)
        for text in texts:
            self.add(text)

    def __len__(self) -> int:
        return len(self._pool)

    def _char(self, token: str) -> str:
        char = self._ids.get(token)
        if char is None:
            number = len(self._ids)
            if number >= self._MAX_VOCABULARY:
                raise SelfspecError(
                    "the near-duplicate pool has over a million distinct words; lower generate.num_instructions"
                )
            char = chr(number if number < 0xD800 else number + 0x800)  # skip the surrogate range
            self._ids[token] = char
        return char

    def _encode(self, text: str, grow: bool) -> str:
        tokens = self._tokenize(text)
        if grow:
            return "".join(self._char(t) for t in tokens)
        return "".join(self._ids.get(t, self._UNSEEN) for t in tokens)

    def add(self, text: str) -> None:
        encoded = self._encode(text, grow=True)
        if len(self._pool) == len(self._lengths):
            self._lengths = np.concatenate([self._lengths, np.zeros_like(self._lengths)])
        self._lengths[len(self._pool)] = len(encoded)
        self._pool.append(encoded)

    def scores(self, text: str) -> np.ndarray:
        """ROUGE-L F-measure of ``text`` (the reference) against every pool item (the prediction)."""
        candidate = self._encode(text, grow=False)
        if not candidate or not self._pool:
            return np.zeros(len(self._pool))
        lcs = process.cdist([candidate], self._pool, scorer=LCSseq.similarity, dtype=np.int32)[0].astype(np.float64)
        lengths = self._lengths[: len(self._pool)]
        fmeasure = np.zeros(len(self._pool))
        hit = lcs > 0
        # rouge_score: precision = lcs/len(prediction), recall = lcs/len(target), then 2*p*r/(p+r),
        # in the same order of operations so the floats (and decisions at the threshold) are equal.
        precision = lcs[hit] / lengths[hit]
        recall = lcs[hit] / len(candidate)
        fmeasure[hit] = 2 * precision * recall / (precision + recall)
        return fmeasure

    def best_match(self, text: str) -> tuple[float, int]:
        """The highest F-measure against the pool and the index of that pool item (-1 if none)."""
        scores = self.scores(text)
        if not len(scores):
            return 0.0, -1
        index = int(np.argmax(scores))
        return float(scores[index]), index

    def is_duplicate(self, text: str) -> bool:
        return self.best_match(text)[0] >= self.threshold


class InstructionFilter:
    """Stage 1's checks in order; :meth:`accept` adds a kept record to the near-duplicate pool."""

    def __init__(self, domain: str, min_words: int, max_words: int, rouge_threshold: float, pool: Iterable[str] = ()):
        self.domain = domain
        self.min_words = min_words
        self.max_words = max_words
        self.blacklist = blacklist_pattern(domain)
        self.dedup = RougeLDeduplicator(rouge_threshold, pool)

    def reason(self, record: dict) -> str | None:
        """Why ``record`` ({instruction, input, ...}) is dropped, or ``None`` to keep it."""
        instruction, input_text = record["instruction"], record.get("input", "")
        if record.get("mode") == "input":  # a seed's instruction: only the input was written
            reason = length_reason(input_text, self.min_words, self.max_words) or non_text_reason(input_text)
        else:
            reason = (
                length_reason(instruction, self.min_words, self.max_words)
                or non_text_reason(instruction, input_text)
                or missing_input_reason(instruction, input_text)
            )
        if reason:
            return reason
        if self.blacklist is not None and self.blacklist.search(instruction):
            return "blacklist"
        reason = plugin_reason(self.domain, "instruction", record)
        if reason:
            return reason
        if self.dedup.is_duplicate(dedup_text(record)):
            return "duplicate"
        return None

    def accept(self, record: dict) -> None:
        self.dedup.add(dedup_text(record))
