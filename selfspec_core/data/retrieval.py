"""Retrieval corpora and their cached BM25 index.

A corpus is a list of :class:`Passage` records: given by a plugin's ``retrieval_corpus`` hook, or
read from ``--corpus PATH`` (a file or folder of ``.jsonl`` / ``.txt`` / ``.parquet`` / ``.csv`` data and
``.pdf`` / ``.docx`` / ``.html`` / ``.md`` documents, read by :mod:`selfspec_core.data.documents`).
Long documents are cut into windows of 100-200 words with stable ids (``<doc id>#<n>``), so a
retrieved passage fits a small model's prompt and its id can be traced back to the document; a
passage from a PDF, DOCX, HTML or Markdown file also names its page or section (``source``). A
document that cannot be read (no text layer, encrypted, corrupt) is skipped with one warning line
naming it; the rest of the corpus is used.

The BM25 index (bm25s, English stopwords, Snowball stemming via PyStemmer) is built once per corpus
and cached on disk under the hash of the passages' content, so every later run loads it in
well under a second. The cache folder is ``$SELFSPEC_INDEX_CACHE`` or ``<selfspec cache>/indexes``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfspec_core.data.documents import DOCUMENT_SUFFIXES, UnreadableDocument, read_document
from selfspec_core.errors import SelfspecError, print_warning
from selfspec_core.jsonl import read_rows, read_utf8
from selfspec_core.plugins import manager as plugins

DATA_SUFFIXES = (".jsonl", ".txt", ".parquet", ".csv")
SUPPORTED_SUFFIXES = DATA_SUFFIXES + DOCUMENT_SUFFIXES
MAX_PASSAGE_WORDS = 200
TEXT_FIELDS = ("text", "contents", "content", "passage", "abstract", "body", "document", "medical_abstract")
ID_FIELDS = ("id", "_id", "doc_id", "docid")
TITLE_FIELDS = ("title",)
# Part of the cache key: bump when tokenization or scoring changes, so stale indexes are not reused.
INDEX_FORMAT = "bm25s-lucene-k1.5-b0.75-en-stop-snowball-en-v1"
# Query scores are summed for as many queries at once as fit this many (query, passage) cells.
QUERY_BLOCK_CELLS = 1_000_000


@dataclass(frozen=True)
class Passage:
    """One retrievable piece of text; ``id`` is stable across runs and names its source.

    ``source`` says where in a document the text stands (``guide.pdf, page 3``), for readers of the
    report; it is empty where the id says it all (rows of a data file).
    """

    id: str
    text: str
    title: str = ""
    source: str = ""


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float


# ---------------------------------------------------------------------------------------------
# Reading corpora


def split_document(doc_id: str, text: str, title: str = "", source: str = "") -> list[Passage]:
    """Cut a document into near-equal windows of at most ``MAX_PASSAGE_WORDS`` words.

    A document of up to 200 words stays whole (id unchanged); a longer one becomes
    ``ceil(words / 200)`` windows of 100-200 words, ids ``<doc id>#0``, ``#1``, ... Runs of spaces
    collapse but line breaks stay, so a table keeps one row a line.
    """
    windows = _windows(text)
    return [
        Passage(passage_id, window, title, source) for passage_id, window in zip(_window_ids(doc_id, windows), windows)
    ]


def _windows(text: str) -> list[str]:
    lines = [line.split() for line in text.splitlines()]
    words = [(word, number == len(line) - 1) for line in lines for number, word in enumerate(line)]
    if not words:
        return []
    size = math.ceil(len(words) / math.ceil(len(words) / MAX_PASSAGE_WORDS))
    return [_join_words(words[start : start + size]) for start in range(0, len(words), size)]


def _window_ids(doc_id: str, windows: list) -> list[str]:
    """A lone window keeps the document's id; several are ``<doc id>#0``, ``#1``, ..."""
    return [doc_id] if len(windows) == 1 else [f"{doc_id}#{n}" for n in range(len(windows))]


def document_passages(name: str, sections) -> list[Passage]:
    """Windows of each section of a document, numbered across the document, each naming its section."""
    windows = [(section, window) for section in sections for window in _windows(section.text)]
    return [
        Passage(passage_id, window, section.heading, f"{name}, {section.location}")
        for passage_id, (section, window) in zip(_window_ids(name, windows), windows)
    ]


