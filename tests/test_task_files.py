"""Evaluation tasks declared in YAML (no Python): read, checked with one-line errors, and collected
from a plugin's tasks/ folder and from --tasks DIR."""

import json
from pathlib import Path

import pytest

from selfspec_core.data.catalog import domain_tasks, load_task_file
from selfspec_core.errors import SelfspecError
from selfspec_core.stages.evaluate import collect_tasks, read_items

ROWS = [
    {"id": "c1", "text": "The buyer pays within 30 days of delivery.", "label": "payment"},
    {"id": "c2", "text": "Neither party shall disclose the other's trade secrets.", "label": "confidentiality"},
    {"id": "c3", "text": "Either party may end this agreement with 60 days' notice.", "label": "termination"},
]
TASK = """\
name: clause_type
domain: law
description: Which kind of contract clause a sentence is
data_file: clauses.jsonl
mode: loglikelihood
metric: accuracy
choices: [payment, confidentiality, termination]
prompt:
  instruction: Which kind of clause is this? Answer payment, confidentiality or termination.
  input: "{text}"
answer: label
split: dev
"""


def write_task(folder: Path, text: str = TASK, rows=ROWS, name: str = "clause_type.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "clauses.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / name).write_text(text)
    return folder / name


def test_a_yaml_task_reads_its_rows_through_its_prompt(tmp_path):
    task = load_task_file(write_task(tmp_path), None)
    assert (task.name, task.domain, task.mode, task.metric, task.extra) == (
        "clause_type",
        "law",
        "loglikelihood",
        "accuracy",
        {"split": "dev"},
    )
    items = read_items(task, None)
    assert [(i.id, i.input, i.answer) for i in items] == [(r["id"], r["text"], r["label"]) for r in ROWS]
    assert items[0].instruction.startswith("Which kind of clause") and items[0].choices == (
        "payment",
        "confidentiality",
        "termination",
    )


def test_the_plain_evaluation_format_needs_no_prompt(tmp_path):
    rows = [{"instruction": "Is 2 even?", "output": "yes", "choices": ["yes", "no"]}] * 2
    task = load_task_file(write_task(tmp_path, "name: parity\ndata_file: clauses.jsonl\n", rows), "maths")
    items = read_items(task, None)
    assert task.domain == "maths" and [(i.instruction, i.input, i.answer) for i in items][0] == (
        "Is 2 even?",
        "",
        "yes",
    )


@pytest.mark.parametrize(
    ("change", "rows", "message"),
    [
        (("metric: accuracy", "metric: acuracy"), ROWS,
         r"clause_type.yaml:6: field 'metric': 'acuracy' is not one of .*\(did you mean 'accuracy'\?\)"),
        (("answer: label", "anwser: label"), ROWS,
         r"clause_type.yaml:11: field 'anwser': unknown \(did you mean 'answer'\?\)"),
        (("mode: loglikelihood", "mode: loglikelyhood"), ROWS,
         r"clause_type.yaml:5: field 'mode': .*\(did you mean 'loglikelihood'\?\)"),
        (("input: \"{text}\"", "input: \"{txt}\""), ROWS,
         r"clauses.jsonl:1: field 'txt': missing \(did you mean 'text'\?\)"),
        (("", ""), [{**ROWS[0], "label": "payement"}],
         r"clauses.jsonl:1: field 'label': 'payement' is not one of the choices .*\(did you mean 'payment'\?\)"),
        (("data_file: clauses.jsonl", "data_file: gone.jsonl"), ROWS,
         r"task clause_type \(law\): .*gone.jsonl not found"),
    ],
)  # fmt: skip
def test_every_mistake_is_one_line_naming_file_line_and_field(tmp_path, change, rows, message):
    path = write_task(tmp_path, TASK.replace(*change), rows)
    with pytest.raises(SelfspecError, match=message) as raised:
        read_items(load_task_file(path, None), None)
    assert "\n" not in str(raised.value)


