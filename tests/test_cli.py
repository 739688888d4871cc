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

from selfspec_core.testing import install_into

README = Path(__file__).resolve().parents[1] / "README.md"


def selfspec(*args, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "selfspec_core", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=600,
    )


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
    commands = [
        part.split("#")[0].strip()
        for block in blocks
        for line in block.splitlines()
        for part in line.split("&&")
        if part.strip().startswith("selfspec ")
    ]
    assert commands and "selfspec --domain biomed --profile quick run" in commands  # the first command's job
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
    folder, target = root / "selfspec-oceanography", root / "site"
    env = {**install_into(folder, target), "SELFSPEC_DATA": ""}
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
    assert "evaluation tasks: oceanography_example, oceanography_topic_yaml" in listed.stdout
    plugins = {p["name"]: p for p in json.loads(selfspec("plugins", "--json", env=env).stdout)}
    assert plugins["oceanography"]["package"] == "selfspec-oceanography"
    assert plugins["oceanography"]["domains"] == ["oceanography"] and len(plugins["oceanography"]["hooks"]) == 9
    checked = selfspec("check-plugin", "oceanography", env=env)
    assert checked.returncode == 0, checked.stderr
    assert "evaluation_tasks task 'oceanography_example' (domain oceanography): 10 items" in checked.stdout
    assert "retrieval_corpus (domain oceanography): 4 passages" in checked.stdout
    assert "task file example.yaml task 'oceanography_topic_yaml' (domain oceanography): 10 items" in checked.stdout
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder / "tests")],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=tmp_path,
        timeout=600,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "9 passed" in tests.stdout


