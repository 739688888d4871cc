"""Corpus miners: sentence and document helpers, sampling, the generate stage's mix, bad input, resume."""

import random
from collections import Counter

import pytest

from selfspec_core.config import load_settings
from selfspec_core.data.retrieval import Passage
from selfspec_core.errors import SelfspecError
from selfspec_core.hookspecs import hookimpl
from selfspec_core.models.generator import Completion
from selfspec_core.models.loading import ModelRef
from selfspec_core.records import Domain, Seed
from selfspec_core.run.context import StageContext
from selfspec_core.run.rundir import RunDir, read_jsonl, write_jsonl
from selfspec_core.stages import generate as instructions
from selfspec_core.stages import mine as mining
from selfspec_core.stages import report
from selfspec_core.stages.mine import Miner

DOMAIN = Domain("minetest", "mining tests", core_miners=False)
SEEDS = [
    Seed(f"s{n}", "definition", f"Explain the finance term number {n} in one sentence.", "", "An answer.")
    for n in range(3)
]
CORPUS = [
    {
        "id": f"doc{n}",
        "text": f"Revenue of unit {n} rose sharply. The plant in town {n} is old. Costs in region {n} fell again.",
    }
    for n in range(8)
]


def label_miner(docs, rng):
    """One task per sentence: 'up' or 'down' by its verb, 'same' otherwise (two of three per doc)."""
    tasks = []
    for doc in docs:
        for sentence in mining.sentences(doc.text):
            label = "up" if "rose" in sentence else "down" if "fell" in sentence else "same"
            tasks.append(
                {
                    "instruction": "Which way did it move?",
                    "input": sentence,
                    "output": label,
                    "task_type": "direction",
                    "label": label,
                    "options": ("up", "down", "same"),
                    "doc_id": doc.id,
                }
            )
    return tasks


class MinerPlugin:
    def __init__(self, *miners):
        self.miners = list(miners)

    @hookimpl
    def task_miners(self, domain):
        if domain == DOMAIN.name:
            return self.miners


class RegisteringMinerPlugin(MinerPlugin):
    """A whole plugin for the plugin check: the domain as well as its miners."""

    @hookimpl
    def register_domains(self, register):
        register(DOMAIN)


class Scripted:
    """Well-formed new tasks, one per prompt, each different."""

    def __init__(self):
        self.calls = 0

    WORDS = [
        "accrual",
        "deferral",
        "goodwill",
        "leverage",
        "liquidity",
        "solvency",
        "coupon",
        "yield",
        "duration",
        "hedge",
        "swap",
        "option",
        "future",
        "dividend",
        "buyback",
        "margin",
        "turnover",
        "inventory",
        "receivable",
        "payable",
        "depreciation",
        "amortization",
        "impairment",
        "provision",
        "reserve",
        "equity",
        "debt",
        "covenant",
        "rating",
        "spread",
        "basis",
        "arbitrage",
        "collateral",
    ]

    def generate(self, prompts, *, seed=0, **options):
        self.calls += 1
        texts = []
        for number, _ in enumerate(prompts):
            words = random.Random(f"{seed}:{number}").sample(self.WORDS, 4)
            texts.append(f" Explain how {words[0]} and {words[1]} differ from {words[2]} or {words[3]}.")
        return [Completion(text, True, 12) for text in texts]


def make_ctx(tmp_path, name="run", **generate):
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, CORPUS)
    settings = load_settings(
        "tiny",
        overrides={
            "corpus": str(corpus),
            "generate": {
                "num_instructions": 5,
                "batch_size": 4,
                "max_rounds": 5,
                "num_mined": 5,
                "input_share": 0.0,
                **generate,
            },
        },
    )
    run = RunDir(tmp_path / name, DOMAIN.name).open()
    logged = []
    return StageContext(
        settings, DOMAIN, run, SEEDS, ModelRef("scripted", "unused"), run.partial_dir("generate"), logged.append
    ), logged


def run_generate(ctx, monkeypatch, generator=None):
    generator = generator or Scripted()
    monkeypatch.setattr(instructions, "make_generator", lambda *args, **kwargs: generator)
    return instructions.run_stage(ctx)


