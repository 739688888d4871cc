"""The plugin author's surface: the public API, `selfspec plugins`, `selfspec check-plugin`, the guide.

A plugin imports ``selfspec_core.api`` and nothing else from the core: the bundled plugins and the
scaffold are held to it here, so a refactor of the core cannot break them unseen.
"""

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from selfspec_core import api
from selfspec_core.authoring.check import check_plugin
from selfspec_core.records import Domain

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugins.md"


def core_imports(path: Path) -> list[str]:
    """``file:line: module`` for every import of a selfspec_core module other than the public API."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = (
                [node.module] if node.module != "selfspec_core" else [f"selfspec_core.{a.name}" for a in node.names]
            )
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        found += [
            f"{path}:{node.lineno}: {m}"
            for m in modules
            if (m == "selfspec_core" or m.startswith("selfspec_core.")) and m != "selfspec_core.api"
        ]
    return found


def python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if ".egg-info" not in str(p) and "__pycache__" not in p.parts)


@pytest.mark.parametrize("plugin", ["biomed", "finance"])
def test_bundled_plugins_import_only_the_public_api(plugin):
    files = python_files(ROOT / "plugins" / plugin)
    assert len(files) >= 4
    assert [line for path in files for line in core_imports(path)] == []


def test_the_import_check_catches_private_imports(tmp_path):
    sample = tmp_path / "plugin.py"
    sample.write_text(
        "from selfspec_core.api import hookimpl\nfrom selfspec_core import config\n"
        "import selfspec_core.data.retrieval\nfrom selfspec_core.data.tasks import EvalTask\n"
    )
    assert [line.split(": ")[1] for line in core_imports(sample)] == [
        "selfspec_core.config",
        "selfspec_core.data.retrieval",
        "selfspec_core.data.tasks",
    ]


def test_scaffold_imports_only_the_public_api(tmp_path):
    from selfspec_core.authoring.scaffold import scaffold_domain

    folder = scaffold_domain("harbour-law", tmp_path)
    files = python_files(folder)
    assert {p.name for p in files} == {"__init__.py", "test_harbour_law.py"}
    assert [line for path in files for line in core_imports(path)] == []


def test_every_public_name_resolves():
    for name in api.__all__:
        assert getattr(api, name) is not None, name
    with pytest.raises(AttributeError, match="public names"):
        api.plugins  # noqa: B018 - the private modules are not reachable through the API


# ------------------------------------------------------------------------------- selfspec plugins


def selfspec(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "selfspec_core", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def test_plugins_lists_each_plugin_with_version_domains_and_hooks():
    listed = selfspec("plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    by_name = {p["name"]: p for p in json.loads(listed.stdout)}
    assert "core" not in by_name
    assert by_name["finance"]["package"] == "selfspec-finance" and by_name["finance"]["version"] == "0.1.0"
    assert by_name["finance"]["domains"] == ["finance"]
    assert by_name["biomed"]["hooks"] == [
        "blacklist_words",
        "corpus_sources",
        "evaluation_tasks",
        "filter_record",
        "prompt_template",
        "register_domains",
        "retrieval_corpus",
        "seed_provider",
        "task_miners",
    ]
    text = selfspec("plugins", "--all")
    assert text.returncode == 0
    assert "core  (selfspec 0.1.0)\n  domains: -\n  hooks: blacklist_words, prompt_template\n" in text.stdout
    assert "finance  (selfspec-finance 0.1.0)\n  domains: finance\n" in text.stdout


def test_a_plugin_registered_without_a_package_is_listed_with_its_hooks(plugin, tmp_path):
    from selfspec_core.plugins.manager import installed_plugins

    plugin(BrokenPlugin(tmp_path), "brokenplugin")
    listed = {p.name: p for p in installed_plugins()}["brokenplugin"]
    assert (listed.package, listed.version, listed.domains) == ("", "", ("broken",))
    assert listed.hooks == (
        "blacklist_words",
        "evaluation_tasks",
        "prompt_template",
        "register_domains",
        "retrieval_corpus",
        "seed_provider",
    )


# ------------------------------------------------------------------------------------ check-plugin


@pytest.mark.parametrize("plugin", ["biomed", "finance"])
def test_bundled_plugins_pass_the_check(plugin):
    result = check_plugin(plugin)
    assert result.problems == []
    assert any(note.startswith(f"seed_provider (domain {plugin}): ") for note in result.notes)


class BrokenPlugin:
    """A plugin whose every hook answers something the pipeline cannot use."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        (tmp_path / "seeds.jsonl").write_text(
            '{"id": "1", "task_type": "qa", "instruction": "Say hi.", "output": "hi"}\n'
            '{"id": "2", "task_type": "qa", "instruction": "", "output": "x"}\n'
        )

    @api.hookimpl
    def register_domains(self, register):
        register(Domain(name="broken", description="", task_families=("qa",), input_task_types=("sentiment",)))

    @api.hookimpl
    def seed_provider(self, domain):
        return self.tmp_path / "seeds.jsonl" if domain == "broken" else None

    @api.hookimpl
    def prompt_template(self, domain, stage):
        if domain == "broken" and stage == "response":
            return replace(api.default_template("response"), query="Instruction: {instruction}\n{answer}\nAnswer:")
        if domain == "broken" and stage == "train":
            return replace(api.default_template("train"), query="### {instruction\n")
        if domain == "broken" and stage == "judge":
            return replace(api.default_template("judge"), query="{instruction} {output:d}")
        return None

    @api.hookimpl
    def blacklist_words(self, domain):
        return "chart" if domain == "broken" else None

    @api.hookimpl
    def evaluation_tasks(self, domain):
        if domain != "broken":
            return None
        missing = api.EvalTask(
            name="shipped", domain="broken", data_file=str(self.tmp_path / "none.jsonl"), load=api.read_eval_file
        )
        other = api.EvalTask(name="elsewhere", domain="finance", data_file="x.jsonl", load=api.read_eval_file)
        return [missing, other]

    @api.hookimpl
    def retrieval_corpus(self, domain, data_dir):
        return [self.tmp_path / "corpus"] if domain == "broken" else None


