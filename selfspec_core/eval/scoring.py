"""Scoring evaluation items, the metrics, and the paired bootstrap of base vs specialized.

Two scoring modes, both batched through a :class:`~selfspec_core.models.generator.Generator`:

* ``loglikelihood``: the model picks the answer choice it gives the highest log-probability, as
  lm-evaluation-harness does for multiple choice. Nothing is parsed, so a small model that cannot
  follow the answer format is still measured fairly. A summed log-probability favours choices of few
  tokens, and any score favours the label the model likes regardless of the question, so one scoring
  pass keeps what every way of picking needs (:data:`~selfspec_core.data.tasks.CHOICE_SCORES`, see
  :func:`choice_values`): each choice's summed log-probability, its token count, and its
  log-probability after the item's content-free prompt (contextual calibration).
* ``generate``: greedy decoding, then a metric on the text: ``accuracy`` (the first choice word found
  in the output), SQuAD's ``exact_match`` and token ``f1``, ``rouge_l``, or ``numeric`` (numbers
  compared with a relative tolerance, the prediction's after "The answer is" when it says so).

Every metric gives each item a score in [0, 1]; a task's value is the mean. The difference between
two models on the same items gets a paired bootstrap interval, so a reader can tell a real gain
from the noise of a few hundred questions. Tasks with fixed answer choices also get macro-F1 (the
mean of each label's F1), which a model cannot raise by moving to the most common label.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from selfspec_core.data.tasks import CHOICE_SCORES
from selfspec_core.errors import SelfspecError
from selfspec_core.models.generator import Generator

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# A number as written in reports: optional accounting parentheses, sign, currency, thousands
# separators, decimals and a percent sign. Not preceded by a letter or digit ("Q3", "pre-2019").
_NUMBER = re.compile(
    r"(?<![\w.])(?P<open>\()?\s*(?P<sign>[-\u2212\u2013])?\s*[$\u20ac\u00a3]?\s*"
    r"(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*(?P<percent>%))?(?:\s*(?P<close>\)))?"
)

_ANSWER_MARKER = re.compile(r"\banswer\s*(?:is|:|=)", re.IGNORECASE)


# ---------------------------------------------------------------------------------------- metrics


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token-overlap F1 of the normalized texts."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    same = sum((Counter(predicted) & Counter(expected)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words), as in Self-Instruct's evaluation."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


class ParsedNumber(NamedTuple):
    value: float
    percent: bool


def parse_number(text: str) -> ParsedNumber | None:
    """The first number in ``text``: "(1,234.5)" is -1234.5, "12%" is 12 with ``percent`` set."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    value = float(match["digits"].replace(",", ""))
    accounting_negative = bool(match["open"] and match["close"])
    if match["sign"] or accounting_negative:
        value = -value
    return ParsedNumber(value, bool(match["percent"]))


def answer_number(text: str) -> ParsedNumber | None:
    """The number a model gives as its answer: the first after the last "answer is" / "answer:", as
    in GSM8K-style "... The answer is 42"; without that phrase, the first number of the text (a direct
    answer such as "18.6 million in 2019" leads with it).
    """
    markers = list(_ANSWER_MARKER.finditer(text))
    if markers:
        found = parse_number(text[markers[-1].end() :])
        if found is not None:
            return found
    return parse_number(text)


def numeric_match(prediction: str, reference: str, tolerance: float = 0.01) -> float:
    """1 when the prediction's answer number is within ``tolerance`` (relative) of the reference's.

    When exactly one side is a percentage, 12.5% also matches 0.125 (and the reverse). A reference
    without any number (a span answer in a numeric QA set) is compared by exact match.
    """
    expected = parse_number(reference)
    if expected is None:
        return exact_match(prediction, reference)
    predicted = answer_number(prediction)
    if predicted is None:
        return 0.0
    candidates = [predicted.value]
    if predicted.percent != expected.percent:
        candidates += [predicted.value * 100, predicted.value / 100]
    return float(any(abs(c - expected.value) <= tolerance * abs(expected.value) + 1e-12 for c in candidates))


