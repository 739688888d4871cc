"""The command line: errors, the domain scaffold and its installation."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

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


def test_new_domain_scaffold_installs_and_shows_up(tmp_path):
    created = selfspec("new-domain", "oceanography", "--dest", str(tmp_path))
    assert created.returncode == 0, created.stderr
    folder = tmp_path / "selfspec-oceanography"
    assert (folder / "pyproject.toml").exists() and (folder / "selfspec_oceanography" / "seeds.jsonl").exists()
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--target", str(target), str(folder)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    env = {"PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    listed = selfspec("domains", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "oceanography  (plugin oceanography): 2 seeds" in listed.stdout
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder / "tests")],
                           capture_output=True, text=True, env={**os.environ, **env}, cwd=tmp_path, timeout=600)
    assert tests.returncode == 0, tests.stdout + tests.stderr


def test_new_domain_refuses_unsafe_name(tmp_path):
    result = selfspec("new-domain", "../evil", "--dest", str(tmp_path))
    assert result.returncode == 2 and "invalid domain name" in result.stderr
