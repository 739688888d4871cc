"""Stage 3 on the tiny random model: masking, truncation, packing, LoRA-only updates, resume, export."""

import json

import pytest
import torch
from safetensors.torch import load_file

from selfspec_core.config import load_settings
from selfspec_core.errors import SelfspecError
from selfspec_core.models import packed_attention
from selfspec_core.models.loading import ModelRef, load_model, load_tokenizer
from selfspec_core.models.prompting import PromptFormat
from selfspec_core.plugins.defaults import TRAIN_TEMPLATE
from selfspec_core.records import Domain
from selfspec_core.run.context import StageContext
from selfspec_core.run.pipeline import Pipeline
from selfspec_core.run.rundir import RunDir, file_hash, read_jsonl, write_jsonl
from selfspec_core.runtime import throughput
from selfspec_core.stages import train as training
from selfspec_core.stages.train import IGNORE, ResponseBatches, encode_example, export_merged, response_loss
from selfspec_core.testing import build_tiny_model

DOMAIN = Domain("trainingtest", "testing")
RECORDS = [
    {
        "instruction": "Classify the sentiment as positive, negative, or neutral.",
        "input": "The company reported higher quarterly revenue and raised its outlook.",
        "output": "positive",
    },
    {
        "instruction": "Classify the sentiment as positive, negative, or neutral.",
        "input": "Patients receiving the treatment showed lower mortality than controls.",
        "output": "neutral",
    },
    {"instruction": "Answer yes, no, or maybe.", "input": "", "output": "maybe"},
    {"instruction": "Give the number.", "input": "0 1 2 3 4 5 6 7 8 9", "output": "9"},
    {"instruction": "Below is an instruction that describes a task.", "input": "", "output": "yes no maybe positive"},
    {
        "instruction": "Classify the sentiment as positive, negative, or neutral.",
        "input": "The company reported higher quarterly revenue.",
        "output": "negative",
    },
    {"instruction": "Answer yes or no.", "input": "Patients receiving the treatment.", "output": "no"},
    {"instruction": "Write the response.", "input": "", "output": "The company raised its outlook."},
]
PROBE = "### Instruction:\nAnswer yes or no.\n\n### Response:\n"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from threads, and on a busy machine the hand-offs cost seconds a step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(ModelRef("tiny", str(tiny_model_dir)))


def alpaca(tokenizer) -> PromptFormat:
    return PromptFormat("alpaca", TRAIN_TEMPLATE, tokenizer)


def make_ctx(tmp_path, model_dir, records=RECORDS, run=None, dtype="float32", **train):
    """A train stage context over ``records`` (a finished respond stage) with ``train`` overrides; float32
    unless ``dtype`` says otherwise, so exact comparisons hold on CPUs where auto means bfloat16."""
    if run is None:
        run = RunDir(tmp_path / "run", DOMAIN.name).open()
        write_jsonl(run.partial_dir("respond") / "data.jsonl", records)
        run.finish("respond", {})
    settings = load_settings(
        "tiny", overrides={"dtype": dtype, "train": {"quant": "none", "lora_dropout": 0.0, **train}}
    )
    return StageContext(
        settings, DOMAIN, run, [], ModelRef("tiny", str(model_dir)), run.partial_dir("train"), log=lambda _: None
    )


def logits_of(model, text, tokenizer):
    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


