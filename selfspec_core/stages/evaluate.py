"""Stage 4: the base and the specialized model on the same benchmark items, side by side.

Tasks come from the ``evaluation_tasks`` hook of the run's domain and, with ``cross_domain``, of
every other installed domain (what specializing costs elsewhere). Items are posed in the prompt
format the adapter was tuned on (its chat template or the training template; ``evaluate.prompt_format``
picks another), to the base as to the specialized model, zero-shot unless ``shots`` is set. Each
task's difference gets a paired bootstrap interval (:mod:`selfspec_core.eval.scoring`).

The stage also checks contamination: generated training records that share a 13-gram with an
evaluation item (GPT-3's decontamination test) would make a gain on that item meaningless. With
``drop_contaminated`` each task is scored without those items, its score on all of them kept beside
(``full``).

Outputs: ``eval.json`` ({task: {metric, mode, base, specialized, delta, ci, n, domain}}, with
``headline`` and ``variants`` for log-likelihood tasks, other domains under ``cross_domain``),
``suite.json`` (the domain's suite: the macro-average of its scored tasks, each weighing the same,
base vs specialized with a paired interval, and the members that could not be scored),
``predictions.jsonl`` and ``contamination.json``. A task whose
data is missing (see :mod:`selfspec_core.data.datasources`) is skipped with one line saying where to put
it, and recorded as skipped.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from selfspec_core.data import catalog, datasources
from selfspec_core.data.tasks import CHOICE_SCORES, METRICS, EvalItem, EvalTask, data_root
from selfspec_core.errors import SelfspecError, did_you_mean
from selfspec_core.eval.scorecache import ScoreCache, score_key
from selfspec_core.eval.scoring import (
    ItemScore,
    compare,
    compare_macro_f1,
    compare_suite,
    parsed_label,
    rescore,
    score_generation,
    score_loglikelihood,
)
from selfspec_core.jsonl import read_rows
from selfspec_core.models.backends import make_generator
from selfspec_core.models.loading import check_adapter, load_tokenizer
from selfspec_core.models.prompting import PromptFormat
from selfspec_core.plugins import manager as plugins
from selfspec_core.run import rounds
from selfspec_core.run.adapter import adapter_prompt_format, adapter_prompts, adapter_training_data, stage_adapter
from selfspec_core.run.rundir import RecordLog, atomic_write_json, read_jsonl, stage_command, write_jsonl
from selfspec_core.templates import PromptTemplate, fill, template_context

_WORD = re.compile(r"\w+")
SUITE_FILE = "suite.json"  # the domain's suite: macro-average of its tasks, base vs specialized


@dataclass
class LoadedTask:
    """A task with its items read: the demonstrations (k-shot) and the items both models answer."""

    task: EvalTask
    items: list[EvalItem]
    demos: list[EvalItem]
    scored: list[EvalItem]

    @property
    def key(self) -> str:
        return f"{self.task.domain}/{self.task.name}"


# ----------------------------------------------------------------------------------------- tasks


def resolve_data_dir(settings) -> Path | None:
    """``settings.data_dir``, else ``$SELFSPEC_DATA``; None when neither is set."""
    return data_root(settings.data_dir)


def collect_tasks(
    domain: str, cross_domain: bool = True, wanted: str = "", modes: str = "", task_dir: str | None = None
) -> tuple[list[EvalTask], list[EvalTask]]:
    """The tasks of ``domain`` and, with ``cross_domain``, those of every other installed domain: the
    plugins' (hooks and task files) and those of the user's ``task_dir`` (``--tasks``).

    ``wanted`` names tasks (comma-separated); empty keeps all but development splits
    (``extra["split"] == "dev"``), which are for tuning defaults, not for reporting. ``modes``
    (comma-separated scoring modes) keeps only tasks scored that way; empty keeps every mode.
    """
    kept_modes = {mode.strip() for mode in modes.split(",") if mode.strip()}
    asked = [domain] + ([name for name in plugins.domains() if name != domain] if cross_domain else [])
    found: dict[tuple[str, str], tuple[str, EvalTask]] = {}
    declared = [pair for name in asked for pair in catalog.domain_tasks(name)]
    declared += [("--tasks", task) for task in (catalog.folder_tasks(task_dir, domain) if task_dir else [])]
    for plugin, task in declared:
        key = (task.domain, task.name)
        if key in found and found[key][0] != plugin:
            raise SelfspecError(
                f"evaluation task {task.name!r} of domain {task.domain!r} is provided by both "
                f"{found[key][0]!r} and {plugin!r}; uninstall one or rename the task"
            )
        found.setdefault(key, (plugin, task))
    names = {name.strip() for name in wanted.split(",") if name.strip()}
    known = sorted({task.name for _, task in found.values()})
    unknown = sorted(names - set(known))
    if unknown:
        raise SelfspecError(
            f"evaluate.tasks names {unknown[0]!r}, which is not a task of {' or '.join(asked)}"
            f"{did_you_mean(unknown[0], known)}; their tasks: {', '.join(known) or 'none'}"
        )
    tasks = [
        task
        for _, task in found.values()
        if (task.name in names if names else task.extra.get("split") != "dev")
        and (task.mode in kept_modes or not kept_modes)
    ]
    own = [t for t in tasks if t.domain == domain]
    others = [t for t in tasks if t.domain != domain] if cross_domain else []
    return own, others


def read_items(task: EvalTask, root: Path | None, log: Callable[[str], None] = print) -> list[EvalItem] | str:
    """Every item of ``task``'s data (data directory, shipped copy or Hub), or why the task is skipped."""
    label = f"task {task.name} ({task.domain})"
    shipped = Path(task.data_file)
    if shipped.is_absolute() and not shipped.is_file():  # a file only the plugin ships: it must be there
        raise SelfspecError(
            f"{label}: {shipped} not found; the plugin's package lacks its evaluation file "
            "(add it to [tool.setuptools.package-data] and reinstall the plugin)"
        )
    found = datasources.find(task.source, root, log)
    if isinstance(found, str):
        return f"{label} skipped: {found}"
    try:
        items = found.read(task.load, task.load_rows)
    except SelfspecError:
        raise
    except Exception as exc:  # a loader meeting a file in another format must say which file
        raise SelfspecError(
            f"{label}: could not read {found.detail} ({type(exc).__name__}: {exc}); "
            "is it the benchmark's original file?"
        ) from exc
    if not isinstance(items, list):
        raise SelfspecError(f"{label}: its loader returned {type(items).__name__}, expected a list of EvalItem")
    for item in items:
        if not isinstance(item, EvalItem):
            raise SelfspecError(f"{label}: its loader returned a {type(item).__name__}, expected EvalItem")
        if task.mode == "loglikelihood" and (
            len(item.choices) < 2 or item.answer.strip() not in [c.strip() for c in item.choices]
        ):
            raise SelfspecError(
                f"{label}: item {item.id!r} is scored by log-likelihood but its answer "
                f"{item.answer!r} is not one of at least two choices {list(item.choices)}"
            )
    if not items:
        return f"{label} skipped: {found.detail} holds no items"
    return items