def parsed_label(output: str, choices: Sequence[str]) -> str | None:
    """The choice that appears first in ``output`` as a whole word (longest wins a tie), or None."""
    best: tuple[int, int, str] | None = None
    for choice in choices:
        found = re.search(r"(?<!\w)" + re.escape(choice.strip()) + r"(?!\w)", output, re.IGNORECASE)
        if found and (best is None or (found.start(), -len(choice)) < best[:2]):
            best = (found.start(), -len(choice), choice)
    return best[2] if best else None


def accuracy(prediction: str, reference: str, choices: Sequence[str] = ()) -> float:
    """With choices: the label parsed from the prediction is the reference; without: exact match."""
    if choices:
        label = parsed_label(prediction, choices)
        return float(label is not None and normalize_answer(label) == normalize_answer(reference))
    return exact_match(prediction, reference)


def metric_score(
    metric: str, prediction: str, reference: str, choices: Sequence[str] = (), tolerance: float = 0.01
) -> float:
    """Score one prediction with the named metric (see :data:`selfspec_core.data.tasks.METRICS`)."""
    if metric == "accuracy":
        return accuracy(prediction, reference, choices)
    if metric == "exact_match":
        return exact_match(prediction, reference)
    if metric == "f1":
        return token_f1(prediction, reference)
    if metric == "rouge_l":
        return rouge_l(prediction, reference)
    if metric == "numeric":
        return numeric_match(prediction, reference, tolerance)
    raise SelfspecError(f"unknown metric {metric!r}: use accuracy, exact_match, f1, rouge_l or numeric")


# ---------------------------------------------------------------------------------- scoring modes


@dataclass(frozen=True)
class ItemScore:
    """One item's outcome: what the model answered and its score. Scored by log-likelihood, also each
    choice's summed log-probability, token count and log-probability after the content-free prompt."""

    id: str
    prediction: str
    score: float
    logprobs: tuple[float, ...] = ()
    tokens: tuple[int, ...] = ()
    content_free: tuple[float, ...] = ()

    @classmethod
    def from_dict(cls, row: dict) -> ItemScore:
        """Back from the ``asdict`` form stored in JSON (lists for tuples)."""
        return cls(
            row["id"],
            row["prediction"],
            row["score"],
            tuple(row["logprobs"]),
            tuple(row["tokens"]),
            tuple(row["content_free"]),
        )


def choice_request(context: str, choice: str) -> tuple[str, str]:
    """The ``(context, continuation)`` to score a choice after ``context``.

    A BPE tokenizer merges a space into the following word (" yes" is one token), so trailing spaces
    move from the context to the continuation; after a newline the answer starts bare, as it did in
    training; otherwise the choice gets the space that separates it from the context.
    """
    choice = choice.strip()
    stripped = context.rstrip(" \t")
    if stripped != context:
        return stripped, context[len(stripped) :] + choice
    if not context or context[-1].isspace():
        return context, choice
    return context, " " + choice


def choice_values(how: str, choices: Sequence[str], score: ItemScore) -> list[float]:
    """What the model's pick maximizes over ``choices`` under ``how`` (one of ``CHOICE_SCORES``):

    * ``acc``: the summed log-probability;
    * ``acc_per_token``: that per token of the choice;
    * ``acc_norm``: that per UTF-8 byte of the choice, lm-evaluation-harness's ``acc_norm`` (it does
      not depend on the tokenizer, so models with different ones compare);
    * ``acc_calibrated``: contextual calibration (Zhao et al. 2021), the log-probability minus the
      same choice's after the content-free prompt: how much the item itself moved the model.
    """
    if how == "acc":
        return list(score.logprobs)
    if how == "acc_per_token":
        return [total / max(tokens, 1) for total, tokens in zip(score.logprobs, score.tokens)]
    if how == "acc_norm":
        return [total / max(len(c.strip().encode("utf-8")), 1) for total, c in zip(score.logprobs, choices)]
    if how == "acc_calibrated":
        if len(score.content_free) != len(score.logprobs):
            raise SelfspecError(f"item {score.id}: scored without a content-free prompt, so it cannot be calibrated")
        return [total - prior for total, prior in zip(score.logprobs, score.content_free)]
    raise SelfspecError(f"unknown choice score {how!r}: use one of {', '.join(CHOICE_SCORES)}")


