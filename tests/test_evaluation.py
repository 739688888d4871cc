import dataclasses
import json
from pathlib import Path

import pytest

from selfspec_core.config import load_settings
from selfspec_core.data.tasks import CHOICE_SCORES, EvalItem, EvalTask
from selfspec_core.errors import SelfspecError
from selfspec_core.eval.scoring import ItemScore, compare_suite, rescore
from selfspec_core.hookspecs import hookimpl
from selfspec_core.models.loading import ModelRef
from selfspec_core.models.prompting import PromptFormat
from selfspec_core.plugins import manager as plugins
from selfspec_core.plugins.defaults import TRAIN_TEMPLATE
from selfspec_core.records import Domain
from selfspec_core.run.pipeline import Pipeline
from selfspec_core.run.rundir import RecordLog, RunDir, read_jsonl, write_jsonl
from selfspec_core.stages.evaluate import (
    answer_stops,
    check_contamination,
    clean_summary,
    collect_tasks,
    content_free,
    evaluate_file,
    find_overlaps,
    headline_of,
    item_texts,
    load_tasks,
    ngram_overlap,
    read_items,
    render_prompt,
    score_model,
    split_items,
    task_summary,
    unscored_members,
)

ALPACA = PromptFormat("alpaca", TRAIN_TEMPLATE)  # the form of adapters trained before formats were recorded

SENTENCES = [
    (
        "Quarterly operating income at the Lisbon packaging unit climbed to EUR 21.4 million "
        "from EUR 15.2 million a year earlier",
        "positive",
    ),
    ("The company said that its net sales in the first quarter fell by a quarter compared with last year", "negative"),
    ("The annual general meeting of the shareholders will be held in Helsinki on the first of April", "neutral"),
    (
        "Pre-tax earnings at the ferry operator slid to EUR 4.1 million, "
        "far below the EUR 19.6 million of the prior year",
        "negative",
    ),
    ("Revenue grew on the back of higher freight volumes and two new warehouse contracts", "positive"),
    ("The contract covers the installation of cables in the new office building", "neutral"),
    ("Premium income in the insurance arm nearly tripled to EUR 9.3 million from EUR 3.4 million", "positive"),
    ("The share of the company fell sharply after the profit warning on Monday", "negative"),
    ("The board proposes a dividend of EUR 0.20 per share for the financial year", "neutral"),
    ("Finnish retailer reported a rise in quarterly sales driven by strong demand", "positive"),
    ("Component supplier cut its forecast and announced layoffs at two plants", "negative"),
]
LEAKED = SENTENCES[0][0]


def load_sentences(path: Path) -> list[EvalItem]:
    """The test benchmark's own format: one ``sentence@label`` per line."""
    items = []
    for number, line in enumerate(path.read_text().splitlines()):
        sentence, label = line.rsplit("@", 1)
        items.append(
            EvalItem(
                str(number),
                "Classify the sentiment of the sentence as positive, negative or neutral.",
                sentence,
                label,
                ("positive", "negative", "neutral"),
            )
        )
    return items


def load_questions(path: Path) -> list[EvalItem]:
    return [EvalItem(row["qid"], row["question"], "", row["answer"]) for row in read_jsonl(path)]


class TinyTasks:
    """A test plugin: two domains, each with benchmarks in their own file formats."""

    @hookimpl
    def register_domains(self, register):
        register(Domain("tinydom", "tiny finance test domain"))
        register(Domain("otherdom", "another test domain"))

    @hookimpl
    def evaluation_tasks(self, domain):
        if domain == "tinydom":
            return [
                EvalTask("sentiment", "tinydom", "tiny/sentences.txt", load_sentences),
                EvalTask(
                    "numbers",
                    "tinydom",
                    "tiny/numbers.jsonl",
                    load_questions,
                    mode="generate",
                    metric="numeric",
                    max_new_tokens=4,
                ),
                EvalTask("absent", "tinydom", "tiny/not_there.json", load_questions),
            ]
        if domain == "otherdom":
            return [EvalTask("other_qa", "otherdom", "other/qa.jsonl", load_questions, mode="generate", metric="f1")]
        return None


