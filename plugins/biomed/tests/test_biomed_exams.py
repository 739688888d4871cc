"""MMLU's medical subjects and MedMCQA: the release files and the Hub's layouts give the same items.

The benchmarks are not in ../shared/data, so each test writes a few questions in the release's
format (MMLU's header-less CSVs, MedMCQA's JSON lines with a 1-based ``cop``) and in the Hub's
(``cais/mmlu`` config ``all`` with an ``A``-``D`` label column; ``openlifescienceai/medmcqa`` with an
``a``-``d`` label column), read through ``datasets`` from a local mirror as the Hub path reads them.
"""

import csv
import json
from dataclasses import replace

import pytest
from selfspec_biomed import exams

from selfspec_core.api import SelfspecError, domain_tasks, find_data, task_items, use_hub_mirror, write_hub_dataset

QUESTIONS = {
    "anatomy": [
        ("Which bone forms the heel?", ["Talus", "Calcaneus", "Navicular", "Cuboid"], "B"),
        ("The optic nerve is cranial nerve", ["I", "II", "III", "IV"], "B"),
    ],
    "medical_genetics": [("Down syndrome is a trisomy of chromosome", ["13", "18", "21", "X"], "C")],
    "professional_medicine": [("Same option twice", ["Aspirin", "aspirin ", "Aspirin", "Heparin"], "A")],
}


def write_mmlu_release(root):
    folder = root / exams.MMLU_FOLDER
    folder.mkdir(parents=True)
    for subject in exams.MMLU_SUBJECTS:
        with (folder / f"{subject}_test.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows([q, *options, answer] for q, options, answer in QUESTIONS.get(subject, []))


def test_mmlu_medical_release_csvs_and_hub_rows_give_the_same_items(tmp_path, monkeypatch):
    import datasets

    write_mmlu_release(tmp_path / "data")
    task = domain_tasks("biomed")["mmlu_medical"]
    items = task_items(task, tmp_path / "data")
    # the repeated option cannot be told apart: that question is left out
    assert [item.id for item in items] == ["mmlu:anatomy:1", "mmlu:anatomy:2", "mmlu:medical_genetics:1"]
    assert items[0].answer == "Calcaneus" and items[0].choices == ("Talus", "Calcaneus", "Navicular", "Cuboid")
    assert items[0].instruction == "Answer this anatomy exam question."
    assert items[2].instruction == "Answer this medical genetics exam question."

    rows = [
        {"question": q, "subject": subject, "choices": options, "answer": "ABCD".index(answer)}
        for subject, questions in {**QUESTIONS, "astronomy": [("Which planet?", ["a", "b", "c", "d"], "A")]}.items()
        for q, options, answer in questions
    ]
    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "subject": datasets.Value("string"),
            "choices": datasets.List(datasets.Value("string")),
            "answer": datasets.ClassLabel(names=list("ABCD")),
        }
    )
    write_hub_dataset(
        tmp_path / "hub" / exams.MMLU_HUB.repo, {"all": {"test": datasets.Dataset.from_list(rows, features=features)}}
    )
    use_hub_mirror(monkeypatch, tmp_path / "hub")
    assert find_data(task.source, tmp_path / "empty").where == "hub"
    assert task_items(task, tmp_path / "empty") == items  # astronomy is not a medical subject


def test_medmcqa_release_file_and_hub_rows_give_the_same_items(tmp_path, monkeypatch):
    import datasets

    rows = [
        {"id": "q1", "question": "Vitamin C deficiency causes", "opa": "Scurvy", "opb": "Rickets",
         "opc": "Beriberi", "opd": "Pellagra", "cop": 1, "subject_name": "Biochemistry"},
        {"id": "q2", "question": "Drug of choice for anaphylaxis", "opa": "Atropine", "opb": "Adrenaline",
         "opc": "Dopamine", "opd": "Insulin", "cop": 2, "subject_name": "Pharmacology"},
    ]  # fmt: skip
    release = tmp_path / "data" / exams.MEDMCQA_FILE
    release.parent.mkdir(parents=True)
    release.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = domain_tasks("biomed")["medmcqa"]
    items = task_items(task, tmp_path / "data")
    assert [(item.id, item.answer) for item in items] == [("medmcqa:q1", "Scurvy"), ("medmcqa:q2", "Adrenaline")]
    assert items[1].instruction == "Answer this Pharmacology exam question."

    hub_rows = [{**row, "cop": row["cop"] - 1} for row in rows]
    features = datasets.Features(
        {
            **{name: datasets.Value("string") for name in ("id", "question", "opa", "opb", "opc", "opd")},
            "cop": datasets.ClassLabel(names=list("abcd")),
            "subject_name": datasets.Value("string"),
        }
    )
    write_hub_dataset(
        tmp_path / "hub" / exams.MEDMCQA_HUB.repo,
        {None: {"validation": datasets.Dataset.from_list(hub_rows, features=features)}},
    )
    use_hub_mirror(monkeypatch, tmp_path / "hub")
    assert task_items(task, tmp_path / "empty") == items


def test_exam_files_with_errors_name_the_file_and_line(tmp_path):
    folder = tmp_path / exams.MMLU_FOLDER
    write_mmlu_release(tmp_path)
    (folder / "anatomy_test.csv").write_text("Which bone?,a,b,c,d,E\n")
    with pytest.raises(SelfspecError, match=r"anatomy_test.csv:1: expected question, four options and an answer"):
        exams.load_mmlu(folder)
    (folder / "anatomy_test.csv").unlink()
    with pytest.raises(SelfspecError, match=r"anatomy_test.csv: not found; put MMLU's data/test/anatomy_test.csv"):
        exams.load_mmlu(folder)
    release = tmp_path / exams.MEDMCQA_FILE
    release.parent.mkdir(parents=True)
    release.write_text('{"id": "q1", "question": "x", "opa": "a", "opb": "b", "opc": "c", "opd": "d"}\n')
    with pytest.raises(SelfspecError, match=r"dev.json:1: not a MedMCQA question with a cop 1-4"):
        exams.load_medmcqa(release)


def test_exams_are_suite_members_scored_by_acc_norm_without_data_they_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("mmlu_medical", "medmcqa"):
        task = replace(domain_tasks("biomed")[name])
        assert (task.mode, task.headline, task.extra.get("suite", True)) == ("loglikelihood", "acc_norm", True)
        with pytest.raises(SelfspecError, match=r"not found; put .* under"):
            task_items(task, tmp_path)