def rescore(
    items: Sequence, scores: Sequence[ItemScore], how: str, metric: str, tolerance: float = 0.01
) -> list[ItemScore]:
    """The log-likelihood ``scores`` of ``items`` with each answer picked ``how`` (no model needed)."""
    picked = []
    for item, score in zip(items, scores):
        chosen = item.choices[int(np.argmax(choice_values(how, item.choices, score)))]
        picked.append(
            replace(score, prediction=chosen, score=metric_score(metric, chosen, item.answer, item.choices, tolerance))
        )
    return picked


def score_loglikelihood(
    generator: Generator,
    prompts: Sequence[str],
    items: Sequence,
    *,
    metric: str,
    how: str = "acc",
    content_free_prompts: Sequence[str] = (),
    tolerance: float = 0.01,
) -> list[ItemScore]:
    """Pick each item's choice ``how`` says, in one batched call for all choices of all items, and of
    all ``content_free_prompts`` (one per item, for calibration; a prompt shared by items is scored once)."""
    requests, spans = [], []
    for prompt, item in zip(prompts, items):
        spans.append((len(requests), len(item.choices)))
        requests += [choice_request(prompt, choice) for choice in item.choices]
    free = {
        request: None
        for prompt, item in zip(content_free_prompts, items)
        for request in (choice_request(prompt, choice) for choice in item.choices)
    }
    results = generator.loglikelihood(requests + list(free))
    free_logprobs = {request: total for request, (total, _) in zip(free, results[len(requests) :])}
    scores = []
    for index, (item, (start, count)) in enumerate(zip(items, spans)):
        totals, tokens = zip(*results[start : start + count])
        prior = (
            tuple(free_logprobs[choice_request(content_free_prompts[index], c)] for c in item.choices)
            if content_free_prompts
            else ()
        )
        scores.append(ItemScore(item.id, "", 0.0, tuple(totals), tuple(tokens), prior))
    return rescore(items, scores, how, metric, tolerance)


def score_generation(
    generator: Generator,
    prompts: Sequence[str],
    items: Sequence,
    *,
    metric: str,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    tolerance: float = 0.01,
    seed: int = 0,
) -> list[ItemScore]:
    """Greedy answers to every prompt in one batched call, each scored with ``metric``."""
    completions = generator.generate(
        list(prompts), max_new_tokens=max_new_tokens, temperature=0.0, stop=list(stop), seed=seed
    )
    return [
        ItemScore(
            item.id,
            completion.text.strip(),
            metric_score(metric, completion.text.strip(), item.answer, item.choices, tolerance),
        )
        for item, completion in zip(items, completions)
    ]


# ------------------------------------------------------------------------------------- bootstrap