@pytest.fixture
def tiny_plugin():
    manager = plugins.get_plugin_manager()
    manager.register(TinyTasks(), name="tiny-tasks")
    yield
    manager.unregister(name="tiny-tasks")


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "data"
    (root / "tiny").mkdir(parents=True)
    (root / "other").mkdir()
    (root / "tiny" / "sentences.txt").write_text("\n".join(f"{s}@{label}" for s, label in SENTENCES) + "\n")
    write_jsonl(
        root / "tiny" / "numbers.jsonl",
        [{"qid": f"n{i}", "question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(5)],
    )
    write_jsonl(
        root / "other" / "qa.jsonl",
        [{"qid": f"q{i}", "question": f"Name test entity number {i}.", "answer": f"entity {i}"} for i in range(4)],
    )
    return root


def _settings(tiny_model_dir, data_dir, **evaluate):
    return load_settings(
        "tiny",
        overrides={
            "model": str(tiny_model_dir),
            "data_dir": str(data_dir),
            "evaluate": {"bootstrap_samples": 100, **evaluate},
        },
    )


def _make_adapter(tiny_model_dir, folder: Path) -> Path:
    """A LoRA adapter with random (non-zero) weights, so the specialized model differs from the base."""
    import torch
    from peft import LoraConfig, get_peft_model

    from selfspec_core.models.loading import load_model

    torch.manual_seed(1)
    model = get_peft_model(
        load_model(ModelRef("tiny", str(tiny_model_dir))),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(folder)
    return folder


def test_tasks_can_be_chosen_by_name_and_by_scoring_mode(tiny_plugin):
    def names(tasks):  # not the installed plugins'
        return sorted(t.name for t in tasks if t.domain in ("tinydom", "otherdom"))

    own, others = collect_tasks("tinydom")
    assert names(own) == ["absent", "numbers", "sentiment"] and names(others) == ["other_qa"]
    own, others = collect_tasks("tinydom", modes="loglikelihood")
    assert names(own) == ["absent", "sentiment"] and names(others) == []
    assert {t.mode for t in others} == {"loglikelihood"}
    own, others = collect_tasks("tinydom", wanted="numbers,other_qa", modes="generate")
    assert names(own) == ["numbers"] and names(others) == ["other_qa"]


def test_split_items_holds_out_demonstrations_and_caps_items():
    task = EvalTask("t", "d", "f", load_questions)
    items = [EvalItem(str(i), f"q{i}", "", "a") for i in range(10)]
    loaded = split_items(task, items, shots=2, max_items=3, seed=5)
    assert len(loaded.demos) == 2 and len(loaded.scored) == 3
    assert not {d.id for d in loaded.demos} & {s.id for s in loaded.scored}
    assert [s.id for s in loaded.scored] == sorted((s.id for s in loaded.scored), key=int)  # file order kept
    assert split_items(task, items, shots=2, max_items=3, seed=5) == loaded
    assert len(split_items(task, items, shots=0, max_items=0, seed=5).scored) == 10
    fewer = split_items(task, items, shots=2, max_items=2, seed=5).scored
    assert set(fewer) < set(loaded.scored)  # a smaller cap scores a subset of the same items


def test_prompt_uses_the_training_format_with_optional_shots():
    item = EvalItem("1", "Classify the sentiment.", "Sales rose.", "positive")
    demo = EvalItem("2", "Classify the sentiment.", "Sales fell.", "negative")
    zero_shot = render_prompt(ALPACA, item, [])
    assert zero_shot == TRAIN_TEMPLATE.render([], {"instruction": item.instruction, "input": item.input})
    assert zero_shot.endswith("### Input:\nSales rose.\n\n### Response:\n")
    one_shot = render_prompt(ALPACA, item, [demo])
    assert one_shot.startswith(render_prompt(ALPACA, demo, []) + "negative\n\n")
    assert one_shot.endswith(zero_shot)


def test_answers_stop_at_the_next_section_and_short_ones_at_a_blank_line():
    short, free = answer_stops(TRAIN_TEMPLATE, "accuracy"), answer_stops(TRAIN_TEMPLATE, "rouge_l")
    assert "\n###" in short and "\nBelow is an instruction" in short and "\n\n" in short
    assert "\n\n" not in free and "\n###" in free


def test_missing_data_is_skipped_with_a_message(tmp_path, monkeypatch):
    task = EvalTask("absent", "tinydom", "tiny/not_there.json", load_questions)
    assert "SELFSPEC_DATA" in read_items(task, None)
    message = read_items(task, tmp_path)
    assert str(tmp_path / "tiny" / "not_there.json") in message and "put tiny/not_there.json under" in message
    lines = []
    monkeypatch.delenv("SELFSPEC_DATA", raising=False)
    loaded, skipped = load_tasks([task], load_settings("tiny", overrides={"data_dir": str(tmp_path)}), lines.append)
    assert loaded == [] and list(skipped) == ["tinydom/absent"] and lines == [f"[evaluate] {message}"]


def test_a_loader_that_fails_names_task_and_file(tmp_path):
    (tmp_path / "bad.txt").write_text("no label here\n")
    task = EvalTask("sentiment", "tinydom", "bad.txt", load_sentences)
    with pytest.raises(SelfspecError, match=r"task sentiment \(tinydom\): could not read .*bad.txt"):
        read_items(task, tmp_path)


def test_contamination_finds_planted_overlap():
    items = load_sentences_from(SENTENCES)
    texts = item_texts(items)
    assert all("Classify the sentiment" not in t for t in texts)  # shared task wording is not content
    records = [
        {
            "id": "clean",
            "instruction": "Summarize the text.",
            "input": "Profits were flat this year.",
            "output": "Flat.",
        },
        {
            "id": "leak",
            "instruction": "What is the sentiment?",
            "input": f"News: {LEAKED.upper()}!",
            "output": "positive",
        },
        {
            "id": "wording",
            "instruction": "Classify the sentiment of the sentence as positive, negative or neutral.",
            "input": "",
            "output": "neutral",
        },
    ]
    assert find_overlaps([r["instruction"] + " " + r["input"] for r in records], texts, 13) == {1: {0}}
    shared = ngram_overlap([LEAKED], [SENTENCES[0][0] + " and more"], 13)
    assert "quarterly operating income at the lisbon packaging unit climbed to eur 21 4" in shared
    assert ngram_overlap([LEAKED], [SENTENCES[1][0]], 13) == set()
    assert ngram_overlap(["a b c"], ["a b c"], 13) == set()  # shorter than n: cannot be checked

    task = EvalTask("sentiment", "tinydom", "f", load_sentences)
    loaded = split_items(task, items, shots=0, max_items=4, seed=0)
    report, touched = check_contamination(records, [loaded], 13)
    assert touched == {("tinydom/sentiment", "0")}
    entry = report["tasks"]["tinydom/sentiment"]
    assert entry["items_touched"] == 1 and entry["share"] == pytest.approx(1 / len(items))
    assert entry["training_records"] == ["leak"]
    assert report["overlapping_records"][0]["id"] == "leak"
    assert report["overlapping_records"][0]["items"] == ["tinydom/sentiment:0"]


def load_sentences_from(pairs):
    return [
        EvalItem(
            str(i),
            "Classify the sentiment of the sentence as positive, negative or neutral.",
            s,
            label,
            ("positive", "negative", "neutral"),
        )
        for i, (s, label) in enumerate(pairs)
    ]


def test_scores_cached_for_a_model_are_not_recomputed(tmp_path, tiny_model_dir, data_dir):
    settings = _settings(tiny_model_dir, data_dir)
    task = EvalTask("sentiment", "tinydom", "tiny/sentences.txt", load_sentences)
    loaded = [split_items(task, read_items(task, data_dir), 0, 4, 0)]
    cache = RecordLog(tmp_path / "scored.jsonl")
    first = score_model("base", settings, ModelRef("tiny", str(tiny_model_dir)), None, loaded, ALPACA, print, cache)
    # a model that cannot be loaded proves the second call reads the cache instead of scoring again
    again = score_model(
        "base",
        settings,
        ModelRef("gone", str(tmp_path / "gone")),
        None,
        loaded,
        ALPACA,
        print,
        RecordLog(tmp_path / "scored.jsonl"),
    )
    assert again == first


def test_evaluate_stage_end_to_end(tmp_path, tiny_model_dir, data_dir, tiny_plugin, capsys):
    settings = _settings(tiny_model_dir, data_dir, cross_domain_max_items=3)
    run = RunDir(tmp_path / "run", "tinydom").open()
    write_jsonl(
        run.partial_dir("respond") / "data.jsonl",
        [
            {"id": "r1", "instruction": "Explain the result.", "input": LEAKED, "output": "Profit rose."},
            {"id": "r2", "instruction": "Define EBITDA.", "input": "", "output": "Earnings before interest."},
        ],
    )
    run.finish("respond", {"funnel": {"generated": 2, "kept": 2, "dropped": {}}})
    _make_adapter(tiny_model_dir, run.partial_dir("train") / "adapter")
    run.finish("train", {})

    Pipeline(settings, plugins.get_domain("tinydom"), run, seeds=[]).run_stages(["evaluate"])

    folder = run.stage_dir("evaluate")
    report = json.loads((folder / "eval.json").read_text())
    sentiment = report["sentiment"]
    assert (
        sentiment["metric"] == "accuracy" and sentiment["mode"] == "loglikelihood" and sentiment["domain"] == "tinydom"
    )
    assert sentiment["n"] == 8  # the tiny profile's max_items
    assert sentiment["delta"] == pytest.approx(sentiment["specialized"] - sentiment["base"], abs=1e-6)
    assert sentiment["ci"][0] <= sentiment["delta"] <= sentiment["ci"][1]
    gold = sentiment["answers"]["gold"]
    assert sum(gold.values()) == 8 and sentiment["majority"] == {
        "answer": max(gold, key=gold.get),
        "share": max(gold.values()) / 8,
    }
    assert sum(sentiment["answers"]["specialized"].values()) == sum(sentiment["answers"]["base"].values()) == 8
    f1 = sentiment["macro_f1"]
    assert set(f1) == {"base", "specialized", "majority", "delta", "ci"} and 0 <= f1["majority"] <= 1 / 2
    assert f1["ci"][0] <= f1["delta"] <= f1["ci"][1] and "macro_f1" not in report["numbers"]
    assert "majority" not in report["numbers"] and "answers" not in report["cross_domain"]["other_qa"]
    # every way of picking, from the same log-probabilities; the headline's figures lead
    assert sentiment["headline"] == "acc" and set(sentiment["variants"]) == set(CHOICE_SCORES)
    headline = sentiment["variants"]["acc"]
    assert {key: headline[key] for key in ("base", "specialized", "delta", "ci", "n", "macro_f1")} == {
        key: sentiment[key] for key in ("base", "specialized", "delta", "ci", "n", "macro_f1")
    }
    assert headline["answers"] == {key: sentiment["answers"][key] for key in ("base", "specialized")}
    for variant in sentiment["variants"].values():
        assert variant["n"] == 8 and sum(variant["answers"]["base"].values()) == 8
        assert variant["macro_f1"]["majority"] == f1["majority"]
    assert "variants" not in report["numbers"] and "headline" not in report["numbers"]
    assert report["numbers"]["metric"] == "numeric" and report["numbers"]["n"] == 5
    assert report["absent"]["n"] == 0 and "tiny/not_there.json" in report["absent"]["skipped"]
    logged = capsys.readouterr().out
    assert "[evaluate] task absent (tinydom) skipped" in logged
    assert report["cross_domain"]["other_qa"]["domain"] == "otherdom" and report["cross_domain"]["other_qa"]["n"] == 3

    # The bundled plugins' shipped benchmarks are found with no data directory, and scored cross-domain.
    shipped = ("pubmedqa", "pubmedqa_gen", "tatqa")
    assert [report["cross_domain"][name]["n"] for name in shipped] == [3, 3, 3]
    predictions = read_jsonl(folder / "predictions.jsonl")
    assert len(predictions) == 8 + 5 + 3 + 3 * len(shipped)  # other domains' tasks capped at cross_domain_max_items
    rows = [p for p in predictions if p["task"] == "sentiment"]
    assert sum(p["base_score"] for p in rows) / len(rows) == pytest.approx(sentiment["base"])
    assert sum(p["specialized_score"] for p in rows) / len(rows) == pytest.approx(sentiment["specialized"])
    assert any(p["base_logprobs"] != p["specialized_logprobs"] for p in rows)  # the adapter was applied

    contamination = json.loads((folder / "contamination.json").read_text())
    assert sum(p["contaminated"] for p in rows) == contamination["tasks"]["tinydom/sentiment"]["scored_items_touched"]
    assert contamination["tasks"]["tinydom/sentiment"]["training_records"] == ["r1"]
    assert contamination["tasks"]["tinydom/sentiment"]["items_touched"] == 1
    assert [r["id"] for r in contamination["overlapping_records"]] == ["r1"]

    # the domain's suite: its scored tasks' macro-average (each weighs the same), the missing one named
    suite = json.loads((folder / "suite.json").read_text())
    assert suite["tasks"] == {
        name: {key: report[name][key] for key in ("base", "specialized", "n")} for name in ("sentiment", "numbers")
    }
    assert suite["base"] == pytest.approx((sentiment["base"] + report["numbers"]["base"]) / 2, abs=1e-6)
    assert suite["specialized"] == pytest.approx(
        (sentiment["specialized"] + report["numbers"]["specialized"]) / 2, abs=1e-6
    )
    assert suite["ci"][0] <= suite["delta"] <= suite["ci"][1] and set(suite["missing"]) == {"absent"}
    assert "[evaluate] suite (sentiment, numbers; macro-average)" in logged
    # a member that evaluate.modes leaves out is named with why
    only_loglikelihood = dataclasses.replace(settings.evaluate, modes="loglikelihood")
    own, _ = collect_tasks("tinydom", False, "", "loglikelihood")
    assert unscored_members("tinydom", own, {}, only_loglikelihood) == {
        "numbers": "scored by generate, which evaluate.modes='loglikelihood' leaves out"
    }

    manifest = run.manifest("evaluate")
    assert manifest["tasks"] == 3 + len(shipped) and manifest["skipped"] >= 1 and manifest["contaminating_records"] == 1
    assert manifest["suite"] == {key: suite[key] for key in ("base", "specialized", "delta", "ci")}
    assert not (folder / "scored.jsonl").exists()

    # the report reads what the stage wrote
    from selfspec_core.run.context import StageContext
    from selfspec_core.stages import report

    report.run_stage(
        StageContext(
            settings,
            plugins.get_domain("tinydom"),
            run,
            [],
            ModelRef("tiny", str(tiny_model_dir)),
            run.partial_dir("report"),
        )
    )
    markdown = (run.partial_dir("report") / "report.md").read_text()
    assert f"| sentiment | tinydom | accuracy | loglikelihood | 8 | {sentiment['base']:.3f} |" in markdown
    assert "| other_qa | otherdom | f1 | generate | 3 |" in markdown
    assert "| tinydom/sentiment | 11 | 1 |" in markdown
    assert "| sentiment | acc (headline) |" in markdown and "| sentiment | acc_calibrated |" in markdown
    # the suite leads the results
    assert markdown.index("## Domain suite") < markdown.index("## Base vs specialized")
    assert f"| macro-average | 2 | {suite['base']:.3f} | {suite['specialized']:.3f} |" in markdown
    assert "Not scored, so not in the average: absent" in markdown

    # drop_contaminated: the leaked sentence (scored, id 0) leaves the score; the full one stays beside
    settings.evaluate.drop_contaminated = True
    Pipeline(settings, plugins.get_domain("tinydom"), run, seeds=[]).run_stages(["evaluate"])
    clean = json.loads((folder / "eval.json").read_text())["sentiment"]
    assert clean["contaminated_dropped"] == 1 and clean["n"] == 7 and clean["contaminated_scored"] == 0
    assert clean["full"] == {key: sentiment[key] for key in ("base", "specialized", "delta", "ci", "n")}
    kept = [p for p in read_jsonl(folder / "predictions.jsonl") if p["task"] == "sentiment" and not p["contaminated"]]
    assert [p["id"] for p in kept] == ["1", "2", "4", "6", "8", "9", "10"]
    assert clean["base"] == pytest.approx(sum(p["base_score"] for p in kept) / 7, abs=1e-6)
    assert clean["specialized"] == pytest.approx(sum(p["specialized_score"] for p in kept) / 7, abs=1e-6)
    assert sum(clean["answers"]["gold"].values()) == 7 and clean["variants"]["acc_norm"]["n"] == 7
    clean_suite = json.loads((folder / "suite.json").read_text())  # counts the clean items, as the task's row
    assert clean_suite["tasks"]["sentiment"] == {key: clean[key] for key in ("base", "specialized", "n")}


def test_edited_benchmark_data_makes_the_evaluation_stale(tmp_path, tiny_model_dir, data_dir, tiny_plugin):
    settings = _settings(tiny_model_dir, data_dir)
    run = RunDir(tmp_path / "run", "tinydom").open()
    write_jsonl(
        run.partial_dir("respond") / "data.jsonl",
        [{"id": "r1", "instruction": "Define EBITDA.", "input": "", "output": "x"}],
    )
    run.finish("respond", {})
    _make_adapter(tiny_model_dir, run.partial_dir("train") / "adapter")
    run.finish("train", {})
    pipeline = Pipeline(settings, plugins.get_domain("tinydom"), run, seeds=[])
    before = pipeline.input_hash("evaluate")
    assert pipeline.input_hash("evaluate") == before
    sentences = data_dir / "tiny" / "sentences.txt"
    sentences.write_text(sentences.read_text().replace("@positive", "@negative", 1))
    assert pipeline.input_hash("evaluate") != before


def test_evaluate_stage_without_an_adapter_says_what_to_do(tmp_path, tiny_model_dir, data_dir, tiny_plugin):
    run = RunDir(tmp_path / "run", "tinydom").open()
    write_jsonl(run.partial_dir("respond") / "data.jsonl", [])
    run.finish("respond", {})
    settings = _settings(tiny_model_dir, data_dir, adapter=str(tmp_path / "nowhere"))
    from selfspec_core.run.context import StageContext
    from selfspec_core.stages import evaluate as evaluation

    ctx = StageContext(
        settings,
        plugins.get_domain("tinydom"),
        run,
        [],
        ModelRef("tiny", str(tiny_model_dir)),
        run.partial_dir("evaluate"),
    )
    with pytest.raises(SelfspecError, match="adapter folder not found"):
        evaluation.run_stage(ctx)
    settings.evaluate.adapter = ""  # the run's own adapter, not trained yet
    with pytest.raises(SelfspecError, match=r"no adapter to evaluate; run `selfspec train --domain tinydom --out"):
        evaluation.run_stage(ctx)


def _write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_the_stage_poses_both_models_the_form_the_adapter_learnt(
    tmp_path, chat_model_dir, data_dir, tiny_plugin, monkeypatch
):
    from selfspec_core.run.adapter import TRAINING_INFO
    from selfspec_core.stages import evaluate as evaluation

    settings = _settings(chat_model_dir, data_dir, tasks="sentiment", cross_domain=False, cache_base_scores=False)
    run = RunDir(tmp_path / "run", "tinydom").open()
    write_jsonl(run.partial_dir("respond") / "data.jsonl", [{"instruction": "Define EBITDA.", "output": "Earnings."}])
    run.finish("respond", {})
    adapter = _make_adapter(chat_model_dir, run.partial_dir("train") / "adapter")
    (adapter / TRAINING_INFO).write_text(json.dumps({"prompt_format": "chat"}))
    run.finish("train", {})
    posed, real = [], evaluation.score_task
    monkeypatch.setattr(
        evaluation,
        "score_task",
        lambda gen, task, asked, *rest: posed.append(asked.prompts) or real(gen, task, asked, *rest),
    )

    Pipeline(settings, plugins.get_domain("tinydom"), run, seeds=[]).run_stages(["evaluate"])

    assert len(posed) == 2 and posed[0] == posed[1]  # base and specialized, asked alike
    assert all(p.startswith("<|im_start|>user\n") and p.endswith("<|im_start|>assistant\n") for p in posed[0])


def test_evaluate_file_with_and_without_choices(tmp_path, tiny_model_dir, data_dir):
    settings = _settings(tiny_model_dir, data_dir, max_items=0)
    rows = [
        {"instruction": "Sentiment?", "input": s, "output": label, "choices": ["positive", "negative", "neutral"]}
        for s, label in SENTENCES[:4]
    ]
    rows += [{"instruction": f"What is {i} plus {i}?", "output": str(2 * i)} for i in range(3)]
    eval_file = _write_rows(tmp_path / "mine.jsonl", rows)
    adapter = _make_adapter(tiny_model_dir, tmp_path / "adapter")

    alone = evaluate_file(settings, eval_file, metric="numeric")
    assert set(alone) == {"mine:choices", "mine:generate"}
    assert alone["mine:choices"] == {
        "metric": "accuracy",
        "mode": "loglikelihood",
        "n": 4,
        "value": alone["mine:choices"]["value"],
        "headline": "acc",  # how the answers were picked (evaluate.headline)
    }
    assert alone["mine:generate"]["metric"] == "numeric" and alone["mine:generate"]["n"] == 3

    output = tmp_path / "out" / "result.json"
    compared = evaluate_file(settings, eval_file, metric="numeric", adapter=adapter, output=output)
    assert json.loads(output.read_text()) == compared
    choices = compared["mine:choices"]
    assert choices["base"] == alone["mine:choices"]["value"]  # the same base model, the same items
    assert choices["delta"] == pytest.approx(choices["value"] - choices["base"], abs=1e-6)
    assert choices["ci"][0] <= choices["delta"] <= choices["ci"][1]

    single = evaluate_file(settings, _write_rows(tmp_path / "free.jsonl", rows[4:]))
    assert list(single) == ["free"] and single["free"]["metric"] == "rouge_l"


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"instruction": "x", "output": ', r"bad.jsonl:2: not valid JSON"),
        ({"instruction": "x"}, r"bad.jsonl:2: field 'output': missing or empty"),
        ({"instruction": "", "output": "y"}, r"bad.jsonl:2: field 'instruction'"),
        ({"instruction": "x", "input": 3, "output": "y"}, r"bad.jsonl:2: field 'input': expected a string"),
        (
            {"instruction": "x", "output": "maybe", "choices": ["yes", "no"]},
            r"bad.jsonl:2: field 'output': 'maybe' is not one of",
        ),
        (
            {"instruction": "x", "output": "yes", "choices": ["yes"]},
            r"bad.jsonl:2: field 'choices': needs at least two",
        ),
        (
            {"instruction": "x", "output": "yes", "choice": ["yes", "no"]},
            r"bad.jsonl:2: field 'choice': unknown field \(did you mean 'choices'\?\)",
        ),
    ],
)
def test_evaluate_file_bad_rows_name_file_line_and_field(tmp_path, tiny_model_dir, data_dir, row, message):
    bad = _write_rows(tmp_path / "bad.jsonl", [{"instruction": "ok", "output": "fine"}, row])
    with pytest.raises(SelfspecError, match=message):
        evaluate_file(_settings(tiny_model_dir, data_dir), bad)


def test_base_scores_are_reused_across_runs_until_anything_that_could_change_them_changes(
    tmp_path, tiny_model_dir, data_dir, monkeypatch
):
    from selfspec_core.stages import evaluate as evaluation

    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path / "cache"))
    settings = _settings(tiny_model_dir, data_dir)
    task = EvalTask("sentiment", "tinydom", "tiny/sentences.txt", load_sentences)
    loaded = [split_items(task, read_items(task, data_dir), 0, 4, 0)]
    ref = ModelRef("tiny", str(tiny_model_dir))
    first = score_model("base", settings, ref, None, loaded, ALPACA, print)
    assert len(list((tmp_path / "cache" / "scores").glob("*.json"))) == 1

    loads = []
    real = evaluation.make_generator
    monkeypatch.setattr(evaluation, "make_generator", lambda *a, **k: loads.append(1) or real(*a, **k))
    lines = []
    assert score_model("base", settings, ref, None, loaded, ALPACA, lines.append) == first
    assert loads == [] and "cached in" in lines[0]  # a second run: no model loaded at all

    other_prompt = {"domain": "x", "description": "another domain's wording"}
    template = dataclasses.replace(TRAIN_TEMPLATE, header="You answer questions about {description}.")
    score_model("base", settings, ref, None, loaded, PromptFormat("alpaca", template, context=other_prompt), print)
    assert loads == [1]  # another prompt misses
    lenient = [split_items(dataclasses.replace(task, tolerance=0.5), read_items(task, data_dir), 0, 4, 0)]
    score_model("base", settings, ref, None, lenient, ALPACA, print)
    assert loads == [1, 1]  # another scoring setting misses
    calibrated = score_model(
        "base",
        _settings(tiny_model_dir, data_dir, headline="acc_calibrated"),
        ref,
        None,
        loaded,
        ALPACA,
        print,
    )
    assert loads == [1, 1]  # another headline picks from the same stored log-probabilities
    assert calibrated["tinydom/sentiment"] == rescore(
        loaded[0].scored, first["tinydom/sentiment"], "acc_calibrated", "accuracy"
    )
    fewer = [split_items(task, read_items(task, data_dir), 0, 3, 0)]
    score_model("base", settings, ref, None, fewer, ALPACA, print)
    assert loads == [1, 1, 1]  # other items miss
    score_model(
        "base",
        _settings(tiny_model_dir, data_dir, cache_base_scores=False),
        ref,
        None,
        loaded,
        ALPACA,
        print,
    )
    assert loads == [1, 1, 1, 1]  # --no-cache recomputes
    adapter = _make_adapter(tiny_model_dir, tmp_path / "adapter")
    score_model("specialized", settings, ref, adapter, loaded, ALPACA, print)
    assert loads == [1, 1, 1, 1, 1]  # an adapter's scores are never cached
    for entry in (tmp_path / "cache" / "scores").glob("*.json"):
        entry.write_text("{truncated")
    assert score_model("base", settings, ref, None, loaded, ALPACA, print) == first  # unreadable: a miss