class Snapshot(training.TrainerCallback):
    """Records which parameters train, the frozen ones before and after, and the trained model's logits."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.frozen_after = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        self.logits = logits_of(model, PROBE, self.tokenizer)


class StopAt(training.TrainerCallback):
    """Simulates a kill: raises once ``step`` has been logged (after the checkpoint before it)."""

    def __init__(self, step):
        self.step = step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed at step {self.step}")


def test_labels_mask_the_prompt_and_padding(tokenizer):
    record = RECORDS[0]
    example = encode_example(record, alpaca(tokenizer), max_length=256)
    prompt = tokenizer(TRAIN_TEMPLATE.render([], record), add_special_tokens=False).input_ids
    response = tokenizer(record["output"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert example.input_ids == prompt + response
    assert example.labels == [IGNORE] * len(prompt) + response
    assert not example.truncated

    short = encode_example(RECORDS[2], alpaca(tokenizer), max_length=256)
    batch = ResponseBatches(tokenizer, packing=False)(
        [
            {"input_ids": example.input_ids, "labels": example.labels},
            {"input_ids": short.input_ids, "labels": short.labels},
        ]
    )
    padding = len(example.input_ids) - len(short.input_ids)
    assert batch["labels"][1, -padding:].tolist() == [IGNORE] * padding
    assert batch["attention_mask"][1].sum() == len(short.input_ids)
    # logits are kept exactly at the positions that predict a response token
    assert batch["logits_to_keep"][0].nonzero().flatten().tolist() == list(
        range(len(prompt) - 1, len(example.input_ids) - 1)
    )


def test_long_input_is_cut_and_the_response_kept(tokenizer):
    record = {
        "instruction": "Classify the sentiment.",
        "input": " ".join(["The company reported higher revenue."] * 40),
        "output": "positive",
    }
    example = encode_example(record, alpaca(tokenizer), max_length=96)
    response = tokenizer("positive", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert example.truncated and not example.response_cut
    assert len(example.input_ids) <= 96
    assert example.labels[-len(response) :] == response
    text = tokenizer.decode(example.input_ids)
    assert text.startswith("Below is an instruction") and "Classify the sentiment." in text
    assert "### Input:\nThe company reported" in text and "### Response:\npositive" in text

    # an answer that alone fills max_length keeps its beginning and leaves a quarter for the prompt
    huge = encode_example({**record, "output": "yes no " * 200}, alpaca(tokenizer), max_length=96)
    assert huge.truncated and huge.response_cut and len(huge.input_ids) == 96
    assert sum(label == IGNORE for label in huge.labels) == 96 // 4


@pytest.mark.parametrize("attention", ["sdpa", "packed"])
def test_packed_examples_do_not_attend_to_each_other(tiny_model_dir, tokenizer, attention):
    """With sdpa the packed row gets a block-diagonal mask; ``packed_sdpa`` attends per example, in
    the backward pass too."""
    model = load_model(ModelRef("tiny", str(tiny_model_dir)))
    if attention == "packed":
        packed_attention.use_packed_attention(model, max_length=256)
        assert model.config._attn_implementation == packed_attention.PACKED_ATTENTION
    first, second, third = (encode_example(r, alpaca(tokenizer), 256) for r in RECORDS[:3])
    packed = ResponseBatches(tokenizer, packing=True)([vars(first), vars(second), vars(third)])
    assert packed["input_ids"].shape == (1, sum(len(e.input_ids) for e in (first, second, third)))
    inputs = {k: v for k, v in packed.items() if k not in ("labels", "logits_to_keep")}
    weight = model.model.layers[0].self_attn.q_proj.weight  # upstream of every attention call

    def logits_and_gradient(**model_inputs):
        model.zero_grad()
        logits = model(**model_inputs, use_cache=False).logits[0]
        logits.square().mean().backward()
        return logits.detach(), weight.grad.clone()

    together, together_gradient = logits_and_gradient(**inputs)
    alone = [logits_and_gradient(input_ids=torch.tensor([e.input_ids])) for e in (first, second, third)]
    torch.testing.assert_close(together, torch.cat([logits for logits, _ in alone]), atol=1e-5, rtol=1e-4)
    # the mean over the row weighs each example by its share of the row's positions
    shares = [len(e.input_ids) / packed["input_ids"].shape[1] for e in (first, second, third)]
    expected = sum(share * gradient for share, (_, gradient) in zip(shares, alone))
    torch.testing.assert_close(together_gradient, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("flags", "expected"), [(set(), "packed_attention_bf16_cpu"), ({"amx_bf16"}, "packed_sdpa")])
def test_a_bfloat16_model_without_amx_gets_its_own_packed_attention(tiny_model_dir, monkeypatch, flags, expected):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.setattr(packed_attention, "cpu_flags", lambda: flags)
    model = load_model(ModelRef("tiny", str(tiny_model_dir)), dtype="bfloat16")
    packed_attention.use_packed_attention(model, max_length=256)
    assert ALL_ATTENTION_FUNCTIONS[packed_attention.PACKED_ATTENTION] is getattr(packed_attention, expected)


@pytest.mark.parametrize("short_span", [packed_attention.SHORT_SPAN, 20])
def test_bfloat16_packed_attention_matches_float32_per_example(tiny_model_dir, monkeypatch, short_span):
    """Without AMX a bfloat16 model's short spans attend by matrix products (float32 softmax), longer
    ones by float32 flash: both agree with exact float32 attention per span, forward and backward, to
    bfloat16's precision, with key/value heads shared by groups of query heads."""
    monkeypatch.setattr(packed_attention, "SHORT_SPAN", short_span)
    monkeypatch.setattr(packed_attention, "_causal_masks", {})
    module = load_model(ModelRef("tiny", str(tiny_model_dir))).model.layers[0].self_attn
    torch.manual_seed(0)
    heads = [torch.randn(1, count, 40, 16) for count in (4, 2, 2)]  # query, key, value: groups of 2
    bounds = torch.tensor([0, 12, 33, 40])  # one span (21 tokens) is past the lowered SHORT_SPAN of 20
    grad = torch.randn(1, 40, 4, 16)

    def attend(function, dtype):
        inputs = [h.to(dtype).clone().requires_grad_() for h in heads]
        output, _ = function(module, *inputs, None, cu_seq_lens_q=bounds, scaling=0.25)
        (output.float() * grad).sum().backward()
        return [output.float(), *(i.grad.float() for i in inputs)]

    exact = attend(packed_attention.packed_sdpa, torch.float32)
    got = attend(packed_attention.packed_attention_bf16_cpu, torch.bfloat16)
    for tensor, reference in zip(got, exact):
        assert (tensor - reference).norm() / reference.norm() < 0.02
    # the products alone, against float32 flash on the same bfloat16 inputs
    widened = attend(packed_attention.packed_sdpa_float32, torch.bfloat16)
    assert (got[0] - widened[0]).norm() / widened[0].norm() < 0.02
    # what the products do not apply is left to sdpa, which refuses soft-capping rather than ignore it
    with pytest.raises(ValueError, match="softcap"):
        packed_attention.packed_attention_bf16_cpu(
            module, *(h.bfloat16() for h in heads), None, cu_seq_lens_q=bounds, scaling=0.25, softcap=30.0
        )


