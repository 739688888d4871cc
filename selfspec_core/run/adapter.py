"""Reading what the train stage leaves beside an adapter: ``selfspec_training.json`` (settings, data
hash and file, prompt template and format, stats), and which adapter the evaluate stage scores."""

from __future__ import annotations

import json
from pathlib import Path

from selfspec_core.models.loading import check_adapter
from selfspec_core.models.prompting import PromptFormat
from selfspec_core.plugins.defaults import TRAIN_TEMPLATE
from selfspec_core.run.rundir import file_hash
from selfspec_core.templates import PromptTemplate

TRAINING_INFO = "selfspec_training.json"


def read_training_info(adapter: Path) -> dict | None:
    """The adapter's training info, or ``None`` when it has none or it is unreadable: each caller
    decides whether that is an error (composition needs it; caching and provenance do without)."""
    try:
        info = json.loads((Path(adapter) / TRAINING_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def adapter_prompt_format(adapter: Path) -> str:
    """The prompt format ``adapter`` was trained in (:mod:`selfspec_core.models.prompting`); adapters
    from before it was recorded, or without training info, learnt the Alpaca form."""
    return str((read_training_info(adapter) or {}).get("prompt_format") or "alpaca")


def adapter_prompts(adapter: Path, tokenizer) -> PromptFormat:
    """The renderer of the form ``adapter`` learnt: its recorded format, train template and the context
    that filled it (the core's Alpaca template for adapters that recorded none)."""
    info = read_training_info(adapter) or {}
    template = info.get("prompt_template")
    return PromptFormat(
        adapter_prompt_format(adapter),
        PromptTemplate(**template) if isinstance(template, dict) else TRAIN_TEMPLATE,
        tokenizer,
        dict(info.get("prompt_context") or {}),
    )


def stage_adapter(settings, run) -> Path:
    """The adapter the evaluate stage scores: ``evaluate.adapter`` (checked, one line if unusable), else the run's."""
    if settings.evaluate.adapter:
        return check_adapter(Path(settings.evaluate.adapter).expanduser())
    return run.stage_dir("train") / "adapter"


def adapter_training_data(adapter: Path) -> Path | None:
    """The records ``adapter`` was tuned on, when they can be found: it is a run's ``train/adapter``
    and that run's ``respond/data.jsonl`` still has the hash the training stage recorded."""
    info = read_training_info(adapter)
    if info is None or "data_file" not in info:
        return None
    data = adapter.resolve().parent.parent / str(info["data_file"])
    return data if data.is_file() and file_hash(data) == info.get("data_hash") else None
