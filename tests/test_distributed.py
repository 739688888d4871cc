"""Training on several processes: two gloo CPU ranks end to end, and what only rank 0 may do."""

import json
import os
import subprocess
import sys

import pytest
import torch

from selfspec_core.config import load_settings
from selfspec_core.errors import SelfspecError
from selfspec_core.models.loading import ModelRef, load_tokenizer
from selfspec_core.models.prompting import PromptFormat
from selfspec_core.plugins import manager as plugins
from selfspec_core.run.context import StageContext
from selfspec_core.run.pipeline import Pipeline
from selfspec_core.run.rundir import RunDir, read_jsonl, write_jsonl
from selfspec_core.runtime import distributed
from selfspec_core.stages import train as training

DOMAIN = "finance"  # an installed domain, so the command line can open the run
TEXTS = [
    "The company reported higher quarterly revenue and raised its outlook.",
    "Patients receiving the treatment showed lower mortality than controls.",
    "The company reported higher quarterly revenue.",
    "Patients receiving the treatment.",
]
RECORDS = [
    {"instruction": "Classify the sentiment as positive, negative, or neutral.", "input": text, "output": label}
    for text in TEXTS
    for label in ("positive", "negative")
]
TRAIN = {
    "epochs": 6.0,
    "batch_size": 2,
    "learning_rate": 1e-2,
    "warmup_ratio": 0.0,
    "max_length": 40,
    "lora_dropout": 0.0,
    "quant": "none",
    "save_steps": 100,
}


def responded_run(path) -> RunDir:
    """A run directory whose respond stage is sealed with ``RECORDS``."""
    run = RunDir(path, DOMAIN).open()
    write_jsonl(run.partial_dir("respond") / "data.jsonl", RECORDS)
    run.finish("respond", {})
    return run


def files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_two_cpu_processes_train_one_adapter(tmp_path, sharp_model_dir):
    run = responded_run(tmp_path / "run")
    config = tmp_path / "train.toml"
    config.write_text("[train]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in TRAIN.items()))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "selfspec_core",
            "--domain",
            DOMAIN,
            "--profile",
            "tiny",
            "--config",
            str(config),
            "--model",
            str(sharp_model_dir),
            "--out",
            str(run.path),
            "train",
            "--num-processes",
            "2",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr  # torchrun fails the command if any rank fails
    assert result.stdout.count("[train] done") == 1  # rank 1 logs nothing

    manifest = run.manifest("train")
    # 8 examples in global batches of 2 per rank x 2 ranks: 2 steps an epoch, each example once an epoch
    assert manifest["processes"] == 2 and manifest["steps"] == 12
    settings = load_settings("tiny", overrides={"train": TRAIN})
    ctx = StageContext(settings, plugins.get_domain(DOMAIN), run, [], ModelRef("sharp", str(sharp_model_dir)), run.path)
    tokenizer = load_tokenizer(ctx.model)
    prompts = PromptFormat.chosen(settings.train.prompt_format, ctx.template("train"), tokenizer, ctx.template_context)
    encoded = [training.encode_example(r, prompts, TRAIN["max_length"]) for r in RECORDS]
    assert manifest["tokens"] == 6 * sum(len(e.input_ids) for e in encoded)

    losses = [s["loss"] for s in read_jsonl(run.stage_dir("train") / "train_log.jsonl")]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.6 * sum(losses[:3])

    adapter = run.stage_dir("train") / "adapter"
    assert [p.parent for p in tmp_path.rglob("adapter_config.json")] == [adapter]
    # the lock file stays (removing it would race a process opening it); its holder record goes with the run
    assert sorted(p.name for p in run.path.iterdir()) == [
        ".lock",
        "config.json",
        "respond",
        "run.json",
        "selfspec.log",
        "train",
    ]
    assert not (run.stage_dir("train") / "checkpoints").exists()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(sharp_model_dir)
    ids = torch.tensor([tokenizer("The company reported", add_special_tokens=False).input_ids])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        after = PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-3)


def test_a_rank_other_than_0_writes_nothing(tmp_path, tiny_model_dir, monkeypatch):
    """Rank 1 trains along but leaves the log, checkpoints, adapter, manifest and seal to rank 0.

    Only its own RNG state goes into a checkpoint: the Trainer saves each rank's, to resume exactly.
    """
    from transformers import TrainingArguments

    run = responded_run(tmp_path / "run")
    before = files(run.path)
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    monkeypatch.setattr(TrainingArguments, "should_save", property(lambda self: False))  # the Trainer's view on rank 1
    settings = load_settings("tiny", overrides={"model": str(tiny_model_dir), "train": {**TRAIN, "max_steps": 2}})
    Pipeline(settings, plugins.get_domain(DOMAIN), run, seeds=[], log=lambda _: None).run_stages(["train"])
    written = {name: data for name, data in files(run.path).items() if not name.endswith("/rng_state.pth")}
    assert written == before
    assert run.manifest("train") is None


def test_checkpoints_of_another_process_count_are_refused(tmp_path):
    folder = tmp_path / "checkpoints"
    assert training.resume_checkpoint(folder, 2) is None
    (folder / "checkpoint-4").mkdir()
    (folder / "checkpoint-4" / "trainer_state.json").write_text("{}")
    assert training.resume_checkpoint(folder, 2) == folder / "checkpoint-4"
    with pytest.raises(SelfspecError, match=r"made by 2 training process.*rerun with --num-processes 2"):
        training.resume_checkpoint(folder, 1)


def test_only_train_runs_under_a_launcher(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    pipeline = Pipeline(load_settings("tiny"), plugins.get_domain(DOMAIN), responded_run(tmp_path / "run"), seeds=[])
    with pytest.raises(SelfspecError, match="only `selfspec train` runs on several processes"):
        pipeline.run_stages(["generate", "respond"])


def test_more_processes_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SelfspecError, match="1 GPU.*--num-processes 1 or fewer"):
        distributed.check_can_launch(2)


def test_bad_arguments_fail_once_before_any_process_starts():
    def train(*args):
        return subprocess.run(
            [sys.executable, "-m", "selfspec_core", *args], capture_output=True, text=True, timeout=120
        )

    below_1 = train("--domain", DOMAIN, "train", "--num-processes", "0")
    assert below_1.returncode == 2 and "--num-processes" in below_1.stderr and "0 is not in the range" in below_1.stderr
    unknown = train("--domain", "nope", "train", "--num-processes", "2")
    assert unknown.returncode == 2 and "unknown domain 'nope'" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
