import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from selfspec_core.config import load_settings
from selfspec_core.data.seeds import load_seeds
from selfspec_core.errors import SelfspecError
from selfspec_core.hookspecs import hookimpl
from selfspec_core.models.generator import Completion
from selfspec_core.models.loading import ModelRef
from selfspec_core.plugins.defaults import INSTRUCTION_TEMPLATE
from selfspec_core.plugins.manager import get_plugin_manager
from selfspec_core.records import Domain
from selfspec_core.run.context import StageContext
from selfspec_core.run.rundir import RunDir, read_jsonl
from selfspec_core.stages import generate as instructions
from selfspec_core.stages.generate import ExamplePool, TaskFormat, choose_task_types, run_stage
from selfspec_core.templates import PromptTemplate

REPO = Path(__file__).resolve().parents[1]
SEEDS = load_seeds(REPO / "seeds" / "finance" / "seeds.jsonl")
CONTEXT = {"domain": "testfin", "description": "finance"}
FORMAT = TaskFormat(INSTRUCTION_TEMPLATE, CONTEXT)
# A domain no plugin serves, so every template and hook answer is the core's.
DOMAIN = Domain("testfin", "finance")
INPUT_TYPES = ("sentiment", "causal_detection")
INPUT_DOMAIN = Domain("testfin", "finance", input_task_types=INPUT_TYPES)


def done(text: str) -> Completion:
    return Completion(text, True, 10)


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            " Classify the sentiment of the sentence.\nInput: Profit rose 5%.",
            ("Classify the sentiment of the sentence.", "Profit rose 5%."),
        ),
        (" Define the term EBITDA.", ("Define the term EBITDA.", "")),
        (" Define the term EBITDA.\nInput: <noinput>", ("Define the term EBITDA.", "")),
        ("Define EBITDA.\n\nInput:   A 10-K excerpt.\n\n", ("Define EBITDA.", "A 10-K excerpt.")),
        (" Define EBITDA.\nInput: x\nType: sentiment\nInstruction: More.", ("Define EBITDA.", "x")),
        (" Define EBITDA.\nAnswer: Earnings before interest.", ("Define EBITDA.", "")),
        (" Define EBITDA.\n\n###\n\nType: ner", ("Define EBITDA.", "")),
    ],
)
def test_parse_well_formed_completions(text, expected):
    task, reason = FORMAT.read("definition", done(text))
    assert reason is None
    assert (task["instruction"], task["input"]) == expected


@pytest.mark.parametrize("text", [" Instruction: Define EBITDA.", " Define EBITDA.\nInput: Instruction: again"])
def test_parse_misplaced_labels_is_unparseable(text):
    assert FORMAT.read("definition", done(text)) == (None, "unparseable")


def test_parse_garbage_and_cut_off_text():
    assert FORMAT.read("definition", done(" Input: only an input"))[0]["instruction"] == ""  # dropped as empty
    assert FORMAT.read("definition", done(""))[0] == {"instruction": "", "input": ""}
    assert FORMAT.read("definition", Completion(" Define EBITDA and then keep", False, 48)) == (None, "truncated")
    # cut at a stop string: finished, whatever the backend says
    assert FORMAT.read("definition", Completion(" Define EBITDA.\n###", False, 48))[1] is None


def test_parse_follows_a_plugin_template():
    template = PromptTemplate(
        example="Kind: {task_type}\nTask: {instruction}[[\nContext: {input}]]", query="Kind: {task_type}\nTask:"
    )
    task_format = TaskFormat(template, CONTEXT)
    assert "\nKind:" in task_format.stops and "\nAnswer:" in task_format.stops
    task, _ = task_format.read("ner", done(" List the firms.\nContext: Acme bought Beta."))
    assert task == {"instruction": "List the firms.", "input": "Acme bought Beta."}


