"""Training tasks mined from the domain corpus, each answered by the text itself (AdaptLLM-style).

A model's own labels carry little signal at small scale; the domain text carries its own: an
author who writes "due to" states a cause, a report that says "net sales increased" is good news, a
table's cells decide whether a figure rose. A *miner* is a plain function over the corpus's
documents that returns tasks whose answer such a pattern decides. The core's generic miners live
here; domain plugins add theirs through the ``task_miners`` hook (a plugin's miner replaces a
core miner of the same name, and a domain registered with ``core_miners=False`` gets none of the
core's). ``bench/miners.py`` measures each miner's precision on text whose truth is known; only a
miner measured at ``MIN_PRECISION`` or better runs by default (``generate.miners`` picks others).

The generate stage asks for ``generate.num_mined`` records from here, shared over the miners that
found something in proportion to their ``weight``, each one's labels balanced (or, as its
``label_prior`` asks, kept nearer the proportions the corpus has them in), and writes
them to ``mined.jsonl`` (``source: "mined"``, ``miner``) beside the generated instructions.
"""

from __future__ import annotations

import random
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from selfspec_core.data.retrieval import Passage, resolve_corpus
from selfspec_core.errors import SelfspecError
from selfspec_core.plugins import manager as plugins
from selfspec_core.records import Domain

OUTPUT_FILE = "mined.jsonl"
MIN_PRECISION = 0.9
TASK_FIELDS = ("instruction", "output", "task_type")

# A sentence ends at . ! or ? followed by space and a capital, digit or quote; "e.g. x", "Fig. 2"
# and "U.S. sales" do not end one (a lower-case word follows, or a known abbreviation precedes).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_ABBREVIATION = re.compile(r"\b(?:e\.g|i\.e|etc|vs|al|Fig|Figs|No|Dr|Mr|Mrs|Ms|Inc|Ltd|Co|Corp|St|approx|U\.S|U\.K)\.$")


@dataclass(frozen=True)
class Miner:
    """A named miner: ``mine(documents, rng)`` returns task dicts.

    Each task has ``instruction``, ``input``, ``output`` and ``task_type``, and may have ``label``
    (the answer among ``options``, so labels can be balanced) and ``doc_id`` (where it was found).
    ``precision`` is what ``bench/miners.py`` measured on known truth (``None``: not measurable).
    ``weight`` is the miner's share of the mined records relative to the domain's other miners: a
    skill that needs many examples to learn (a three-way label) gets more than one a few teach.
    ``label_prior`` is how much of the corpus's own label proportions its sample keeps: each label's
    share goes as (tasks found with it) ** ``label_prior``, so 0 balances the labels, 1 keeps them as
    found and 0.5 (square roots) lies between. Balanced labels teach the cue and not a label's share;
    where the corpus's proportions are the domain's (a literature's findings are mostly positive),
    some of them keeps the tuned model from answering the rarer labels more than the domain does.
    A miner reports what it skipped (a table without numbers) with ``warnings.warn``: one line each.
    """

    name: str
    mine: Callable[[Sequence[Passage], random.Random], list[dict]]
    precision: float | None = None
    description: str = ""
    weight: float = 1.0
    label_prior: float = 0.0

    @property
    def on_by_default(self) -> bool:
        return self.precision is not None and self.precision >= MIN_PRECISION


def sentences(text: str) -> list[str]:
    """``text`` cut into sentences (line breaks count as ends too)."""
    found = []
    for line in text.splitlines():
        pending = ""
        for piece in _SENTENCE_END.split(line.strip()):
            pending = f"{pending} {piece}".strip() if pending else piece
            if not _ABBREVIATION.search(pending):
                found.append(pending)
                pending = ""
        if pending:
            found.append(pending)
    return [s for s in found if s]


def documents(passages: Sequence[Passage]) -> list[Passage]:
    """The corpus's documents again: windows ``<id>#0``, ``<id>#1``, ... joined back in order.

    Windows are cut between words, mostly inside a sentence, so they are joined with a space.
    """
    windows: dict[str, list[tuple[int, Passage]]] = defaultdict(list)
    for passage in passages:
        base, _, number = passage.id.rpartition("#")
        if base and number.isdigit():
            windows[base].append((int(number), passage))
        else:
            windows[passage.id].append((0, passage))
    joined = []
    for doc_id, parts in windows.items():
        ordered = [passage for _, passage in sorted(parts, key=lambda item: item[0])]
        joined.append(Passage(doc_id, " ".join(p.text for p in ordered), ordered[0].title))
    return joined


