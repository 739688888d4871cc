"""Every evaluation task a domain has: its plugins' ``evaluation_tasks`` answers, and tasks declared in
YAML (no Python) in a plugin's ``tasks/`` folder or in the folder ``--tasks DIR`` names; and the seed
set a plugin declares as a file (``seeds.yaml`` / ``seeds.jsonl`` in its package folder).

One YAML file is one task, in lm-evaluation-harness's shape::

    name: clause_type                  # unique within its domain
    domain: law                        # default: the plugin's one domain (with --tasks: the run's)
    description: Which kind of contract clause a sentence is
    data_file: clause_type.jsonl       # JSONL rows, beside this file (or an absolute path)
    mode: loglikelihood                # or generate
    metric: accuracy                   # accuracy, exact_match, f1, rouge_l, numeric
    choices: [payment, confidentiality, termination]   # or the name of a row field holding a list
    prompt:                            # each row's instruction and input; {field} is the row's field
      instruction: Which kind of clause is this? Answer payment, confidentiality or termination.
      input: "{text}"
    answer: label                      # the row field with the correct answer (default: output)
    licence: CC BY 4.0
    split: dev                         # optional: a development split, scored only when named

``hub: {repo: ORG/NAME, split: test, config: ..., revision: ...}`` reads the rows from the Hugging Face
Hub instead (for data a plugin cannot ship); ``data_file`` then names the user's copy in the data
directory, which wins. Without ``prompt`` the rows are selfspec's evaluation format:
``{id, instruction, input, output, choices}``. ``tolerance``, ``max_new_tokens``, ``origin`` and
``headline`` mean what they mean on :class:`~selfspec_core.data.tasks.EvalTask`.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from selfspec_core.data.datasources import DataSource, HubDataset, Listed
from selfspec_core.data.tasks import METRICS, SCORING_MODES, EvalItem, EvalTask
from selfspec_core.errors import SelfspecError, did_you_mean
from selfspec_core.jsonl import read_rows
from selfspec_core.plugins import manager as plugins

TASKS_FOLDER = "tasks"
SEED_FILES = ("seeds.yaml", "seeds.yml", "seeds.jsonl")
TASK_FIELDS = (
    "name",
    "domain",
    "description",
    "data_file",
    "hub",
    "mode",
    "metric",
    "choices",
    "prompt",
    "answer",
    "licence",
    "origin",
    "split",
    "tolerance",
    "max_new_tokens",
    "headline",
)
HUB_FIELDS = ("repo", "split", "config", "data_files", "revision")
# Where the plain evaluation format keeps each part of an item.
PLAIN_PROMPT = {"instruction": "{instruction}", "input": "{input}"}


@dataclass(frozen=True)
class RowFormat:
    """How a declared task's rows become :class:`EvalItem` s: the prompt's templates over each row's
    fields, the field holding the answer, and the choices (a list, or the field holding each row's)."""

    task_file: Path
    instruction: str
    input: str
    answer: str = "output"
    choices: tuple[str, ...] | str = "choices"

    def read_file(self, path: Path) -> list[EvalItem]:
        """``EvalTask.load`` for a JSONL file: one item a line, errors naming file:line:field."""
        if not path.is_file():
            raise SelfspecError(f"{path}: evaluation file not found (named by {self.task_file})")
        rows = [(f"{path}:{number}", row) for number, row in read_rows(path, expected=None)]
        return self._items(rows, str(path))

    def read_rows(self, rows: list[dict]) -> list[EvalItem]:
        """``EvalTask.load_rows`` for rows from the Hub."""
        return self._items([(f"{self.task_file}: Hub row {number}", row) for number, row in enumerate(rows)], "")

    def _items(self, rows: list[tuple[str, object]], source: str) -> list[EvalItem]:
        items = [self._item(where, row, number) for number, (where, row) in enumerate(rows, start=1)]
        if not items:
            raise SelfspecError(f"{source or self.task_file}: no rows; write one JSON object per line")
        return items

    def _item(self, where: str, row: object, number: int) -> EvalItem:
        if not isinstance(row, dict):
            raise SelfspecError(f"{where}: expected a JSON object, got {type(row).__name__}")
        fields = {key: value for key, value in row.items() if isinstance(key, str)}
        instruction, text = (_fill(where, template, fields) for template in (self.instruction, self.input))
        answer = fields.get(self.answer)
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool) or not str(answer).strip():
            raise SelfspecError(
                f"{where}: field {self.answer!r}: missing or empty{did_you_mean(self.answer, fields)}; "
                "it holds the correct answer"
            )
        choices = self.choices if isinstance(self.choices, tuple) else fields.get(self.choices) or ()
        if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) and c.strip() for c in choices):
            raise SelfspecError(f"{where}: field {self.choices!r}: expected a list of non-empty strings")
        choices = tuple(c.strip() for c in choices)
        answer = str(answer).strip()
        if choices and answer not in choices:
            raise SelfspecError(
                f"{where}: field {self.answer!r}: {answer!r} is not one of the choices "
                f"{list(choices)}{did_you_mean(answer, choices)}"
            )
        if not instruction.strip():
            raise SelfspecError(f"{where}: the instruction is empty; fill the row's field or the task's prompt")
        return EvalItem(str(fields.get("id", number)), instruction.strip(), text.strip(), answer, choices)


