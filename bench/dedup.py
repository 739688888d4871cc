"""ROUGE-L near-duplicate filtering: Self-Instruct's rouge-score loop against selfspec's filter.

5,000 real texts (PubMedQA questions, TAT-QA questions, Financial PhraseBank sentences, shuffled) are
kept or dropped one by one against the growing pool of kept texts, dropping a text whose ROUGE-L F
against any kept text is >= the threshold.

- speed: the reference (``RougeScorer(["rougeL"]).score`` against every kept text, Self-Instruct's
  loop) and ``RougeLDeduplicator`` on the same first ``--prefix`` texts; the reference on all 5,000
  would take about a quarter of an hour (its estimate from the measured time per pair is printed).
- decisions on all 5,000: rouge-score scores every pair that can reach the threshold; pairs skipped
  cannot, because LCS <= the shared tokens counted with multiplicity on either side, so
  F <= 2 * that / (len_a + len_b). On the prefix these decisions are also checked against the full loop.

Last line: ``speedup=<x> identical=<true|false> n=<texts> reference_timed_on=<prefix>``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from rouge_score import rouge_scorer
from rouge_score.tokenizers import DefaultTokenizer

from selfspec_core.stages.filter import RougeLDeduplicator

DATA = Path(os.environ.get("SELFSPEC_DATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data")


def load_texts(data: Path, count: int) -> list[str]:
    pubmedqa = [
        item["QUESTION"]
        for item in json.loads((data / "pubmedqa" / "ori_pqal.json").read_text(encoding="utf-8")).values()
    ]
    tatqa = [
        q["question"]
        for context in json.loads((data / "tatqa" / "tatqa_dev" / "tatqa_dataset_dev.json").read_text(encoding="utf-8"))
        for q in context["questions"]
    ]
    phrasebank = [
        line.rsplit("@", 1)[0]
        for line in (data / "financial_phrasebank" / "Sentences_50Agree.txt").read_text(encoding="latin-1").splitlines()
        if "@" in line
    ]
    texts = (pubmedqa + tatqa + phrasebank)[:count]
    random.Random(0).shuffle(texts)
    return texts


def selfspec_decisions(texts: list[str], threshold: float) -> list[bool]:
    dedup = RougeLDeduplicator(threshold)
    decisions = []
    for text in texts:
        duplicate = dedup.is_duplicate(text)
        decisions.append(duplicate)
        if not duplicate:
            dedup.add(text)
    return decisions


def reference_decisions(texts: list[str], threshold: float) -> tuple[list[bool], int]:
    """Self-Instruct's loop: the F-measure against every kept text, with rouge-score."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept, decisions, pairs = [], [], 0
    for text in texts:
        scores = [scorer.score(text, other)["rougeL"].fmeasure for other in kept]
        pairs += len(kept)
        duplicate = max(scores, default=0.0) >= threshold
        decisions.append(duplicate)
        if not duplicate:
            kept.append(text)
    return decisions, pairs


def bounded_reference_decisions(texts: list[str], threshold: float) -> tuple[list[bool], int, int]:
    """The reference's decisions, with rouge-score run only on pairs whose F can reach the threshold."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    tokenize = DefaultTokenizer(use_stemmer=False).tokenize
    kept: list[str] = []
    kept_lengths: list[int] = []
    postings: dict[str, tuple[list[int], list[int]]] = {}  # token -> (kept positions, counts there)
    decisions, scored, pairs = [], 0, 0
    for text in texts:
        counts = Counter(tokenize(text))
        length = sum(counts.values())
        shared_here = np.zeros(len(kept))  # this text's tokens shared with each kept text, with multiplicity
        shared_there = np.zeros(len(kept))  # the kept text's tokens shared with this one
        for token, count in counts.items():
            if token in postings:
                positions, there = postings[token]
                shared_here[positions] += count
                shared_there[positions] += there
        bound = (
            2 * np.minimum(shared_here, shared_there) / np.maximum(length + np.asarray(kept_lengths, dtype=float), 1)
        )
        candidates = np.flatnonzero(bound >= threshold - 1e-9)
        pairs += len(kept)
        duplicate = False
        for position in candidates:
            scored += 1
            if scorer.score(text, kept[position])["rougeL"].fmeasure >= threshold:
                duplicate = True
                break
        decisions.append(duplicate)
        if not duplicate:
            for token, count in counts.items():
                positions, there = postings.setdefault(token, ([], []))
                positions.append(len(kept))
                there.append(count)
            kept.append(text)
            kept_lengths.append(length)
    return decisions, scored, pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--prefix", type=int, default=1000, help="texts the (slow) reference loop is timed on")
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    if not (args.data / "pubmedqa").is_dir():
        sys.exit(f"benchmark data not found in {args.data}: set SELFSPEC_DATA to the shared data folder")
    texts = load_texts(args.data, args.count)
    prefix = texts[: args.prefix]

    started = time.perf_counter()
    fast_prefix = selfspec_decisions(prefix, args.threshold)
    fast_prefix_s = time.perf_counter() - started
    started = time.perf_counter()
    reference_prefix, prefix_pairs = reference_decisions(prefix, args.threshold)
    reference_prefix_s = time.perf_counter() - started
    started = time.perf_counter()
    fast_all = selfspec_decisions(texts, args.threshold)
    fast_all_s = time.perf_counter() - started
    started = time.perf_counter()
    bounded_all, scored, all_pairs = bounded_reference_decisions(texts, args.threshold)
    bounded_s = time.perf_counter() - started

    bounded_matches_loop = bounded_all[: len(prefix)] == reference_prefix
    identical = fast_all == bounded_all and fast_prefix == reference_prefix and bounded_matches_loop
    speedup = reference_prefix_s / fast_prefix_s
    per_pair = reference_prefix_s / max(prefix_pairs, 1)
    print(f"texts: {len(texts)}, kept {len(texts) - sum(fast_all)}, dropped as near-duplicates {sum(fast_all)}")
    print(
        f"first {len(prefix)} texts: rouge-score loop {reference_prefix_s:.1f}s ({prefix_pairs} pairs, "
        f"{per_pair * 1e6:.0f} us/pair), selfspec {fast_prefix_s:.3f}s"
    )
    print(
        f"all {len(texts)} texts: selfspec {fast_all_s:.2f}s; the rouge-score loop would score {all_pairs} pairs, "
        f"about {all_pairs * per_pair / 60:.0f} min"
    )
    print(
        f"decisions on all {len(texts)}: rouge-score on the {scored} pairs that can reach F >= {args.threshold} "
        f"({bounded_s:.1f}s); same as the full loop on the prefix: {str(bounded_matches_loop).lower()}; "
        f"same as selfspec: {str(fast_all == bounded_all).lower()}"
    )
    print(f"speedup={speedup:.0f} identical={str(identical).lower()} n={len(texts)} reference_timed_on={len(prefix)}")


if __name__ == "__main__":
    main()
