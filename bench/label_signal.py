"""Can the model label this task at all? Its self-labels, scored against a benchmark's gold labels.

    python bench/label_signal.py --domain biomed [--task pubmedqa_dev] [--max-items 150] [--model gemma3-270m]

The respond stage labels option tasks by calibrated log-likelihood under the domain's response
template with seed demonstrations. This script labels a benchmark's development items exactly that
way (no retrieval) and compares with the gold labels, before anything is trained, for each way of
taking the model's label prior out:

- ``raw``: no calibration;
- ``contextual``: each option's mean log-likelihood over the items subtracted (the respond default);
- ``batch``: batch calibration (Zhou et al. 2023): per-item option probabilities, divided by each
  option's mean probability over the items;
- ``domain``: domain-context calibration (Fei et al. 2023): the prior from the same prompts with the
  input replaced by random words of the items' own inputs (``--domain-samples`` of them);
- ``ensemble``: a prompt ensemble (Arora et al. 2022): ``--variants`` demonstration sets, in
  different orders, each batch-calibrated, their log-probabilities averaged.

If the self-labels are less accurate than always answering the majority label, balanced
self-labelled data can only pull a model that answers the majority away from it. ``auc`` is the mean
one-vs-rest AUC of each label's margin over the others (0.5: no signal); ``f1`` the macro-F1. Last
line: ``task=<t> n=<n> majority=<share> <method>_acc=.. <method>_f1=.. <method>_auc=.. ... minutes=<m>``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

from selfspec_core.config import load_settings
from selfspec_core.eval import scoring
from selfspec_core.models.backends import make_generator
from selfspec_core.models.loading import resolve_model
from selfspec_core.plugins import manager as plugins
from selfspec_core.run.pipeline import domain_seeds
from selfspec_core.runtime.openmp import choose_wait_policy
from selfspec_core.stages import checks as quality
from selfspec_core.stages.evaluate import load_tasks
from selfspec_core.stages.respond import demonstrations
from selfspec_core.templates import PromptTemplate, template_context

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


def macro_f1(scores: list[list[float]], gold: list[int], labels: int) -> float:
    """Macro-F1 over all ``labels``, as the evaluate stage computes it."""
    return scoring.macro_f1(gold, [quality.best_option(row) for row in scores], labels=range(labels))


def mean_auc(scores: list[list[float]], gold: list[int], labels: int) -> float:
    aucs = [one_vs_rest_auc([quality.margin(row, k) for row in scores], [g == k for g in gold]) for k in range(labels)]
    aucs = [auc for auc in aucs if auc is not None]
    return sum(aucs) / len(aucs)


def random_inputs(inputs: list[str], count: int, rng: random.Random) -> list[str]:
    """Content-free inputs of the domain: random words of the items' inputs, as long as an average input."""
    words = [word for text in inputs for word in text.split()]
    length = max(1, round(len(words) / len(inputs)))
    return [" ".join(rng.choices(words, k=length)) for _ in range(count)]


