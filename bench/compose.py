"""One model, many experts: compose the finance and biomed runs and score it against each specialist.

    python bench/compose.py [--finance runs/bench-finance-quick] [--biomed runs/bench-biomed-quick]
                            [--out runs/bench-composed] [--no-baselines]

Takes the two finished quick-profile runs of ``bench/quality.py`` and runs ``selfspec compose`` on
them as a user would (a child process): it learns the router from the runs' own training data, then
scores the base, each specialist, the composed model, the two weight merges (linear, TIES) and one
adapter tuned on both domains' data, on every installed domain's benchmark items.

Prints one line per task, and as its last line: ``routing_<domain>=<share of the domain's benchmark
items routed to its expert>`` for each domain, ``<task>_<model>=<score>`` for every task and model,
``own_within_specialist=<true when, on each domain's own tasks, the paired 95% interval of composed -
specialist holds 0 or lies above it>`` and ``cross_not_below_base=<true when, on every task, the
composed model's interval against the base does not lie wholly below 0>``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(os.environ.get("SELFSPEC_DATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--finance", default="runs/bench-finance-quick", help="the finance run (bench/quality.py --domain finance)"
    )
    parser.add_argument(
        "--biomed", default="runs/bench-biomed-quick", help="the biomed run (bench/quality.py --domain biomed)"
    )
    parser.add_argument("--out", default="runs/bench-composed", help="folder for the composed model and its evaluation")
    parser.add_argument("--profile", default="quick", help="settings for the evaluation and the multi-task adapter")
    parser.add_argument("--no-baselines", action="store_true", help="skip the merged and multi-task baselines")
    args = parser.parse_args()
    for run in (args.finance, args.biomed):
        if not (Path(run) / "train" / "adapter").is_dir():
            sys.exit(
                f"{run}: no finished run; make it with "
                f"`python bench/quality.py --domain {Path(run).name.split('-')[1]}`"
            )
    command = [
        sys.executable,
        "-m",
        "selfspec_core",
        "--profile",
        args.profile,
        "--data-dir",
        str(DATA.resolve()),
        "compose",
        args.finance,
        args.biomed,
        "--output",
        args.out,
        *(["--no-baselines"] if args.no_baselines else []),
    ]
    print("$ selfspec " + " ".join(command[3:]), flush=True)
    started = time.time()
    subprocess.run(command, check=True)
    result = json.loads((Path(args.out) / "eval" / "eval.json").read_text())
    figures = {f"routing_{domain}": f"{share:.3f}" for domain, share in result["routing_accuracy"].items()}
    own_ok, cross_ok = True, True
    for key, task in result["tasks"].items():
        name = key.split("/")[1]
        for label, row in task["models"].items():
            figures[f"{name}_{label.replace('-', '_')}"] = f"{row['score']:.3f}"
        versus = task.get("composed_vs_specialist")
        if versus:
            own_ok &= versus["ci"][1] >= 0
        composed = task["models"]["composed"]
        cross_ok &= composed["ci"][1] >= 0
        print(
            f"{key}: "
            + ", ".join(f"{label} {row['score']:.3f}" for label, row in task["models"].items())
            + (
                f"; composed - specialist {versus['delta']:+.3f} [{versus['ci'][0]:+.3f}, {versus['ci'][1]:+.3f}]"
                if versus
                else ""
            )
            + f"; routed {task['routes']}"
        )
    print(f"minutes={((time.time() - started) / 60):.1f}")
    print(
        " ".join(f"{k}={v}" for k, v in figures.items())
        + f" own_within_specialist={str(own_ok).lower()} cross_not_below_base={str(cross_ok).lower()}"
    )


if __name__ == "__main__":
    main()