LAW_PLUGIN = """
from selfspec_core.api import Domain, hookimpl

@hookimpl
def register_domains(register):
    register(Domain(name="law", description="contract law"))
"""


def test_a_plugins_tasks_folder_seed_file_and_a_tasks_dir_are_collected(plugin, tmp_path, monkeypatch):
    """A plugin with no hook but register_domains: its task is a file in its package's tasks/ folder,
    its seeds the seeds.jsonl beside its code."""
    import importlib

    from selfspec_core.api import check_plugin, domain_seeds

    package = tmp_path / "law_tasks_plugin"
    write_task(package / "tasks", TASK.replace("domain: law\n", "").replace("split: dev\n", ""))
    (package / "__init__.py").write_text(LAW_PLUGIN)
    seeds = [{"id": str(n), "task_type": "qa", "instruction": f"Name clause kind {n}.", "output": "x"} for n in (1, 2)]
    (package / "seeds.jsonl").write_text("".join(json.dumps(seed) + "\n" for seed in seeds))
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin(importlib.import_module("law_tasks_plugin"), "law")
    assert [(who, task.name, task.domain) for who, task in domain_tasks("law")] == [("law", "clause_type", "law")]
    assert [seed.id for seed in domain_seeds("law")] == ["1", "2"]
    checked = check_plugin("law")
    assert checked.problems == [], checked.problems
    assert "seed_provider (domain law): 2 seeds" in checked.notes
    assert any(
        note.startswith("task file clause_type.yaml task 'clause_type' (domain law): 3 items") for note in checked.notes
    )

    mine = write_task(tmp_path / "mine", TASK.replace("clause_type", "my_clauses").replace("split: dev\n", ""))
    own, _ = collect_tasks("law", cross_domain=False, task_dir=str(mine.parent))
    assert [task.name for task in own] == ["clause_type", "my_clauses"]
    with pytest.raises(SelfspecError, match="--tasks folder not found"):
        collect_tasks("law", cross_domain=False, task_dir=str(tmp_path / "none"))


def test_a_plugins_task_file_for_a_domain_it_does_not_register_sets_it_aside(plugin, tmp_path, monkeypatch, capsys):
    """As check-plugin reports it: the run leaves the plugin out in one line instead of running its
    tasks under a domain it does not own."""
    import importlib

    from selfspec_core.api import check_plugin
    from selfspec_core.plugins.manager import broken_plugins

    package = tmp_path / "law_foreign_plugin"
    write_task(package / "tasks", TASK.replace("domain: law", "domain: tax"))
    (package / "__init__.py").write_text(LAW_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin(importlib.import_module("law_foreign_plugin"), "law")
    problem = "task file clause_type.yaml: domain 'tax' is not one the plugin registers"
    assert domain_tasks("tax") == []
    assert broken_plugins()["law"] == f"plugin 'law' is broken: {problem}; selfspec check-plugin law"
    assert capsys.readouterr().err.count("plugin 'law' is broken") == 1
    assert [p for p in check_plugin("law").problems if problem in p]


@pytest.mark.parametrize("placeholder", ["{text.x}", "{n[0]}", "{d[key]}", "{text[9999]}"])
def test_a_prompt_the_rows_cannot_fill_is_one_line_naming_file_and_prompt(tmp_path, placeholder):
    rows = [{**row, "n": 3, "d": {"other": 1}} for row in ROWS]
    path = write_task(tmp_path, TASK.replace('input: "{text}"', f'input: "{placeholder}"'), rows)
    with pytest.raises(SelfspecError, match=r"clauses.jsonl:1: prompt '.*' does not render \(") as raised:
        read_items(load_task_file(path, None), None)
    assert "\n" not in str(raised.value)


def test_a_misspelled_task_name_in_evaluate_tasks_gets_the_closest():
    with pytest.raises(
        SelfspecError,
        match=r"evaluate.tasks names 'fbp', which is not a task of finance or biomed \(did you mean 'fpb'\?\)",
    ):
        collect_tasks("finance", wanted="fbp")