def _trained_run(tmp_path, tiny_model_dir, records) -> Path:
    """Another run's train/adapter with the training record the train stage writes beside it."""
    from selfspec_core.run.adapter import TRAINING_INFO
    from selfspec_core.run.rundir import file_hash

    other = RunDir(tmp_path / "other", "tinydom").open()
    write_jsonl(other.partial_dir("respond") / "data.jsonl", records)
    other.finish("respond", {})
    adapter = _make_adapter(tiny_model_dir, other.partial_dir("train") / "adapter")
    (adapter / TRAINING_INFO).write_text(
        json.dumps(
            {"data_file": "respond/data.jsonl", "data_hash": file_hash(other.stage_dir("respond") / "data.jsonl")}
        )
    )
    other.finish("train", {})
    return other.stage_dir("train") / "adapter"


def test_an_adapter_from_elsewhere_is_evaluated_on_an_empty_run(tmp_path, tiny_model_dir, data_dir, tiny_plugin):
    import shutil

    adapter = _trained_run(
        tmp_path, tiny_model_dir, [{"id": "r1", "instruction": "Explain.", "input": LEAKED, "output": "Up."}]
    )
    settings = _settings(tiny_model_dir, data_dir, adapter=str(adapter), tasks="sentiment", cross_domain=False)
    fresh = RunDir(tmp_path / "fresh", "tinydom").open()
    Pipeline(settings, plugins.get_domain("tinydom"), fresh, seeds=[]).run_stages(["evaluate"])
    contamination = json.loads((fresh.stage_dir("evaluate") / "contamination.json").read_text())
    assert contamination["status"] == "checked" and contamination["training_data"].endswith("other/respond/data.jsonl")
    assert [r["id"] for r in contamination["overlapping_records"]] == ["r1"]  # checked against the adapter's own data
    assert json.loads((fresh.stage_dir("evaluate") / "eval.json").read_text())["sentiment"]["n"] == 8

    # the same adapter copied out of its run: its data cannot be found, so contamination is unknown, said so
    lone = Path(shutil.copytree(adapter, tmp_path / "lone"))
    alone = RunDir(tmp_path / "alone", "tinydom").open()
    settings.evaluate.adapter = str(lone)
    Pipeline(settings, plugins.get_domain("tinydom"), alone, seeds=[]).run_stages(["evaluate"])
    contamination = json.loads((alone.stage_dir("evaluate") / "contamination.json").read_text())
    assert contamination["status"] == "unknown" and "training data of" in contamination["reason"]

    from selfspec_core.stages.report import contamination_section

    assert "Contamination unknown: the training data of" in contamination_section(alone).blocks[0]


