"""Answer options scored in groups of alike length against one batch padded to the longest option.

Multiple-choice benchmarks scored on their options' texts (biomed's ``mmlu_medical`` and ``medmcqa``)
run each option's tokens on the cached keys and values of its question. Both arms score the same
requests with the embedded model as the evaluate stage builds them (each item's prompt and options,
then the content-free prompts of contextual calibration), alternating, ``--repeats`` times each;
the baseline puts every option of a batch of questions in one batch padded to the longest.

The items are the tasks' own where their data is on this machine (``--data-dir``); otherwise
exam-shaped items cut from the biomed corpus's abstracts (the shipped Medical Abstracts, and the
Hallmarks of Cancer ones where the data directory has them) at the two benchmarks' lengths
(questions of 110-800 characters, options of 1-9 words): their scores mean nothing, their cost is
the benchmarks'.

    python bench/options.py [--items 100] [--repeats 2] [--data-dir DIR]

Last line: ``speedup=<x> grouped_s=<a> padded_s=<b> agree=<share of items with the same choice>
max_logprob_diff=<d> requests=<n> items=<real|exam-shaped>``.
"""

from __future__ import annotations

import argparse
import random
import re
import time
from pathlib import Path

from selfspec_biomed import corpus as biomed_corpus

from selfspec_core.config import load_settings
from selfspec_core.data.tasks import EvalItem, EvalTask
from selfspec_core.eval.scoring import choice_request
from selfspec_core.models import generator as generation
from selfspec_core.models.loading import resolve_model
from selfspec_core.runtime.openmp import choose_wait_policy
from selfspec_core.stages import evaluate as evaluation

TASKS = "mmlu_medical,medmcqa"
# (question characters, option words) of the exams' kinds of question: short recall, vignettes
EXAM_SHAPES = [(110, 2), (130, 5), (220, 7), (330, 6), (800, 3), (100, 2)]


def exam_shaped(data_dir: Path, count: int) -> list[EvalItem]:
    """``count`` four-option items of the exams' lengths, their text cut from the biomed corpus's
    abstracts (the Medical Abstracts ship with the plugin, so there always are some)."""
    rng = random.Random(0)
    text = " ".join(passage.text for passage in (biomed_corpus.passages(data_dir) or [])[:400])
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if 40 < len(s) < 400]
    words = text.split()
    items = []
    for number in range(count):
        chars, option_words = EXAM_SHAPES[number % len(EXAM_SHAPES)]
        question = ""
        while len(question) < chars:
            question += " " + rng.choice(sentences)
        options = []
        for _ in range(4):
            start = rng.randrange(len(words) - 10)
            options.append(" ".join(words[start : start + max(1, option_words + rng.randint(-1, 2))]))
        items.append(
            EvalItem(f"q{number}", "Answer this medicine exam question.", question.strip(), options[0], options)
        )
    return items


def exam_task():
    """The exam-shaped items' task: scored as the exams are (log-likelihood of the options' texts)."""
    return EvalTask("exam_shaped", "biomed", "", lambda path: [], headline="acc_norm")


def main() -> None:
    choose_wait_policy()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100, help="items per task")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    overrides = {"evaluate": {"tasks": TASKS, "cross_domain": False, "max_items": args.items}}
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    settings = load_settings("quick", overrides=overrides)
    _, loaded, _ = evaluation.stage_tasks(settings, "biomed", log=lambda line: None)
    model = resolve_model(None)
    prompts = evaluation.planned_prompts(settings, model, "biomed")
    if loaded:
        kind, tasks = "real", loaded
    else:
        items = exam_shaped(evaluation.resolve_data_dir(settings), args.items)
        task = evaluation.LoadedTask(exam_task(), items, [], items)
        kind, tasks = "exam-shaped", [task]
    posed = [(task, evaluation.pose(task, prompts, settings.evaluate)) for task in tasks]
    requests = []
    for task, asked in posed:
        requests += [choice_request(p, c) for p, item in zip(asked.prompts, task.scored) for c in item.choices]
        requests += list(
            dict.fromkeys(
                choice_request(p, c) for p, item in zip(asked.free_prompts, task.scored) for c in item.choices
            )
        )
    scorer = evaluation.make_generator(settings, model, adapter=None, batch_size=settings.evaluate.batch_size)
    grouped = generation.alike_lengths

    def padded(lengths):
        return grouped(lengths, waste=float("inf"))

    seconds: dict[str, list[float]] = {"grouped": [], "padded": []}
    scores = {}
    for _ in range(args.repeats):
        for arm, rule in (("grouped", grouped), ("padded", padded)):
            generation.alike_lengths = rule
            started = time.perf_counter()
            scores[arm] = scorer.loglikelihood(requests)
            seconds[arm].append(time.perf_counter() - started)
    generation.alike_lengths = grouped
    best = {arm: min(times) for arm, times in seconds.items()}
    diff = max(abs(a[0] - b[0]) for a, b in zip(scores["grouped"], scores["padded"]))
    agree, total = same_choices(posed, requests, scores)
    print(f"{len(requests)} requests from {sum(len(t.scored) for t in tasks)} items ({kind}); seconds {seconds}")
    print(
        f"speedup={best['padded'] / best['grouped']:.2f} grouped_s={best['grouped']:.1f} "
        f"padded_s={best['padded']:.1f} agree={agree / total:.3f} max_logprob_diff={diff:.3f} "
        f"requests={len(requests)} items={kind}"
    )


def same_choices(posed, requests, scores) -> tuple[int, int]:
    """Items whose highest-scoring option (by total log-probability) is the same in both arms."""
    index = {request: number for number, request in enumerate(requests)}
    agree = total = 0
    for task, asked in posed:
        for prompt, item in zip(asked.prompts, task.scored):
            rows = [index[choice_request(prompt, choice)] for choice in item.choices]
            picks = [max(rows, key=lambda row: scores[arm][row][0]) for arm in ("grouped", "padded")]
            agree += picks[0] == picks[1]
            total += 1
    return agree, total


if __name__ == "__main__":
    main()