def _join_words(words: list[tuple[str, bool]]) -> str:
    """Words joined by spaces, with a line break after each that ended a line."""
    return "".join(word + ("\n" if ends_line else " ") for word, ends_line in words).rstrip()


def load_corpus(sources: Sequence[str | Path | Passage], warn: Callable[[str], None] | None = None) -> list[Passage]:
    """Passages from paths (files or folders) and/or ready :class:`Passage` records, ids unique.

    ``warn`` gets one line for each document skipped or partly used (default: printed to stderr).
    """
    warn = warn or print_warning
    passages: list[Passage] = []
    first_seen: dict[str, str] = {}
    for source in sources:
        if isinstance(source, Passage):
            found, origin = (
                split_document(source.id, source.text, source.title, source.source),
                "the retrieval_corpus hook",
            )
            passages.extend(_unique(found, origin, first_seen))
            continue
        path = Path(source).expanduser()
        if not path.exists():
            raise SelfspecError(
                f"corpus {path} not found; pass --corpus with a file or folder of {'/'.join(SUPPORTED_SUFFIXES)} files"
            )
        for file, name in _corpus_files(path):
            if file.suffix.lower() in DOCUMENT_SUFFIXES:
                found = _read_document(file, name, warn)
            else:
                found = list(_read_file(file, name))
            passages.extend(_unique(found, str(file), first_seen))
    return passages


def _read_document(path: Path, name: str, warn: Callable[[str], None]) -> list[Passage]:
    """The passages of one document, or none (with a warning naming it) when it cannot be read."""
    try:
        document = read_document(path)
    except UnreadableDocument as exc:
        warn(f"{path}: skipped: {exc}")
        return []
    except OSError as exc:
        warn(f"{path}: skipped: could not read it ({exc.strerror or exc})")
        return []
    for note in document.notes:
        warn(f"{path}: {note}")
    return document_passages(name, document.sections)


def _unique(found: list[Passage], origin: str, first_seen: dict[str, str]) -> list[Passage]:
    for passage in found:
        if passage.id in first_seen:
            raise SelfspecError(
                f"{origin}: passage id {passage.id!r} also occurs in {first_seen[passage.id]}; "
                "give every document a unique id"
            )
        first_seen[passage.id] = origin
    return found


def _corpus_files(path: Path) -> list[tuple[Path, str]]:
    """The files to read under ``path`` with their id prefix (the path relative to the folder)."""
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise SelfspecError(
                f"{path}: unsupported corpus file type {path.suffix or '(none)'}; use {', '.join(SUPPORTED_SUFFIXES)}"
            )
        return [(path, path.name)]
    files = sorted(
        f
        for f in path.rglob("*")
        if f.is_file()
        and f.suffix.lower() in SUPPORTED_SUFFIXES
        and not any(part.startswith(".") for part in f.relative_to(path).parts)
    )
    if not files:
        raise SelfspecError(f"{path}: no {', '.join(SUPPORTED_SUFFIXES)} files in this corpus folder")
    return [(f, f.relative_to(path).as_posix()) for f in files]


def _read_file(path: Path, name: str) -> Iterator[Passage]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            yield from split_document(name, read_utf8(path))
        elif suffix == ".jsonl":
            yield from _documents(path, name, _jsonl_rows(path))
        elif suffix == ".csv":
            yield from _documents(path, name, _csv_rows(path))
        else:
            yield from _documents(path, name, _parquet_rows(path))
    except SelfspecError:
        raise
    except Exception as exc:  # a corrupt file in any format must name itself
        raise SelfspecError(
            f"{path}: corrupt or unreadable corpus file ({type(exc).__name__}: {exc}); fix or remove it"
        ) from exc


def _jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    return read_rows(path, expected="a JSON object with a 'text' field")


def _csv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    text = read_utf8(path)
    sample = text[:65536]
    try:
        dialect = csv.Sniffer().sniff(sample, delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""), dialect, skipinitialspace=True)
    header = next(reader, None)
    if not header:
        raise SelfspecError(f"{path}: empty CSV file; the first row must name the columns (e.g. id,text)")
    header = [column.strip().lower() for column in header]
    for number, values in enumerate(reader, start=2):
        if values:
            yield number, dict(zip(header, values))


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    columns = {name.lower(): name for name in table.column_names}
    for number, row in enumerate(table.to_pylist(), start=1):
        yield number, {lower: row[name] for lower, name in columns.items()}