def cross_domain_scored(others: Sequence[EvalTask], evaluate) -> list[EvalTask]:
    """Other domains' tasks in a scoring mode of ``evaluate.cross_domain_modes`` (all when it is empty)."""
    modes = {mode.strip() for mode in evaluate.cross_domain_modes.split(",") if mode.strip()}
    return [task for task in others if not modes or task.mode in modes]


def item_cap(task: EvalTask, max_items: int, evaluate) -> int:
    """Items to score of ``task`` (0: all): ``max_items``, and for a generation task at most
    ``evaluate.generate_max_items``."""
    if task.mode != "generate" or not evaluate.generate_max_items:
        return max_items
    return min(max_items or evaluate.generate_max_items, evaluate.generate_max_items)


def split_items(task: EvalTask, items: list[EvalItem], shots: int, max_items: int, seed: int) -> LoadedTask:
    """Hold out ``shots`` demonstrations, then score all the rest or a fixed seeded ``max_items`` subset."""
    order = list(range(len(items)))
    random.Random(f"{seed}:{task.domain}/{task.name}").shuffle(order)
    demos = [items[i] for i in order[:shots]]
    rest = order[shots:]
    chosen = sorted(rest[:max_items] if max_items else rest)
    return LoadedTask(task, items, demos, [items[i] for i in chosen])


def load_task(task: EvalTask, max_items: int, settings, log: Callable[[str], None]) -> LoadedTask | str:
    """``task`` read and split, its scored items capped at ``max_items`` (0: all); or why it is skipped."""
    items = read_items(task, resolve_data_dir(settings), log)
    if isinstance(items, str):
        return items
    evaluate = settings.evaluate
    prepared = split_items(task, items, evaluate.shots, item_cap(task, max_items, evaluate), settings.seed)
    if not prepared.scored:
        return f"task {task.name} ({task.domain}) skipped: {len(items)} items, none left after {evaluate.shots} shots"
    return prepared


def load_tasks(
    tasks: Iterable[EvalTask], settings, log: Callable[[str], None], max_items: int | None = None
) -> tuple[list[LoadedTask], dict[str, str]]:
    """Read and split every task whose data is present; the others by key with the reason they were skipped.

    ``max_items`` overrides ``evaluate.max_items`` (the seeded subset is a prefix of the same order,
    so fewer items are a subset of more).
    """
    cap = settings.evaluate.max_items if max_items is None else max_items
    return _load_all([(task, cap) for task in tasks], settings, log)


def _load_all(
    capped: Iterable[tuple[EvalTask, int]], settings, log: Callable[[str], None]
) -> tuple[list[LoadedTask], dict[str, str]]:
    loaded, skipped = [], {}
    for task, max_items in capped:
        prepared = load_task(task, max_items, settings, log)
        if isinstance(prepared, LoadedTask):
            loaded.append(prepared)
        else:
            skipped[f"{task.domain}/{task.name}"] = prepared
            log(f"[evaluate] {prepared}")
    return loaded, skipped


# --------------------------------------------------------------------------------------- scoring


def render_prompt(prompts: PromptFormat, item: EvalItem, demos: Sequence[EvalItem]) -> str:
    """The item in ``prompts``' form, after any demonstrations answered the same way."""

    def record(example: EvalItem) -> dict:
        return {"instruction": example.instruction, "input": example.input, "output": example.answer}

    return prompts.prompt(record(item), [record(demo) for demo in demos])


