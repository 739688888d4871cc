"""Config, seeds, templates, run directory and plugin manager."""

import json

import pytest

from selfspec_core.config import Settings, apply, load_settings
from selfspec_core.data.seeds import load_seeds
from selfspec_core.errors import SelfspecError
from selfspec_core.hookspecs import hookimpl
from selfspec_core.plugins import manager as plugins
from selfspec_core.records import Domain
from selfspec_core.run.rundir import RecordLog, RunDir, read_jsonl, safe_name
from selfspec_core.templates import PromptTemplate, fill

SEED = {"id": "a", "task_type": "qa", "instruction": "Q?", "input": "", "output": "A."}


def test_profiles_and_overrides(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("seed = 7\n[train]\nepochs = 5\n")
    settings = load_settings("paper", config, {"train": {"lora_r": 4}})
    assert settings.seed == 7 and settings.train.epochs == 5 and settings.train.lora_r == 4
    assert settings.generate.num_instructions == 5000
    yaml_config = tmp_path / "c.yaml"
    yaml_config.write_text("generate:\n  num_examples: 2\n")
    assert load_settings("quick", yaml_config).generate.num_examples == 2


def test_a_domain_chooses_settings_for_a_profile_under_the_users_file_and_flags(tmp_path):
    domain = Domain("law", "law", profile_settings={"quick": {"train": {"epochs": 2.0, "lora_r": 4}}})
    assert load_settings("quick", domain=domain).train.epochs == 2.0
    assert load_settings("paper", domain=domain).train.epochs == 3.0  # another profile: untouched
    config = tmp_path / "c.toml"
    config.write_text("[train]\nepochs = 1.5\n")
    mine = load_settings("quick", config, {"train": {"lora_r": 8}}, domain=domain)
    assert (mine.train.epochs, mine.train.lora_r) == (1.5, 8)
    typo = Domain("law", "law", profile_settings={"quick": {"train": {"epoch": 2}}})
    with pytest.raises(SelfspecError, match="domain law's quick profile: unknown setting train.epoch"):
        load_settings("quick", domain=typo)


def test_config_hash_tracks_only_relevant_sections():
    a, b = Settings(), Settings()
    b.train.epochs = 9
    assert a.section_hash("generate") == b.section_hash("generate")
    assert a.section_hash("train") != b.section_hash("train")


@pytest.mark.parametrize(
    "values,message",
    [
        ({"genrate": {}}, "did you mean generate"),
        ({"train": {"lora_rr": 4}}, "did you mean train.lora_r"),
        ({"train": {"lora_r": "x"}}, "expected an integer"),
        ({"generate": {"top_p": 1.5}}, "between"),
        ({"train": {"quant": "int8"}}, "expected one of"),
        ({"respond": {"retrieval": "maybe"}}, "true or false"),
        ({"train": 3}, "expected a section"),
    ],
)
def test_bad_settings_name_key(values, message):
    with pytest.raises(SelfspecError, match=message):
        apply(Settings(), values, source="my.toml")


def test_fill_drops_empty_optional_parts():
    assert fill("Q: {instruction}[[\nInput: {input}]]\nA:", {"instruction": "x", "input": ""}) == "Q: x\nA:"
    assert fill("Q: {instruction}[[\nInput: {input}]]", {"instruction": "x", "input": "y"}) == "Q: x\nInput: y"


def test_template_render_and_stop():
    template = PromptTemplate(header="H {domain}", example="I: {instruction} O: {output}", query="I: {instruction} O:")
    text = template.render([{"instruction": "a", "output": "b"}], {"instruction": "c"}, domain="fin")
    assert text == "H fin\n\n###\n\nI: a O: b\n\n###\n\nI: c O:"
    assert template.stop == ["\n###"]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_seeds_jsonl_and_yaml(tmp_path):
    assert load_seeds(write(tmp_path / "s.jsonl", [SEED]))[0].output == "A."
    yaml_file = tmp_path / "s.yaml"
    yaml_file.write_text("- id: a\n  task_type: qa\n  instruction: Q?\n  output: A.\n")
    assert load_seeds(yaml_file)[0].input == ""


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "empty"),
        (b'{"id": "a"\n', ":1: not valid JSON"),
        (json.dumps({**SEED, "output": ""}).encode() + b"\n", ":1: field 'output' is empty"),
        (
            json.dumps({k: v for k, v in SEED.items() if k != "instruction"}).encode() + b"\n",
            "field 'instruction' is missing",
        ),
        (json.dumps({**SEED, "output": 3}).encode() + b"\n", "field 'output': expected a string"),
        ((json.dumps(SEED) + "\n" + json.dumps(SEED) + "\n").encode(), ":2: field 'id': duplicate id"),
        (b'{"id": "\xff"}\n', ":1: not UTF-8"),
        (json.dumps({**SEED, "input": "x" * 300_000}).encode() + b"\n", "over the 200 kB limit"),
    ],
)
def test_bad_seed_files_name_line_and_field(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(SelfspecError, match=message) as info:
        load_seeds(path)
    assert str(path) in str(info.value)


def test_record_log_drops_torn_tail(tmp_path):
    path = tmp_path / "r.jsonl"
    log = RecordLog(path)
    log.append([{"n": 1}, {"n": 2}])
    with open(path, "a") as handle:
        handle.write('{"n": 3')  # a kill in the middle of a write
    assert read_jsonl(path) == [{"n": 1}, {"n": 2}]
    resumed = RecordLog(path)
    assert resumed.records == [{"n": 1}, {"n": 2}]
    resumed.append([{"n": 3}])
    assert [r["n"] for r in read_jsonl(path)] == [1, 2, 3]


def test_run_dir_seals_stages_and_refuses_other_domains(tmp_path):
    run = RunDir(tmp_path / "run", "finance").open()
    (run.partial_dir("generate") / "x.jsonl").write_text("{}\n")
    run.finish("generate", {"config_hash": "c", "input_hash": "i"})
    assert run.is_fresh("generate", "c", "i") and not run.is_fresh("generate", "c", "other")
    assert not (tmp_path / "run" / "generate.partial").exists()
    with pytest.raises(SelfspecError, match="belongs to domain 'finance'"):
        RunDir(tmp_path / "run", "biomed").open()


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "..", ""])
def test_unsafe_names_are_refused(name):
    with pytest.raises(SelfspecError):
        safe_name(name, "run name")


