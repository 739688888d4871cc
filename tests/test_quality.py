"""Data-quality checks: options, calibrated choice, label cap, self-consistency, response checks, judge."""

import math

import pytest

from selfspec_core.errors import SelfspecError
from selfspec_core.models.generator import HFGenerator
from selfspec_core.models.loading import ModelRef, load_model, load_tokenizer
from selfspec_core.records import Seed
from selfspec_core.stages.checks import (
    Options,
    best_option,
    calibrate_scores,
    cap_labels,
    clean_response,
    extract_options,
    histogram,
    judge_scores,
    label_shares,
    language_of,
    majority,
    margin,
    match_option,
    max_label_share,
    most_central,
    option_requests,
    option_score,
    parse_checks,
    response_problem,
    task_label_sets,
    top_fraction,
)
from selfspec_core.templates import PromptTemplate

SENTIMENT = ("positive", "negative", "neutral")


@pytest.mark.parametrize(
    "instruction, expected",
    [
        ("Classify the sentiment of this financial news sentence as positive, negative, or neutral.", SENTIMENT),
        ("Is the following sentence positive, negative, or neutral from an investor's point of view?", SENTIMENT),
        ("Read the sentence and label its sentiment: Positive, Negative, or Neutral.", SENTIMENT),
        ("What is the sentiment? Choose one of: positive, negative, neutral.", SENTIMENT),
        ("Label the following headline as positive, negative, or neutral for the company it mentions.", SENTIMENT),
        (
            "Is this headline bullish, bearish, or neutral for the stock? Answer with one word.",
            ("bullish", "bearish", "neutral"),
        ),
        ("Classify the tone as bullish or bearish.", ("bullish", "bearish")),
        ("Does the sentence express a cause-and-effect relationship? Answer yes or no.", ("yes", "no")),
        (
            "Based on the abstract, answer the question with yes, no, or maybe. Question: Does it work?",
            ("yes", "no", "maybe"),
        ),
        ("Respond with 'yes' or 'no'.", ("yes", "no")),
        ("Is the statement true/false?", ("true", "false")),
        ('Reply with either "up" or "down".', ("up", "down")),
        (
            "Classify this passage into one of these sections: "
            "risk factors, liquidity and capital resources, legal proceedings.",
            ("risk factors", "liquidity and capital resources", "legal proceedings"),
        ),
        (
            "Classify the interaction. Options: mechanism (pharmacokinetic), effect (pharmacodynamic), advice, none. "
            "Answer with one option.",
            ("mechanism", "effect", "advice", "none"),
        ),
        (
            "Label the premise-hypothesis pair as entailment, contradiction, or neutral.",
            ("entailment", "contradiction", "neutral"),
        ),
        ("Rate the similarity on a scale from 0 (unrelated) to 5 (equivalent).", ("0", "1", "2", "3", "4", "5")),
        (
            "Sort it into one of the following categories: earnings, merger, lawsuit, or other.",
            ("earnings", "merger", "lawsuit", "other"),
        ),
        # free-text tasks: a list in running text is not an answer set
        ("Explain the causes, effects, or implications of inflation.", None),
        ("Summarize the article in one or two sentences.", None),
        ("List the organizations (ORG), persons (PER) and locations (LOC), formatted as 'ORG: ...; PER: ...'.", None),
        ("Explain the following finance term in one to three sentences.", None),
        ("Answer in two or three sentences.", None),
        ("Describe the bank's outlook as well as its risks or opportunities.", None),
        ("Reply with one or two words.", None),
    ],
)
def test_options_stated_in_the_instruction(instruction, expected):
    found = extract_options(instruction)
    assert (found.keys if found else None) == expected
    if found:
        assert found.kind == "labels" and found.texts == found.keys