def pick_phrasing(rng: random.Random, phrasings: Sequence[str], **fields) -> str:
    """One of several phrasings of the same instruction: a skill learnt under one wording stays there."""
    return rng.choice(phrasings).format(**fields)


# ---------------------------------------------------------------------------------------------
# Generic miners


# Connectives that introduce the cause of what the sentence says before them.
_CAUSE = re.compile(
    r"^(?P<effect>.{25,}?),?\s+(?:due to|owing to|because of|as a result of|on the back of|driven by|"
    r"thanks to|amid)\s+(?P<cause>[^;:]{12,}?)[.!]?$",
    re.I,
)
CAUSE_PHRASINGS = (
    "What does the sentence give as the cause of the following? {effect}",
    "According to the sentence, why did this happen: {effect}?",
    "Read the sentence and name the reason it gives for: {effect}",
    "Identify the cause stated in the sentence for the following outcome. Outcome: {effect}",
)


def mine_cause_effect(docs: Sequence[Passage], rng: random.Random) -> list[dict]:
    """Sentences "<effect> due to / owing to / because of <cause>": name the cause of the effect."""
    tasks = []
    for doc in docs:
        for sentence in sentences(doc.text):
            match = _CAUSE.match(sentence.strip())
            if match is None or len(sentence.split()) > 60:
                continue
            effect = match.group("effect").strip().rstrip(",")
            tasks.append(
                {
                    "instruction": pick_phrasing(rng, CAUSE_PHRASINGS, effect=effect),
                    "input": sentence,
                    "output": match.group("cause").strip().rstrip("."),
                    "task_type": "cause_effect",
                    "doc_id": doc.id,
                }
            )
    return tasks


# Measured by `python bench/miners.py` on FinCausal 2020's gold labels, which mark a section causal only
# when its effect is a quantified fact: by that narrower truth the miner is far below 0.9, so it is off
# by default (``generate.miners = "cause_effect"`` turns it on).
GENERIC_MINERS = (
    Miner(
        "cause_effect",
        mine_cause_effect,
        precision=0.172,
        description="cause named after 'due to', 'owing to', 'because of' ...",
    ),
)


# ---------------------------------------------------------------------------------------------
# Collecting and running miners


def available_miners(domain: Domain) -> dict[str, Miner]:
    """Every miner for ``domain`` by name: the core's (unless the domain opts out), then plugins'."""
    found = {m.name: m for m in GENERIC_MINERS} if domain.core_miners else {}
    for _, provided in plugins.results("task_miners", (list, tuple), Miner, domain=domain.name):
        found.update((miner.name, miner) for miner in provided)
    return found


def chosen_miners(domain: Domain, names: str) -> list[Miner]:
    """The miners ``generate.miners`` names (comma-separated), or those on by default when empty."""
    available = available_miners(domain)
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise SelfspecError(
            f"generate.miners: no miner {unknown[0]!r} for domain {domain.name!r}; "
            f"available: {', '.join(available) or 'none'}"
        )
    return [available[name] for name in wanted] if wanted else [m for m in available.values() if m.on_by_default]


def label_sample(tasks: list[dict], count: int, rng: random.Random, prior: float = 0.0) -> list[dict]:
    """``count`` tasks, each label's share as (its tasks) ** ``prior`` (0: balanced; free-text tasks
    form one group), taken in turn from each label in random order."""
    by_label: dict = defaultdict(list)
    for task in tasks:
        by_label[task.get("label")].append(task)
    groups = sorted(by_label.items(), key=lambda kv: str(kv[0]))
    queues = [rng.sample(group, len(group)) for _, group in groups]
    quota = share_out(
        {index: len(group) for index, (_, group) in enumerate(groups)},
        count,
        {index: len(group) ** prior for index, (_, group) in enumerate(groups)},
    )
    wanted = list(quota.values())
    chosen = []
    while any(wanted):
        for index, queue in enumerate(queues):
            if wanted[index]:
                chosen.append(queue.pop())
                wanted[index] -= 1
    return chosen


def share_out(supply: dict, count: int, weights: dict | None = None) -> dict:
    """``count`` split over ``supply``'s keys (miners, or one miner's labels) in proportion to ``weights``
    (default: evenly) as far as their supply allows; one that runs short leaves its rest to the others,
    shared the same way."""
    weights = weights or dict.fromkeys(supply, 1.0)
    quota = dict.fromkeys(supply, 0)
    left = count
    while left > 0:
        open_keys = [key for key in supply if quota[key] < supply[key] and weights[key] > 0]
        if not open_keys:
            break
        # The next record goes to the open key furthest below its weighted share (ties: the first listed).
        key = min(open_keys, key=lambda k: (quota[k] + 1) / weights[k])
        quota[key] += 1
        left -= 1
    return quota


