"""The composed model beside the base, each specialist and two baselines, on every installed domain's tasks.

Baselines, as in Self-MoE: the experts' adapters merged into one by weights (PEFT
``add_weighted_adapter``: ``linear``, an equal-weight average, and ``ties``, TIES-merging with
density 0.5) and one adapter tuned on all the domains' data together (``multitask``, the runs'
training settings). Every model answers the same prompts: a task is posed in the training template
and prompt format of the expert of its domain (the first expert's for a domain without one), as the
single-run evaluation poses every task in its adapter's form.

The composed model routes each item's prompt and answers with the chosen expert, so its item scores
are the chosen model's; each score gets the paired bootstrap interval of its difference from the base
(:func:`selfspec_core.eval.scoring.compare`), the composed model also against its domain's specialist.

Outputs in ``<composed>/eval/``: ``eval.json``, ``predictions.jsonl`` (each item's route and every
model's score), ``report.md``/``report.html`` with one table and one plot; the baselines' adapters in
``<composed>/baselines/``. Model scores are logged as they finish, so a killed evaluation resumes.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from selfspec_core.compose.experts import (
    BASE,
    Expert,
    installed_template_context,
    read_composed,
    route_texts,
    with_experts,
)
from selfspec_core.errors import SelfspecError
from selfspec_core.eval.scoring import compare, macro_f1
from selfspec_core.models.loading import ModelRef, load_model, load_tokenizer, resolve_dtype, resolve_model
from selfspec_core.models.prompting import PromptFormat
from selfspec_core.plugins import manager as plugins
from selfspec_core.run.rundir import RecordLog, atomic_write_json, file_hash, iter_jsonl, write_jsonl
from selfspec_core.stages.evaluate import LoadedTask, collect_tasks, load_tasks, render_prompt, score_model
from selfspec_core.stages.report import Figure, Section, Table, _new_figure, _png, write_report

MERGES = {"merged-linear": {"combination_type": "linear"}, "merged-ties": {"combination_type": "ties", "density": 0.5}}
MULTITASK = "multitask"
COMPOSED = "composed"


def merge_adapters(ref: ModelRef, experts: Sequence[Expert], out: Path, log: Callable[[str], None]) -> dict[str, Path]:
    """The experts' adapters merged by weights, each written as an adapter folder under ``out``."""
    merged = {name: out / name for name in MERGES}
    if all((folder / "adapter_model.safetensors").is_file() for folder in merged.values()):
        return merged
    model = with_experts(load_model(ref, dtype="float32"), experts)
    names = [expert.name for expert in experts]
    made = {}
    for name, options in MERGES.items():
        weights = [1.0 / len(names)] * len(names) if options["combination_type"] == "linear" else [1.0] * len(names)
        try:
            model.add_weighted_adapter(names, weights, name, **options)
        except ValueError as exc:  # e.g. linear merging of adapters of different ranks
            log(f"[compose] {name} skipped: {exc}")
            continue
        staging = out / f"{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(str(staging), selected_adapters=[name])
        shutil.rmtree(merged[name], ignore_errors=True)
        (staging / name).replace(merged[name])  # PEFT writes a named adapter into its own subfolder
        shutil.rmtree(staging, ignore_errors=True)
        made[name] = merged[name]
        log(f"[compose] {name}: {len(names)} adapters merged -> {merged[name]}")
    return made


def train_multitask(ref: ModelRef, experts: Sequence[Expert], settings, out: Path, log: Callable[[str], None]) -> Path:
    """One adapter tuned on every expert's training records together, each in its own template."""
    from selfspec_core.stages.train import encode_example, saved_stats, train_adapter

    formats = {expert.prompt_format for expert in experts}
    if len(formats) > 1:
        raise SelfspecError(
            f"the experts learnt different prompt formats ({', '.join(sorted(formats))}); one adapter tuned "
            "on both would be posed in neither form: train the domains in one train.prompt_format"
        )
    templates = [expert.template for expert in experts]
    adapter = out / "adapter"
    data_hash = file_hash(*[Path(expert.data) for expert in experts])
    if saved_stats(adapter, data_hash) is not None:
        return adapter
    tokenizer = load_tokenizer(ref)
    examples = []
    for expert in experts:
        prompts = expert.prompts(tokenizer)
        examples += [
            encode_example(record, prompts, settings.train.max_length) for record in iter_jsonl(Path(expert.data))
        ]
    log(f"[compose] {MULTITASK}: tuning one adapter on {len(examples)} records of {len(experts)} domains")
    info = {
        "data_file": [expert.data for expert in experts],
        "data_hash": data_hash,
        "prompt_format": formats.pop(),
        # one template when the experts share it; else each domain's, which serve and export refuse
        "prompt_template": templates[0] if all(t == templates[0] for t in templates) else templates,
    }
    train_adapter(
        ref, tokenizer, examples, settings.train, out, settings.seed, resolve_dtype(settings.dtype), info, log
    )
    return adapter


