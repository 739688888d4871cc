"""Every malformed input costs the user one line naming what is wrong and where: exit 2, no traceback."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from selfspec_core.testing import install_into

SEED = {
    "id": "s1",
    "task_type": "qa",
    "instruction": "What is EBITDA?",
    "input": "",
    "output": "Earnings before interest.",
}


def seed_line(**changes):
    return (json.dumps({**SEED, **changes}) + "\n").encode()


def run_cli(args, cwd, env=None):
    result = subprocess.run(
        [sys.executable, "-m", "selfspec_core", *args],
        capture_output=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=300,
    )
    return result.returncode, result.stderr.decode("utf-8", "replace")


# (case id, files to write {name: bytes}, CLI args, substrings the one-line message must contain)
SEED_CASES = [
    ("seed-not-json", {"s.jsonl": b"{nope\n"}, ["s.jsonl:1", "not valid JSON"]),
    ("seed-yaml-broken", {"s.yaml": b"- id: [a\n"}, ["s.yaml", "not valid YAML"]),
    ("seed-yaml-not-list", {"s.yaml": b"id: a\n"}, ["s.yaml:1", "expected a YAML list"]),
    (
        "seed-missing-field",
        {"s.jsonl": (json.dumps({k: v for k, v in SEED.items() if k != "output"}) + "\n").encode()},
        ["s.jsonl:1", "'output' is missing"],
    ),
    ("seed-empty-field", {"s.jsonl": seed_line(instruction="  ")}, ["s.jsonl:1", "'instruction' is empty"]),
    ("seed-wrong-type", {"s.jsonl": seed_line(output=["a"])}, ["s.jsonl:1", "'output'", "expected a string"]),
    ("seed-duplicate-id", {"s.jsonl": seed_line() + seed_line()}, ["s.jsonl:2", "duplicate id"]),
    ("seed-not-utf8", {"s.jsonl": seed_line() + b'{"id": "\xe9"}\n'}, ["s.jsonl:2", "not UTF-8"]),
    ("seed-empty-file", {"s.jsonl": b"\n"}, ["s.jsonl", "empty"]),
    ("seed-10mb-line", {"s.jsonl": seed_line(input="x" * 10_000_000)}, ["s.jsonl:1", "MB", "limit"]),
    ("seed-unknown-field", {"s.jsonl": seed_line(answer="x")}, ["s.jsonl:1", "'answer'", "unknown field"]),
    ("seed-not-object", {"s.jsonl": b"[1, 2]\n"}, ["s.jsonl:1", "expected an object"]),
    ("seed-file-missing", {}, ["s.jsonl", "not found"]),
]

CONFIG_CASES = [
    (
        "config-unknown-key",
        {"c.toml": b"[generate]\nnum_instruction = 3\n"},
        ["c.toml", "generate.num_instruction", "did you mean generate.num_instructions"],
    ),
    ("config-unknown-top", {"c.toml": b"sed = 3\n"}, ["c.toml", "did you mean seed"]),
    ("config-wrong-type", {"c.toml": b'[train]\nlora_r = "eight"\n'}, ["c.toml", "train.lora_r", "integer"]),
    ("config-out-of-range", {"c.toml": b"[generate]\ntop_p = 3.0\n"}, ["c.toml", "generate.top_p", "between"]),
    ("config-negative", {"c.toml": b"[train]\nepochs = -1\n"}, ["c.toml", "train.epochs", "negative"]),
    ("config-bad-choice", {"c.toml": b'[train]\nquant = "int3"\n'}, ["c.toml", "train.quant", "one of"]),
    ("config-toml-syntax", {"c.toml": b"[train\n"}, ["c.toml", "not valid TOML"]),
    ("config-yaml-syntax", {"c.yaml": b"train: [\n"}, ["c.yaml", "not valid YAML"]),
    ("config-not-mapping", {"c.yaml": b"- 1\n- 2\n"}, ["c.yaml", "mapping"]),
    ("config-missing", {}, ["c.toml", "not found"]),
    ("config-extension", {"c.ini": b"[x]\n"}, ["c.ini", ".toml, .yaml"]),
    ("config-section-scalar", {"c.toml": b"train = 3\n"}, ["c.toml", "train", "section"]),
]


@pytest.mark.parametrize("case,files,expected", SEED_CASES, ids=[c[0] for c in SEED_CASES])
def test_bad_seed_file(tmp_path, case, files, expected):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    name = next(iter(files), "s.jsonl")
    code, err = run_cli(["--domain", "finance", "--seeds", name, "--out", "run", "generate"], tmp_path)
    assert_one_clear_line(code, err, expected)


@pytest.mark.parametrize("case,files,expected", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_file(tmp_path, case, files, expected):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    name = next(iter(files), "c.toml")
    code, err = run_cli(["--config", name, "--domain", "finance", "--out", "run", "generate"], tmp_path)
    assert_one_clear_line(code, err, expected)


def write_seeds(folder: Path) -> str:
    (folder / "s.jsonl").write_bytes(seed_line())
    return "s.jsonl"


OTHER_CASES = [
    ("unknown-domain", ["--domain", "astrology", "generate"], ["unknown domain 'astrology'", "installed domains"]),
    ("no-domain", ["generate"], ["no domain given"]),
    ("domain-escapes", ["--domain", "../etc", "generate"], ["invalid domain name"]),
    (
        "model-missing",
        ["--domain", "finance", "--seeds", "{seeds}", "--out", "run", "--model", "./nope", "generate"],
        ["model './nope' not found"],
    ),
    (
        "model-no-config",
        ["--domain", "finance", "--seeds", "{seeds}", "--out", "run", "--model", "{empty_dir}", "generate"],
        ["no config.json"],
    ),
    (
        "model-pickle-only",
        ["--domain", "finance", "--seeds", "{seeds}", "--out", "run", "--model", "{pickle_dir}", "generate"],
        ["no .safetensors", "only safetensors"],
    ),
    (
        "model-gguf-missing",
        ["--domain", "finance", "--seeds", "{seeds}", "--out", "run", "--model", "x.gguf", "generate"],
        ["x.gguf", "not found"],
    ),
    (
        "run-dir-other-domain",
        ["--domain", "biomed", "--seeds", "{seeds}", "--out", "{finance_run}", "generate"],
        ["belongs to domain 'finance'"],
    ),
    (
        "run-dir-other-version",
        ["--domain", "finance", "--seeds", "{seeds}", "--out", "{old_run}", "generate"],
        ["made by selfspec 0.0.1"],
    ),
    (
        "run-dir-not-a-run",
        ["--domain", "finance", "--seeds", "{seeds}", "--out", "{busy_dir}", "generate"],
        ["not a selfspec run directory"],
    ),
    (
        "stage-out-of-order",
        ["--domain", "finance", "--seeds", "{seeds}", "--out", "run", "train"],
        ["is missing", "`selfspec respond --domain finance --out run`"],
    ),
]


@pytest.mark.parametrize("case,args,expected", OTHER_CASES, ids=[c[0] for c in OTHER_CASES])
def test_other_bad_input(tmp_path, case, args, expected):
    places = {"seeds": write_seeds(tmp_path)}
    for name in ("empty_dir", "pickle_dir", "busy_dir"):
        (tmp_path / name).mkdir()
        places[name] = name
    (tmp_path / "pickle_dir" / "config.json").write_text("{}")
    (tmp_path / "pickle_dir" / "pytorch_model.bin").write_bytes(b"\x80\x02")
    (tmp_path / "busy_dir" / "thesis.tex").write_text("x")
    for name, info in (
        ("finance_run", {"domain": "finance", "version": "0.1.0"}),
        ("old_run", {"domain": "finance", "version": "0.0.1"}),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps(info))
        places[name] = name
    code, err = run_cli([a.format(**places) for a in args], tmp_path)
    assert_one_clear_line(code, err, expected)


def test_corrupt_adapter_is_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"domain": "finance", "version": "0.1.0"}))
    (run / "respond").mkdir()
    (run / "respond" / "data.jsonl").write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")
    (run / "respond" / "manifest.json").write_text("{}")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"not safetensors")
    code, err = run_cli(
        ["--domain", "finance", "--seeds", write_seeds(tmp_path), "--out", "run", "evaluate", "--adapter", "adapter"],
        tmp_path,
        {"SELFSPEC_DATA": ""},
    )
    assert_one_clear_line(code, err, ["adapter_model.safetensors", "corrupt adapter", "retrain the adapter"])


def install_plugin(tmp_path: Path, body: str) -> dict:
    """Install a throwaway plugin distribution for real (entry point and all) into a target folder."""
    source = tmp_path / "src"
    (source / "brokenplugin").mkdir(parents=True)
    (source / "brokenplugin" / "__init__.py").write_text(textwrap.dedent(body))
    (source / "pyproject.toml").write_text(
        textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "brokenplugin"
        version = "0.1"
        [project.entry-points.selfspec]
        broken = "brokenplugin"
    """)
    )
    return install_into(source, tmp_path / "site")


