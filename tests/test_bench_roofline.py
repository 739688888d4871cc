"""bench/roofline.py on the tiny model: the products it records are a step's own, forward and backward,
as torch counts them, and it measures a finished run with that run's own settings."""

import json
from pathlib import Path

import pytest
import torch

from selfspec_core.config import load_settings
from selfspec_core.models.loading import ModelRef, load_tokenizer
from selfspec_core.models.prompting import PromptFormat
from selfspec_core.plugins.defaults import TRAIN_TEMPLATE
from selfspec_core.run.rundir import RunDir, write_jsonl
from selfspec_core.stages import train as training

RECORDS = [
    {"instruction": f"Label sentence {i}: positive or negative.", "input": "Revenue rose. " * i, "output": "positive"}
    for i in range(1, 17)
]


@pytest.fixture
def roofline(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import roofline

    return roofline


def test_the_recorder_sees_every_product_of_a_step_as_torch_counts_them(tiny_model_dir, roofline):
    from torch.utils.flop_counter import FlopCounterMode

    ref = ModelRef("tiny", str(tiny_model_dir))
    tokenizer = load_tokenizer(ref)
    model = training.lora_model(ref, load_settings("tiny").train, "none")
    prompts = PromptFormat("alpaca", TRAIN_TEMPLATE, tokenizer)
    examples = [training.encode_example(r, prompts, 64) for r in RECORDS[:4]]
    batch = training.ResponseBatches(tokenizer, packing=True)(
        [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    )
    labels = batch.pop("labels")
    with FlopCounterMode(display=False) as counter, roofline.recording_mode() as products:
        training.response_loss(model(**batch), labels).backward()

    counted = counter.get_flop_counts()["Global"]
    expected = sum(flops for op, flops in counted.items() if str(op).split(".")[-1] in roofline.MATMULS)
    recorded = sum(roofline.matmul_flops(name, shapes) * n for (name, shapes, _, _), n in products.seen.items())
    assert recorded == expected > 0
    # the backward pass is in: a product whose first operand is transposed is an adapter's weight gradient
    assert any(strides[0][0] == 1 for _, _, strides, _ in products.seen)
    assert roofline.replay_seconds(products.seen) > 0


def test_a_run_is_measured_with_its_own_settings(tmp_path, tiny_model_dir, roofline, monkeypatch):
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path / "cache"))
    run = RunDir(tmp_path / "run", "finance").open()  # an installed domain, as the bench looks it up
    write_jsonl(run.partial_dir("respond") / "data.jsonl", RECORDS)
    run.finish("respond", {})
    train = {"quant": "none", "batch_size": 2, "lora_top_share": 0.5}
    config = {"profile": "tiny", "dtype": "float32", "seed": 3, "model": str(tiny_model_dir), "train": train}
    (run.path / "config.json").write_text(json.dumps(config))

    settings, domain, model = roofline.settings_of(run.path, 6)
    assert (settings.train.batch_size, settings.train.lora_top_share, settings.train.max_steps) == (2, 0.5, 6)
    assert (domain.name, model, settings.seed) == ("finance", str(tiny_model_dir), 3)

    torch.manual_seed(0)
    found = roofline.measure(run.path, steps=2, recorded=2, warm=1)
    assert found["products"] > 0 and found["recorded_tokens"] > 0 and found["dtype"] == "float32"
    # the products are part of what a step does, so a step reaches at most their share of the ceiling
    assert 0 < found["share"] < found["matmul_bound"]
