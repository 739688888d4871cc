import json
import os
import random
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from selfspec_core.data.seeds import load_seeds
from selfspec_core.errors import SelfspecError
from selfspec_core.hookspecs import hookimpl
from selfspec_core.stages.filter import (
    InstructionFilter,
    RougeLDeduplicator,
    blacklist_pattern,
    length_reason,
    missing_input_reason,
    non_text_reason,
    plugin_reason,
)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SELFSPEC_DATA") or REPO / ".." / "shared" / "data")
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def reference_f(target: str, prediction: str) -> float:
    return SCORER.score(target, prediction)["rougeL"].fmeasure


def test_length_reasons():
    assert length_reason("   ", 3, 10) == "empty"
    assert length_reason("Summarize this.", 3, 10) == "too_short"
    assert length_reason("word " * 11, 3, 10) == "too_long"
    assert length_reason("Summarize the following abstract.", 3, 10) is None


@pytest.mark.parametrize(
    "instruction, input_text, reason",
    [
        ("## sentiment\ufffdany erart :", "", "invalid_chars"),
        ("Classify the sentence.", "Profit \x1b[0m rose.", "invalid_chars"),
        ("Write a function that adds numbers.", "def add(a, b):\n    return a + b", "code"),
        ("Explain this snippet.", "```python\nprint(1)\n```", "code"),
        ("Fix the markup.", "<div class='x'><span>revenue</span></div>", "code"),
        ("Parse it.", "{a: 1; b: {c: 2; d: {e: 3;}}} <x> <y>", "code"),
        ("the the the the the", "", "repetition"),
        (
            "Classify the sentiment of the sentence.",
            "rose by five percent rose by five percent rose by five percent",
            "repetition",
        ),
        ("List risk factors. " + "revenue growth margin " * 12, "", "repetition"),
        ("1234 5678 9012 +-*/ 3456 7890 !!", "", "non_letters"),
    ],
)
def test_non_text_is_dropped(instruction, input_text, reason):
    assert non_text_reason(instruction, input_text) == reason


@pytest.mark.parametrize(
    "instruction, input_text",
    [
        ("Compute 12.5% of 1,200.", ""),
        (
            "What was the change in revenue between the two years?",
            "Revenue | 2019 | 2018 | 2019 | 2018\n1,200 | 1,100 | 900 | 850",
        ),
        ("Is the effect significant?", "The treatment lowered mortality (p < 0.05; n = 30)."),
    ],
)
def test_prose_with_figures_is_kept(instruction, input_text):
    assert non_text_reason(instruction, input_text) is None


@pytest.mark.parametrize("domain", ["finance", "biomed"])
def test_every_seed_passes_the_cheap_filters(domain):
    for seed in load_seeds(REPO / "seeds" / domain / "seeds.jsonl"):
        assert length_reason(seed.instruction, 3, 150) is None, seed.id
        assert non_text_reason(seed.instruction, seed.input) is None, seed.id
        assert missing_input_reason(seed.instruction, seed.input) is None, seed.id
        # every seed without its input: the instructions that point at one are caught
        if seed.input and seed.task_type in ("sentiment", "yesno_qa", "nli", "summarization"):
            assert missing_input_reason(seed.instruction, "") == "missing_input", seed.id


@pytest.mark.parametrize(
    "instruction, input_text, reason",
    [
        ("Summarize the following passage in one sentence.", "", "missing_input"),
        ("Classify the sentiment of these two headlines.", "", "missing_input"),
        ("Compute the margin from the data provided.", "", "missing_input"),
        ("Summarize the following passage in one sentence.", "Revenue rose 5%.", None),
        ("Which of these drugs is a beta blocker: A) metoprolol B) insulin?", "", None),
        ("Does this study show a benefit of the drug? Answer yes or no.", "", "missing_input"),
        ("Explain what a basis point is.", "", None),
    ],
)
def test_an_instruction_pointing_at_a_missing_input_is_dropped(instruction, input_text, reason):
    assert missing_input_reason(instruction, input_text) == reason


def test_blacklist_matches_whole_words_of_every_plugin(plugin):
    class ChartWords:
        @hookimpl
        def blacklist_words(self, domain):
            return ["Chart", "pie chart"] if domain == "finance" else None

    plugin(ChartWords(), "chart-words")
    pattern = blacklist_pattern("finance")
    assert pattern.search("Describe the attached IMAGE.")
    assert pattern.search("Please go  to the website.")
    assert pattern.search("Read the chart below.")
    assert not pattern.search("Explain the mapping of filed claims to imagery.")
    assert not blacklist_pattern("biomed").search("Read the chart below.")


def test_plugin_filter_reason_names_the_plugin(plugin):
    class NoTickers:
        @hookimpl
        def filter_record(self, domain, stage, record):
            return "ticker" if "$" in record["instruction"] else None

    plugin(NoTickers(), "no-tickers")
    assert (
        plugin_reason("finance", "instruction", {"instruction": "Is $ABC a buy?", "input": ""})
        == "plugin:no-tickers:ticker"
    )
    assert plugin_reason("finance", "instruction", {"instruction": "Define EBITDA.", "input": ""}) is None


def test_plugin_filter_returning_a_non_string_is_a_clear_error(plugin, capsys):
    from selfspec_core.plugins.manager import require

    class Broken:
        @hookimpl
        def filter_record(self, record):
            return True

    plugin(Broken(), "broken-filter")
    # Another domain's plugin: named in one line and left out, the run goes on unfiltered by it.
    assert plugin_reason("finance", "instruction", {"instruction": "x", "input": ""}) is None
    assert (
        "plugin 'broken-filter' is broken: hook filter_record: returned bool, expected str" in capsys.readouterr().err
    )
    plugin(Broken(), "needed-filter")
    require("needed-filter")  # the plugin of the run's own domain: its error stops the run
    with pytest.raises(SelfspecError, match="needed-filter.*filter_record.*expected str"):
        plugin_reason("finance", "instruction", {"instruction": "x", "input": ""})