def _fill(where: str, template: str, fields: dict) -> str:
    """``template`` with the row's fields; a field the row lacks is named with the closest it has. An
    attribute, index or key the row's value lacks (``{text.x}``, ``{n[0]}``, ``{d[key]}``) is a mistake in
    the prompt, said in the same one line."""
    try:
        return template.format_map(_Row(where, fields))
    except (ValueError, IndexError, KeyError, AttributeError, TypeError) as exc:
        raise SelfspecError(f"{where}: prompt {template!r} does not render ({exc})") from None


class _Row(dict):
    def __init__(self, where: str, fields: dict):
        super().__init__({key: "" if value is None else value for key, value in fields.items()})
        self.where = where

    def __missing__(self, key: str):
        if key == "input":  # the plain format's input is optional
            return ""
        raise SelfspecError(f"{self.where}: field {key!r}: missing{did_you_mean(key, self)}; the prompt uses {{{key}}}")


def load_task_file(path: Path, default_domain: str | None) -> EvalTask:
    """The task one YAML file declares, checked; every problem is one line naming the file (and line)."""
    try:
        text = path.read_text(encoding="utf-8")
        spec = yaml.safe_load(text)
    except UnicodeDecodeError as exc:
        raise SelfspecError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SelfspecError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(spec, dict):
        raise SelfspecError(f"{path}: expected a mapping of task fields ({', '.join(TASK_FIELDS[:4])}, ...)")
    lines = _key_lines(text)

    def where(key: str) -> str:
        return f"{path}:{lines[key]}" if key in lines else str(path)

    for key in spec:
        if key not in TASK_FIELDS:
            raise SelfspecError(
                f"{where(key)}: field {key!r}: unknown{did_you_mean(str(key), TASK_FIELDS)}; "
                f"a task has {', '.join(TASK_FIELDS)}"
            )
    for key in ("name", "description", "licence", "origin", "answer", "split", "data_file", "domain"):
        if key in spec and not isinstance(spec[key], str):
            raise SelfspecError(f"{where(key)}: field {key!r}: expected a string, got {type(spec[key]).__name__}")
    name = spec.get("name") or path.stem
    domain = spec.get("domain") or default_domain
    if not domain:
        raise SelfspecError(f"{path}: field 'domain' is missing; its plugin registers several domains: name one")
    hub = _hub(spec.get("hub"), where("hub")) if "hub" in spec else None
    if hub is None and not spec.get("data_file"):
        raise SelfspecError(f"{path}: field 'data_file' is missing; name the JSONL file of the task's rows")
    data_file = spec.get("data_file") or f"{domain}/{name}.jsonl"
    if hub is None:  # a file shipped beside the YAML
        data_file = str((path.parent / data_file).resolve())
    rows = RowFormat(path, *_prompt(spec.get("prompt"), where("prompt")), spec.get("answer", "output"))
    if "choices" in spec:
        rows = _with_choices(rows, spec["choices"], where("choices"))
    for key, allowed in (("mode", SCORING_MODES), ("metric", METRICS)):
        if key in spec and spec[key] not in allowed:
            raise SelfspecError(
                f"{where(key)}: field {key!r}: {spec[key]!r} is not one of {', '.join(allowed)}"
                f"{did_you_mean(str(spec[key]), allowed)}"
            )
    for key, kind in (("tolerance", (int, float)), ("max_new_tokens", int)):
        if key in spec and (not isinstance(spec[key], kind) or isinstance(spec[key], bool) or spec[key] <= 0):
            raise SelfspecError(f"{where(key)}: field {key!r}: expected a positive number, got {spec[key]!r}")
    extra = {"split": spec["split"]} if spec.get("split") else {}
    options = {key: spec[key] for key in ("mode", "metric", "tolerance", "max_new_tokens", "headline") if key in spec}
    try:
        return EvalTask(
            name=name,
            domain=domain,
            data_file=data_file,
            load=rows.read_file,
            description=spec.get("description", ""),
            licence=spec.get("licence", ""),
            origin=spec.get("origin", ""),
            extra=extra,
            hub=hub,
            load_rows=rows.read_rows if hub else None,
            **options,
        )
    except ValueError as exc:  # what EvalTask itself refuses (a headline that is not a score)
        raise SelfspecError(f"{path}: {exc}") from None