def test_template_whose_query_does_not_start_the_example_is_refused():
    template = PromptTemplate(example="Task: {instruction}\nKind: {task_type}", query="Kind: {task_type}\nTask:")
    with pytest.raises(SelfspecError, match="must be the beginning of its example"):
        TaskFormat(template, CONTEXT)
    with pytest.raises(SelfspecError, match="no {instruction} field"):
        TaskFormat(PromptTemplate(example="Q: {question}", query="Q:"), CONTEXT)


def test_task_types_cycle_and_favour_those_behind():
    types = ["a", "b", "c"]
    assert choose_task_types(types, Counter(), {}, 7) == ["a", "b", "c", "a", "b", "c", "a"]
    assert choose_task_types(types, Counter({"a": 2, "b": 1}), {"a": 2, "b": 2, "c": 2}, 3) == ["c", "b", "c"]
    assert choose_task_types(types, Counter(), {"a": 1}, 2) == ["b", "c"]


def test_examples_mix_seeds_and_generated_and_prefer_the_type():
    pool = ExamplePool(SEEDS, [])
    shown = pool.draw(random.Random(0), "sentiment", 3, 0.67)
    assert len(shown) == 3 and all(e["id"] in pool.human_ids for e in shown)
    assert Counter(e["task_type"] == "sentiment" for e in shown) == {True: 2, False: 1}
    pool.extend([{"id": "g1", "task_type": "sentiment", "instruction": "Rate the tone.", "input": "x", "round": 1}])
    shown = pool.draw(random.Random(0), "sentiment", 3, 0.67)
    assert sorted(e["id"] in pool.human_ids for e in shown) == [False, True, True]
    assert pool.draw(random.Random(5), "ner", 3, 0.67) == pool.draw(random.Random(5), "ner", 3, 0.67)


class ScriptedGenerator:
    """A deterministic stand-in for the model backend: varied well-formed tasks and some garbage.

    Each text depends only on the prompt and the seed, as with a seeded model.
    """

    SUBJECTS = [
        "quarterly revenue",
        "net margin",
        "the bond yield",
        "a merger",
        "the dividend",
        "cash flow",
        "the audit opinion",
        "credit risk",
        "the share buyback",
        "inventory turnover",
        "a rate cut",
    ]
    VERBS = ["Explain", "Assess", "Summarize", "Classify", "Describe", "Evaluate", "Compare", "Identify"]
    GARBAGE = [
        "",
        " ok",
        " ; ; ; {x} <y> ; ; {z} <w> ;;",
        " loop loop loop loop loop",
        " Draw a picture of the revenue trend.",
        " 12 34 56 78 90 12 34",
    ]

    def __init__(self):
        self.calls = 0

    def generate(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, stop=(), seed=0):
        self.calls += 1
        texts = []
        for prompt in prompts:
            rng = random.Random(hashlib.sha256(f"{seed}|{prompt}".encode()).digest())
            if rng.random() < 0.25:
                texts.append(rng.choice(self.GARBAGE))
                continue
            if prompt.endswith("\nInput:"):  # an input under a seed's instruction
                words = rng.sample(self.SUBJECTS, 2)
                texts.append(
                    f" Company {rng.randint(1, 999)} reported that {words[0]} moved with {words[1]}.\nAnswer: positive"
                )
                continue
            task_type = re.search(r"Type: (.*)\nInstruction:$", prompt).group(1)
            words = rng.sample(self.SUBJECTS, 3)
            texts.append(
                f" {rng.choice(self.VERBS)} how {words[0]} relates to {words[1]} for {task_type.replace('_', ' ')}."
                f"\nInput: A note on {words[2]} number {rng.randint(1, 999)}.\nAnswer: ignored"
            )
        return [Completion(text, True, 20) for text in texts]


class KilledAfter(ScriptedGenerator):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def generate(self, prompts, **options):
        if self.calls == self.batches:
            raise KeyboardInterrupt("killed")
        return super().generate(prompts, **options)


SCRIPTED_MODEL = ModelRef("scripted", "unused")