def evaluation_prompts(settings, model_ref, adapter: Path | None, template: PromptTemplate, context: dict):
    """The form items are posed in (``evaluate.prompt_format``), to base and specialized alike: by
    default the form ``adapter`` learnt, with the template and context it was trained in (as serve and
    the GGUF export pose it), whichever run or domain it came from; without an adapter, the form
    training would pick, in ``template`` and ``context``."""
    chosen = settings.evaluate.prompt_format
    if chosen == "adapter" and adapter is not None:
        learnt = adapter_prompt_format(adapter)
        return adapter_prompts(adapter, load_tokenizer(model_ref) if learnt != "alpaca" else None, context)
    if chosen == "adapter":
        chosen = settings.train.prompt_format
    tokenizer = load_tokenizer(model_ref) if chosen != "alpaca" else None
    return PromptFormat.chosen(chosen, template, tokenizer, context)


def planned_prompts(settings, model_ref, domain: str) -> PromptFormat:
    """The form a run's evaluate stage will pose ``domain``'s items in, said before the run has an
    adapter: ``evaluate.adapter``'s where that folder exists, else training's."""
    adapter = Path(settings.evaluate.adapter) if settings.evaluate.adapter else None
    template = plugins.first_answer("prompt_template", PromptTemplate, domain=domain, stage="train")
    context = template_context(domain, plugins.get_domain(domain).description)
    return evaluation_prompts(settings, model_ref, adapter if adapter and adapter.is_dir() else None, template, context)


def content_free(item: EvalItem) -> EvalItem:
    """The item with its content taken out, for contextual calibration (Zhao et al. 2021): the input
    emptied, the instruction kept as the task's wording; an item without an input carries its content in
    its instruction, so that goes instead."""
    return replace(item, input="") if item.input.strip() else replace(item, instruction="")


def headline_of(task: EvalTask, evaluate) -> str:
    """How ``task``'s answers are picked for its headline: ``evaluate.headline``, else the task's own."""
    return task.headline if evaluate.headline == "task" else evaluate.headline


def answer_stops(template: PromptTemplate, metric: str) -> list[str]:
    """Where a greedy answer ends: a new template section, the next query, or (short answers) a blank line.

    Free text (``rouge_l``) and worked arithmetic (``numeric``) may run over paragraphs, so they keep going.
    """
    opening = fill(template.query, {}).strip().splitlines()
    stops = list(template.stop) + ["\n###"]
    if opening and opening[0][:24].strip():
        stops.append("\n" + opening[0][:24].strip())
    if metric in ("accuracy", "exact_match", "f1"):
        stops.append("\n\n")
    return stops


def scoring_options(task: EvalTask, template: PromptTemplate, evaluate) -> dict:
    """How ``task``'s items are scored, besides the prompts: part of a cached score's key."""
    if task.mode == "loglikelihood":  # every way of picking comes from the same log-probabilities
        return {"mode": task.mode, "metric": task.metric, "tolerance": task.tolerance}
    return {
        "mode": task.mode,
        "metric": task.metric,
        "tolerance": task.tolerance,
        "max_new_tokens": task.max_new_tokens or evaluate.max_new_tokens,
        "stop": answer_stops(template, task.metric),
    }


@dataclass(frozen=True)
class Posed:
    """A task's items as put to a model: their prompts, the content-free prompts contextual
    calibration scores (log-likelihood tasks only) and the scoring options. A base-model score is
    cached under all three (:func:`base_score_key`)."""

    prompts: list[str]
    free_prompts: list[str]
    options: dict


def pose(task: LoadedTask, prompts: PromptFormat, evaluate) -> Posed:
    """``task``'s items in ``prompts``' form, each after the task's demonstrations."""
    return Posed(
        [render_prompt(prompts, item, task.demos) for item in task.scored],
        (
            [render_prompt(prompts, content_free(item), task.demos) for item in task.scored]
            if task.task.mode == "loglikelihood"
            else []
        ),
        scoring_options(task.task, prompts.template, evaluate),
    )


def base_score_key(settings, model_ref, task: LoadedTask, posed: Posed) -> str:
    """The key the base model's scores of ``task``, posed as ``posed``, are cached under."""
    return score_key(settings, model_ref, task.key, posed.prompts + posed.free_prompts, task.scored, posed.options)


def base_scores_cached(settings, model_ref, task: LoadedTask, prompts: PromptFormat) -> bool:
    """Whether an earlier run left the base model's scores of ``task`` in the cache, so a run scores
    only the specialized model on it (``evaluate.cache_base_scores``)."""
    if not settings.evaluate.cache_base_scores:
        return False
    key = base_score_key(settings, model_ref, task, pose(task, prompts, settings.evaluate))
    return ScoreCache().get(key, [item.id for item in task.scored]) is not None


def score_task(generator, loaded: LoadedTask, posed: Posed, seed: int) -> list[ItemScore]:
    options = posed.options
    if options["mode"] == "loglikelihood":
        return score_loglikelihood(
            generator,
            posed.prompts,
            loaded.scored,
            metric=options["metric"],
            content_free_prompts=posed.free_prompts,
            tolerance=options["tolerance"],
        )
    return score_generation(
        generator,
        posed.prompts,
        loaded.scored,
        metric=options["metric"],
        max_new_tokens=options["max_new_tokens"],
        stop=options["stop"],
        tolerance=options["tolerance"],
        seed=seed,
    )