def _key_lines(text: str) -> dict[str, int]:
    """The line of each top-level key, for errors."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {key.value: key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)}


def _prompt(prompt: object, where: str) -> tuple[str, str]:
    if prompt is None:
        return PLAIN_PROMPT["instruction"], PLAIN_PROMPT["input"]
    if not isinstance(prompt, dict) or not isinstance(prompt.get("instruction"), str):
        raise SelfspecError(f"{where}: field 'prompt': expected instruction (and input): templates over row fields")
    unknown = sorted(set(prompt) - set(PLAIN_PROMPT))
    if unknown:
        raise SelfspecError(
            f"{where}: field 'prompt': {unknown[0]!r} is unknown{did_you_mean(unknown[0], PLAIN_PROMPT)}; "
            "a prompt has instruction and input"
        )
    for part, template in prompt.items():
        try:
            list(string.Formatter().parse(str(template)))
        except ValueError as exc:
            raise SelfspecError(
                f"{where}: prompt {part}: not a valid template ({exc}); write a literal brace as {{{{ or }}}}"
            ) from None
    return prompt["instruction"], str(prompt.get("input", ""))


def _with_choices(rows: RowFormat, choices: object, where: str) -> RowFormat:
    if isinstance(choices, str):  # the row field that holds each row's choices
        return replace(rows, choices=choices)
    if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
        raise SelfspecError(f"{where}: field 'choices': expected a list of non-empty strings, or a row field's name")
    stripped = tuple(c.strip() for c in choices)
    if len(set(stripped)) < 2:
        raise SelfspecError(f"{where}: field 'choices': needs at least two different choices, got {list(stripped)}")
    return replace(rows, choices=stripped)


def _hub(hub: object, where: str) -> HubDataset:
    if not isinstance(hub, dict) or not isinstance(hub.get("repo"), str):
        raise SelfspecError(
            f"{where}: field 'hub': expected repo (ORG/NAME) and optionally {', '.join(HUB_FIELDS[1:])}"
        )
    unknown = sorted(set(hub) - set(HUB_FIELDS))
    if unknown:
        raise SelfspecError(f"{where}: field 'hub': {unknown[0]!r} is unknown{did_you_mean(unknown[0], HUB_FIELDS)}")
    return HubDataset(**{key: str(value) for key, value in hub.items()})


def task_files(folder: Path) -> list[Path]:
    """The task files of ``folder``: every ``.yaml`` / ``.yml`` file in it, by name."""
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def plugin_folder(plugin: str) -> Path | None:
    """The folder of ``plugin``'s package (``None`` for a plugin object that is not a module)."""
    location = getattr(plugins.get_plugin_manager().get_plugin(plugin), "__file__", None)
    return Path(location).parent if location else None