def test_lettered_choices_in_the_input_and_task_type_labels():
    lines = extract_options(
        "Answer the multiple-choice question.",
        "Question: First-line treatment for anaphylaxis?\n"
        "A) Oral antihistamine\nB) Intramuscular epinephrine\nC) Steroids",
    )
    assert (
        lines.kind == "choices" and lines.keys == ("A", "B", "C") and lines.texts[1] == "B) Intramuscular epinephrine"
    )
    inline = extract_options("Pick one.", "Which drug? (A) aspirin (B) heparin (C) warfarin")
    assert inline.texts == ("A) aspirin", "B) heparin", "C) warfarin")
    assert extract_options("Explain.", "a. first we go\nc. then we stop") is None  # letters must run A, B, C
    seeds = [
        Seed(f"s{n}", kind, "q", "x", answer)
        for n, (kind, answer) in enumerate(
            [
                ("sentiment", "positive"),
                ("sentiment", "Negative"),
                ("sentiment", "positive"),
                ("factoid", "HMG-CoA reductase"),
                ("factoid", "insulin"),
                ("summary", "Revenue rose nine percent while margins held steady."),
                ("summary", "Revenue rose nine percent while margins held steady."),
            ]
        )
    ]
    labels = task_label_sets(seeds)
    assert labels == {"sentiment": ("positive", "negative")}  # factoid never repeats; summaries are long
    fallback = extract_options("How does the market see this news?", "Shares jumped.", labels["sentiment"])
    assert fallback.keys == ("positive", "negative")


@pytest.mark.parametrize(
    "output, expected",
    [
        ("positive", 0),
        ("Positive.", 0),
        ("  neutral ", 2),
        ("negative, because sales fell", 1),
        ("The sentiment is negative.", 1),
        ("I think it is good", None),
        ("", None),
    ],
)
def test_match_option_reads_free_answers(output, expected):
    assert match_option(output, Options("labels", SENTIMENT, SENTIMENT)) == expected


def test_match_option_for_choices():
    choices = Options("choices", ("A", "B"), ("A) aspirin", "B) heparin"))
    assert [match_option(text, choices) for text in ("B", "B) heparin", "(A)", "heparin", "b) heparin", "C")] == [
        1,
        1,
        0,
        None,
        1,
        None,
    ]


def test_calibration_on_hand_numbers():
    # The model prefers "positive" whatever the input (prior): raw argmax says positive three times.
    scores = [[-1.0, -3.0, -2.0], [-1.2, -2.0, -2.4], [-0.8, -3.2, -1.0], [-1.0, -3.8, -2.6]]
    groups = ["p/n/u"] * 4
    assert [best_option(row) for row in scores] == [0, 0, 0, 0]
    # priors: positive -1.0, negative -3.0, neutral -2.0
    adjusted = calibrate_scores(scores, groups)
    assert adjusted[1] == pytest.approx([-0.2, 1.0, -0.4])
    assert [best_option(row) for row in adjusted] == [0, 1, 2, 0]
    assert margin(adjusted[2], 2) == pytest.approx(1.0 - 0.2)
    assert calibrate_scores(scores, groups, calibrate=False) == scores
    assert calibrate_scores(scores[:3], groups[:3]) == scores[:3]  # too few items to estimate a prior
    # groups are calibrated separately
    mixed = calibrate_scores(scores + [[-5.0, -1.0]] * 4, groups + ["yes/no"] * 4)
    assert mixed[4] == pytest.approx([0.0, 0.0]) and mixed[1] == adjusted[1]


def test_batch_calibration_divides_by_the_mean_probability():
    import math

    # Option probabilities 0.9/0.1, 0.6/0.4, 0.8/0.2, 0.5/0.5, as unnormalised log-likelihoods (offset -3).
    probabilities = [(0.9, 0.1), (0.6, 0.4), (0.8, 0.2), (0.5, 0.5)]
    scores = [[math.log(p) - 3, math.log(q) - 3] for p, q in probabilities]
    adjusted = calibrate_scores(scores, ["yes/no"] * 4, method="batch")
    # mean probabilities 0.7 and 0.3: "yes" only where it beats its prior by more than "no" does
    assert adjusted[1] == pytest.approx([math.log(0.6 / 0.7), math.log(0.4 / 0.3)])
    assert [best_option(row) for row in adjusted] == [0, 1, 0, 1]
    assert calibrate_scores(scores, ["yes/no"] * 4, calibrate=False, method="batch") == scores
    with pytest.raises(SelfspecError, match="unknown calibration 'magic'"):
        calibrate_scores(scores, ["yes/no"] * 4, method="magic")
    assert option_score(-6.0, 3, Options("choices", ("A",), ("A) x",))) == -2.0
    assert option_score(-6.0, 3, Options("labels", ("yes",), ("yes",))) == -6.0
    assert option_requests("Answer:", Options("labels", ("yes", "no"), ("yes", "no"))) == [
        ("Answer:", " yes"),
        ("Answer:", " no"),
    ]


