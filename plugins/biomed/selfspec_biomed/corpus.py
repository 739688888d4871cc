"""The biomedical retrieval corpus, read from the user's data directory (nothing is shipped).

``<data dir>/biomed_corpus/`` holds two public abstract collections, neither drawn from PubMedQA:

* ``medical_abstracts_tc/medical_tc_test.csv``: 2,888 medical abstracts (Schopf et al., Medical
  Abstracts Text Classification corpus, CC BY-SA 3.0); the condition class names the passage.
* ``hallmarks_of_cancer/text/<PMID>.txt``: 1,852 PubMed abstracts (Baker et al., Hallmarks of
  Cancer corpus, GPL-3.0), one tokenised sentence a line, joined back into prose here.

Either collection may be absent; the corpus is what is found. Documents are returned whole: the
core cuts long ones into windows.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from selfspec_core.api import Passage, SelfspecError, data_root

CORPUS_FOLDER = "biomed_corpus"
ABSTRACTS_CSV = "medical_abstracts_tc/medical_tc_test.csv"
ABSTRACT_LABELS_CSV = "medical_abstracts_tc/medical_tc_labels.csv"
HALLMARKS_TEXT = "hallmarks_of_cancer/text"

# Undo the corpus's tokenisation: "ligand ( GHS-R ) , found" -> "ligand (GHS-R), found".
_SPACE_BEFORE = re.compile(r"\s+([,.;:!?%)\]])")
_SPACE_AFTER = re.compile(r"([(\[])\s+")


def passages(data_dir: str | Path | None) -> list[Passage] | None:
    """Every abstract of the corpus under ``data_dir``; ``None`` when there is none to read."""
    root = data_root(data_dir)
    if root is None:
        return None
    folder = root / CORPUS_FOLDER
    found = medical_abstracts(folder) + hallmarks_abstracts(folder)
    return found or None


def medical_abstracts(folder: Path) -> list[Passage]:
    path = folder / ABSTRACTS_CSV
    if not path.is_file():
        return []
    names = _condition_names(folder / ABSTRACT_LABELS_CSV)
    found = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if not {"condition_label", "medical_abstract"} <= set(reader.fieldnames or ()):
            raise SelfspecError(f"{path}: expected columns condition_label,medical_abstract; "
                                f"found {','.join(reader.fieldnames or ())}")
        for row_number, row in enumerate(reader, start=2):
            text = (row["medical_abstract"] or "").strip()
            if text:
                label = (row["condition_label"] or "").strip()
                found.append(Passage(f"medical_abstracts_tc:{row_number}", text, names.get(label, "")))
    return found


def _condition_names(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8", newline="") as handle:
        return {row["condition_label"].strip(): row["condition_name"].strip() for row in csv.DictReader(handle)}


def hallmarks_abstracts(folder: Path) -> list[Passage]:
    found = []
    for path in sorted((folder / HALLMARKS_TEXT).glob("*.txt")):
        text = detokenize(" ".join(line.strip() for line in path.read_text(encoding="utf-8").splitlines()))
        if text:
            found.append(Passage(f"pmid:{path.stem}", text))
    return found


def detokenize(text: str) -> str:
    return _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", " ".join(text.split())))