def test_an_adapters_training_data_counts_only_while_unchanged(tmp_path, tiny_model_dir):
    from selfspec_core.run.adapter import adapter_training_data

    adapter = _trained_run(tmp_path, tiny_model_dir, [{"id": "r1", "instruction": "a", "input": "", "output": "b"}])
    data = adapter.parents[1] / "respond" / "data.jsonl"
    assert adapter_training_data(adapter) == data
    data.write_text(data.read_text() + json.dumps({"id": "r2", "instruction": "c", "input": "", "output": "d"}) + "\n")
    assert adapter_training_data(adapter) is None  # respond was rerun after training: not this adapter's data
    (adapter / "selfspec_training.json").write_text("[1, 2")
    assert adapter_training_data(adapter) is None


def test_every_scored_item_contaminated_leaves_the_full_score_and_says_so():
    task = EvalTask("sentiment", "tinydom", "f", load_sentences)
    loaded = split_items(task, load_sentences_from(SENTENCES[:3]), shots=0, max_items=0, seed=0)
    scores = [
        ItemScore(item.id, "positive", float(item.answer == "positive"), (-1.0, -2.0, -3.0), (1, 1, 1), (0.0,) * 3)
        for item in loaded.scored
    ]
    settings = load_settings("tiny")
    touched = {(loaded.key, item.id) for item in loaded.scored}
    summary = clean_summary(loaded, scores, scores, touched, settings.evaluate, 0)
    assert summary["n"] == 3 and summary["contaminated_dropped"] == 0 and summary["contaminated_scored"] == 3
    assert "full" not in summary
    from selfspec_core.stages.report import comparison_section

    blocks = comparison_section("Own domain", {"sentiment": summary}, "own.png", "none").blocks
    assert any(
        isinstance(b, str) and b.startswith("Contaminated items still scored: every scored item of sentiment (3)")
        for b in blocks
    )
    untouched = clean_summary(loaded, scores, scores, set(), settings.evaluate, 0)
    assert untouched == {
        **task_summary(loaded, scores, scores, settings.evaluate, 0),
        "contaminated_dropped": 0,
        "contaminated_scored": 0,
    }


