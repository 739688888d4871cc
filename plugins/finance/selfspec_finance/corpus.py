"""The finance retrieval corpus, two parts under ``<data dir>/fin_corpus/``:

* ``fincausal2020/*.csv``: FinCausal 2020 (FNP 2020 shared task, Yseop) sections of 2019 financial
  news, ``;``-separated ``Index; Text; Gold``; no licence is stated, so research use only: read from
  the data directory only, never shipped. Sections repeated across the two files are kept once.
* ``tatqa/tatqa_dataset_test_gold.json``: TAT-QA test annual-report tables and paragraphs (CC BY 4.0),
  shipped with this plugin (``data/tatqa_corpus/``) and on the Hub (``next-tat/TAT-QA``); a copy in
  the data directory wins. Some reports appear in both TAT-QA splits; since TAT-QA dev is an
  evaluation set, any table or paragraph sharing a 13-word sequence with it is left out.

Either part may be absent; the corpus is what is found.
"""

from __future__ import annotations

from pathlib import Path

from selfspec_core.api import DataSource, HubDataset, Passage, SelfspecError, data_root, find_data, find_overlaps

from .tasks import SHIPPED, TATQA_DEV, TATQA_LICENCE, TATQA_ORIGIN, read_tatqa, table_text

CORPUS_FOLDER = "fin_corpus"
FINCAUSAL_FOLDER = "fincausal2020"
OVERLAP_WORDS = 13

TATQA_CORPUS = DataSource(
    name="TAT-QA test annual reports",
    path=f"{CORPUS_FOLDER}/tatqa/tatqa_dataset_test_gold.json",
    licence=TATQA_LICENCE,
    origin=TATQA_ORIGIN,
    shipped=SHIPPED / "tatqa_corpus" / "tatqa_dataset_test_gold.json.gz",
    hub=HubDataset("next-tat/TAT-QA", data_files="tatqa_dataset_test_gold.json"),
)
FINCAUSAL = DataSource(
    name="FinCausal 2020 news sections",
    path=f"{CORPUS_FOLDER}/{FINCAUSAL_FOLDER}",
    licence="none stated (research use only; never shipped)",
    origin="github.com/yseop/YseopLab, FNP_2020_FinCausal/data/*/*.csv",
)
SOURCES = [TATQA_CORPUS, FINCAUSAL]


def passages(data_dir: str | Path | None) -> list[Passage] | None:
    """Every passage found (data directory, shipped copy, Hub); ``None`` when there is none."""
    root = data_root(data_dir)
    sections = fincausal_sections(root / FINCAUSAL.path) if root else []
    found = find_data(TATQA_CORPUS, data_dir)
    reports = (
        [] if isinstance(found, str) else tatqa_passages(found.read(read_tatqa, list), _evaluation_contexts(data_dir))
    )
    return (sections + reports) or None


def _evaluation_contexts(data_dir: str | Path | None) -> list[dict]:
    """TAT-QA dev's contexts from wherever the evaluation reads them, so the corpus leaves them out."""
    found = find_data(TATQA_DEV, data_dir)
    return [] if isinstance(found, str) else found.read(read_tatqa, list)


def fincausal_sections(folder: Path) -> list[Passage]:
    found, seen = [], set()
    for path in sorted(folder.glob("*.csv")):
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        if not lines or [c.strip().lower() for c in lines[0].split(";")] != ["index", "text", "gold"]:
            raise SelfspecError(
                f"{path}:1: expected FinCausal's header 'Index; Text; Gold'; "
                f"keep only FinCausal 2020 CSV files in {folder}"
            )
        for number, line in enumerate(lines[1:], start=2):
            index, _, rest = line.partition(";")
            text = rest.rpartition(";")[0].strip()  # the text itself may contain ';'
            if text and text not in seen:
                seen.add(text)
                found.append(Passage(f"{path.stem}:{index.strip() or number}", text))
    return found


def tatqa_passages(contexts: list[dict], exclude: list[dict]) -> list[Passage]:
    """Each table (as pipe rows) and each paragraph, minus what overlaps the evaluation contexts ``exclude``."""
    found = []
    for context in contexts:
        uid = context["table"]["uid"]
        found.append(Passage(f"tatqa:{uid}:table", table_text(context["table"]["table"]), "annual report table"))
        found += [
            Passage(f"tatqa:{uid}:p{p['order']}", p["text"].strip(), "annual report") for p in context["paragraphs"]
        ]
    found = [p for p in found if p.text]
    if not exclude:
        return found
    evaluation = []
    for context in exclude:
        evaluation.append(table_text(context["table"]["table"]))
        evaluation += [p["text"] for p in context["paragraphs"]] + [q["question"] for q in context["questions"]]
    overlapping = find_overlaps([p.text for p in found], evaluation, OVERLAP_WORDS)
    return [p for i, p in enumerate(found) if i not in overlapping]
