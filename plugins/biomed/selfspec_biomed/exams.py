"""Medical exam questions for the biomed suite: MMLU's six medical subjects and MedMCQA.

Both are multiple choice, scored by log-likelihood with the options' texts as the choices (the
cloze form: a 135M model cannot follow "answer with a letter", but it can prefer one answer's
words), ``acc_norm`` at the head (options differ in length; lm-evaluation-harness's choice for
cloze tasks). The question is the input, the instruction names the subject.

* MMLU (Hendrycks et al. 2021, MIT): the test questions of anatomy, clinical knowledge, college
  biology, college medicine, medical genetics and professional medicine (1,089), one task. The
  release's CSVs (``mmlu/test/<subject>_test.csv``: question, four options, answer letter; no
  header) in the data directory, else the Hub's ``cais/mmlu`` (config ``all``, split ``test``).
* MedMCQA (Pal et al. 2022): the validation set (4,183; its test set has no answers), the release's
  ``medmcqa/dev.json`` (JSON lines; ``cop`` is the 1-based correct option) in the data directory,
  else the Hub's ``openlifescienceai/medmcqa`` (split ``validation``; ``cop`` a label a-d).

A question whose options repeat one another (after trimming) cannot be told apart by its choices'
texts and is left out.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from selfspec_core.api import EvalItem, EvalTask, HubDataset, SelfspecError, read_text

MMLU_SUBJECTS = (
    "anatomy",
    "clinical_knowledge",
    "college_biology",
    "college_medicine",
    "medical_genetics",
    "professional_medicine",
)
MMLU_FOLDER = "mmlu/test"
MMLU_LICENCE = "MIT (MMLU, Hendrycks et al. 2021)"
MMLU_ORIGIN = "people.eecs.berkeley.edu/~hendrycks/data.tar, data/test/<subject>_test.csv"
MMLU_HUB = HubDataset("cais/mmlu", config="all", split="test")
MEDMCQA_FILE = "medmcqa/dev.json"
MEDMCQA_LICENCE = "Apache-2.0 (MedMCQA, Pal et al. 2022, as its Hub card states)"
MEDMCQA_ORIGIN = "github.com/medmcqa/medmcqa (data.zip, dev.json)"
MEDMCQA_HUB = HubDataset("openlifescienceai/medmcqa", split="validation")
LETTERS = "ABCD"
HEADLINE = "acc_norm"


def exam_item(item_id: str, subject: str, question: str, options: list[str], correct: int) -> EvalItem | None:
    """One question posed in the cloze form; None when its options cannot be told apart."""
    choices = tuple(" ".join(str(option).split()) for option in options)
    if len(set(choices)) != len(choices) or not all(choices):
        return None
    return EvalItem(
        id=item_id,
        instruction=f"Answer this {subject.replace('_', ' ')} exam question.",
        input=" ".join(question.split()),
        answer=choices[correct],
        choices=choices,
    )


def load_mmlu(folder: Path) -> list[EvalItem]:
    """The six subjects' test questions from the release's CSV files."""
    items = []
    for subject in MMLU_SUBJECTS:
        path = folder / f"{subject}_test.csv"
        if not path.is_file():
            raise SelfspecError(f"{path}: not found; put MMLU's data/test/{path.name} there ({MMLU_ORIGIN})")
        for number, row in enumerate(csv.reader(io.StringIO(read_text(path))), start=1):
            if len(row) != 6 or row[5].strip() not in tuple(LETTERS):
                raise SelfspecError(f"{path}:{number}: expected question, four options and an answer letter A-D")
            item = exam_item(f"mmlu:{subject}:{number}", subject, row[0], row[1:5], LETTERS.index(row[5].strip()))
            items += [item] if item else []
    return items


def load_mmlu_rows(rows: list[dict]) -> list[EvalItem]:
    """The same questions from the Hub's rows (every subject's; the six are kept, numbered as in the CSVs)."""
    items, numbers = [], dict.fromkeys(MMLU_SUBJECTS, 0)
    for row in rows:
        subject = row["subject"]
        if subject not in numbers:
            continue
        numbers[subject] += 1
        item = exam_item(
            f"mmlu:{subject}:{numbers[subject]}", subject, row["question"], list(row["choices"]), _index(row["answer"])
        )
        items += [item] if item else []
    return items


def load_medmcqa(path: Path) -> list[EvalItem]:
    """MedMCQA's validation questions from the release's ``dev.json`` (JSON lines, ``cop`` 1-4)."""
    if not path.is_file():
        raise SelfspecError(f"{path}: not found; put MedMCQA's {path.name} there ({MEDMCQA_ORIGIN})")
    rows = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append({**row, "cop": int(row["cop"]) - 1})
        except (ValueError, KeyError, TypeError) as exc:
            raise SelfspecError(f"{path}:{number}: not a MedMCQA question with a cop 1-4 ({exc})") from None
    return load_medmcqa_rows(rows)


def load_medmcqa_rows(rows: list[dict]) -> list[EvalItem]:
    """MedMCQA questions from rows whose ``cop`` is the 0-based correct option (or its letter, on the Hub)."""
    items = []
    for row in rows:
        options = [row["opa"], row["opb"], row["opc"], row["opd"]]
        item = exam_item(
            f"medmcqa:{row['id']}", row.get("subject_name") or "medical", row["question"], options, _index(row["cop"])
        )
        items += [item] if item else []
    return items


def _index(answer) -> int:
    """An option's 0-based index from an index or a letter (a-d, A-D)."""
    if isinstance(answer, str):
        letter = answer.strip().upper()
        if letter not in tuple(LETTERS):
            raise SelfspecError(f"answer {answer!r} is not one of the option letters A-D")
        return LETTERS.index(letter)
    if not 0 <= int(answer) < len(LETTERS):
        raise SelfspecError(f"answer index {answer!r} is not one of the four options")
    return int(answer)


def evaluation_tasks() -> list[EvalTask]:
    exams = (
        ("mmlu_medical", MMLU_FOLDER, load_mmlu, load_mmlu_rows, MMLU_HUB, MMLU_LICENCE, MMLU_ORIGIN,
         "MMLU's six medical subjects, test questions (1,089)"),
        ("medmcqa", MEDMCQA_FILE, load_medmcqa, load_medmcqa_rows, MEDMCQA_HUB, MEDMCQA_LICENCE, MEDMCQA_ORIGIN,
         "MedMCQA validation questions (4,183)"),
    )  # fmt: skip
    return [
        EvalTask(
            name=name,
            domain="biomed",
            data_file=data_file,
            load=load,
            description=f"{description}: the likeliest option by {HEADLINE}",
            licence=licence,
            origin=origin,
            hub=hub,
            load_rows=load_rows,
            headline=HEADLINE,
        )
        for name, data_file, load, load_rows, hub, licence, origin, description in exams
    ]