def main() -> None:
    choose_wait_policy()  # as the selfspec command does, before torch loads
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", required=True, choices=sorted(DEV_TASK))
    parser.add_argument("--task", help="evaluation task to label (default: the domain's development split)")
    parser.add_argument("--task-type", help="seed task type for the demonstrations")
    parser.add_argument("--max-items", type=int, default=150)
    parser.add_argument("--model", help="as selfspec --model (default: the embedded model)")
    parser.add_argument("--variants", type=int, default=3, help="demonstration sets of the prompt ensemble")
    parser.add_argument(
        "--domain-samples", type=int, default=20, help="random-word inputs for domain-context calibration"
    )
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"benchmark data not found at {DATA}: set SELFSPEC_DATA")
    task_name, task_type = DEV_TASK[args.domain]
    task_name, task_type = args.task or task_name, args.task_type or task_type

    started = time.time()
    settings = load_settings(
        "quick",
        overrides={"model": args.model, "data_dir": str(DATA.resolve()), "evaluate": {"max_items": args.max_items}},
    )
    tasks = [
        t for _, found in plugins.results("evaluation_tasks", domain=args.domain) for t in found if t.name == task_name
    ]
    if not tasks:
        sys.exit(f"domain {args.domain} has no evaluation task {task_name!r}")
    loaded, skipped = load_tasks(tasks, settings, print)
    if not loaded:
        sys.exit(f"task {task_name} could not be loaded: {skipped}")
    items = loaded[0].scored
    domain = plugins.get_domain(args.domain)
    seeds = domain_seeds(args.domain)
    template = plugins.first_answer("prompt_template", PromptTemplate, domain=args.domain, stage="response")
    context = template_context(domain.name, domain.description)
    generator = make_generator(settings, resolve_model(settings.model), batch_size=settings.respond.batch_size)
    options = quality.Options("labels", tuple(items[0].choices), tuple(items[0].choices))
    groups = [options.group] * len(items)

    def demos(variant: int) -> list[list[dict]]:
        suffix = f":{variant}" if variant else ""  # variant 0 is the respond stage's own draw
        return [
            [
                d.to_dict()
                for d in demonstrations(
                    seeds, task_type, settings.respond.num_demos, random.Random(f"{settings.seed}:{item.id}{suffix}")
                )
            ]
            for item in items
        ]

    def scored(shown: list[list[dict]], inputs: list[str], chosen: list) -> list[list[float]]:
        prompts = [
            template.render(d, {"instruction": item.instruction, "input": text, "passages": ""}, **context)
            for item, d, text in zip(chosen, shown, inputs)
        ]
        requests = [r for prompt in prompts for r in quality.option_requests(prompt, options)]
        results = iter(generator.loglikelihood(requests))
        return [[quality.option_score(*next(results), options) for _ in options.keys] for _ in prompts]

    variants = [scored(demos(v), [item.input for item in items], items) for v in range(max(1, args.variants))]
    raw = variants[0]
    rng = random.Random(settings.seed)
    free_items = [rng.choice(items) for _ in range(args.domain_samples)]
    free_demos = [
        [d.to_dict() for d in demonstrations(seeds, task_type, settings.respond.num_demos, rng)] for _ in free_items
    ]
    free = scored(free_demos, random_inputs([item.input for item in items], args.domain_samples, rng), free_items)
    prior = quality.label_prior([quality.log_normalize(row) for row in free], log_space=False)
    batch_variants = [quality.calibrate_scores(v, groups, method="batch") for v in variants]
    methods = {
        "raw": raw,
        "contextual": quality.calibrate_scores(raw, groups),
        "batch": batch_variants[0],
        "domain": [[p - b for p, b in zip(quality.log_normalize(row), prior)] for row in raw],
        "ensemble": [
            [sum(v[i][k] for v in batch_variants) / len(batch_variants) for k in range(len(options.keys))]
            for i in range(len(items))
        ],
    }
    gold = [item.choices.index(item.answer) for item in items]
    labels = items[0].choices
    n = len(items)
    majority = Counter(gold).most_common(1)[0][1] / n
    print(f"gold: {dict(Counter(labels[g] for g in gold))}")
    figures = []
    for name, rows in methods.items():
        predicted = Counter(labels[quality.best_option(row)] for row in rows)
        acc, f1, auc = accuracy(rows, gold), macro_f1(rows, gold, len(labels)), mean_auc(rows, gold, len(labels))
        print(f"{name:>10}: accuracy {acc:.3f}, macro-F1 {f1:.3f}, AUC {auc:.3f}; predictions {dict(predicted)}")
        figures.append(f"{name}_acc={acc:.3f} {name}_f1={f1:.3f} {name}_auc={auc:.3f}")
    print(
        f"task={task_name} n={n} majority={majority:.3f} {' '.join(figures)} minutes={(time.time() - started) / 60:.1f}"
    )


if __name__ == "__main__":
    main()