def test_check_names_plugin_hook_and_problem_one_line_each(plugin, tmp_path):
    plugin(BrokenPlugin(tmp_path), "brokenplugin")
    result = check_plugin("broken")  # a domain name finds its plugin
    assert result.plugin == "brokenplugin"
    expected = [
        r"hook register_domains \(domain broken\): empty description",
        r"hook register_domains \(domain broken\): input_task_types \['sentiment'\] are not in task_families",
        r"hook seed_provider \(domain broken\): .*seeds.jsonl:2: field 'instruction' is empty",
        r"hook prompt_template stage 'response' \(domain broken\): query: unknown field \{answer\}",
        r"hook prompt_template stage 'response' \(domain broken\): query: does not use \{passages\}",
        r"hook prompt_template stage 'train' \(domain broken\): query: not a valid format string",
        r"hook prompt_template stage 'judge' \(domain broken\): does not render: ValueError: Unknown format code 'd'",
        r"hook blacklist_words \(domain broken\): returned str; return a list of words",
        r"hook evaluation_tasks task 'shipped' \(domain broken\): .*none.jsonl not found",
        r"hook evaluation_tasks task 'elsewhere' \(domain broken\): its domain is 'finance', asked for 'broken'",
        r"hook retrieval_corpus \(domain broken\): .*corpus does not exist",
    ]
    assert len(result.problems) == len(expected), "\n".join(result.problems)
    for pattern, problem in zip(expected, result.problems):
        assert problem.startswith("plugin 'brokenplugin': ") and "\n" not in problem
        assert re.search(pattern, problem), (pattern, problem)


def test_check_plugin_command_exits_2_with_the_problems(tmp_path):
    unknown = selfspec("check-plugin", "nope")
    assert unknown.returncode == 2 and "no plugin or domain named 'nope'" in unknown.stderr
    ok = selfspec("check-plugin", "finance", env={"SELFSPEC_DATA": ""})
    assert ok.returncode == 0, ok.stderr
    assert "seed_provider (domain finance): " in ok.stdout and ok.stdout.endswith("plugin 'finance': no problems\n")


# ------------------------------------------------------------------------------------------ guide


def test_guide_has_a_section_per_hook_and_its_examples_run(plugin, tmp_path, monkeypatch):
    """Every hook of hookspecs.py has a section in docs/plugins.md; every Python block in it runs."""
    from selfspec_core import hookspecs

    guide = GUIDE.read_text(encoding="utf-8")
    hooks = [name for name in vars(hookspecs) if hasattr(getattr(hookspecs, name), "selfspec_spec")]
    for hook in hooks:
        assert re.search(rf"^### `{hook}\(", guide, re.M), f"docs/plugins.md has no section for {hook}"
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", guide, re.S)
    assert len(blocks) >= len(hooks)
    for number, block in enumerate(blocks):
        namespace = {"__name__": f"guide_example_{number}"}
        exec(compile(block, f"docs/plugins.md block {number + 1}", "exec"), namespace)
