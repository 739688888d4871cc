"""Stage 2 end to end on the tiny model: prompts, retrieval on/off, checks, resume byte for byte."""

import json
from pathlib import Path

import datasets
import pytest

from selfspec_core.config import load_settings
from selfspec_core.data.seeds import load_seeds
from selfspec_core.errors import SelfspecError
from selfspec_core.models.generator import HFGenerator
from selfspec_core.models.loading import ModelRef
from selfspec_core.plugins.defaults import RESPONSE_TEMPLATE
from selfspec_core.records import Domain
from selfspec_core.run.context import StageContext
from selfspec_core.run.pipeline import Pipeline
from selfspec_core.run.rundir import RunDir, read_jsonl, write_jsonl
from selfspec_core.stages import respond as responses

SEEDS = load_seeds(Path(__file__).resolve().parents[1] / "seeds" / "finance" / "seeds.jsonl")
DOMAIN = Domain("respond-test", "finance")  # no plugin serves it: the core's templates, no corpus hook
INSTRUCTIONS = [
    (
        "sentiment",
        "Classify the sentiment of this sentence as positive, negative, or neutral.",
        "Quarterly profit doubled.",
    ),
    (
        "sentiment",
        "Is this sentence positive, negative, or neutral for shareholders?",
        "The retailer will cut 1,200 jobs.",
    ),
    ("sentiment", "Label the sentiment: positive, negative, or neutral.", "The head office is in Lyon."),
    (
        "sentiment",
        "What is the sentiment? Choose one of: positive, negative, neutral.",
        "Revenue rose 9% on higher prices.",
    ),
    (
        "causal_detection",
        "Does the sentence express cause and effect? Answer yes or no.",
        "Margins fell because costs rose.",
    ),
    (
        "causal_detection",
        "Does the sentence express cause and effect? Answer yes or no.",
        "The bank has 6,500 employees.",
    ),
    ("definition", "Explain the following finance term in one sentence.", "EBITDA"),
    ("definition", "Explain the following finance term in one sentence.", "dividend"),
    (
        "summarization",
        "Summarize the paragraph in one sentence.",
        "Revenue rose 9% to USD 1.4 billion as prices recovered.",
    ),
    ("definition", "Explain what a bond coupon is.", ""),
]
CORPUS = [
    {"id": "ebitda", "text": "EBITDA is earnings before interest, taxes, depreciation and amortization."},
    {"id": "dividend", "text": "A dividend is a share of profits paid to shareholders."},
    {"id": "jobs", "text": "The retailer said it will cut 1,200 jobs and close stores."},
    {"id": "coupon", "text": "A bond coupon is the annual interest payment on a bond."},
    {"id": "margins", "text": "Margins fell because costs rose; revenue and prices recovered later."},
    {"id": "bank", "text": "The bank employs staff in many countries."},
]


def make_run(tmp_path: Path, name: str = "run") -> RunDir:
    run = RunDir(tmp_path / name, DOMAIN.name).open()
    records = [
        {
            "id": f"gen-{n:03d}",
            "instruction": instruction,
            "input": text,
            "task_type": kind,
            "seed_ids": ["fin-001"],
            "round": 1,
        }
        for n, (kind, instruction, text) in enumerate(INSTRUCTIONS)
    ]
    write_jsonl(run.partial_dir("generate") / "instructions.jsonl", records)
    write_jsonl(run.partial_dir("generate") / "mined.jsonl", [])
    run.finish("generate", {"config_hash": "test", "input_hash": "test"})
    return run


def make_settings(tmp_path: Path, tiny_model_dir, **respond):
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, CORPUS)
    options = {"batch_size": 2, "num_demos": 1, "passage_tokens": 24, "max_new_tokens": 8, **respond}
    return load_settings("tiny", overrides={"model": str(tiny_model_dir), "corpus": str(corpus), "respond": options})


def run_respond(run: RunDir, settings, log=None) -> dict:
    Pipeline(settings, DOMAIN, run, SEEDS, log=log or (lambda line: None)).run_stages(["respond"])
    return run.manifest("respond")


