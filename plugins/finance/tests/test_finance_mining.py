"""The finance miners: the sentiment lexicon, table questions computed from cells, precision on FPB dev."""

import os
import random
import warnings
from pathlib import Path

import pytest
from selfspec_finance import mining
from selfspec_finance.tasks import in_fpb_test_split, read_fpb

from selfspec_core.api import Passage, domain_miners

DATA = Path(os.environ.get("SELFSPEC_DATA") or Path(__file__).resolve().parents[3] / ".." / "shared" / "data")

TABLE = """ | Year ended December 31, |
 | 2019 | 2018
Revenue | $ 1,250 | $ 1,000
Cost of sales | (400) | (380)
Gross margin % | 12.5% | 14%
Segment | North | South
Other income | - | 35
Total | 850 | 620
Total | 90 | 80"""


@pytest.mark.parametrize(
    "sentence,label",
    [
        ("Quarterly net sales increased by 12 percent to EUR 40 million.", "positive"),
        ("The group's operating profit rose to 3.1 million from 2.4 million.", "positive"),
        ("Its net loss narrowed to 1.2 million in the second half.", "positive"),
        ("Operating profit fell to EUR 5 million from EUR 9 million.", "negative"),
        ("The pre-tax loss widened in the third quarter.", "negative"),
        ("The retailer said it would lay off about 300 staff.", "negative"),
        ("The company is headquartered in Espoo and has offices in Oslo.", "neutral"),
        ("Net sales rose but operating profit fell.", None),  # mixed cues: left alone
        ("The chief executive called the outlook excellent.", None),  # evaluative, no figure: not sure
    ],
)
def test_lexicon_decides_only_clear_sentences(sentence, label):
    assert mining.sentiment_of(sentence) == label


def test_sentiment_tasks_use_the_fpb_label_set_and_varied_phrasings():
    docs = [
        Passage(
            f"d{n}",
            "Net sales increased by 9 percent. The firm is based in Turku. "
            "Operating profit fell sharply in the quarter.",
        )
        for n in range(12)
    ]
    tasks = mining.mine_sentiment(docs + [Passage("t", TABLE)], random.Random(0))
    assert len(tasks) == 36 and {t["label"] for t in tasks} == {"positive", "negative", "neutral"}
    assert all(t["options"] == ("positive", "negative", "neutral") and t["output"] == t["label"] for t in tasks)
    assert len({t["instruction"] for t in tasks}) >= 4
    assert all(t["doc_id"] != "t" for t in tasks)  # tables are not sentences


def test_table_questions_are_computed_from_the_cells_and_unusable_tables_reported():
    facts = mining.table_facts(TABLE)
    assert {(f["row"], f["before"], f["after"]) for f in facts} == {
        ("Revenue", 1000.0, 1250.0),
        ("Gross margin %", 14.0, 12.5),
    }
    assert mining.cell_number("$(1,234.5)") == -1234.5 and mining.cell_number("n/a") is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tasks = mining.mine_table_changes(
            [Passage("t", TABLE), Passage("words", "Item | 2019 | 2018\nStaff | many | few")], random.Random(0)
        )
    assert [str(w.message) for w in caught] == [
        "1 tables have no row with numbers under two year columns and were skipped (e.g. words)"
    ]
    revenue = [t for t in tasks if "Revenue" in t["instruction"]]
    assert sorted(t["output"] for t in revenue) == [
        "It rose by 250, from 1,000 in 2018 to 1,250 in 2019. The answer is 250.",
        "yes",
    ]
    margin = [t for t in tasks if "Gross margin" in t["instruction"] and t.get("label")]
    assert margin[0]["output"] == "no" and margin[0]["options"] == ("yes", "no")
    repeated = mining.table_facts("Item | 2019 | 2018 | 2019 | 2018\nSales | 1 | 2 | 3 | 4")
    assert repeated == []  # a year under two headings is ambiguous


def test_miners_reach_the_pipeline_through_the_hook():
    found = domain_miners("finance")
    assert {"sentiment_lexicon", "table_change", "cause_effect"} <= set(found)
    assert [name for name, miner in found.items() if miner.on_by_default] == ["sentiment_lexicon", "table_change"]


def test_lexicon_precision_on_fpb_dev_is_what_the_miner_records():
    path = DATA / "financial_phrasebank" / "Sentences_50Agree.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found (set SELFSPEC_DATA)")
    pairs = [
        (label, gold)
        for _, sentence, gold in read_fpb(path)
        if not in_fpb_test_split(sentence) and (label := mining.sentiment_of(sentence)) is not None
    ]
    per_label = [
        sum(g == label for p, g in pairs if p == label) / sum(p == label for p, _ in pairs)
        for label in mining.SENTIMENTS
    ]
    precision = sum(per_label) / len(per_label)
    recorded = next(m for m in mining.MINERS if m.name == "sentiment_lexicon").precision
    assert min(per_label) >= 0.9 and abs(precision - recorded) < 0.001