def score_model(
    label: str,
    settings,
    model_ref,
    adapter: Path | None,
    loaded: Sequence[LoadedTask],
    prompts: PromptFormat,
    log: Callable[[str], None],
    cache: RecordLog | None = None,
) -> dict[str, list[ItemScore]]:
    """Every task's item scores for one model; tasks already in ``cache`` (a killed run) are not redone,
    nor, for the base model, tasks scored the same way by any earlier run (``evaluate.cache_base_scores``,
    kept under ``$SELFSPEC_CACHE/scores``).

    The model is loaded only when some task still needs it, and freed when this returns.
    """
    done = {row["task"]: row["items"] for row in (cache.records if cache else []) if row["model"] == label}
    stored = ScoreCache() if adapter is None and settings.evaluate.cache_base_scores else None
    results, generator = {}, None
    for task in loaded:
        ids = [item.id for item in task.scored]
        rows = done.get(task.key)
        if rows is not None and [row["id"] for row in rows] == ids:
            results[task.key] = [ItemScore.from_dict(r) for r in rows]
            continue
        posed = pose(task, prompts, settings.evaluate)
        key = base_score_key(settings, model_ref, task, posed) if stored else ""
        started = time.time()
        scores = stored.get(key, ids) if stored else None
        if scores is None:
            if generator is None:
                generator = make_generator(
                    settings, model_ref, adapter=adapter, batch_size=settings.evaluate.batch_size
                )
            scores = score_task(generator, task, posed, settings.seed)
            if stored:
                stored.put(key, scores)
            source = f"{time.time() - started:.0f}s"
        else:
            source = f"cached in {stored.root}"
        if cache is not None:
            cache.append([{"model": label, "task": task.key, "items": [asdict(s) for s in scores]}])
        metric = task.task.metric
        if task.task.mode == "loglikelihood":  # scores read back may have been picked another way
            how = headline_of(task.task, settings.evaluate)
            scores = rescore(task.scored, scores, how, metric, task.task.tolerance)
            metric = f"{metric} ({how})"
        mean = sum(s.score for s in scores) / len(scores)
        log(f"[evaluate] {label} {task.key}: {metric} {mean:.3f} on {len(scores)} items ({source})")
        results[task.key] = scores
    return results


def chosen_labels(items: Sequence[EvalItem], scores: Sequence[ItemScore]) -> list[str]:
    """The choice each answer gives: the scored choice, or the first choice word in generated text ("" if none)."""
    return [(parsed_label(score.prediction, item.choices) or "").strip() for item, score in zip(items, scores)]


def task_summary(
    loaded: LoadedTask, base: Sequence[ItemScore], specialized: Sequence[ItemScore], evaluate, seed: int
) -> dict:
    """Both models' scores with the paired interval; for a task with fixed choices also the
    always-the-most-common-answer baseline, macro-F1 of the three (with the paired interval of its
    difference) and how often each model gave each answer, since a small model's "gain" in accuracy
    is often only a move to the majority label, which macro-F1 does not reward. A log-likelihood task
    also gets the same figures for every way of picking its answers (``variants``, by
    :data:`~selfspec_core.data.tasks.CHOICE_SCORES`); the top-level ones are its ``headline``'s."""
    task = loaded.task
    summary = {
        "metric": task.metric,
        "mode": task.mode,
        "domain": task.domain,
        **compare([s.score for s in base], [s.score for s in specialized], evaluate.bootstrap_samples, seed),
    }
    if not (loaded.scored and all(item.choices for item in loaded.scored)):
        return summary
    gold = [item.answer.strip() for item in loaded.scored]
    answers = Counter(gold)
    ((answer, count),) = answers.most_common(1)
    summary["majority"] = {"answer": answer, "share": round(count / len(gold), 6)}
    summary["macro_f1"] = choice_macro_f1(loaded.scored, base, specialized, evaluate, seed)
    if task.mode != "loglikelihood":  # generated answers are free text
        return summary
    summary["answers"] = {"gold": dict(answers.most_common()), **answer_counts(base, specialized)}
    summary["headline"] = headline_of(task, evaluate)
    summary["variants"] = {}
    for how in CHOICE_SCORES:
        picked_base, picked_specialized = (
            rescore(loaded.scored, scores, how, task.metric, task.tolerance) for scores in (base, specialized)
        )
        summary["variants"][how] = {
            **compare(
                [s.score for s in picked_base],
                [s.score for s in picked_specialized],
                evaluate.bootstrap_samples,
                seed,
            ),
            "macro_f1": choice_macro_f1(loaded.scored, picked_base, picked_specialized, evaluate, seed),
            "answers": answer_counts(picked_base, picked_specialized),
        }
    return summary


