"""Documents as retrieval corpora: PDF, DOCX, HTML and Markdown, each built here, and bad documents skipped."""

import pytest

from selfspec_core.data.documents import read_document
from selfspec_core.data.retrieval import BM25Index, load_corpus, resolve_corpus
from selfspec_core.errors import SelfspecError
from selfspec_core.run.rundir import RunDir, atomic_write_json, write_jsonl
from selfspec_core.stages.report import retrieval_section, samples_section


def write_pdf(path, pages, password=None):
    """A real PDF with one Helvetica text line per page ("" gives a page with no text layer)."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    font = DictionaryObject(
        {
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica"),
        }
    )
    for text in pages:
        page = writer.add_blank_page(612, 792)
        stream = DecodedStreamObject()
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream.set_data(f"BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET".encode("latin-1") if text else b"")
        page[NameObject("/Contents")] = writer._add_object(stream)
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): writer._add_object(font)})}
        )
    if password:
        writer.encrypt(user_password=password, algorithm="RC4-128")
    with open(path, "wb") as handle:
        writer.write(handle)
    return path


def write_docx(path):
    import docx

    document = docx.Document()
    document.core_properties.title = "Dosing guide"
    document.add_paragraph("Read this before prescribing.")
    document.add_heading("Metformin", level=1)
    document.add_paragraph("Metformin lowers hepatic glucose output in type 2 diabetes.")
    document.add_heading("Renal limits", level=2)
    document.add_paragraph("Stop metformin when eGFR falls below 30.")
    table = document.add_table(rows=2, cols=2)
    for row, values in zip(table.rows, [("eGFR", "dose"), ("30-45", "halve")]):
        for cell, value in zip(row.cells, values):
            cell.text = value
    document.save(path)
    return path


HTML = """<!DOCTYPE html><html><head><title>Bond basics</title><style>p { color: red }</style>
<script>var tracking = "bondscript";</script></head><body>
<nav><a href="/">Home</a> navigationlink</nav>
<p>Introductory words about <b>fixed income</b>.</p>
<h1>Coupons</h1><p>A bond pays fixed coupons until maturity.<br>Coupons are paid twice a year.</p>
<h2>Prices</h2><p>Bond prices fall when rates rise.</p><!-- a comment nobody should index -->
<table><tr><th>rate</th><th>price</th></tr><tr><td>5%</td><td>98</td></tr></table>
<footer>copyright footertext</footer></body></html>"""

MARKDOWN = """---
title: front matter is metadata, not text
---
Opening paragraph about [yield curves](https://example.org).

# Yield curves

An inverted yield curve has often preceded a recession.

## Steepening

When long rates rise faster, the curve *steepens*.

| term | yield |
|---|---|
| 2y | 4.1 |

```
code stays
```
"""


def test_pdf_pages_become_passages_with_their_page(tmp_path):
    write_pdf(tmp_path / "guide.pdf", ["Aspirin inhibits platelet aggregation.", "", "Warfarin needs INR checks."])
    warnings = []
    passages = load_corpus([tmp_path / "guide.pdf"], warn=warnings.append)
    assert [(p.id, p.text, p.source) for p in passages] == [
        ("guide.pdf#0", "Aspirin inhibits platelet aggregation.", "guide.pdf, page 1"),
        ("guide.pdf#1", "Warfarin needs INR checks.", "guide.pdf, page 3"),
    ]
    assert warnings == [f"{tmp_path / 'guide.pdf'}: no text on page(s) 2 (scanned?); used the other 2"]


def test_docx_sections_follow_the_headings(tmp_path):
    passages = load_corpus([write_docx(tmp_path / "dosing.docx")])
    assert [(p.source, p.title, p.text) for p in passages] == [
        ("dosing.docx, § Dosing guide", "Dosing guide", "Read this before prescribing."),
        (
            "dosing.docx, § Dosing guide > Metformin",
            "Dosing guide > Metformin",
            "Metformin lowers hepatic glucose output in type 2 diabetes.",
        ),
        (
            "dosing.docx, § Dosing guide > Metformin > Renal limits",
            "Dosing guide > Metformin > Renal limits",
            "Stop metformin when eGFR falls below 30.\neGFR | dose\n30-45 | halve",
        ),
    ]
    assert [p.id for p in passages] == ["dosing.docx#0", "dosing.docx#1", "dosing.docx#2"]


def test_html_keeps_the_text_and_drops_scripts_navigation_and_comments(tmp_path):
    (tmp_path / "bonds.html").write_text(HTML, encoding="utf-8")
    passages = load_corpus([tmp_path / "bonds.html"])
    assert [(p.source, p.text) for p in passages] == [
        ("bonds.html, § Bond basics", "Introductory words about fixed income."),
        (
            "bonds.html, § Bond basics > Coupons",
            "A bond pays fixed coupons until maturity.\nCoupons are paid twice a year.",
        ),
        ("bonds.html, § Bond basics > Coupons > Prices", "Bond prices fall when rates rise.\nrate | price\n5% | 98"),
    ]
    text = " ".join(p.text for p in passages)
    for boilerplate in ("bondscript", "navigationlink", "footertext", "comment", "color"):
        assert boilerplate not in text


def test_markdown_sections_lose_their_markup(tmp_path):
    (tmp_path / "curves.md").write_text(MARKDOWN, encoding="utf-8")
    passages = load_corpus([tmp_path / "curves.md"])
    assert [(p.source, p.text) for p in passages] == [
        ("curves.md, opening text", "Opening paragraph about yield curves."),
        ("curves.md, § Yield curves", "An inverted yield curve has often preceded a recession."),
        (
            "curves.md, § Yield curves > Steepening",
            "When long rates rise faster, the curve steepens.\nterm | yield\n2y | 4.1\ncode stays",
        ),
    ]


def test_long_sections_are_windowed_and_numbered_across_the_document(tmp_path):
    words = " ".join(f"word{n}" for n in range(450))
    (tmp_path / "long.md").write_text(f"# One\n\n{words}\n\n# Two\n\nshort tail\n", encoding="utf-8")
    passages = load_corpus([tmp_path / "long.md"])
    assert [p.id for p in passages] == ["long.md#0", "long.md#1", "long.md#2", "long.md#3"]
    assert [p.source for p in passages] == ["long.md, § One"] * 3 + ["long.md, § Two"]
    assert all(len(p.text.split()) <= 200 for p in passages)


@pytest.mark.parametrize(
    "name, write, reason",
    [
        ("scan.pdf", lambda path: write_pdf(path, ["", ""]), "no text layer on any of its 2 page(s) (a scanned PDF?)"),
        (
            "locked.pdf",
            lambda path: write_pdf(path, ["Secret text."], password="secret"),
            "encrypted PDF with a password",
        ),
        ("broken.pdf", lambda path: path.write_bytes(b"%PDF-1.4\nthis is not a pdf body"), "corrupt or not a PDF"),
        (
            "locked.docx",
            lambda path: path.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 504),
            "password-protected DOCX",
        ),
        ("broken.docx", lambda path: path.write_bytes(b"PK\x03\x04 truncated zip"), "corrupt or not a DOCX"),
        ("latin1.md", lambda path: path.write_bytes("caf\xe9 notes".encode("latin-1")), "not UTF-8 text"),
        ("empty.html", lambda path: path.write_text("<html><script>x()</script></html>"), "no text in this HTML file"),
    ],
)
def test_a_bad_document_is_skipped_with_one_line_naming_it(tmp_path, name, write, reason):
    (tmp_path / "good.md").write_text("Metformin lowers glucose.\n", encoding="utf-8")
    write(tmp_path / name)
    warnings = []
    passages = load_corpus([tmp_path], warn=warnings.append)
    assert [p.text for p in passages] == ["Metformin lowers glucose."]  # the rest of the corpus is used
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"{tmp_path / name}: skipped: ") and reason in warnings[0]


def test_an_encrypted_pdf_without_a_user_password_is_read(tmp_path):
    write_pdf(tmp_path / "open.pdf", ["Readable despite encryption."], password="")
    assert read_document(tmp_path / "open.pdf").sections[0].text == "Readable despite encryption."


def test_warnings_go_to_stderr_by_default_and_an_all_bad_corpus_fails_clearly(tmp_path, capsys):
    write_pdf(tmp_path / "scan.pdf", [""])
    passages, _ = resolve_corpus(str(tmp_path), "nodomain", None)
    assert passages == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: {tmp_path / 'scan.pdf'}: skipped: no text layer")
    with pytest.raises(SelfspecError, match="retrieval corpus has no text"):
        BM25Index.build(passages)


def test_search_finds_a_document_passage_and_the_report_names_its_page(tmp_path):
    write_pdf(tmp_path / "guide.pdf", ["Aspirin inhibits platelet aggregation.", "Warfarin needs INR checks."])
    (tmp_path / "notes.md").write_text("# Bonds\n\nCoupons are fixed.\n", encoding="utf-8")
    hit = BM25Index.build(load_corpus([tmp_path])).search(["how is warfarin monitored? INR"], 1)[0][0]
    assert hit.passage.source == "guide.pdf, page 2"

    run = RunDir(tmp_path / "run", "biomed").open()
    record = {
        "id": "r1",
        "instruction": "How is warfarin monitored?",
        "input": "",
        "output": "By INR.",
        "retrieved": [
            {"doc_id": hit.passage.id, "score": 1.2, "source": hit.passage.source},
            {"doc_id": "plain-row-7", "score": 0.4},
        ],
    }
    write_jsonl(run.stage_dir("respond") / "data.jsonl", [record])
    atomic_write_json(
        run.stage_dir("respond") / "manifest.json",
        {"retrieval": {"passages": 3, "document_warnings": ["scan.pdf: skipped: no text layer"]}},
    )
    table = samples_section(run, 5, 0).blocks[1]
    assert table.headers[-1] == "grounded in" and table.rows[0][-1] == "guide.pdf, page 2\nplain-row-7"
    retrieval = retrieval_section(run)
    assert retrieval.blocks[1].rows == [["scan.pdf: skipped: no text layer"]]


def test_check_plugin_names_a_shipped_document_it_cannot_read(plugin, tmp_path):
    from selfspec_core import api
    from selfspec_core.authoring.check import check_plugin
    from selfspec_core.records import Domain

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "terms.md").write_text("# Torts\n\nA tort is a civil wrong.\n", encoding="utf-8")
    write_pdf(tmp_path / "corpus" / "scan.pdf", [""])

    class DocumentPlugin:
        @api.hookimpl
        def register_domains(self, register):
            register(Domain(name="docs", description="Documents as a corpus.", task_families=("qa",)))

        @api.hookimpl
        def retrieval_corpus(self, domain, data_dir):
            return [tmp_path / "corpus"] if domain == "docs" else None

    plugin(DocumentPlugin(), "documentplugin")
    result = check_plugin("docs")
    assert result.problems == [
        f"plugin 'documentplugin': hook retrieval_corpus (domain docs): "
        f"{tmp_path / 'corpus' / 'scan.pdf'}: skipped: no text layer on any of its 1 page(s) "
        "(a scanned PDF?); add one with OCR (e.g. ocrmypdf) to use it"
    ]
    assert "retrieval_corpus (domain docs): 1 passages" in result.notes
