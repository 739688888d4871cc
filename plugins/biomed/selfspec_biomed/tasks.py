"""PubMedQA evaluation tasks, read from the benchmark's own files in the data directory.

PubMedQA's expert-labelled set (PQA-L, Jin et al. 2019, MIT licence) has 1,000 questions in
``pubmedqa/ori_pqal.json``; ``pubmedqa/test_ground_truth.json`` names the 500 of the official test
split. Scores are reported on those; the other 500 are for development (prompts, settings).

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

from selfspec_core.api import EvalItem, EvalTask, SelfspecError

PUBMEDQA_FILE = "pubmedqa/ori_pqal.json"
TEST_IDS_FILE = "test_ground_truth.json"  # beside ori_pqal.json
LABELS = ("yes", "no", "maybe")
LICENCE = "MIT (PubMedQA, Jin et al. 2019)"


def pubmedqa_instruction(question: str) -> str:
    return f"Question: {question.strip()} Based on the abstract, answer yes, no, or maybe."


def load_pubmedqa(path: Path, split: str) -> list[EvalItem]:
    """The questions of ``split`` ("test": the official 500, "dev": the other 500) of ``ori_pqal.json``."""
    records = _read_json(path)
    test_ids = set(_read_json(path.parent / TEST_IDS_FILE))
    missing = sorted(test_ids - set(records))
    if missing:
        raise SelfspecError(f"{path}: test id {missing[0]} of {path.parent / TEST_IDS_FILE} is not in this file; "
                            "use the ori_pqal.json and test_ground_truth.json of the same PubMedQA release")
    items = []
    for pmid, record in records.items():
        if (pmid in test_ids) != (split == "test"):
            continue
        answer = str(record.get("final_decision", "")).strip().lower()
        if answer not in LABELS:
            raise SelfspecError(f"{path}: question {pmid}: final_decision {answer!r} is not one of {', '.join(LABELS)}")
        items.append(EvalItem(id=pmid, instruction=pubmedqa_instruction(record["QUESTION"]),
                              input=" ".join(c.strip() for c in record["CONTEXTS"]), answer=answer, choices=LABELS))
    return items


def _read_json(path: Path):
    if not path.is_file():
        raise SelfspecError(f"{path}: not found; put PubMedQA's {path.name} there (github.com/pubmedqa/pubmedqa, data/)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SelfspecError(f"{path}: not valid JSON ({exc}); download the file again") from None


def _task(name: str, split: str, mode: str, description: str, **options) -> EvalTask:
    return EvalTask(name=name, domain="biomed", data_file=PUBMEDQA_FILE, load=partial(load_pubmedqa, split=split),
                    mode=mode, metric="accuracy", description=description, licence=LICENCE,
                    extra={"split": split}, **options)


def evaluation_tasks() -> list[EvalTask]:
    return [
        _task("pubmedqa", "test", "loglikelihood",
              "PubMedQA expert-labelled test split (500): yes/no/maybe by the likeliest answer"),
        _task("pubmedqa_dev", "dev", "loglikelihood",
              "PubMedQA expert-labelled questions outside the test split (500), for development"),
        _task("pubmedqa_gen", "test", "generate",
              "PubMedQA test split (500): yes/no/maybe read from the generated answer", max_new_tokens=8),
    ]
