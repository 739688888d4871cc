"""The time estimate against finished runs, and the calibration figures each run measures.

    python bench/estimate.py RUN [RUN ...] [--gflops G]

For each finished run folder (``selfspec run``), the estimate of selfspec_core.stages.estimate is
worked out from the run's own config.json at the matrix-product rate the run recorded (its manifests'
ceiling; ``--gflops`` sets another), so the comparison tests the cost model, not how fast this machine
is today. Printed per run:
one line per stage with estimated and actual minutes and model tokens, the total, then
``calibration: name=value ...``: each figure of ``Calibration`` as this run measured it (copy them
there to recalibrate; a run's own figures make its estimate match its model time).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from selfspec_core.config import Settings, apply
from selfspec_core.models.loading import resolve_model
from selfspec_core.run.pipeline import domain_seeds
from selfspec_core.run.rundir import STAGES, RunDir, read_jsonl
from selfspec_core.stages.estimate import (
    CALIBRATION,
    DECODE,
    OPTIONS,
    PASSES,
    PROMPT,
    TRAIN,
    estimate,
    evaluation_load,
    model_parameters,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders")
    parser.add_argument(
        "--gflops",
        type=float,
        help="the matrix-product rate to estimate at instead of the one each run recorded: for runs that "
        "recorded one timing, before throughput.matmul_gflops took the best of five",
    )
    args = parser.parse_args()
    for folder in args.runs:
        compare(folder, args.gflops)


def compare(folder: Path, gflops: float | None = None) -> None:
    config = json.loads((folder / "config.json").read_text())
    domain = json.loads((folder / "run.json").read_text())["domain"]
    settings = Settings()
    apply(settings, {key: value for key, value in config.items() if key != "profile"}, source=str(folder))
    run = RunDir(folder, domain)
    manifests = finished_stages(run)
    parameters = model_parameters(resolve_model(settings.model))
    recorded = manifests["generate"]["throughput"]["ceiling_tokens_per_second"] * 2 * parameters / 1e9
    gflops = gflops or recorded
    made = estimate(settings, domain, resolve_model(settings.model), gflops=gflops)
    print(f"{folder} ({domain}, {config.get('profile')} profile)")
    print(f"  estimated at {made.machine.describe()}; the run recorded {recorded:.0f} GFLOP/s")
    print(f"  {'stage':<10}{'est. min':>10}{'actual min':>12}{'ratio':>8}{'est. tokens':>14}{'actual tokens':>15}")
    for stage in STAGES:
        speed = manifests[stage]["throughput"]
        actual = manifests[stage]["seconds"] / 60
        tokens = speed["prompt_tokens"] + speed["generated_tokens"]
        estimated = made.stages[stage]
        print(
            f"  {stage:<10}{estimated.minutes:>10.1f}{actual:>12.1f}{actual / max(estimated.minutes, 1e-9):>8.2f}"
            f"{sum(estimated.tokens.values()):>14,.0f}{tokens:>15,}"
        )
    total = sum(manifest["seconds"] for manifest in manifests.values()) / 60
    print(f"  {'total':<10}{sum(made.minutes.values()):>10.1f}{total:>12.1f}{total / sum(made.minutes.values()):>8.2f}")
    figures = measured_calibration(run, settings, manifests, gflops, parameters)
    print("  calibration: " + " ".join(f"{name}={_show(value)}" for name, value in figures.items()))


def finished_stages(run: RunDir) -> dict[str, dict]:
    """Every stage's manifest; a run with a stage not finished cannot be compared."""
    manifests = {}
    for stage in STAGES:
        manifest = run.manifest(stage)
        if manifest is None:
            sys.exit(f"{run.path}: stage {stage} not finished; compare finished runs only")
        manifests[stage] = manifest
    return manifests