@pytest.mark.parametrize("packing", [True, False])
def test_response_loss_equals_the_models_own_loss(tiny_model_dir, tokenizer, packing):
    model = load_model(ModelRef("tiny", str(tiny_model_dir)))
    examples = [vars(encode_example(r, alpaca(tokenizer), 256)) for r in RECORDS[:3]]
    batch = ResponseBatches(tokenizer, packing)(examples)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "logits_to_keep")}
    with torch.no_grad():
        reference = model(**inputs, labels=batch["labels"], use_cache=False).loss
        kept = model(**inputs, logits_to_keep=batch["logits_to_keep"], use_cache=False)
        full = model(**inputs, use_cache=False)
    assert kept.logits.shape[0] == (batch["labels"][:, 1:] != IGNORE).sum()
    torch.testing.assert_close(response_loss(kept, batch["labels"]), reference)
    torch.testing.assert_close(response_loss(full, batch["labels"]), reference)


def test_stage_trains_only_lora_and_saves_a_reloadable_adapter(tmp_path, sharp_model_dir, tokenizer):
    ctx = make_ctx(
        tmp_path, sharp_model_dir, epochs=6.0, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, max_length=40
    )
    snapshot = Snapshot(tokenizer)
    stats = training.run_stage(ctx, callbacks=[snapshot])

    steps = read_jsonl(ctx.work / "train_log.jsonl")
    assert [s["step"] for s in steps] == list(range(1, 13)) and stats["steps"] == 12
    assert sum(s["loss"] for s in steps[-3:]) < 0.6 * sum(s["loss"] for s in steps[:3])  # about 9.8 -> 3
    assert steps[0]["learning_rate"] > steps[-1]["learning_rate"]  # cosine decay
    encoded = [encode_example(r, alpaca(tokenizer), 40) for r in RECORDS]
    assert stats["examples"] == 8 and stats["truncated"] == sum(e.truncated for e in encoded) > 0
    assert stats["quant"] == "none" and stats["tokens"] == 6 * sum(len(e.input_ids) for e in encoded)
    assert snapshot.trainable and all("lora_" in name for name in snapshot.trainable)
    for name, before in snapshot.frozen_before.items():
        assert torch.equal(before, snapshot.frozen_after[name]), name

    adapter = ctx.work / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert not (ctx.work / "checkpoints").exists()
    info = json.loads((adapter / "selfspec_training.json").read_text())
    assert info["data_hash"] == file_hash(ctx.run.require("respond", "data.jsonl"))
    assert info["settings"]["learning_rate"] == 1e-2 and info["stats"] == stats
    assert info["prompt_format"] == "alpaca"  # auto: the tiny tokenizer has no chat template
    ref = ctx.model
    tuned = load_model(ref, adapter=adapter)
    torch.testing.assert_close(logits_of(tuned, PROBE, tokenizer), snapshot.logits)
    assert not torch.allclose(logits_of(load_model(ref), PROBE, tokenizer), snapshot.logits, atol=1e-3)

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(export_merged(ref, adapter, tmp_path / "merged"))
    torch.testing.assert_close(logits_of(merged, PROBE, tokenizer), snapshot.logits, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    with pytest.raises(SelfspecError, match="not empty"):
        export_merged(ref, adapter, tmp_path / "merged")

    # rerun after a kill between saving the adapter and sealing the stage: no retraining
    assert training.run_stage(make_ctx(tmp_path, sharp_model_dir, run=ctx.run)) == stats


def test_adapters_on_the_top_blocks_only(tmp_path, sharp_model_dir, tokenizer):
    """``lora_top_share``: the top blocks get what ``all-linear`` gives every block, the lower ones
    nothing (so no gradient is computed there), and the saved adapter loads back as trained."""
    every = make_ctx(tmp_path / "every", sharp_model_dir)
    top = make_ctx(tmp_path / "top", sharp_model_dir, lora_top_share=0.5, max_steps=3, learning_rate=1e-2)

    def adapted(ctx):
        """The adapter's parameters, and whether the lowest block's output takes part in the backward pass."""
        model = training.lora_model(ctx.model, ctx.settings.train, "none")
        outputs = []
        model.base_model.model.model.layers[0].register_forward_hook(lambda module, args, out: outputs.append(out))
        model(input_ids=torch.tensor([[1, 2, 3]]))
        lowest = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]
        return {name for name, _ in model.named_parameters() if "lora_" in name}, lowest.requires_grad

    everywhere, lowest_in_backward = adapted(every)
    assert any(".layers.0." in name for name in everywhere) and lowest_in_backward
    assert adapted(top) == ({name for name in everywhere if ".layers.1." in name}, False)

    snapshot = Snapshot(tokenizer)
    with throughput.metered() as meter:
        training.run_stage(top, callbacks=[snapshot])
    assert snapshot.trainable and all(".layers.1." in name for name in snapshot.trainable)
    model = training.lora_model(top.model, top.settings.train, "none")
    examples = [encode_example(r, alpaca(tokenizer), top.settings.train.max_length) for r in RECORDS]
    assert meter.passes == throughput.training_passes(model, 0.5, training.kept_share(examples))
    tuned = load_model(top.model, adapter=top.work / "adapter")
    torch.testing.assert_close(logits_of(tuned, PROBE, tokenizer), snapshot.logits)