def test_loglikelihood_choice_on_the_tiny_model(tiny_model_dir):
    ref = ModelRef("tiny", str(tiny_model_dir))
    generator = HFGenerator(load_model(ref), load_tokenizer(ref), batch_size=4)
    options = Options("labels", SENTIMENT, SENTIMENT)
    prompts = [
        f"Instruction: Classify the sentiment.\nInput: {text}\nAnswer:"
        for text in ("Profit rose.", "Losses widened.", "The office is in Lyon.", "Sales doubled.", "Jobs were cut.")
    ]
    raw = [
        [option_score(lp, n, options) for lp, n in generator.loglikelihood(option_requests(p, options))]
        for p in prompts
    ]
    assert all(len(row) == 3 and all(math.isfinite(s) and s < 0 for s in row) for row in raw)
    adjusted = calibrate_scores(raw, [options.group] * len(raw))
    # after calibration each option's mean over the items is zero: no label is favoured a priori
    for option in range(3):
        assert sum(row[option] for row in adjusted) == pytest.approx(0.0, abs=1e-6)
    chosen = [best_option(row) for row in adjusted]
    assert all(0 <= c < 3 for c in chosen)
    assert chosen == [best_option(row) for row in calibrate_scores(raw, [options.group] * len(raw))]  # deterministic


def test_label_cap_keeps_the_most_confident_and_drops_one_label_groups():
    labels = (
        [("s", "pos")] * 6 + [("s", "neg")] * 2 + [("s", "neu")] * 1 + [None] + [("yn", "yes")] * 4 + [("ab", "a")] * 3
    )
    confidence = [0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 1.0, 1.0, 1.0, 0.0] + [1.0] * 7
    keep = cap_labels(labels, confidence, 0.5)
    # m = 3: 3 <= 0.5 * (3 + 2 + 1); m = 4 would need 4 <= 3.5
    assert [i for i in range(6) if keep[i]] == [1, 2, 4]
    assert keep[6:10] == [True, True, True, True]
    assert keep[10:14] == [False] * 4  # a group whose answer is always "yes" teaches nothing
    assert keep[14:] == [True] * 3  # three records are too few to have a label distribution
    kept = [label for label, flag in zip(labels, keep) if flag]
    distribution = label_shares(kept)
    assert distribution == {"ab": {"a": 3}, "s": {"neg": 2, "neu": 1, "pos": 3}}
    assert max_label_share(distribution) == 0.5 and max_label_share(distribution, min_items=1) == 1.0
    assert cap_labels(labels, confidence, 1.0) == [True] * len(labels)
    balanced = cap_labels(labels, confidence, 0.0)  # at most 1/n: every label at the rarest one's count
    assert label_shares([label for label, flag in zip(labels, balanced) if flag])["s"] == {"neg": 1, "neu": 1, "pos": 1}
    assert cap_labels(labels, [0.0] * len(labels), 0.5)[:6] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]  # ties: earlier first


def test_self_consistency_vote_and_centrality():
    assert majority(["pos", "neg", "pos"]) == ("pos", pytest.approx(2 / 3))
    assert majority(["neg", "pos"]) == ("neg", 0.5)  # a tie goes to the first answer
    texts = [
        "Revenue rose 9% to 1.4 billion.",
        "Revenue rose 9 percent to 1.4 billion dollars.",
        "Revenue rose 9% to USD 1.4 billion.",
        "The weather is nice.",
    ]
    index, agreement = most_central(texts)
    assert index in (0, 2) and 0.4 < agreement < 1.0
    assert most_central(texts, eligible=[1, 3])[0] == 1
    assert most_central(["only one"]) == (0, 1.0)
    assert most_central(["a b c", "x y z"])[1] == 0.0