def test_headline_settings_are_checked_and_the_old_length_normalize_says_what_replaced_it(tmp_path):
    with pytest.raises(ValueError, match=r"task s: headline 'acc_nrom' is not one of .*did you mean 'acc_norm'"):
        EvalTask("s", "tinydom", "f", load_sentences, headline="acc_nrom")
    with pytest.raises(SelfspecError, match=r"evaluate.headline: expected one of task, acc, acc_per_token, acc_norm"):
        load_settings("tiny", overrides={"evaluate": {"headline": "per_byte"}})
    old = tmp_path / "old.toml"
    old.write_text("[evaluate]\nlength_normalize = true\n")
    with pytest.raises(
        SelfspecError, match=r'evaluate.length_normalize was replaced by evaluate.headline = "acc_per_token"'
    ):
        load_settings("tiny", config_file=old)
    task = EvalTask("s", "tinydom", "f", load_sentences, headline="acc_calibrated")
    assert headline_of(task, load_settings("tiny").evaluate) == "acc_calibrated"
    assert (
        headline_of(task, load_settings("tiny", overrides={"evaluate": {"headline": "acc_norm"}}).evaluate)
        == "acc_norm"
    )


def test_the_content_free_prompt_keeps_the_task_wording_and_drops_the_item():
    item = load_sentences_from(SENTENCES[:1])[0]
    assert content_free(item) == dataclasses.replace(item, input="")
    question = EvalItem("q", "Is aspirin an NSAID? Answer yes or no.", "", "yes", ("yes", "no"))
    assert content_free(question) == dataclasses.replace(question, instruction="")


