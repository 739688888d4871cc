"""Biomed evaluation tasks: PubMedQA, read from the benchmark's own files, and the medical exams of
:mod:`selfspec_biomed.exams` (MMLU's medical subjects, MedMCQA); together the domain's suite.

PubMedQA's expert-labelled set (PQA-L, Jin et al. 2019, MIT licence) has 1,000 questions in
``pubmedqa/ori_pqal.json``; ``pubmedqa/test_ground_truth.json`` names the 500 of the official test
split. Scores are reported on those; the other 500 are for development (prompts, settings).
Both files ship with this plugin (``data/pubmedqa/``, MIT); a copy in the data directory wins.
On the Hub the set is ``qiaojin/PubMedQA`` (config ``pqa_labeled``), read with the shipped test ids.

Items are posed the way the ``yesno_qa`` seeds pose them: the question with its options in the
instruction, the abstract (without its conclusion) as the input. The phrasing is seed bio-015's, not
the most common one: that one's fixed words ("Based on the abstract, answer the question with yes,
no, or maybe. Question:") are 13, so every item would share a 13-gram with every training record
that copies them and the evaluation's contamination check would flag them all.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from selfspec_core.api import EvalItem, EvalTask, HubDataset, SelfspecError, package_file, read_text

from . import exams

PUBMEDQA_FILE = "pubmedqa/ori_pqal.json"
TEST_IDS_FILE = "test_ground_truth.json"  # beside ori_pqal.json
SHIPPED = package_file(__package__, "data", "pubmedqa")
LABELS = ("yes", "no", "maybe")
# The summed log-probability leads the table (every way is reported beside it). On pubmedqa_dev
# (bench/score_variants.py, the embedded base model, 300 items) no way measured reading clearly
# better: acc_calibrated spreads the answers (55% "yes" in the Alpaca form, 75% in chat, against 100%
# and 90% by acc) but loses accuracy in Alpaca (0.413 vs 0.540, -0.127 [-0.197, -0.063]) and gains no
# clear macro-F1 in chat (+0.040 [-0.008, +0.087]); acc_norm answers "yes" 99.7-100% of the time and
# acc_per_token equals acc (labels of equal token counts). So acc stays, and the release's figures with it.
HEADLINE = "acc"
LICENCE = "MIT (PubMedQA, Jin et al. 2019)"
ORIGIN = "github.com/pubmedqa/pubmedqa, data/ori_pqal.json and data/test_ground_truth.json"
HUB = HubDataset(
    "qiaojin/PubMedQA",
    config="pqa_labeled",
    split="train",
    columns={"id": "pubid", "question": "question", "contexts": "context.contexts", "answer": "final_decision"},
)


def pubmedqa_instruction(question: str) -> str:
    return f"Question: {question.strip()} Based on the abstract, answer yes, no, or maybe."


def load_pubmedqa(path: Path, split: str) -> list[EvalItem]:
    """The questions of ``split`` ("test": the official 500, "dev": the other 500) of ``ori_pqal.json``."""
    records = _read_json(path)
    rows = [
        {"id": pmid, "question": r["QUESTION"], "contexts": r["CONTEXTS"], "answer": r.get("final_decision", "")}
        for pmid, r in records.items()
    ]
    return pubmedqa_items(rows, split, set(_read_json(path.parent / TEST_IDS_FILE)), str(path))


def load_pubmedqa_rows(rows: list[dict], split: str) -> list[EvalItem]:
    """The same questions from the Hub's rows, split by the test ids shipped with this plugin."""
    rows = [{**row, "id": str(row["id"])} for row in rows]
    return pubmedqa_items(rows, split, set(_read_json(SHIPPED / TEST_IDS_FILE)), HUB.describe())


def pubmedqa_items(rows: list[dict], split: str, test_ids: set[str], origin: str) -> list[EvalItem]:
    missing = sorted(test_ids - {row["id"] for row in rows})
    if missing:
        raise SelfspecError(
            f"{origin}: test id {missing[0]} of {TEST_IDS_FILE} is not in this file; "
            "use the ori_pqal.json and test_ground_truth.json of the same PubMedQA release"
        )
    items = []
    for row in rows:
        if (row["id"] in test_ids) != (split == "test"):
            continue
        answer = str(row["answer"]).strip().lower()
        if answer not in LABELS:
            raise SelfspecError(
                f"{origin}: question {row['id']}: final_decision {answer!r} is not one of {', '.join(LABELS)}"
            )
        items.append(
            EvalItem(
                id=row["id"],
                instruction=pubmedqa_instruction(row["question"]),
                input=" ".join(c.strip() for c in row["contexts"]),
                answer=answer,
                choices=LABELS,
            )
        )
    return items


def _read_json(path: Path):
    if not path.is_file():
        raise SelfspecError(
            f"{path}: not found; put PubMedQA's {path.name} there (github.com/pubmedqa/pubmedqa, data/)"
        )
    try:
        return json.loads(read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise SelfspecError(f"{path}: not valid JSON ({exc}); download the file again") from None


def _task(name: str, split: str, mode: str, description: str, suite: bool = True, **options) -> EvalTask:
    return EvalTask(
        name=name,
        domain="biomed",
        data_file=PUBMEDQA_FILE,
        load=partial(load_pubmedqa, split=split),
        mode=mode,
        metric="accuracy",
        description=description,
        licence=LICENCE,
        extra={"split": split, "suite": suite},
        origin=ORIGIN,
        shipped=SHIPPED / "ori_pqal.json.gz",
        hub=HUB,
        load_rows=partial(load_pubmedqa_rows, split=split),
        **options,
    )


def evaluation_tasks() -> list[EvalTask]:
    return [
        _task(
            "pubmedqa",
            "test",
            "loglikelihood",
            "PubMedQA expert-labelled test split (500): yes/no/maybe by the likeliest answer",
            headline=HEADLINE,
        ),
        _task(
            "pubmedqa_dev",
            "dev",
            "loglikelihood",
            "PubMedQA expert-labelled questions outside the test split (500), for development",
            headline=HEADLINE,
        ),
        _task(
            "pubmedqa_gen",
            "test",
            "generate",
            "PubMedQA test split (500): yes/no/maybe read from the generated answer",
            max_new_tokens=8,
            suite=False,  # the suite counts PubMedQA once, as ``pubmedqa``
        ),
        *exams.evaluation_tasks(),
    ]