def test_sentences_keep_abbreviations_and_documents_join_windows():
    text = "Sales rose 5% in the U.S. market, e.g. in Ohio. Costs fell.\nA new line starts here"
    assert mining.sentences(text) == [
        "Sales rose 5% in the U.S. market, e.g. in Ohio.",
        "Costs fell.",
        "A new line starts here",
    ]
    windows = [Passage("a#1", "second half"), Passage("b", "whole"), Passage("a#0", "first half", "T")]
    assert [(d.id, d.text, d.title) for d in mining.documents(windows)] == [
        ("a", "first half second half", "T"),
        ("b", "whole", ""),
    ]


def test_sampling_balances_labels_and_shares_out_over_miners():
    tasks = [{"label": "a"}] * 10 + [{"label": "b"}] * 3 + [{"label": "c"}] * 6
    picked = Counter(t["label"] for t in mining.label_sample(tasks, 9, random.Random(0)))
    assert picked == {"a": 3, "b": 3, "c": 3}
    picked = Counter(t["label"] for t in mining.label_sample(tasks, 12, random.Random(0)))
    assert picked == {"a": 5, "b": 3, "c": 4}
    assert mining.share_out({"x": 100, "y": 2, "z": 100}, 10) == {"x": 4, "y": 2, "z": 4}
    assert mining.share_out({"x": 1}, 10) == {"x": 1}
    # Weights set each miner's share; one that runs short leaves its rest to the others.
    assert mining.share_out({"x": 1000, "y": 1000}, 300, {"x": 3.0, "y": 1.0}) == {"x": 225, "y": 75}
    assert mining.share_out({"x": 50, "y": 1000, "z": 1000}, 300, {"x": 3.0, "y": 1.0, "z": 2.0}) == {
        "x": 50,
        "y": 83,
        "z": 167,
    }


def test_label_prior_keeps_some_or_all_of_the_corpus_label_proportions():
    tasks = (
        [{"label": "yes", "n": i} for i in range(64)]
        + [{"label": "no", "n": i} for i in range(16)]
        + [{"label": "maybe", "n": i} for i in range(4)]
    )
    as_found = Counter(t["label"] for t in mining.label_sample(tasks, 42, random.Random(0), prior=1.0))
    assert as_found == {"yes": 32, "no": 8, "maybe": 2}
    square_roots = Counter(t["label"] for t in mining.label_sample(tasks, 28, random.Random(0), prior=0.5))
    assert square_roots == {"yes": 16, "no": 8, "maybe": 4}
    # A label that runs short leaves its rest to the others in their proportions; no task twice.
    picked = mining.label_sample(tasks, 80, random.Random(0), prior=0.5)
    assert Counter(t["label"] for t in picked)["maybe"] == 4 and len({id(t) for t in picked}) == 80


def test_only_precise_miners_run_by_default_and_unknown_names_are_refused(plugin):
    plugin(
        MinerPlugin(
            Miner("sure", label_miner, precision=0.95),
            Miner("unsure", label_miner, precision=0.6),
            Miner("unmeasured", label_miner),
        ),
        "miner-plugin",
    )
    assert [m.name for m in mining.chosen_miners(DOMAIN, "")] == ["sure"]
    assert [m.name for m in mining.chosen_miners(DOMAIN, "unsure, sure")] == ["unsure", "sure"]
    with pytest.raises(
        SelfspecError, match=r"generate.miners: no miner 'nope' for domain 'minetest'; available: sure, unsure"
    ):
        mining.chosen_miners(DOMAIN, "nope")
    # The core's generic miners join a domain that keeps them; a plugin miner of the same name replaces one.
    keeping = Domain("minetest", "mining tests")
    assert set(mining.available_miners(keeping)) == {"cause_effect", "sure", "unsure", "unmeasured"}


def test_stage_mixes_mined_and_generated_records(tmp_path, monkeypatch, plugin):
    plugin(MinerPlugin(Miner("direction", label_miner, precision=1.0)), "miner-plugin")
    ctx, logged = make_ctx(tmp_path)
    counts = run_generate(ctx, monkeypatch)
    mined = read_jsonl(ctx.work / "mined.jsonl")
    generated = read_jsonl(ctx.work / "instructions.jsonl")
    assert len(mined) == 5 and len(generated) == 5  # 5 mined beside the 5 the model wrote
    assert counts["sources"] == {"generated": 5, "mined": 5}
    assert counts["mined"]["direction"]["found"] == 24 and counts["mined"]["direction"]["kept"] == 5
    assert {r["source"] for r in mined} == {"mined"} and {r["miner"] for r in mined} == {"direction"}
    assert [r["id"] for r in mined] == [f"minetest-mined-{n:05d}" for n in range(1, 6)]
    assert max(Counter(r["label"] for r in mined).values()) == 2  # 5 over 3 labels: 2/2/1
    assert all(r["output"] == r["label"] and r["options"] == ["up", "down", "same"] for r in mined)
    assert any("mined 5 tasks" in line and "direction 5 of 24" in line for line in logged)


