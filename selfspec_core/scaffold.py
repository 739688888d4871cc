"""``selfspec new-domain NAME``: an installable plugin package a user fills in."""

from __future__ import annotations

import json
from pathlib import Path
from string import Template

from .errors import SelfspecError

PYPROJECT = Template('''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "selfspec-$name"
version = "0.1.0"
description = "selfspec domain plugin: $name"
requires-python = ">=3.10"
dependencies = ["selfspec"]

[project.entry-points.selfspec]
$name = "selfspec_$module"

[tool.setuptools.packages.find]
include = ["selfspec_$module*"]

[tool.setuptools.package-data]
selfspec_$module = ["seeds.jsonl"]
''')

PLUGIN = Template('''"""selfspec domain plugin for $name.

Implement only the hooks you need; the core's defaults answer the rest
(see selfspec_core/hookspecs.py for every hook and what it must return).
"""

from importlib.resources import files

from selfspec_core.hookspecs import hookimpl
from selfspec_core.records import Domain

DOMAIN = "$name"


@hookimpl
def register_domains(register):
    register(Domain(name=DOMAIN, description="$name", task_families=("qa",)))


@hookimpl
def seed_provider(domain):
    if domain == DOMAIN:
        return str(files("selfspec_$module") / "seeds.jsonl")


@hookimpl
def filter_record(domain, stage, record):
    """Return a reason to drop a record of this domain, or None to keep it."""
    if domain == DOMAIN and "lorem ipsum" in record["instruction"].lower():
        return "placeholder text"
''')

TEST = Template('''from selfspec_core import plugins
from selfspec_core.pipeline import domain_seeds


def test_domain_is_registered():
    assert "$name" in plugins.domains()


def test_seeds_load():
    assert len(domain_seeds("$name")) >= 1


def test_filter_drops_placeholder_text():
    reasons = [r for _, r in plugins.results("filter_record", domain="$name", stage="instruction",
                                             record={"instruction": "Lorem ipsum dolor", "input": ""})]
    assert reasons == ["placeholder text"]
''')

EXAMPLE_SEEDS = [
    {"id": "ex-001", "task_type": "qa", "instruction": "Replace this with a real question of your domain.",
     "input": "", "output": "Replace this with its correct answer."},
    {"id": "ex-002", "task_type": "classification",
     "instruction": "Classify the text as relevant or irrelevant to the domain.",
     "input": "Replace with an example text.", "output": "relevant"},
]


def scaffold_domain(name: str, dest: Path) -> Path:
    """Create ``dest/selfspec-NAME/`` with pyproject, hooks, example seeds and a test."""
    module = name.replace("-", "_").replace(".", "_").lower()
    folder = dest / f"selfspec-{name}"
    if folder.exists():
        raise SelfspecError(f"{folder} already exists; pick another name or --dest")
    fields = {"name": name, "module": module}
    package = folder / f"selfspec_{module}"
    package.mkdir(parents=True)
    (folder / "tests").mkdir()
    (folder / "pyproject.toml").write_text(PYPROJECT.substitute(fields))
    (package / "__init__.py").write_text(PLUGIN.substitute(fields))
    (package / "seeds.jsonl").write_text("".join(json.dumps(s) + "\n" for s in EXAMPLE_SEEDS))
    (folder / "tests" / f"test_{module}.py").write_text(TEST.substitute(fields))
    return folder
