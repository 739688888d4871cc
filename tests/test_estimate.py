"""The time estimate: it follows the work the settings ask for and this machine's measured rate, `selfspec
run` prints it before its first stage and keeps it in the run folder, and the report sets it beside the
minutes each stage took."""

import json
import re
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from selfspec_core.config import load_settings
from selfspec_core.data.datasources import OFFLINE_ENVS, HubDataset
from selfspec_core.data.tasks import EvalItem, EvalTask
from selfspec_core.errors import SelfspecError
from selfspec_core.hookspecs import hookimpl
from selfspec_core.models.loading import ModelRef, resolve_dtype
from selfspec_core.records import Domain
from selfspec_core.run.rundir import STAGES, RunDir, read_jsonl, write_jsonl
from selfspec_core.runtime import throughput
from selfspec_core.stages import estimate as estimates
from selfspec_core.stages.report import build_sections, render_markdown

MODEL_STAGES = ("generate", "respond", "train")


@pytest.fixture
def tiny(tiny_model_dir):
    return ModelRef("tiny", str(tiny_model_dir))


def minutes(model, stages=MODEL_STAGES, gflops=100.0, **sections):
    """Each stage's estimated minutes on the quick profile with ``sections``' settings changed."""
    return estimates.estimate_minutes(load_settings("quick", overrides=sections), "finance", model, stages, gflops)


def model_minutes(estimated: dict[str, float]) -> dict[str, float]:
    """The minutes the model works: the estimate without each stage's seconds around the model."""
    other = estimates.CALIBRATION.other_seconds
    return {stage: value - other[stage] / 60 for stage, value in estimated.items()}


@pytest.mark.parametrize(
    "section,setting,values",
    [
        ("generate", "num_instructions", (100, 200, 300)),
        ("generate", "num_mined", (100, 200, 300)),
        ("train", "epochs", (1.0, 2.0, 3.0)),
    ],
)
def test_more_records_or_epochs_take_more_minutes_in_proportion(tiny, section, setting, values):
    runs = [model_minutes(minutes(tiny, **{section: {setting: value}})) for value in values]
    totals = [sum(run.values()) for run in runs]
    assert totals[0] < totals[1] < totals[2]
    assert totals[2] - totals[1] == pytest.approx(totals[1] - totals[0], rel=0.01)  # each step adds the same


def test_each_setting_moves_only_the_stages_that_do_its_work(tiny):
    base = minutes(tiny, train={"epochs": 2.0})
    instructions = minutes(tiny, generate={"num_instructions": 600}, train={"epochs": 2.0})
    mined = minutes(tiny, generate={"num_mined": 600}, train={"epochs": 2.0})
    epochs = minutes(tiny, train={"epochs": 4.0})
    assert all(instructions[stage] > base[stage] for stage in MODEL_STAGES)
    assert mined["train"] > base["train"] and (mined["generate"], mined["respond"]) == (
        base["generate"],
        base["respond"],
    )
    assert epochs["train"] == pytest.approx(base["train"] + model_minutes(base)["train"])  # 2 -> 4 epochs
    assert (epochs["generate"], epochs["respond"]) == (base["generate"], base["respond"])


def test_lengths_cut_the_tokens_each_record_costs(tiny):
    base = model_minutes(minutes(tiny))
    short = model_minutes(minutes(tiny, train={"max_length": 64}, generate={"max_new_tokens": 8}))
    assert short["train"] == pytest.approx(base["train"] * 64 / estimates.CALIBRATION.train_example_tokens)
    assert short["generate"] < base["generate"]


def test_adapting_fewer_blocks_shortens_only_the_training(tiny):
    every, top = (model_minutes(minutes(tiny, train={"lora_top_share": share})) for share in (1.0, 0.5))
    assert top["train"] == pytest.approx(every["train"] * 2 / 3)  # the forward pass, half the backward
    assert {stage: top[stage] for stage in top if stage != "train"} == {
        stage: every[stage] for stage in every if stage != "train"
    }


def test_a_faster_machine_gets_fewer_minutes_from_its_measured_rate(tiny, monkeypatch):
    asked = []

    def machine(gflops):
        def matmul_gflops(dtype="float32", device="cpu"):
            asked.append(dtype)
            return gflops

        return matmul_gflops

    monkeypatch.setattr(throughput, "matmul_gflops", machine(100.0))
    slow = model_minutes(minutes(tiny, gflops=None))
    monkeypatch.setattr(throughput, "matmul_gflops", machine(400.0))
    fast = model_minutes(minutes(tiny, gflops=None))
    assert all(fast[stage] == pytest.approx(slow[stage] / 4) for stage in MODEL_STAGES)
    assert asked == [resolve_dtype("auto")] * 2  # the rate of the dtype the run computes in


def test_the_parameters_are_read_from_the_safetensors_header(tiny):
    loaded = AutoModelForCausalLM.from_pretrained(tiny.path)
    assert estimates.model_parameters(tiny) == sum(p.numel() for p in loaded.parameters())
    with pytest.raises(SelfspecError, match="cannot count the parameters of org/model: not a local folder"):
        estimates.model_parameters(ModelRef("model", "org/model"))


