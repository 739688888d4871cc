"""Do rounds of self-specialization help? Each round's adapter scored on the domain's development split.

    python bench/rounds.py --domain biomed [--rounds 2] [--profile quick] [--out runs/bench-rounds-biomed]

Runs ``selfspec --domain <d> --profile <p> --out <dir> run --rounds N`` as a user would (a finished
run directory is reused, so ``--out`` of a ``bench/quality.py`` run makes round 1 free), then scores
every round's adapter against the base on the development split (``pubmedqa_dev``, ``fpb_dev``; never
the test items) with ``selfspec evaluate`` in a folder of its own per round, and pairs each round after
the first with round 1 on the same items (``bench/compare_runs.py``).

Last line: ``round1_dev_acc=<a> round1_dev_macro_f1=<f> round2_dev_acc=... round2_vs_1_acc_ci_low=<l>
round2_vs_1_acc_ci_high=<h> round2_vs_1_macro_f1_ci_low=<l> ... minutes=<m>`` (minutes: the rounds'
pipeline stages, the dev scoring aside).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from compare_runs import paired, specialized_predictions
from devsplit import DEV_TASK
from quality import DATA, selfspec

from selfspec_core.config import PROFILES
from selfspec_core.run.rounds import round_run
from selfspec_core.run.rundir import STAGES, RunDir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", required=True, choices=sorted(DEV_TASK))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile", default="quick", choices=list(PROFILES))
    parser.add_argument("--out", help="run directory (default runs/bench-rounds-<domain>-<profile>)")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"benchmark data not found at {DATA}: set SELFSPEC_DATA")
    out = Path(args.out or f"runs/bench-rounds-{args.domain}-{args.profile}")
    selfspec(args.domain, args.profile, out, None, "run", "--rounds", str(args.rounds))

    first, task = RunDir(out, args.domain).open(), DEV_TASK[args.domain]
    figures, minutes, scored = [], 0.0, {}
    for number in range(1, args.rounds + 1):
        run = round_run(first, number)
        minutes += sum((run.manifest(stage) or {}).get("seconds", 0) for stage in STAGES) / 60
        dev = out.parent / f"{out.name}-dev-round-{number}"
        config = out.parent / f"{out.name}-dev-round-{number}.yaml"
        settings = {"adapter": str(run.stage_dir("train") / "adapter"), "tasks": task, "cross_domain": False}
        config.write_text(yaml.safe_dump({"evaluate": settings}))
        selfspec(args.domain, args.profile, dev, config, "evaluate")
        row = json.loads((dev / "evaluate" / "eval.json").read_text())[task]
        f1 = row["macro_f1"]
        records = (run.manifest("train") or {}).get("examples")
        print(
            f"round {number} ({records} records): {task} accuracy {row['base']:.3f} -> {row['specialized']:.3f} "
            f"[{row['ci'][0]:+.3f}, {row['ci'][1]:+.3f}], macro-F1 {f1['base']:.3f} -> {f1['specialized']:.3f} "
            f"[{f1['ci'][0]:+.3f}, {f1['ci'][1]:+.3f}]"
        )
        figures.append(
            f"round{number}_dev_acc={row['specialized']:.3f} round{number}_dev_macro_f1={f1['specialized']:.3f}"
        )
        scored[number] = specialized_predictions(dev)[task]
        if number > 1:
            against = paired(scored[1], scored[number])
            acc, macro = against["accuracy"], against["macro_f1"]
            print(
                f"  against round 1 on the same items: accuracy {acc['delta']:+.3f} [{acc['ci'][0]:+.3f}, "
                f"{acc['ci'][1]:+.3f}], macro-F1 {macro['delta']:+.3f} [{macro['ci'][0]:+.3f}, {macro['ci'][1]:+.3f}]"
            )
            figures.append(
                f"round{number}_vs_1_acc_ci_low={acc['ci'][0]:.3f} round{number}_vs_1_acc_ci_high={acc['ci'][1]:.3f} "
                f"round{number}_vs_1_macro_f1_ci_low={macro['ci'][0]:.3f} "
                f"round{number}_vs_1_macro_f1_ci_high={macro['ci'][1]:.3f}"
            )
    print(f"{' '.join(figures)} minutes={minutes:.1f}")


if __name__ == "__main__":
    main()
