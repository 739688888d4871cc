"""selfspec's biomedicine domain: seeds, prompt framing, filters, retrieval corpus, corpus miners, PubMedQA.

Every hook answers only for the ``biomed`` domain and returns ``None`` for any other, so the core's
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
    name="biomed",
    description="biomedicine and clinical research",
    task_families=(
        "yesno_qa",
        "factoid_qa",
        "list_qa",
        "ner",
        "relation_extraction",
        "document_classification",
        "sentence_similarity",
        "nli",
        "multiple_choice",
        "summarization",
    ),
    # Their seed instructions fit any sentence or premise-hypothesis pair.
    input_task_types=("document_classification", "nli"),
    # Every benchmark of the biomed suite is scored by log-likelihood; pubmedqa_gen (PubMedQA again, the
    # label read from a generated answer) would add a minute to the quick run's 15 and nothing to the suite.
    # 450 mined reading tasks instead of 300 (146 more findings read in their abstracts): on PubMedQA dev,
    # training seeds 42/1/2 on the same records otherwise, accuracy 0.557/0.523/0.540 -> 0.567/0.550/0.550
    # and macro-F1 up on every seed (per item over the seeds: +0.016 [-0.002, +0.034], +0.010 [-0.003,
    # +0.024]); 150 "direction" tasks (a result asked with its direction word turned) added instead lost
    # macro-F1 (-0.029 [-0.053, -0.005] over seeds 42 and 1). 700 instead of 450 (the top-20-block
    # adapters, training seeds 42/1/2, each against the same seed's 450 adapter): accuracy 0.563/0.570/
    # 0.533 -> 0.563/0.570/0.557, macro-F1 0.371/0.383/0.362 -> 0.376/0.380/0.371 (per item over the
    # seeds +0.008 [-0.007, +0.022], +0.004 [-0.008, +0.016]), yes/no AUC up on every seed (0.611/0.621/
    # 0.614 -> 0.642/0.640/0.624): more findings read, a better ranking, the threshold where it was.
    # 900 (the corpus holds ~920 findings) gained a little more (+0.012 [-0.006, +0.030], +0.006; AUC
    # 0.645/0.649/0.638) but trained 8.5 minutes, past the quick run's 15.
    # Adapters on the top two thirds of the blocks (20 of SmolLM2's 30): the backward pass stops there,
    # and the quick run trains at 387-398 tokens/s instead of 271-293 (2-core AMD EPYC AVX512-BF16) with
    # PubMedQA dev unchanged over training seeds 42/1/2 (accuracy +0.000 [-0.016, +0.014], macro-F1
    # +0.002 [-0.009, +0.013], yes/no AUC 0.611/0.621/0.614 against 0.611/0.593/0.608). Finance keeps
    # every block: there the same cut lost FPB dev macro-F1 (-0.063 [-0.087, -0.039]).
    profile_settings={
        "quick": {
            "generate": {"num_mined": 700},
            "train": {"lora_top_share": 0.67},
            "evaluate": {"modes": "loglikelihood"},
        }
    },
)

TEMPLATES = {
    "instruction": replace(
        default_template("instruction"),
        header="Tasks for an assistant in {description}. Each task has a type, an instruction, and an input "
        "when the instruction needs one: an abstract, a sentence from a paper or a clinical note. The "
        "tasks test biomedical knowledge and reading of research, not advice about one person's health. "
        "Every task is new and different from the others.",
    ),
    "response": replace(
        default_template("response"),
        query="[[Background from medical abstracts (use it only where it is relevant):\n{passages}\n\n]]"
        "Instruction: {instruction}[[\nInput: {input}]]\nAnswer:",
    ),
}

# First-person requests for advice about one's own (or a relative's) health: a tuned model should
# not learn to answer them, and the seeds never ask them. Matched on the instruction only, since an
# input may legitimately quote a patient (e.g. "classify this patient question").
_PERSONAL_ADVICE = re.compile(
    r"\b(?:should i|can i take|can i stop|do i need|do i have|am i|is it safe for me|"
    r"i (?:have been|was|got) diagnosed|i(?:'m| am) (?:taking|on|pregnant)|i (?:feel|have had)|"
    r"my (?:doctor|physician|gp|nurse|symptoms?|medications?|medicines?|pills?|prescriptions?|diagnosis|"
    r"test results?|lab results?|blood (?:test|pressure|sugar)|pain|child|son|daughter|baby|wife|husband|"
    r"mother|father|mom|dad|partner))\b",
    re.I,
)

# Instructions that ask the model to look at something only an image carries (the core adds
# image, picture, graph, ...).
BLACKLIST = ["micrograph", "micrographs", "radiograph", "radiographs", "histology slide", "ecg tracing", "ekg tracing"]


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
    if domain == DOMAIN.name and stage == "instruction" and _PERSONAL_ADVICE.search(record["instruction"]):
        return "personal_medical_advice"


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