def make_context(tmp_path, name="run", seed=42, model=SCRIPTED_MODEL, domain=DOMAIN, **generate):
    settings = load_settings(
        "tiny",
        overrides={"seed": seed, "generate": {"num_instructions": 12, "batch_size": 4, "max_rounds": 10, **generate}},
    )
    run = RunDir(tmp_path / name, domain.name).open()
    logged = []
    ctx = StageContext(settings, domain, run, SEEDS, model, run.partial_dir("generate"), logged.append)
    return ctx, logged


def run_with(ctx, generator, monkeypatch):
    monkeypatch.setattr(instructions, "make_generator", lambda *args, **kwargs: generator)
    return run_stage(ctx)


def test_stage_writes_balanced_filtered_records(tmp_path, monkeypatch):
    ctx, logged = make_context(tmp_path)
    counts = run_with(ctx, ScriptedGenerator(), monkeypatch)
    records = read_jsonl(ctx.work / "instructions.jsonl")
    assert len(records) == 12 == counts["funnel"]["kept"]
    assert [r["id"] for r in records] == [f"testfin-gen-{n:05d}" for n in range(1, 13)]
    assert all(
        set(r) == {"id", "instruction", "input", "task_type", "mode", "seed_ids", "round", "source"} for r in records
    )
    assert {r["source"] for r in records} == {"generated"}
    assert {r["mode"] for r in records} == {"task"}  # the domain names no input task types
    assert all(r["seed_ids"] and set(r["seed_ids"]) <= {s.id for s in SEEDS} for r in records)
    assert not any("Answer:" in r["input"] for r in records)
    by_type = Counter(r["task_type"] for r in records)
    assert counts["task_types"] == dict(sorted(by_type.items()))
    assert max(by_type.values()) - min(by_type.values()) <= 1 and len(by_type) == 9
    funnel = counts["funnel"]
    assert funnel["generated"] == funnel["kept"] + sum(funnel["dropped"].values())
    garbage = {"empty", "too_short", "code", "repetition", "blacklist", "non_letters"}
    assert set(funnel["dropped"]) <= garbage | {"duplicate", "surplus"}
    assert len(set(funnel["dropped"]) & garbage) >= 3
    assert counts["stopped"] == "target" and counts["rounds"] >= 2
    assert "12 of 12 instructions" in logged[-1]


def test_input_batches_write_new_inputs_under_seed_instructions(tmp_path, monkeypatch):
    ctx, _ = make_context(tmp_path, domain=INPUT_DOMAIN, num_instructions=24, input_share=0.5)
    counts = run_with(ctx, ScriptedGenerator(), monkeypatch)
    records = read_jsonl(ctx.work / "instructions.jsonl")
    state = json.loads((ctx.work / "state.json").read_text())
    assert (
        state["input_batches"] == state["batches"] // 2 + state["batches"] % 2
    )  # every other batch, first one included
    written = [r for r in records if r["mode"] == "input"]
    assert written and len(written) < len(records)
    seeds = {s.id: s for s in SEEDS}
    for record in written:
        owner = seeds[record["seed_ids"][0]]
        assert record["task_type"] in INPUT_TYPES and owner.task_type == record["task_type"]
        assert record["instruction"] == owner.instruction and owner.input
        assert record["input"].startswith("Company ") and "Answer:" not in record["input"]
    # the balance over types counts both kinds of record
    assert counts["task_types"] == dict(sorted(Counter(r["task_type"] for r in records).items()))


def test_input_share_zero_or_no_input_types_writes_whole_tasks_only(tmp_path, monkeypatch):
    for name, domain, share in (("off", INPUT_DOMAIN, 0.0), ("none", DOMAIN, 1.0)):
        ctx, _ = make_context(tmp_path, name, domain=domain, input_share=share)
        run_with(ctx, ScriptedGenerator(), monkeypatch)
        assert {r["mode"] for r in read_jsonl(ctx.work / "instructions.jsonl")} == {"task"}


