"""Does specialization help? Run the whole pipeline on the embedded model and score base vs specialized.

    python bench/quality.py --domain finance [--profile quick] [--out runs/bench-finance]

The pipeline runs as the user runs it, ``selfspec --domain <d> --profile <p> --out <dir> run``, in a
child process; a finished run directory is reused (its stages are skipped), ``--force`` reruns all.

Reads the real benchmarks from ../shared/data (or $SELFSPEC_DATA). Prints one line per task, the
contamination and cross-domain figures, and as its last line the domain's main task:
``task=<t> base=<x> specialized=<y> delta=<d> ci_low=<l> ci_high=<h> majority=<share> macro_f1_base=<x>
macro_f1_specialized=<y> macro_f1_ci_low=<l> macro_f1_majority=<m> acc_norm_base=<x> acc_norm_specialized=<y>
acc_calibrated_base=<x> acc_calibrated_specialized=<y> suite_base=<x> suite_specialized=<y> suite_ci_low=<l>
suite_ci_high=<h> suite_tasks=<n> suite_missing=<m> minutes=<m>`` (``base``/``specialized``: the task's
headline score; ``majority``: what always giving the most common answer would score, in accuracy and in
macro-F1; ``macro_f1_ci_low``: the lower bound of the paired 95% interval of the macro-F1 difference;
``acc_norm``: accuracy with answers picked per byte of the choice, ``acc_calibrated``: picked after the
content-free prompt's log-probabilities are taken out, see selfspec_core.eval.scoring.choice_values;
``suite_*``: the domain suite's macro-average over its ``suite_tasks`` scored benchmarks, ``suite_missing``
members not scored: data missing, or a scoring mode the settings leave out),
then ``prompt_format=<f> <task>_chat=<y> <task>_chat_base=<x>``: the form the adapter learnt
(selfspec_core.models.prompting) and the main task scored in plain chat form, what a chat client sends
(``evaluate.prompt_format = "chat"``; an adapter that learnt another form is scored so by
``selfspec evaluate`` on a run folder of its own, ``<out>-chat``, so the run's eval.json stays as it is).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from selfspec_core.config import PROFILES, read_config_file
from selfspec_core.run.adapter import adapter_prompt_format
from selfspec_core.run.rundir import STAGES, RunDir
from selfspec_core.stages.evaluate import SUITE_FILE

MAIN_TASK = {"biomed": "pubmedqa", "finance": "fpb"}
DATA = Path(os.environ.get("SELFSPEC_DATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", required=True, choices=sorted(MAIN_TASK))
    parser.add_argument("--profile", default="quick", choices=list(PROFILES))
    parser.add_argument("--out", help="run directory (default runs/bench-<domain>-<profile>)")
    parser.add_argument("--config", help="extra settings file (TOML/YAML) on top of the profile")
    parser.add_argument("--force", action="store_true", help="rerun every stage")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"benchmark data not found at {DATA}: set SELFSPEC_DATA")

    out = Path(args.out or f"runs/bench-{args.domain}-{args.profile}")
    started = time.time()
    selfspec(args.domain, args.profile, out, args.config, "run", *(["--force"] if args.force else []))
    run = RunDir(out, args.domain).open()
    minutes = sum((run.manifest(stage) or {}).get("seconds", 0) for stage in STAGES) / 60
    print(f"wall minutes this invocation: {(time.time() - started) / 60:.1f}; pipeline minutes: {minutes:.1f}")
    for stage in STAGES:
        manifest = run.manifest(stage) or {}
        speed = manifest.get("throughput") or {}
        rate = (
            f", {speed['tokens_per_second']:.0f} tokens/s (ceiling {speed['ceiling_tokens_per_second']:.0f})"
            if "tokens_per_second" in speed and "ceiling_tokens_per_second" in speed
            else ""
        )
        print(f"  {stage}: {manifest.get('seconds', 0) / 60:.1f} min{rate}")

    results = json.loads((run.stage_dir("evaluate") / "eval.json").read_text())
    contamination = json.loads((run.stage_dir("evaluate") / "contamination.json").read_text())
    for key, row in contamination.get("tasks", {}).items():
        print(
            f"contamination {key}: {row['items_touched']}/{row['items']} items share a "
            f"{contamination['ngram']}-gram with the training data"
        )
    for scope, rows in (
        ("own", {k: v for k, v in results.items() if k != "cross_domain"}),
        ("cross-domain", results.get("cross_domain", {})),
    ):
        for name, row in rows.items():
            if row.get("skipped"):
                print(f"{scope} {name}: skipped ({row['skipped']})")
                continue
            print(
                f"{scope} {name} ({row['metric']}, n={row['n']}): "
                f"base={row['base']:.3f} specialized={row['specialized']:.3f} "
                f"delta={row['delta']:+.3f} ci=[{row['ci'][0]:+.3f}, {row['ci'][1]:+.3f}]"
            )
            if "macro_f1" in row:
                f1 = row["macro_f1"]
                print(
                    f"  macro-F1: base={f1['base']:.3f} specialized={f1['specialized']:.3f} delta={f1['delta']:+.3f} "
                    f"ci=[{f1['ci'][0]:+.3f}, {f1['ci'][1]:+.3f}] majority={f1['majority']:.3f}"
                )
            if "majority" in row:
                print(
                    f"  always {row['majority']['answer']!r} would score {row['majority']['share']:.3f}; answers: "
                    + "; ".join(f"{who} {counts}" for who, counts in row.get("answers", {}).items())
                )
    chat_started = time.time()
    learnt, chat = chat_form_scores(run, args.profile, args.config)
    task = MAIN_TASK[args.domain]
    print(
        f"{task} in plain chat form ({(time.time() - chat_started) / 60:.1f} min): "
        f"base={chat['base']:.3f} specialized={chat['specialized']:.3f}; the adapter learnt the {learnt} form"
    )
    print(
        f"{main_task_figures(results, args.domain)}{suite_figures(run)} prompt_format={learnt} "
        f"{task}_chat={chat['specialized']:.3f} {task}_chat_base={chat['base']:.3f} minutes={minutes:.1f}"
    )


def suite_figures(run: RunDir) -> str:
    """The domain suite's macro-average for the last line (empty when the run wrote none)."""
    path = run.stage_dir("evaluate") / SUITE_FILE
    if not path.is_file():
        return ""
    suite = json.loads(path.read_text())
    print(
        f"suite of {len(suite['tasks'])} ({', '.join(suite['tasks'])}), macro-average: base={suite['base']:.3f} "
        f"specialized={suite['specialized']:.3f} ci=[{suite['ci'][0]:+.3f}, {suite['ci'][1]:+.3f}]"
        + (f"; not scored: {', '.join(suite['missing'])}" if suite.get("missing") else "")
    )
    return (
        f" suite_base={suite['base']:.3f} suite_specialized={suite['specialized']:.3f} "
        f"suite_ci_low={suite['ci'][0]:.3f} suite_ci_high={suite['ci'][1]:.3f} suite_tasks={len(suite['tasks'])}"
        f" suite_missing={len(suite.get('missing', {}))}"
    )