def test_plugin_import_error_names_the_plugin_and_the_others_still_work(tmp_path):
    env = install_plugin(tmp_path, "import not_a_module_anywhere\n")
    code, err = run_cli(["domains"], tmp_path, env)
    assert_one_clear_line(
        code,
        err,
        ["plugin 'broken' is broken", "failed to load", "not_a_module_anywhere", "pip uninstall brokenplugin"],
        exit_code=0,
    )


def test_plugin_wrong_type_names_the_plugin_and_hook(tmp_path):
    env = install_plugin(
        tmp_path,
        """
        from selfspec_core.hookspecs import hookimpl
        from selfspec_core.records import Domain

        @hookimpl
        def register_domains(register):
            register(Domain("brokendomain", "broken"))

        @hookimpl
        def seed_provider(domain):
            return 42 if domain == "brokendomain" else None
    """,
    )
    code, err = run_cli(["--domain", "brokendomain", "generate"], tmp_path, env)
    assert_one_clear_line(code, err, ["plugin 'broken'", "seed_provider", "returned int"])


def test_plugin_raising_names_the_plugin_and_hook(tmp_path):
    env = install_plugin(
        tmp_path,
        """
        from selfspec_core.hookspecs import hookimpl

        @hookimpl
        def register_domains(register):
            raise RuntimeError("database offline")
    """,
    )
    code, err = run_cli(["domains"], tmp_path, env)
    assert_one_clear_line(code, err, ["plugin 'broken' is broken", "register_domains", "database offline"], exit_code=0)


def assert_one_clear_line(code, err, expected, exit_code=2):
    """One line on stderr naming every part of ``expected``: an error (exit 2) or a warning a command
    works around (exit 0)."""
    assert code == exit_code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    for part in expected:
        assert part in lines[0], (part, lines[0])