@pytest.mark.parametrize("top_share", [1.0, 0.5])
def test_the_ceiling_counts_the_work_a_training_step_does(tmp_path, top_share):
    """``training_passes`` (the ceiling's work a token) against torch's own FLOP count of a real step:
    a packed batch, the kept logits, the response loss, the backward pass. Counting a backward pass's
    weight gradients for the frozen base, or the output layer at every position, would miss by 8% or
    more. The formula leaves in the input gradient of the lowest adapted block's first projections,
    which nothing needs: 1.6-2.1% here in eight blocks, 0.5% in SmolLM2-135M's thirty."""
    from torch.utils.flop_counter import FlopCounterMode

    model_dir = build_tiny_model(tmp_path / "tiny8", hidden_size=64, layers=8)
    tokenizer = load_tokenizer(ModelRef("tiny8", str(model_dir)))
    ctx = make_ctx(tmp_path, model_dir, lora_top_share=top_share)
    model = training.lora_model(ctx.model, ctx.settings.train, "none")
    examples = [encode_example(r, alpaca(tokenizer), 64) for r in RECORDS]
    batch = ResponseBatches(tokenizer, packing=True)([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    labels = batch.pop("labels")
    with FlopCounterMode(display=False) as counter:
        response_loss(model(**batch), labels).backward()
    tokens = sum(len(e.input_ids) for e in examples)
    elements = sum(p.numel() for p in model.parameters())
    share = training.adapted_share(model, top_share)
    passes = throughput.training_passes(model, share, training.kept_share(examples))
    assert counter.get_total_flops() / tokens == pytest.approx(passes * 2 * elements, rel=0.03)
    assert 1.0 < passes < 1 + 2 * share  # less than a whole backward pass's worth


def test_resume_after_a_kill_continues_the_step_count(tmp_path, tiny_model_dir, tokenizer):
    settings = dict(epochs=3.0, batch_size=2, save_steps=2, lora_dropout=0.1, max_length=48)
    interrupted = make_ctx(tmp_path / "a", tiny_model_dir, **settings)
    with pytest.raises(KeyboardInterrupt):
        training.run_stage(interrupted, callbacks=[StopAt(5)])
    assert [s["step"] for s in read_jsonl(interrupted.work / "train_log.jsonl")] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (interrupted.work / "checkpoints").iterdir()) == [
        "checkpoint-4",
        training.PROCESSES_FILE,
    ]

    resumed = training.run_stage(make_ctx(tmp_path / "a", tiny_model_dir, run=interrupted.run, **settings))
    assert [s["step"] for s in read_jsonl(interrupted.work / "train_log.jsonl")] == list(range(1, 13))
    assert resumed["steps"] == 12

    straight = make_ctx(tmp_path / "b", tiny_model_dir, **settings)
    assert training.run_stage(straight)["steps"] == 12
    weights = [load_file(ctx.work / "adapter" / "adapter_model.safetensors") for ctx in (interrupted, straight)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], msg=name)
    losses = [[s["loss"] for s in read_jsonl(ctx.work / "train_log.jsonl")] for ctx in (interrupted, straight)]
    assert losses[0] == pytest.approx(losses[1])


