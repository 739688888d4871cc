"""Data-quality checks for synthetic responses written by small models.

Measured on the embedded SmolLM2-135M, a plain "generate an answer" loop gives wrong labels, echoed
prompts ("Task: ... Input: ..."), refusals, answers cut off mid-sentence, and after tuning a model
that calls every sentence "positive". What worked: when the instruction states its answer options,
let the model's log-likelihood pick among them with the label prior removed (contextual
calibration), and keep about as many records per label; Financial PhraseBank went 0.245 -> 0.625.

This module holds the pieces, each usable on its own and each switchable in ``[respond]``:

- :func:`extract_options`: the answer options an instruction states (yes/no, label lists,
  lettered choices, a numeric scale), or those its task type uses in the seeds;
- :func:`calibrate_scores` / :func:`best_option`: the calibrated log-likelihood choice, and
  :func:`match_option` to read a free answer back as an option;
- :func:`cap_labels`: at most ``max_label_share`` of any option group for one label;
- :func:`majority` / :func:`most_central`: self-consistency over several answers;
- :func:`response_problem`: echo, refusal, truncation, copy, repetition, code and language checks;
- :func:`judge_scores` / :func:`top_fraction`: the model's own yes/no verdict on each pair.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from selfspec_core.errors import SelfspecError
from selfspec_core.stages.filter import RougeLDeduplicator, is_repetitive, looks_like_code

# ---------------------------------------------------------------------------------------------
# Answer options


@dataclass(frozen=True)
class Options:
    """The answers an item allows: ``keys`` are compared, calibrated and counted, ``texts`` written.

    For labels key and text are the same word ("positive"); for lettered choices the key is the
    letter and the text the whole option line ("B) Intramuscular epinephrine").
    """

    kind: str  # "labels" or "choices"
    keys: tuple[str, ...]
    texts: tuple[str, ...]

    @property
    def group(self) -> str:
        """Items with the same group share a label prior (calibration) and a label cap."""
        return "/".join(self.keys)


MAX_OPTIONS = 12
MAX_OPTION_WORDS = 5
# Labels that name an answer set by themselves: a list of only these is an option list anywhere.
KNOWN_LABELS = frozenset(
    {
        "positive",
        "negative",
        "neutral",
        "mixed",
        "bullish",
        "bearish",
        "yes",
        "no",
        "maybe",
        "true",
        "false",
        "entailment",
        "contradiction",
        "entails",
        "contradicts",
        "increase",
        "decrease",
        "unchanged",
        "buy",
        "sell",
        "hold",
        "up",
        "down",
        "relevant",
        "irrelevant",
    }
)
_QUOTES = "\"'`*“”‘’«»"
_ITEM = r"[\w\"'“”‘’`*][\w\"'“”‘’`*%&/.-]*(?:[ \t]+[\w\"'“”‘’`*%&/.-]+){0,4}"
_OR_LIST = rf"{_ITEM}(?:\s*,\s*{_ITEM})*\s*,?\s+(?:or|and/or)\s+{_ITEM}"
_YES_NO = re.compile(r"\byes\s*(?:,|/|or)\s*no\b(?:\s*(?:,|/)?\s*(?:or\s+)?(maybe)\b)?", re.I)
_TRUE_FALSE = re.compile(r"\btrue\s*(?:/|or)\s*false\b", re.I)
# "Options: a, b, c." / "one of these sections: a, b, c" / "Categories - a, b"
_MARKED_LIST = re.compile(
    r"\b(?:options?|categories|category|labels?|classes|choices|one\s+of(?:\s+(?:the\s+following|these|the))?"
    r"(?:\s+[a-z]+)?)\s*(?::|-)\s*(?P<list>[^\n.?!;]+(?:\.(?=\w)[^\n.?!;]*)*)",
    re.I,
)
# "as positive, negative, or neutral" / "Answer bullish or bearish" / "label it: a, b, or c"
_CUED_LIST = re.compile(
    r"(?:\b(?:as|into|either|answer(?:\s+with)?|reply(?:\s+with)?|respond(?:\s+with)?|label(?:\s+it)?(?:\s+as)?|"
    r"choose(?:\s+between)?|select|is\s+it|classify(?:\s+it)?(?:\s+as)?)|:)\s+(?P<list>" + _OR_LIST + r")",
    re.I,
)
# A cued list is an answer set only in an instruction that asks to pick ("Describe the outlook as well
# as risks or opportunities" does not) and when no item reads as a phrase ("Answer in one or two sentences").
_ASKS_TO_CHOOSE = re.compile(
    r"\b(?:classif|label|categori|choose|select|pick|answer|reply|respond|decide|"
    r"determine|tag|rate|which|whether|is\s+(?:it|this|the))",
    re.I,
)
_NOT_A_LABEL_START = frozenset(
    [
        "in",
        "a",
        "an",
        "the",
        "one",
        "two",
        "three",
        "four",
        "five",
        "with",
        "by",
        "to",
        "for",
        "of",
        "on",
        "at",
        "more",
        "less",
        "your",
        "my",
    ]
)
_ANY_OR_LIST = re.compile(r"(?P<list>" + _OR_LIST + r")", re.I)
_SCALE = re.compile(r"\bscale\s+(?:of|from)\s+(\d{1,2})\b[^.\n]{0,40}?\bto\s+(\d{1,2})\b", re.I)
_CHOICE_LINE = re.compile(r"(?m)^[ \t]*\(?([A-Ha-h])[).:][ \t]+(\S.*?)[ \t]*$")
_CHOICE_INLINE = re.compile(r"\(([A-H])\)\s*(.+?)(?=\s*\([A-H]\)|$)", re.S)
_SPLIT = re.compile(r"\s*,\s*(?:or\s+|and\s+)?|\s+or\s+|\s*/\s*|\s*;\s*")


def extract_options(instruction: str, input_text: str = "", task_labels: Sequence[str] = ()) -> Options | None:
    """The answer options an item states, or ``None`` for a free-text task.

    In order: lettered choices (``A) ...`` lines in the input), labels the instruction lists (yes/no
    [/maybe], true/false, "Options: a, b, c", "as a, b, or c", a list of known labels, a numeric
    scale "from 0 to 5"), then ``task_labels`` (the labels its task type uses in the seeds).
    """
    choices = _choices(input_text) or _choices(instruction)
    if choices:
        return choices
    labels = _stated_labels(instruction) or _marked_labels(input_text)
    if labels:
        return Options("labels", labels, labels)
    if task_labels:
        labels = tuple(dict.fromkeys(task_labels))
        return Options("labels", labels, labels) if len(labels) >= 2 else None
    return None


def _choices(text: str) -> Options | None:
    for pattern in (_CHOICE_LINE, _CHOICE_INLINE):
        found = pattern.findall(text)
        letters = [letter.upper() for letter, _ in found]
        # the letters must run A, B, C... with no gap: "a. first ... c. then" in prose is no choice list
        if len(found) >= 2 and letters == [chr(ord("A") + n) for n in range(len(found))]:
            lines = tuple(f"{letter}) {' '.join(body.split())}" for letter, (_, body) in zip(letters, found))
            return Options("choices", tuple(letters), lines)
    return None


def _stated_labels(instruction: str) -> tuple[str, ...] | None:
    match = _YES_NO.search(instruction)
    if match:
        return ("yes", "no", "maybe") if match.group(1) else ("yes", "no")
    if _TRUE_FALSE.search(instruction):
        return ("true", "false")
    labels = _marked_labels(instruction)
    if labels:
        return labels
    for match in _ANY_OR_LIST.finditer(instruction):
        labels = _split_labels(match.group("list"))
        if labels and all(label in KNOWN_LABELS for label in labels):
            return labels
    if _ASKS_TO_CHOOSE.search(instruction):
        for match in _CUED_LIST.finditer(instruction):
            labels = _split_labels(match.group("list"))
            if labels and not any(label.split()[0].lower() in _NOT_A_LABEL_START for label in labels):
                return labels
    scale = _SCALE.search(instruction)
    if scale:
        low, high = int(scale.group(1)), int(scale.group(2))
        if 1 <= high - low < MAX_OPTIONS:
            return tuple(str(n) for n in range(low, high + 1))
    return None


def _marked_labels(text: str) -> tuple[str, ...] | None:
    for match in _MARKED_LIST.finditer(text):
        labels = _split_labels(match.group("list"))
        if labels:
            return labels
    return None


def _split_labels(text: str) -> tuple[str, ...] | None:
    """Items of an "a, b, or c" list, the outer ones cut to the length of the inner ones.

    A list found in running text takes in neighbouring words ("Label the pair as entailment, ...,
    or neutral for the patient"): the first item keeps only its last words and the last item its
    first words, as many as the longest middle item has (for two items, the shorter of the two).
    """
    items = [_clean_label(item) for item in _SPLIT.split(text.strip().rstrip(".:"))]
    items = [item.split() for item in items if item]
    if not 2 <= len(items) <= MAX_OPTIONS:
        return None
    middle = items[1:-1]
    words = max(map(len, middle)) if middle else min(len(items[0]), len(items[-1]))
    items[0], items[-1] = items[0][-words:], items[-1][:words]
    labels = tuple(_clean_label(" ".join(item)) for item in items)
    if len(set(labels)) != len(labels) or any(len(item) > MAX_OPTION_WORDS for item in items):
        return None
    return labels


def _clean_label(item: str) -> str:
    item = re.sub(r"\s*\([^)]*\)", "", item)  # "mechanism (pharmacokinetic mechanism)" -> "mechanism"
    item = item.strip().strip(_QUOTES).strip().rstrip(".,:;").strip(_QUOTES).strip()
    item = re.sub(r"^(?:or|and)\s+", "", item, flags=re.I)
    # keep letters, acronyms and names as written ("A", "ORG", "Tier 1"), lower-case words ("Positive")
    return item if len(item) == 1 or any(c.isupper() for c in item[1:]) else item.lower()


def task_label_sets(seeds) -> dict[str, tuple[str, ...]]:
    """Task types whose seed answers are a small closed label set: type -> labels (seed order).

    A type qualifies when all its seed outputs are short (<= 3 words), there are 2-12 distinct
    answers and at least one repeats: sentiment's positive/negative/neutral does, factoid QA's
    nine different answers do not.
    """
    outputs: dict[str, list[str]] = defaultdict(list)
    for seed in seeds:
        outputs[seed.task_type].append(_clean_label(seed.output))
    sets = {}
    for task_type, answers in outputs.items():
        distinct = tuple(dict.fromkeys(answers))
        if (
            all(0 < len(a.split()) <= 3 for a in answers)
            and 2 <= len(distinct) <= MAX_OPTIONS
            and len(distinct) < len(answers)
        ):
            sets[task_type] = distinct
    return sets


def match_option(output: str, options: Options) -> int | None:
    """Which option a written answer gives ("Positive.", "B", "B) text", "the answer is no"), if any."""
    text = " ".join(output.strip().strip(_QUOTES).split())
    lowered = text.lower().rstrip(".!")
    for number, (key, full) in enumerate(zip(options.keys, options.texts)):
        if lowered in (key.lower(), full.lower()):
            return number
    if options.kind == "choices":
        letter = re.match(r"^\(?([A-H])(?:[).:]|$|\s)", text)
        return options.keys.index(letter.group(1)) if letter and letter.group(1) in options.keys else None
    # a label as the first word(s), followed by punctuation or an explanation
    starts = [n for n, key in enumerate(options.keys) if re.match(rf"{re.escape(key.lower())}\b", lowered)]
    if len(starts) == 1:
        return starts[0]
    said = re.search(r"\b(?:answer|label|sentiment) is:?\s+(.+)$", lowered)
    return match_option(said.group(1), options) if said else None


def option_requests(prompt: str, options: Options) -> list[tuple[str, str]]:
    """(context, continuation) pairs to score each option as the answer to ``prompt``."""
    return [(prompt, " " + text) for text in options.texts]


def option_score(logprob: float, tokens: int, options: Options) -> float:
    """Labels compare by total log-probability; whole choice lines by log-probability per token,
    so a long option is not penalised for its length."""
    return logprob / tokens if options.kind == "choices" else logprob


# Fewer items than this in an option group tell nothing about its label prior or distribution.
MIN_GROUP_ITEMS = 4


# How option scores are calibrated against the model's label prior (``respond.calibration``).
CALIBRATIONS = ("contextual", "batch")


def calibrate_scores(
    scores: Sequence[Sequence[float]], groups: Sequence[str], calibrate: bool = True, method: str = "contextual"
) -> list[list[float]]:
    """Option scores with each group's label prior taken out.

    Within a group (items with the same options) what the model gives a label whatever the input
    says is its prior; taking it out leaves what the input itself adds. ``contextual``: each
    option's mean log-likelihood over the group's items, subtracted. ``batch`` (batch calibration,
    Zhou et al. 2023): each item's options normalised to probabilities first, then the log of each
    option's mean probability over the group subtracted. A group smaller than ``MIN_GROUP_ITEMS``
    is too small to estimate a prior and keeps its raw scores, as does every group with
    ``calibrate=False``.
    """
    if method not in CALIBRATIONS:
        raise SelfspecError(f"unknown calibration {method!r}: use one of {', '.join(CALIBRATIONS)}")
    members: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    adjusted = [list(row) for row in scores]
    for indices in members.values():
        if not calibrate or len(indices) < MIN_GROUP_ITEMS:
            continue
        rows = [scores[i] if method == "contextual" else log_normalize(scores[i]) for i in indices]
        prior = label_prior(rows, log_space=method == "contextual")
        for i, row in zip(indices, rows):
            adjusted[i] = [score - bias for score, bias in zip(row, prior)]
    return adjusted


def log_normalize(row: Sequence[float]) -> list[float]:
    """Log-likelihoods of one item's options as log-probabilities over those options."""
    top = max(row)
    total = top + math.log(sum(math.exp(score - top) for score in row))
    return [score - total for score in row]


def label_prior(rows: Sequence[Sequence[float]], log_space: bool) -> list[float]:
    """Each option's prior over ``rows``: the mean score, or (``log_space=False``) the log of the
    mean probability of log-normalised rows (a content-free prior when the rows carry no content)."""
    width = len(rows[0])
    if log_space:
        return [sum(row[option] for row in rows) / len(rows) for option in range(width)]
    return [math.log(sum(math.exp(row[option]) for row in rows) / len(rows)) for option in range(width)]


def best_option(scores: Sequence[float]) -> int:
    """Index of the highest score (ties: the first option)."""
    return max(range(len(scores)), key=lambda n: (scores[n], -n))


def margin(scores: Sequence[float], chosen: int) -> float:
    """How far option ``chosen`` is ahead of the best other option (negative when behind)."""
    return scores[chosen] - max((s for n, s in enumerate(scores) if n != chosen), default=scores[chosen])


def cap_labels(labels: Sequence[tuple[str, str] | None], confidence: Sequence[float], max_share: float) -> list[bool]:
    """Which records to keep so no label is more than ``max_share`` of its option group.

    ``labels`` holds ``(group, label)`` per record (``None`` for free-text records, always kept).
    Per group the largest per-label count ``m`` with ``m <= share * sum(min(count, m))`` is kept
    for every label, where ``share`` is ``max_share`` but at least 1/(labels seen in the group), so a
    ``max_share`` of 1/n or less keeps every label at the rarest one's count (balanced); the surplus
    of an over-represented label is dropped least confident first (ties: later records first), so
    the result is deterministic. A group with a single label has
    no such ``m`` and is dropped whole: a task whose answer is always the same teaches nothing.
    Groups of fewer than ``MIN_GROUP_ITEMS`` records have no distribution to speak of and are kept.
    """
    keep = [True] * len(labels)
    if max_share >= 1.0:
        return keep
    by_group: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for index, label in enumerate(labels):
        if label is not None:
            by_group[label[0]][label[1]].append(index)
    for per_label in by_group.values():
        counts = [len(indices) for indices in per_label.values()]
        if sum(counts) < MIN_GROUP_ITEMS:
            continue
        share = max(max_share, 1 / len(counts)) if len(counts) > 1 else max_share
        allowed = max(
            (m for m in range(max(counts) + 1) if m <= share * sum(min(c, m) for c in counts) + 1e-9), default=0
        )
        for indices in per_label.values():
            ranked = sorted(indices, key=lambda i: (-confidence[i], i))
            for index in ranked[allowed:]:
                keep[index] = False
    return keep


def label_shares(labels: Sequence[tuple[str, str] | None]) -> dict[str, dict[str, int]]:
    """Counts of each label per option group, for the manifest and the report."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for label in labels:
        if label is not None:
            counts[label[0]][label[1]] += 1
    return {group: dict(sorted(c.items())) for group, c in sorted(counts.items())}


def max_label_share(distribution: dict[str, dict[str, int]], min_items: int = MIN_GROUP_ITEMS) -> float:
    """The largest share one label has in any group of at least ``min_items`` records."""
    shares = [max(c.values()) / sum(c.values()) for c in distribution.values() if sum(c.values()) >= min_items]
    return max(shares, default=0.0)


# ---------------------------------------------------------------------------------------------
# Self-consistency


def majority(votes: Sequence[str]) -> tuple[str, float]:
    """The most frequent vote (ties: the one cast first) and the share of votes it got."""
    counts = Counter(votes)
    winner = max(counts, key=lambda vote: (counts[vote], -votes.index(vote)))
    return winner, counts[winner] / len(votes)


def most_central(texts: Sequence[str], eligible: Sequence[int] | None = None) -> tuple[int, float]:
    """Among ``eligible`` texts (default all), the one with the highest mean ROUGE-L F to all the
    other texts, and that mean (1.0 when there is no other text)."""
    candidates = list(range(len(texts))) if eligible is None else list(eligible)
    if len(texts) == 1:
        return candidates[0], 1.0
    pool = RougeLDeduplicator(1.0, texts)  # stages/filter.py's fast ROUGE-L, equal to rouge_score's
    means = {}
    for index in candidates:
        scores = pool.scores(texts[index])
        means[index] = (float(scores.sum()) - float(scores[index])) / (len(texts) - 1)
    best = max(candidates, key=lambda i: (means[i], -i))
    return best, means[best]


# ---------------------------------------------------------------------------------------------
# Response checks

RESPONSE_CHECKS = ("degenerate", "echo", "refusal", "truncated", "copy", "language", "code")
_SEPARATOR_LINE = re.compile(r"(?:^|\n)[ \t]*#+[ \t]*(?:\n|$)")
_LEADING_LABEL = re.compile(r"^\s*(?:answer|response|output|reply)\s*:\s*", re.I)
_TEMPLATE_MARKER = re.compile(r"(?im)^\s*(?:#{2,}|(?:task|input|answer|instruction|response|background|type)\s*:)")
_REFUSAL = re.compile(
    r"\b(?:i'?m sorry|i am sorry|i apologi[sz]e|as an ai\b|as a language model|as an ai (?:language )?model|"
    r"i (?:can ?not|can't|am unable to|'m unable to|am not able to|'m not able to)\b|"
    r"i (?:don't|do not) have (?:access|enough|the ability)|i'?m (?:just )?an ai\b|"
    r"here(?:'s| is) (?:the|an|my) (?:answer|response)|i hope (?:this|that) helps|let me know if)",
    re.I,
)
# A few stopwords per language: enough to tell which of these languages a paragraph is in.
_STOPWORDS = {
    "en": "the and of to in is that for with as are was this by on be it from or which",
    "de": "der die das und ist nicht mit von den zu ein eine auf für sich dem des im",
    "fr": "le la les et des est une dans pour que qui pas sur du au avec ce sont",
    "es": "el la los las y es en que por una con para del se lo como más al",
    "it": "il la di che è per una sono con del della non gli le si nel anche",
    "pt": "o a os as e é que em um uma para com não do da dos das se",
    "nl": "de het een en van is dat op te zijn niet met voor aan ook door als",
}
_STOPWORD_SETS = {language: frozenset(words.split()) for language, words in _STOPWORDS.items()}
MIN_LANGUAGE_LETTERS = 20
MIN_ECHO_WORDS = 8


def parse_checks(setting: str) -> frozenset[str]:
    """The enabled response checks from a comma-separated setting ("" turns them all off)."""
    names = frozenset(name.strip() for name in setting.split(",") if name.strip())
    unknown = sorted(names - set(RESPONSE_CHECKS))
    if unknown:
        raise SelfspecError(
            f"respond.response_checks: unknown check {unknown[0]!r}; choose from {', '.join(RESPONSE_CHECKS)}"
        )
    return names


def clean_response(text: str) -> str:
    """A completion without a leading "Answer:" the model repeated, cut where it starts a separator
    line of its own ("#", "##": a small model's try at the template's "###")."""
    text = _LEADING_LABEL.sub("", text.strip())
    return _SEPARATOR_LINE.split(text, maxsplit=1)[0].strip()


def language_of(text: str) -> str | None:
    """A cheap language guess: the dominant script, and for Latin script the language whose
    stopwords occur most; ``None`` when the text is too short to tell."""
    letters = [c for c in text if c.isalpha()]
    if len(letters) < MIN_LANGUAGE_LETTERS:
        return None
    scripts = Counter(unicodedata.name(c, "UNKNOWN").split(" ")[0] for c in letters)
    script = scripts.most_common(1)[0][0]
    if script != "LATIN":
        return script.lower()
    words = re.findall(r"[^\W\d_]+", text.lower())
    hits = {language: sum(word in stop for word in words) for language, stop in _STOPWORD_SETS.items()}
    best = max(hits, key=lambda language: (hits[language], language == "en"))
    return best if hits[best] >= 3 else None


def _normalized(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def response_problem(
    output: str,
    finished: bool,
    instruction: str,
    input_text: str,
    checks: frozenset[str],
    expected_language: str | None,
) -> str | None:
    """Why a cleaned generated answer cannot be training data, or ``None``.

    Reasons: ``empty``; ``truncated`` (cut off at max_new_tokens, or ending in "is:");
    ``degenerate`` (a repetition loop); ``copy`` (the answer is the instruction); ``echo``
    (template markers, 8 words in a row of the instruction, or the whole input repeated); ``refusal`` (refusals and
    meta-talk about being an AI); ``code`` (source code or markup, stages/filter.py's test); ``language``
    (a language other than the seeds').
    """
    if not output.strip():
        return "empty"
    if "truncated" in checks and (not finished or output.rstrip().endswith(":")):
        return "truncated"  # cut off at max_new_tokens, or stopped right after "The answer is:"
    if "degenerate" in checks and is_repetitive(output):
        return "degenerate"
    answer, question = _normalized(output), _normalized(instruction)
    if "copy" in checks and answer == question:
        return "copy"
    if "echo" in checks and (
        _TEMPLATE_MARKER.search(output)
        or _repeats_words_of(answer, question)
        or _contains(answer, _normalized(input_text))
    ):
        return "echo"
    if "refusal" in checks and _REFUSAL.search(output):
        return "refusal"
    if "code" in checks and looks_like_code(output):
        return "code"
    if "language" in checks and expected_language is not None:
        found = language_of(output)
        if found is not None and found != expected_language:
            return "language"
    return None


def _contains(answer: str, prompt_part: str) -> bool:
    """The whole input repeated (a summary that copies one sentence of it is fine)."""
    return len(prompt_part.split()) >= MIN_ECHO_WORDS and prompt_part in answer


def _repeats_words_of(answer: str, instruction: str) -> bool:
    """Any ``MIN_ECHO_WORDS`` consecutive words of the instruction repeated in the answer."""
    words, said = instruction.split(), answer.split()
    spans = {tuple(words[i : i + MIN_ECHO_WORDS]) for i in range(len(words) - MIN_ECHO_WORDS + 1)}
    return any(tuple(said[i : i + MIN_ECHO_WORDS]) in spans for i in range(len(said) - MIN_ECHO_WORDS + 1))


# ---------------------------------------------------------------------------------------------
# Self-assessment


def judge_scores(generator, template, records: Sequence[dict], context: dict) -> list[float]:
    """log P(" yes") - log P(" no") of the judge prompt for each {instruction, input, output}."""
    requests = []
    for record in records:
        prompt = template.render([], {k: record[k] for k in ("instruction", "input", "output")}, **context)
        requests += [(prompt, " yes"), (prompt, " no")]
    scored = generator.loglikelihood(requests) if requests else []
    return [yes[0] - no[0] for yes, no in zip(scored[::2], scored[1::2])]


def top_fraction(scores: Sequence[float], fraction: float) -> list[bool]:
    """Keep the best ``ceil(fraction * n)`` scores (ties: earlier records first)."""
    keep_count = math.ceil(fraction * len(scores))
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept = set(order[:keep_count])
    return [i in kept for i in range(len(scores))]


def histogram(values: Sequence[float], bins: int = 20) -> dict:
    """Equal-width bins over the values' range: ``{"edges": [...], "counts": [...]}``."""
    if not values:
        return {"edges": [], "counts": []}
    low, high = min(values), max(values)
    width = (high - low) / bins or 1.0
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, int((value - low) / width))] += 1
    return {"edges": [round(low + n * width, 4) for n in range(bins + 1)], "counts": counts}
