"""Evaluation tasks as plugins describe them (see the ``evaluation_tasks`` hook)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Callable

DATA_ENV = "SELFSPEC_DATA"
SCORING_MODES = ("loglikelihood", "generate")
METRICS = ("accuracy", "exact_match", "f1", "rouge_l", "numeric")


@dataclass(frozen=True)
class EvalItem:
    """One benchmark question in instruction form; ``choices`` set for log-likelihood scoring."""

    id: str
    instruction: str
    input: str
    answer: str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvalTask:
    """A benchmark: where its file lives, how to read it, how to score it.

    ``data_file`` is relative to the data directory, or absolute for a file the plugin ships itself
    (``str(package_file(__name__, "eval.jsonl"))``); ``load`` reads that file in the benchmark's
    own format and returns :class:`EvalItem` s. Items are posed to both models in the training
    template's format, zero-shot unless ``evaluate.shots`` says otherwise.
    """

    name: str
    domain: str
    data_file: str
    load: Callable[[Path], list[EvalItem]]
    mode: str = "loglikelihood"
    metric: str = "accuracy"
    description: str = ""
    licence: str = ""
    tolerance: float = 0.01  # relative, for the ``numeric`` metric
    max_new_tokens: int | None = None  # generation length for this task; None: ``evaluate.max_new_tokens``
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in SCORING_MODES:
            raise ValueError(f"task {self.name}: mode must be one of {SCORING_MODES}")
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name}: metric must be one of {METRICS}")


def data_root(data_dir: str | Path | None) -> Path | None:
    """Where benchmarks and corpora live: ``data_dir`` if given, else ``$SELFSPEC_DATA``, else None."""
    chosen = data_dir or os.environ.get(DATA_ENV)
    return Path(chosen).expanduser() if chosen else None


def package_file(package: str, *parts: str) -> Path:
    """A file or folder shipped inside the installed ``package``, as a path: ``package_file(__name__, "seeds.jsonl")``."""
    found = files(package)
    for part in parts:
        found = found / part
    return Path(str(found))