def choice_macro_f1(
    items: Sequence[EvalItem], base: Sequence[ItemScore], specialized: Sequence[ItemScore], evaluate, seed: int
) -> dict:
    """Both models' macro-F1 over the items' gold labels, the majority answer's, and the paired interval."""
    return compare_macro_f1(
        [item.answer.strip() for item in items],
        chosen_labels(items, base),
        chosen_labels(items, specialized),
        evaluate.bootstrap_samples,
        seed,
    )


def answer_counts(base: Sequence[ItemScore], specialized: Sequence[ItemScore]) -> dict:
    """How often each model gave each answer, most frequent first."""
    return {
        "base": dict(Counter(s.prediction for s in base).most_common()),
        "specialized": dict(Counter(s.prediction for s in specialized).most_common()),
    }


def clean_summary(
    loaded: LoadedTask,
    base: Sequence[ItemScore],
    specialized: Sequence[ItemScore],
    touched: set[tuple[str, str]],
    evaluate,
    seed: int,
) -> dict:
    """``evaluate.drop_contaminated``: the task scored without the items a training record overlaps,
    with the score on all items beside it (``full``) and how many were dropped. A gain on an item the
    model was trained on says nothing; when every scored item overlaps, the full score is all there is."""
    keep = [(loaded.key, item.id) not in touched for item in loaded.scored]
    full = task_summary(loaded, base, specialized, evaluate, seed)
    dropped = keep.count(False)
    if not dropped or not any(keep):
        return {**full, "contaminated_dropped": 0, "contaminated_scored": dropped}
    clean = replace(loaded, scored=[item for item, kept in zip(loaded.scored, keep) if kept])
    summary = task_summary(
        clean,
        [s for s, kept in zip(base, keep) if kept],
        [s for s, kept in zip(specialized, keep) if kept],
        evaluate,
        seed,
    )
    summary["full"] = {key: full[key] for key in ("base", "specialized", "delta", "ci", "n")}
    return {**summary, "contaminated_dropped": dropped, "contaminated_scored": 0}


# --------------------------------------------------------------------------------- contamination


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Lowercased ``\\w+`` word n-grams of ``text`` (none when it has fewer than ``n`` words)."""
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def ngram_overlap(texts_a: Iterable[str], texts_b: Iterable[str], n: int = 13) -> set[str]:
    """The word n-grams that occur in both collections, as space-joined strings (empty: no overlap)."""
    grams_a = set().union(*(ngrams(t, n) for t in texts_a))
    grams_b = set().union(*(ngrams(t, n) for t in texts_b))
    return {" ".join(gram) for gram in grams_a & grams_b}


def find_overlaps(train_texts: Sequence[str], eval_texts: Sequence[str], n: int = 13) -> dict[int, set[int]]:
    """``{training index: {evaluation indices it shares an n-gram with}}``, only for overlapping ones."""
    index: dict[tuple[str, ...], list[int]] = {}
    for position, text in enumerate(eval_texts):
        for gram in ngrams(text, n):
            index.setdefault(gram, []).append(position)
    overlaps: dict[int, set[int]] = {}
    for position, text in enumerate(train_texts):
        touched = {hit for gram in ngrams(text, n) for hit in index.get(gram, ())}
        if touched:
            overlaps[position] = touched
    return overlaps


def record_text(record: dict) -> str:
    """What a generated training record teaches: instruction, input and output."""
    return "\n".join(str(record.get(name) or "") for name in ("instruction", "input", "output"))


def item_texts(items: Sequence[EvalItem]) -> list[str]:
    """Each item's benchmark content: input and answer, and the instruction unless items share it.

    An instruction repeated across items is the task's wording ("Classify the sentiment ..."), which
    seeds and generated instructions may echo; it says nothing about having seen the test item.
    """
    repeated = {text for text, count in Counter(item.instruction for item in items).items() if count > 1}
    return [
        "\n".join(
            part for part in ("" if item.instruction in repeated else item.instruction, item.input, item.answer) if part
        )
        for item in items
    ]


def unknown_contamination(adapter: Path, n: int) -> dict:
    """The contamination report of an adapter whose training data cannot be found."""
    return {
        "ngram": n,
        "status": "unknown",
        "training_records": None,
        "overlapping_records": [],
        "tasks": {},
        "reason": f"the training data of {adapter} was not found (it is not a selfspec run's train/adapter "
        "whose respond/data.jsonl is unchanged since training)",
    }


def check_contamination(
    records: Sequence[dict], loaded: Sequence[LoadedTask], n: int
) -> tuple[dict, set[tuple[str, str]]]:
    """The contamination report, and the ``(task key, item id)`` pairs a training record touches."""
    owners, texts = [], []
    for task in loaded:
        owners += [(task, item) for item in task.items]
        texts += item_texts(task.items)
    overlaps = find_overlaps([record_text(r) for r in records], texts, n)
    touched: set[tuple[str, str]] = set()
    by_task: dict[str, set[str]] = {task.key: set() for task in loaded}
    overlapping_records = []
    for record_index, hits in sorted(overlaps.items()):
        record = records[record_index]
        record_id = str(record.get("id", record_index))
        for hit in hits:
            task, item = owners[hit]
            touched.add((task.key, item.id))
            by_task[task.key].add(record_id)
        first = min(hits)
        overlapping_records.append(
            {
                "id": record_id,
                "items": sorted(f"{owners[h][0].key}:{owners[h][1].id}" for h in hits),
                "example": min(ngram_overlap([record_text(record)], [texts[first]], n)),
            }
        )
    tasks = {}
    for task in loaded:
        hit_items = {item_id for key, item_id in touched if key == task.key}
        tasks[task.key] = {
            "domain": task.task.domain,
            "items": len(task.items),
            "items_touched": len(hit_items),
            "share": round(len(hit_items) / len(task.items), 6),
            "scored_items_touched": sum(item.id in hit_items for item in task.scored),
            "too_short": sum(len(_WORD.findall(t.lower())) < n for t in item_texts(task.items)),
            "training_records": sorted(by_task[task.key]),
        }
    report = {
        "ngram": n,
        "status": "checked",
        "training_records": len(records),
        "overlapping_records": overlapping_records,
        "tasks": tasks,
    }
    return report, touched


# ------------------------------------------------------------------------------------------ suite


def in_suite(task: EvalTask) -> bool:
    """Whether ``task`` counts in its domain's suite: every task unless it says ``extra["suite"] = False``
    (another way of scoring a benchmark the suite already has, say)."""
    return task.extra.get("suite", True) is not False


def unscored_members(domain: str, tasks: Sequence[EvalTask], skipped: dict[str, str], evaluate) -> dict[str, str]:
    """The domain's suite members left unscored, each with why: data missing, or a scoring mode that
    ``evaluate.modes`` leaves out (a suite read without them should say so). Tasks left out by name
    (``evaluate.tasks``) were the user's choice and are not listed."""
    own = [task for task in tasks if task.domain == domain and in_suite(task)]
    missing = {task.name: skipped[f"{domain}/{task.name}"] for task in own if f"{domain}/{task.name}" in skipped}
    if evaluate.modes and not evaluate.tasks:
        every, _ = collect_tasks(domain, False, "", "", evaluate.task_dir)
        missing |= {
            task.name: f"scored by {task.mode}, which evaluate.modes={evaluate.modes!r} leaves out"
            for task in every
            if in_suite(task) and task.name not in {chosen.name for chosen in own}
        }
    return missing


