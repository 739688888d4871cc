"""Corpus reading in every format, passage windows, the BM25 index, its disk cache, and search."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfspec_core.data.retrieval import (
    MAX_PASSAGE_WORDS,
    BM25Index,
    Passage,
    _tokenize,
    corpus_hash,
    index_cache_dir,
    load_corpus,
    resolve_corpus,
    split_document,
    truncate_passage,
)
from selfspec_core.errors import SelfspecError
from selfspec_core.hookspecs import hookimpl
from selfspec_core.plugins import manager as plugins

DOCS = {
    "ebitda": "EBITDA means earnings before interest, taxes, depreciation and amortization.",
    "dividend": "A dividend is a payment a company makes to its shareholders out of profits.",
    "statin": "Statins inhibit HMG-CoA reductase and lower cholesterol synthesis in the liver.",
    "layoffs": "The retailer will close 38 stores and cut 1,200 jobs as shopper traffic falls.",
}


def test_each_format_and_a_folder(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"id": k, "text": v, "title": k.upper()}) for k, v in DOCS.items()) + "\n"
    )
    (tmp_path / "b.txt").write_text("Bonds pay fixed coupons.\nTheir prices fall when rates rise.\n")
    (tmp_path / "c.csv").write_text(
        'Index; Text; Gold\n1; "Revenue rose 9%; margins held."; 0\n2; Shares fell after the warning.; 1\n'
    )
    pq.write_table(pa.table({"doc_id": ["p1"], "Abstract": ["Metformin lowers glucose."]}), tmp_path / "d.parquet")
    (tmp_path / "notes.xlsx").write_text("ignored: not a corpus format")

    jsonl = load_corpus([tmp_path / "a.jsonl"])
    assert [p.id for p in jsonl] == list(DOCS) and jsonl[0].title == "EBITDA"
    assert load_corpus([tmp_path / "b.txt"]) == [
        Passage("b.txt", "Bonds pay fixed coupons.\nTheir prices fall when rates rise.")
    ]
    csv_passages = load_corpus([tmp_path / "c.csv"])  # ';'-separated, spaces after separators, quoted ';'
    assert [(p.id, p.text) for p in csv_passages] == [
        ("c.csv:2", "Revenue rose 9%; margins held."),
        ("c.csv:3", "Shares fell after the warning."),
    ]
    assert load_corpus([tmp_path / "d.parquet"]) == [Passage("p1", "Metformin lowers glucose.")]
    folder = load_corpus([tmp_path])
    assert len(folder) == len(DOCS) + 1 + 2 + 1
    assert {p.id for p in folder} >= {"b.txt", "c.csv:2", "p1", "ebitda"}


def test_long_documents_become_windows_with_stable_ids():
    text = " ".join(f"w{n}" for n in range(450))
    windows = split_document("doc", text)
    assert [p.id for p in windows] == ["doc#0", "doc#1", "doc#2"]
    assert all(100 <= len(p.text.split()) <= MAX_PASSAGE_WORDS for p in windows)
    assert " ".join(p.text for p in windows) == text
    assert split_document("doc", text) == windows
    assert split_document("short", "one two three") == [Passage("short", "one two three")]
    assert split_document("blank", "  \n ") == []
    table = "Revenue |  2019 | 2018\n\nSales | 10 | 9\nCosts | 4 | 3"
    assert split_document("table", table) == [Passage("table", "Revenue | 2019 | 2018\nSales | 10 | 9\nCosts | 4 | 3")]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": broken}\n', "bad.jsonl:2: not valid JSON"),
        ("list.jsonl", '["a", "b"]\n', "list.jsonl:1: expected a JSON object"),
        ("notext.jsonl", '{"id": 1, "count": 3}\n', "notext.jsonl:1: no text field"),
        ("latin.txt", b"caf\xe9 prices", "latin.txt:1: not UTF-8"),
        ("broken.parquet", b"PAR1 this is not parquet", "broken.parquet: corrupt or unreadable corpus file"),
        ("empty.csv", "", "empty.csv: empty CSV file"),
        ("table.xlsx", "x", "unsupported corpus file type .xlsx"),
    ],
)
def test_bad_corpus_files_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SelfspecError, match=message.replace(".", r"\.")):
        load_corpus([path])


def test_missing_paths_empty_folders_and_duplicate_ids(tmp_path):
    with pytest.raises(SelfspecError, match="not found"):
        load_corpus([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        SelfspecError, match="no .jsonl, .txt, .parquet, .csv, .pdf, .docx, .html, .htm, .md, .markdown files"
    ):
        load_corpus([tmp_path / "empty"])
    (tmp_path / "dup.jsonl").write_text('{"id": "x", "text": "a"}\n{"id": "x", "text": "b"}\n')
    with pytest.raises(SelfspecError, match="passage id 'x' also occurs"):
        load_corpus([tmp_path / "dup.jsonl"])


def test_search_finds_the_known_passage_and_matches_bm25s():
    passages = [Passage(k, v) for k, v in DOCS.items()]
    index = BM25Index.build(passages)
    queries = [
        "What does EBITDA stand for?",
        "Which enzyme do statins inhibit?",
        "store closures and job cuts",
        "the of and",
        "",
    ]
    hits = index.search(queries, top_k=2)
    assert [h[0].passage.id for h in hits[:3]] == ["ebitda", "statin", "layoffs"]
    assert hits[3] == [] and hits[4] == []  # stopwords only, or nothing: no passage shares a term
    # the batched scoring gives bm25s's own scores
    documents, scores = index.retriever.retrieve(_tokenize(queries[:3]), k=2, show_progress=False)
    for mine, ids, values in zip(hits, documents, scores):
        assert [h.passage.id for h in mine] == [passages[int(i)].id for i, s in zip(ids, values) if s > 0]
        assert [h.score for h in mine] == pytest.approx([float(s) for s in values if s > 0], rel=1e-5)
    assert index.search(queries, top_k=10)[0][0].passage.id == "ebitda"  # k above the corpus size


def test_index_is_cached_by_content_and_not_rebuilt(tmp_path, monkeypatch):
    passages = [Passage(k, v) for k, v in DOCS.items()]
    assert index_cache_dir() == tmp_path / "index-cache"  # conftest points the cache here
    built = []
    original = BM25Index.build.__func__
    monkeypatch.setattr(BM25Index, "build", classmethod(lambda cls, p: built.append(1) or original(cls, p)))
    first = BM25Index.open(passages)
    folder = index_cache_dir() / corpus_hash(passages)
    stamp = os.stat(folder / "complete").st_mtime_ns
    second = BM25Index.open(passages)
    assert (first.from_cache, second.from_cache, len(built)) == (False, True, 1)
    assert os.stat(folder / "complete").st_mtime_ns == stamp
    assert second.search(["statins"], 1)[0][0].passage.id == "statin"
    changed = passages[:-1] + [Passage("layoffs", "The retailer opened 40 stores.")]
    assert BM25Index.open(changed).from_cache is False and len(built) == 2  # new content, new index
    (folder / "params.index.json").write_text("{broken")  # a corrupt cache is rebuilt, not trusted
    assert BM25Index.open(passages).from_cache is False and len(built) == 3


def test_corpus_from_setting_hook_or_nowhere(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "Dividends are paid from profits."}) + "\n")
    passages, source = resolve_corpus(str(path), "nodomain", None)
    assert passages == [Passage("c.jsonl:1", "Dividends are paid from profits.")] and source == str(path)
    assert resolve_corpus(None, "nodomain", None) is None

    class Plugin:
        @hookimpl
        def retrieval_corpus(self, domain, data_dir):
            if domain == "testdomain":
                return [Passage("h1", "Hook passage about bonds."), path]
            if domain == "missing":
                return [tmp_path / "absent"]

    manager = plugins.get_plugin_manager()
    manager.register(Plugin(), name="corpus-test")
    try:
        passages, _ = resolve_corpus(None, "testdomain", None)
        assert [p.id for p in passages] == ["h1", "c.jsonl:1"]
        with pytest.raises(SelfspecError, match="plugin 'corpus-test': retrieval corpus .*absent not found"):
            resolve_corpus(None, "missing", None)
    finally:
        manager.unregister(name="corpus-test")


def test_truncate_passage_by_words_or_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    text = " ".join(["revenue"] * 50)
    assert truncate_passage(text, 8) == " ".join(["revenue"] * 6) + " ..."
    assert truncate_passage("short text", 8) == "short text"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cut = truncate_passage(text, 10, tokenizer)
    assert cut.endswith(" ...") and len(tokenizer(cut[:-4]).input_ids) <= 10
