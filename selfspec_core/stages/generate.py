"""Stage 1 (generate): new domain tasks written by the model from the human seeds.

Each prompt shows ``num_examples`` tasks (human seeds and, once there are some, accepted generated
tasks; same task type preferred) and asks for one new task of a chosen type, picking types so the
output stays balanced. For the domain's ``input_task_types`` a share of batches (``input_share``)
asks only for a new input of the type, kept under a seed's own instruction: a small model writes a
plausible news sentence far more reliably than a whole new task, and the respond stage then labels
it. Completions are read back through the domain's instruction template, filtered
(:class:`selfspec_core.stages.filter.InstructionFilter`), and the kept records appended to
``instructions.jsonl`` after every batch, with the stage's state saved beside them. Every batch's
randomness comes from ``seed``, round and batch number alone, so a killed run resumes at the next
batch and ends with the same file, byte for byte, as an uninterrupted one.

Before any generation, ``generate.num_mined`` records are mined from the domain corpus
(:mod:`selfspec_core.stages.mine`: tasks the text itself answers) into ``mined.jsonl``, beside the
``num_instructions`` the model writes. Mining runs once per stage run, so a resumed stage keeps its
mined records.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from selfspec_core.data.retrieval import corpus_hash, resolve_corpus
from selfspec_core.errors import SelfspecError
from selfspec_core.models.backends import make_generator
from selfspec_core.models.generator import Completion, cut_at_stop
from selfspec_core.records import Funnel, Seed
from selfspec_core.run.rounds import previous_adapter
from selfspec_core.run.rundir import RecordLog, atomic_write_json, read_jsonl, write_jsonl
from selfspec_core.runtime import logs
from selfspec_core.stages import mine as mining
from selfspec_core.stages.filter import InstructionFilter, dedup_text
from selfspec_core.templates import FORMATTER, OPTIONAL, PromptTemplate, field_labels, fill

OUTPUT_FILE = "instructions.jsonl"
STATE_FILE = "state.json"
EMPTY_ROUNDS_TO_STOP = 2
MIN_ACCEPT_RATE = 0.1  # a round plans for at least 1 kept task in 10 prompts
# What small models write for "no input" (Self-Instruct's "<noinput>" among them).
NO_INPUT = frozenset({"", "<noinput>", "noinput", "none", "n/a", "na", "no input", "-", "nothing"})
# Labels a model uses when it goes on to answer its own task; a completion is cut there.
ANSWER_LABELS = ("Output:", "Answer:", "Response:")
PARAGRAPH_END = "\n\n"  # a written input is one paragraph; what follows a blank line is the model rambling on


class TaskFormat:
    """Reads a completion of the instruction template's query back into ``instruction`` and ``input``.

    The query must be the start of the example form (``Type: {task_type}\\nInstruction:`` of
    ``Type: {task_type}\\nInstruction: {instruction}[[\\nInput: {input}]]``): the model completes
    the query into one example, so the example, compiled to a pattern, parses query + completion.
    """

    def __init__(self, template: PromptTemplate, context: dict):
        self.template = template
        self.context = context
        names = {name for _, name, _, _ in FORMATTER.parse(OPTIONAL.sub(r"\1", template.example)) if name}
        if "instruction" not in names:
            raise SelfspecError(
                f"the instruction prompt template's example {template.example!r} has no {{instruction}} field; "
                "fix the plugin's prompt_template for stage 'instruction'"
            )
        probe = {**context, **{name: f"<{name}>" for name in names}}
        query, example = fill(template.query, probe), fill(template.example, probe)
        if not (example.startswith(query) and "<instruction>" in example[len(query) :]):
            raise SelfspecError(
                f"the instruction prompt template's query {template.query!r} must be the beginning of its example "
                f"{template.example!r}, ending before {{instruction}}: the model completes the query into an example"
            )
        self.pattern = _example_pattern(template.example)
        self.labels = field_labels(template.example)
        self._label_line = (
            re.compile(r"(?m)^\s*(?:" + "|".join(map(re.escape, self.labels)) + ")") if self.labels else None
        )
        restart = (
            [f"\n{self.labels[0]}"] if self.labels and template.example.lstrip().startswith(self.labels[0]) else []
        )
        self.stops = (
            list(template.stop) + restart + [f"\n{label}" for label in ANSWER_LABELS if label not in self.labels]
        )

    def prompt(self, examples: list[dict], task_type: str) -> str:
        return self.template.render(examples, {"task_type": task_type}, **self.context)

    def read(self, task_type: str, completion: Completion) -> tuple[dict | None, str | None]:
        """``({instruction, input}, None)``, or ``(None, reason)`` with reason ``unparseable`` or ``truncated``."""
        text, stopped = cut_at_stop(completion.text, self.stops)
        match = self.pattern.match(fill(self.template.query, {**self.context, "task_type": task_type}) + text)
        if match is None:
            return None, "unparseable"
        instruction = match.group("instruction").strip()
        input_text = (match.groupdict().get("input") or "").strip()
        if input_text.lower().strip(" .") in NO_INPUT:
            input_text = ""
        if self._label_line and (self._label_line.search(instruction) or self._label_line.search(input_text)):
            return None, "unparseable"
        if not (completion.finished or stopped):
            return None, "truncated"
        return {"instruction": instruction, "input": input_text}, None


class InputFormat:
    """Prompts for a new input under a seed's instruction (the ``input`` template), and reads it back."""

    def __init__(self, template: PromptTemplate, context: dict):
        self.template = template
        self.context = context
        labels = dict.fromkeys([*field_labels(template.example), *ANSWER_LABELS])
        self.stops = list(template.stop) + [f"\n{label}" for label in labels] + [PARAGRAPH_END]

    def prompt(self, examples: list[dict], instruction: str) -> str:
        return self.template.render(
            [{"input": e["input"]} for e in examples], {}, **self.context, instruction=instruction
        )

    def read(self, completion: Completion) -> tuple[str | None, str | None]:
        """``(input, None)``, or ``(None, reason)`` with reason ``unparseable`` or ``truncated``."""
        text, stopped = cut_at_stop(completion.text, self.stops)
        text = text.strip()
        if text.lower().strip(" .") in NO_INPUT:
            return None, "unparseable"
        if not (completion.finished or stopped):
            return None, "truncated"
        return text, None