def suite_summary(
    members: Sequence[LoadedTask],
    base: dict[str, list[ItemScore]],
    specialized: dict[str, list[ItemScore]],
    summaries: dict[str, dict],
    touched: set[tuple[str, str]],
    missing: dict[str, str],
    samples: int,
    seed: int,
) -> dict | None:
    """The domain's suite: its scored tasks' macro-average, base vs specialized with the paired interval
    (:func:`~selfspec_core.eval.scoring.compare_suite`), each task on the items its own figures count
    (without contaminated ones under ``drop_contaminated``), and the members that could not be scored."""
    if not members:
        return None
    scores = {}
    for task in members:
        pairs = list(zip(base[task.key], specialized[task.key]))
        if summaries[task.task.name].get("contaminated_dropped"):
            pairs = [pair for pair, item in zip(pairs, task.scored) if (task.key, item.id) not in touched]
        scores[task.task.name] = ([b.score for b, _ in pairs], [s.score for _, s in pairs])
    return {**compare_suite(scores, samples, seed), "missing": missing}


# ------------------------------------------------------------------------------------------ stage


def planned_tasks(settings, domain: str) -> list[tuple[EvalTask, int]]:
    """Every task the evaluate stage scores for ``domain``, with the items it scores of each (0: all):
    the domain's own at ``evaluate.max_items``, and with ``cross_domain`` the other domains' tasks in
    ``cross_domain_modes`` at ``cross_domain_max_items``."""
    evaluate = settings.evaluate
    own, others = collect_tasks(domain, evaluate.cross_domain, evaluate.tasks, evaluate.modes, evaluate.task_dir)
    cross_items = evaluate.max_items if evaluate.cross_domain_max_items is None else evaluate.cross_domain_max_items
    return [(task, evaluate.max_items) for task in own] + [
        (task, cross_items) for task in cross_domain_scored(others, evaluate)
    ]


def stage_tasks(
    settings, domain: str, log: Callable[[str], None]
) -> tuple[list[EvalTask], list[LoadedTask], dict[str, str]]:
    """The stage's tasks (:func:`planned_tasks`): all of them, those loaded, and the skipped ones with
    their reasons."""
    planned = planned_tasks(settings, domain)
    if not any(task.domain == domain for task, _ in planned):
        log(f"[evaluate] domain {domain!r} registers no evaluation tasks (hook evaluation_tasks)")
    loaded, skipped = _load_all(planned, settings, log)
    return [task for task, _ in planned], loaded, skipped


def outside_inputs_hash(settings, domain: str) -> str:
    """Hash of the benchmark items the stage would score: edited benchmark files (or another
    ``SELFSPEC_FPB_LEVEL``-style choice a loader makes) make an earlier evaluation stale."""
    _, loaded, _ = stage_tasks(settings, domain, _data_lines_only)
    payload = [[task.key, [asdict(item) for item in task.demos + task.scored]] for task in loaded]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _data_lines_only(line: str) -> None:
    """Say what is fetched from the Hub (and under which licence), the first time it is; drop the
    rest: the stage itself reports skipped tasks when it runs."""
    if line.startswith("[data]"):
        print(line)


