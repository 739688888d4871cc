"""What a stage gets from the pipeline: settings, domain, seeds, model and its own working folder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from selfspec_core.config import Settings
from selfspec_core.errors import SelfspecError
from selfspec_core.models.loading import ModelRef
from selfspec_core.plugins import manager as plugins
from selfspec_core.records import Domain, Seed
from selfspec_core.run.rundir import RunDir
from selfspec_core.templates import PromptTemplate, template_context


@dataclass
class StageContext:
    """What a stage gets: settings, domain, seeds, model, and its own working folder."""

    settings: Settings
    domain: Domain
    run: RunDir
    seeds: list[Seed]
    model: ModelRef
    work: Path
    log: Callable[[str], None] = field(default=print)

    def template(self, stage: str) -> PromptTemplate:
        template = plugins.first_answer("prompt_template", PromptTemplate, domain=self.domain.name, stage=stage)
        if template is None:
            raise SelfspecError(f"no prompt template for stage {stage!r}")
        return template

    @property
    def template_context(self) -> dict:
        return template_context(self.domain.name, self.domain.description)