def test_another_corpus_makes_the_answers_stale(tmp_path, tiny_model_dir):
    run = make_run(tmp_path)
    settings = make_settings(tmp_path, tiny_model_dir)
    pipeline = Pipeline(settings, DOMAIN, run, SEEDS)
    before = pipeline.input_hash("respond")
    write_jsonl(tmp_path / "corpus.jsonl", CORPUS[:-1])
    assert pipeline.input_hash("respond") != before
    settings.respond.retrieval = False  # an ungrounded stage does not read the corpus
    ungrounded = pipeline.input_hash("respond")
    write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    assert pipeline.input_hash("respond") == ungrounded


def test_stage_end_to_end_on_the_tiny_model(tmp_path, tiny_model_dir):
    run = make_run(tmp_path)
    manifest = run_respond(run, make_settings(tmp_path, tiny_model_dir, response_checks="", max_label_share=1.0))
    data = read_jsonl(run.stage_dir("respond") / "data.jsonl")
    funnel = manifest["funnel"]
    assert funnel["generated"] == len(INSTRUCTIONS) == funnel["kept"] + sum(funnel["dropped"].values())
    assert funnel["kept"] == len(data) > 0
    option_records = [r for r in data if r["options"] is not None]
    assert len(option_records) == 6 and all(r["answer"] == "options" for r in option_records)
    assert all(r["output"] == r["label"] and r["label"] in r["options"] for r in option_records)
    assert manifest["valid_labels"] == 1.0
    assert manifest["label_distribution"]["yes/no"] and manifest["answers"]["options"] == 6
    first = data[0]
    assert set(first) >= {"id", "instruction", "input", "output", "task_type", "seed_ids", "demo_ids", "retrieved"}
    assert first["demo_ids"][0].startswith("fin-") and first["seed_ids"] == ["fin-001"]
    retrieval = manifest["retrieval"]
    assert retrieval["passages"] == retrieval["documents"] == len(CORPUS) and retrieval["index_from_cache"] is False
    assert 0 < retrieval["share_with_retrieval"] <= 1 and retrieval["mean_top_score"] > 0
    by_id = {r["id"]: r for r in data}
    if "gen-006" in by_id:  # "EBITDA" finds the EBITDA passage first
        assert by_id["gen-006"]["retrieved"][0]["doc_id"] == "ebitda"
    saved = datasets.load_from_disk(str(run.stage_dir("respond") / "dataset"))
    assert saved.num_rows == len(data) and saved[0]["instruction"] == data[0]["instruction"]


def test_prompts_demos_passages_and_stops(tmp_path, tiny_model_dir):
    run = make_run(tmp_path)
    settings = make_settings(tmp_path, tiny_model_dir, num_demos=3)
    ctx = StageContext(settings, DOMAIN, run, SEEDS, ModelRef("tiny", str(tiny_model_dir)), run.partial_dir("respond"))
    records = read_jsonl(run.stage_dir("generate") / "instructions.jsonl")
    hits, stats = responses._retrieve(ctx, records)
    plans = responses._plans(ctx, records, hits, tokenizer=None)
    sentiment = plans[0]
    assert [s.task_type for s in SEEDS if s.id in sentiment.demo_ids] == ["sentiment"] * 3  # same type first
    prompt = sentiment.prompts[0]
    assert prompt.startswith("An expert in finance answers")
    assert prompt.endswith("Instruction: " + INSTRUCTIONS[0][1] + "\nInput: " + INSTRUCTIONS[0][2] + "\nAnswer:")
    assert prompt.count("\n\n###\n\n") == 4  # between header, three demonstrations and the query
    ebitda = plans[6]
    assert ebitda.retrieved[0]["doc_id"] == "ebitda" and "Background:\nEBITDA is earnings" in ebitda.prompts[0]
    no_input = plans[9]
    assert "\nInput:" not in no_input.prompts[0].rsplit("###", 1)[1]
    assert plans[0].options.keys == ("positive", "negative", "neutral") and plans[6].options is None
    assert responses._plans(ctx, records, hits, None)[0].prompts == plans[0].prompts  # deterministic
    assert responses.response_stops(RESPONSE_TEMPLATE) == [
        "\n###",
        "\nInstruction:",
        "\nInput:",
        "\nAnswer:",
        "\nBackground:",
    ]


