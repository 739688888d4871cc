"""The prompt form the adapter learns is the one it is evaluated, served and exported in
(selfspec_core.models.prompting), on the tiny model with and without a chat template."""

import json
from dataclasses import asdict

import pytest

from selfspec_core.config import load_settings
from selfspec_core.data.tasks import EvalItem
from selfspec_core.errors import SelfspecError
from selfspec_core.models.loading import ModelRef, load_tokenizer
from selfspec_core.models.prompting import ConversationError, PromptFormat
from selfspec_core.plugins.defaults import TRAIN_TEMPLATE
from selfspec_core.run.adapter import TRAINING_INFO, adapter_prompts
from selfspec_core.stages.evaluate import evaluation_prompts, render_prompt
from selfspec_core.stages.train import IGNORE, encode_example

RECORD = {
    "instruction": "Classify the sentiment as positive, negative, or neutral.",
    "input": "The company reported higher quarterly revenue and raised its outlook.",
    "output": "positive",
}


@pytest.fixture(scope="module")
def chat_tokenizer(chat_model_dir):
    return load_tokenizer(ModelRef("chat", str(chat_model_dir)))


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_model_dir):
    return load_tokenizer(ModelRef("tiny", str(tiny_model_dir)))


def chat_text(tokenizer, messages, generation_prompt=True) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def test_chat_training_example_masks_exactly_the_prompt(chat_tokenizer):
    chat = PromptFormat("chat", TRAIN_TEMPLATE, chat_tokenizer)
    user = {"role": "user", "content": f"{RECORD['instruction']}\n\n{RECORD['input']}"}
    prompt_text = chat_text(chat_tokenizer, [user])
    assert chat.prompt(RECORD) == prompt_text and prompt_text.endswith("<|im_start|>assistant\n")
    full = chat_text(chat_tokenizer, [user, {"role": "assistant", "content": "positive"}], generation_prompt=False)
    assert chat.prompt(RECORD) + chat.completion(RECORD) == full
    assert chat.completion(RECORD) == "positive<|endoftext|>\n"  # the turn's end marker is learnt too

    example = encode_example(RECORD, chat, max_length=256)
    prompt = chat_tokenizer(prompt_text, add_special_tokens=False).input_ids
    response = chat_tokenizer("positive<|endoftext|>\n", add_special_tokens=False).input_ids
    assert chat_tokenizer.eos_token_id in response  # the end marker is one special token, not its letters
    assert example.input_ids == prompt + response
    assert example.labels == [IGNORE] * len(prompt) + response and not example.truncated


def test_chat_truncation_cuts_the_input_first_and_keeps_the_cue(chat_tokenizer):
    chat = PromptFormat("chat", TRAIN_TEMPLATE, chat_tokenizer)
    long = {**RECORD, "input": " ".join(["The company reported higher revenue."] * 40)}
    example = encode_example(long, chat, max_length=96)
    assert example.truncated and not example.response_cut and len(example.input_ids) <= 96
    text = chat_tokenizer.decode(example.input_ids)
    assert text.startswith("<|im_start|>user\nClassify the sentiment")
    assert text.endswith("<|im_start|>assistant\npositive<|endoftext|>\n")
    response = chat.response_ids(long)
    assert example.labels[-len(response) :] == response
    assert sum(label != IGNORE for label in example.labels) == len(response)


def test_auto_picks_chat_only_with_a_chat_template(chat_tokenizer, plain_tokenizer):
    assert PromptFormat.chosen("auto", TRAIN_TEMPLATE, chat_tokenizer).name == "chat"
    assert PromptFormat.chosen("auto", TRAIN_TEMPLATE, plain_tokenizer).name == "alpaca"
    assert PromptFormat.chosen("alpaca", TRAIN_TEMPLATE, chat_tokenizer).name == "alpaca"
    with pytest.raises(SelfspecError, match='has no chat template; use prompt_format = "alpaca"'):
        PromptFormat.chosen("chat", TRAIN_TEMPLATE, plain_tokenizer)
    alpaca = PromptFormat("alpaca", TRAIN_TEMPLATE, plain_tokenizer)
    assert alpaca.prompt(RECORD) == TRAIN_TEMPLATE.render([], RECORD)
    assert encode_example(RECORD, alpaca, 256).labels[-1] == plain_tokenizer.eos_token_id


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train": {"prompt_format": "chatml"}}, "train.prompt_format: expected one of auto, chat, alpaca"),
        ({"evaluate": {"prompt_format": "auto"}}, "evaluate.prompt_format: expected one of adapter, chat, alpaca"),
    ],
)
def test_prompt_format_settings_are_checked(overrides, message):
    assert load_settings("tiny").train.prompt_format == "auto"
    assert load_settings("tiny").evaluate.prompt_format == "adapter"
    with pytest.raises(SelfspecError, match=message):
        load_settings("tiny", overrides=overrides)


def _adapter(folder, info: dict | None):
    folder.mkdir(parents=True)
    if info is not None:
        (folder / TRAINING_INFO).write_text(json.dumps(info))
    return folder