def paired_bootstrap(
    base: Sequence[float], specialized: Sequence[float], samples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float] | None:
    """Percentile interval of mean(specialized - base) over items resampled with replacement.

    Resampling items (not the two models independently) keeps each question's difficulty paired,
    which is what makes a small difference on the same questions detectable. Deterministic per seed.
    """
    if len(base) != len(specialized):
        raise ValueError("paired bootstrap needs the same items for both models")
    differences = np.asarray(specialized, dtype=float) - np.asarray(base, dtype=float)
    if differences.size == 0:
        return None
    means = bootstrap_means(differences, samples, np.random.default_rng(seed))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_means(differences: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``samples`` resamples (with replacement) of ``differences``."""
    means = np.empty(samples)
    rows_per_chunk = max(1, 2_000_000 // differences.size)  # bounded memory on large sets
    for start in range(0, samples, rows_per_chunk):
        rows = min(rows_per_chunk, samples - start)
        picks = rng.integers(0, differences.size, size=(rows, differences.size))
        means[start : start + rows] = differences[picks].mean(axis=1)
    return means


def compare(base: Sequence[float], specialized: Sequence[float], samples: int = 1000, seed: int = 0) -> dict:
    """Means of both models (at least one item), their difference and its 95% paired bootstrap interval."""
    base_value, specialized_value = float(np.mean(base)), float(np.mean(specialized))
    low, high = paired_bootstrap(base, specialized, samples, seed)
    return {
        "base": round(base_value, 6),
        "specialized": round(specialized_value, 6),
        "delta": round(specialized_value - base_value, 6),
        "ci": [round(low, 6), round(high, 6)],
        "n": len(base),
    }


def compare_suite(
    tasks: dict[str, tuple[Sequence[float], Sequence[float]]], samples: int = 1000, seed: int = 0
) -> dict:
    """A suite's macro-average (the mean of its tasks' means, each task weighing the same whatever its
    size), both models, and the 95% paired bootstrap interval of the difference.

    Each bootstrap sample resamples every task's items on their own (paired, as :func:`paired_bootstrap`)
    and averages the tasks' mean differences, so a large task does not drown a small one and each
    task's own noise enters in proportion. ``tasks``: name -> (base scores, specialized scores).
    """
    if not tasks:
        raise ValueError("a suite needs at least one scored task")
    rng = np.random.default_rng(seed)
    sampled = np.zeros(samples)
    for name, (base, specialized) in tasks.items():
        if len(base) != len(specialized) or not len(base):
            raise ValueError(f"task {name}: the suite needs the same, non-empty items for both models")
        differences = np.asarray(specialized, dtype=float) - np.asarray(base, dtype=float)
        sampled += bootstrap_means(differences, samples, rng)
    sampled /= len(tasks)
    low, high = np.percentile(sampled, [2.5, 97.5])
    base_value = float(np.mean([np.mean(base) for base, _ in tasks.values()]))
    specialized_value = float(np.mean([np.mean(specialized) for _, specialized in tasks.values()]))
    return {
        "base": round(base_value, 6),
        "specialized": round(specialized_value, 6),
        "delta": round(specialized_value - base_value, 6),
        "ci": [round(float(low), 6), round(float(high), 6)],
        "tasks": {
            name: {"base": round(float(np.mean(b)), 6), "specialized": round(float(np.mean(s)), 6), "n": len(b)}
            for name, (b, s) in tasks.items()
        },
    }


# ---------------------------------------------------------------------------------------- macro-F1


def _macro_f1_rows(gold: np.ndarray, predicted: np.ndarray, labels: int) -> np.ndarray:
    """Macro-F1 of each row of label-index arrays ``(rows, items)``; a prediction outside the labels
    (index ``labels``) is wrong for every label. A label absent from gold and predictions scores 0."""
    scores = np.zeros(gold.shape[0])
    for label in range(labels):
        is_gold, is_predicted = gold == label, predicted == label
        hits = (is_gold & is_predicted).sum(axis=1)
        support = is_gold.sum(axis=1) + is_predicted.sum(axis=1)
        scores += np.divide(2 * hits, support, out=np.zeros(len(scores)), where=support > 0)
    return scores / labels


def _label_indices(answers: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    position = {label: index for index, label in enumerate(labels)}
    return np.array([position.get(answer, len(labels)) for answer in answers])


def macro_f1(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """The unweighted mean over ``labels`` (default: the gold labels) of each label's F1."""
    labels = sorted(set(gold)) if labels is None else list(labels)
    if not gold or not labels:
        raise ValueError("macro-F1 needs at least one item and one label")
    return float(
        _macro_f1_rows(_label_indices(gold, labels)[None], _label_indices(predicted, labels)[None], len(labels))[0]
    )


def compare_macro_f1(
    gold: Sequence[str],
    base: Sequence[str],
    specialized: Sequence[str],
    samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Both models' macro-F1 over the gold labels, the majority answer's, and the paired bootstrap
    interval of the difference (the same items resampled for both models, as :func:`paired_bootstrap`)."""
    if not len(gold) == len(base) == len(specialized) or not gold:
        raise ValueError("macro-F1 comparison needs the same non-empty items for both models")
    labels = sorted(set(gold))
    gold_i, base_i, specialized_i = (_label_indices(answers, labels) for answers in (gold, base, specialized))
    majority = Counter(gold).most_common(1)[0][0]
    values = {
        name: macro_f1(gold, answers, labels)
        for name, answers in (("base", base), ("specialized", specialized), ("majority", [majority] * len(gold)))
    }
    picks = np.random.default_rng(seed).integers(0, len(gold), size=(samples, len(gold)))
    differences = _macro_f1_rows(gold_i[picks], specialized_i[picks], len(labels)) - _macro_f1_rows(
        gold_i[picks], base_i[picks], len(labels)
    )
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(differences, [tail, 100 - tail])
    return {
        **{name: round(value, 6) for name, value in values.items()},
        "delta": round(values["specialized"] - values["base"], 6),
        "ci": [round(float(low), 6), round(float(high), 6)],
    }