def test_an_input_copied_from_a_seed_is_a_duplicate(tmp_path):
    from selfspec_core.stages.filter import InstructionFilter, dedup_text

    seed = next(s for s in SEEDS if s.task_type == "sentiment")
    checks = InstructionFilter("testfin", 3, 150, 0.7, pool=[dedup_text(seed.to_dict())])
    copied = {"instruction": seed.instruction, "input": seed.input, "mode": "input"}
    fresh = {
        "instruction": seed.instruction,
        "input": "Orvik Shipping ordered four new vessels for its Baltic routes.",
        "mode": "input",
    }
    assert checks.reason(copied) == "duplicate" and checks.reason(fresh) is None
    assert checks.reason({**fresh, "input": "Too short"}) == "too_short"


def test_plugin_filter_rejections_are_counted_by_plugin_and_reason(tmp_path, monkeypatch):
    class NoMergers:
        @hookimpl
        def filter_record(self, stage, record):
            return "merger" if stage == "instruction" and "merger" in record["instruction"] else None

    plugin = NoMergers()
    get_plugin_manager().register(plugin, name="no-mergers")
    try:
        ctx, _ = make_context(tmp_path)
        counts = run_with(ctx, ScriptedGenerator(), monkeypatch)
    finally:
        get_plugin_manager().unregister(plugin)
    assert counts["funnel"]["dropped"]["plugin:no-mergers:merger"] > 0
    assert not any("merger" in r["instruction"] for r in read_jsonl(ctx.work / "instructions.jsonl"))