@pytest.mark.slow
def test_scaffolded_domain_completes_a_tiny_run_with_results(installed_scaffold, tmp_path):
    """The embedded model through every stage of the fresh plugin: its seeds, corpus and evaluation
    files, the YAML task (no Python) scored in the report like the Python one."""
    _, env = installed_scaffold
    run = selfspec("--domain", "oceanography", "--profile", "tiny", "--out", "run", "run", env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "BM25 over 4 passages" in run.stdout
    results = json.loads((tmp_path / "run" / "evaluate" / "eval.json").read_text())
    row = results["oceanography_example"]
    assert row["n"] == 8 and 0 <= row["base"] <= 1 and 0 <= row["specialized"] <= 1
    assert results["oceanography_topic_yaml"]["n"] == 8
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "| oceanography_example | oceanography | accuracy | loglikelihood | 8 |" in report
    assert "| oceanography_topic_yaml | oceanography | accuracy | loglikelihood | 8 |" in report


def test_new_domain_help_shows_its_own_options_and_what_it_creates():
    shown = selfspec("new-domain", "--help")
    assert shown.returncode == 0, shown.stderr
    assert re.findall(r"^\s+(?:-\w, )?(--[\w-]+)", shown.stdout.split("Options:")[1], re.M) == ["--dest", "--help"]
    for created in (
        "pyproject.toml",
        "__init__.py",
        "seeds.yaml",
        "tasks/example.yaml",
        "corpus/",
        "tests/test_NAME.py",
    ):
        assert created in shown.stdout, created
    assert "8 items scored per task" in " ".join(selfspec("--help").stdout.split())  # what tiny runs


def test_domains_counts_only_corpus_parts_that_exist(plugin, tmp_path):
    from click.testing import CliRunner

    from selfspec_core.api import Domain, hookimpl
    from selfspec_core.cli.main import cli

    (tmp_path / "here.jsonl").write_text('{"id": "1", "text": "A passage."}\n')

    class Corpus:
        @hookimpl
        def register_domains(self, register):
            register(Domain(name="corpusdomain", description="a domain with half a corpus"))

        @hookimpl
        def retrieval_corpus(self, domain):
            return [tmp_path / "here.jsonl", tmp_path / "gone"] if domain == "corpusdomain" else None

    plugin(Corpus(), "corpus-plugin")
    listed = CliRunner().invoke(cli, ["domains"])
    assert listed.exit_code == 0, listed.output
    assert f"  retrieval corpus: 1 sources; 1 not found: {tmp_path / 'gone'}\n" in listed.output


def test_new_domain_refuses_unsafe_name(tmp_path):
    result = selfspec("new-domain", "../evil", "--dest", str(tmp_path))
    assert result.returncode == 2 and "invalid domain name" in result.stderr


# --------------------------------------------------------------------------------------------------
# Options before or after the subcommand; every hint an error gives is a command that parses


def parse_command_line(line: str):
    """The session and subcommand options ``line`` resolves to, by click's own parsing (types and choices
    checked), without running the command; a line click refuses raises ``click.UsageError``."""

    from selfspec_core.cli.main import Session, cli

    args = shlex.split(line)
    assert args[0] == "selfspec", line
    with cli.make_context("selfspec", args[1:], resilient_parsing=False) as root:
        name, command, rest = cli.resolve_command(root, [*root._protected_args, *root.args])
        with command.make_context(name, rest, parent=root) as sub:
            session = Session(**{k: v for k, v in root.params.items()})
            session.update({k: sub.params[k] for k in sub.params if k in {o.name for o in _session_option_objects()}})
            return name, session.options, {k: v for k, v in sub.params.items() if v not in (None, False)}


def _session_option_objects():
    from selfspec_core.cli.session import session_options

    return session_options()


def option_values():
    """A valid value for every session option (flags: None), from its own declaration."""
    import click

    values = {}
    for option in _session_option_objects():
        if option.is_flag:
            values[option] = None
        elif isinstance(option.type, click.Choice):
            values[option] = option.type.choices[-1]
        elif option.type is click.INT or getattr(option.type, "name", "") == "integer":
            values[option] = "7"
        else:
            values[option] = "some/value"
    return values


def test_every_session_option_works_before_and_after_the_subcommand():
    for subcommand in (
        "run",
        "generate",
        "train",
        "evaluate",
        "report",
        "export --merge --output m",
        "serve",
        "domains",
    ):
        for option, value in option_values().items():
            given = [option.opts[0]] + ([value] if value is not None else [])
            before = parse_command_line(shlex.join(["selfspec", *given]) + f" {subcommand}")
            after = parse_command_line(f"selfspec {subcommand} " + shlex.join(given))
            assert before[1] == after[1] and option.name in after[1], (subcommand, option.name, before, after)


def test_the_option_after_the_subcommand_wins():
    name, options, _ = parse_command_line(
        "selfspec --domain biomed --profile paper run --domain finance --retrieval off"
    )
    assert name == "run" and options["domain"] == "finance" and options["profile"] == "paper"


def test_seed_0_is_a_seed_like_any_other(tmp_path):
    """``--seed 0`` was once taken for "not given" (``0 in (None, False)``) and the run used 42."""
    for where, args in (("before", ["--seed", "0", "report"]), ("after", ["report", "--seed", "0"])):
        out = tmp_path / where
        result = selfspec("--domain", "finance", "--profile", "tiny", "--out", str(out), *args)
        assert result.returncode == 2 and "generate/manifest.json is missing" in result.stderr  # nothing to report
        assert json.loads((out / "config.json").read_text())["seed"] == 0, where

    from selfspec_core.cli.main import cli
    from selfspec_core.cli.stages import _command_line

    with cli.make_context("selfspec", ["--seed", "0", "train", "--num-processes", "2"]) as root:
        name, command, rest = cli.resolve_command(root, [*root._protected_args, *root.args])
        with command.make_context(name, rest, parent=root) as train:
            assert _command_line(train) == ["--seed", "0", "train", "--num-processes", "2"]  # what each process runs


def test_a_commands_settings_take_its_domains_choices_for_the_profile(tmp_path, monkeypatch):
    """A domain's ``profile_settings`` apply to its commands in that profile; a config file of the
    user's still wins, and a domain without them gets the profile's own."""
    from selfspec_core.cli.session import Session
    from selfspec_core.records import Domain

    chooser = Domain("law", "law", profile_settings={"quick": {"train": {"epochs": 2.0}}})
    monkeypatch.setattr(Session, "domain", lambda self: chooser if self.domain_name == "law" else Domain("x", "x"))
    (tmp_path / "mine.toml").write_text("[train]\nepochs = 1.5\n")
    assert Session(domain="law").settings().train.epochs == 2.0
    assert Session(domain="law", profile="paper").settings().train.epochs == 3.0
    assert Session(domain="law", config_file=str(tmp_path / "mine.toml")).settings().train.epochs == 1.5
    assert Session(domain="other").settings().train.epochs == 1.0


def test_a_command_added_later_gets_the_session_options_too():
    """The mechanism is one definition: any command added to the group (another branch's) takes them."""
    import click

    from selfspec_core.cli.main import Session, cli

    seen = {}

    @click.command(name="probe-options")
    @click.option("--level", type=int)
    @click.pass_obj
    def probe(session: Session, level):
        seen.update(session.options, level=level, settings_seed=session.settings().seed)

    cli.add_command(probe)
    try:
        from selfspec_core.cli.main import main

        main(["--domain", "biomed", "probe-options", "--level", "3", "--seed", "11", "--domain", "finance"])
    finally:
        cli.commands.pop("probe-options")
    assert seen["domain"] == "finance" and seen["level"] == 3 and seen["settings_seed"] == 11


def test_options_after_the_subcommand_reach_a_real_command():
    result = selfspec("run", "--domain", "nope", "--profile", "tiny")
    assert result.returncode == 2 and "unknown domain 'nope'" in result.stderr


def hints_in(text: str) -> list[str]:
    return re.findall(r"`(selfspec [^`]+)`", text)


def assert_hints_run_as_printed(stderr: str, domain: str | None = None, out: str | None = None) -> list[str]:
    hints = hints_in(stderr)
    assert hints, stderr
    for hint in hints:
        _, options, _ = parse_command_line(hint)  # raises when click would refuse it
        if domain is not None and "domain" in options:
            assert options["domain"] == domain, hint
        if out is not None and "out" in options:
            assert options["out"] == out, hint
    return hints


def write_run(folder: Path, stage: str, files: dict[str, bytes]) -> None:
    """A sealed stage of a finance run in ``folder`` holding ``files``."""
    import json

    folder.mkdir(exist_ok=True)
    (folder / "run.json").write_text(json.dumps({"domain": "finance", "version": "0.1.0"}))
    (folder / stage).mkdir()
    (folder / stage / "manifest.json").write_text("{}")
    for name, content in files.items():
        (folder / stage / name).write_bytes(content)


def test_every_error_hint_is_a_command_that_parses(tmp_path, tiny_model_dir):
    seeds = tmp_path / "s.jsonl"
    seeds.write_text(
        '{"id": "s1", "task_type": "qa", "instruction": "What is EBITDA?", "input": "", "output": "Earnings."}\n'
    )
    common = ["--seeds", str(seeds), "--model", str(tiny_model_dir)]
    out = str(tmp_path / "my run")  # a space: the hint must quote it
    cases = [  # (arguments, what the hint runs)
        (["train", "--domain", "finance", "--out", out, *common], "selfspec respond"),
        (["evaluate", "--domain", "finance", "--out", out, *common], "selfspec train"),
        (["generate", *common], "selfspec domains"),
        (["--domain", "astrology", "generate"], "selfspec new-domain astrology"),
    ]
    for args, expected in cases:
        result = selfspec(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        hints = assert_hints_run_as_printed(result.stderr, "finance", out)
        assert any(h.startswith(expected) for h in hints), (expected, result.stderr)

    corrupt = tmp_path / "corrupt"
    write_run(corrupt, "generate", {"instructions.jsonl": b'{"instruction": 3}\n'})
    result = selfspec("respond", "--domain", "finance", "--out", str(corrupt), *common)
    assert result.returncode == 2 and "selfspec generate" in result.stderr, result.stderr
    assert_hints_run_as_printed(result.stderr, "finance", str(corrupt))

    untrainable = tmp_path / "untrainable"
    write_run(untrainable, "respond", {"data.jsonl": b'{"instruction": "a", "output": ""}\n'})
    result = selfspec("train", "--domain", "finance", "--out", str(untrainable), *common)
    assert result.returncode == 2 and "selfspec respond" in result.stderr, result.stderr
    assert_hints_run_as_printed(result.stderr, "finance", str(untrainable))

    eval_file = tmp_path / "tasks.jsonl"
    eval_file.write_text('{"instruction": "Sentiment?", "input": "Profit rose.", "output": "positive"}\n')
    adapter = tmp_path / "my adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    result = selfspec(
        "evaluate", "--backend", "openai", "--eval-file", str(eval_file), "--adapter", str(adapter), *common
    )
    assert result.returncode == 2, result.stderr
    hints = assert_hints_run_as_printed(result.stderr)
    assert parse_command_line(hints[0])[2]["adapter"] == str(adapter)


def test_stage_command_hints_parse_for_every_stage(tmp_path):
    from selfspec_core.run.rundir import STAGES, stage_command

    for stage in STAGES:
        for path in (tmp_path / "runs" / "a b", Path("relative/run"), Path("it's")):
            name, options, _ = parse_command_line(stage_command("finance", stage, path))
            assert name == stage and options["out"] == str(path) and options["domain"] == "finance"


def test_third_party_warnings_go_to_the_log_file_not_the_console(tmp_path):
    """Library warnings (bitsandbytes' missing CPU kernel, transformers' FutureWarnings) are the run's log's,
    not the user's."""
    script = (
        "import logging, sys, warnings\n"
        "from selfspec_core.runtime import logs\n"
        "logs.capture()\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning("
        "'Failed to load CPU gemm_4bit_forward from kernels-community: no kernels')\n"
        "warnings.warn('`evaluation_strategy` is deprecated', FutureWarning)\n"
        "logs.adopt_library_loggers()\n"
        "from transformers.utils import logging as hf\n"
        "hf.get_logger('transformers.modeling_utils').warning('Some weights were not initialized')\n"
        "logs.write_to(sys.argv[1])\n"
        "print('selfspec says this')\n"
    )
    log = tmp_path / "run" / "selfspec.log"
    result = subprocess.run([sys.executable, "-c", script, str(log)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "selfspec says this\n" and result.stderr == ""
    text = log.read_text()
    assert "kernels-community" in text and "FutureWarning" in text and "Some weights were not initialized" in text


def test_a_command_writes_library_output_to_the_runs_log(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    seeds = tmp_path / "s.jsonl"
    seeds.write_text(
        '{"id": "s1", "task_type": "qa", "instruction": "What is EBITDA?", "input": "", "output": "Earnings."}\n'
    )
    (run / "respond").mkdir(parents=True)
    (run / "run.json").write_text('{"domain": "finance", "version": "0.1.0"}')
    (run / "respond" / "manifest.json").write_text("{}")
    (run / "respond" / "data.jsonl").write_text(
        '{"instruction": "Define EBITDA.", "input": "", "output": "Earnings."}\n'
    )
    result = selfspec(
        "train",
        "--domain",
        "finance",
        "--profile",
        "tiny",
        "--out",
        str(run),
        "--seeds",
        str(seeds),
        "--model",
        str(tiny_model_dir),
    )
    assert result.returncode == 0, result.stderr
    for noise in ("Warning", "Loading weights", "Traceback"):
        assert noise not in result.stderr + result.stdout, noise
    assert (run / "selfspec.log").exists() and (run / "train" / "adapter" / "adapter_model.safetensors").exists()