def plugin_task_folder(plugin: str) -> Path | None:
    """The ``tasks/`` folder of ``plugin``'s package, when it has one."""
    folder = plugin_folder(plugin)
    return folder / TASKS_FOLDER if folder is not None and (folder / TASKS_FOLDER).is_dir() else None


def declared_seeds(domain: str) -> Path | None:
    """The seed file (``seeds.yaml``, ``seeds.yml`` or ``seeds.jsonl``) in the package folder of the
    plugin that registers ``domain``, when that plugin registers no other domain: its seeds when no
    ``seed_provider`` answers."""
    installed = plugins.domains()
    if domain not in installed:
        return None
    plugin = installed[domain].plugin
    folder = plugin_folder(plugin)
    if folder is None or [d.plugin for d in installed.values()].count(plugin) != 1:
        return None
    return next((folder / name for name in SEED_FILES if (folder / name).is_file()), None)


def declared_tasks(plugin: str) -> list[EvalTask]:
    """The tasks ``plugin``'s ``tasks/`` folder declares (none without one); a domain not given in a
    file is the plugin's own, when it registers one. A file for a domain the plugin does not register
    is a broken plugin, as ``check-plugin`` reports it. Read once per command (the plugins in use)."""
    return list(plugins.memoized(f"declared_tasks:{plugin}", lambda: _read_declared_tasks(plugin)))


def _read_declared_tasks(plugin: str) -> list[EvalTask]:
    folder = plugin_task_folder(plugin)
    if folder is None:
        return []
    own = [name for name, domain in plugins.domains().items() if domain.plugin == plugin]
    tasks = []
    for path in task_files(folder):
        task = load_task_file(path, own[0] if len(own) == 1 else None)
        if task.domain not in own:  # check-plugin says the same; a run sets the plugin aside
            raise SelfspecError(f"task file {path.name}: {foreign_domain(task.domain, own)}")
        tasks.append(task)
    return tasks


def foreign_domain(domain: str, registered: Iterable[str]) -> str:
    """What is wrong with a plugin's task file for a domain the plugin does not register: its tasks
    would run under a domain someone else owns, or none does."""
    return f"domain {domain!r} is not one the plugin registers{did_you_mean(domain, registered)}"


def folder_tasks(folder: str | Path, domain: str) -> list[EvalTask]:
    """The tasks of the user's ``--tasks`` folder; a file without a domain is the run's ``domain``'s."""
    path = Path(folder)
    if not path.is_dir():
        raise SelfspecError(f"{path}: --tasks folder not found; name a folder of task YAML files")
    return [load_task_file(file, domain) for file in task_files(path)]


def domain_tasks(domain: str) -> list[tuple[str, EvalTask]]:
    """Every evaluation task the installed plugins give ``domain``, as ``(plugin, task)``: each plugin's
    hook answer, then the tasks its ``tasks/`` folder declares.

    A plugin whose answer or task file is broken is set aside (see :mod:`selfspec_core.plugins.manager`).
    """
    found = [
        (plugin, task)
        for plugin, answer in plugins.results("evaluation_tasks", list, EvalTask, domain=domain)
        for task in answer
    ]
    for plugin in plugins.plugin_names():
        try:
            found += [(plugin, task) for task in declared_tasks(plugin) if task.domain == domain]
        except SelfspecError as exc:
            plugins.set_aside(plugins.PluginBroken(plugin, str(exc)))
    return found


def installed_sources(domain: str | None = None) -> list[Listed]:
    """Each evaluation task and corpus part of every installed domain (or of ``domain`` alone): what
    ``selfspec data`` lists and fetches."""
    listed = []
    for name in [domain] if domain else list(plugins.domains()):
        listed += [Listed(name, "task", task.name, task.source) for _, task in domain_tasks(name)]
        for _, parts in plugins.results("corpus_sources", list, DataSource, domain=name):
            listed += [Listed(name, "corpus", part.name, part) for part in parts]
    return listed
