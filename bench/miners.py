"""Precision of every corpus miner on text whose truth is known, and how many tasks each yields.

    python bench/miners.py            # needs the shared data ($SELFSPEC_DATA or ../shared/data)

Known truth, per miner (none of it is shipped or mined; it is only read to measure):

* ``sentiment_lexicon``: Financial PhraseBank's development sentences (50Agree, outside the test
  fifth) with their gold labels. Precision is the mean of the per-label precisions, since the stage
  samples the labels balanced.
* ``table_change``: every task mined from the finance corpus's tables, answered again from the
  task's own text (row and years read back from the question, the cells from the input table) by a
  separate reading of the table; a row label the table repeats counts as wrong (ambiguous).
* ``cause_effect``: FinCausal 2020 sections with their gold causal/non-causal label: the share of
  sections the miner finds a cause in that FinCausal marks causal.
* ``finding_question``: PubMedQA's development questions (the 500 outside the test split): the
  miner's labeller on the first labelled sentence of each conclusion, against the gold yes/no/maybe.
  This asks more than the miner does (PubMedQA's gold answers the title question, the miner's
  label answers a question made from the sentence itself), so it is a lower bound. Mean of the
  per-label precisions. And the precision asked of a miner, on its own questions:
  ``bench/data/finding_question_judged.jsonl`` holds a developer's verdicts on 60 tasks mined from
  the shipped Medical Abstracts corpus (document id, label, right or not, why when not); the
  benchmark mines those documents again and counts the verdicts whose label is still the one judged.
* ``finding_in_context``: the same question with the finding at the end of its input, so the
  finding's label is the task's truth: the same verdicts, plus the share of inputs whose last
  sentence is the finding that decides the label (``finding_in_context_finding_kept``).

Yields are the tasks each miner finds in the shared corpora. A miner below 0.9 is off by default.
Last line: ``<miner>_precision=.. <miner>_n=.. <miner>_yield=..`` for every miner, then
``finding_question_judged_precision=.. finding_question_judged_n=..``,
``finding_in_context_finding_kept=..`` and ``minutes=..``.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import sys
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SELFSPEC_DATA") or ROOT / ".." / "shared" / "data")

from selfspec_biomed import corpus as biomed_corpus  # noqa: E402
from selfspec_biomed import mining as biomed_mining  # noqa: E402
from selfspec_finance import corpus as finance_corpus  # noqa: E402
from selfspec_finance import mining as finance_mining  # noqa: E402
from selfspec_finance.tasks import in_fpb_test_split, read_fpb  # noqa: E402

from selfspec_core.stages import mine as mining  # noqa: E402


def label_precision(pairs: list[tuple[str, str]]) -> tuple[float, dict[str, float]]:
    """Mean over predicted labels of the share right, and each label's share; ``pairs`` = (predicted, gold)."""
    per_label = {}
    for label in sorted({p for p, _ in pairs}):
        golds = [g for p, g in pairs if p == label]
        per_label[label] = sum(g == label for g in golds) / len(golds)
    return sum(per_label.values()) / len(per_label), per_label


def sentiment_precision() -> tuple[float, int, dict]:
    rows = read_fpb(DATA / "financial_phrasebank" / "Sentences_50Agree.txt")
    pairs = [
        (label, gold)
        for _, sentence, gold in rows
        if not in_fpb_test_split(sentence) and (label := finance_mining.sentiment_of(sentence)) is not None
    ]
    precision, per_label = label_precision(pairs)
    return precision, len(pairs), per_label


def finding_precision() -> tuple[float, int, dict]:
    records = json.loads((DATA / "pubmedqa" / "ori_pqal.json").read_text(encoding="utf-8"))
    test_ids = set(json.loads((DATA / "pubmedqa" / "test_ground_truth.json").read_text(encoding="utf-8")))
    pairs = []
    for pmid, record in records.items():
        if pmid in test_ids:
            continue
        labels = [label for s in mining.sentences(record["LONG_ANSWER"]) if (label := biomed_mining.finding_label(s))]
        if labels:
            pairs.append((labels[0], record["final_decision"]))
    precision, per_label = label_precision(pairs)
    return precision, len(pairs), per_label


def finding_judged_precision(docs, mine) -> tuple[float, int, int]:
    """(share judged right, tasks judged, of them still mined by ``mine`` with the judged label)."""
    judged = [
        json.loads(line) for line in (ROOT / "bench" / "data" / "finding_question_judged.jsonl").open(encoding="utf-8")
    ]
    by_id = {doc.id: doc for doc in docs}
    same = [
        row
        for row in judged
        if row["doc_id"] in by_id
        and [t["label"] for t in mine([by_id[row["doc_id"]]], random.Random(0))] == [row["label"]]
    ]
    return sum(row["right"] for row in same) / max(len(same), 1), len(judged), len(same)


_RISE = re.compile(
    r"(?:did|was) (?P<row>.+?) (?:rise|higher|increase)(?: in (?P<y2a>\d{4}) than in (?P<y1a>\d{4})| from "
    r"(?P<y1b>\d{4}) to (?P<y2b>\d{4})| between (?P<y1c>\d{4}) and (?P<y2c>\d{4}))",
    re.I,
)
_CHANGE = re.compile(
    r"(?:change in|did|difference in) (?P<row>.+?) (?:change )?(?:from|between) (?P<y1>\d{4}) (?:to|and) (?P<y2>\d{4})",
    re.I,
)


def _cell(text: str) -> Decimal | None:
    cleaned = text.strip().replace("$", "").replace(",", "").replace("%", "").replace(" ", "")
    negative = cleaned.startswith("(") and cleaned.endswith(")")
    try:
        value = Decimal(cleaned.strip("()"))
    except ArithmeticError:
        return None
    return -value if negative else value