def _example_pattern(example: str) -> re.Pattern:
    """The example template as a regex: fields become lazy groups, ``[[...]]`` optional, spaces loose."""
    named: set[str] = set()

    def part(text: str) -> str:
        pieces = []
        for literal, name, _, _ in FORMATTER.parse(text):
            words = literal.split()
            if words:
                pieces.append(r"\s*" + r"\s+".join(map(re.escape, words)) + r"\s*")
            elif literal:
                pieces.append(r"\s*")
            if name is not None:
                if name.isidentifier() and name not in named:
                    named.add(name)
                    pieces.append(f"(?P<{name}>.*?)")
                else:
                    pieces.append(".*?")
        return "".join(pieces)

    pattern, position = [], 0
    for optional in OPTIONAL.finditer(example):
        pattern.append(part(example[position : optional.start()]))
        pattern.append(f"(?:{part(optional.group(1))})?")
        position = optional.end()
    pattern.append(part(example[position:]))
    return re.compile(r"\A\s*" + "".join(pattern) + r"\s*\Z", re.S)


class ExamplePool:
    """Human seeds and accepted generated tasks, from which each prompt's examples are drawn."""

    def __init__(self, seeds: list[Seed], generated: list[dict]):
        self.human = [
            {"id": s.id, "task_type": s.task_type, "instruction": s.instruction, "input": s.input} for s in seeds
        ]
        self.human_ids = {s.id for s in seeds}
        self.generated: list[dict] = []
        self.extend(generated)

    def extend(self, records: list[dict]) -> None:
        self.generated.extend({key: r[key] for key in ("id", "task_type", "instruction", "input")} for r in records)

    def draw(self, rng: random.Random, task_type: str, k: int, human_share: float) -> list[dict]:
        """``k`` examples: ``human_share`` of them seeds (all while nothing is generated yet)."""
        machine = min(len(self.generated), round(k * (1 - human_share)))
        human = min(len(self.human), k - machine)
        chosen = _prefer_type(rng, self.human, task_type, human) + _prefer_type(rng, self.generated, task_type, machine)
        rng.shuffle(chosen)
        return chosen

    def draw_inputs(self, rng: random.Random, task_type: str, k: int, human_share: float) -> list[dict]:
        """``k`` examples of ``task_type`` that have an input, ``human_share`` of them seeds."""
        human = [item for item in self.human if item["task_type"] == task_type and item["input"]]
        machine = [item for item in self.generated if item["task_type"] == task_type and item["input"]]
        from_machine = min(len(machine), round(k * (1 - human_share)))
        chosen = rng.sample(human, min(len(human), k - from_machine)) + rng.sample(machine, from_machine)
        rng.shuffle(chosen)
        return chosen


