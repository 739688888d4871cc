"""Rounds of self-specialization: round k+1 writes, answers and judges its data with round k's model
and tunes a fresh adapter of the base model on every round's data together.

Round 1 is the run directory itself. Round k >= 2 is a run directory of its own, ``<run>/round-<k>/``,
whose ``previous/`` folder holds what the round before hands on: ``previous/adapter/`` (round k-1's
adapter, which the generate and respond stages apply to the base model) and ``previous/data.jsonl``
(the training records of rounds 1 to k-1). Its train stage adds its own records to those, without
repeats, writes the union as ``train/data.jsonl`` and tunes a new adapter on it. Both files are
inputs of the stages that read them, so a round reruns when the round before it changes.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

from selfspec_core.run.rundir import RunDir, atomic_write_json, read_json, read_jsonl, write_jsonl

PREVIOUS = "previous"
UNION_FILE = "data.jsonl"  # in the train stage folder of a round after the first: the records it trained on


def round_run(first: RunDir, number: int) -> RunDir:
    """The run directory of round ``number`` (1: the run itself)."""
    return first if number == 1 else RunDir(first.path / f"round-{number}", first.domain)


def previous_adapter(run: RunDir) -> Path | None:
    """The adapter of the round before, which this round's model writes and answers with; None in round 1."""
    adapter = run.path / PREVIOUS / "adapter"
    return adapter if (adapter / "adapter_config.json").is_file() else None


def previous_data(run: RunDir) -> Path | None:
    """The training records of the rounds before this one; None in round 1."""
    data = run.path / PREVIOUS / UNION_FILE
    return data if data.is_file() else None


def training_data(run: RunDir) -> Path:
    """The records the run's adapter was tuned on: every round's union, or round 1's responses."""
    union = run.stage_dir("train") / UNION_FILE
    return union if union.is_file() else run.stage_dir("respond") / "data.jsonl"


def rounds_command(run: RunDir) -> str:
    """The command that runs the rounds up to ``run``'s (and hands it ``previous/`` again), as a user can paste it."""
    return shlex.join(
        [
            "selfspec",
            "run",
            "--domain",
            run.domain,
            "--out",
            str(run.path.parent),
            "--rounds",
            run.path.name.removeprefix("round-"),
        ]
    )


def union_records(earlier: list[dict], own: list[dict]) -> list[dict]:
    """``earlier`` then ``own``, each (instruction, input) pair once: the first record of a pair stays
    (mined tasks recur every round with the same answer)."""
    seen, union = set(), []
    for record in [*earlier, *own]:
        key = (str(record.get("instruction", "")).strip(), str(record.get("input") or "").strip())
        if key not in seen:
            seen.add(key)
            union.append(record)
    return union


def hand_on(finished: RunDir, next_run: RunDir) -> None:
    """Give ``next_run`` the finished round's adapter and training records, each replaced whole."""
    target = next_run.path / PREVIOUS
    target.mkdir(parents=True, exist_ok=True)
    staging = target / "adapter.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(finished.stage_dir("train") / "adapter", staging)
    shutil.rmtree(target / "adapter", ignore_errors=True)
    os.replace(staging, target / "adapter")
    write_jsonl(target / UNION_FILE, read_jsonl(training_data(finished)))


SUMMARY_FILE = "rounds.json"  # in the first round's folder: each round's scores, side by side


def summarize(first: RunDir, count: int) -> list[dict]:
    """Each round's training records, suite and own tasks' scores (from its evaluate stage), written to
    ``rounds.json`` in the first round's folder for the report."""
    rows = []
    for number in range(1, count + 1):
        run = round_run(first, number)
        results = read_json(run.stage_dir("evaluate") / "eval.json") or {}
        rows.append(
            {
                "round": number,
                "records": (run.manifest("train") or {}).get("examples"),
                "suite": read_json(run.stage_dir("evaluate") / "suite.json"),
                "tasks": {
                    name: {key: row[key] for key in ("base", "specialized", "delta", "ci", "macro_f1") if key in row}
                    for name, row in results.items()
                    if name != "cross_domain" and isinstance(row, dict) and "specialized" in row
                },
            }
        )
    atomic_write_json(first.path / SUMMARY_FILE, rows)
    return rows
