"""The biomedical retrieval corpus: two public abstract collections, neither drawn from PubMedQA.

* ``biomed_corpus/medical_abstracts_tc/medical_tc_test.csv``: 2,888 medical abstracts (Schopf et
  al., Medical Abstracts Text Classification corpus, CC BY-SA 3.0); the condition class names the
  passage. Shipped with this plugin (``data/medical_abstracts_tc/``) and on the Hub as
  ``TimSchopf/medical_abstracts``; a copy in the data directory wins.
* ``biomed_corpus/hallmarks_of_cancer/text/<PMID>.txt``: 1,852 PubMed abstracts (Baker et al.,
  Hallmarks of Cancer corpus, GPL-3.0, so not shipped; no Hub copy in this layout), one tokenised
  sentence a line, joined back into prose here; read from the data directory only.

Either collection may be absent; the corpus is what is found. Documents are returned whole: the
core cuts long ones into windows.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from selfspec_core.api import (
    DataSource,
    HubDataset,
    Passage,
    SelfspecError,
    data_root,
    find_data,
    package_file,
    read_text,
)

CORPUS_FOLDER = "biomed_corpus"
ABSTRACT_LABELS_CSV = "medical_tc_labels.csv"  # beside the abstracts
HALLMARKS_TEXT = "hallmarks_of_cancer/text"
SHIPPED = package_file(__package__, "data", "medical_abstracts_tc")

MEDICAL_ABSTRACTS = DataSource(
    name="Medical Abstracts TC corpus (test split)",
    path=f"{CORPUS_FOLDER}/medical_abstracts_tc/medical_tc_test.csv",
    licence="CC BY-SA 3.0 (Schopf et al. 2022)",
    origin="github.com/sebischair/Medical-Abstracts-TC-Corpus",
    shipped=SHIPPED / "medical_tc_test.csv.gz",
    hub=HubDataset("TimSchopf/medical_abstracts", split="test"),
)
HALLMARKS = DataSource(
    name="Hallmarks of Cancer abstracts",
    path=f"{CORPUS_FOLDER}/{HALLMARKS_TEXT}",
    licence="GPL-3.0 (Baker et al. 2016)",
    origin="github.com/sb895/Hallmarks-of-Cancer, text/*.txt",
)
SOURCES = [MEDICAL_ABSTRACTS, HALLMARKS]

# Undo the corpus's tokenisation: "ligand ( GHS-R ) , found" -> "ligand (GHS-R), found".
_SPACE_BEFORE = re.compile(r"\s+([,.;:!?%)\]])")
_SPACE_AFTER = re.compile(r"([(\[])\s+")


def passages(data_dir: str | Path | None) -> list[Passage] | None:
    """Every abstract found (data directory, shipped copy, Hub); ``None`` when there is none."""
    found = find_data(MEDICAL_ABSTRACTS, data_dir)
    abstracts = [] if isinstance(found, str) else found.read(medical_abstracts, medical_abstract_rows)
    root = data_root(data_dir)
    hallmarks = hallmarks_abstracts(root / CORPUS_FOLDER) if root else []
    return (abstracts + hallmarks) or None


def medical_abstracts(path: Path) -> list[Passage]:
    """The abstracts of ``medical_tc_test.csv`` (or its ``.gz``), titled by the label file beside it."""
    reader = csv.DictReader(io.StringIO(read_text(path)))
    if not {"condition_label", "medical_abstract"} <= set(reader.fieldnames or ()):
        raise SelfspecError(
            f"{path}: expected columns condition_label,medical_abstract; found {','.join(reader.fieldnames or ())}"
        )
    rows = [{**row, "line": number} for number, row in enumerate(reader, start=2)]
    return medical_abstract_rows(rows, _condition_names(path.parent / ABSTRACT_LABELS_CSV))


def medical_abstract_rows(rows: list[dict], names: dict[str, str] | None = None) -> list[Passage]:
    """Passages from ``{condition_label, medical_abstract}`` rows; ids are the CSV's line numbers
    (a Hub row's index + 2, the same line), so both sources give the same ids."""
    names = _condition_names(SHIPPED / ABSTRACT_LABELS_CSV) if names is None else names
    found = []
    for index, row in enumerate(rows):
        text = (row["medical_abstract"] or "").strip()
        if text:
            label = str(row["condition_label"] or "").strip()
            title = names.get(label, "" if label.isdigit() else label)  # a Hub class label arrives as its name
            found.append(Passage(f"medical_abstracts_tc:{row.get('line', index + 2)}", text, title))
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