def _prefer_type(rng: random.Random, items: list[dict], task_type: str, count: int) -> list[dict]:
    """``count`` items, of ``task_type`` where possible but one of another type when ``count`` > 1."""
    same = [item for item in items if item["task_type"] == task_type]
    other = [item for item in items if item["task_type"] != task_type]
    wanted_other = 1 if count > 1 and other and same else 0
    take_same = min(len(same), count - wanted_other)
    take_other = min(len(other), count - take_same)
    return rng.sample(same, take_same) + rng.sample(other, take_other)


def choose_task_types(task_types: list[str], kept: Counter, queried: dict[str, int], count: int) -> list[str]:
    """Types for the next ``count`` prompts: those with the fewest kept tasks, then fewest queries, first."""
    planned: Counter = Counter()
    order = {name: position for position, name in enumerate(task_types)}
    chosen = []
    for _ in range(count):
        name = min(task_types, key=lambda t: (kept[t] + planned[t], queried.get(t, 0) + planned[t], order[t]))
        planned[name] += 1
        chosen.append(name)
    return chosen


def batch_seed(seed: int, round_number: int, batch: int) -> int:
    """The random seed of one batch, from the run's seed and the batch's place alone (so resumable)."""
    return int(hashlib.sha256(f"{seed}:{round_number}:{batch}".encode()).hexdigest()[:8], 16)


@dataclass
class StageState:
    """Where the stage is, saved after every batch; ``records`` is how many lines of the output are final."""

    round: int = 0
    batch: int = 0  # the next batch of the round
    round_batches: int = 0
    round_kept: int = 0
    empty_rounds: int = 0
    records: int = 0
    batches: int = 0  # batches run in all rounds
    input_batches: int = 0  # ... of them writing inputs only
    queried: dict[str, int] = field(default_factory=dict)
    funnel: dict = field(default_factory=dict)
    stopped: str = ""
    mined: dict | None = None  # per-miner counts once ``mined.jsonl`` is written; None: not mined yet

    @classmethod
    def load(cls, path: Path) -> StageState:
        if not path.exists():
            return cls()
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
            raise SelfspecError(
                f"{path}: unreadable stage state ({exc}); delete {path.parent} to start the stage again"
            ) from None

    def save(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))


def _open_output(path: Path, records: int) -> RecordLog:
    """The output log holding exactly the ``records`` lines the saved state vouches for.

    Lines past them belong to a batch whose state was never saved (killed in between): that batch
    runs again and writes them again, identically.
    """
    log = RecordLog(path)
    if not path.exists():  # the respond stage reads it even when no written task is kept
        write_jsonl(path, [])
    if len(log.records) > records:
        write_jsonl(path, log.records[:records])
        log = RecordLog(path)
    elif len(log.records) < records:
        raise SelfspecError(
            f"{path} has {len(log.records)} records but the stage state expects {records}; "
            f"delete {path.parent} to start the stage again"
        )
    return log


def _check_settings(settings) -> None:
    """What the config's ranges cannot say: settings that contradict each other."""
    if settings.max_words < settings.min_words:
        raise SelfspecError(
            f"generate.max_words ({settings.max_words}) is below generate.min_words ({settings.min_words})"
        )


def _round_batches(settings, funnel: Funnel) -> int:
    """Batches for a new round: what is still missing, scaled by the share of prompts kept so far."""
    rate = funnel.kept / funnel.generated if funnel.generated else 1.0
    prompts = math.ceil((settings.num_instructions - funnel.kept) / max(rate, MIN_ACCEPT_RATE))
    return math.ceil(prompts / settings.batch_size)


def _stop_reason(state: StageState, settings, funnel: Funnel) -> str:
    if funnel.kept >= settings.num_instructions:
        return "target"
    if state.empty_rounds >= EMPTY_ROUNDS_TO_STOP:
        return "no_progress"
    if state.round >= settings.max_rounds:
        return "max_rounds"
    return ""


def _drops(funnel: Funnel) -> str:
    return (
        ", ".join(f"{reason} {count}" for reason, count in sorted(funnel.dropped.items(), key=lambda kv: -kv[1]))
        or "none"
    )


