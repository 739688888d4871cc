"""Evaluation tasks as plugins describe them (see the ``evaluation_tasks`` hook)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

# DATA_ENV and data_root live with the rest of data location; plugins import them from here too.
from selfspec_core.data.datasources import DATA_ENV, DataSource, HubDataset, data_root  # noqa: F401

SCORING_MODES = ("loglikelihood", "generate")
METRICS = ("accuracy", "exact_match", "f1", "rouge_l", "numeric")
# How a log-likelihood task picks each answer among its choices (selfspec_core.eval.scoring.choice_values):
# the summed log-probability, that per token or per byte, or calibrated on a content-free prompt. Every
# one is reported; a task's ``headline`` names the one its results lead with.
CHOICE_SCORES = ("acc", "acc_per_token", "acc_norm", "acc_calibrated")


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
    own format and returns :class:`EvalItem` s. A benchmark that users may also keep in their data
    directory gives a relative ``data_file`` and its ``shipped`` copy instead (the data directory's
    file wins), and ``hub``: the dataset on the Hub, whose rows ``load_rows`` reads (see
    :mod:`selfspec_core.data.datasources`). ``origin`` says where to download the file by hand. Items are
    posed to both models in the training template's format, zero-shot unless ``evaluate.shots``
    says otherwise.

    A log-likelihood task is scored every way in ``CHOICE_SCORES`` from one pass (see
    :func:`selfspec_core.eval.scoring.choice_values`); ``headline`` names the one its table leads with
    and its delta is reported for (``evaluate.headline`` overrides it for a run). Choose it on a
    development split: ``acc`` suits choices of similar length, ``acc_norm`` choices of different
    lengths, ``acc_calibrated`` a model that favours one label whatever the item says.
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
    origin: str = ""
    shipped: Path | None = None
    hub: HubDataset | None = None
    load_rows: Callable[[list[dict]], list[EvalItem]] | None = None
    headline: str = "acc"  # one of CHOICE_SCORES; log-likelihood tasks only

    def __post_init__(self):
        if self.mode not in SCORING_MODES:
            raise ValueError(f"task {self.name}: mode must be one of {SCORING_MODES}")
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name}: metric must be one of {METRICS}")
        if self.headline not in CHOICE_SCORES:
            close = difflib.get_close_matches(self.headline, CHOICE_SCORES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"task {self.name}: headline {self.headline!r} is not one of {', '.join(CHOICE_SCORES)}{hint}"
            )
        if (self.hub is None) != (self.load_rows is None):
            raise ValueError(f"task {self.name}: hub and load_rows go together")

    @property
    def source(self) -> DataSource:
        return DataSource(
            f"task {self.name} ({self.domain})", self.data_file, self.licence, self.origin, self.shipped, self.hub
        )


def package_file(package: str, *parts: str) -> Path:
    """A file or folder shipped inside the installed ``package``, as a path:
    ``package_file(__name__, "seeds.jsonl")``."""
    found = files(package)
    for part in parts:
        found = found / part
    return Path(str(found))