def test_a_document_corpus_names_sections_and_skipped_files(tmp_path, tiny_model_dir):
    run = make_run(tmp_path)
    settings = make_settings(tmp_path, tiny_model_dir)
    settings.corpus = str(tmp_path / "documents")
    (tmp_path / "documents").mkdir()
    (tmp_path / "documents" / "terms.md").write_text(
        "# Bonds\n\nA bond coupon is the annual interest payment on a bond.\n\n"
        "# Profits\n\nEBITDA is earnings before interest, taxes, depreciation and amortization.\n",
        encoding="utf-8",
    )
    (tmp_path / "documents" / "broken.pdf").write_bytes(b"%PDF-1.4 not really a PDF")
    logged = []
    ctx = StageContext(
        settings,
        DOMAIN,
        run,
        SEEDS,
        ModelRef("tiny", str(tiny_model_dir)),
        run.partial_dir("respond"),
        log=logged.append,
    )
    records = read_jsonl(run.stage_dir("generate") / "instructions.jsonl")
    hits, stats = responses._retrieve(ctx, records)
    ebitda = responses._plans(ctx, records, hits, tokenizer=None)[6]
    assert ebitda.retrieved[0]["doc_id"] == "terms.md#1" and ebitda.retrieved[0]["source"] == "terms.md, § Profits"
    assert stats["documents"] == 1 and stats["passages"] == 2
    warning = f"{tmp_path / 'documents' / 'broken.pdf'}: skipped: corrupt or not a PDF"
    assert len(stats["document_warnings"]) == 1 and stats["document_warnings"][0].startswith(warning)
    assert [line for line in logged if "warning" in line] == [f"[respond] warning: {stats['document_warnings'][0]}"]


def test_retrieval_off_rationale_and_no_corpus(tmp_path, tiny_model_dir):
    run = make_run(tmp_path)
    manifest = run_respond(
        run, make_settings(tmp_path, tiny_model_dir, retrieval="off", response_checks="", rationale="on")
    )
    data = read_jsonl(run.stage_dir("respond") / "data.jsonl")
    assert manifest["retrieval"] == {} and all(r["retrieved"] == [] for r in data)
    labelled = [r for r in data if r["answer"] == "options"]
    assert labelled and all(r["output"] == r["label"] or r["output"].startswith(r["label"] + ". ") for r in labelled)
    assert any(r["output"] != r["label"] for r in labelled)  # checks off: every non-empty reason is kept

    settings = make_settings(tmp_path, tiny_model_dir, response_checks="")
    settings.corpus = None
    lines = []
    other = make_run(tmp_path, "no-corpus")
    assert run_respond(other, settings, log=lines.append)["retrieval"] == {}
    assert any("no retrieval corpus" in line and "--corpus PATH" in line for line in lines)


