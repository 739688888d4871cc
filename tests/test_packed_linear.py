"""Linear layers on weights packed once for oneDNN (CPU inference), on the tiny random model."""

import pytest
import torch

from selfspec_core.models import packed_linear
from selfspec_core.models.generator import HFGenerator
from selfspec_core.models.loading import ModelRef, load_model, load_tokenizer

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

IDS = torch.tensor([[5, 17, 42, 9, 3, 77, 12], [8, 8, 31, 64, 2, 19, 40]])


def linears(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_packed_layers_compute_what_the_plain_ones_do(tiny_model_dir, dtype):
    model = load_model(ModelRef("tiny", str(tiny_model_dir)), dtype=dtype)
    with torch.inference_mode():
        plain = model(input_ids=IDS).logits

        assert packed_linear.pack_linears(model)
        for layer in linears(model):  # the packed copies are what gets multiplied now
            layer.weight.zero_()
        packed = model(input_ids=IDS).logits

    assert all(getattr(m, packed_linear.PACKED, False) for m in linears(model))
    assert packed.dtype == plain.dtype == torch.float32  # the output layer still computes in float32
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    assert not packed_linear.pack_linears(model)  # nothing left to pack


def test_calls_that_track_gradients_keep_the_plain_product(tiny_model_dir):
    ref = ModelRef("tiny", str(tiny_model_dir))
    plain, packed = load_model(ref), load_model(ref)
    packed_linear.pack_linears(packed)
    for model in (plain, packed):
        model(input_ids=IDS).logits.logsumexp(-1).sum().backward()
    grads = [(a.grad, b.grad) for a, b in zip(plain.parameters(), packed.parameters()) if a.grad is not None]
    assert grads and all(torch.equal(a, b) for a, b in grads)


def test_left_alone_when_the_copies_would_not_fit(tiny_model_dir, monkeypatch):
    model = load_model(ModelRef("tiny", str(tiny_model_dir)), dtype="bfloat16")
    weights = sum(m.weight.numel() * m.weight.element_size() for m in linears(model))
    monkeypatch.setattr(packed_linear, "available_memory", lambda: 2 * weights)  # copies need over a quarter
    assert not packed_linear.pack_linears(model)
    assert not any(hasattr(m, packed_linear.PACKED) for m in linears(model))


def test_the_generator_packs_a_finished_model_not_a_peft_one(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    ref = ModelRef("tiny", str(tiny_model_dir))
    tokenizer = load_tokenizer(ref)
    finished = load_model(ref, dtype="bfloat16")
    HFGenerator(finished, tokenizer)
    assert all(hasattr(m, packed_linear.PACKED) for m in linears(finished))

    adapted = get_peft_model(load_model(ref), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    HFGenerator(adapted, tokenizer)  # its adapters could still be merged into the weights
    assert not any(hasattr(m, packed_linear.PACKED) for m in linears(adapted))