def run_stage(ctx) -> dict:
    settings, evaluate = ctx.settings, ctx.settings.evaluate
    adapter = stage_adapter(settings, ctx.run)
    if not adapter.is_dir():
        raise SelfspecError(
            f"{adapter}: no adapter to evaluate; run `{stage_command(ctx.domain.name, 'train', ctx.run.path)}` "
            "or set evaluate.adapter to an adapter folder"
        )
    check_adapter(adapter)
    tasks, loaded, skipped = stage_tasks(settings, ctx.domain.name, ctx.log)

    prompts = evaluation_prompts(settings, ctx.model, adapter, ctx.template("train"), ctx.template_context)
    ctx.log(f"[evaluate] items posed in the {prompts.name} form")
    cache = RecordLog(ctx.work / "scored.jsonl")
    base = score_model("base", settings, ctx.model, None, loaded, prompts, ctx.log, cache)
    specialized = score_model("specialized", settings, ctx.model, adapter, loaded, prompts, ctx.log, cache)

    if evaluate.adapter:
        training_data = adapter_training_data(adapter)
    else:
        ctx.run.require("respond", "data.jsonl")  # the run's own adapter: the data it was tuned on is there
        training_data = rounds.training_data(ctx.run)
    if training_data is None:
        contamination, touched = unknown_contamination(adapter, evaluate.ngram), set()
        ctx.log(f"[evaluate] contamination unknown: {contamination['reason']}")
    else:
        try:
            records = read_jsonl(training_data)
        except ValueError as exc:
            raise SelfspecError(
                f"{training_data}: corrupt training data ({exc}); the contamination check needs it"
            ) from None
        contamination, touched = check_contamination(records, loaded, evaluate.ngram)
        contamination["training_data"] = str(training_data)

    report: dict = {"cross_domain": {}}
    predictions = []
    for task in loaded:
        section = report if task.task.domain == ctx.domain.name else report["cross_domain"]
        section[task.task.name] = summary = (
            clean_summary(task, base[task.key], specialized[task.key], touched, evaluate, settings.seed)
            if evaluate.drop_contaminated
            else task_summary(task, base[task.key], specialized[task.key], evaluate, settings.seed)
        )
        contaminated = (
            f", {summary['contaminated_dropped']} contaminated dropped" if summary.get("contaminated_dropped") else ""
        )
        if summary.get("contaminated_scored"):
            contaminated += f", all {summary['contaminated_scored']} contaminated and still scored: none is clean"
        ctx.log(
            f"[evaluate] {task.key}: base {summary['base']:.3f} -> specialized {summary['specialized']:.3f} "
            f"(delta {summary['delta']:+.3f}, 95% CI [{summary['ci'][0]:+.3f}, {summary['ci'][1]:+.3f}], "
            f"n={summary['n']}{contaminated})"
        )
        for item, b, s in zip(task.scored, base[task.key], specialized[task.key]):
            predictions.append(
                {
                    "task": task.task.name,
                    "domain": task.task.domain,
                    "id": item.id,
                    "answer": item.answer,
                    "contaminated": (task.key, item.id) in touched,
                    "base_prediction": b.prediction,
                    "base_score": b.score,
                    "base_logprobs": list(b.logprobs),
                    "specialized_prediction": s.prediction,
                    "specialized_score": s.score,
                    "specialized_logprobs": list(s.logprobs),
                }
            )
    for task in tasks:
        key = f"{task.domain}/{task.name}"
        if key in skipped:
            section = report if task.domain == ctx.domain.name else report["cross_domain"]
            section[task.name] = {
                "metric": task.metric,
                "mode": task.mode,
                "domain": task.domain,
                "n": 0,
                "skipped": skipped[key],
            }
    for plugin, line in plugins.broken_plugins().items():  # whatever tasks it has went uncollected
        report["cross_domain"][f"plugin {plugin}"] = {"metric": "", "mode": "", "domain": "", "n": 0, "skipped": line}
    members = [task for task in loaded if task.task.domain == ctx.domain.name and in_suite(task.task)]
    missing = unscored_members(ctx.domain.name, tasks, skipped, evaluate)
    suite = suite_summary(
        members, base, specialized, report, touched, missing, evaluate.bootstrap_samples, settings.seed
    )
    if suite is not None:
        not_scored = f"; not scored: {', '.join(missing)}" if missing else ""
        ctx.log(
            f"[evaluate] suite ({', '.join(suite['tasks'])}; macro-average): base {suite['base']:.3f} -> "
            f"specialized {suite['specialized']:.3f} (delta {suite['delta']:+.3f}, 95% CI "
            f"[{suite['ci'][0]:+.3f}, {suite['ci'][1]:+.3f}]{not_scored})"
        )

    atomic_write_json(ctx.work / "eval.json", report)
    if suite is not None:
        atomic_write_json(ctx.work / SUITE_FILE, suite)
    atomic_write_json(ctx.work / "contamination.json", contamination)
    write_jsonl(ctx.work / "predictions.jsonl", predictions)
    (ctx.work / "scored.jsonl").unlink(missing_ok=True)  # predictions.jsonl holds the same, paired
    return {
        "tasks": len(loaded),
        "skipped": len(skipped),
        "items": len(predictions),
        "contaminated_items": len(touched),
        "contaminating_records": len(contamination["overlapping_records"]),
        **({"suite": {key: suite[key] for key in ("base", "specialized", "delta", "ci")}} if suite else {}),
    }


