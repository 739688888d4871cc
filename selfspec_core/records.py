"""Plain records passed between plugins and stages."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SEED_FIELDS = ("id", "task_type", "instruction", "input", "output")
"""The fields every seed record has (``input`` may be empty); a seed file with any other field is refused."""


@dataclass(frozen=True)
class Domain:
    """A domain a plugin provides; ``plugin`` is filled in by the plugin manager."""

    name: str
    description: str
    task_families: tuple[str, ...] = ()
    # Task types whose seed instructions hold for any input (e.g. "classify the sentiment of this
    # sentence"): stage 1 also writes new inputs for them under a seed's own instruction, which a
    # small model does far better than writing whole new tasks (``generate.input_share``).
    input_task_types: tuple[str, ...] = ()
    # Whether the core's generic corpus miners (``selfspec_core.stages.mine``) run for this domain; a
    # plugin whose own miners fit its corpus better sets it False.
    core_miners: bool = True
    # Settings the domain chooses for a profile, e.g. ``{"quick": {"train": {"epochs": 2.0}}}``: over
    # the profile's, under the user's config file and flags. For what the profile's budget affords a
    # domain whose records are shorter (or needs where they are longer), chosen on its dev split.
    profile_settings: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False)
    plugin: str = ""


@dataclass(frozen=True)
class Seed:
    """One human-written example task with its correct answer."""

    id: str
    task_type: str
    instruction: str
    input: str
    output: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainingRecord:
    """One record of ``respond/data.jsonl``, what the adapter is tuned on: the task, its answer and where
    both came from. ``source`` is "generated" (the model answered: ``answer`` says how, "generated" or
    "options" when it picked one of the task's stated options) or "mined" (the corpus text decides the
    answer: ``miner`` and ``doc_id`` say which); the rest records what the answer was built from."""

    id: str
    instruction: str
    input: str
    output: str
    task_type: str
    source: str
    answer: str
    seed_ids: list[str] = field(default_factory=list)
    demo_ids: list[str] = field(default_factory=list)
    retrieved: list[dict[str, Any]] = field(default_factory=list)
    options: list[str] | None = None
    label: str | None = None
    confidence: float | None = None
    agreement: float | None = None
    judge_score: float | None = None
    miner: str | None = None
    doc_id: str | None = None
    # Why the respond stage drops it (None: kept); a working field, left out of data.jsonl.
    drop: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Funnel:
    """Counts of what a stage kept and dropped, by reason, for manifests and the report."""

    generated: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return {"generated": self.generated, "kept": self.kept, "dropped": dict(sorted(self.dropped.items()))}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Funnel:
        return cls(data.get("generated", 0), data.get("kept", 0), dict(data.get("dropped", {})))
