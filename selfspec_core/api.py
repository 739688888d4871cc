"""The public API for plugin authors: a plugin imports from here and from nowhere else in selfspec_core.

Every name in ``__all__`` keeps its meaning across minor releases; the rest of ``selfspec_core`` is
private and may change in any release. The guide is docs/plugins.md.

* Writing hooks: ``hookimpl``, ``Domain``, ``Seed`` (its fields: ``SEED_FIELDS``), ``PromptTemplate`` and
  ``default_template``, ``EvalTask``, ``EvalItem``, ``Passage``, ``SelfspecError``.
* Mining tasks from a corpus (the ``task_miners`` hook): ``Miner``, ``sentences`` (a text cut into
  sentences), ``pick_phrasing`` (one of several wordings of an instruction).
* Reading data: ``data_root`` (the user's data directory), ``package_file`` (files the plugin ships),
  ``DataSource`` / ``HubDataset`` and ``find_data`` (a file from the data directory, else the
  plugin's shipped copy, else the Hub; see :mod:`selfspec_core.data.datasources`), ``read_text`` (plain or
  ``.gz``), ``load_seeds``, ``read_eval_file`` (the JSONL evaluation format, a ready ``EvalTask.load``),
  ``find_overlaps`` / ``ngram_overlap`` (keep a corpus disjoint from a benchmark).
* Testing a plugin: what the installed plugins answer for a domain, as the pipeline sees it
  (``installed_domains``, ``domain_seeds``, ``domain_template``, ``domain_tasks``, ``task_items``,
  ``domain_corpus``, ``domain_miners``, ``filter_reason``, ``blacklist_pattern``), the contamination helpers
  ``item_texts`` / ``record_text``, ``check_plugin``, ``build_tiny_model``, and ``write_hub_dataset`` /
  ``use_hub_mirror`` (run the Hub path on local folders laid out like Hub dataset repositories).

Names from heavier modules (evaluation, retrieval, filters, pipeline) are imported on first use, so a
plugin that imports this module at start-up does not slow down every ``selfspec`` command.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfspec_core.data.datasources import DataSource, HubDataset, data_root, read_text
from selfspec_core.data.datasources import find as find_data
from selfspec_core.data.seeds import load_seeds
from selfspec_core.data.tasks import EvalItem, EvalTask, package_file
from selfspec_core.errors import SelfspecError
from selfspec_core.hookspecs import hookimpl
from selfspec_core.plugins.defaults import default_template
from selfspec_core.records import SEED_FIELDS, Domain, Seed
from selfspec_core.templates import PromptTemplate

if TYPE_CHECKING:
    from selfspec_core.data.retrieval import Passage
    from selfspec_core.stages.mine import Miner

# public name -> (private module, its name there)
_LAZY = {
    "Passage": ("data.retrieval", "Passage"),
    "Miner": ("stages.mine", "Miner"),
    "sentences": ("stages.mine", "sentences"),
    "pick_phrasing": ("stages.mine", "pick_phrasing"),
    "read_eval_file": ("stages.evaluate", "read_eval_file"),
    "find_overlaps": ("stages.evaluate", "find_overlaps"),
    "ngram_overlap": ("stages.evaluate", "ngram_overlap"),
    "item_texts": ("stages.evaluate", "item_texts"),
    "record_text": ("stages.evaluate", "record_text"),
    "domain_seeds": ("run.pipeline", "domain_seeds"),
    "filter_reason": ("stages.filter", "plugin_reason"),
    "blacklist_pattern": ("stages.filter", "blacklist_pattern"),
    "check_plugin": ("authoring.check", "check_plugin"),
    "build_tiny_model": ("testing", "build_tiny_model"),
    "write_hub_dataset": ("testing", "write_hub_dataset"),
    "use_hub_mirror": ("testing", "use_hub_mirror"),
}

__all__ = [
    "hookimpl",
    "Domain",
    "Seed",
    "SEED_FIELDS",
    "PromptTemplate",
    "default_template",
    "EvalTask",
    "EvalItem",
    "SelfspecError",
    "data_root",
    "package_file",
    "DataSource",
    "HubDataset",
    "find_data",
    "read_text",
    "load_seeds",
    "installed_domains",
    "domain_template",
    "domain_tasks",
    "task_items",
    "domain_corpus",
    "domain_miners",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"selfspec_core.api has no {name!r}; the public names are listed in its __all__")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(f"selfspec_core.{module}"), attribute)
    globals()[name] = value
    return value


def installed_domains() -> dict[str, Domain]:
    """Every installed domain by name; ``Domain.plugin`` names the plugin that registers it."""
    from selfspec_core.plugins import manager as plugins

    return plugins.domains()


def domain_template(domain: str, stage: str) -> PromptTemplate:
    """The template the pipeline uses for ``stage`` of ``domain``: the first plugin's answer, else the core's."""
    from selfspec_core.plugins import manager as plugins

    plugins.require_domain(domain)
    template: PromptTemplate = plugins.first_answer("prompt_template", PromptTemplate, domain=domain, stage=stage)
    return template


def domain_tasks(domain: str) -> dict[str, EvalTask]:
    """Every evaluation task the installed plugins give ``domain`` (hooks and task YAML files), by name
    (development splits too)."""
    from selfspec_core.data import catalog
    from selfspec_core.plugins import manager as plugins

    plugins.require_domain(domain)
    return {task.name: task for _, task in catalog.domain_tasks(domain)}


def task_items(task: EvalTask, data_dir: str | Path | None = None) -> list[EvalItem]:
    """The items of ``task`` as the evaluate stage reads and validates them; ``SelfspecError`` when its
    data is not there."""
    from selfspec_core.stages.evaluate import read_items

    items = read_items(task, data_root(data_dir))
    if isinstance(items, str):
        raise SelfspecError(items)
    return items


def domain_corpus(domain: str, data_dir: str | Path | None = None) -> list[Passage] | None:
    """The passages the respond stage retrieves from for ``domain`` (documents cut into windows, ids
    unique); ``None`` when no plugin gives a corpus."""
    from selfspec_core.data.retrieval import resolve_corpus
    from selfspec_core.plugins import manager as plugins

    plugins.require_domain(domain)
    found = resolve_corpus(None, domain, str(data_dir) if data_dir else None)
    return found[0] if found else None


def domain_miners(domain: str) -> dict[str, Miner]:
    """Every corpus miner for ``domain`` by name (the core's and the plugins'), as the generate stage
    sees them; ``Miner.on_by_default`` says which run unless ``generate.miners`` names others."""
    from selfspec_core.plugins import manager as plugins
    from selfspec_core.stages.mine import available_miners

    return available_miners(plugins.get_domain(domain))
