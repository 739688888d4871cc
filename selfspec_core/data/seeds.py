"""Reading and validating seed files (JSONL or YAML), with errors that name file, line and field."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml

from selfspec_core.errors import SelfspecError, did_you_mean
from selfspec_core.jsonl import read_rows, read_utf8
from selfspec_core.records import SEED_FIELDS, Seed

MAX_LINE_BYTES = 200_000
OPTIONAL_EMPTY = {"input"}


def load_seeds(path: str | Path, task_types: Iterable[str] = ()) -> list[Seed]:
    """Read seeds from ``path`` (``.jsonl``/``.json`` one object a line, or ``.yaml``/``.yml`` list);
    with ``task_types`` (a domain's task families) every seed's task type must be one of them."""
    path = Path(path)
    if not path.is_file():
        raise SelfspecError(f"{path}: seed file not found")
    text = read_utf8(path)
    if not text.strip():
        raise SelfspecError(
            f"{path}: seed file is empty; add one JSON object per line with fields {', '.join(SEED_FIELDS)}"
        )
    rows = _yaml_rows(path, text) if path.suffix in (".yaml", ".yml") else _jsonl_rows(path, text)
    seeds, seen, declared = [], {}, sorted(task_types)
    for line, row in rows:
        seed = _validate(path, line, row)
        if declared and seed.task_type not in declared:
            raise SelfspecError(
                f"{path}:{line}: field 'task_type': {seed.task_type!r} is not one of the domain's task_families "
                f"({', '.join(declared)}){did_you_mean(seed.task_type, declared)}; fix it or declare it"
            )
        if seed.id in seen:
            raise SelfspecError(
                f"{path}:{line}: field 'id': duplicate id {seed.id!r} (first on line {seen[seed.id]}); "
                "ids must be unique"
            )
        seen[seed.id] = line
        seeds.append(seed)
    if not seeds:
        raise SelfspecError(f"{path}: no seeds found")
    return seeds


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, object]]:
    """Rows of any JSON value: :func:`_validate` names what is wrong with one that is not a seed."""
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if len(line.encode()) > MAX_LINE_BYTES:
            raise SelfspecError(
                f"{path}:{number}: line is {len(line.encode()) / 1e6:.1f} MB, "
                f"over the {MAX_LINE_BYTES // 1000} kB limit for one seed; "
                "seeds are short examples: shorten it"
            )
    return read_rows(path, expected=None, lines=lines)


def _yaml_rows(path: Path, text: str) -> list[tuple[int, object]]:
    try:
        nodes = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SelfspecError(
            f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc}); write a list of seed mappings"
        ) from None
    if not isinstance(data, list):
        raise SelfspecError(f"{path}:1: expected a YAML list of seeds (- id: ...), got {type(data).__name__}")
    return [(node.start_mark.line + 1, row) for node, row in zip(nodes.value, data)]


def _validate(path: Path, line: int, row: object) -> Seed:
    if not isinstance(row, dict):
        raise SelfspecError(
            f"{path}:{line}: expected an object with fields {', '.join(SEED_FIELDS)}, got {type(row).__name__}"
        )
    unknown = sorted(set(row) - set(SEED_FIELDS))
    if unknown:
        raise SelfspecError(f"{path}:{line}: field {unknown[0]!r}: unknown field; seeds have {', '.join(SEED_FIELDS)}")
    values = {}
    for name in SEED_FIELDS:
        if name not in row:
            if name in OPTIONAL_EMPTY:
                values[name] = ""
                continue
            raise SelfspecError(f"{path}:{line}: field {name!r} is missing; add it as a string")
        value = row[name]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name == "id":
            value = str(value)
        if not isinstance(value, str):
            raise SelfspecError(f"{path}:{line}: field {name!r}: expected a string, got {type(value).__name__}")
        if not value.strip() and name not in OPTIONAL_EMPTY:
            raise SelfspecError(f"{path}:{line}: field {name!r} is empty; write the seed's {name}")
        values[name] = value.strip()
    return Seed(**values)