CHECKS = parse_checks("degenerate,echo,refusal,truncated,copy,language,code")


@pytest.mark.parametrize(
    "output, finished, reason",
    [
        ("", True, "empty"),
        ("Revenue rose because prices recovered.", False, "truncated"),
        ("the profit the profit the profit the profit", True, "degenerate"),
        ("positive\nInput: Harborline won a deal", True, "echo"),
        ("Task: Classify the sentence.", True, "echo"),
        ("### Response: neutral", True, "echo"),
        ("Harborline Logistics won a five-year deal worth USD 240 million to run two terminals.", True, "echo"),
        ("Classify the sentiment of this sentence for the reader, and say why!", True, "copy"),
        ("The best answer: classify the sentiment of this sentence for the reader and say why.", True, "echo"),
        ("Harborline Logistics won a five-year deal, which is good news.", True, None),  # part of the input is fine
        ("I'm sorry, but I cannot classify this sentence.", True, "refusal"),
        ("As an AI language model, I think it is positive.", True, "refusal"),
        ("Here is the answer: positive", True, "refusal"),
        (
            "Le chiffre d'affaires de la société a augmenté et les marges sont restées stables pour le trimestre.",
            True,
            "language",
        ),
        ("Выручка компании выросла на девять процентов за квартал.", True, "language"),
        ("The answer is:", True, "truncated"),
        ("def classify(text):\n    return 'positive'", True, "code"),
        ("The sentence reports a large new contract, which is good news for the company's shareholders.", True, None),
        ("ORG: Halvorsen Capital, Nordlys Seafood; PER: Ingrid Solberg", True, None),
    ],
)
def test_response_checks_on_planted_bad_answers(output, finished, reason):
    instruction = "Classify the sentiment of this sentence for the reader and say why."
    input_text = "Harborline Logistics won a five-year deal worth USD 240 million to run two terminals."
    assert response_problem(output, finished, instruction, input_text, CHECKS, "en") == reason


def test_checks_can_be_switched_off():
    assert parse_checks("") == frozenset()
    assert response_problem("I'm sorry, I cannot.", False, "q", "", frozenset(), "en") is None
    assert response_problem("   ", True, "q", "", frozenset(), "en") == "empty"  # an empty answer is never data
    with pytest.raises(SelfspecError, match="unknown check 'rudeness'"):
        parse_checks("echo,rudeness")


def test_clean_response_and_language_guess():
    assert clean_response("  Answer: positive\n###") == "positive"
    assert clean_response("Response:  The margin fell.  ") == "The margin fell."
    assert clean_response("negative\n\n#\n\nThe company has a new policy.") == "negative"
    assert clean_response("Cash flow #1 is positive.") == "Cash flow #1 is positive."
    assert language_of("The company reported that revenue for the quarter was higher than expected.") == "en"
    assert language_of("Die Firma meldet, dass der Umsatz im Quartal höher ist als erwartet und nicht sinkt.") == "de"
    assert language_of("positive") is None  # too short to tell


def test_judge_scores_and_top_fraction(tiny_model_dir):
    ref = ModelRef("tiny", str(tiny_model_dir))
    generator = HFGenerator(load_model(ref), load_tokenizer(ref), batch_size=4)
    judge = PromptTemplate(
        example="", query="Instruction: {instruction}\nAnswer: {output}\nGood? Reply yes or no.\nReply:", separator=""
    )
    records = [
        {"instruction": "Classify.", "input": "", "output": answer} for answer in ("positive", "negative", "neutral")
    ]
    scores = judge_scores(generator, judge, records, {})
    yes_no = generator.loglikelihood([(judge.render([], records[0]), " yes"), (judge.render([], records[0]), " no")])
    assert scores[0] == pytest.approx(yes_no[0][0] - yes_no[1][0])
    assert top_fraction([0.5, 2.0, -1.0, 2.0], 0.5) == [False, True, False, True]
    assert top_fraction([1.0, 1.0, 1.0], 0.34) == [True, True, False]  # ceil(1.02) = 2, ties: earlier first
    assert histogram([0.0, 1.0, 1.0, 2.0], bins=2) == {"edges": [0.0, 1.0, 2.0], "counts": [1, 3]}