def _advice(funnel: Funnel) -> str:
    """What to change, from the reason that dropped the most."""
    if not funnel.dropped:
        return "raise generate.max_rounds"
    reason = max(funnel.dropped, key=funnel.dropped.get)
    if reason in ("unparseable", "empty", "truncated", "invalid_chars", "non_letters", "repetition", "code"):
        return (
            "the model does not follow the instruction template: use a larger instruction-tuned --model, "
            "or raise generate.max_new_tokens if most were truncated"
        )
    if reason == "duplicate":
        return "raise generate.rouge_threshold, add more varied seeds, or raise generate.temperature"
    if reason in ("too_short", "too_long"):
        return "adjust generate.min_words / generate.max_words"
    if reason.startswith("plugin:"):
        return f"the plugin {reason.split(':')[1]!r} rejected most tasks ({reason}); check its filter_record hook"
    return f"most were dropped as {reason}"


def outside_inputs_hash(settings, domain: str) -> str:
    """The content hash of the corpus tasks are mined from: another corpus makes them stale."""
    if settings.generate.num_mined <= 0:
        return ""
    corpus = resolve_corpus(settings.corpus, domain, settings.data_dir)
    return corpus_hash(corpus[0]) if corpus is not None else ""


def _mined_records(ctx, state: StageState, state_path: Path) -> list[dict]:
    """The stage's mined records: mined now, or read back when a resumed stage already has them."""
    path = ctx.work / mining.OUTPUT_FILE
    if state.mined is not None and path.exists():
        return read_jsonl(path)
    settings = ctx.settings.generate
    records, state.mined = mining.mine_records(ctx, settings.num_mined)
    write_jsonl(path, records)
    state.save(state_path)
    return records


def run_stage(ctx) -> dict:
    _check_settings(ctx.settings.generate)
    if not ctx.seeds:
        raise SelfspecError(
            f"domain {ctx.domain.name!r} has no seeds to write instructions from; pass --seeds FILE.jsonl"
        )
    formats = StageFormats.build(ctx)
    state_path = ctx.work / STATE_FILE
    state = StageState.load(state_path)
    mined = _mined_records(ctx, state, state_path)
    settings = ctx.settings.generate
    log = _open_output(ctx.work / OUTPUT_FILE, state.records)
    funnel = Funnel.from_dict(state.funnel)
    kept_by_type = Counter(record["task_type"] for record in log.records)
    examples = ExamplePool(ctx.seeds, log.records)
    checks = InstructionFilter(
        ctx.domain.name,
        settings.min_words,
        settings.max_words,
        settings.rouge_threshold,
        pool=[dedup_text(r) for r in examples.human + log.records],
    )
    generator = None
    with logs.progress_bar("generate") as bar:
        task = bar.add_task(f"dropped: {_drops(funnel)}", total=settings.num_instructions, completed=funnel.kept)
        while not state.stopped:
            if state.batch == 0:
                state.stopped = _stop_reason(state, settings, funnel)
                if state.stopped:
                    state.save(state_path)
                    break
                state.round += 1
                state.round_batches = _round_batches(settings, funnel)
                state.round_kept = 0
            if generator is None:
                generator = make_generator(
                    ctx.settings, ctx.model, adapter=previous_adapter(ctx.run), batch_size=settings.batch_size
                )
            kept = _run_batch(ctx, settings, generator, formats, examples, checks, state, funnel, kept_by_type)
            log.append(kept)
            examples.extend(kept)
            state.records = len(log.records)
            state.round_kept += len(kept)
            state.batch += 1
            if state.batch >= state.round_batches or funnel.kept >= settings.num_instructions:
                state.empty_rounds = 0 if state.round_kept else state.empty_rounds + 1
                state.batch = 0
            state.funnel = funnel.to_dict()
            state.save(state_path)
            bar.update(
                task,
                completed=funnel.kept,
                description=f"round {state.round} | generated {funnel.generated} | dropped: {_drops(funnel)}",
            )
    summary = (
        f"{funnel.kept} of {settings.num_instructions} instructions after {state.round} rounds "
        f"({funnel.generated} generated; dropped: {_drops(funnel)})"
    )
    if not log.records and not mined:
        raise SelfspecError(f"no generated instruction passed the filters: {summary}. Try: {_advice(funnel)}")
    if state.stopped == "no_progress":
        ctx.log(
            f"[generate] stopped early: {EMPTY_ROUNDS_TO_STOP} rounds in a row kept nothing; {summary}. "
            f"To get more, {_advice(funnel)}"
        )
    elif state.stopped == "max_rounds":
        ctx.log(f"[generate] stopped at generate.max_rounds = {settings.max_rounds}: {summary}")
    else:
        ctx.log(f"[generate] {summary}")
    return {
        "funnel": funnel.to_dict(),
        "rounds": state.round,
        "stopped": state.stopped,
        "task_types": dict(sorted(kept_by_type.items())),
        "sources": {"generated": len(log.records), "mined": len(mined)},
        "mined": state.mined,
    }