def task_prompt(domain: str, experts: Sequence[Expert], tokenizer) -> PromptFormat:
    """The form a task of ``domain`` is posed in: the one its expert's adapter learnt (format, template
    and the context training filled it with, as serve poses it); a domain without an expert's, in the
    first expert's form filled with the domain's installed context."""
    owner = next((expert for expert in experts if expert.name == domain), None)
    if owner is not None:
        return owner.prompts(tokenizer)
    return replace(experts[0].prompts(tokenizer), context=installed_template_context(domain))


def evaluate_composed(folder: Path, settings, log: Callable[[str], None] = print, baselines: bool = True) -> dict:
    """Score base, specialists, composed and (with ``baselines``) merged and multi-task models; write the report."""
    folder = Path(folder)
    manifest, experts, router = read_composed(folder)
    ref = resolve_model(manifest.get("model"))
    work = folder / "eval"
    work.mkdir(parents=True, exist_ok=True)
    domains = list(plugins.domains()) or [expert.name for expert in experts]
    evaluate = settings.evaluate
    own, others = collect_tasks(domains[0], True, evaluate.tasks, evaluate.modes, evaluate.task_dir)
    loaded, skipped = load_tasks(own + others, settings, log)
    if not loaded:
        reasons = "; ".join(skipped.values()) or "no installed domain registers evaluation tasks"
        raise SelfspecError(f"no evaluation task has data: {reasons}")

    models: dict[str, Path | None] = {BASE: None, **{expert.name: Path(expert.adapter) for expert in experts}}
    if baselines:
        models.update(merge_adapters(ref, experts, folder / "baselines", log))
        try:
            models[MULTITASK] = train_multitask(ref, experts, settings, folder / "baselines" / MULTITASK, log)
        except SelfspecError as exc:  # mixed prompt formats: the other baselines still compare
            log(f"[compose] {MULTITASK} skipped: {exc}")

    cache = RecordLog(work / "scored.jsonl")
    scores: dict[str, dict] = {label: {} for label in models}
    prompts: dict[str, list[str]] = {}
    tokenizer = load_tokenizer(ref)
    for domain in dict.fromkeys(task.task.domain for task in loaded):  # one template per domain: one model load
        group = [task for task in loaded if task.task.domain == domain]
        posed = task_prompt(domain, experts, tokenizer)
        for task in group:
            prompts[task.key] = [render_prompt(posed, item, task.demos) for item in task.scored]
        for label, adapter in models.items():
            scores[label].update(score_model(label, settings, ref, adapter, group, posed, log, cache))

    base_model = load_model(ref, dtype=settings.dtype)
    routes = {task.key: route_texts(base_model, tokenizer, router, prompts[task.key]) for task in loaded}
    del base_model
    expert_names = {expert.name for expert in experts}
    summary, predictions = {}, []
    for task in loaded:
        chosen = routes[task.key]
        scores.setdefault(COMPOSED, {})[task.key] = [scores[label][task.key][i] for i, label in enumerate(chosen)]
        summary[task.key] = task_result(
            task, {label: scores[label][task.key] for label in scores}, chosen, expert_names, settings
        )
        for i, item in enumerate(task.scored):
            predictions.append(
                {
                    "task": task.key,
                    "id": item.id,
                    "answer": item.answer,
                    "route": chosen[i],
                    **{label: scores[label][task.key][i].prediction for label in scores},
                }
            )
    result = {
        "experts": [expert.name for expert in experts],
        "models": list(scores),
        "tasks": summary,
        "routing_accuracy": routing_accuracy(routes, loaded, expert_names),
        "skipped": skipped,
    }
    atomic_write_json(work / "eval.json", result)
    write_jsonl(work / "predictions.jsonl", predictions)
    (work / "scored.jsonl").unlink(missing_ok=True)
    write_report(work, "selfspec: composed experts", [composition_section(result)])
    log(f"[compose] report: {work / 'report.html'}")
    return result