def test_a_model_on_a_server_gets_no_estimate_but_says_why(tiny):
    settings = load_settings("quick", overrides={"backend": "openai"})
    with pytest.raises(SelfspecError, match="backend 'openai'.*does not tell"):
        estimates.estimate(settings, "finance", tiny, gflops=100.0)


def _load(path):
    return [
        EvalItem(row["id"], "Classify the sentence.", row["text"], "yes", ("yes", "no")) for row in read_jsonl(path)
    ]


class EstimateTasks:
    @hookimpl
    def register_domains(self, register):
        register(Domain("estdom", "a domain for estimate tests"))

    @hookimpl
    def evaluation_tasks(self, domain):
        if domain != "estdom":
            return None
        return [
            EvalTask("sentences", "estdom", "est/sentences.jsonl", _load),
            EvalTask("absent", "estdom", "est/absent.jsonl", _load),
        ]


@pytest.mark.parametrize("max_items,expected", [(0, 20), (5, 5)])
def test_evaluation_counts_the_real_items_and_their_length(tmp_path, plugin, tiny, max_items, expected):
    plugin(EstimateTasks(), "estimate-tasks")
    (tmp_path / "est").mkdir()

    def evaluate_minutes(text: str) -> float:
        write_jsonl(tmp_path / "est" / "sentences.jsonl", [{"id": str(n), "text": text} for n in range(20)])
        settings = load_settings(
            "quick",
            overrides={"data_dir": str(tmp_path), "evaluate": {"max_items": max_items, "cross_domain": False}},
        )
        loads = estimates.evaluation_load(settings, "estdom")
        assert [(load.items, load.new_tokens) for load in loads] == [(expected, 0)]  # the absent task costs nothing
        return model_minutes(estimates.estimate_minutes(settings, "estdom", tiny, ["evaluate"], 100.0))["evaluate"]

    short, long = evaluate_minutes("Rates rose."), evaluate_minutes("Revenue rose sharply. " * 100)
    assert 0 < short < long
    calibration = estimates.CALIBRATION
    per_item = 2 * (
        calibration.evaluate_item_tokens + len("Classify the sentence.Rates rose.") / calibration.chars_per_token
    )
    tokens_per_minute = 60 * 100e9 * calibration.efficiency["prompt"] / (2 * estimates.model_parameters(tiny))
    assert short == pytest.approx(expected * per_item / tokens_per_minute)


def test_base_scores_an_earlier_run_cached_are_not_estimated_again(tmp_path, plugin, tiny, monkeypatch):
    """The evaluate stage reads the base model's scores an earlier run cached (same model, items,
    prompts): the estimate counts only the specialized model's work on those tasks."""
    from selfspec_core.plugins import manager as plugins
    from selfspec_core.stages import evaluate as evaluation
    from selfspec_core.templates import PromptTemplate, template_context

    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path / "cache"))
    plugin(EstimateTasks(), "estimate-tasks")
    (tmp_path / "est").mkdir()
    write_jsonl(tmp_path / "est" / "sentences.jsonl", [{"id": str(n), "text": f"Rates rose {n}%."} for n in range(6)])
    settings = load_settings("quick", overrides={"data_dir": str(tmp_path), "evaluate": {"cross_domain": False}})

    def prompt_tokens() -> float:
        return estimates.estimate(settings, "estdom", tiny, ["evaluate"], 100.0).stages["evaluate"].tokens["prompt"]

    assert [load.base_cached for load in estimates.evaluation_load(settings, "estdom", model_ref=tiny)] == [False]
    both = prompt_tokens()
    _, loaded, _ = evaluation.stage_tasks(settings, "estdom", log=lambda line: None)
    template = plugins.first_answer("prompt_template", PromptTemplate, domain="estdom", stage="train")
    prompts = evaluation.evaluation_prompts(
        settings, tiny, None, template, template_context("estdom", "a domain for estimate tests")
    )
    evaluation.score_model("base", settings, tiny, None, loaded, prompts, log=lambda line: None)  # as a run does

    assert [load.base_cached for load in estimates.evaluation_load(settings, "estdom", model_ref=tiny)] == [True]
    assert prompt_tokens() == pytest.approx(both / 2)
    uncached = load_settings(
        "quick",
        overrides={"data_dir": str(tmp_path), "evaluate": {"cross_domain": False, "cache_base_scores": False}},
    )
    assert [load.base_cached for load in estimates.evaluation_load(uncached, "estdom", model_ref=tiny)] == [False]


class FetchTasks:
    @hookimpl
    def register_domains(self, register):
        register(Domain("fetchdom", "a domain whose benchmark is on the Hub only"))

    @hookimpl
    def evaluation_tasks(self, domain):
        if domain != "fetchdom":
            return None
        hub = HubDataset("selfspec-tests/not-there")
        return [EvalTask("hubbed", "fetchdom", "fetch/hubbed.jsonl", _load, hub=hub, load_rows=lambda rows: [])]