def test_all_mined_needs_no_generation(tmp_path, monkeypatch, plugin):
    plugin(MinerPlugin(Miner("direction", label_miner, precision=1.0)), "miner-plugin")
    ctx, _ = make_ctx(tmp_path, num_instructions=0, num_mined=10)
    generator = Scripted()
    counts = run_generate(ctx, monkeypatch, generator)
    assert counts["sources"] == {"generated": 0, "mined": 10} and generator.calls == 0


def test_a_failing_or_warning_miner_is_named_and_the_others_go_on(tmp_path, monkeypatch, plugin):
    import warnings

    def broken(docs, rng):
        raise ValueError("bad regex")

    def sloppy(docs, rng):
        warnings.warn("3 tables had no numbers and were skipped (e.g. doc1)", stacklevel=2)
        return [{"instruction": "Q?", "input": "x", "output": "", "task_type": "t"}] + label_miner(docs, rng)[:2]

    plugin(
        MinerPlugin(Miner("broken", broken, 1.0), Miner("sloppy", sloppy, 1.0), Miner("direction", label_miner, 1.0)),
        "miner-plugin",
    )
    ctx, logged = make_ctx(tmp_path)
    counts = run_generate(ctx, monkeypatch)
    problems = [line for line in logged if "miner '" in line]
    assert problems == [
        "[generate] miner 'broken': failed: ValueError: bad regex; going on without it",
        "[generate] miner 'sloppy': 3 tables had no numbers and were skipped (e.g. doc1); "
        "1 of 3 tasks lack instruction/output/task_type as text and were left out",
    ]
    assert counts["mined"]["broken"]["error"].startswith("failed: ValueError")
    assert counts["sources"]["mined"] == 5 and counts["mined"]["sloppy"]["kept"] == 2
    assert counts["sources"]["generated"] == 5


def test_corpus_with_nothing_to_mine_or_no_corpus_leaves_generated_instructions_only(tmp_path, monkeypatch, plugin):
    plugin(MinerPlugin(Miner("nothing", lambda docs, rng: [], 1.0)), "miner-plugin")
    ctx, logged = make_ctx(tmp_path)
    counts = run_generate(ctx, monkeypatch)
    assert counts["sources"] == {"generated": 5, "mined": 0}
    assert any(
        "no miner (nothing) found a task in" in line and "(8 documents): generated instructions only" in line
        for line in logged
    )
    ctx, logged = make_ctx(tmp_path, name="nocorpus")
    ctx.settings.corpus = None
    assert run_generate(ctx, monkeypatch)["sources"] == {"generated": 5, "mined": 0}
    assert any("no corpus to mine tasks from for domain 'minetest'" in line for line in logged)


def test_resumed_stage_keeps_its_mined_records_without_mining_again(tmp_path, monkeypatch, plugin):
    calls = []

    def counted(docs, rng):
        calls.append(1)
        return label_miner(docs, rng)

    plugin(MinerPlugin(Miner("direction", counted, 1.0)), "miner-plugin")
    whole, _ = make_ctx(tmp_path, name="whole")
    run_generate(whole, monkeypatch)

    class Killed(Scripted):
        def generate(self, prompts, **options):
            if self.calls == 1:
                raise KeyboardInterrupt("killed")
            return super().generate(prompts, **options)

    killed, _ = make_ctx(tmp_path, name="killed")
    with pytest.raises(KeyboardInterrupt):
        run_generate(killed, monkeypatch, Killed())
    calls.clear()
    resumed, _ = make_ctx(tmp_path, name="killed")
    run_generate(resumed, monkeypatch)
    assert calls == []  # mined once, before the kill
    for name in ("mined.jsonl", "instructions.jsonl"):
        assert (resumed.work / name).read_bytes() == (whole.work / name).read_bytes()


def test_report_funnel_shows_both_sources():
    generate = {"mined": {"direction": {"found": 24, "kept": 5}, "tables": {"found": 3, "kept": 3}}}
    assert report._source_steps("generate", generate) == [
        ("tasks mined from the corpus", 8, False),
        ("  mined: direction", 5, False),
        ("  mined: tables", 3, False),
    ]
    assert report._source_steps("respond", {"sources": {"generated": 4, "mined": 8}}) == [
        ("  of them generated", 4, False),
        ("  of them mined", 8, False),
    ]
    assert report._source_steps("generate", {}) == []