def recompute(task: dict) -> bool:
    """Answer the task again from its own text by a separate reading of the table; True when it agrees."""
    rows = [[c.strip() for c in line.split("|")] for line in task["input"].splitlines()]
    rise = _RISE.search(task["instruction"])
    change = None if rise else _CHANGE.search(task["instruction"])
    if rise:
        row_name = rise["row"]
        first, second = (
            (rise["y1a"], rise["y2a"]) if rise["y1a"] else (rise["y1b"] or rise["y1c"], rise["y2b"] or rise["y2c"])
        )
    elif change:
        row_name, first, second = change["row"], change["y1"], change["y2"]
    else:
        return False
    header = next(
        (
            r
            for r in rows
            if first in [c.replace("FY", "").strip() for c in r] and second in [c.replace("FY", "").strip() for c in r]
        ),
        None,
    )
    matching = [r for r in rows if r and r[0].rstrip(":") == row_name]
    if header is None or len(matching) != 1:
        return False
    columns = [c.replace("FY", "").strip() for c in header]
    before, after = _cell(matching[0][columns.index(first)]), _cell(matching[0][columns.index(second)])
    if before is None or after is None:
        return False
    if rise:
        return task["output"] == ("yes" if after > before else "no")
    stated = re.search(r"The answer is (-?[\d,]+(?:\.\d+)?)\.$", task["output"])
    return stated is not None and abs(Decimal(stated.group(1).replace(",", "")) - (after - before)) < Decimal("0.01")


def cause_precision(tasks: list[dict]) -> tuple[float, int]:
    gold = {}
    for path in sorted((DATA / "fin_corpus" / "fincausal2020").glob("*.csv")):
        with path.open(encoding="utf-8-sig") as handle:
            for row in csv.reader(handle, delimiter=";"):
                if len(row) >= 3 and row[0].strip() != "Index":
                    gold[f"{path.stem}:{row[0].strip()}"] = row[-1].strip() == "1"
    judged = [gold[t["doc_id"]] for t in tasks if t["doc_id"] in gold]
    return sum(judged) / len(judged), len(judged)


def main() -> None:
    if not DATA.is_dir():
        sys.exit(f"shared data not found at {DATA}: set SELFSPEC_DATA")
    started = time.time()
    rng = random.Random(0)
    finance_docs = mining.documents(finance_corpus.passages(str(DATA)))
    biomed_docs = mining.documents(biomed_corpus.passages(str(DATA)))
    figures: dict[str, float | int] = {}

    precision, n, per_label = sentiment_precision()
    yielded = Counter(t["label"] for t in finance_mining.mine_sentiment(finance_docs, rng))
    print(
        f"sentiment_lexicon: FPB dev precision {precision:.3f} over {n} labelled sentences "
        f"({', '.join(f'{k} {v:.3f}' for k, v in per_label.items())}); finance corpus yields {dict(yielded)}"
    )
    figures.update(
        sentiment_lexicon_precision=precision, sentiment_lexicon_n=n, sentiment_lexicon_yield=sum(yielded.values())
    )

    tables = finance_mining.mine_table_changes(finance_docs, rng)
    right = sum(recompute(t) for t in tables)
    print(f"table_change: {right} of {len(tables)} tasks recomputed to the same answer")
    figures.update(
        table_change_precision=right / len(tables), table_change_n=len(tables), table_change_yield=len(tables)
    )

    causes = mining.mine_cause_effect(finance_docs, rng)
    precision, n = cause_precision(causes)
    biomed_causes = mining.mine_cause_effect(biomed_docs, rng)
    print(
        f"cause_effect: {precision:.3f} of {n} FinCausal sections it finds a cause in are gold-causal; "
        f"yields {len(causes)} (finance) and {len(biomed_causes)} (biomed)"
    )
    figures.update(
        cause_effect_precision=precision, cause_effect_n=n, cause_effect_yield=len(causes) + len(biomed_causes)
    )

    precision, n, per_label = finding_precision()
    yielded = Counter(t["label"] for t in biomed_mining.mine_findings(biomed_docs, rng))
    print(
        f"finding_question: PubMedQA dev agreement {precision:.3f} over {n} conclusions "
        f"({', '.join(f'{k} {v:.3f}' for k, v in per_label.items())}); biomed corpus yields {dict(yielded)}"
    )
    figures.update(
        finding_question_precision=precision, finding_question_n=n, finding_question_yield=sum(yielded.values())
    )
    judged_precision, judged, same = finding_judged_precision(biomed_docs, biomed_mining.mine_findings)
    print(
        f"finding_question: {judged_precision:.3f} of {same} hand-judged tasks right "
        f"({judged} judged, {same} still mined "
        "with the judged label)"
    )
    figures.update(finding_question_judged_precision=judged_precision, finding_question_judged_n=same)

    # The in-context task asks the same question with the finding in its input: the verdicts on the
    # finding's label are its truth, as long as the input still holds the finding.
    in_context = biomed_mining.mine_findings_in_context(biomed_docs, rng)
    kept = sum(biomed_mining.finding_label(mining.sentences(t["input"])[-1]) == t["label"] for t in in_context)
    judged_precision, judged, same = finding_judged_precision(biomed_docs, biomed_mining.mine_findings_in_context)
    print(
        f"finding_in_context: {judged_precision:.3f} of {same} hand-judged tasks right; {kept} of {len(in_context)} "
        "inputs end with the finding that decides their label"
    )
    figures.update(
        finding_in_context_precision=judged_precision,
        finding_in_context_n=same,
        finding_in_context_yield=len(in_context),
        finding_in_context_finding_kept=kept / len(in_context),
    )

    figures["minutes"] = (time.time() - started) / 60
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