def measured_calibration(
    run: RunDir, settings: Settings, manifests: dict[str, dict], gflops: float, parameters: int
) -> dict[str, float | dict | None]:
    """Each figure of ``Calibration`` as this run measured it (``None`` where the run did no such work)."""
    speed = {stage: manifest["throughput"] for stage, manifest in manifests.items()}
    seconds = {stage: manifest["seconds"] for stage, manifest in manifests.items()}
    respond, generate = settings.respond, settings.generate
    funnel = manifests["generate"]["funnel"]
    prompts = funnel["generated"]
    instructions = len(read_jsonl(run.stage_dir("generate") / "instructions.jsonl"))
    answer_prompts = instructions * respond.consistency_samples
    option_prompts = len(read_jsonl(run.stage_dir("respond") / "option_scores.jsonl")) * respond.consistency_samples
    seeds = domain_seeds(run.domain)
    demo_tokens = sum(len(s.instruction) + len(s.input) + len(s.output) for s in seeds) / len(seeds)
    demo_tokens /= CALIBRATION.chars_per_token
    passages = respond.top_k * respond.passage_tokens if respond.retrieval else 0
    sources = manifests["respond"]["sources"]
    train = manifests["train"]
    loads = evaluation_load(settings, run.domain)
    items = sum(load.items for load in loads)
    item_text = sum(load.items * load.chars for load in loads) / CALIBRATION.chars_per_token
    figures: dict[str, float | dict | None] = {
        "generate_kept_per_prompt": _ratio(funnel["kept"], prompts),
        "generate_prompt_tokens": _ratio(speed["generate"]["prompt_tokens"], prompts),
        "generate_new_tokens": _ratio(speed["generate"]["generated_tokens"], prompts),
        "respond_demo_tokens": demo_tokens,
        "respond_query_tokens": _difference(
            _ratio(speed["respond"]["prompt_tokens"], answer_prompts), respond.num_demos * demo_tokens + passages
        ),
        "respond_option_share": _ratio(option_prompts, answer_prompts),
        "respond_answer_tokens": _ratio(speed["respond"]["generated_tokens"], answer_prompts - option_prompts),
        "train_written_kept": _ratio(sources["generated"], generate.num_instructions),
        "train_mined_kept": _ratio(sources["mined"], generate.num_mined),
        "train_example_tokens": _ratio(train["tokens"], train["examples"] * settings.train.epochs),
        "evaluate_item_tokens": _ratio(speed["evaluate"]["prompt_tokens"] / 2 - item_text, items),
    }
    figures["efficiency"] = _efficiencies(speed, option_prompts / max(answer_prompts, 1), gflops, parameters)
    figures["other_seconds"] = {stage: round(seconds[stage] - speed[stage]["model_seconds"], 1) for stage in STAGES}
    return figures


def _efficiencies(speed: dict, option_share: float, gflops: float, parameters: int) -> dict:
    """The share of the ceiling each kind of work reached, solving the stages' model seconds in turn:
    prompt and decode from generate and evaluate together, options from respond, train from train."""
    ceiling = {kind: gflops * 1e9 / (2 * parameters * PASSES.get(kind, 1.0)) for kind in (PROMPT, DECODE, TRAIN)}
    g, e, r = speed["generate"], speed["evaluate"], speed["respond"]
    # seconds per token: g.prompt * read + g.generated * write = g.seconds, the same for evaluate
    determinant = g["prompt_tokens"] * e["generated_tokens"] - g["generated_tokens"] * e["prompt_tokens"]
    if not determinant:
        return {}
    read = (g["model_seconds"] * e["generated_tokens"] - g["generated_tokens"] * e["model_seconds"]) / determinant
    write = (g["prompt_tokens"] * e["model_seconds"] - g["model_seconds"] * e["prompt_tokens"]) / determinant
    scored = r["prompt_tokens"] * option_share
    options_seconds = r["model_seconds"] - (r["prompt_tokens"] - scored) * read - r["generated_tokens"] * write
    train = speed["train"]
    return {
        PROMPT: round(1 / (read * ceiling[PROMPT]), 4),
        DECODE: round(1 / (write * ceiling[DECODE]), 4),
        OPTIONS: round(scored / options_seconds / ceiling[PROMPT], 4) if scored else None,
        TRAIN: round(train["prompt_tokens"] / train["model_seconds"] / ceiling[TRAIN], 4),
    }


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _difference(value: float | None, minus: float) -> float | None:
    return None if value is None else value - minus


def _show(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_show(item)}" for key, item in value.items()) + "}"
    return "n/a" if value is None else f"{value:.4g}"


if __name__ == "__main__":
    main()
