"""Where benchmark data and corpora come from: the data directory, the plugin package, or the Hub.

A :class:`DataSource` is one file a task or a corpus reads. It is looked for, in this order:

1. the data directory (``data_dir`` / ``$SELFSPEC_DATA``) at ``path``: the user's offline mirror,
   which always wins when the file is there;
2. the copy shipped inside the plugin package (only data whose licence allows redistribution);
3. the Hugging Face Hub through ``datasets``: its cache answers offline; a download is tried only
   when downloads are allowed (not under ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1``).

A file is read by the consumer's own reader; Hub rows come with their columns renamed as the
source's :class:`HubDataset` says (``"context.contexts"`` reaches into a struct column) and class
label columns as their names, for the consumer's row reader. ``$SELFSPEC_HUB_MIRROR`` names a
folder of dataset repositories cloned from the Hub (``<owner>/<name>/``), for machines that cannot
reach it: they are loaded by the same ``datasets`` code, from disk.
"""

from __future__ import annotations

import contextlib
import gzip
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfspec_core.errors import SelfspecError

DATA_ENV = "SELFSPEC_DATA"
HUB_MIRROR_ENV = "SELFSPEC_HUB_MIRROR"
OFFLINE_ENVS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class HubDataset:
    """A dataset on the Hugging Face Hub: ``load_dataset(repo, config, split=..., data_files=...)``.

    ``columns`` maps the field a row reader wants to the Hub's column (dots reach into structs);
    columns not named are passed through unchanged.
    """

    repo: str
    split: str = "train"
    config: str | None = None
    data_files: str | None = None
    revision: str | None = None
    columns: dict[str, str] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((self.repo, self.split, self.config, self.data_files, self.revision, tuple(self.columns.items())))

    def describe(self) -> str:
        parts = [f"hf:{self.repo}"] + [
            f"{key}={value}"
            for key, value in (
                ("config", self.config),
                ("file", self.data_files),
                ("revision", self.revision),
                ("split", self.split),
            )
            if value
        ]
        return " ".join(parts)


@dataclass(frozen=True)
class DataSource:
    """One benchmark file or corpus part: where it is looked for, and under which licence."""

    name: str
    path: str  # relative to the data directory (a file, or a folder of files); absolute: shipped only
    licence: str
    origin: str = ""  # where to download the file by hand
    shipped: Path | None = None
    hub: HubDataset | None = None


@dataclass(frozen=True)
class Found:
    """Where a source was found: a file (``path``) or Hub rows (``rows``), and a line saying which."""

    where: str  # "data dir", "shipped" or "hub"
    detail: str
    path: Path | None = None
    rows: list[dict] | None = None

    def read(self, read_file: Callable[[Path], Any], read_rows: Callable[[list[dict]], Any]):
        return read_file(self.path) if self.path is not None else read_rows(self.rows)


def data_root(data_dir: str | Path | None) -> Path | None:
    """Where benchmarks and corpora live: ``data_dir`` if given, else ``$SELFSPEC_DATA``, else None."""
    chosen = data_dir or os.environ.get(DATA_ENV)
    return Path(chosen).expanduser() if chosen else None


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """A text file, gunzipped when its name ends in ``.gz`` (how large shipped files are packed)."""
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding=encoding, newline="") as handle:
            return handle.read()
    return path.read_text(encoding=encoding)


def local_file(source: DataSource, data_dir: str | Path | None) -> Found | None:
    """The source's file in the data directory, else its shipped copy; ``None`` when neither is there."""
    root, path = data_root(data_dir), Path(source.path)
    if path.is_absolute() and path.exists():  # a file only the plugin ships, at its installed path
        return Found("shipped", f"{path} (shipped with the plugin)", path=path)
    if root is not None and (root / path).exists():
        return Found("data dir", str(root / path), path=root / path)
    if source.shipped is not None and Path(source.shipped).is_file():
        return Found(
            "shipped", f"{source.shipped} (shipped with the plugin; {source.licence})", path=Path(source.shipped)
        )
    return None


def find(source: DataSource, data_dir: str | Path | None, log: Callable[[str], None] = print) -> Found | str:
    """The source from the data directory, the plugin package or the Hub; else one line saying what to do."""
    found = local_file(source, data_dir)
    if found is not None:
        return found
    if source.hub is None:
        return missing_message(source, data_dir)
    if downloads_disabled() and not cached(source.hub):
        return missing_message(source, data_dir, "offline (HF_HUB_OFFLINE) and not in the datasets cache")
    rows = hub_rows(
        source.hub,
        download=True,
        announce=lambda: log(f"[data] fetching {source.name} from {source.hub.describe()} (licence: {source.licence})"),
    )
    if isinstance(rows, str):
        return missing_message(source, data_dir, rows)
    return Found("hub", f"{source.hub.describe()} ({source.licence})", rows=rows)


def missing_message(source: DataSource, data_dir: str | Path | None, hub_problem: str = "") -> str:
    """What to put where (and why the Hub did not answer), as one line."""
    root = data_root(data_dir)
    hint = f" ({source.origin})" if source.origin else ""
    if root is None:
        line = (
            f"no data directory; set data_dir in the config or {DATA_ENV}=/path/to/data "
            f"and put {source.path}{hint} inside it"
        )
    else:
        line = f"{root / source.path} not found; put {source.path}{hint} under {root}"
    return f"{line}; {source.hub.describe()}: {hub_problem}" if source.hub and hub_problem else line


