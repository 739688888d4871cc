"""The embedded model through every stage, and runs killed mid-stage that must end as if never killed.

These run SmolLM2-135M (the embedded default) on the ``tiny`` profile: minutes, not seconds.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DATA = Path(os.environ.get("SELFSPEC_DATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
# Enough training steps that a kill can land between two checkpoints.
CONFIG = "[train]\nmax_steps = 6\nsave_steps = 2\n[evaluate]\ncross_domain = false\n"


def selfspec(args, cwd, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "selfspec_core", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )


def finish(process, timeout=1200):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def test_every_stage_on_the_embedded_model(tmp_path):
    env = {"SELFSPEC_DATA": str(DATA)} if DATA.is_dir() else {"SELFSPEC_DATA": ""}
    args = ["--domain", "finance", "--profile", "tiny", "--out", "run", "run"]
    finish(selfspec(args, tmp_path, env))
    run = tmp_path / "run"
    for stage in ("generate", "respond", "train", "evaluate", "report"):
        assert json.loads((run / stage / "manifest.json").read_text())["stage"] == stage
    for stage in ("generate", "respond", "train", "evaluate"):  # the stages that run the model
        speed = json.loads((run / stage / "manifest.json").read_text())["throughput"]
        assert speed["prompt_tokens"] > 0 and 0 < speed["tokens_per_second"] < speed["ceiling_tokens_per_second"], (
            stage,
            speed,
        )
    records = [json.loads(line) for line in (run / "respond" / "data.jsonl").read_text().splitlines()]
    assert records and all(r["instruction"] and r["output"] for r in records)
    assert (run / "train" / "adapter" / "adapter_model.safetensors").exists()
    results = json.loads((run / "evaluate" / "eval.json").read_text())
    if DATA.is_dir():
        assert results["fpb"]["n"] == 8 and 0 <= results["fpb"]["specialized"] <= 1
    else:
        assert "skipped" in results["fpb"]
    html = (run / "report" / "report.html").read_text()
    assert "data:image/png;base64" in html
    for section in ("Pipeline funnel", "Training", "Base vs specialized", "Contamination", "Sample generated records"):
        assert section in html
    # A second run has nothing to do.
    again = finish(selfspec(args, tmp_path, env))
    assert again.count("up to date, skipped") == 5, again


def wait_for(process, condition, what, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if process.poll() is not None:
            pytest.fail(f"run ended before {what}: {process.stdout.read()}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_killed_runs_resume_to_the_same_result(tmp_path):
    (tmp_path / "c.toml").write_text(CONFIG)
    env = {"SELFSPEC_DATA": ""}  # only the shipped data: this test is about the generated data and the adapter

    def args(out):
        return ["--domain", "finance", "--profile", "tiny", "--config", "c.toml", "--out", out, "run"]

    finish(selfspec(args("clean"), tmp_path, env))

    killed = tmp_path / "killed"
    kill_points = [
        ("generation", lambda: lines(killed / "generate.partial" / "instructions.jsonl") >= 1),
        (
            "responses",
            lambda: any(  # option scores come seconds before the last responses chunk, whose window is short
                lines(killed / "respond.partial" / name) >= 1
                for name in ("option_scores.jsonl", "responses.jsonl", "data.jsonl")
            ),
        ),
        ("training", lambda: any((killed / "train.partial" / "checkpoints").glob("checkpoint-*/trainer_state.json"))),
    ]
    for what, condition in kill_points:
        process = selfspec(args("killed"), tmp_path, env)
        wait_for(process, condition, what)
        process.send_signal(signal.SIGKILL)
        process.wait()
    output = finish(selfspec(args("killed"), tmp_path, env))
    assert "Traceback" not in output

    clean = tmp_path / "clean"
    for stage, name in (("generate", "instructions.jsonl"), ("respond", "data.jsonl")):
        assert (killed / stage / name).read_bytes() == (clean / stage / name).read_bytes(), name
    from safetensors.torch import load_file

    resumed = load_file(killed / "train" / "adapter" / "adapter_model.safetensors")
    reference = load_file(clean / "train" / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert (resumed[key] - reference[key]).abs().max().item() < 1e-6, key
    steps = [json.loads(line)["step"] for line in (killed / "train" / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_two_rounds_on_the_embedded_model(tmp_path):
    """``run --rounds 2``: round 2 writes and answers with round 1's adapter in ``run/round-2/``, tunes a
    fresh adapter on both rounds' records, and the first round's report shows both rounds."""
    env = {"SELFSPEC_DATA": str(DATA)} if DATA.is_dir() else {"SELFSPEC_DATA": ""}
    (tmp_path / "quick.toml").write_text("[train]\nmax_steps = 2\n[evaluate]\ncross_domain = false\n")
    args = ["--domain", "finance", "--profile", "tiny", "--config", "quick.toml", "--out", "run", "run"]
    output = finish(selfspec([*args, "--rounds", "2"], tmp_path, env))
    first, second = tmp_path / "run", tmp_path / "run" / "round-2"
    assert "[round 2] writing and answering with round 1's adapter" in output
    assert (second / "previous" / "adapter" / "adapter_model.safetensors").read_bytes() == (
        first / "train" / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    keys = lambda path: [(r["instruction"], r["input"]) for r in map(json.loads, path.read_text().splitlines())]  # noqa: E731
    union = keys(second / "train" / "data.jsonl")
    assert len(union) == len(set(union)) == json.loads((second / "train" / "manifest.json").read_text())["examples"]
    assert set(union) == set(keys(first / "respond" / "data.jsonl")) | set(keys(second / "respond" / "data.jsonl"))
    rows = json.loads((first / "rounds.json").read_text())
    assert [row["round"] for row in rows] == [1, 2] and rows[1]["records"] == len(union)
    assert "## Rounds" in (first / "report" / "report.md").read_text()
    # nothing to redo but the first round's report, which shows the rounds
    again = finish(selfspec([*args, "--rounds", "2"], tmp_path, env))
    assert again.count("up to date, skipped") == 10, again