def test_quality_benchmarks_last_line_adds_the_per_byte_and_calibrated_scores(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "quality", Path(__file__).resolve().parents[1] / "bench" / "quality.py"
    )
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)

    def picked(base: float, specialized: float) -> dict:
        return {"base": base, "specialized": specialized, "delta": specialized - base}

    fpb = {
        "metric": "accuracy",
        "base": 0.2604,
        "specialized": 0.6312,
        "delta": 0.3708,
        "ci": [0.3101, 0.4302],
        "n": 300,
        "majority": {"answer": "neutral", "share": 0.59},
        "macro_f1": {"base": 0.151, "specialized": 0.5124, "majority": 0.2473, "delta": 0.3614, "ci": [0.30, 0.42]},
        "headline": "acc",
        "variants": {
            "acc": picked(0.2604, 0.6312),
            "acc_per_token": picked(0.2604, 0.6312),
            "acc_norm": picked(0.2611, 0.6205),
            "acc_calibrated": picked(0.5833, 0.6748),
        },
    }
    fixture = tmp_path / "eval.json"
    fixture.write_text(json.dumps({"fpb": fpb, "cross_domain": {}}))
    line = quality.main_task_figures(json.loads(fixture.read_text()), "finance")
    figures = dict(pair.split("=") for pair in line.split())
    assert figures == {
        "task": "fpb",
        "base": "0.260",
        "specialized": "0.631",
        "delta": "0.371",
        "ci_low": "0.310",
        "ci_high": "0.430",
        "majority": "0.590",
        "macro_f1_base": "0.151",
        "macro_f1_specialized": "0.512",
        "macro_f1_ci_low": "0.300",
        "macro_f1_majority": "0.247",
        "acc_norm_base": "0.261",
        "acc_norm_specialized": "0.621",
        "acc_calibrated_base": "0.583",
        "acc_calibrated_specialized": "0.675",
    }
    assert line.startswith("task=fpb base=0.260 specialized=0.631 delta=0.371 ci_low=0.310 ci_high=0.430 majority=")


