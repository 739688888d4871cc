"""The domains' development splits, posed as the evaluate stage poses a benchmark: what the benches
that choose defaults score (never the test splits)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from selfspec_core.compose.experts import installed_template_context
from selfspec_core.plugins import manager as plugins
from selfspec_core.stages.evaluate import LoadedTask, collect_tasks, evaluation_prompts, load_tasks
from selfspec_core.templates import PromptTemplate

DEV_TASK = {"finance": "fpb_dev", "biomed": "pubmedqa_dev"}
DATA = Path(os.environ.get("SELFSPEC_DATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data")


def dev_split(domain: str, settings, model):
    """``domain``'s development task, loaded with ``settings`` (seeded subset, data dir), and the prompt
    form the evaluate stage would pose it in for ``model``."""
    if domain not in DEV_TASK:
        sys.exit(f"no development split known for domain {domain!r}: choose from {', '.join(DEV_TASK)}")
    tasks, _ = collect_tasks(domain, cross_domain=False, wanted=DEV_TASK[domain])
    loaded, skipped = load_tasks(tasks, settings, print)
    if not loaded:
        sys.exit(f"{DEV_TASK[domain]} could not be loaded: {skipped}")
    template = plugins.first_answer("prompt_template", PromptTemplate, domain=domain, stage="train")
    prompts = evaluation_prompts(settings, model, None, template, installed_template_context(domain))
    task: LoadedTask = loaded[0]
    return task, prompts