def test_respond_adds_mined_records_as_they_are_after_the_plugin_filters(tmp_path, tiny_model_dir, plugin):
    from selfspec_core.run.pipeline import Pipeline

    class Filter:
        @hookimpl
        def filter_record(self, domain, stage, record):
            return "banned" if stage == "response" and "town 3" in record["input"] else None

    plugin(Filter(), "filter-plugin")
    run = RunDir(tmp_path / "run", DOMAIN.name).open()
    generated = [
        {
            "id": "g1",
            "instruction": "Explain what a coupon is.",
            "input": "",
            "task_type": "definition",
            "seed_ids": ["s0"],
            "round": 1,
            "source": "generated",
        }
    ]
    tasks = label_miner([Passage(d["id"], d["text"]) for d in CORPUS[:4]], random.Random(0))
    mined = [
        {
            "id": f"m{n}",
            **{k: t[k] for k in ("instruction", "input", "output", "task_type", "label", "doc_id")},
            "options": list(t["options"]),
            "source": "mined",
            "miner": "direction",
        }
        for n, t in enumerate(tasks)
    ]
    write_jsonl(run.partial_dir("generate") / "instructions.jsonl", generated)
    write_jsonl(run.partial_dir("generate") / "mined.jsonl", mined)
    run.finish("generate", {"config_hash": "t", "input_hash": "t"})
    settings = load_settings(
        "tiny",
        overrides={
            "model": str(tiny_model_dir),
            "respond": {"retrieval": False, "max_new_tokens": 8, "response_checks": "", "max_label_share": 1.0},
        },
    )
    Pipeline(settings, DOMAIN, run, SEEDS, log=lambda line: None).run_stages(["respond"])
    data = read_jsonl(run.stage_dir("respond") / "data.jsonl")
    manifest = run.manifest("respond")
    kept_mined = [r for r in data if r["source"] == "mined"]
    assert len(kept_mined) == 11 and manifest["funnel"]["dropped"] == {"plugin:filter-plugin:banned": 1}
    assert all(r["output"] == r["label"] and r["answer"] == "mined" and r["miner"] == "direction" for r in kept_mined)
    assert manifest["sources"] == {"generated": 1, "mined": 11} and manifest["answers"]["mined"] == 11
    assert {r["source"] for r in data if r["id"] == "g1"} == {"generated"}


def test_check_plugin_checks_the_miners(plugin):
    from selfspec_core.authoring.check import check_plugin

    plugin(RegisteringMinerPlugin(Miner("direction", label_miner, 0.95), Miner("draft", label_miner)), "good-miners")
    checked = check_plugin("good-miners")
    notes = checked.notes
    assert not checked.problems
    assert (
        "task_miners (domain minetest): miner 'draft' has no measured precision: off unless generate.miners names it"
        in notes
    )
    assert "task_miners (domain minetest): 2 miners, 1 on by default" in notes

    class Bad:
        @hookimpl
        def register_domains(self, register):
            register(Domain("minebad", "bad miners"))

        @hookimpl
        def task_miners(self, domain):
            return ["not a miner"] if domain == "minebad" else None

    plugin(Bad(), "bad-miners")
    assert (
        "plugin 'bad-miners': hook task_miners (domain minebad): expected a list of Miner"
        in check_plugin("bad-miners").problems
    )


@pytest.mark.parametrize(
    "setting, problem",
    [
        (
            {"weight": 0},
            "weight 0 gets it no records: a weight is its share beside the domain's other miners, "
            "so it must be positive",
        ),
        (
            {"label_prior": 2.0},
            "label_prior 2.0 is outside 0 (labels balanced) to 1 (labels as often as the corpus has them)",
        ),
    ],
)
def test_check_plugin_refuses_a_miner_weighted_to_nothing_or_with_a_label_prior_out_of_range(plugin, setting, problem):
    from selfspec_core.authoring.check import check_plugin

    plugin(RegisteringMinerPlugin(Miner("direction", label_miner, 0.95, **setting)), "odd-miner")
    assert (
        f"plugin 'odd-miner': hook task_miners (domain minetest): miner 'direction': {problem}"
        in check_plugin("odd-miner").problems
    )
