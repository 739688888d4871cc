"""The finance retrieval corpus, read from the user's data directory (nothing is shipped).

``<data dir>/fin_corpus/`` holds:

* ``fincausal2020/*.csv``: FinCausal 2020 (FNP 2020 shared task, Yseop) sections of 2019 financial
  news, ``;``-separated ``Index; Text; Gold``; no licence is stated, so research use only. Sections
  repeated across the two files are kept once.
* ``tatqa/tatqa_dataset_test_gold.json``: TAT-QA test annual-report tables and paragraphs (CC BY 4.0).
  Some reports appear in both TAT-QA splits; since TAT-QA dev is an evaluation set, any table or
  paragraph sharing a 13-word sequence with it is left out of the corpus.

Either part may be absent; the corpus is what is found.
"""

from __future__ import annotations

from pathlib import Path

from selfspec_core.api import Passage, SelfspecError, data_root, find_overlaps

from .tasks import TATQA_FILE, read_tatqa, table_text

CORPUS_FOLDER = "fin_corpus"
FINCAUSAL_FOLDER = "fincausal2020"
TATQA_CORPUS_FILE = "tatqa/tatqa_dataset_test_gold.json"
OVERLAP_WORDS = 13


def passages(data_dir: str | Path | None) -> list[Passage] | None:
    """Every passage of the corpus under ``data_dir``; ``None`` when there is none to read."""
    root = data_root(data_dir)
    if root is None:
        return None
    folder = root / CORPUS_FOLDER
    evaluation_file = root / TATQA_FILE
    found = fincausal_sections(folder / FINCAUSAL_FOLDER) + tatqa_passages(
        folder / TATQA_CORPUS_FILE, exclude=evaluation_file if evaluation_file.is_file() else None)
    return found or None


def fincausal_sections(folder: Path) -> list[Passage]:
    found, seen = [], set()
    for path in sorted(folder.glob("*.csv")):
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        if not lines or [c.strip().lower() for c in lines[0].split(";")] != ["index", "text", "gold"]:
            raise SelfspecError(f"{path}:1: expected FinCausal's header 'Index; Text; Gold'; keep only FinCausal 2020 CSV files in {folder}")
        for number, line in enumerate(lines[1:], start=2):
            index, _, rest = line.partition(";")
            text = rest.rpartition(";")[0].strip()  # the text itself may contain ';'
            if text and text not in seen:
                seen.add(text)
                found.append(Passage(f"{path.stem}:{index.strip() or number}", text))
    return found


def tatqa_passages(path: Path, exclude: Path | None) -> list[Passage]:
    """Each table (as pipe rows) and each paragraph, minus what overlaps the evaluation file ``exclude``."""
    if not path.is_file():
        return []
    found = []
    for context in read_tatqa(path):
        uid = context["table"]["uid"]
        found.append(Passage(f"tatqa:{uid}:table", table_text(context["table"]["table"]), "annual report table"))
        found += [Passage(f"tatqa:{uid}:p{p['order']}", p["text"].strip(), "annual report")
                  for p in context["paragraphs"]]
    found = [p for p in found if p.text]
    if exclude is None:
        return found
    evaluation = []
    for context in read_tatqa(exclude):
        evaluation.append(table_text(context["table"]["table"]))
        evaluation += [p["text"] for p in context["paragraphs"]] + [q["question"] for q in context["questions"]]
    overlapping = find_overlaps([p.text for p in found], evaluation, OVERLAP_WORDS)
    return [p for i, p in enumerate(found) if i not in overlapping]
