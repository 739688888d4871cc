"""One broken plugin installed beside biomed and finance breaks no one else's command.

The plugin is installed for real, as pip leaves it: a package and its ``.dist-info`` (entry point
``selfspec: law``) in a folder on PYTHONPATH, so entry-point discovery finds it in the subprocesses.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# How a plugin author breaks a plugin: each is a package body (and task files) for the "law" plugin.
LAW_DOMAIN = """
    from selfspec_core.api import Domain, hookimpl

    @hookimpl
    def register_domains(register):
        register(Domain(name="law", description="contract law", task_families=("qa",)))
"""
BROKEN = {
    "import": ("import not_a_module_anywhere\n", {}, "failed to load law_plugin (ModuleNotFoundError"),
    "wrong type": (
        LAW_DOMAIN
        + """
    from selfspec_core.api import EvalTask, read_eval_file

    @hookimpl
    def evaluation_tasks(domain):  # one task, not a list of them
        return EvalTask(name="clauses", domain="law", data_file="law/clauses.jsonl", load=read_eval_file)
""",
        {},
        "hook evaluation_tasks: returned EvalTask, expected list",
    ),
    "raising": (
        LAW_DOMAIN
        + """
    @hookimpl
    def evaluation_tasks(domain):
        raise RuntimeError("statute server offline")
""",
        {},
        "hook evaluation_tasks: raised RuntimeError: statute server offline",
    ),
    "task file": (
        LAW_DOMAIN,
        {"tasks/clauses.yaml": "name: clauses\ndata_file: clauses.jsonl\nmetric: acuracy\n"},
        "clauses.yaml:3: field 'metric': 'acuracy' is not one of",
    ),
}


def install_law(site: Path, body: str, files: dict[str, str]) -> dict:
    package = site / "law_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(body))
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    info = site / "selfspec_law-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: selfspec-law\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[selfspec]\nlaw = law_plugin\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), "SELFSPEC_DATA": ""}


def selfspec(*args, env, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "selfspec_core", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=cwd,
        timeout=900,
    )


def the_one_line(result, detail: str) -> str:
    """The command succeeded and said, in exactly one stderr line, which plugin broke, how, and what to run."""
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "law" in line]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("warning: plugin 'law' is broken: ") and detail in lines[0], lines[0]
    assert lines[0].endswith("; selfspec check-plugin law")
    return lines[0]


@pytest.mark.parametrize("kind", BROKEN)
def test_listing_commands_survive_a_broken_plugin_and_name_it(kind, tmp_path):
    body, files, detail = BROKEN[kind]
    env = install_law(tmp_path / "site", body, files)

    listed = selfspec("domains", env=env)
    the_one_line(listed, detail)
    assert "biomed  (plugin biomed): 92 seeds" in listed.stdout
    assert "finance  (plugin finance): 102 seeds" in listed.stdout

    plugins = selfspec("plugins", "--json", env=env)
    by_name = {p["name"]: p for p in json.loads(plugins.stdout)}
    assert by_name["finance"]["broken"] == by_name["biomed"]["broken"] == ""
    if kind == "import":  # a plugin that does not load is listed as broken
        the_one_line(plugins, detail)
        assert by_name["law"]["broken"].startswith("plugin 'law' is broken")
    else:  # listing calls no hook beyond register_domains: the hooks' answers are check-plugin's to see
        assert plugins.returncode == 0 and plugins.stderr == "" and by_name["law"]["domains"] == ["law"]

    data = selfspec("data", env=env)
    the_one_line(data, detail)
    assert data.stdout.startswith("biomed\n") and "\nfinance\n" in data.stdout

    only = selfspec("domains", "--plugins", "finance,biomed", env=env)  # never loaded: nothing to report
    assert only.returncode == 0 and only.stderr == "" and "finance  (plugin finance)" in only.stdout

    checked = selfspec("check-plugin", "law", env=env)
    assert checked.returncode == 2 and "plugin 'law'" in checked.stderr, checked.stderr


@pytest.mark.slow
def test_a_finance_run_is_not_stopped_by_a_broken_plugin(tmp_path):
    """The embedded model through every stage (a random tiny model writes nothing the filters keep)."""
    body, files, detail = BROKEN["wrong type"]
    env = install_law(tmp_path / "site", body, files)
    run = selfspec("--domain", "finance", "--profile", "tiny", "--out", "run", "run", env=env, cwd=tmp_path)
    line = the_one_line(run, detail)
    results = json.loads((tmp_path / "run" / "evaluate" / "eval.json").read_text())
    assert results["cross_domain"]["plugin law"]["skipped"] == line.removeprefix("warning: ")
    assert results["tatqa"]["n"] > 0  # the domain's own task was scored
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "plugin 'law' is broken: hook evaluation_tasks" in report