@dataclass
class StageFormats:
    """The two prompt forms of the stage and the task types each serves."""

    tasks: TaskFormat
    inputs: InputFormat
    task_types: list[str]
    # Per input task type, the seeds whose instruction a new input is written under.
    instruction_seeds: dict[str, list[Seed]]

    @classmethod
    def build(cls, ctx) -> StageFormats:
        instruction_seeds = {
            name: [seed for seed in ctx.seeds if seed.task_type == name and seed.input]
            for name in ctx.domain.input_task_types
        }
        return cls(
            TaskFormat(ctx.template("instruction"), ctx.template_context),
            InputFormat(ctx.template("input"), ctx.template_context),
            list(dict.fromkeys(seed.task_type for seed in ctx.seeds)),
            {name: seeds for name, seeds in instruction_seeds.items() if seeds},
        )

    def writes_inputs(self, state: StageState, share: float) -> bool:
        """Whether the next batch writes inputs: so that ``share`` of all batches do, evenly spread."""
        return bool(self.instruction_seeds) and state.input_batches < share * (state.batches + 1)


def _run_batch(
    ctx,
    settings,
    generator,
    formats: StageFormats,
    examples: ExamplePool,
    checks: InstructionFilter,
    state: StageState,
    funnel: Funnel,
    kept_by_type: Counter,
) -> list[dict]:
    """Generate one batch of prompts, read and filter the completions; the kept records, with ids."""
    seed = batch_seed(ctx.settings.seed, state.round, state.batch)
    rng = random.Random(seed)
    writes_inputs = formats.writes_inputs(state, settings.input_share)
    state.batches += 1
    state.input_batches += writes_inputs
    types = choose_task_types(
        list(formats.instruction_seeds) if writes_inputs else formats.task_types,
        kept_by_type,
        state.queried,
        settings.batch_size,
    )
    for name in types:
        state.queried[name] = state.queried.get(name, 0) + 1
    if writes_inputs:
        shown = [
            examples.draw_inputs(rng, name, settings.input_examples, settings.human_example_share) for name in types
        ]
        owners = [rng.choice(formats.instruction_seeds[name]) for name in types]
        prompts = [formats.inputs.prompt(chosen, owner.instruction) for chosen, owner in zip(shown, owners)]
        stops = formats.inputs.stops
    else:
        shown = [examples.draw(rng, name, settings.num_examples, settings.human_example_share) for name in types]
        prompts = [formats.tasks.prompt(chosen, name) for chosen, name in zip(shown, types)]
        stops = formats.tasks.stops
    completions = generator.generate(
        prompts,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        stop=stops,
        seed=seed,
    )
    kept = []
    for number, (name, chosen, completion) in enumerate(zip(types, shown, completions)):
        funnel.generated += 1
        if funnel.kept >= settings.num_instructions:
            funnel.drop("surplus")
            continue
        seed_ids = [e["id"] for e in chosen if e["id"] in examples.human_ids]
        if writes_inputs:
            owner = owners[number]
            text, reason = formats.inputs.read(completion)
            task = None if reason else {"instruction": owner.instruction, "input": text}
            seed_ids = list(dict.fromkeys([owner.id, *seed_ids]))
        else:
            task, reason = formats.tasks.read(name, completion)
        if task is not None:
            task.update(
                task_type=name,
                mode="input" if writes_inputs else "task",
                seed_ids=seed_ids,
                round=state.round,
                source="generated",
            )
            reason = checks.reason(task)
        if reason:
            funnel.drop(reason)
            continue
        checks.accept(task)
        funnel.kept += 1
        kept_by_type[name] += 1
        kept.append({"id": f"{ctx.domain.name}-gen-{state.records + len(kept) + 1:05d}", **task})
    return kept
