"""Documents (PDF, DOCX, HTML, Markdown) read as plain-text sections that know where they came from.

Retrieval cuts every section into passages; a section's ``location`` (``page 3`` of a PDF, ``§ Methods >
Dosage`` under the headings of the other formats) travels with each passage, so a grounded answer can
be traced to the page or section it was built on. A document that cannot be read (a scanned PDF with no
text layer, an encrypted or corrupt file) raises :class:`UnreadableDocument` with a reason the user can
act on; the caller skips that file and uses the rest of the corpus.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

DOCUMENT_SUFFIXES = (".pdf", ".docx", ".html", ".htm", ".md", ".markdown")
# The first bytes of an OLE compound file: what a password-protected .docx (or a legacy .doc) is.
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n.*?\r?\n(---|\.\.\.)[ \t]*(\r?\n|\Z)", re.DOTALL)
# HTML elements that are page furniture or code, never the document's text.
_HTML_SKIPPED = [
    "script",
    "style",
    "noscript",
    "template",
    "nav",
    "header",
    "footer",
    "aside",
    "form",
    "svg",
    "button",
    "iframe",
]
_HTML_BLOCKS = {
    "p",
    "div",
    "li",
    "ul",
    "ol",
    "dl",
    "dt",
    "dd",
    "table",
    "thead",
    "tbody",
    "pre",
    "blockquote",
    "section",
    "article",
    "main",
    "figure",
    "figcaption",
    "caption",
    "hr",
    "address",
    "details",
    "summary",
}


class UnreadableDocument(Exception):
    """The document has no usable text; the message says why and what to do, without the path."""


@dataclass(frozen=True)
class Section:
    """Text from one place in a document: ``heading`` is the heading path, ``location`` names the place."""

    location: str
    heading: str
    text: str


@dataclass
class Document:
    sections: list[Section]
    notes: list[str] = field(default_factory=list)  # what was left out of a readable document, and why


def read_document(path: Path) -> Document:
    """The sections of the document at ``path``, by its suffix (one of ``DOCUMENT_SUFFIXES``)."""
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        return _read_pdf(path)
    if suffix == ".docx":
        return _read_docx(path)
    if suffix in (".html", ".htm"):
        return _read_html(path)
    return _read_markdown(path)


# ------------------------------------------------------------------------------------------- PDF


def _read_pdf(path: Path) -> Document:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError

    pypdf_log = logging.getLogger("pypdf")
    level = pypdf_log.level
    pypdf_log.setLevel(logging.ERROR)  # pypdf warns about every repaired cross-reference table
    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise UnreadableDocument("encrypted PDF with a password; save an unprotected copy to use it")
        texts = [page.extract_text() or "" for page in reader.pages]
    except UnreadableDocument:
        raise
    except DependencyError as exc:
        raise UnreadableDocument(f"encrypted PDF ({exc}); `pip install cryptography` to open it") from None
    except Exception as exc:  # pypdf meets broken files with many exception types; each is a corrupt file
        raise UnreadableDocument(f"corrupt or not a PDF ({type(exc).__name__}: {exc})") from None
    finally:
        pypdf_log.setLevel(level)
    sections = [Section(f"page {number}", "", text) for number, text in enumerate(texts, start=1) if text.strip()]
    if not sections:
        raise UnreadableDocument(
            f"no text layer on any of its {len(texts)} page(s) (a scanned PDF?); "
            "add one with OCR (e.g. ocrmypdf) to use it"
        )
    blank = [str(number) for number, text in enumerate(texts, start=1) if not text.strip()]
    notes = [f"no text on page(s) {', '.join(blank)} (scanned?); used the other {len(sections)}"] if blank else []
    return Document(sections, notes)


# -------------------------------------------------------------------- headed formats: one outline


class _Outline:
    """Text gathered under the current heading path; every heading starts a new section."""

    def __init__(self, title: str = ""):
        self.path: list[tuple[int, str]] = [(0, title)] if title else []
        self.sections: list[Section] = []
        self.lines: list[str] = [""]

    def heading(self, level: int, text: str) -> None:
        self._close()
        text = " ".join(text.split())
        self.path = [(lvl, t) for lvl, t in self.path if lvl < level] + ([(level, text)] if text else [])

    def inline(self, text: str) -> None:
        self.lines[-1] += text

    def newline(self) -> None:
        if self.lines[-1].strip():
            self.lines.append("")

    def line(self, text: str) -> None:
        self.newline()
        self.inline(text)
        self.newline()

    def finish(self) -> list[Section]:
        self._close()
        return self.sections

    def _close(self) -> None:
        text = "\n".join(" ".join(line.split()) for line in self.lines if line.strip())
        self.lines = [""]
        if text:
            heading = " > ".join(t for _, t in self.path)
            self.sections.append(Section(f"§ {heading}" if heading else "opening text", heading, text))


def _headed(sections: list[Section], kind: str) -> Document:
    if not sections:
        raise UnreadableDocument(f"no text in this {kind} file")
    return Document(sections)


# ------------------------------------------------------------------------------------------ DOCX


def _read_docx(path: Path) -> Document:
    import docx
    from docx.table import Table

    with path.open("rb") as handle:
        if handle.read(len(_OLE_MAGIC)) == _OLE_MAGIC:
            raise UnreadableDocument("password-protected DOCX (or a legacy .doc); save an unprotected .docx to use it")
    try:
        document = docx.Document(str(path))
        outline = _Outline(document.core_properties.title or "")
        for block in document.iter_inner_content():
            if isinstance(block, Table):
                for row in block.rows:
                    outline.line(" | ".join(_unique_cells(cell.text for cell in row.cells)))
                continue
            level = _docx_heading_level(block.style.name if block.style is not None else "")
            if level is None:
                outline.line(block.text)
            else:
                outline.heading(level, block.text)
    except Exception as exc:  # a broken package fails anywhere in python-docx and lxml
        raise UnreadableDocument(f"corrupt or not a DOCX ({type(exc).__name__}: {exc})") from None
    return _headed(outline.finish(), "DOCX")


def _docx_heading_level(style: str) -> int | None:
    """``Heading 2`` -> 2, ``Title`` -> 0, any other paragraph style -> None."""
    if style == "Title":
        return 0
    match = re.fullmatch(r"Heading (\d)", style)
    return int(match.group(1)) if match else None


def _unique_cells(texts) -> list[str]:
    """Cell texts of a row, with the repeats that merged cells produce dropped."""
    cells: list[str] = []
    for text in texts:
        if not cells or text != cells[-1]:
            cells.append(text)
    return cells


# ------------------------------------------------------------------------------------------ HTML


def _read_html(path: Path) -> Document:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(path.read_bytes(), "html.parser")  # detects the encoding from the bytes
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    for tag in soup(_HTML_SKIPPED + ["head"]):
        tag.decompose()
    outline = _Outline(title)
    _walk_html(soup.body or soup, outline)
    return _headed(outline.finish(), "HTML")


def _walk_html(node, outline: _Outline) -> None:
    from bs4 import NavigableString, Tag

    for child in node.children:
        if isinstance(child, NavigableString):
            if type(child) is NavigableString:  # not a comment, doctype or CDATA
                outline.inline(str(child))
        elif not isinstance(child, Tag):
            continue
        elif re.fullmatch(r"h[1-6]", child.name):
            outline.heading(int(child.name[1]), child.get_text(" ", strip=True))
        elif child.name == "tr":
            outline.line(" | ".join(cell.get_text(" ", strip=True) for cell in child.find_all(["td", "th"])))
        elif child.name == "br":
            outline.newline()
        elif child.name in _HTML_BLOCKS:
            outline.newline()
            _walk_html(child, outline)
            outline.newline()
        else:
            _walk_html(child, outline)


# -------------------------------------------------------------------------------------- Markdown


def _read_markdown(path: Path) -> Document:
    from markdown_it import MarkdownIt

    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnreadableDocument(
            f"not UTF-8 text (byte {exc.object[exc.start]:#x} at offset {exc.start}); save it as UTF-8"
        ) from None
    tokens = MarkdownIt("commonmark").enable("table").parse(_FRONT_MATTER.sub("", text, count=1))
    outline, cells = _Outline(), []
    for number, token in enumerate(tokens):
        if token.type == "heading_open":
            outline.heading(int(token.tag[1]), _inline_text(tokens[number + 1]))
        elif token.type == "inline" and tokens[number - 1].type != "heading_open":
            if tokens[number - 1].type in ("th_open", "td_open"):
                cells.append(_inline_text(token))
            else:
                outline.line(_inline_text(token))
        elif token.type == "tr_close":
            outline.line(" | ".join(cells))
            cells = []
        elif token.type in ("fence", "code_block"):
            for code_line in token.content.splitlines():
                outline.line(code_line)
        elif token.type == "html_block":
            _walk_html(_html_fragment(token.content), outline)
    return _headed(outline.finish(), "Markdown")


def _inline_text(token) -> str:
    """The words of an inline Markdown token: link and emphasis marks dropped, line breaks kept."""
    parts = []
    for child in token.children or []:
        if child.type in ("text", "code_inline"):
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append("\n")
        elif child.type == "image":
            parts.append(child.content)  # the alt text
    return "".join(parts)


def _html_fragment(markup: str):
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(markup, "html.parser")
    for tag in soup(_HTML_SKIPPED):
        tag.decompose()
    return soup
