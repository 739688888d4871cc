"""Stage 2 (respond): answers to the generated instructions, grounded by BM25 retrieval, checked.

Each instruction is answered from a few-shot prompt of the domain's response template: seed
demonstrations (same task type first) and, when a corpus is available, the top passages BM25 finds
for the instruction and its input. Tasks that state their answer options (yes/no, label lists,
lettered choices, or a task type whose seeds use a closed label set) are answered by calibrated
log-likelihood over the options, so every label is valid; the rest are generated (greedy by
default), cleaned and checked (:mod:`selfspec_core.stages.checks`). Optional self-consistency and a
self-assessment judge filter further; a per-label cap keeps one label from taking over.

Work is done in fixed chunks appended to ``option_scores.jsonl`` and ``responses.jsonl`` in the
stage's folder; a killed run resumes after the last complete chunk and, since chunk composition and
seeds depend only on the inputs and settings, ends with the same ``data.jsonl`` byte for byte.

Tasks mined from the corpus (``generate/mined.jsonl``) already carry the answer their text decides:
they pass the plugins' response filters and join the data as they are, outside the judge and the
label cap (each miner's labels are balanced when it is mined).
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from selfspec_core.data.retrieval import BM25Index, Hit, corpus_hash, resolve_corpus, truncate_passage
from selfspec_core.errors import SelfspecError
from selfspec_core.models.backends import make_generator
from selfspec_core.records import Funnel, Seed, TrainingRecord
from selfspec_core.run.rounds import previous_adapter
from selfspec_core.run.rundir import RecordLog, read_jsonl, stage_command, write_jsonl
from selfspec_core.runtime import logs
from selfspec_core.stages import checks as quality
from selfspec_core.stages.filter import plugin_reason
from selfspec_core.templates import field_labels

if TYPE_CHECKING:
    from rich.progress import Progress

OUTPUT_FILE = "data.jsonl"
DATASET_DIR = "dataset"
OPTION_LOG = "option_scores.jsonl"
RESPONSE_LOG = "responses.jsonl"
CHUNK_BATCHES = 4  # a chunk (the unit of resuming) is this many generation batches
RATIONALE_TOKENS = 48
INSTRUCTION_FIELDS = ("id", "instruction", "input", "task_type")
MINED_FIELDS = (*INSTRUCTION_FIELDS, "output")


@dataclass
class Plan:
    """One instruction ready to answer: its prompts (one per demonstration set), options, passages."""

    record: dict
    prompts: list[str]
    demo_ids: list[str]
    retrieved: list[dict]
    options: quality.Options | None
    label: int | None = None  # the chosen option, for option answers
    confidence: float | None = None
    agreement: float | None = None
    drop: str | None = None
    output: str = ""

    @property
    def id(self) -> str:
        return self.record["id"]


def run_stage(ctx) -> dict:
    settings = ctx.settings.respond
    _check_settings(settings)
    rerun = stage_command(ctx.domain.name, "generate", ctx.run.path)
    mined = _read_records(ctx.run.require("generate", "mined.jsonl"), MINED_FIELDS, rerun)
    records = _read_records(ctx.run.require("generate", "instructions.jsonl"), INSTRUCTION_FIELDS, rerun)
    if not records and not mined:
        raise SelfspecError(
            f"{ctx.run.stage_dir('generate')} has no instructions and no mined tasks; raise "
            f"generate.max_rounds and rerun `{rerun} --force`"
        )
    funnel = Funnel(generated=len(records) + len(mined))
    hits, retrieval_stats = _retrieve(ctx, records)
    generator = make_generator(
        ctx.settings, ctx.model, adapter=previous_adapter(ctx.run), batch_size=settings.batch_size
    )
    plans = _plans(ctx, records, hits, getattr(generator, "tokenizer", None))
    chunk_size = settings.batch_size * CHUNK_BATCHES
    if settings.min_relevance > 0 and hits is not None:
        for plan, row in zip(plans, hits):
            if not row or row[0].score < settings.min_relevance:
                plan.drop = "off_domain"
    answering = [plan for plan in plans if plan.drop is None]
    with logs.progress_bar("respond") as bar:
        if settings.option_answers:
            option_plans = [plan for plan in answering if plan.options is not None]
            task = bar.add_task("scoring options", total=len(option_plans))
            scored = _run_chunks(
                ctx.work / OPTION_LOG,
                option_plans,
                chunk_size,
                lambda chunk, number: _score_options(generator, chunk),
                bar,
                task,
            )
            _choose_options(option_plans, scored, settings)
        for plan in plans:  # drops decided before answering; answering's own are in its records
            if plan.drop is not None:
                funnel.drop(plan.drop)
        answering = [plan for plan in answering if plan.drop is None]
        task = bar.add_task("answering", total=len(answering))
        answered = _run_chunks(ctx.work / RESPONSE_LOG, answering, chunk_size, Answerer(ctx, generator), bar, task)
    counts = _finish(ctx, answered, _filter_mined(ctx, mined), funnel)
    counts["retrieval"] = retrieval_stats
    return counts


def _check_settings(settings) -> None:
    for name in ("batch_size", "max_new_tokens"):
        if getattr(settings, name) < 1:
            raise SelfspecError(f"respond.{name} must be at least 1, got {getattr(settings, name)}")


def _read_records(path: Path, fields: tuple[str, ...], rerun: str) -> list[dict]:
    """The generate stage's records of one file; ``rerun`` is the command that writes them again."""
    try:
        records = read_jsonl(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SelfspecError(f"{path}: corrupt file ({exc}); rerun `{rerun} --force`") from None
    for number, record in enumerate(records, start=1):
        missing = [name for name in fields if not isinstance(record.get(name), str)]
        if missing:
            raise SelfspecError(
                f"{path}:{number}: field {missing[0]!r} is missing or not text; rerun `{rerun} --force`"
            )
    return records


def _filter_mined(ctx, mined: list[dict]) -> list[dict]:
    """Mined tasks as training records, each with the plugins' response filters' verdict in ``drop``."""
    records = []
    for task in mined:
        record = TrainingRecord(
            id=task["id"],
            instruction=task["instruction"],
            input=task.get("input", ""),
            output=task["output"],
            task_type=task["task_type"],
            source="mined",
            answer="mined",
            options=task.get("options"),
            label=task.get("label"),
            miner=task.get("miner"),
            doc_id=task.get("doc_id"),
        ).to_dict()
        record["drop"] = plugin_reason(ctx.domain.name, "response", record)
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------
# Retrieval and prompts


def outside_inputs_hash(settings, domain: str) -> str:
    """The content hash of the corpus the answers are grounded in: another corpus makes them stale."""
    if not settings.respond.retrieval and settings.respond.min_relevance <= 0:
        return ""
    # a skipped document is reported once, when the stage reads the corpus to answer
    corpus = resolve_corpus(settings.corpus, domain, settings.data_dir, warn=lambda message: None)
    return corpus_hash(corpus[0]) if corpus is not None else ""


def _query(record: dict) -> str:
    return f"{record['instruction']}\n{record.get('input', '')}".strip()


def _retrieve(ctx, records: list[dict]) -> tuple[list[list[Hit]] | None, dict]:
    """Passages for every instruction (when retrieval or the relevance check needs them), and stats."""
    settings = ctx.settings.respond
    if not records or (not settings.retrieval and settings.min_relevance <= 0):
        return None, {}
    skipped: list[str] = []

    def warn(message: str) -> None:
        skipped.append(message)
        ctx.log(f"[respond] warning: {message}")

    corpus = resolve_corpus(ctx.settings.corpus, ctx.domain.name, ctx.settings.data_dir, warn)
    if corpus is None:
        ctx.log(
            f"[respond] no retrieval corpus for domain {ctx.domain.name!r}: answers are not grounded. Add one "
            "with --corpus PATH (a file or folder of .jsonl/.txt/.parquet/.csv data or .pdf/.docx/.html/.md "
            "documents), or put the domain's corpus in the "
            "data dir (--data-dir)"
        )
        return None, {}
    passages, source = corpus
    index = BM25Index.open(passages)
    hits = index.search([_query(r) for r in records], max(settings.top_k, 1))
    tops = [row[0].score if row else 0.0 for row in hits]
    grounded = sum(1 for row in hits if row) if settings.retrieval and settings.top_k > 0 else 0
    documents = len({re.sub(r"#\d+$", "", p.id) for p in passages})
    ctx.log(
        f"[respond] BM25 over {len(passages)} passages of {documents} documents from {source} "
        f"({'loaded from cache' if index.from_cache else 'index built'})"
    )
    return hits, {
        "corpus": source,
        "documents": documents,
        "passages": len(passages),
        "index_from_cache": index.from_cache,
        "mean_top_score": round(sum(tops) / len(tops), 4),
        "share_with_retrieval": round(grounded / len(records), 4),
        "grounded": settings.retrieval,
        "document_warnings": skipped,
    }


def _plans(ctx, records: list[dict], hits: list[list[Hit]] | None, tokenizer) -> list[Plan]:
    settings = ctx.settings.respond
    template = ctx.template("response")
    task_labels = quality.task_label_sets(ctx.seeds)
    variants = settings.consistency_samples if settings.option_answers else 1
    plans = []
    for number, record in enumerate(records):
        shown = hits[number][: settings.top_k] if hits is not None and settings.retrieval else []
        passages = "\n".join(
            truncate_passage(
                f"{h.passage.title}: {h.passage.text}" if h.passage.title else h.passage.text,
                settings.passage_tokens,
                tokenizer,
            )
            for h in shown
        )
        options = quality.extract_options(
            record["instruction"], record.get("input", ""), task_labels.get(record["task_type"], ())
        )
        query = {"instruction": record["instruction"], "input": record.get("input", ""), "passages": passages}
        prompts, demo_ids = [], []
        for variant in range(variants if options is not None else 1):
            rng = random.Random(f"{ctx.settings.seed}:{record['id']}:{variant}")
            demos = demonstrations(ctx.seeds, record["task_type"], settings.num_demos, rng)
            prompts.append(template.render([d.to_dict() for d in demos], query, **ctx.template_context))
            demo_ids = demo_ids or [d.id for d in demos]
        retrieved = [
            {
                "doc_id": h.passage.id,
                "score": round(h.score, 4),
                **({"source": h.passage.source} if h.passage.source else {}),
            }
            for h in shown
        ]
        plans.append(Plan(record, prompts, demo_ids, retrieved, options))
    return plans


def demonstrations(seeds: Sequence[Seed], task_type: str, count: int, rng: random.Random) -> list[Seed]:
    """``count`` seeds, those of ``task_type`` first; they go last in the prompt, next to the query."""
    same = [s for s in seeds if s.task_type == task_type]
    other = [s for s in seeds if s.task_type != task_type]
    rng.shuffle(same)
    rng.shuffle(other)
    chosen = (same + other)[:count]
    return chosen[::-1]


def response_stops(template) -> list[str]:
    """Where an answer ends: the template's separator, or a line starting a new field ("Instruction:")."""
    labels = field_labels(template.example) + field_labels(template.query)
    return list(dict.fromkeys(list(template.stop) + [f"\n{label}" for label in labels]))


# ---------------------------------------------------------------------------------------------
# Chunked, resumable work


def _run_chunks(
    path: Path, plans: list[Plan], size: int, work: Callable[[list[Plan], int], list[dict]], bar: Progress, task
) -> list[dict]:
    """``work`` on fixed chunks of ``plans`` (one record per plan), appended to a RecordLog.

    After a kill, the log is cut back to its last complete chunk and the run goes on from there, so
    every chunk is always computed whole, in the same batches, with the same seed.
    """
    log = RecordLog(path)
    done = len(log.records)
    if [r["id"] for r in log.records] != [plan.id for plan in plans[:done]]:
        raise SelfspecError(f"{path} does not belong to these instructions; delete {path.parent} and rerun")
    complete = done if done == len(plans) else done - done % size
    if complete != done:
        write_jsonl(path, log.records[:complete])
        log = RecordLog(path)
    bar.update(task, completed=complete)
    for start in range(complete, len(plans), size):
        log.append(work(plans[start : start + size], start // size))
        bar.update(task, completed=len(log.records))
    return log.records


# ---------------------------------------------------------------------------------------------
# Option answers


def _score_options(generator, chunk: list[Plan]) -> list[dict]:
    """Log-likelihood of every option after every prompt of each plan."""
    requests = [
        request
        for plan in chunk
        for prompt in plan.prompts
        for request in quality.option_requests(prompt, plan.options)
    ]
    results = iter(generator.loglikelihood(requests))
    scored = []
    for plan in chunk:
        variants = []
        for _ in plan.prompts:
            variants.append([quality.option_score(*next(results), plan.options) for _ in plan.options.keys])
        scored.append({"id": plan.id, "scores": variants})
    return scored


def _choose_options(plans: list[Plan], scored: list[dict], settings) -> None:
    """Calibrated choice per demonstration set, then the majority over the sets."""
    groups = [plan.options.group for plan in plans]
    variants = len(scored[0]["scores"]) if scored else 0
    adjusted = [
        quality.calibrate_scores([r["scores"][v] for r in scored], groups, settings.calibrate, settings.calibration)
        for v in range(variants)
    ]
    for number, plan in enumerate(plans):
        rows = [adjusted[v][number] for v in range(variants)]
        votes = [quality.best_option(row) for row in rows]
        chosen, agreement = quality.majority(votes)
        plan.label = chosen
        plan.confidence = round(sum(quality.margin(row, chosen) for row in rows) / len(rows), 4)
        if variants > 1:
            plan.agreement = round(agreement, 4)
            if agreement < settings.consistency_min_agreement:
                plan.drop = "inconsistent"


# ---------------------------------------------------------------------------------------------
# Generated answers


class Answerer:
    """Answers chunks of plans: option labels as chosen, the rest generated and checked, then judged."""

    def __init__(self, ctx, generator):
        self.ctx = ctx
        self.settings = ctx.settings.respond
        self.generator = generator
        self.stops = response_stops(ctx.template("response"))
        self.judge_template = ctx.template("judge") if self.settings.judge else None
        self.checks = quality.parse_checks(self.settings.response_checks)
        self.language = quality.language_of(" ".join(f"{s.instruction} {s.output}" for s in ctx.seeds))

    def __call__(self, chunk: list[Plan], number: int) -> list[dict]:
        seed = self.ctx.settings.seed * 100_000 + number
        labelled = [plan for plan in chunk if plan.label is not None]
        self._generate([plan for plan in chunk if plan.label is None], seed)
        for plan in labelled:
            plan.output = plan.options.texts[plan.label]
        if self.settings.rationale and labelled:
            self._add_rationales(labelled, seed)
        records = [_record(plan) for plan in chunk]
        for record in records:
            if record["drop"] is None:
                record["drop"] = plugin_reason(self.ctx.domain.name, "response", record)
        if self.judge_template is not None:
            judged = [r for r in records if r["drop"] is None]
            scores = quality.judge_scores(self.generator, self.judge_template, judged, self.ctx.template_context)
            for record, score in zip(judged, scores):
                record["judge_score"] = round(score, 4)
        return records

    def _problem(self, plan: Plan, text: str, finished: bool) -> str | None:
        return quality.response_problem(
            text, finished, plan.record["instruction"], plan.record.get("input", ""), self.checks, self.language
        )

    def _generate(self, plans: list[Plan], seed: int) -> None:
        """Greedy (or ``temperature``) answers, plus samples for self-consistency; the most central usable one."""
        if not plans:
            return
        settings = self.settings
        prompts = [plan.prompts[0] for plan in plans]
        first = self.generator.generate(
            prompts,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            stop=self.stops,
            seed=seed,
        )
        extra = settings.consistency_samples - 1
        sampled = (
            self.generator.generate(
                [p for p in prompts for _ in range(extra)],
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.consistency_temperature,
                stop=self.stops,
                seed=seed + 1,
            )
            if extra
            else []
        )
        for number, plan in enumerate(plans):
            completions = [first[number]] + sampled[number * extra : (number + 1) * extra]
            texts = [quality.clean_response(c.text) for c in completions]
            problems = [self._problem(plan, text, c.finished) for text, c in zip(texts, completions)]
            usable = [n for n, problem in enumerate(problems) if problem is None]
            if not usable:
                plan.drop, plan.output = problems[0], texts[0]
                continue
            chosen, agreement = quality.most_central(texts, usable)
            plan.output = texts[chosen]
            if extra:
                plan.agreement = round(agreement, 4)
                if agreement < settings.consistency_min_rouge:
                    plan.drop = "inconsistent"
            if plan.options is not None:  # an option task answered in free text: read the label back
                plan.label = quality.match_option(plan.output, plan.options)

    def _add_rationales(self, plans: list[Plan], seed: int) -> None:
        """A short generated reason after each chosen option; an unusable reason is left out, not the record."""
        prompts = [f"{plan.prompts[0]} {plan.output}." for plan in plans]
        completions = self.generator.generate(
            prompts, max_new_tokens=RATIONALE_TOKENS, temperature=0.0, stop=self.stops + ["\n"], seed=seed
        )
        for plan, completion in zip(plans, completions):
            reason = quality.clean_response(completion.text)
            if self._problem(plan, reason, completion.finished) is None:
                plan.output = f"{plan.output}. {reason}"


def _record(plan: Plan) -> dict:
    record = plan.record
    return TrainingRecord(
        id=plan.id,
        instruction=record["instruction"],
        input=record.get("input", ""),
        output=plan.output,
        task_type=record["task_type"],
        source="generated",
        answer="options" if plan.options is not None and plan.confidence is not None else "generated",
        seed_ids=list(record.get("seed_ids", [])),
        demo_ids=plan.demo_ids,
        retrieved=plan.retrieved,
        options=list(plan.options.keys) if plan.options is not None else None,
        label=plan.options.keys[plan.label] if plan.options is not None and plan.label is not None else None,
        confidence=plan.confidence,
        agreement=plan.agreement,
        drop=plan.drop,
    ).to_dict()


# ---------------------------------------------------------------------------------------------
# The finished data set


def _finish(ctx, answered: list[dict], mined: list[dict], funnel: Funnel) -> dict:
    """Judge selection and label cap over the generated records, the mined ones added, then
    ``data.jsonl`` and the Arrow dataset."""
    settings = ctx.settings.respond
    for record in answered + mined:
        if record["drop"] is not None:
            funnel.drop(record["drop"])
    kept = [record for record in answered if record["drop"] is None]
    judge_scores = [record["judge_score"] for record in kept] if settings.judge else []
    if settings.judge:
        kept = _apply(kept, quality.top_fraction(judge_scores, settings.judge_keep_fraction), "judge", funnel)
    labels = [_group_label(record) for record in kept]
    keep = quality.cap_labels(
        labels, [r["confidence"] if r["confidence"] is not None else 0.0 for r in kept], settings.max_label_share
    )
    kept = _apply(kept, keep, "label_cap", funnel) + [record for record in mined if record["drop"] is None]
    funnel.kept = len(kept)
    if not kept:
        raise SelfspecError(
            f"no response passed the checks ({funnel.to_dict()['dropped']}); use a larger --model, "
            "or switch off the check that dropped most in [respond] (e.g. response_checks)"
        )
    data = [{k: v for k, v in record.items() if k != "drop"} for record in kept]
    write_jsonl(ctx.work / OUTPUT_FILE, data)
    _save_dataset(data, ctx.work / DATASET_DIR)
    option_records = [r for r in data if r["options"] is not None]
    distribution = quality.label_shares([_group_label(r) for r in data])
    counts = {
        "funnel": funnel.to_dict(),
        "answers": {
            "options": sum(r["answer"] == "options" for r in data),
            "generated": sum(r["answer"] == "generated" for r in data),
            "mined": sum(r["answer"] == "mined" for r in data),
        },
        "option_records": len(option_records),
        "valid_labels": round(sum(r["label"] is not None for r in option_records) / len(option_records), 4)
        if option_records
        else None,
        "label_distribution": distribution,
        "max_label_share": round(quality.max_label_share(distribution), 4),
        "checks": sorted(quality.parse_checks(settings.response_checks)),
        "sources": {source: sum(r["source"] == source for r in data) for source in ("generated", "mined")},
        "judge_scores": judge_scores,
    }
    agreements = [r["agreement"] for r in data if r["agreement"] is not None]
    if agreements:
        counts["mean_agreement"] = round(sum(agreements) / len(agreements), 4)
    ctx.log(
        f"[respond] {funnel.kept} of {funnel.generated} instructions answered; dropped: "
        f"{', '.join(f'{k} {v}' for k, v in sorted(funnel.dropped.items())) or 'none'}"
    )
    return counts


def _group_label(record: dict) -> tuple[str, str] | None:
    if record["options"] is None or record["label"] is None:
        return None
    return "/".join(record["options"]), record["label"]


def _apply(records: list[dict], keep: list[bool], reason: str, funnel: Funnel) -> list[dict]:
    for flag in keep:
        if not flag:
            funnel.drop(reason)
    return [record for record, flag in zip(records, keep) if flag]


def _save_dataset(data: list[dict], folder: Path) -> None:
    import datasets

    shutil.rmtree(folder, ignore_errors=True)
    datasets.Dataset.from_list(data).save_to_disk(str(folder))
