"""Two runs' specialized models on the same evaluation items: is the new recipe as good as the old?

    python bench/compare_runs.py OLD_RUN NEW_RUN [--task pubmedqa]

Reads each run's ``evaluate/predictions.jsonl`` and pairs the items both scored (by id), so the
interval is the paired one: each question's difficulty cancels out. For every task both runs scored,
prints accuracy and macro-F1 of the old and the new adapter with the 95% paired bootstrap interval of
the difference (new minus old). A recipe change that saves minutes keeps the result when the interval
holds 0. Last line, for ``--task`` (default: the first shared task): ``task=<t> n=<items>
old=<acc> new=<acc> delta=<d> ci_low=<l> ci_high=<h> macro_f1_old=<x> macro_f1_new=<y>
macro_f1_ci_low=<l> macro_f1_ci_high=<h>``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfspec_core.eval.scoring import compare, compare_macro_f1
from selfspec_core.run.rundir import read_jsonl


def specialized_predictions(run: Path) -> dict[str, dict[str, dict]]:
    """task -> item id -> prediction row of the run's specialized model."""
    rows = read_jsonl(run / "evaluate" / "predictions.jsonl")
    tasks: dict[str, dict[str, dict]] = {}
    for row in rows:
        tasks.setdefault(row["task"], {})[row["id"]] = row
    return tasks


def paired(old: dict[str, dict], new: dict[str, dict]) -> dict:
    """Accuracy and macro-F1 of the specialized model of ``old`` and ``new`` on their shared items."""
    shared = sorted(old.keys() & new.keys())
    if not shared:
        raise SystemExit("the two runs share no scored items")
    scores = compare([old[i]["specialized_score"] for i in shared], [new[i]["specialized_score"] for i in shared])
    f1 = compare_macro_f1(
        [str(old[i]["answer"]) for i in shared],
        [str(old[i]["specialized_prediction"]) for i in shared],
        [str(new[i]["specialized_prediction"]) for i in shared],
    )
    return {"n": len(shared), "accuracy": scores, "macro_f1": f1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="run folder of the recipe before")
    parser.add_argument("new", type=Path, help="run folder of the recipe after")
    parser.add_argument("--task", help="the task of the last line (default: the first shared task)")
    args = parser.parse_args()
    old, new = specialized_predictions(args.old), specialized_predictions(args.new)
    tasks = [task for task in old if task in new]
    if not tasks or (args.task and args.task not in tasks):
        raise SystemExit(f"no shared task {args.task or ''} in {args.old} and {args.new}: shared {tasks}")
    results = {task: paired(old[task], new[task]) for task in tasks}
    for task, result in results.items():
        acc, f1 = result["accuracy"], result["macro_f1"]
        print(
            f"{task} (n={result['n']}): accuracy {acc['base']:.3f} -> {acc['specialized']:.3f} "
            f"[{acc['ci'][0]:+.3f}, {acc['ci'][1]:+.3f}]; macro-F1 {f1['base']:.3f} -> {f1['specialized']:.3f} "
            f"[{f1['ci'][0]:+.3f}, {f1['ci'][1]:+.3f}]"
        )
    task = args.task or tasks[0]
    acc, f1 = results[task]["accuracy"], results[task]["macro_f1"]
    print(
        f"task={task} n={results[task]['n']} old={acc['base']:.3f} new={acc['specialized']:.3f} "
        f"delta={acc['delta']:.3f} ci_low={acc['ci'][0]:.3f} ci_high={acc['ci'][1]:.3f} "
        f"macro_f1_old={f1['base']:.3f} macro_f1_new={f1['specialized']:.3f} "
        f"macro_f1_ci_low={f1['ci'][0]:.3f} macro_f1_ci_high={f1['ci'][1]:.3f}"
    )


if __name__ == "__main__":
    main()
