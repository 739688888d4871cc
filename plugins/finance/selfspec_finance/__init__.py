"""selfspec's finance domain: seeds, prompt framing, filters, retrieval corpus, corpus miners, FPB and TAT-QA.

Every hook answers only for the ``finance`` domain and returns ``None`` for any other, so the core's
defaults and other plugins serve the rest. The train and judge templates are the core's.
"""

from __future__ import annotations

import re
from dataclasses import replace
from importlib.resources import files
from pathlib import Path

from selfspec_core.api import Domain, default_template, hookimpl

from . import corpus, mining, tasks

DOMAIN = Domain(
    name="finance",
    description="finance and financial analysis",
    task_families=(
        "sentiment",
        "headline_sentiment",
        "aspect_sentiment",
        "ner",
        "numerical_reasoning",
        "causal_detection",
        "filing_classification",
        "definition",
        "summarization",
    ),
    # Their seed instructions fit any sentence or passage; sentiment is what Financial PhraseBank tests.
    input_task_types=("sentiment", "headline_sentiment", "causal_detection", "filing_classification"),
    # Two passes over the quick run's records. FPB dev (300), training seeds 42/1/2 on the same records
    # (150 written, 300 mined, 430 kept), against one pass: accuracy 0.677/0.680/0.687 ->
    # 0.730/0.713/0.703, macro-F1 0.657/0.565/0.608 -> 0.689/0.664/0.637, per item over the seeds
    # +0.034 [+0.011, +0.058] and +0.048 [+0.017, +0.077]. The second pass costs the training stage's
    # time again: 1.8 more minutes on a 2-core AMD EPYC of CPU family 26 (measured), about 2.5 on the
    # older 2-core EPYC (AVX512-BF16, no AMX) whose one-pass run took 8.9 (estimated, not measured
    # there), inside the quick run's 15 minutes. Biomed keeps one: two passes were within noise on
    # PubMedQA dev and its 700 mined tasks train twice as long.
    profile_settings={"quick": {"train": {"epochs": 2.0}}},
)

TEMPLATES = {
    "instruction": replace(
        default_template("instruction"),
        header="Tasks for an assistant in {description}. Each task has a type, an instruction, and an input "
        "when the instruction needs one: a news sentence, a passage of an annual report, or a small "
        "table. Every task can be answered from its input or from general financial knowledge, "
        "without live market data. Every task is new and different from the others.",
    ),
    "response": replace(
        default_template("response"),
        query="[[Background from financial news and annual reports (use it only where it is relevant):\n"
        "{passages}\n\n]]Instruction: {instruction}[[\nInput: {input}]]\nAnswer:",
    ),
}

# A text model cannot know today's market: instructions that need the moment are dropped.
_NEEDS_NOW = re.compile(
    r"\b(?:today|tonight|right now|at the moment|this morning|as of now|"
    r"real[- ]time|live (?:price|quote|market|data)|currently trading)\b",
    re.I,
)
# "the current price" is answerable only when the input gives it (e.g. "Price: 48.20"); "current
# ratio" and "current assets" are accounting terms and never match.
_CURRENT_QUOTE = re.compile(
    r"\b(?:current|latest)\s+(?:(?:stock|share|market|trading)\s+)?"
    r"(?:price|quote|exchange rate|interest rate|valuation|market cap)s?\b",
    re.I,
)
_NUMBER = re.compile(r"\d")

# Instructions that ask the model to read a picture of prices (the core adds graph, image, ...).
BLACKLIST = ["chart", "charts", "candlestick", "candlesticks"]


@hookimpl
def register_domains(register):
    register(DOMAIN)


@hookimpl
def seed_provider(domain):
    if domain == DOMAIN.name:
        return Path(str(files(__name__) / "seeds" / "seeds.jsonl"))


@hookimpl
def prompt_template(domain, stage):
    if domain == DOMAIN.name:
        return TEMPLATES.get(stage)


@hookimpl
def filter_record(domain, stage, record):
    if domain != DOMAIN.name or stage != "instruction":
        return None
    instruction = record["instruction"]
    if _NEEDS_NOW.search(instruction):
        return "needs_live_data"
    if _CURRENT_QUOTE.search(instruction) and not _NUMBER.search(record.get("input", "")):
        return "needs_live_data"
    return None


@hookimpl
def blacklist_words(domain):
    if domain == DOMAIN.name:
        return BLACKLIST


@hookimpl
def retrieval_corpus(domain, data_dir):
    if domain == DOMAIN.name:
        return corpus.passages(data_dir)


@hookimpl
def corpus_sources(domain):
    if domain == DOMAIN.name:
        return corpus.SOURCES


@hookimpl
def task_miners(domain):
    if domain == DOMAIN.name:
        return mining.MINERS


@hookimpl
def evaluation_tasks(domain):
    if domain == DOMAIN.name:
        return tasks.evaluation_tasks()