class _TestPlugin:
    @hookimpl
    def register_domains(self, register):
        register(Domain("testdomain", "testing"))

    @hookimpl
    def prompt_template(self, domain, stage):
        if domain == "testdomain" and stage == "response":
            return "not a template"


def test_plugin_overrides_and_wrong_types_name_the_plugin(capsys):
    manager = plugins.get_plugin_manager()
    manager.register(_TestPlugin(), name="testplugin")
    try:
        assert plugins.domains()["testdomain"].plugin == "testplugin"
        core_template = plugins.first_answer("prompt_template", PromptTemplate, domain="testdomain", stage="train")
        assert isinstance(core_template, PromptTemplate)
        plugins.require("testplugin")  # the plugin of the domain a command works on: its errors stop it
        with pytest.raises(SelfspecError, match="plugin 'testplugin' is broken: hook prompt_template: returned str"):
            plugins.first_answer("prompt_template", PromptTemplate, domain="testdomain", stage="response")
    finally:
        manager.unregister(name="testplugin")
    with pytest.raises(SelfspecError, match="unknown domain 'testdomain'"):
        plugins.get_domain("testdomain")


DISK_FULL_SCRIPT = """
import resource, signal, sys
from selfspec_core.errors import SelfspecError
from selfspec_core.run.rundir import RecordLog, RunDir
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full disk: writes fail with an error instead
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
run = RunDir(sys.argv[1], "finance").open()
try:
    RecordLog(run.partial_dir("respond") / "data.jsonl").append([{"text": "x" * 10000}])
except SelfspecError as exc:
    print(exc)
    sys.exit(2)
"""


def test_disk_full_fails_cleanly_and_keeps_finished_stages(tmp_path):
    import subprocess
    import sys

    run = RunDir(tmp_path / "run", "finance").open()
    (run.partial_dir("generate") / "instructions.jsonl").write_text('{"id": 1}\n')
    run.finish("generate", {"config_hash": "c", "input_hash": "i"})
    before = (run.stage_dir("generate") / "instructions.jsonl").read_bytes()
    result = subprocess.run(
        [sys.executable, "-c", DISK_FULL_SCRIPT, str(run.path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert "could not write" in result.stdout and "rerun to resume" in result.stdout
    assert (run.stage_dir("generate") / "instructions.jsonl").read_bytes() == before
    assert run.is_fresh("generate", "c", "i")
