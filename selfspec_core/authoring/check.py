"""``selfspec check-plugin NAME``: each hook of one plugin, called and its answer checked as the pipeline will use it.

A problem is one line naming the plugin, the hook and the domain (and the file, line, stage or task
where there is one), so an author sees every mistake at once rather than the first one a run meets
an hour in. Notes say what was found (seed count, evaluation items, corpus size) or skipped.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path

from selfspec_core.data import catalog
from selfspec_core.data.seeds import load_seeds
from selfspec_core.data.tasks import EvalTask, data_root
from selfspec_core.errors import SelfspecError, did_you_mean
from selfspec_core.plugins import manager as plugins
from selfspec_core.records import SEED_FIELDS, Domain, Seed
from selfspec_core.templates import OPTIONAL, PromptTemplate

TEMPLATE_FIELDS = ("instruction", "input", "output", "task_type", "passages", "domain", "description")
# What each stage's template must use, or the stage loses what it is for.
REQUIRED_FIELDS = {
    "instruction": {"example": ("instruction",)},
    "input": {"example": ("input",)},
    "response": {"example": ("output",), "query": ("instruction", "passages")},
    "train": {"query": ("instruction", "input")},
    "judge": {"query": ("instruction", "output")},
}
SAMPLE = {
    "instruction": "Name one example.",
    "input": "An input.",
    "output": "An answer.",
    "task_type": "qa",
    "passages": "[1] A passage.",
    "domain": "example",
    "description": "an example domain",
}


@dataclass
class CheckResult:
    """What ``check_plugin`` found: ``problems`` to fix (empty when the plugin is fine) and ``notes``."""

    plugin: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_plugin(name: str, data_dir: str | Path | None = None) -> CheckResult:
    """Call every hook plugin ``name`` implements (a domain name finds the plugin registering it) and
    check what comes back: domains, seed schema, template fields, evaluation files, corpus paths."""
    name = _plugin_name(name)
    result = CheckResult(name)
    broken = plugins.broken_plugins().get(name)
    if broken is not None:  # it failed to load: nothing of it can be called
        result.problems.append(broken)
        return result
    plugins.require(name)  # its failures are what this reports, not something to skip
    try:
        installed = plugins.domains()
    except SelfspecError as exc:
        result.problems.append(f"hook register_domains: {exc}")
        return result
    own = [domain for domain in installed.values() if domain.plugin == name]
    if not own:
        result.notes.append(f"plugin {name!r} registers no domain; its hooks are checked for every installed domain")
    for domain in own:
        _check_domain(result, domain)
    for domain in own or installed.values():
        checker = _DomainCheck(result, domain, is_own=domain in own, data_dir=data_dir)
        checker.run()
    _check_task_files(result, own, data_dir)
    return result


def _plugin_name(name: str) -> str:
    manager = plugins.get_plugin_manager()
    if (manager.get_plugin(name) is not None and name != "core") or name in manager.broken:
        return name
    domain = plugins.domains().get(name)
    if domain is not None:
        return domain.plugin
    known = sorted({n for n, _ in manager.list_name_plugin() if n != "core"} | set(manager.broken))
    raise SelfspecError(
        f"no plugin or domain named {name!r}{did_you_mean(name, known + list(plugins.domains()))}; "
        f"installed plugins: {', '.join(known) or 'none'} (see `selfspec plugins`)"
    )


def _check_domain(result: CheckResult, domain: Domain) -> None:
    where = f"plugin {result.plugin!r}: hook register_domains (domain {domain.name})"
    if not domain.description.strip():
        result.problems.append(f"{where}: empty description; prompts say 'an assistant in <description>'")
    undeclared = sorted(set(domain.input_task_types) - set(domain.task_families))
    if undeclared:
        result.problems.append(f"{where}: input_task_types {undeclared} are not in task_families")


class _DomainCheck:
    """The plugin's hooks for one domain."""

    def __init__(self, result: CheckResult, domain: Domain, is_own: bool, data_dir):
        self.result, self.domain, self.is_own, self.data_dir = result, domain, is_own, data_dir
        manager = plugins.get_plugin_manager()
        self.hooks = {caller.name for caller in manager.get_hookcallers(manager.get_plugin(result.plugin)) or ()}
        self.seeds: list[Seed] = []
        self.declared_seeds = catalog.declared_seeds(domain.name) if is_own else None

    def problem(self, hook: str, message: str) -> None:
        self.result.problems.append(
            f"plugin {self.result.plugin!r}: hook {hook} (domain {self.domain.name}): {message}"
        )

    def note(self, hook: str, message: str) -> None:
        self.result.notes.append(f"{hook} (domain {self.domain.name}): {message}")

    def answer(self, hook: str, **kwargs):
        """The plugin's answer, or ``None`` after recording a failure."""
        try:
            return plugins.plugin_result(self.result.plugin, hook, **kwargs)
        except plugins.PluginBroken as exc:
            self.problem(hook, exc.detail)
        except SelfspecError as exc:
            self.problem(hook, str(exc))
        return None

    def run(self) -> None:
        for hook in (
            "seed_provider",
            "prompt_template",
            "filter_record",
            "blacklist_words",
            "evaluation_tasks",
            "corpus_sources",
            "retrieval_corpus",
            "task_miners",
        ):
            if hook in self.hooks or (hook == "seed_provider" and self.is_own and self.declared_seeds):
                getattr(self, hook)()
            elif self.is_own:
                self.note(hook, "not implemented: the core's default or other plugins answer")

    def seed_provider(self) -> None:
        provided = self.answer("seed_provider", domain=self.domain.name) if "seed_provider" in self.hooks else None
        provided = provided if provided is not None else self.declared_seeds
        if provided is None:
            if self.is_own:
                self.problem("seed_provider", "returned None for the plugin's own domain; a run would need --seeds")
            return
        if isinstance(provided, (str, Path)):
            try:
                self.seeds = load_seeds(provided, self.domain.task_families)
            except SelfspecError as exc:
                self.problem("seed_provider", str(exc))
                return
        elif isinstance(provided, list) and all(isinstance(seed, Seed) for seed in provided):
            self.seeds = provided
            families = self.domain.task_families
            for seed in provided:
                if families and seed.task_type not in families:
                    self.problem(
                        "seed_provider",
                        f"seed {seed.id!r}: task type {seed.task_type!r} is not one of the domain's task_families "
                        f"({', '.join(families)}){did_you_mean(seed.task_type, families)}",
                    )
        else:
            held = {type(seed).__name__ for seed in provided} if isinstance(provided, list) else set()
            what = f"a list of {' and '.join(sorted(held))}" if held else type(provided).__name__
            self.problem(
                "seed_provider",
                f"returned {what}; expected a seed file path (str or Path) or a list of Seed "
                "(Seed(**row) makes one of a dict with fields " + ", ".join(SEED_FIELDS) + ")",
            )
            return
        self.note("seed_provider", f"{len(self.seeds)} seeds")

    def prompt_template(self) -> None:
        for stage, required in REQUIRED_FIELDS.items():
            template = self.answer("prompt_template", domain=self.domain.name, stage=stage)
            if template is None:
                continue
            hook = f"prompt_template stage {stage!r}"
            if not isinstance(template, PromptTemplate):
                self.problem(hook, f"returned {type(template).__name__}, expected PromptTemplate")
                continue
            messages = [
                f"{part}: {message}"
                for part in ("header", "example", "query")
                for message in _field_problems(getattr(template, part), required.get(part, ()))
            ]
            for message in messages:
                self.problem(hook, message)
            if messages:
                continue
            try:
                template.render([SAMPLE], SAMPLE, domain=self.domain.name, description=self.domain.description)
            except (ValueError, KeyError, IndexError, AttributeError) as exc:
                self.problem(hook, f"does not render: {type(exc).__name__}: {exc}")

    def filter_record(self) -> None:
        for seed in self.seeds:
            for stage in ("instruction", "response"):
                reason = self.answer("filter_record", domain=self.domain.name, stage=stage, record=seed.to_dict())
                if reason is not None and not isinstance(reason, str):
                    self.problem("filter_record", f"returned {type(reason).__name__}; return a reason (str) or None")
                    return
                if reason:
                    self.problem(
                        "filter_record",
                        f"drops the domain's own seed {seed.id!r} at stage {stage} ({reason}): "
                        "generated records like it would be dropped too",
                    )

    def blacklist_words(self) -> None:
        words = self.answer("blacklist_words", domain=self.domain.name)
        if words is not None and (
            not isinstance(words, (list, tuple, set)) or not all(isinstance(w, str) for w in words)
        ):
            self.problem("blacklist_words", f"returned {type(words).__name__}; return a list of words (str)")

    def evaluation_tasks(self) -> None:
        tasks = self.answer("evaluation_tasks", domain=self.domain.name)
        if tasks is None:
            if self.is_own:
                self.note("evaluation_tasks", "none: a run of this domain has nothing of its own to evaluate")
            return
        if not isinstance(tasks, list) or not all(isinstance(task, EvalTask) for task in tasks):
            self.problem("evaluation_tasks", "expected a list of EvalTask")
            return
        names = [task.name for task in tasks]
        for task in tasks:
            hook = f"evaluation_tasks task {task.name!r}"
            if names.count(task.name) > 1:
                self.problem(hook, "two tasks share this name; task names must be unique in a domain")
            if task.domain != self.domain.name:
                self.problem(hook, f"its domain is {task.domain!r}, asked for {self.domain.name!r}")
            problem, note = _read_task(task, self.data_dir)
            if problem:
                self.problem(hook, problem)
            else:
                self.note(hook, note)

    def corpus_sources(self) -> None:
        from selfspec_core.data.datasources import DataSource, status

        parts = self.answer("corpus_sources", domain=self.domain.name)
        if parts is None:
            return
        if not isinstance(parts, list) or not all(isinstance(part, DataSource) for part in parts):
            self.problem("corpus_sources", "expected a list of DataSource")
            return
        for part in parts:
            self.note("corpus_sources", f"{part.name}: {': '.join(status(part, data_root(self.data_dir)))}")

    def task_miners(self) -> None:
        from selfspec_core.stages.mine import Miner

        miners = self.answer("task_miners", domain=self.domain.name)
        if miners is None:
            return
        if not isinstance(miners, (list, tuple)) or not all(isinstance(m, Miner) for m in miners):
            self.problem("task_miners", "expected a list of Miner")
            return
        for miner in miners:
            if not callable(miner.mine):
                self.problem("task_miners", f"miner {miner.name!r}: mine is not a function")
            elif not miner.weight > 0:
                self.problem(
                    "task_miners",
                    f"miner {miner.name!r}: weight {miner.weight} gets it no records: "
                    "a weight is its share beside the domain's other miners, so it must be positive",
                )
            elif not 0 <= miner.label_prior <= 1:
                self.problem(
                    "task_miners",
                    f"miner {miner.name!r}: label_prior {miner.label_prior} is outside 0 "
                    "(labels balanced) to 1 (labels as often as the corpus has them)",
                )
            elif miner.precision is None:
                self.note(
                    "task_miners",
                    f"miner {miner.name!r} has no measured precision: off unless generate.miners names it",
                )
        self.note("task_miners", f"{len(miners)} miners, {sum(m.on_by_default for m in miners)} on by default")

    def retrieval_corpus(self) -> None:
        from selfspec_core.data.retrieval import Passage, load_corpus

        data_dir = str(self.data_dir) if self.data_dir else None
        sources = self.answer("retrieval_corpus", domain=self.domain.name, data_dir=data_dir)
        if sources is None:
            if self.is_own:
                self.note("retrieval_corpus", "none: retrieval is off for this domain unless --corpus is given")
            return
        if not isinstance(sources, (list, tuple)) or not all(isinstance(s, (str, Path, Passage)) for s in sources):
            self.problem("retrieval_corpus", "expected a list of paths (str or Path) or of Passage")
            return
        missing = [str(s) for s in sources if not isinstance(s, Passage) and not Path(s).exists()]
        for path in missing:
            self.problem("retrieval_corpus", f"{path} does not exist")
        if missing:
            return
        try:
            passages = load_corpus(sources, warn=lambda message: self.problem("retrieval_corpus", message))
        except SelfspecError as exc:
            self.problem("retrieval_corpus", str(exc))
            return
        if not passages:
            self.problem("retrieval_corpus", "the corpus holds no passages; return None when there is none")
        else:
            self.note("retrieval_corpus", f"{len(passages)} passages")