@pytest.mark.parametrize("top_share", [1.0, 0.5])
def test_nf4_base_trains_an_adapter(tmp_path, top_share):
    bnb = pytest.importorskip("bitsandbytes")
    model_dir = build_tiny_model(tmp_path / "tiny64", hidden_size=64)
    ctx = make_ctx(tmp_path, model_dir, quant="nf4", max_steps=2, batch_size=4, lora_top_share=top_share)
    ctx.settings.train.gradient_checkpointing = True
    try:
        model = training.lora_model(ctx.model, ctx.settings.train, "nf4")
    except (RuntimeError, NotImplementedError) as exc:  # a bitsandbytes build without this device's 4-bit kernels
        pytest.skip(f"bitsandbytes cannot run NF4 here: {exc}")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    # the ceiling counts every weight of the base, though a 4-bit parameter's numel counts half of them
    unquantized = training.lora_model(ctx.model, ctx.settings.train, "none")
    assert sum(map(throughput.parameter_elements, model.parameters())) == sum(
        p.numel() for p in unquantized.parameters()
    )
    adapted = [name for name, _ in model.named_parameters() if "lora_" in name]
    adapted_blocks = {name.split(".layers.")[1].split(".")[0] for name in adapted}
    assert adapted_blocks == ({"0", "1"} if top_share == 1.0 else {"1"})
    stats = training.run_stage(ctx)
    assert stats["quant"] == "nf4" and stats["steps"] == 2
    assert all(s["loss"] == s["loss"] for s in read_jsonl(ctx.work / "train_log.jsonl"))  # finite, not NaN
    tuned = load_model(ctx.model, adapter=ctx.work / "adapter")  # merges into the full-precision base
    assert torch.isfinite(logits_of(tuned, PROBE, load_tokenizer(ctx.model))).all()