# ---------------------------------------------------------------------------- user evaluation files

EVAL_FILE_FIELDS = ("id", "instruction", "input", "output", "choices")


def read_eval_file(path: Path) -> list[EvalItem]:
    """Rows ``{instruction, input, output, choices?}`` of a JSONL file, with errors naming file:line:field."""
    if not path.is_file():
        raise SelfspecError(f"{path}: evaluation file not found")
    items = []
    for number, row in read_rows(path, expected="an object with fields instruction, input, output, choices"):
        where = f"{path}:{number}"
        for name in row:
            close = difflib.get_close_matches(name, EVAL_FILE_FIELDS, n=1, cutoff=0.75)
            if name not in EVAL_FILE_FIELDS and close:
                raise SelfspecError(f"{where}: field {name!r}: unknown field (did you mean {close[0]!r}?)")
        for name in ("instruction", "output"):
            if not isinstance(row.get(name), str) or not row[name].strip():
                raise SelfspecError(f"{where}: field {name!r}: missing or empty; write it as a non-empty string")
        if not isinstance(row.get("input", ""), str):
            raise SelfspecError(f"{where}: field 'input': expected a string, got {type(row['input']).__name__}")
        choices = row.get("choices") or []
        if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
            raise SelfspecError(f"{where}: field 'choices': expected a list of non-empty strings")
        choices = [c.strip() for c in choices]
        if choices and (len(choices) < 2 or len(set(choices)) != len(choices)):
            raise SelfspecError(f"{where}: field 'choices': needs at least two different choices, got {choices}")
        if choices and row["output"].strip() not in choices:
            raise SelfspecError(
                f"{where}: field 'output': {row['output']!r} is not one of the choices {choices}"
                f"{did_you_mean(row['output'].strip(), choices)}"
            )
        items.append(
            EvalItem(
                str(row.get("id", number)),
                row["instruction"].strip(),
                row.get("input", "").strip(),
                row["output"].strip(),
                tuple(choices),
            )
        )
    if not items:
        raise SelfspecError(
            f"{path}: no rows; write one JSON object per line with instruction, input, output (and choices)"
        )
    return items


def evaluate_file(
    settings,
    eval_file: str | Path,
    metric: str | None = None,
    adapter: str | Path | None = None,
    output: str | Path | None = None,
    domain: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Score a user's JSONL file: rows with ``choices`` by log-likelihood (accuracy), the others by
    greedy generation and ``metric`` (default ``rouge_l``). With an ``adapter``, the base model is
    scored too and each task gets the delta and its 95% paired bootstrap interval.

    Returns ``{task: {metric, mode, n, value[, base, delta, ci]}}``, also written to ``output``.
    """
    from selfspec_core.models.loading import resolve_model

    path = Path(eval_file)
    metric = metric or "rouge_l"
    if metric not in METRICS:
        raise SelfspecError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
    items = read_eval_file(path)
    groups = {"loglikelihood": [i for i in items if i.choices], "generate": [i for i in items if not i.choices]}
    groups = {mode: rows for mode, rows in groups.items() if rows}
    loaded = []
    for mode, rows in groups.items():
        name = path.stem if len(groups) == 1 else f"{path.stem}:{'choices' if mode == 'loglikelihood' else 'generate'}"
        task = EvalTask(
            name,
            domain or "user",
            str(path),
            load=read_eval_file,
            mode=mode,
            metric="accuracy" if mode == "loglikelihood" else metric,
        )
        loaded.append(split_items(task, rows, settings.evaluate.shots, settings.evaluate.max_items, settings.seed))
        if not loaded[-1].scored:
            raise SelfspecError(
                f"{path}: {len(rows)} {mode} rows, none left to score after {settings.evaluate.shots} shots; "
                "lower evaluate.shots"
            )
    template = plugins.first_answer("prompt_template", PromptTemplate, domain=domain or "", stage="train")
    description = plugins.get_domain(domain).description if domain else ""
    context = template_context(domain or "", description)
    model_ref = resolve_model(settings.model)
    adapter = Path(adapter) if adapter else None
    prompts = evaluation_prompts(settings, model_ref, adapter, template, context)
    scored = score_model("specialized" if adapter else "base", settings, model_ref, adapter, loaded, prompts, log)
    base = score_model("base", settings, model_ref, None, loaded, prompts, log) if adapter else None
    results = {}
    for task in loaded:
        scores = scored[task.key]
        entry = {
            "metric": task.task.metric,
            "mode": task.task.mode,
            "n": len(scores),
            "value": round(sum(s.score for s in scores) / len(scores), 6),
        }
        if base is not None:
            summary = task_summary(task, base[task.key], scores, settings.evaluate, settings.seed)
            entry.update(base=summary["base"], delta=summary["delta"], ci=summary["ci"])
        if task.task.mode == "loglikelihood":
            entry["headline"] = headline_of(task.task, settings.evaluate)
        results[task.task.name] = entry
    if output is not None:
        atomic_write_json(Path(output), results)
    return results
