"""How a run's cost grows with its data: one domain at 150, 300, 600 and 1,200 records.

    python bench/scaling.py --domain finance [--sizes 150,300,600,1200] [--out runs/scaling-finance]

Each size runs the stages whose work grows with the records (generate, respond, train) as a user
runs them, ``selfspec --profile quick generate|respond|train`` in a child process, with
``generate.num_instructions`` and ``generate.num_mined`` scaled together in the quick profile's
proportion (150 written : 300 mined, so 1,200 records = 400 + 800). Evaluation scores a fixed set of
benchmark items whatever the records, so it is left out of the fit and shown as the estimate's
fixed cost. A finished size is reused (its stages are skipped); ``--force`` reruns them.

Prints minutes per stage and size, the fit ``minutes = a * records^k`` (least squares on the logs),
and writes the curve to ``docs/images/scaling-<domain>.png`` (``--plot`` for another path). Last line:
``k=<exponent> minutes_per_1k=<fitted minutes for 1,000 records> paper_minutes_estimate=<the paper
profile's whole run as selfspec's estimate works it out on this machine> records=<sizes>
minutes=<minutes per size>``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from selfspec_core.config import load_settings
from selfspec_core.models.loading import resolve_model
from selfspec_core.run.rundir import RunDir
from selfspec_core.runtime.openmp import choose_wait_policy

SCALED_STAGES = ("generate", "respond", "train")
ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SELFSPEC_DATA") or ROOT / ".." / "shared" / "data")


def split(records: int, written: int, mined: int) -> tuple[int, int]:
    """``records`` as (written instructions, mined tasks) in the proportion ``written : mined``."""
    instructions = round(records * written / (written + mined))
    return instructions, records - instructions


def run_size(domain: str, records: int, out: Path, force: bool) -> dict[str, float]:
    """Minutes of each scaled stage for ``records`` records (the stages run unless already done)."""
    quick = load_settings("quick").generate
    instructions, mined = split(records, quick.num_instructions, quick.num_mined)
    folder = out / f"records-{records}"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder.with_suffix(".yaml")
    config.write_text(yaml.safe_dump({"generate": {"num_instructions": instructions, "num_mined": mined}}))
    for stage in SCALED_STAGES:
        line = [
            *("--domain", domain, "--profile", "quick", "--out", str(folder)),
            *("--data-dir", str(DATA.resolve()), "--config", str(config), stage),
            *(["--force"] if force else []),
        ]
        print(f"$ selfspec {' '.join(line)}", flush=True)
        subprocess.run([sys.executable, "-m", "selfspec_core", *line], check=True)
    run = RunDir(folder, domain).open()
    return {stage: (run.manifest(stage) or {}).get("seconds", 0.0) / 60 for stage in SCALED_STAGES}


def fit(records: list[int], minutes: list[float]) -> tuple[float, float]:
    """(a, k) of ``minutes = a * records^k``, least squares on the logarithms."""
    k, log_a = np.polyfit(np.log(records), np.log(minutes), 1)
    return float(np.exp(log_a)), float(k)


def plot(path: Path, domain: str, records: list[int], per_stage: list[dict[str, float]], a: float, k: float) -> None:
    """The measured minutes per stage and in all, and the fitted curve, on log-log axes."""
    from matplotlib.figure import Figure  # the Agg canvas: no display needed
    from matplotlib.ticker import NullFormatter

    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    for stage in SCALED_STAGES:
        axes.plot(records, [m[stage] for m in per_stage], "o-", label=stage, alpha=0.7)
    totals = [sum(m.values()) for m in per_stage]
    axes.plot(records, totals, "ks-", label="generate + respond + train")
    span = np.geomspace(min(records), max(records), 50)
    axes.plot(span, a * span**k, "k--", label=f"fit: {a:.3f} x records^{k:.2f}")
    axes.set(xscale="log", yscale="log", xlabel="records", ylabel="minutes", title=f"{domain}: cost against data")
    axes.set_xticks(records, [str(r) for r in records])
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")


def main() -> None:
    choose_wait_policy()  # as the selfspec command does, before torch loads
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", required=True)
    parser.add_argument("--sizes", default="150,300,600,1200", help="record counts, comma-separated")
    parser.add_argument("--out", type=Path, help="folder of the runs (default runs/scaling-<domain>)")
    parser.add_argument("--plot", type=Path, help="where the curve goes (default docs/images/scaling-<domain>.png)")
    parser.add_argument("--force", action="store_true", help="rerun every size's stages")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"benchmark data not found at {DATA}: set SELFSPEC_DATA")
    sizes = sorted(int(size) for size in args.sizes.split(","))
    if len(sizes) < 2:
        sys.exit("--sizes needs at least two record counts to fit a curve")
    out = args.out or Path(f"runs/scaling-{args.domain}")

    per_stage = [run_size(args.domain, size, out, args.force) for size in sizes]
    totals = [sum(minutes.values()) for minutes in per_stage]
    a, k = fit(sizes, totals)
    for size, minutes, total in zip(sizes, per_stage, totals):
        stages = ", ".join(f"{stage} {minutes[stage]:.1f}" for stage in SCALED_STAGES)
        print(f"{size} records: {stages} = {total:.1f} min ({1000 * total / size:.1f} per 1K records)")

    from selfspec_core.stages.estimate import estimate_minutes

    model = resolve_model(None)
    evaluate = estimate_minutes(load_settings("quick"), args.domain, model, ["evaluate"])["evaluate"]
    paper = sum(estimate_minutes(load_settings("paper"), args.domain, model).values())
    print(f"fit: minutes = {a:.4f} x records^{k:.3f}; evaluation (fixed, estimated): {evaluate:.1f} min per run")
    plot(args.plot or ROOT / "docs" / "images" / f"scaling-{args.domain}.png", args.domain, sizes, per_stage, a, k)
    print(
        f"k={k:.3f} minutes_per_1k={a * 1000**k:.1f} paper_minutes_estimate={paper:.0f} "
        f"records={','.join(map(str, sizes))} minutes={','.join(f'{t:.1f}' for t in totals)}"
    )


if __name__ == "__main__":
    main()
