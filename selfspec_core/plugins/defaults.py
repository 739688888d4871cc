"""The core's own hook implementations: generic templates and the core blacklist.

Registered first under the name ``core``, so any domain plugin that answers the same hook wins.
"""

from __future__ import annotations

from selfspec_core.hookspecs import hookimpl
from selfspec_core.templates import PromptTemplate

# Words that ask for something a text-only model cannot see or produce (Self-Instruct's list,
# plus a few seen in small-model output).
CORE_BLACKLIST = (
    "image",
    "images",
    "graph",
    "graphs",
    "picture",
    "pictures",
    "file",
    "files",
    "map",
    "maps",
    "draw",
    "plot",
    "go to",
    "video",
    "audio",
    "music",
    "flowchart",
    "diagram",
    "photo",
    "screenshot",
    "attached",
    "link",
    "url",
    "website",
)

INSTRUCTION_TEMPLATE = PromptTemplate(
    header="Tasks for an assistant in {description}. Each task has a type, an instruction, and an "
    "input when the instruction needs one. Every task is new and different from the others.",
    example="Type: {task_type}\nInstruction: {instruction}[[\nInput: {input}]]",
    query="Type: {task_type}\nInstruction:",
)

# Only the input is written, under a seed's instruction: a bare list of inputs of one task type.
# A header (even one naming the task) only leaks into what a small model writes.
INPUT_TEMPLATE = PromptTemplate(example="Input: {input}", query="Input:")

RESPONSE_TEMPLATE = PromptTemplate(
    header="An expert in {description} answers each instruction correctly and concisely.",
    example="Instruction: {instruction}[[\nInput: {input}]]\nAnswer: {output}",
    query="[[Background:\n{passages}\n\n]]Instruction: {instruction}[[\nInput: {input}]]\nAnswer:",
)

# Alpaca's format: what the model is tuned on, and how the tuned model is queried.
TRAIN_TEMPLATE = PromptTemplate(
    example="",
    # ``{input:.0}`` renders nothing; it only ties the optional clause to a non-empty input.
    query="Below is an instruction that describes a task[[, paired with an input that provides further "
    "context{input:.0}]]. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n[[### Input:\n{input}\n\n]]### Response:\n",
    separator="",
)

JUDGE_TEMPLATE = PromptTemplate(
    example="",
    query="Instruction: {instruction}[[\nInput: {input}]]\nAnswer: {output}\n\n"
    "Is the answer correct, complete and on topic? Reply yes or no.\nReply:",
    separator="",
)

_TEMPLATES = {
    "instruction": INSTRUCTION_TEMPLATE,
    "input": INPUT_TEMPLATE,
    "response": RESPONSE_TEMPLATE,
    "train": TRAIN_TEMPLATE,
    "judge": JUDGE_TEMPLATE,
}


def default_template(stage: str) -> PromptTemplate | None:
    """The core's template for ``stage``: what a plugin's ``prompt_template`` overrides, or starts
    from with ``dataclasses.replace``."""
    return _TEMPLATES.get(stage)


@hookimpl
def prompt_template(stage):
    return default_template(stage)


@hookimpl
def blacklist_words():
    return list(CORE_BLACKLIST)
