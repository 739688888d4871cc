"""The in-process transformers backend: batching must not change results."""

import pytest
import torch

from selfspec_core.generation import HFGenerator, cut_at_stop
from selfspec_core.models import ModelRef, load_model, load_tokenizer

PROMPTS = ["The company reported", "Patients receiving the treatment", "Instruction: Classify", "0 1 2"]


@pytest.fixture(scope="module")
def parts(tiny_model_dir):
    ref = ModelRef("tiny", str(tiny_model_dir))
    return load_model(ref), load_tokenizer(ref)


def test_batched_greedy_equals_one_at_a_time(parts):
    batched = HFGenerator(*parts, batch_size=4).generate(PROMPTS, max_new_tokens=6)
    single = HFGenerator(*parts, batch_size=1).generate(PROMPTS, max_new_tokens=6)
    assert [c.text for c in batched] == [c.text for c in single]
    assert all(c.num_tokens <= 6 for c in batched)


def test_sampling_is_seeded(parts):
    generator = HFGenerator(*parts, batch_size=2)
    first = generator.generate(PROMPTS, max_new_tokens=6, temperature=1.0, top_p=0.98, seed=3)
    again = generator.generate(PROMPTS, max_new_tokens=6, temperature=1.0, top_p=0.98, seed=3)
    other = generator.generate(PROMPTS, max_new_tokens=6, temperature=1.0, top_p=0.98, seed=4)
    assert first == again and first != other


def test_loglikelihood_matches_a_manual_forward_pass(parts):
    model, tokenizer = parts
    # "The answer is" has continuations of 1 to 4 tokens: scored on its cached keys and values
    requests = [("The answer is", " yes"), ("The answer is", " no"), ("The answer is", " no maybe"),
                ("The answer is", " perhaps not at all"), ("Other", "x"), ("Other", "y")]
    scores = HFGenerator(model, tokenizer, batch_size=3).loglikelihood(requests)
    for (context, continuation), (score, count) in zip(requests, scores):
        a = tokenizer(context, add_special_tokens=False).input_ids
        b = tokenizer(continuation, add_special_tokens=False).input_ids
        logprobs = torch.log_softmax(model(torch.tensor([a + b])).logits[0].float(), -1)
        expected = sum(logprobs[len(a) - 1 + i, t].item() for i, t in enumerate(b))
        assert count == len(b) and score == pytest.approx(expected, abs=1e-4)


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("abc\n###x\nTask", ["\nTask", "\n###"]) == ("abc", True)
    assert cut_at_stop("abc", ["\n###"]) == ("abc", False)
