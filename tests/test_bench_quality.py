"""bench/quality.py's plain-chat-form score of the main task, on the tiny model and biomed's shipped PubMedQA."""

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from selfspec_core.models.loading import ModelRef, load_model
from selfspec_core.plugins.defaults import TRAIN_TEMPLATE
from selfspec_core.run.adapter import TRAINING_INFO
from selfspec_core.run.rundir import RunDir, write_jsonl


def load_bench():
    spec = importlib.util.spec_from_file_location(
        "quality", Path(__file__).resolve().parents[1] / "bench" / "quality.py"
    )
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    return quality


def trained_run(folder: Path, model_dir: Path, prompt_format: str) -> RunDir:
    """A biomed run whose adapter learnt ``prompt_format``, with an eval.json of its own."""
    from peft import LoraConfig, get_peft_model

    run = RunDir(folder, "biomed").open()
    write_jsonl(run.partial_dir("respond") / "data.jsonl", [{"instruction": "Is it so?", "output": "yes"}])
    run.finish("respond", {})
    adapter = run.partial_dir("train") / "adapter"
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(load_model(ModelRef("m", str(model_dir))), lora).save_pretrained(adapter)
    info = {"prompt_format": prompt_format, "prompt_template": asdict(TRAIN_TEMPLATE)}
    (adapter / TRAINING_INFO).write_text(json.dumps(info))
    run.finish("train", {})
    own = {"pubmedqa": {"metric": "accuracy", "base": 0.5, "specialized": 0.6, "n": 4}}
    (run.partial_dir("evaluate") / "eval.json").write_text(json.dumps(own))
    run.finish("evaluate", {})
    return run


def test_an_adapter_of_another_form_is_scored_again_in_chat_form_beside_the_run(
    tmp_path, chat_model_dir, monkeypatch, capfd
):
    quality = load_bench()
    monkeypatch.setattr(quality, "DATA", tmp_path / "data")  # empty: PubMedQA ships with the biomed plugin
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump({"model": str(chat_model_dir), "evaluate": {"max_items": 4}}))
    run = trained_run(tmp_path / "run", chat_model_dir, "alpaca")
    own = (run.stage_dir("evaluate") / "eval.json").read_text()

    learnt, row = quality.chat_form_scores(run, "tiny", config)

    assert learnt == "alpaca" and row["n"] == 4 and 0 <= row["base"] <= 1 and 0 <= row["specialized"] <= 1
    chat_run = json.loads((tmp_path / "run-chat" / "evaluate" / "eval.json").read_text())
    assert chat_run["pubmedqa"] == row and not chat_run["cross_domain"]  # the main task alone
    assert "[evaluate] items posed in the chat form" in capfd.readouterr().out
    assert (run.stage_dir("evaluate") / "eval.json").read_text() == own  # the run's own scores untouched


def test_an_adapter_that_learnt_the_chat_form_keeps_its_own_scores(tmp_path, chat_model_dir, monkeypatch):
    quality = load_bench()

    def no_second_run(*_):
        pytest.fail("a chat-form adapter was scored again")

    monkeypatch.setattr(quality, "selfspec", no_second_run)
    run = trained_run(tmp_path / "run", chat_model_dir, "chat")
    own = json.loads((run.stage_dir("evaluate") / "eval.json").read_text())["pubmedqa"]
    assert quality.chat_form_scores(run, "tiny", None) == ("chat", own)
