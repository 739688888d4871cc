"""Rounds of self-specialization (``selfspec run --rounds N``, :mod:`selfspec_core.run.rounds`): what a
round hands on, and a later round's training on every round's records."""

import json

from selfspec_core.config import load_settings
from selfspec_core.plugins import manager as plugins
from selfspec_core.run import rounds
from selfspec_core.run.adapter import adapter_training_data
from selfspec_core.run.pipeline import Pipeline
from selfspec_core.run.rundir import RunDir, read_jsonl, write_jsonl
from selfspec_core.stages.report import rounds_section


def record(instruction: str, text: str, output: str) -> dict:
    return {"instruction": instruction, "input": text, "output": output}


MINED = record("Classify the sentiment.", "Sales rose 5%.", "positive")
FIRST = [MINED, record("Define EBITDA.", "", "Earnings before interest, taxes, depreciation and amortization.")]
SECOND = [MINED, record("Define a coupon.", "", "The annual interest a bond pays.")]


def finished_round(path, records: list[dict]) -> RunDir:
    run = RunDir(path, "finance").open()
    write_jsonl(run.partial_dir("respond") / "data.jsonl", records)
    run.finish("respond", {})
    return run


def test_union_keeps_each_instruction_and_input_once_earlier_rounds_first():
    again = record("Classify the sentiment.", "Sales rose 5%.", "neutral")
    assert rounds.union_records(FIRST, [again, SECOND[1]]) == [*FIRST, SECOND[1]]


def test_a_later_round_trains_a_fresh_adapter_on_every_rounds_records(tmp_path, tiny_model_dir):
    settings = load_settings("tiny", overrides={"model": str(tiny_model_dir), "train": {"max_steps": 1}})
    domain = plugins.get_domain("finance")
    first = finished_round(tmp_path / "run", FIRST)
    Pipeline(settings, domain, first, seeds=[]).run_stages(["train"])
    assert rounds.training_data(first) == first.stage_dir("respond") / "data.jsonl"

    second = finished_round(rounds.round_run(first, 2).path, SECOND)
    rounds.hand_on(first, second)
    assert rounds.previous_data(second) is not None and rounds.previous_adapter(second) is not None
    pipeline = Pipeline(settings, domain, second, seeds=[])
    assert rounds.previous_data(second) in pipeline.input_files("train")
    pipeline.run_stages(["train"])
    union = read_jsonl(second.stage_dir("train") / rounds.UNION_FILE)
    assert union == [*FIRST, SECOND[1]] and second.manifest("train")["examples"] == 3
    assert rounds.training_data(second) == second.stage_dir("train") / rounds.UNION_FILE
    assert adapter_training_data(second.stage_dir("train") / "adapter") == rounds.training_data(second)
    # a torn hand-on names the command that writes it again (one that parses)
    assert rounds.rounds_command(second) == f"selfspec run --domain finance --out {first.path} --rounds 2"
    # round 1's records changed: round 2's training is stale
    before = pipeline.input_hash("train")
    write_jsonl(first.stage_dir("respond") / "data.jsonl", FIRST[:1])
    rounds.hand_on(first, second)
    assert pipeline.input_hash("train") != before

    # each round's scores side by side, for the report
    for number, run in ((1, first), (2, second)):
        (run.partial_dir("evaluate") / "eval.json").write_text(
            json.dumps({"fpb": {"base": 0.2, "specialized": 0.5 + number / 10, "delta": 0.3, "ci": [0.1, 0.5]}})
        )
        (run.partial_dir("evaluate") / "suite.json").write_text(
            json.dumps({"base": 0.2, "specialized": 0.5 + number / 10, "delta": 0.3, "ci": [0.1, 0.5]})
        )
        run.finish("evaluate", {})
    rows = rounds.summarize(first, 2)
    assert [row["records"] for row in rows] == [2, 3] and rows[1]["tasks"]["fpb"]["specialized"] == 0.7
    assert json.loads((first.path / rounds.SUMMARY_FILE).read_text()) == rows
    section = rounds_section(rows)
    assert section.title == "Rounds" and [cells[:2] for cells in section.blocks[1].rows] == [["1", "2"], ["2", "3"]]


def test_a_single_round_has_no_rounds_table():
    assert rounds_section([{"round": 1, "records": 2, "suite": None, "tasks": {}}]) is None