def selfspec(domain: str, profile: str, out: Path, config: str | Path | None, *command: str) -> None:
    """Run ``selfspec <command>`` on the run folder ``out`` as a user would, in a child process."""
    line = [
        *("--domain", domain, "--profile", profile, "--out", str(out), "--data-dir", str(DATA.resolve())),
        *(["--config", str(config)] if config else []),
        *command,
    ]
    print("$ selfspec " + " ".join(line), flush=True)
    subprocess.run([sys.executable, "-m", "selfspec_core", *line], check=True)


def chat_form_scores(run: RunDir, profile: str, config: str | Path | None) -> tuple[str, dict]:
    """The form the run's adapter learnt, and its main task's eval.json row in plain chat form.

    A run whose adapter learnt the chat form was scored so by its own evaluate stage; otherwise the
    adapter is scored again with ``evaluate.prompt_format = "chat"`` (the main task alone, the user's
    ``config`` kept) on a run folder of its own, ``<run>-chat``, so the run's eval.json stays as it is."""
    adapter = run.stage_dir("train") / "adapter"
    learnt, task = adapter_prompt_format(adapter), MAIN_TASK[run.domain]
    scored = run.stage_dir("evaluate")
    if learnt != "chat":
        settings = read_config_file(Path(config)) if config else {}
        chat_form = {"prompt_format": "chat", "adapter": str(adapter.resolve()), "tasks": task, "cross_domain": False}
        settings["evaluate"] = {**settings.get("evaluate", {}), **chat_form}
        out = run.path.with_name(f"{run.path.name}-chat")
        with tempfile.TemporaryDirectory() as folder:
            chat_config = Path(folder) / "chat-form.yaml"
            chat_config.write_text(yaml.safe_dump(settings), encoding="utf-8")
            selfspec(run.domain, profile, out, chat_config, "evaluate")
        scored = RunDir(out, run.domain).stage_dir("evaluate")
    return learnt, json.loads((scored / "eval.json").read_text())[task]


def main_task_figures(results: dict, domain: str) -> str:
    """The last line's figures of ``domain``'s main task in ``eval.json``'s ``results`` (all but minutes)."""
    main_row = results[MAIN_TASK[domain]]
    majority = f" majority={main_row['majority']['share']:.3f}" if "majority" in main_row else ""
    f1 = main_row.get("macro_f1")
    macro = (
        (
            f" macro_f1_base={f1['base']:.3f} macro_f1_specialized={f1['specialized']:.3f} "
            f"macro_f1_ci_low={f1['ci'][0]:.3f} macro_f1_majority={f1['majority']:.3f}"
        )
        if f1
        else ""
    )
    variants = main_row.get("variants", {})
    picked = "".join(
        f" {how}_base={variants[how]['base']:.3f} {how}_specialized={variants[how]['specialized']:.3f}"
        for how in ("acc_norm", "acc_calibrated")
        if how in variants
    )
    return (
        f"task={MAIN_TASK[domain]} base={main_row['base']:.3f} specialized={main_row['specialized']:.3f} "
        f"delta={main_row['delta']:.3f} ci_low={main_row['ci'][0]:.3f} ci_high={main_row['ci'][1]:.3f}"
        f"{majority}{macro}{picked}"
    )


if __name__ == "__main__":
    main()
