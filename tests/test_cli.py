"""The command line: errors, the domain scaffold and its installation."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def selfspec(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "selfspec_core", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=600)


def test_unknown_domain_is_one_line_exit_2():
    result = selfspec("--domain", "nope", "run")
    assert result.returncode == 2
    assert "unknown domain 'nope'" in result.stderr and "installed domains" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_under_a_launcher_only_the_first_process_prints_the_error():
    quiet = selfspec("--domain", "nope", "run", env={"RANK": "1"})
    assert quiet.returncode == 2 and quiet.stderr.strip() == ""
    first = selfspec("--domain", "nope", "run", env={"RANK": "0"})
    assert first.returncode == 2 and "unknown domain 'nope'" in first.stderr


def test_the_readme_commands_parse():
    """Every ``selfspec ...`` line of the README's shell blocks is a command line the CLI accepts."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    commands = [part.split("#")[0].strip() for block in blocks for line in block.splitlines()
                for part in line.split("&&") if part.strip().startswith("selfspec ")]
    assert commands and "selfspec --domain finance --profile quick run" in commands  # the first command's job
    for command in commands:
        result = selfspec(*shlex.split(command)[1:], "--help")
        assert result.returncode == 0, f"README: {command}\n{result.stderr}"


def test_debug_shows_traceback():
    result = selfspec("--debug", "--domain", "nope", "run")
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_bad_config_key_suggests_closest(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[generate]\nnum_instruction = 3\n")
    result = selfspec("--config", str(config), "--domain", "finance", "generate", "--help")
    assert result.returncode == 0  # --help never reads the config
    result = selfspec("--config", str(config), "--domain", "nope", "generate")
    assert result.returncode == 2 and "did you mean generate.num_instructions" in result.stderr


@pytest.fixture(scope="module")
def installed_scaffold(tmp_path_factory):
    """``selfspec new-domain oceanography``, installed where entry-point discovery finds it (a --target
    folder on PYTHONPATH, so the test environment itself is not changed), and uninstalled after."""
    root = tmp_path_factory.mktemp("scaffold")
    created = selfspec("new-domain", "oceanography", "--dest", str(root))
    assert created.returncode == 0, created.stderr
    folder = root / "selfspec-oceanography"
    target = root / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--target", str(target), str(folder)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    env = {"PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]), "SELFSPEC_DATA": ""}
    yield folder, env
    shutil.rmtree(target)
    assert "oceanography" not in selfspec("domains", env=env).stdout


def test_new_domain_scaffold_installs_passes_its_check_and_its_tests(installed_scaffold, tmp_path):
    folder, env = installed_scaffold
    package = folder / "selfspec_oceanography"
    assert {"pyproject.toml", "README.md", "selfspec_oceanography", "tests"} <= {p.name for p in folder.iterdir()}
    assert (package / "eval" / "example.jsonl").is_file() and (package / "corpus" / "example.jsonl").is_file()
    listed = selfspec("domains", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "oceanography  (plugin oceanography): 8 seeds" in listed.stdout
    assert "evaluation tasks: oceanography_example" in listed.stdout
    plugins = {p["name"]: p for p in json.loads(selfspec("plugins", "--json", env=env).stdout)}
    assert plugins["oceanography"]["package"] == "selfspec-oceanography"
    assert plugins["oceanography"]["domains"] == ["oceanography"] and len(plugins["oceanography"]["hooks"]) == 7
    checked = selfspec("check-plugin", "oceanography", env=env)
    assert checked.returncode == 0, checked.stderr
    assert "evaluation_tasks task 'oceanography_example' (domain oceanography): 10 items" in checked.stdout
    assert "retrieval_corpus (domain oceanography): 4 passages" in checked.stdout
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder / "tests")],
                           capture_output=True, text=True, env={**os.environ, **env}, cwd=tmp_path, timeout=600)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "7 passed" in tests.stdout


@pytest.mark.slow
def test_scaffolded_domain_completes_a_tiny_run_with_results(installed_scaffold, tmp_path):
    """The embedded model through every stage of the fresh plugin: its seeds, corpus and evaluation file."""
    _, env = installed_scaffold
    run = selfspec("--domain", "oceanography", "--profile", "tiny", "--out", "run", "run", env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "BM25 over 4 passages" in run.stdout
    results = json.loads((tmp_path / "run" / "evaluate" / "eval.json").read_text())
    row = results["oceanography_example"]
    assert row["n"] == 8 and 0 <= row["base"] <= 1 and 0 <= row["specialized"] <= 1
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "| oceanography_example | oceanography | accuracy | loglikelihood | 8 |" in report


def test_new_domain_refuses_unsafe_name(tmp_path):
    result = selfspec("new-domain", "../evil", "--dest", str(tmp_path))
    assert result.returncode == 2 and "invalid domain name" in result.stderr