def test_evaluation_poses_items_in_the_adapters_form(tmp_path, chat_model_dir, chat_tokenizer):
    ref = ModelRef("chat", str(chat_model_dir))
    settings = load_settings("tiny", overrides={"model": str(chat_model_dir)})
    chat_adapter = _adapter(tmp_path / "chat", {"prompt_format": "chat"})
    old_adapter = _adapter(tmp_path / "old", {"prompt_template": {"example": "", "query": "Q: {instruction}\nA:"}})
    item = EvalItem("1", "Classify the sentiment.", "Sales rose.", "positive", ("positive", "negative"))
    demo = EvalItem("2", "Classify the sentiment.", "Sales fell.", "negative", ("positive", "negative"))

    posed = evaluation_prompts(settings, ref, chat_adapter, TRAIN_TEMPLATE, {})
    assert posed.name == "chat"
    turns = [
        {"role": "user", "content": "Classify the sentiment.\n\nSales fell."},
        {"role": "assistant", "content": "negative"},
        {"role": "user", "content": "Classify the sentiment.\n\nSales rose."},
    ]
    assert render_prompt(posed, item, [demo]) == chat_text(chat_tokenizer, turns)
    assert evaluation_prompts(settings, ref, old_adapter, TRAIN_TEMPLATE, {}).name == "alpaca"  # before formats
    assert evaluation_prompts(settings, ref, None, TRAIN_TEMPLATE, {}).name == "chat"  # as training would pick

    settings.evaluate.prompt_format = "alpaca"  # the user asks for another form: both models get it
    alpaca = evaluation_prompts(settings, ref, chat_adapter, TRAIN_TEMPLATE, {})
    assert render_prompt(alpaca, item, []) == TRAIN_TEMPLATE.render(
        [], {"instruction": item.instruction, "input": item.input}
    )


def test_evaluation_poses_items_in_the_template_and_context_the_adapter_recorded(tmp_path, tiny_model_dir):
    ref = ModelRef("tiny", str(tiny_model_dir))
    settings = load_settings("tiny", overrides={"model": str(tiny_model_dir)})
    learnt = {"example": "", "query": "[{domain}] {instruction}\n{input}\nAnswer:"}
    adapter = _adapter(
        tmp_path / "a",
        {"prompt_format": "alpaca", "prompt_template": learnt, "prompt_context": {"domain": "finance"}},
    )
    item = EvalItem("1", "Classify the sentiment.", "Sales rose.", "positive", ("positive", "negative"))
    # another domain's template and context (evaluate.adapter from another run, --eval-file without --domain)
    posed = evaluation_prompts(settings, ref, adapter, TRAIN_TEMPLATE, {"domain": "biomed"})
    assert render_prompt(posed, item, []) == "[finance] Classify the sentiment.\nSales rose.\nAnswer:"
    assert posed == adapter_prompts(adapter, None)  # as serve and the GGUF export pose it


def test_an_adapter_of_several_prompt_forms_is_refused_in_one_line(tmp_path, tiny_model_dir):
    settings = load_settings("tiny", overrides={"model": str(tiny_model_dir)})
    mixed = _adapter(tmp_path / "mixed", {"prompt_format": ["chat", "alpaca"]})
    with pytest.raises(SelfspecError, match=r"learnt several prompt formats \(chat, alpaca\), so no one form"):
        evaluation_prompts(settings, ModelRef("tiny", str(tiny_model_dir)), mixed, TRAIN_TEMPLATE, {})
    templates = _adapter(tmp_path / "templates", {"prompt_format": "alpaca", "prompt_template": [{}, {}]})
    with pytest.raises(SelfspecError, match=r"learnt each domain in its own prompt template"):
        adapter_prompts(templates, None)


def test_alpaca_conversations_follow_one_rule(tmp_path, plain_tokenizer):
    adapter = _adapter(tmp_path / "a", {"prompt_format": "alpaca", "prompt_template": asdict(TRAIN_TEMPLATE)})
    alpaca = adapter_prompts(adapter, plain_tokenizer)
    one = alpaca.conversation([{"role": "user", "content": "Define EBITDA."}])
    assert one == alpaca.prompt({"instruction": "Define EBITDA.", "input": ""})
    several = alpaca.conversation(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Define EBITDA."},
            {"role": "assistant", "content": "Earnings before interest."},
            {"role": "user", "content": "And EBIT?"},
        ]
    )
    earlier = alpaca.prompt({"instruction": "Define EBITDA."}) + "Earnings before interest."
    assert several == "Be brief.\n\n" + earlier + "\n\n" + alpaca.prompt({"instruction": "And EBIT?"})
    for messages, message in [
        ([{"role": "assistant", "content": "Hi"}], "end the messages with a user message"),
        ([{"role": "user", "content": "  "}], "a user message is empty"),
        ([{"role": "tool", "content": "{}"}, {"role": "user", "content": "x"}], "role 'tool' is not supported"),
    ]:
        with pytest.raises(ConversationError, match=message):
            alpaca.conversation(messages)