def _read_task(task: EvalTask, data_dir) -> tuple[str, str]:
    """``(problem, "")`` or ``("", what was read)``: the task's items read as the evaluate stage reads them."""
    from selfspec_core.data.datasources import status
    from selfspec_core.stages.evaluate import read_items

    state, detail = status(task.source, data_root(data_dir))
    if state == "to fetch":  # a check downloads nothing
        return "", f"not read: {detail}"
    try:
        items = read_items(task, data_root(data_dir))
    except SelfspecError as exc:
        return str(exc), ""
    return "", items if isinstance(items, str) else f"{len(items)} items ({state}: {detail})"


def _check_task_files(result: CheckResult, domains: list[Domain], data_dir) -> None:
    """Each task YAML file of the plugin's ``tasks/`` folder: declared, read and scored as a run would."""
    folder = catalog.plugin_task_folder(result.plugin)
    if folder is None:
        return
    known = {domain.name for domain in domains}
    for path in catalog.task_files(folder):
        where = f"plugin {result.plugin!r}: task file {path.name}"
        try:
            task = catalog.load_task_file(path, domains[0].name if len(domains) == 1 else None)
        except SelfspecError as exc:
            result.problems.append(f"{where}: {exc}")
            continue
        if task.domain not in known:
            result.problems.append(f"{where}: {catalog.foreign_domain(task.domain, known)}")
            continue
        problem, note = _read_task(task, data_dir)
        if problem:
            result.problems.append(f"{where}: {problem}")
        else:
            result.notes.append(f"task file {path.name} task {task.name!r} (domain {task.domain}): {note}")


def _field_problems(text: str, required: tuple[str, ...]) -> list[str]:
    """Unknown placeholders, broken braces and missing required fields of one template text."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(OPTIONAL.sub(r"\1", text)) if name is not None}
    except ValueError as exc:
        return [f"not a valid format string ({exc}); write a literal brace as {{{{ or }}}}"]
    problems = [
        f"unknown field {{{name}}}; fields are {', '.join(TEMPLATE_FIELDS)}"
        for name in sorted(names - set(TEMPLATE_FIELDS))
    ]
    problems += [f"does not use {{{name}}}" for name in required if name not in names]
    return problems
