"""Which way of picking a log-likelihood answer measures reading? The base model on each domain's dev split.

    python bench/score_variants.py [--domains finance,biomed] [--max-items 300] [--model gemma3-270m]

Scores the base model (default: the embedded one) on the development splits (``fpb_dev``,
``pubmedqa_dev``) as the evaluate stage scores a benchmark: in the prompt form a run would train in
(``train.prompt_format``; ``--prompt-format`` picks another), zero-shot, the seeded subset of
``--max-items`` (the quick profile's 300), one pass for every way of picking in ``CHOICE_SCORES`` plus
the content-free prompts for calibration. Base scores are cached as the stage's
are ($SELFSPEC_CACHE/scores), so a rerun is instant. Per task and way it prints accuracy, macro-F1
(what a move to one label cannot raise) and the share of the most frequent answer (over 0.8: the score
measures a label prior, not reading), and each way's difference from ``acc`` on the same items with
its paired 95% interval; the plugins' ``headline`` settings were chosen from these.
Last line: ``<task>_majority=.. <task>_<way>=<accuracy> <task>_<way>_f1=.. <task>_<way>_top=..
<task>_<way>_f1_vs_acc=<macro-F1 difference> <task>_<way>_f1_vs_acc_low=<its interval's low end> ... minutes=..``.
"""

from __future__ import annotations

import argparse
import sys
import time

from devsplit import DATA, DEV_TASK, dev_split

from selfspec_core.config import load_settings
from selfspec_core.data.tasks import CHOICE_SCORES
from selfspec_core.eval.scoring import compare, rescore
from selfspec_core.models.loading import resolve_model
from selfspec_core.runtime.openmp import choose_wait_policy
from selfspec_core.stages.evaluate import (
    choice_macro_f1,
    score_model,
    task_summary,
)


def main() -> None:
    choose_wait_policy()  # as the selfspec command does, before torch loads
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", default="finance,biomed")
    parser.add_argument("--max-items", type=int, default=300, help="items per dev split (0: all)")
    parser.add_argument("--model", help="as selfspec --model (default: the embedded model)")
    parser.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "alpaca"])
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"benchmark data not found at {DATA}: set SELFSPEC_DATA")

    started = time.time()
    settings = load_settings(
        "quick",
        overrides={
            "model": args.model,
            "train": {"prompt_format": args.prompt_format},
            "data_dir": str(DATA.resolve()),
            "evaluate": {"max_items": args.max_items},
        },
    )
    model = resolve_model(settings.model)
    figures = []
    for domain in [name.strip() for name in args.domains.split(",") if name.strip()]:
        task, prompts = dev_split(domain, settings, model)
        loaded = [task]
        print(f"{DEV_TASK[domain]}: items posed in the {prompts.name} form")
        scores = score_model("base", settings, model, None, loaded, prompts, print)
        summary = task_summary(task, scores[task.key], scores[task.key], settings.evaluate, settings.seed)
        name = task.task.name
        print(
            f"{name}: n={summary['n']}, gold {summary['answers']['gold']}, "
            f"majority {summary['majority']['share']:.3f} (macro-F1 {summary['macro_f1']['majority']:.3f})"
        )
        figures.append(f"{name}_majority={summary['majority']['share']:.3f}")
        by_sum = rescore(task.scored, scores[task.key], "acc", task.task.metric, task.task.tolerance)
        for how in CHOICE_SCORES:
            variant = summary["variants"][how]
            answers = variant["answers"]["base"]
            top = max(answers.values()) / variant["n"]
            print(
                f"  {how:>15}: accuracy {variant['base']:.3f}, macro-F1 {variant['macro_f1']['base']:.3f}, "
                f"top answer share {top:.3f}; answers {answers}"
            )
            figures.append(
                f"{name}_{how}={variant['base']:.3f} {name}_{how}_f1={variant['macro_f1']['base']:.3f} "
                f"{name}_{how}_top={top:.3f}"
            )
            if how == "acc":
                continue
            # the same items picked this way against by the summed log-probability, with paired intervals
            picked = rescore(task.scored, scores[task.key], how, task.task.metric, task.task.tolerance)
            accuracy = compare([s.score for s in by_sum], [s.score for s in picked], seed=settings.seed)
            f1 = choice_macro_f1(task.scored, by_sum, picked, settings.evaluate, settings.seed)
            print(
                f"  {'':>15}  against acc: accuracy {accuracy['delta']:+.3f} {_interval(accuracy['ci'])}, "
                f"macro-F1 {f1['delta']:+.3f} {_interval(f1['ci'])}"
            )
            figures.append(f"{name}_{how}_f1_vs_acc={f1['delta']:.3f} {name}_{how}_f1_vs_acc_low={f1['ci'][0]:.3f}")
    print(f"{' '.join(figures)} minutes={(time.time() - started) / 60:.1f}")


def _interval(ci: list[float]) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


if __name__ == "__main__":
    main()