def test_the_suite_weighs_every_task_the_same_and_resamples_each_on_its_own():
    big = ([0.0] * 400, [1.0] * 100 + [0.0] * 300)  # +0.25 on 400 items
    small = ([1.0] * 10, [1.0] * 10)  # no change on 10
    suite = compare_suite({"big": big, "small": small}, samples=500, seed=3)
    assert (suite["base"], suite["specialized"], suite["delta"]) == (0.5, 0.625, 0.125)
    assert suite["tasks"]["big"] == {"base": 0.0, "specialized": 0.25, "n": 400}
    low, high = suite["ci"]
    assert 0.09 < low < 0.125 < high < 0.16  # the big task's own noise, halved by the average
    assert compare_suite({"big": big, "small": small}, samples=500, seed=3) == suite
    with pytest.raises(ValueError, match="task small: the suite needs the same"):
        compare_suite({"small": ([1.0], [])})


def test_generation_tasks_have_their_own_item_cap_and_other_domains_their_own_modes(tiny_plugin):
    from selfspec_core.stages.evaluate import cross_domain_scored, item_cap

    quick = load_settings("quick").evaluate
    own, others = collect_tasks("tinydom")
    caps = {task.name: item_cap(task, quick.max_items, quick) for task in own}
    assert caps == {"sentiment": 300, "numbers": 50, "absent": 300}
    assert item_cap(own[1], 0, quick) == 50 and item_cap(own[1], 20, quick) == 20
    assert item_cap(own[1], 0, dataclasses.replace(quick, generate_max_items=0)) == 0
    assert item_cap(own[1], 300, dataclasses.replace(quick, generate_max_items=0)) == 300
    # other domains' tasks by log-likelihood only in quick: other_qa is generated, so it is not scored
    assert [task.name for task in others if task.domain == "otherdom"] == ["other_qa"]
    assert [task.name for task in cross_domain_scored(others, quick) if task.domain == "otherdom"] == []
    assert cross_domain_scored(others, dataclasses.replace(quick, cross_domain_modes="")) == others