def test_quality_checks_in_the_stage(tmp_path, tiny_model_dir):
    run = make_run(tmp_path)
    manifest = run_respond(
        run,
        make_settings(
            tmp_path,
            tiny_model_dir,
            consistency_samples=2,
            judge="on",
            judge_keep_fraction=0.5,
            min_relevance=0.01,
            max_label_share=1.0,
        ),
    )
    data = read_jsonl(run.stage_dir("respond") / "data.jsonl")
    dropped = manifest["funnel"]["dropped"]
    assert dropped["off_domain"] == 1  # "Label the sentiment ... The head office is in Lyon." shares no corpus word
    # the tiny random model's free answers are cut off at 8 tokens: the truncation check drops them
    assert dropped.get("truncated", 0) + dropped.get("inconsistent", 0) + dropped.get("degenerate", 0) >= 1
    judged = len(manifest["judge_scores"])
    assert judged > 0 and dropped.get("judge", 0) == judged - -(-judged // 2)
    assert all(r["judge_score"] is not None and r["agreement"] is not None for r in data)


def test_resume_after_interruption_is_byte_identical(tmp_path, tiny_model_dir, monkeypatch):
    settings = make_settings(tmp_path, tiny_model_dir, batch_size=1, response_checks="", max_label_share=1.0)
    calls = []
    original = HFGenerator.generate

    def counted(self, *args, **kwargs):
        calls.append(1)
        if kill_at and len(calls) == kill_at:
            raise KeyboardInterrupt  # a kill in the middle of the stage
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HFGenerator, "generate", counted)
    kill_at = 0
    whole = make_run(tmp_path, "whole")
    run_respond(whole, settings)
    expected = (whole.stage_dir("respond") / "data.jsonl").read_bytes()
    whole_calls, calls[:] = len(calls), []

    kill_at = 2
    broken = make_run(tmp_path, "broken")
    with pytest.raises(KeyboardInterrupt):
        run_respond(broken, settings)
    log_path = broken.path / "respond.partial" / responses.RESPONSE_LOG
    saved = read_jsonl(log_path)
    assert 0 < len(saved) < len(INSTRUCTIONS) and len(saved) % 4 == 0  # whole chunks (4 = batch_size 1 x 4 batches)
    # as if killed while writing the next chunk: one whole line of it and a torn one
    with open(log_path, "a") as handle:
        handle.write(json.dumps({**saved[0], "id": f"gen-{len(saved):03d}"}) + "\n" + '{"id": "gen-0')
    kill_at, calls[:] = 0, []
    run_respond(broken, settings)
    assert (broken.stage_dir("respond") / "data.jsonl").read_bytes() == expected
    assert 0 < len(calls) < whole_calls  # the saved chunk was not answered again


def test_bad_instruction_file_is_named(tmp_path, tiny_model_dir):
    run = RunDir(tmp_path / "bad", DOMAIN.name).open()
    (run.partial_dir("generate") / "instructions.jsonl").write_text('{"id": "x", "instruction": "Do it."}\n')
    write_jsonl(run.partial_dir("generate") / "mined.jsonl", [])
    run.finish("generate", {"config_hash": "t", "input_hash": "t"})
    with pytest.raises(SelfspecError, match=r"instructions.jsonl:1: field 'input' is missing"):
        run_respond(run, make_settings(tmp_path, tiny_model_dir))


def test_a_later_round_answers_with_the_round_befores_adapter(tmp_path, tiny_model_dir):
    """``previous/adapter`` (what ``selfspec run --rounds`` hands on) is applied to the model that answers,
    and is an input of the stage: another adapter makes the answers stale."""
    import torch
    from peft import LoraConfig, get_peft_model

    from selfspec_core.models.loading import ModelRef, load_model
    from selfspec_core.run import rounds

    settings = make_settings(tmp_path, tiny_model_dir, response_checks="", max_label_share=1.0)
    plain = make_run(tmp_path, "round-1")
    run_respond(plain, settings)
    later = make_run(tmp_path, "round-2")
    torch.manual_seed(3)
    adapter = get_peft_model(
        load_model(ModelRef("tiny", str(tiny_model_dir))),
        LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False),
    )
    adapter.save_pretrained(later.path / rounds.PREVIOUS / "adapter")
    pipeline = Pipeline(settings, DOMAIN, later, SEEDS)
    assert rounds.previous_adapter(later) == later.path / "previous" / "adapter"
    assert later.path / "previous" / "adapter" / "adapter_model.safetensors" in pipeline.input_files("respond")
    run_respond(later, settings)
    answers = [r["output"] for r in read_jsonl(plain.stage_dir("respond") / "data.jsonl")]
    assert answers != [r["output"] for r in read_jsonl(later.stage_dir("respond") / "data.jsonl")]
    before = pipeline.input_hash("respond")
    (later.path / "previous" / "adapter" / "adapter_config.json").write_text(
        (later.path / "previous" / "adapter" / "adapter_config.json").read_text().replace('"r": 4', '"r": 4 ')
    )
    assert pipeline.input_hash("respond") != before