def test_benchmarks_still_to_fetch_are_estimated_apart(tmp_path, plugin, tiny, monkeypatch):
    """Whether the Hub will answer when the stage runs is unknown before it: their minutes are said beside."""
    plugin(FetchTasks(), "fetch-tasks")
    for name in OFFLINE_ENVS:
        monkeypatch.delenv(name, raising=False)
    settings = load_settings("quick", overrides={"data_dir": str(tmp_path), "evaluate": {"cross_domain": False}})
    assert [(load.items, load.to_fetch) for load in estimates.evaluation_load(settings, "fetchdom")] == [(300, True)]
    made = estimates.estimate(settings, "fetchdom", tiny, ["evaluate"], 100.0)
    assert made.minutes["evaluate"] == pytest.approx(estimates.CALIBRATION.other_seconds["evaluate"] / 60)
    assert made.to_fetch > 0 and made.to_dict()["to_fetch_minutes"] == round(made.to_fetch, 2)
    assert made.line().endswith(
        f"; evaluate +{made.to_fetch:.1f} min if the benchmarks still to fetch from the Hub are fetched"
    )


def selfspec(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "selfspec_core", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


ESTIMATE_LINE = re.compile(
    r"\[estimate\] generate [\d.]+ min, respond [\d.]+, train [\d.]+, evaluate [\d.]+, report [\d.]+: "
    r"about [\d.]+ minutes on this machine \(\w+ matmul [\d,]+ GFLOP/s, \d+ threads\)"
)


def test_run_prints_the_estimate_first_keeps_it_and_the_report_compares(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("SELFSPEC_DATA", "")
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path / "cache"))
    args = ["--domain", "finance", "--profile", "tiny", "--model", str(tiny_model_dir), "--out", "run"]
    quicker = "[generate]\nmax_rounds = 1\n[evaluate]\ncross_domain = false\n"
    (tmp_path / "own.toml").write_text(quicker)
    first = selfspec(*args, "--config", "own.toml", "run", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert ESTIMATE_LINE.fullmatch(lines[0]) and lines[1] == "[generate] running", lines[:2]
    run = RunDir(tmp_path / "run", "finance")
    made = json.loads((run.path / "estimate.json").read_text())
    assert list(made["stages"]) == sorted(STAGES) and made["parameters"] == estimates.model_parameters(
        ModelRef("tiny", str(tiny_model_dir))
    )
    report = (run.stage_dir("report") / "report.md").read_text()
    compared = ["generate", "respond", "train", "evaluate"]
    guessed = {stage: made["stages"][stage]["minutes"] for stage in compared}
    took = {stage: run.manifest(stage)["seconds"] / 60 for stage in compared}
    assert "## Time: estimate vs actual" in report
    for stage in compared:
        assert (
            f"| {stage} | {guessed[stage]:,.1f} | {took[stage]:,.1f} | {took[stage] / guessed[stage]:.2f} |" in report
        )
    total = f"| total | {sum(guessed.values()):,.1f} | {sum(took.values()):,.1f} |"
    assert total in report

    # A resumed run estimates only the stages it runs; the earlier stages keep their estimate.
    (tmp_path / "more.toml").write_text(quicker + "[train]\nepochs = 2\n")
    resumed = selfspec(*args, "--config", "more.toml", "run", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    lines = resumed.stdout.splitlines()
    estimate_lines = [line for line in lines if line.startswith("[estimate]")]
    assert len(estimate_lines) == 1 and estimate_lines[0].startswith("[estimate] train ")
    assert "generate" not in estimate_lines[0] and "respond" not in estimate_lines[0]
    assert lines.index(estimate_lines[0]) < lines.index(
        "[train] settings or inputs changed since the last run: running again"
    )
    again = json.loads((run.path / "estimate.json").read_text())
    assert (
        again["stages"]["generate"] == made["stages"]["generate"]
        and again["stages"]["respond"] == made["stages"]["respond"]
    )
    assert again["stages"]["train"]["tokens"]["train"] == pytest.approx(
        2 * made["stages"]["train"]["tokens"]["train"], abs=1
    )


def test_a_run_folder_without_an_estimate_gets_no_time_table(tmp_path):
    run = RunDir(tmp_path / "run", "finance").open()
    (run.partial_dir("generate") / "instructions.jsonl").write_text("")
    run.finish("generate", {"seconds": 60.0})
    markdown = render_markdown("r", build_sections(run, None, "m"))
    assert "estimate" not in markdown.lower()
    made = {"stages": {"generate": {"minutes": 2.0}}, "dtype": "float32", "matmul_gflops": 80.0, "threads": 2}
    (run.path / "estimate.json").write_text(json.dumps({**made, "parameters": 1000}))
    markdown = render_markdown("r", build_sections(run, None, "m"))
    assert "| generate | 2.0 | 1.0 | 0.50 |" in markdown and "| total | 2.0 | 1.0 | 0.50 |" in markdown
