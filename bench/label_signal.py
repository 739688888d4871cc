"""Can the model label this task at all? Its self-labels, scored against a benchmark's gold labels.

    python bench/label_signal.py --domain biomed [--task pubmedqa_dev] [--max-items 150] [--model gemma3-270m]

The respond stage labels option tasks by calibrated log-likelihood under the domain's response
template with seed demonstrations. This script labels a benchmark's development items exactly that
way (no retrieval) and compares with the gold labels, before anything is trained: if the calibrated
self-labels are less accurate than always answering the majority label, balanced self-labelled data
can only pull a model that answers the majority away from it. ``auc`` is the mean one-vs-rest AUC of
each label's calibrated margin over the others (0.5: no signal). Last line:
``task=<t> n=<n> majority=<share> raw=<acc> calibrated=<acc> auc=<auc> minutes=<m>``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

from selfspec_core import plugins, quality
from selfspec_core.config import load_settings
from selfspec_core.evaluation import load_tasks
from selfspec_core.generation import make_generator
from selfspec_core.models import resolve_model
from selfspec_core.pipeline import domain_seeds
from selfspec_core.responses import demonstrations
from selfspec_core.templates import PromptTemplate

# Each domain's development split, and the seed task type whose demonstrations pose it.
DEV_TASK = {"biomed": ("pubmedqa_dev", "yesno_qa"), "finance": ("fpb_dev", "sentiment")}
DATA = Path(os.environ.get("SELFSPEC_DATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data")


def one_vs_rest_auc(scores: list[float], positive: list[bool]) -> float | None:
    """Probability that a random positive item outscores a random negative one (ties count half)."""
    ranked = sorted(zip(scores, positive))
    pos = sum(positive)
    neg = len(positive) - pos
    if not pos or not neg:
        return None
    rank_sum, position = 0.0, 0
    while position < len(ranked):  # average ranks over ties
        end = position
        while end < len(ranked) and ranked[end][0] == ranked[position][0]:
            end += 1
        mean_rank = (position + 1 + end) / 2
        rank_sum += mean_rank * sum(1 for _, is_pos in ranked[position:end] if is_pos)
        position = end
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def option_scores(generator, prompts: list[str], options: list[quality.Options]) -> list[list[float]]:
    requests = [r for prompt, opts in zip(prompts, options) for r in quality.option_requests(prompt, opts)]
    results = iter(generator.loglikelihood(requests))
    return [[quality.option_score(*next(results), opts) for _ in opts.keys] for opts in options]


def accuracy(scores: list[list[float]], gold: list[int]) -> float:
    return sum(quality.best_option(row) == g for row, g in zip(scores, gold)) / len(gold)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", required=True, choices=sorted(DEV_TASK))
    parser.add_argument("--task", help="evaluation task to label (default: the domain's development split)")
    parser.add_argument("--task-type", help="seed task type for the demonstrations")
    parser.add_argument("--max-items", type=int, default=150)
    parser.add_argument("--model", help="as selfspec --model (default: the embedded model)")
    parser.add_argument("--content-free", action="store_true", help="also calibrate on a content-free input (twice the time)")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"benchmark data not found at {DATA}: set SELFSPEC_DATA")
    task_name, task_type = DEV_TASK[args.domain]
    task_name, task_type = args.task or task_name, args.task_type or task_type

    started = time.time()
    settings = load_settings("quick", overrides={"model": args.model, "data_dir": str(DATA.resolve()),
                                                 "evaluate": {"max_items": args.max_items}})
    tasks = [t for _, found in plugins.results("evaluation_tasks", domain=args.domain) for t in found if t.name == task_name]
    if not tasks:
        sys.exit(f"domain {args.domain} has no evaluation task {task_name!r}")
    loaded, skipped = load_tasks(tasks, settings, print)
    if not loaded:
        sys.exit(f"task {task_name} could not be loaded: {skipped}")
    items = loaded[0].scored
    domain = plugins.get_domain(args.domain)
    seeds = domain_seeds(args.domain)
    _, template = plugins.first_result("prompt_template", PromptTemplate, domain=args.domain, stage="response")
    context = {"domain": domain.name, "description": domain.description or domain.name}
    generator = make_generator(settings, resolve_model(settings.model), batch_size=settings.respond.batch_size)

    options = [quality.Options("labels", tuple(item.choices), tuple(item.choices)) for item in items]
    demos = [[d.to_dict() for d in demonstrations(seeds, task_type, settings.respond.num_demos,
                                                  random.Random(f"{settings.seed}:{item.id}"))] for item in items]

    def prompts(inputs: list[str]) -> list[str]:
        return [template.render(shown, {"instruction": item.instruction, "input": text, "passages": ""}, **context)
                for item, shown, text in zip(items, demos, inputs)]

    raw = option_scores(generator, prompts([item.input for item in items]), options)
    calibrated = quality.calibrate_scores(raw, [o.group for o in options])
    # Contextual calibration with a content-free input (Zhao et al. 2021): each item's options after
    # the same prompt with the input replaced by "N/A", subtracted; keeps a prior the inputs share.
    free = option_scores(generator, prompts(["N/A"] * len(items)), options) if args.content_free else []
    gold = [item.choices.index(item.answer) for item in items]
    n = len(items)
    majority = Counter(gold).most_common(1)[0][1] / n
    raw_acc, cal_acc = accuracy(raw, gold), accuracy(calibrated, gold)
    predicted = [quality.best_option(row) for row in calibrated]
    labels = items[0].choices
    aucs = {labels[k]: one_vs_rest_auc([quality.margin(row, k) for row in calibrated], [g == k for g in gold])
            for k in range(len(labels))}
    aucs = {label: auc for label, auc in aucs.items() if auc is not None}
    print(f"gold: {dict(Counter(labels[g] for g in gold))}; raw predictions: "
          f"{dict(Counter(labels[quality.best_option(r)] for r in raw))}; calibrated: {dict(Counter(labels[p] for p in predicted))}")
    print(f"per-label AUC (calibrated margin, one vs rest): {', '.join(f'{label} {a:.3f}' for label, a in aucs.items())}")
    if free:
        adjusted = [[r - f for r, f in zip(row, free_row)] for row, free_row in zip(raw, free)]
        print(f"content-free calibration: accuracy {accuracy(adjusted, gold):.3f}, predictions "
              f"{dict(Counter(labels[quality.best_option(r)] for r in adjusted))}")
    print(f"task={task_name} n={n} majority={majority:.3f} raw={raw_acc:.3f} calibrated={cal_acc:.3f} "
          f"auc={sum(aucs.values()) / len(aucs):.3f} minutes={(time.time() - started) / 60:.1f}")


if __name__ == "__main__":
    main()