def task_result(task: LoadedTask, scores: dict, chosen: Sequence[str], experts: set[str], settings) -> dict:
    """Each model's score, its paired interval against the base, macro-F1 for choice tasks, and
    the composed model against its domain's specialist."""
    evaluate, seed = settings.evaluate, settings.seed
    base = [s.score for s in scores[BASE]]
    gold = [item.answer.strip() for item in task.scored]
    with_choices = bool(task.scored) and all(item.choices for item in task.scored)
    rows = {}
    for label, values in scores.items():
        row = compare(base, [s.score for s in values], evaluate.bootstrap_samples, seed)
        rows[label] = {"score": row["specialized"], "delta": row["delta"], "ci": row["ci"]}
        if with_choices:
            rows[label]["macro_f1"] = round(macro_f1(gold, [s.prediction.strip() for s in values]), 6)
    result = {
        "domain": task.task.domain,
        "metric": task.task.metric,
        "n": len(task.scored),
        "models": rows,
        "routes": dict(Counter(chosen).most_common()),
    }
    if task.task.domain in experts:
        versus = compare(
            [s.score for s in scores[task.task.domain]],
            [s.score for s in scores[COMPOSED]],
            evaluate.bootstrap_samples,
            seed,
        )
        result["composed_vs_specialist"] = {"delta": versus["delta"], "ci": versus["ci"]}
    return result


def routing_accuracy(routes: dict[str, list[str]], loaded: Sequence[LoadedTask], experts: set[str]) -> dict:
    """Per domain, the share of its benchmark items routed to its expert (to the base for a domain without one)."""
    hits: dict[str, list[bool]] = {}
    for task in loaded:
        want = task.task.domain if task.task.domain in experts else BASE
        hits.setdefault(task.task.domain, []).extend(route == want for route in routes[task.key])
    return {domain: round(sum(flags) / len(flags), 4) for domain, flags in hits.items()}


def composition_section(result: dict) -> Section:
    models = result["models"]
    headers = ["task", "n", "routed to", *models, "composed - specialist (95% CI)"]
    rows = []
    for key, task in result["tasks"].items():
        cells = []
        for label in models:
            row = task["models"][label]
            text = f"{row['score']:.3f}"
            if label != BASE:
                text += f" ({row['delta']:+.3f} [{row['ci'][0]:+.3f}, {row['ci'][1]:+.3f}])"
            if "macro_f1" in row:
                text += f" F1 {row['macro_f1']:.3f}"
            cells.append(text)
        versus = task.get("composed_vs_specialist")
        versus_text = f"{versus['delta']:+.3f} [{versus['ci'][0]:+.3f}, {versus['ci'][1]:+.3f}]" if versus else "-"
        routes = ", ".join(f"{name} {count}" for name, count in task["routes"].items())
        rows.append([key, task["n"], routes, *cells, versus_text])
    accuracy = ", ".join(f"{domain} {share:.3f}" for domain, share in result["routing_accuracy"].items())
    return Section(
        "Composed experts",
        [
            f"Experts: {', '.join(result['experts'])}. "
            "Each cell: score (difference from the base, 95% paired interval); "
            f"F1: macro-F1 for choice tasks. Routing accuracy on benchmark items (own expert, or the base for a domain "
            f"without one): {accuracy}.",
            Table(headers, rows),
            Figure("composition.png", "Score per task and model", composition_plot(result)),
        ],
    )


def composition_plot(result: dict) -> bytes:
    """Grouped bars: every model's score on every task."""
    import numpy as np

    tasks, models = list(result["tasks"]), result["models"]
    figure = _new_figure(max(6.0, 1.6 * len(tasks) + 2), 3.6)
    axes = figure.subplots()
    width = 0.8 / len(models)
    positions = np.arange(len(tasks))
    for number, label in enumerate(models):
        axes.bar(
            positions + (number - (len(models) - 1) / 2) * width,
            [result["tasks"][task]["models"][label]["score"] for task in tasks],
            width,
            label=label,
        )
    axes.set_xticks(positions, tasks, fontsize=8)
    axes.set_ylabel("score")
    axes.legend(fontsize=7, ncol=min(4, len(models)), frameon=False)
    axes.spines[["top", "right"]].set_visible(False)
    return _png(figure)