def test_instruction_filter_checks_in_order_and_dedups_against_accepted():
    checks = InstructionFilter("finance", 3, 20, 0.7, pool=["Define the term EBITDA for an investor."])
    assert checks.reason({"instruction": "Draw", "input": ""}) == "too_short"
    assert checks.reason({"instruction": "Draw a picture of the quarterly revenue.", "input": ""}) == "blacklist"
    assert checks.reason({"instruction": "Define the term EBITDA for investors.", "input": ""}) == "duplicate"
    record = {"instruction": "Explain what a bond's yield to maturity measures.", "input": ""}
    assert checks.reason(record) is None
    checks.accept(record)
    assert checks.reason({"instruction": "Explain what a bond's yield to maturity means.", "input": ""}) == "duplicate"
    # the input counts: the same instruction with a new input is a new task
    seeded = {
        "instruction": "Define the term EBITDA for an investor.",
        "input": "A retail investor reading a 10-K asks about margins.",
    }
    assert checks.reason(seeded) is None


def _synthetic_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocabulary = [
        "the",
        "revenue",
        "Rose",
        "fell",
        "by",
        "5%",
        "in",
        "Q3",
        "net",
        "income",
        "café",
        "co-op",
        "patients",
        "trial",
        "ratio",
        "of",
        "and",
        "2019",
        "EBITDA",
        "!!",
        "—",
        "A",
        "a",
    ]
    return [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(0, 14))) for _ in range(count)]


def test_scores_equal_rouge_score_on_synthetic_texts():
    texts = _synthetic_texts(120, seed=3)
    pool, candidates = texts[:60], texts[60:]
    dedup = RougeLDeduplicator(0.7, pool)
    for candidate in candidates:
        assert list(dedup.scores(candidate)) == [reference_f(candidate, p) for p in pool]


def _words(count: int, prefix: str) -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


@pytest.mark.parametrize(
    "target_len, prediction_len, lcs", [(10, 10, 7), (20, 20, 14), (23, 37, 21), (17, 23, 14), (7, 13, 7)]
)
def test_decisions_at_the_threshold_follow_rouge_score_floats(target_len, prediction_len, lcs):
    """F is exactly 0.7 on paper; rouge-score's 2*p*r/(p+r) rounds some to just under (23/37/21)."""
    shared = _words(lcs, "w")
    target = " ".join(shared + _words(target_len - lcs, "t"))
    prediction = " ".join(shared + _words(prediction_len - lcs, "p"))
    expected = reference_f(target, prediction)
    assert abs(expected - 0.7) < 1e-12
    dedup = RougeLDeduplicator(0.7, [prediction])
    assert dedup.scores(target)[0] == expected
    assert dedup.is_duplicate(target) == (expected >= 0.7)
    if (target_len, prediction_len) == (23, 37):
        assert not dedup.is_duplicate(target)  # 2*lcs/(len+len) would say 0.7 and drop it


def test_texts_without_tokens_score_zero():
    dedup = RougeLDeduplicator(0.7, ["!!! ---", "Net income rose."])
    assert list(dedup.scores("... ???")) == [0.0, 0.0]
    assert list(dedup.scores("net income rose")) == [0.0, 1.0]
    assert RougeLDeduplicator(0.7).best_match("anything") == (0.0, -1)


def _real_texts() -> list[str]:
    pubmedqa = DATA / "pubmedqa" / "ori_pqal.json"
    phrasebank = DATA / "financial_phrasebank" / "Sentences_50Agree.txt"
    if not (pubmedqa.exists() and phrasebank.exists()):
        pytest.skip(f"benchmark data not found under {DATA}")
    questions = [item["QUESTION"] for item in json.loads(pubmedqa.read_text(encoding="utf-8")).values()]
    sentences = [
        line.rsplit("@", 1)[0] for line in phrasebank.read_text(encoding="latin-1").splitlines() if "@" in line
    ]
    return questions[:400] + sentences[:400]


def test_scores_equal_rouge_score_on_real_pairs():
    texts = _real_texts()
    rng = random.Random(0)
    pool = rng.sample(texts, 200)
    dedup = RougeLDeduplicator(0.7, pool)
    for candidate in rng.sample(texts, 15):  # 3,000 pairs
        assert list(dedup.scores(candidate)) == [reference_f(candidate, p) for p in pool]


def test_growing_pool_decisions_equal_the_reference_loop():
    """Self-Instruct's loop: keep a text unless its F against any kept text reaches the threshold."""
    texts = _real_texts()
    rng = random.Random(1)
    # near-duplicates: PhraseBank repeats sentences across agreement levels, and edited copies
    stream = rng.sample(texts, 150)
    stream += [" ".join(t.split()[:-2]) for t in rng.sample(stream, 30)]
    rng.shuffle(stream)
    kept_reference, decisions_reference = [], []
    for text in stream:
        duplicate = any(reference_f(text, p) >= 0.7 for p in kept_reference)
        decisions_reference.append(duplicate)
        if not duplicate:
            kept_reference.append(text)
    dedup = RougeLDeduplicator(0.7)
    decisions = []
    for text in stream:
        decisions.append(dedup.is_duplicate(text))
        if not decisions[-1]:
            dedup.add(text)
    assert decisions == decisions_reference
    assert 0 < sum(decisions) < len(stream)
