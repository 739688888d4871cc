"""The in-process transformers backend: batching must not change results."""

import json

import pytest
import torch

from selfspec_core.models.generator import GENERATE_TOP_K, HFGenerator, alike_lengths, cut_at_stop, token_batches
from selfspec_core.models.loading import ModelRef, load_model, load_tokenizer

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


def test_greedy_equals_transformers_generate_while_rows_leave_the_batch(parts):
    """Rows that stop (at a stop string here) leave the batch early; the rest must not change."""
    model, tokenizer = parts
    generator = HFGenerator(model, tokenizer, batch_size=4)
    free = generator.generate(PROMPTS, max_new_tokens=12)
    tokenizer.padding_side = "left"
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        output = model.generate(**encoded, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = [tokenizer.decode(row[encoded.input_ids.shape[1] :], skip_special_tokens=True) for row in output]
    assert [c.text for c in free] == expected
    # a stop string from the middle of the longest completion ends that row, the others run on
    longest = max(range(len(free)), key=lambda i: len(free[i].text))
    stop = free[longest].text[len(free[longest].text) // 2 :][:3]
    stopped = generator.generate(PROMPTS, max_new_tokens=12, stop=[stop])
    assert [c.text for c in stopped] == [cut_at_stop(text, [stop])[0] for text in expected]
    assert stopped[longest].finished and stopped[longest].num_tokens < free[longest].num_tokens


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_runs_only_the_real_tokens_with_the_padded_pass_numbers(tiny_model_dir, dtype, monkeypatch):
    """A left-padded batch's prompt pass puts only its real tokens through the model (attention on
    the padded layout), and every real token's logits, keys and values are bit for bit the padded
    pass's; so are the completions decoded from it."""
    from selfspec_core.models import generator as module
    from selfspec_core.models.generator import left_padded, prefill

    ref = ModelRef("tiny", str(tiny_model_dir))
    model, tokenizer = load_model(ref, dtype=dtype), load_tokenizer(ref)
    rows = [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    ids, mask, positions = left_padded(rows, tokenizer.pad_token_id)
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda **kwargs: seen.append(kwargs["input_ids"].shape) or forward(**kwargs))
    with torch.inference_mode():
        logits, cache = prefill(model, ids, mask, positions)
        padded = forward(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    assert seen == [(1, sum(map(len, rows)))] and int(mask.sum()) < mask.numel()
    assert torch.equal(logits, padded.logits[:, -1])
    real = mask.bool()
    for ours, theirs in zip(cache.layers, padded.cache.layers):
        for a, b in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
            assert torch.equal(a.transpose(1, 2)[real], b.transpose(1, 2)[real])
            assert not a.transpose(1, 2)[~real].any()  # padding: zeros, hidden by the mask
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.setattr(model, "forward", forward)
    generator = HFGenerator(model, tokenizer, batch_size=4)
    calls = [dict(max_new_tokens=10), dict(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=2)]
    packed = [generator.generate(PROMPTS, **call) for call in calls]
    monkeypatch.setattr(module, "PACKED_PREFILL_MODEL_TYPES", ())
    assert packed == [generator.generate(PROMPTS, **call) for call in calls]


def test_prefill_of_a_batch_without_padding_is_the_plain_pass(parts, monkeypatch):
    from selfspec_core.models.generator import prefill

    model, _ = parts
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda **kwargs: seen.append(kwargs["input_ids"].shape) or forward(**kwargs))
    with torch.inference_mode():
        prefill(model, ids, torch.ones_like(ids), torch.arange(3).repeat(2, 1))
    assert seen == [(2, 3)]


def test_sampling_keeps_to_the_top_k_tokens_as_transformers_generate(parts):
    """A model whose config sets no top_k samples from the 50 likeliest tokens, as ``generate`` does."""
    model, tokenizer = parts
    assert model.generation_config.top_k is None
    sample = HFGenerator(model, tokenizer)._sampler(temperature=1.0, top_p=1.0)
    logits = -torch.arange(1000, dtype=torch.float32).repeat(64, 1) / 100  # flat: without top-k most fall beyond 50
    torch.manual_seed(0)
    drawn = torch.cat([sample(logits) for _ in range(20)])
    assert int(drawn.max()) < GENERATE_TOP_K and len(set(drawn.tolist())) > 10


def test_sampling_distribution_is_transformers_warpers_over_the_whole_vocabulary(parts):
    """Top-p on the top-k candidates gives every token the probability that transformers' temperature,
    top-k and top-p warpers give it over the whole vocabulary."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    model, tokenizer = parts
    torch.manual_seed(1)
    logits = torch.randn(8, 1000) * 3
    for temperature, top_p in ((0.7, 0.9), (1.0, 0.5), (1.3, 1.0)):
        candidates, probabilities = HFGenerator(model, tokenizer)._distribution(temperature, top_p)(logits)
        ours = torch.zeros_like(logits).scatter(-1, candidates, probabilities)
        warped = logits
        for warp in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(GENERATE_TOP_K), TopPLogitsWarper(top_p)):
            warped = warp(None, warped)
        assert torch.allclose(ours, torch.softmax(warped, dim=-1), atol=1e-6)
        assert (ours > 0).sum(-1).max() <= GENERATE_TOP_K


def test_sampling_is_seeded(parts):
    generator = HFGenerator(*parts, batch_size=2)
    first = generator.generate(PROMPTS, max_new_tokens=6, temperature=1.0, top_p=0.98, seed=3)
    again = generator.generate(PROMPTS, max_new_tokens=6, temperature=1.0, top_p=0.98, seed=3)
    other = generator.generate(PROMPTS, max_new_tokens=6, temperature=1.0, top_p=0.98, seed=4)
    assert first == again and first != other


def test_loglikelihood_matches_a_manual_forward_pass(parts):
    model, tokenizer = parts
    # "The answer is" has continuations of 1 to 4 tokens: scored on its cached keys and values
    requests = [
        ("The answer is", " yes"),
        ("The answer is", " no"),
        ("The answer is", " no maybe"),
        ("The answer is", " perhaps not at all"),
        ("Other", "x"),
        ("Other", "y"),
    ]
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


def test_single_token_scoring_is_the_same_in_any_batch_of_left_padded_contexts(parts):
    model, tokenizer = parts
    contexts = [
        "Hi",
        "The company reported a rise in",
        "Patients receiving the treatment showed no change in blood",
        "0 1 2 3",
        "Instruction: Classify the sentiment of the sentence below. Sentence:",
    ]
    requests = [(c, label) for c in contexts for label in (" yes", " no")]
    one_at_a_time = HFGenerator(model, tokenizer, batch_tokens=1).loglikelihood(requests)
    together = HFGenerator(model, tokenizer, batch_tokens=10_000).loglikelihood(requests)
    for (context, continuation), alone, batched in zip(requests, one_at_a_time, together):
        ids = tokenizer(context, add_special_tokens=False).input_ids
        target = tokenizer(continuation, add_special_tokens=False).input_ids
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)[target[0]].item()
        assert alone == pytest.approx((expected, 1), abs=1e-4) and batched == pytest.approx((expected, 1), abs=1e-4)


def test_longer_continuations_score_the_same_in_any_batch_of_cached_contexts(parts):
    """Contexts of different lengths (left-padded together) with continuations of 1 to 4 tokens
    (right-padded on the repeated cache): each score as one unpadded forward pass computes it."""
    model, tokenizer = parts
    contexts = ["Hi", "The company reported a rise in", "Patients receiving the treatment showed no change in blood"]
    requests = [(c, label) for c in contexts for label in (" no", " no maybe", " perhaps not at all")]
    one_at_a_time = HFGenerator(model, tokenizer, batch_tokens=1).loglikelihood(requests)
    together = HFGenerator(model, tokenizer, batch_tokens=10_000).loglikelihood(requests)
    for (context, continuation), alone, batched in zip(requests, one_at_a_time, together):
        a = tokenizer(context, add_special_tokens=False).input_ids
        b = tokenizer(continuation, add_special_tokens=False).input_ids
        logprobs = torch.log_softmax(model(torch.tensor([a + b])).logits[0].float(), -1)
        expected = (sum(logprobs[len(a) - 1 + i, t].item() for i, t in enumerate(b)), len(b))
        assert alone == pytest.approx(expected, abs=1e-4) and batched == pytest.approx(expected, abs=1e-4)


def test_token_batches_fill_a_padded_token_budget_longest_first():
    lengths = [10, 300, 40, 40, 300, 5, 900]
    batches = token_batches(lengths, 600)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert batches[0] == [6]  # longer than the budget: alone
    assert batches[1] == [1, 4]  # 2 x 300
    assert all(max(lengths[i] for i in b) * len(b) <= 600 for b in batches[1:])
    assert batches[2] == [2, 3, 0, 5]  # the short ones share one batch


def test_continuations_run_in_groups_of_alike_length():
    """Answer options of 1 to 20 tokens: no group pads past 1.25x its real tokens, every option is in one."""
    lengths = [1, 20, 3, 3, 2, 9, 10, 1, 4, 20, 8]
    groups = alike_lengths(lengths)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        assert max(lengths[i] for i in group) * len(group) <= 1.25 * sum(lengths[i] for i in group)
    assert [lengths[i] for i in groups[-1]] == [20, 20]  # the longest together
    assert alike_lengths(lengths, waste=float("inf")) == [sorted(range(len(lengths)), key=lambda i: lengths[i])]


def test_model_calls_are_metered_with_a_ceiling_above_the_measured_rate(parts):
    from selfspec_core.runtime import throughput

    model, tokenizer = parts
    with throughput.metered() as meter:
        HFGenerator(model, tokenizer, batch_size=2).generate(PROMPTS, max_new_tokens=3)
        HFGenerator(model, tokenizer).loglikelihood([("The answer is", " yes"), ("The answer is", " no maybe")])
    prompt_tokens = sum(len(tokenizer(p, add_special_tokens=False).input_ids) for p in PROMPTS)
    context = len(tokenizer("The answer is", add_special_tokens=False).input_ids)
    continuation = len(tokenizer(" yes", add_special_tokens=False).input_ids) + len(
        tokenizer(" no maybe", add_special_tokens=False).input_ids
    )
    assert meter.prompt_tokens == prompt_tokens + context + continuation
    assert 0 < meter.generated_tokens <= 3 * len(PROMPTS) and meter.seconds > 0
    assert meter.parameters == sum(p.numel() for p in model.parameters())
    figures = meter.figures("float32")
    assert figures["ceiling_tokens_per_second"] > 0 and figures["tokens_per_second"] > 0
    with throughput.metered() as training:
        throughput.record(10, 0, 1.0, meter.parameters, passes=3.0)  # a call worth three forward passes a token
    assert training.figures("float32")["ceiling_tokens_per_second"] == pytest.approx(
        figures["ceiling_tokens_per_second"] / 3, rel=0.01
    )
    with throughput.metered() as outside:
        pass
    assert outside.prompt_tokens == 0 and "tokens_per_second" not in outside.figures("float32")


def test_the_matmul_rate_is_the_best_measured_on_this_machine(tmp_path, monkeypatch):
    """A rate timed while another job runs is lower; the ceiling keeps the best one measured here."""
    from selfspec_core.runtime import throughput

    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))
    timings = iter([400.0, 150.0, 420.0])
    monkeypatch.setattr(throughput, "measure_matmul_gflops", lambda dtype, device: next(timings))
    rates = []
    for _ in range(3):
        throughput.matmul_gflops.cache_clear()
        rates.append(throughput.matmul_gflops("bfloat16"))
    throughput.matmul_gflops.cache_clear()
    assert rates == [400.0, 400.0, 420.0]
    kept = json.loads((tmp_path / throughput.RATES_FILE).read_text())
    assert list(kept.values()) == [420.0] and "bfloat16" in next(iter(kept))