def status(source: DataSource, data_dir: str | Path | None) -> tuple[str, str]:
    """``(state, detail)`` for listing, without any download: found where, cached, to fetch, or missing."""
    found = local_file(source, data_dir)
    if found is not None:
        return found.where, found.detail
    if source.hub is not None and cached(source.hub):
        return "hub cache", f"{source.hub.describe()} ({source.licence})"
    if source.hub is not None and not downloads_disabled():
        return "to fetch", f"{source.hub.describe()} (licence: {source.licence}); `selfspec data fetch`"
    return "missing", missing_message(source, data_dir, "offline (HF_HUB_OFFLINE)" if source.hub else "")


def downloads_disabled() -> bool:
    return any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE") for name in OFFLINE_ENVS)


def cached(hub: HubDataset) -> bool:
    """Whether ``datasets`` can load the dataset with no network (its cache, or the local mirror)."""
    return not isinstance(hub_rows(hub, download=False), str)


_rows: dict[tuple[HubDataset, bool, str], list[dict] | str] = {}


def hub_rows(hub: HubDataset, download: bool, announce: Callable[[], None] = lambda: None) -> list[dict] | str:
    """The dataset's rows with renamed columns, or why they could not be had. Answers are remembered
    per process, so an unreachable Hub costs one attempt, not one per task; ``announce`` is called
    before a download is tried (the cache answers first)."""
    mirror = os.environ.get(HUB_MIRROR_ENV, "")
    from_cache, fetched = (hub, False, mirror), (hub, True, mirror)
    if fetched in _rows:
        return _rows[fetched]
    if not (mirror and download):  # a mirror stands in for the Hub: loading from it is the fetch
        if from_cache not in _rows:
            _rows[from_cache] = _load_rows(hub, mirror, download=False)
        if isinstance(_rows[from_cache], list) or not download:
            return _rows[from_cache]
    announce()
    _rows[fetched] = _load_rows(hub, mirror, download=True)
    return _rows[fetched]


def _load_rows(hub: HubDataset, mirror: str, download: bool) -> list[dict] | str:
    import datasets

    mirrored = Path(mirror) / hub.repo if mirror else None
    if mirrored is not None and not mirrored.is_dir():
        return f"not in the Hub mirror {mirror} (${HUB_MIRROR_ENV})"
    target = str(mirrored) if mirrored is not None else hub.repo
    try:
        with _offline(not download):
            dataset = datasets.load_dataset(
                target,
                hub.config,
                split=hub.split,
                data_files=hub.data_files,
                revision=None if mirrored else hub.revision,
            )
    except Exception as exc:  # no network, not cached, gone from the Hub: all mean "not available here"
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    labels = {name: feature for name, feature in dataset.features.items() if isinstance(feature, datasets.ClassLabel)}
    rows = []
    for row in dataset:
        row = {name: (labels[name].int2str(value) if name in labels else value) for name, value in row.items()}
        renamed = {wanted: _column(row, column, hub) for wanted, column in hub.columns.items()}
        rows.append({**{k: v for k, v in row.items() if k not in hub.columns.values()}, **renamed})
    return rows


def _column(row: dict, column: str, hub: HubDataset):
    value: Any = row
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            raise SelfspecError(
                f"{hub.describe()}: no column {column!r} (columns: {', '.join(row)}); "
                "the dataset on the Hub changed its layout: report it to the plugin"
            )
        value = value[part]
    return value


@contextlib.contextmanager
def _offline(offline: bool) -> Iterator[None]:
    """Make ``datasets`` answer from its cache only, as ``HF_HUB_OFFLINE=1`` would (read at import, so
    set here); quiet the Hub client's retry warnings and the progress bars: one line says what happened."""
    import datasets
    from huggingface_hub.utils import logging as hub_logging

    before, verbosity = datasets.config.HF_HUB_OFFLINE, hub_logging.get_verbosity()
    bars = not datasets.is_progress_bar_enabled()
    datasets.config.HF_HUB_OFFLINE = offline or before
    hub_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before
        hub_logging.set_verbosity(verbosity)
        if not bars:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------------------------------------
# Every installed domain's sources, for `selfspec data`


@dataclass(frozen=True)
class Listed:
    domain: str
    kind: str  # "task" or "corpus"
    label: str
    source: DataSource


def fetch_missing(listed: list[Listed], data_dir: str | Path | None, log: Callable[[str], None]) -> list[str]:
    """Download (into the ``datasets`` cache) every listed source found nowhere else; the lines of those
    that could not be had, saying what to put where."""
    failed = []
    for entry in listed:
        state, _ = status(entry.source, data_dir)
        if state not in ("to fetch", "missing"):
            continue
        found = find(entry.source, data_dir, log)
        if isinstance(found, str):
            failed.append(f"{entry.kind} {entry.label} ({entry.domain}): {found}")
        else:
            log(f"{entry.kind} {entry.label} ({entry.domain}): {len(found.rows)} rows from {found.detail}")
    return failed
