"""Reading what the train stage leaves beside an adapter: ``selfspec_training.json`` (settings, data
hash and file, prompt template and format, stats), and which adapter the evaluate stage scores."""

from __future__ import annotations

import json
from pathlib import Path

from selfspec_core.errors import SelfspecError
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
    learnt = (read_training_info(adapter) or {}).get("prompt_format") or "alpaca"
    if not isinstance(learnt, str):  # a multi-task adapter of experts that learnt different forms
        raise SelfspecError(
            f"{Path(adapter) / TRAINING_INFO}: the adapter learnt several prompt formats "
            f"({', '.join(map(str, learnt))}), so no one form poses prompts as it learnt them; "
            "use the domain adapters, or a composed model"
        )
    return learnt


def adapter_prompts(adapter: Path, tokenizer, context: dict | None = None) -> PromptFormat:
    """The renderer of the form ``adapter`` learnt: its recorded format, train template and the context
    that filled it (the core's Alpaca template for adapters that recorded none; ``context``, the
    caller's best guess such as the domain's installed one, for adapters from before it was recorded)."""
    info = read_training_info(adapter) or {}
    template = info.get("prompt_template")
    if template is not None and not isinstance(template, dict):  # a multi-task adapter: one per domain
        raise SelfspecError(
            f"{Path(adapter) / TRAINING_INFO}: the adapter learnt each domain in its own prompt template, "
            "so no one template poses prompts as it learnt them; use the domain adapters, or a composed model"
        )
    return PromptFormat(
        adapter_prompt_format(adapter),
        PromptTemplate(**template) if isinstance(template, dict) else TRAIN_TEMPLATE,
        tokenizer,
        dict(info["prompt_context"] if isinstance(info.get("prompt_context"), dict) else context or {}),
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