def mine_records(ctx, count: int) -> tuple[list[dict], dict]:
    """Up to ``count`` mined records for the generate stage, and per-miner counts for its manifest.

    A miner that raises or returns malformed tasks is reported in one line and left out; the
    others go on. No corpus, or one no miner finds anything in, yields no records (and says so).
    """
    settings = ctx.settings
    if count <= 0:
        return [], {}
    miners = chosen_miners(ctx.domain, settings.generate.miners)
    if not miners:
        ctx.log(
            f"[generate] no miner is on for domain {ctx.domain.name!r}: generated instructions only "
            "(name some in generate.miners)"
        )
        return [], {}
    corpus = resolve_corpus(settings.corpus, ctx.domain.name, settings.data_dir)
    if corpus is None:
        ctx.log(
            f"[generate] no corpus to mine tasks from for domain {ctx.domain.name!r}: generated instructions only "
            "(pass --corpus PATH or --data-dir)"
        )
        return [], {}
    passages, source = corpus
    docs = documents(passages)
    found: dict[str, list[dict]] = {}
    stats: dict[str, dict] = {}
    for miner in miners:
        tasks, problem = _run_miner(miner, docs, random.Random(f"{settings.seed}:{miner.name}"))
        stats[miner.name] = {"found": len(tasks), "kept": 0, "precision": miner.precision}
        if problem:
            stats[miner.name]["error"] = problem
            ctx.log(f"[generate] miner {miner.name!r}: {problem}" + ("" if tasks else "; going on without it"))
        if tasks:
            found[miner.name] = tasks
    if not found:
        ctx.log(
            f"[generate] no miner ({', '.join(m.name for m in miners)}) found a task in {source} "
            f"({len(docs)} documents): generated instructions only"
        )
        return [], stats
    by_name = {miner.name: miner for miner in miners}
    quota = share_out(
        {name: len(tasks) for name, tasks in found.items()},
        count,
        {name: miner.weight for name, miner in by_name.items()},
    )
    records, seen = [], set()
    for name, tasks in found.items():
        for task in label_sample(
            tasks, quota[name], random.Random(f"{settings.seed}:{name}:sample"), by_name[name].label_prior
        ):
            key = (task["instruction"], task.get("input", ""))
            if key in seen:
                continue
            seen.add(key)
            stats[name]["kept"] += 1
            records.append(
                {
                    "id": f"{ctx.domain.name}-mined-{len(records) + 1:05d}",
                    "instruction": task["instruction"],
                    "input": task.get("input", ""),
                    "output": task["output"],
                    "task_type": task["task_type"],
                    "options": list(task["options"]) if task.get("options") else None,
                    "label": task.get("label"),
                    "doc_id": task.get("doc_id"),
                    "source": "mined",
                    "miner": name,
                }
            )
        labels = [t.get("label") for t in tasks]
        if any(labels):
            stats[name]["labels_found"] = {str(label): labels.count(label) for label in sorted(set(labels), key=str)}
    ctx.log(
        f"[generate] mined {len(records)} tasks from {source}: "
        + ", ".join(f"{name} {s['kept']} of {s['found']}" for name, s in stats.items())
    )
    return records, stats


def _run_miner(miner: Miner, docs: list[Passage], rng: random.Random) -> tuple[list[dict], str | None]:
    """The miner's well-formed tasks and, if it raised, warned (``warnings.warn``: what it skipped) or
    returned bad tasks, a one-line problem."""
    with warnings.catch_warnings(record=True) as caught:  # a miner's note on what it skipped
        warnings.simplefilter("always")
        try:
            tasks = list(miner.mine(docs, rng))
        except Exception as exc:  # a plugin's miner must not take the stage down
            return [], f"failed: {type(exc).__name__}: {exc}"
    notes = list(dict.fromkeys(str(w.message) for w in caught))
    good = [
        t for t in tasks if isinstance(t, dict) and all(isinstance(t.get(k), str) and t[k].strip() for k in TASK_FIELDS)
    ]
    if len(good) < len(tasks):
        notes.append(
            f"{len(tasks) - len(good)} of {len(tasks)} tasks lack {'/'.join(TASK_FIELDS)} as text and were left out"
        )
    return good, "; ".join(notes) or None