def test_bfloat16_autocast_trains_float32_lora_weights(tmp_path, tiny_model_dir):
    ctx = make_ctx(tmp_path, tiny_model_dir, max_steps=3, batch_size=4, learning_rate=1e-2, max_length=40)
    ctx.settings.dtype = "bfloat16"  # forced: also on CPUs that only emulate it (slow, but tiny here)
    snapshot = Snapshot(load_tokenizer(ctx.model))
    stats = training.run_stage(ctx, callbacks=[snapshot])
    assert stats["steps"] == 3 and all(s["loss"] == s["loss"] for s in read_jsonl(ctx.work / "train_log.jsonl"))
    saved = load_file(ctx.work / "adapter" / "adapter_model.safetensors")
    assert saved and all(w.dtype == torch.float32 for w in saved.values())


def test_autocast_training_skips_pefts_input_casts_without_changing_the_adapter(tmp_path, tiny_model_dir, monkeypatch):
    """PEFT's cast of each layer's input to float32, undone by autocast at once, is switched off under
    bfloat16: the adapter comes out bit for bit as with the casts."""
    import contextlib

    import peft.helpers

    def adapter(folder: str) -> dict:
        ctx = make_ctx(tmp_path / folder, tiny_model_dir, max_steps=2, batch_size=4, learning_rate=1e-2, max_length=40)
        ctx.settings.dtype = "bfloat16"
        training.run_stage(ctx)
        return load_file(ctx.work / "adapter" / "adapter_model.safetensors")

    without_casts = adapter("without")
    switched: list[bool] = []

    @contextlib.contextmanager
    def casts_kept(model, active=True):
        switched.append(active)
        yield

    monkeypatch.setattr(peft.helpers, "disable_input_dtype_casting", casts_kept)
    with_casts = adapter("with")
    assert switched == [True]
    assert without_casts.keys() == with_casts.keys()
    for name, weight in without_casts.items():
        assert torch.equal(weight, with_casts[name]), name


def test_pipeline_seals_the_stage_with_its_stats(tmp_path, tiny_model_dir):
    ctx = make_ctx(tmp_path, tiny_model_dir, max_length=40)
    ctx.settings.model = str(tiny_model_dir)
    Pipeline(ctx.settings, DOMAIN, ctx.run, seeds=[], log=lambda _: None).run_stages(["train"])
    manifest = ctx.run.manifest("train")
    assert manifest["examples"] == 8 and manifest["truncated"] > 0 and manifest["steps"] == 4  # tiny: 1 epoch, batch 2
    assert manifest["tokens_per_s"] > 0 and manifest["peak_rss_mb"] > 0 and manifest["quant"] == "none"
    assert (ctx.run.stage_dir("train") / "adapter" / "adapter_model.safetensors").is_file()


def test_unusable_data_is_reported(tmp_path, tiny_model_dir):
    with pytest.raises(SelfspecError, match="record 2 has no 'output'"):
        training.run_stage(
            make_ctx(tmp_path / "a", tiny_model_dir, records=[RECORDS[0], {"instruction": "x", "input": ""}])
        )
    with pytest.raises(SelfspecError, match="epochs and train.max_steps are both 0"):
        training.run_stage(make_ctx(tmp_path / "b", tiny_model_dir, epochs=0.0))
    ctx = make_ctx(tmp_path / "c", tiny_model_dir)
    ctx.run.require("respond", "data.jsonl").write_text('{"instruction": "x", "output": "y"}\n{"instruction": \n')
    with pytest.raises(SelfspecError, match="not valid JSON lines"):
        training.run_stage(ctx)
