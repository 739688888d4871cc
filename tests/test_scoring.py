import dataclasses
import math

import numpy as np
import pytest
import torch

from selfspec_core.data.tasks import CHOICE_SCORES, EvalItem
from selfspec_core.errors import SelfspecError
from selfspec_core.eval.scoring import (
    ItemScore,
    accuracy,
    choice_request,
    choice_values,
    compare,
    compare_macro_f1,
    exact_match,
    macro_f1,
    metric_score,
    normalize_answer,
    numeric_match,
    paired_bootstrap,
    parse_number,
    parsed_label,
    rescore,
    rouge_l,
    score_generation,
    score_loglikelihood,
    token_f1,
)
from selfspec_core.models.generator import HFGenerator
from selfspec_core.models.loading import ModelRef, load_model, load_tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    ref = ModelRef("tiny", str(tiny_model_dir))
    return load_model(ref), load_tokenizer(ref)


def test_squad_normalization_and_exact_match():
    assert normalize_answer("  The Cat, sat!  ") == "cat sat"
    assert exact_match("The cat.", "cat") == 1.0
    assert exact_match("a dog", "cat") == 0.0


def test_token_f1_matches_hand_computation():
    # normalized: "cat sat on mat" vs "cat sat on hat": 3 shared of 4 -> P = R = 0.75
    assert token_f1("the cat sat on the mat", "a cat sat on a hat") == pytest.approx(0.75)
    # "cat cat" vs "cat": 1 shared; P = 1/2, R = 1 -> F1 = 2/3
    assert token_f1("cat cat", "cat") == pytest.approx(2 / 3)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("the", "a") == 1.0  # both empty after normalization


