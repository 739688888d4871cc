"""Every hook a selfspec plugin can implement.

A plugin is a module or object with functions decorated by ``@hookimpl`` whose names match the
specifications below; it imports ``hookimpl`` and everything else from ``selfspec_core.api``
(docs/plugins.md is the guide). Domain plugins register through the ``selfspec`` entry-point group::

    [project.entry-points.selfspec]
    finance = "selfspec_finance"

The core registers its own defaults (``selfspec_core.plugins.defaults``) first, so a domain plugin only
implements what it needs to change. Hooks marked ``firstresult`` return the first non-``None``
answer, and plugins registered later are called first: that is how a domain overrides a default.
Every hook is called with keyword arguments; an implementation may accept only those it uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pluggy import HookimplMarker, HookspecMarker

if TYPE_CHECKING:  # for the signatures only: several of these modules call hooks themselves
    from collections.abc import Callable, Collection
    from pathlib import Path

    from selfspec_core.data.datasources import DataSource
    from selfspec_core.data.retrieval import Passage
    from selfspec_core.data.tasks import EvalTask
    from selfspec_core.records import Domain, Seed
    from selfspec_core.stages.mine import Miner
    from selfspec_core.templates import PromptTemplate

hookspec = HookspecMarker("selfspec")
hookimpl = HookimplMarker("selfspec")


@hookspec
def register_domains(register: Callable[[Domain], None]) -> None:
    """Declare the domains this plugin provides.

    Call ``register(Domain(name=..., description=..., task_families=[...]))`` once per domain.
    A domain name must be unique across installed plugins. ``input_task_types`` names the task
    types whose seed instructions fit any input (sentiment of a sentence, not a question about one
    abstract); stage 1 then also writes new inputs for them under the seeds' own instructions.
    """


@hookspec(firstresult=True)
def seed_provider(domain: str) -> str | Path | list[Seed] | None:
    """Return the human-written seeds of ``domain``.

    Return a path to a JSONL/YAML seed file (``{id, task_type, instruction, input, output}`` per
    record) or a list of :class:`selfspec_core.api.Seed`; ``None`` when this plugin does not
    serve ``domain``. The user's ``--seeds`` file replaces whatever this hook returns.
    """


@hookspec(firstresult=True)
def prompt_template(domain: str, stage: str) -> PromptTemplate | None:
    """Return the :class:`selfspec_core.api.PromptTemplate` for one pipeline ``stage``.

    ``stage`` is one of ``"instruction"`` (writing new instructions from examples), ``"input"``
    (writing a new input for a seed's instruction, for the domain's ``input_task_types``), ``"response"``
    (answering an instruction, with retrieved passages), ``"train"`` (the format the model is tuned
    on, also used to query the tuned model) and ``"judge"`` (asking the model whether a response is
    good). The core answers every stage with a generic template; return ``None`` to keep it.
    """


@hookspec
def filter_record(domain: str, stage: str, record: dict[str, Any]) -> str | None:
    """Reject a record of any domain: return a short reason (``str``) to drop it, ``None`` to keep.

    Called for every candidate instruction (``stage="instruction"``, ``record`` has
    ``instruction`` and ``input``) and every response (``stage="response"``, ``record`` also has
    ``output``). Any plugin may filter any domain, e.g. a PII filter installed on its own.
    """


@hookspec
def blacklist_words(domain: str) -> Collection[str] | None:
    """Return extra words that make an instruction unanswerable by a text model (e.g. "chart").

    They are added to the core's list (image, graph, video, ...); an instruction containing any of
    them is dropped with reason ``blacklist``.
    """


@hookspec
def evaluation_tasks(domain: str) -> list[EvalTask] | None:
    """Return the evaluation tasks of ``domain`` as a list of :class:`selfspec_core.api.EvalTask`.

    Each task names its data file (relative to the data dir), a loader for the benchmark's own file
    format, its prompt, scoring mode and metric, and optionally a copy shipped with the plugin and
    the dataset on the Hub with a reader for its rows (see :mod:`selfspec_core.data.datasources`). Tasks
    of every installed domain are collected, so
    evaluation can also report the cross-domain cost of specializing.
    """


@hookspec(firstresult=True)
def retrieval_corpus(domain: str, data_dir: str | None) -> list[str | Path] | list[Passage] | None:
    """Return the default retrieval corpus of ``domain``: a list of paths (files or folders of
    ``.jsonl``/``.txt``/``.parquet``/``.csv``), or of :class:`selfspec_core.api.Passage`.

    ``data_dir`` is the user's data directory (may be ``None``); find each part there, in the
    plugin package or on the Hub with :func:`selfspec_core.data.datasources.find`. Return ``None`` when there is no
    corpus; retrieval is then switched off with a message. ``--corpus`` replaces this hook.
    """


@hookspec
def corpus_sources(domain: str) -> list[DataSource] | None:
    """Return the parts of ``domain``'s default retrieval corpus as
    :class:`selfspec_core.data.datasources.DataSource` s.

    Where each part is looked for (data directory, shipped copy, Hub) and under which licence, so
    ``selfspec data`` can list and fetch them; reading them stays ``retrieval_corpus``'s job.
    """


@hookspec
def task_miners(domain: str) -> list[Miner] | None:
    """Return miners that turn ``domain``'s corpus into tasks the text itself answers.

    Return a list of :class:`selfspec_core.stages.mine.Miner` (``None`` for other domains). A miner
    with the name of a core miner replaces it; register the domain with ``core_miners=False`` to
    turn all of the core's off. Give each miner the ``precision`` that ``bench/miners.py``
    measures for it: only those at 0.9 or better run unless ``generate.miners`` names them.
    """