def _documents(path: Path, name: str, rows: Iterable[tuple[int, dict]]) -> Iterator[Passage]:
    """Documents of a table-like file: the text column by name, else the column with most text."""
    text_field = id_field = title_field = None
    for number, row in rows:
        if text_field is None:
            fields = {k.lower(): k for k in row}
            text_field = next((fields[f] for f in TEXT_FIELDS if f in fields), None) or _longest_text_field(row)
            if text_field is None:
                raise SelfspecError(f"{path}:{number}: no text field; name one of {', '.join(TEXT_FIELDS)}")
            id_field = next((fields[f] for f in ID_FIELDS if f in fields), None)
            title_field = next((fields[f] for f in TITLE_FIELDS if f in fields), None)
        text = row.get(text_field)
        if text is None:
            continue
        if not isinstance(text, str):
            raise SelfspecError(f"{path}:{number}: field {text_field!r}: expected text, got {type(text).__name__}")
        doc_id = str(row[id_field]).strip() if id_field and row.get(id_field) not in (None, "") else f"{name}:{number}"
        title = str(row.get(title_field) or "").strip() if title_field else ""
        yield from split_document(doc_id, text, title)


def _longest_text_field(row: dict) -> str | None:
    texts = {key: value for key, value in row.items() if isinstance(value, str) and value.strip()}
    return max(texts, key=lambda key: len(texts[key])) if texts else None


def corpus_hash(passages: Sequence[Passage]) -> str:
    """Hash of the passages' ids, titles and texts plus the index format: the index cache key."""
    digest = hashlib.sha256(INDEX_FORMAT.encode())
    for passage in passages:
        digest.update(f"{passage.id}\x00{passage.title}\x00{passage.text}\x01".encode())
    return digest.hexdigest()[:24]


def resolve_corpus(
    corpus_setting: str | None, domain: str, data_dir: str | None, warn: Callable[[str], None] | None = None
) -> tuple[list[Passage], str] | None:
    """The corpus the user passed (``--corpus``), else the domain plugin's; ``None`` when neither.

    Returns the passages and a short description of where they came from (for the manifest);
    ``warn`` gets a line for each document skipped or partly used.
    """
    if corpus_setting:
        return load_corpus([corpus_setting], warn), str(corpus_setting)
    provided = plugins.first_answer(
        "retrieval_corpus", (list, tuple), (str, Path, Passage), domain=domain, data_dir=data_dir
    )
    if provided is None:
        return None
    missing = [str(item) for item in provided if not isinstance(item, Passage) and not Path(item).exists()]
    described = ", ".join(str(item) for item in provided if not isinstance(item, Passage))
    if missing or not described:  # then named by the plugin that gave it
        plugin = plugins.answering_plugin("retrieval_corpus", domain=domain, data_dir=data_dir)
        if missing:
            raise SelfspecError(
                f"plugin {plugin!r}: retrieval corpus {missing[0]} not found; "
                "put the corpus there or pass --corpus PATH"
            )
        described = f"plugin {plugin}"
    return load_corpus(provided, warn), described


# ---------------------------------------------------------------------------------------------
# The index


def index_cache_dir() -> Path:
    configured = os.environ.get("SELFSPEC_INDEX_CACHE")
    if configured:
        return Path(configured)
    from selfspec_core.runtime.cache import cache_dir

    return cache_dir() / "indexes"


def _tokenize(texts: Sequence[str]) -> list[list[str]]:
    import bm25s
    import Stemmer

    return bm25s.tokenize(
        list(texts), stopwords="en", stemmer=Stemmer.Stemmer("english"), return_ids=False, show_progress=False
    )


