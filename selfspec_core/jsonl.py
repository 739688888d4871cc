"""The one JSON-lines reader: seeds, corpora, evaluation files and the run directory's own records.

:func:`numbered_rows` parses; :func:`read_rows` reads a file a user gave, with errors that name the
file, the line and the fix. Low in the package (it imports only errors) so every module may use it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from selfspec_core.errors import SelfspecError


class JsonlLineError(ValueError):
    """Line ``number`` of a JSONL file is not a JSON value (or not an object where one is expected)."""

    def __init__(self, number: int, problem: str, fix: str):
        super().__init__(f"line {number}: {problem}")
        self.number, self.problem, self.fix = number, problem, fix


def numbered_rows(lines: Iterable[str | bytes], expected: str | None = "a JSON object") -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line; with ``expected`` (what the line should hold,
    for the message) a value that is not a JSON object is refused. Raises :class:`JsonlLineError`."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise JsonlLineError(
                number, f"not valid JSON ({exc.msg} at column {exc.colno})", "write one JSON object per line"
            ) from None
        except UnicodeDecodeError as exc:
            raise JsonlLineError(number, f"not UTF-8 text ({exc.reason})", "save the file as UTF-8") from None
        if expected and not isinstance(value, dict):
            raise JsonlLineError(number, f"expected {expected}, got {type(value).__name__}", "fix that line")
        yield number, value


def read_utf8(path: Path) -> str:
    """A UTF-8 text file a user gave; not UTF-8, the error names its line and byte."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SelfspecError(
            f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#x}); save the file as UTF-8"
        ) from None


def read_rows(
    path: Path, expected: str | None = "a JSON object", lines: Iterable[str] | None = None
) -> list[tuple[int, Any]]:
    """``(line number, value)`` rows of a JSONL file a user gave (``lines``: its text, already read);
    the error for a bad line says ``path:line``, what is wrong and what to do."""
    try:
        return list(numbered_rows(read_utf8(path).splitlines() if lines is None else lines, expected))
    except JsonlLineError as exc:
        raise SelfspecError(f"{path}:{exc.number}: {exc.problem}; {exc.fix}") from None