def test_same_seed_same_file_other_seed_other_records(tmp_path, monkeypatch):
    outputs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        ctx, _ = make_context(tmp_path, name, seed=seed)
        run_with(ctx, ScriptedGenerator(), monkeypatch)
        outputs.append((ctx.work / "instructions.jsonl").read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


@pytest.mark.parametrize("domain", [DOMAIN, INPUT_DOMAIN], ids=["tasks", "tasks_and_inputs"])
def test_killed_stage_resumes_to_the_same_file(tmp_path, monkeypatch, domain):
    whole, _ = make_context(tmp_path, "whole", domain=domain)
    uninterrupted = ScriptedGenerator()
    expected_counts = run_with(whole, uninterrupted, monkeypatch)

    resumed, _ = make_context(tmp_path, "resumed", domain=domain)
    with pytest.raises(KeyboardInterrupt):
        run_with(resumed, KilledAfter(2), monkeypatch)
    state = json.loads((resumed.work / "state.json").read_text())
    assert state["records"] == len(read_jsonl(resumed.work / "instructions.jsonl")) > 0
    second = ScriptedGenerator()
    assert run_with(resumed, second, monkeypatch) == expected_counts
    assert second.calls == uninterrupted.calls - 2  # only the batches that were not done
    assert (resumed.work / "instructions.jsonl").read_bytes() == (whole.work / "instructions.jsonl").read_bytes()
    # a finished stage run again returns its counts without generating
    assert run_with(resumed, KilledAfter(0), monkeypatch) == expected_counts


def test_kill_between_writing_records_and_saving_state_redoes_that_batch(tmp_path, monkeypatch):
    whole, _ = make_context(tmp_path, "whole")
    run_with(whole, ScriptedGenerator(), monkeypatch)

    resumed, _ = make_context(tmp_path, "resumed")
    real_save, saves = instructions.StageState.save, []

    def save_then_die(state, path):
        saves.append(state.records)
        if len(saves) == 3:
            raise KeyboardInterrupt("killed before the state was saved")
        real_save(state, path)

    monkeypatch.setattr(instructions.StageState, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_with(resumed, ScriptedGenerator(), monkeypatch)
    on_disk = len(read_jsonl(resumed.work / "instructions.jsonl"))
    assert on_disk == saves[-1] > json.loads((resumed.work / "state.json").read_text())["records"]
    monkeypatch.setattr(instructions.StageState, "save", real_save)
    run_with(resumed, ScriptedGenerator(), monkeypatch)
    assert (resumed.work / "instructions.jsonl").read_bytes() == (whole.work / "instructions.jsonl").read_bytes()


class FirstBatchOnly(ScriptedGenerator):
    """Well-formed tasks in the first batch, then only garbage: the stage must stop by itself."""

    def generate(self, prompts, **options):
        if self.calls == 0:
            return super().generate(prompts, **options)
        self.calls += 1
        return [Completion(" ok", True, 1) for _ in prompts]


def test_rounds_that_keep_nothing_stop_the_stage_with_what_it_has(tmp_path, monkeypatch):
    ctx, logged = make_context(tmp_path, num_instructions=20)
    counts = run_with(ctx, FirstBatchOnly(), monkeypatch)
    assert counts["stopped"] == "no_progress"
    assert 0 < counts["funnel"]["kept"] < 20
    assert "2 rounds in a row kept nothing" in logged[-1] and "too_short" in logged[-1]


class OnlyGarbage(ScriptedGenerator):
    def generate(self, prompts, **options):
        self.calls += 1
        return [Completion(" ok", True, 1) for _ in prompts]


def test_a_stage_that_keeps_only_mined_tasks_leaves_an_empty_instructions_file(tmp_path, monkeypatch):
    """The respond stage reads instructions.jsonl: with mined tasks but no written one kept, it is there, empty."""
    ctx, _ = make_context(tmp_path, num_instructions=4, max_rounds=1)
    mined = {"id": "testfin-mined-00001", "task_type": "qa", "instruction": "Up?", "input": "Rose.", "output": "yes"}
    monkeypatch.setattr(instructions.mining, "mine_records", lambda ctx, count: ([mined], {"m": {"kept": 1}}))
    counts = run_with(ctx, OnlyGarbage(), monkeypatch)
    assert counts["funnel"]["kept"] == 0 and counts["sources"] == {"generated": 0, "mined": 1}
    assert (ctx.work / "instructions.jsonl").read_text() == ""


def test_real_tiny_model_garbage_is_dropped_not_crashing(tmp_path, tiny_model_dir):
    ctx, _ = make_context(tmp_path, model=ModelRef("tiny", str(tiny_model_dir)), num_instructions=4, max_rounds=1)
    with pytest.raises(
        SelfspecError, match="no generated instruction passed the filters.*Try: the model does not follow"
    ):
        run_stage(ctx)
    state = json.loads((ctx.work / "state.json").read_text())
    assert state["funnel"]["kept"] == 0 and state["funnel"]["generated"] == sum(state["funnel"]["dropped"].values()) > 0


def test_settings_that_cannot_work_are_refused_with_their_name(tmp_path):
    with pytest.raises(SelfspecError, match="generate.num_instructions: must not be negative"):
        load_settings("tiny", overrides={"generate": {"num_instructions": -1}})
    with pytest.raises(SelfspecError, match="generate.num_mined: must not be negative"):
        load_settings("tiny", overrides={"generate": {"num_mined": -5}})
    with pytest.raises(SelfspecError, match=r"generate.mined_share was replaced by generate.num_mined \(a count"):
        load_settings("tiny", overrides={"generate": {"mined_share": 0.5}})
    with pytest.raises(SelfspecError, match=r"generate.min_relevance was replaced by respond.min_relevance \(the"):
        load_settings("tiny", overrides={"generate": {"min_relevance": 2.0}})
    assert "min_relevance" not in load_settings("tiny").to_dict()["generate"]  # so not in generate's stage hash
    with pytest.raises(SelfspecError, match="generate.batch_size: must be between 1"):
        load_settings("tiny", overrides={"generate": {"batch_size": 0}})
    ctx, _ = make_context(tmp_path, name="words", min_words=10, max_words=5)
    with pytest.raises(SelfspecError, match="max_words .5. is below generate.min_words .10."):
        run_stage(ctx)