class BM25Index:
    """BM25 over a list of passages; ``from_cache`` tells whether it was loaded rather than built."""

    def __init__(self, passages: list[Passage], retriever, from_cache: bool):
        self.passages = passages
        self.retriever = retriever
        self.from_cache = from_cache

    @classmethod
    def build(cls, passages: list[Passage]) -> BM25Index:
        import bm25s

        if not passages:
            raise SelfspecError("the retrieval corpus has no text; check the corpus files or pass --retrieval off")
        retriever = bm25s.BM25()
        retriever.index(_tokenize([_indexed_text(p) for p in passages]), show_progress=False)
        return cls(passages, retriever, from_cache=False)

    @classmethod
    def open(cls, passages: list[Passage], cache_dir: Path | None = None) -> BM25Index:
        """Load the cached index of exactly these passages, or build and cache it."""
        import bm25s

        folder = (cache_dir or index_cache_dir()) / corpus_hash(passages)
        if (folder / "complete").exists():
            try:
                retriever = bm25s.BM25.load(str(folder), show_progress=False)
            except Exception:  # an unreadable cache is rebuilt, never trusted
                shutil.rmtree(folder, ignore_errors=True)
            else:
                if retriever.scores["num_docs"] == len(passages):
                    return cls(passages, retriever, from_cache=True)
        index = cls.build(passages)
        index._save(folder)
        return index

    def _save(self, folder: Path) -> None:
        """Write the index to a staging folder, then rename it: a killed save leaves no half index."""
        staging = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            self.retriever.save(str(staging), show_progress=False)
            (staging / "complete").write_text(f"{len(self.passages)}\n")
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(staging, folder)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise SelfspecError(
                f"{folder}: could not write the BM25 index cache ({exc.strerror}); free space or "
                "set SELFSPEC_INDEX_CACHE to a writable folder"
            ) from exc

    def search(self, queries: Sequence[str], top_k: int) -> list[list[Hit]]:
        """The best ``top_k`` passages with a positive score for each query, best first.

        Scores are bm25s's own precomputed BM25 weights (its term-by-document matrix), summed for a
        block of queries at once with ``np.bincount``: the sums bm25s's numpy backend makes with one
        ``np.add.at`` per query term, over 10x faster on CPU and without numba's 15 s compile.
        """
        if not queries or top_k <= 0:
            return [[] for _ in queries]
        k = min(top_k, len(self.passages))
        token_ids = [self.retriever.get_tokens_ids(tokens) for tokens in _tokenize(queries)]
        hits: list[list[Hit]] = []
        block = max(1, QUERY_BLOCK_CELLS // len(self.passages))
        for start in range(0, len(token_ids), block):
            scores = self._score_block(token_ids[start : start + block])
            rows = np.arange(len(scores))
            ranked = []
            for _ in range(k):  # k argmax passes beat a partition here; ties go to the earlier passage
                best = scores.argmax(axis=1)
                ranked.append((best, scores[rows, best].copy()))
                scores[rows, best] = -1.0
            for row in rows:
                hits.append(
                    [Hit(self.passages[int(ids[row])], float(values[row])) for ids, values in ranked if values[row] > 0]
                )
        return hits

    def _score_block(self, token_ids: list[list[int]]) -> np.ndarray:
        """Dense (queries x passages) BM25 scores: each query's term postings summed by bincount."""
        matrix = self.retriever.scores
        indptr, num_docs = matrix["indptr"], matrix["num_docs"]
        rows = np.repeat(np.arange(len(token_ids), dtype=np.int64), [len(ids) for ids in token_ids])
        terms = np.fromiter((t for ids in token_ids for t in ids), dtype=np.int64, count=len(rows))
        starts, lengths = indptr[terms], indptr[terms + 1] - indptr[terms]
        # positions of every posting of every (query, term) pair, gathered in one vectorized step
        offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        cells = np.repeat(rows * num_docs, lengths) + matrix["indices"][offsets]
        summed = np.bincount(cells, weights=matrix["data"][offsets], minlength=len(token_ids) * num_docs)
        return summed.reshape(len(token_ids), num_docs)


def _indexed_text(passage: Passage) -> str:
    return f"{passage.title}\n{passage.text}" if passage.title else passage.text


def truncate_passage(text: str, max_tokens: int, tokenizer=None) -> str:
    """Cut ``text`` to ``max_tokens`` model tokens (or ~0.75 words a token without a tokenizer)."""
    if tokenizer is None:
        words = text.split()
        limit = max(1, int(max_tokens * 0.75))
        return text if len(words) <= limit else " ".join(words[:limit]) + " ..."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens]).rstrip() + " ..."