def test_rouge_l_matches_hand_computation():
    # LCS "the cat on the mat" = 5 of 6 words on both sides
    assert rouge_l("the cat is on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    # LCS "a c" = 2; P = 2/3, R = 2/2 -> F = 0.8
    assert rouge_l("a b c", "a c") == pytest.approx(0.8)


@pytest.mark.parametrize(
    "text, value, percent",
    [
        ("(1,234.5)", -1234.5, False),
        ("12.5%", 12.5, True),
        ("a loss of -3 million", -3.0, False),
        ("revenue of $1,200 million in 2019", 1200.0, False),
        ("Q3 rose 7", 7.0, False),
        ("about .5", 0.5, False),
        ("pre-2019 levels", 2019.0, False),
        ("(4.2%)", -4.2, True),
    ],
)
def test_parse_number(text, value, percent):
    parsed = parse_number(text)
    assert parsed.value == pytest.approx(value) and parsed.percent == percent


def test_numeric_match_with_relative_tolerance():
    assert numeric_match("1,234", "1234") == 1.0
    assert numeric_match("The answer is 1250", "1234", tolerance=0.01) == 0.0  # off by 16 > 12.34
    assert numeric_match("The answer is 1250", "1234", tolerance=0.02) == 1.0  # 16 <= 24.68
    assert numeric_match("12.5%", "0.125") == 1.0
    assert numeric_match("(5)", "-5") == 1.0
    assert numeric_match("no number", "5") == 0.0
    assert numeric_match("Europe", "europe") == 1.0  # span reference: exact match
    assert numeric_match("0", "0") == 1.0 and numeric_match("0.001", "0") == 0.0
    # the stated answer wins over the arithmetic before it; without a statement, the first number
    assert numeric_match("2019 revenue 500 minus 2018 revenue 400 = 100. The answer is 100.", "100") == 1.0
    assert numeric_match("The answer is: \n$1,305.", "1305") == 1.0
    assert numeric_match("18.6 million in 2019", "18.6") == 1.0


def test_parsed_label_and_accuracy():
    choices = ("yes", "no", "maybe")
    assert parsed_label("The answer is no, not yes", choices) == "no"
    assert parsed_label("Maybe.", choices) == "maybe"
    assert parsed_label("none of these", choices) is None  # "no" is not a word of "none"
    assert parsed_label("no change expected", ("no", "no change")) == "no change"
    assert accuracy("I think: No.", "no", choices) == 1.0
    assert accuracy("yes", "no", choices) == 0.0
    assert accuracy("positive.", "Positive") == 1.0  # no choices: exact match
    with pytest.raises(SelfspecError, match="unknown metric"):
        metric_score("bleu", "a", "a")


def test_choice_request_places_the_space_with_the_answer():
    assert choice_request("Answer:", "yes") == ("Answer:", " yes")
    assert choice_request("Answer: ", " yes") == ("Answer:", " yes")
    assert choice_request("### Response:\n", "yes") == ("### Response:\n", "yes")


def _manual_logprob(model, tokenizer, context, continuation):
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    continuation_ids = tokenizer(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    total = sum(logprobs[len(context_ids) - 1 + i, token].item() for i, token in enumerate(continuation_ids))
    return total, len(continuation_ids)


def test_loglikelihood_scoring_matches_a_manual_forward_pass(tiny):
    model, tokenizer = tiny
    generator = HFGenerator(model, tokenizer, batch_size=3)
    items = [
        EvalItem("a", "Is it good?", "", "yes", ("yes", "no", "maybe positive negative neutral")),
        EvalItem("b", "Sentiment?", "Revenue rose.", "positive", ("positive", "négatif", "neutral")),
    ]
    prompts = ["Question: is it good?\nAnswer:", "### Response:\n"]
    free_prompts = ["Answer:", "### Response:\n"]  # the second item's is its own prompt: calibrated to 0
    expected = {
        "acc": lambda total, tokens, choice, prior: total,
        "acc_per_token": lambda total, tokens, choice, prior: total / tokens,
        "acc_norm": lambda total, tokens, choice, prior: total / len(choice.encode("utf-8")),
        "acc_calibrated": lambda total, tokens, choice, prior: total - prior,
    }
    assert set(expected) == set(CHOICE_SCORES)
    for how, value in expected.items():
        scores = score_loglikelihood(
            generator, prompts, items, metric="accuracy", how=how, content_free_prompts=free_prompts
        )
        for prompt, free, item, score in zip(prompts, free_prompts, items, scores):
            manual = [_manual_logprob(model, tokenizer, *choice_request(prompt, c)) for c in item.choices]
            priors = [_manual_logprob(model, tokenizer, *choice_request(free, c))[0] for c in item.choices]
            assert score.logprobs == pytest.approx([total for total, _ in manual], abs=1e-3)
            assert score.tokens == tuple(tokens for _, tokens in manual)
            assert score.content_free == pytest.approx(priors, abs=1e-3)
            values = [value(total, tokens, c, p) for (total, tokens), c, p in zip(manual, item.choices, priors)]
            assert choice_values(how, item.choices, score) == pytest.approx(values, abs=1e-3)
            assert score.prediction == item.choices[int(np.argmax(values))]
            assert score.score == float(score.prediction == item.answer)
    assert scores[1].prediction == "positive"  # all calibrated values 0: the first choice
    uncalibrated = score_loglikelihood(generator, prompts, items, metric="accuracy")
    assert uncalibrated[0].content_free == ()
    with pytest.raises(SelfspecError, match="scored without a content-free prompt"):
        rescore(items, uncalibrated, "acc_calibrated", "accuracy")


def test_each_choice_score_picks_its_own_answer_from_the_same_numbers():
    """A long choice loses by summed log-probability, wins per token or byte; the prior-favoured one
    loses once calibrated: the four ways can disagree on one item, and rescoring needs no model."""
    item = EvalItem("x", "Which clause?", "The tenant pays monthly.", "payment", ("payment", "confidentiality"))
    score = ItemScore("x", "", 0.0, logprobs=(-2.0, -4.0), tokens=(1, 4), content_free=(-0.5, -4.5))
    picked = {how: rescore([item], [score], how, "accuracy")[0] for how in CHOICE_SCORES}
    assert picked["acc"].prediction == "payment" and picked["acc"].score == 1.0
    assert picked["acc_per_token"].prediction == "confidentiality" and picked["acc_per_token"].score == 0.0
    assert choice_values("acc_norm", item.choices, score) == pytest.approx([-2 / 7, -4 / 15])
    assert picked["acc_norm"].prediction == "confidentiality"
    assert choice_values("acc_calibrated", item.choices, score) == pytest.approx([-1.5, 0.5])
    assert picked["acc_calibrated"].prediction == "confidentiality"
    assert picked["acc"].logprobs == score.logprobs  # the numbers stay; only the pick changes
    assert ItemScore.from_dict(dataclasses.asdict(score)) == score
    with pytest.raises(SelfspecError, match="unknown choice score 'acc_bogus'"):
        choice_values("acc_bogus", item.choices, score)


def test_generation_scoring_matches_greedy_decoding(tiny):
    model, tokenizer = tiny
    generator = HFGenerator(model, tokenizer, batch_size=2)
    prompts = ["The company reported", "Patients receiving"]
    manual = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        manual.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    items = [EvalItem("a", "", "", manual[0]), EvalItem("b", "", "", "zzz unrelated")]
    scores = score_generation(generator, prompts, items, metric="f1", max_new_tokens=6)
    assert [s.prediction for s in scores] == manual
    assert scores[0].score == 1.0
    assert scores[1].score == token_f1(manual[1], "zzz unrelated")


def test_paired_bootstrap_constant_difference_is_exact():
    assert paired_bootstrap([0.0] * 40, [1.0] * 40, samples=200, seed=1) == (1.0, 1.0)


def test_paired_bootstrap_covers_the_true_difference_and_is_deterministic():
    rng = np.random.default_rng(123)
    base = rng.integers(0, 2, size=400).astype(float)
    # the specialized model fixes 20% of the wrong answers: true delta = 0.2 * share wrong
    fixed = (base == 0) & (rng.random(400) < 0.2)
    specialized = np.where(fixed, 1.0, base)
    true_delta = 0.2 * (1 - 0.5)
    low, high = paired_bootstrap(base, specialized, samples=2000, seed=7)
    assert low < true_delta < high
    assert low < specialized.mean() - base.mean() < high
    assert low > 0  # a real gain is told apart from noise
    # analytic standard error of a mean of paired differences
    differences = specialized - base
    se = differences.std() / math.sqrt(differences.size)
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert paired_bootstrap(base, specialized, samples=2000, seed=7) == (low, high)


def test_compare_reports_means_delta_and_interval():
    summary = compare([1, 0, 0, 1], [1, 1, 0, 1], samples=500, seed=0)
    assert summary["base"] == 0.5 and summary["specialized"] == 0.75 and summary["delta"] == 0.25
    assert summary["n"] == 4 and summary["ci"][0] <= 0.25 <= summary["ci"][1]


def test_macro_f1_matches_hand_computation():
    gold = ["pos", "pos", "neg", "neu", "neu", "neu"]
    predicted = ["pos", "neu", "neg", "neu", "pos", "neu"]
    # pos: tp 1, 2 predicted, 2 gold -> 0.5; neg: 1/1/1 -> 1.0; neu: tp 2, 3 predicted, 3 gold -> 2/3
    assert macro_f1(gold, predicted) == pytest.approx((0.5 + 1.0 + 2 / 3) / 3)
    # an answer outside the labels is wrong for every label; a label never given nor gold scores 0
    assert macro_f1(["a", "b", "b"], ["a", "?", "a"]) == pytest.approx((2 / 3 + 0) / 2)
    assert macro_f1(["a", "a"], ["a", "a"], labels=["a", "b"]) == pytest.approx(0.5)


def test_macro_f1_does_not_reward_a_move_to_the_majority_label():
    gold = ["neutral"] * 6 + ["positive"] * 2 + ["negative"] * 2
    always_positive = ["positive"] * 10
    always_neutral = ["neutral"] * 10
    reads_sentiment = ["neutral"] * 4 + ["positive"] * 2 + ["positive"] * 2 + ["negative"] * 2
    result = compare_macro_f1(gold, always_positive, always_neutral, samples=500, seed=3)
    # accuracy would go 0.2 -> 0.6; macro-F1 only from 1/9 to 0.25, the majority answer's own score
    assert result["base"] == pytest.approx((2 * 2 / 12) / 3) and result["specialized"] == pytest.approx(0.25)
    assert result["majority"] == pytest.approx(0.25)
    better = compare_macro_f1(gold, always_neutral, reads_sentiment, samples=500, seed=3)
    assert better["specialized"] > better["majority"] and better["delta"] > 0
    assert better["ci"][0] <= better["delta"] <= better["ci"][1]
    assert compare_macro_f1(gold, always_neutral, reads_sentiment, samples=500, seed=3) == better  # deterministic
    same = compare_macro_f1(gold, reads_sentiment, reads_sentiment, samples=200)
    assert same["delta"] == 0 and same["ci"] == [0.0, 0.0]
    with pytest.raises(ValueError):
        compare_macro_f1(gold, always_neutral, always_neutral[:3])
