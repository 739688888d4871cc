"""The finance plugin through the plugin manager, as the pipeline and evaluation use it.

Tests that read the real benchmark files and corpus find them through ``SELFSPEC_DATA`` or
``../shared/data`` beside the checkout, and skip when they are absent.
"""

import gzip
import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
from selfspec_finance import corpus, tasks

from selfspec_core.api import (
    Passage,
    PromptTemplate,
    SelfspecError,
    blacklist_pattern,
    default_template,
    domain_seeds,
    domain_tasks,
    domain_template,
    filter_reason,
    find_data,
    installed_domains,
    item_texts,
    ngram_overlap,
    record_text,
    task_items,
    use_hub_mirror,
    write_hub_dataset,
)

DOMAIN = "finance"
REPO = Path(__file__).resolve().parents[3]
DATA = Path(os.environ.get("SELFSPEC_DATA") or REPO / ".." / "shared" / "data")
SENTIMENT_FAMILIES = ("sentiment", "headline_sentiment", "aspect_sentiment")
FPB_50 = "financial_phrasebank/Sentences_50Agree.txt"


def data_path(relative: str) -> Path:
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"{path} not found (set SELFSPEC_DATA to the benchmark data folder)")
    return path


def template(stage: str) -> PromptTemplate:
    return domain_template(DOMAIN, stage)


def tasks_by_name() -> dict:
    return domain_tasks(DOMAIN)


def stated(option: str, instruction: str) -> bool:
    return bool(re.search(rf"(?<!\w){re.escape(option)}(?!\w)", instruction, re.I))


# ------------------------------------------------------------------------------------ domain, seeds


def test_domain_is_installed_through_its_entry_point():
    domain = installed_domains()[DOMAIN]
    assert domain.plugin == DOMAIN and domain.description == "finance and financial analysis"
    assert len(domain.task_families) == 9


def test_quick_profile_trains_two_passes():
    """Chosen on FPB dev over three training seeds (see DOMAIN); how a domain's profile settings meet a
    config file and the flags is the core's (tests/test_cli.py)."""
    assert installed_domains()[DOMAIN].profile_settings == {"quick": {"train": {"epochs": 2.0}}}


def test_seeds_are_one_file_shipped_as_package_data():
    import selfspec_finance as plugin

    path = plugin.seed_provider(domain=DOMAIN)
    assert path.parts[-3:] == ("selfspec_finance", "seeds", "seeds.jsonl")
    assert path.samefile(REPO / "seeds" / DOMAIN / "seeds.jsonl")


def test_seeds_cover_every_task_family():
    seeds = domain_seeds(DOMAIN)  # validates the schema: ids unique, fields present and non-empty
    families = installed_domains()[DOMAIN].task_families
    assert len(seeds) >= 90
    assert {seed.task_type for seed in seeds} == set(families)
    counts = {family: sum(seed.task_type == family for seed in seeds) for family in families}
    assert min(counts.values()) >= 5, counts


def test_seed_labels_are_stated_options():
    for seed in domain_seeds(DOMAIN):
        if seed.task_type in SENTIMENT_FAMILIES:
            assert seed.output in ("positive", "negative", "neutral", "bullish", "bearish"), seed.id
        if seed.task_type in SENTIMENT_FAMILIES + ("filing_classification",):
            assert stated(seed.output, seed.instruction), seed.id
        elif seed.task_type == "causal_detection":
            assert stated(seed.output, seed.instruction) or re.fullmatch(r"Cause: .+; Effect: .+", seed.output), seed.id
        elif seed.task_type == "numerical_reasoning":
            assert "Question: " in seed.input and re.search(r"The answer is .*\d", seed.output), seed.id


# -------------------------------------------------------------------------------------- templates


def test_instruction_template_frames_the_domain():
    instruction = template("instruction")
    assert instruction != default_template("instruction")
    seeds = domain_seeds(DOMAIN)
    examples = [seeds[0].to_dict(), next(s for s in seeds if not s.input).to_dict()]
    prompt = instruction.render(examples, {"task_type": "definition"}, description="finance and financial analysis")
    assert prompt.startswith("Tasks for an assistant in finance and financial analysis.")
    assert "without live market data" in prompt
    assert prompt.count("\nInput: ") == 1
    assert prompt.endswith("Type: definition\nInstruction:")


def test_response_template_frames_background_passages():
    response = template("response")
    query = {"instruction": "What is EBITDA?", "input": ""}
    grounded = response.render([], {**query, "passages": "[1] EBITDA excludes depreciation."}, description="x")
    assert (
        "Background from financial news and annual reports (use it only where it is relevant):\n[1] EBITDA" in grounded
    )
    assert grounded.endswith("Instruction: What is EBITDA?\nAnswer:")
    plain = response.render([], {**query, "passages": ""}, description="x")
    assert (
        plain == "An expert in x answers each instruction correctly and concisely.\n\n###\n\n"
        "Instruction: What is EBITDA?\nAnswer:"
    )


def test_train_and_judge_templates_stay_the_core_ones():
    assert template("train") == default_template("train")
    assert template("judge") == default_template("judge")


# ---------------------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    "instruction,input_text",
    [
        ("What is the current price of Tesla stock?", ""),
        ("Give the latest stock price for Apple.", "Apple Inc. (AAPL)"),
        ("How is the S&P 500 doing today?", ""),
        ("Should I buy Nvidia shares right now?", ""),
        ("Report the real-time exchange rate between the euro and the dollar.", ""),
        ("Summarize this morning's moves in European bank stocks.", ""),
    ],
)
def test_instructions_needing_live_data_are_dropped(instruction, input_text):
    record = {"instruction": instruction, "input": input_text}
    assert filter_reason(DOMAIN, "instruction", record) == "plugin:finance:needs_live_data"


@pytest.mark.parametrize(
    "instruction,input_text",
    [
        ("Compute the P/E ratio at the current share price.", "Current share price: 48.20. EPS: 3.10."),
        ("What was the current ratio at year end?", ""),
        ("Explain the difference between current assets and current liabilities.", ""),
        (
            "Classify the sentiment of this financial news sentence as positive, negative, or neutral.",
            "Shares of Orion rose 4% today after the results.",
        ),
    ],
)
def test_answerable_instructions_are_kept(instruction, input_text):
    assert filter_reason(DOMAIN, "instruction", {"instruction": instruction, "input": input_text}) is None


def test_filters_and_blacklist_leave_the_seeds_and_other_domains_alone():
    live = {"instruction": "What is the stock price today?", "input": ""}
    assert filter_reason("biomed", "instruction", live) is None
    assert filter_reason(DOMAIN, "response", {**live, "output": "I cannot know."}) is None
    blacklist = blacklist_pattern(DOMAIN)
    assert blacklist.search("Describe the pattern in this candlestick chart.")
    assert not blacklist_pattern("biomed").search("Describe the pattern in this candlestick.")
    for seed in domain_seeds(DOMAIN):
        assert filter_reason(DOMAIN, "instruction", seed.to_dict()) is None, seed.id
        assert not blacklist.search(seed.instruction), seed.id


def test_hooks_answer_only_for_finance():
    import selfspec_finance as plugin

    assert plugin.seed_provider(domain="biomed") is None
    assert plugin.prompt_template(domain="biomed", stage="instruction") is None
    assert plugin.blacklist_words(domain="biomed") is None
    assert plugin.evaluation_tasks(domain="biomed") is None
    assert plugin.retrieval_corpus(domain="biomed", data_dir=str(DATA)) is None


# ------------------------------------------------------------------------------ evaluation tasks


def test_tasks_declare_licence_mode_and_agreement(monkeypatch):
    monkeypatch.delenv(tasks.FPB_LEVEL_ENV, raising=False)
    found = tasks_by_name()
    assert set(found) == {"fpb", "fpb_dev", "fpb_gen", "tatqa"}
    assert all(
        "CC BY-NC-SA" in found[name].licence and found[name].data_file == FPB_50
        for name in ("fpb", "fpb_dev", "fpb_gen")
    )
    assert found["fpb"].extra == {"agreement": "50Agree", "split": "test", "suite": True}
    assert found["fpb_dev"].extra["split"] == "dev"
    # the suite counts Financial PhraseBank once
    assert {name for name, task in found.items() if task.extra.get("suite", True)} == {"fpb", "fpb_dev", "tatqa"}
    assert (found["fpb_gen"].mode, found["tatqa"].mode, found["tatqa"].metric) == ("generate", "generate", "numeric")
    assert found["tatqa"].licence.startswith("CC BY 4.0")
    monkeypatch.setenv(tasks.FPB_LEVEL_ENV, "AllAgree")
    assert tasks_by_name()["fpb"].data_file == "financial_phrasebank/Sentences_AllAgree.txt"
    monkeypatch.setenv(tasks.FPB_LEVEL_ENV, "90Agree")
    with pytest.raises(SelfspecError, match="SELFSPEC_FPB_LEVEL='90Agree'.*50Agree, 66Agree, 75Agree, AllAgree"):
        tasks_by_name()


def test_fpb_split_is_a_fixed_fifth_stable_across_agreement_levels(monkeypatch):
    monkeypatch.delenv(tasks.FPB_LEVEL_ENV, raising=False)
    data_path(FPB_50)
    found = tasks_by_name()
    test, dev = task_items(found["fpb"], DATA), task_items(found["fpb_dev"], DATA)
    assert (len(test), len(dev)) == (1009, 3837)  # of 4,846; pinned: a changed split changes every score
    assert not {item.id for item in test} & {item.id for item in dev}
    assert not {item.input for item in test} & {item.input for item in dev}  # duplicates stay in one split
    item = test[0]
    assert (
        item.instruction == "Classify the sentiment of this financial news sentence as positive, negative, or neutral."
    )
    assert item.choices == ("positive", "negative", "neutral") and item.answer in item.choices
    assert task_items(found["fpb_gen"], DATA) == test
    strict_test = tasks.load_fpb(data_path("financial_phrasebank/Sentences_AllAgree.txt"), "test")
    assert {item.input for item in strict_test} <= {item.input for item in test}
    assert any("\u00e4" in item.input or "\u00f6" in item.input for item in dev)  # read as latin-1


def test_fpb_loader_names_the_bad_line(tmp_path):
    path = tmp_path / "Sentences_50Agree.txt"
    path.write_text("Profit rose .@positive\nSales fell .@down\n", encoding="latin-1")
    with pytest.raises(SelfspecError, match=r"Sentences_50Agree.txt:2: expected 'sentence@label'"):
        tasks.load_fpb(path, "test")


def test_tatqa_items_are_the_arithmetic_questions_posed_like_the_seeds():
    path = data_path(tasks.TATQA_FILE)
    items = task_items(tasks_by_name()["tatqa"], DATA)
    questions = [q for context in json.loads(path.read_text()) for q in context["questions"]]
    assert len(items) == sum(q["answer_type"] == "arithmetic" for q in questions) == 718
    first = items[0]
    assert first.id == "eb787966-fa02-401f-bfaf-ccabf3828b23" and first.answer == "-12.6"
    assert first.instruction in {seed.instruction for seed in domain_seeds(DOMAIN)}
    assert first.input.endswith("\n\nQuestion: What is the change in Other in 2019 from 2018?")
    assert "Other | 44.1 | 56.7 | 70.8\n" in first.input
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", item.answer) for item in items)


def test_tatqa_context_keeps_relevant_paragraphs_within_budget():
    table = [["", "2019"], ["Revenue", "10"]]
    paragraphs = [{"order": n, "text": f"Paragraph {n} " + "x" * 900} for n in (1, 2, 3)]
    context = {"table": {"table": table}, "paragraphs": paragraphs}
    text = tasks.tatqa_input(context, {"question": "What is revenue?", "rel_paragraphs": ["3"]})
    assert text.startswith(" | 2019\nRevenue | 10\n\nParagraph 1 ")
    assert "Paragraph 2" not in text and "Paragraph 3" in text  # 1 and 3 fit the 2,000 characters; 2 would not
    assert text.endswith("\n\nQuestion: What is revenue?")


def test_seeds_share_no_13_gram_with_the_evaluation_data():
    data_path(FPB_50)
    data_path(tasks.TATQA_FILE)
    found = tasks_by_name()
    seeds = [record_text(seed.to_dict()) for seed in domain_seeds(DOMAIN)]
    for name in ("fpb", "fpb_dev", "tatqa"):
        assert ngram_overlap(seeds, item_texts(task_items(found[name], DATA)), 13) == set(), name


# ---------------------------------------------------------------------------------------- corpus


def test_corpus_reads_fincausal_and_tatqa_test_without_the_evaluation_reports():
    data_path(corpus.CORPUS_FOLDER)
    data_path(tasks.TATQA_FILE)
    import selfspec_finance as plugin

    passages = plugin.retrieval_corpus(domain=DOMAIN, data_dir=str(DATA))
    assert all(isinstance(p, Passage) and p.text for p in passages)
    assert len({p.id for p in passages}) == len(passages)
    fincausal = [p for p in passages if p.id.startswith("fnp2020-")]
    tatqa = [p for p in passages if p.id.startswith("tatqa:")]
    assert len(fincausal) == len({p.text for p in fincausal}) == 21325  # unique non-empty sections
    tatqa_all = corpus.tatqa_passages(tasks.read_tatqa(DATA / corpus.TATQA_CORPUS.path), exclude=[])
    assert len(tatqa_all) - 100 < len(tatqa) < len(tatqa_all)  # reports shared with TAT-QA dev are left out
    evaluation = item_texts(task_items(tasks_by_name()["tatqa"], DATA))
    assert ngram_overlap([p.text for p in tatqa], evaluation, 13) == set()
    assert ngram_overlap([p.text for p in tatqa_all], evaluation, 13)


def test_fincausal_shares_nothing_with_financial_phrasebank():
    data_path(corpus.CORPUS_FOLDER)
    sentences = [
        item.input for item in tasks.load_fpb(data_path(FPB_50), "test") + tasks.load_fpb(DATA / FPB_50, "dev")
    ]
    fincausal = corpus.fincausal_sections(DATA / corpus.CORPUS_FOLDER / corpus.FINCAUSAL_FOLDER)
    assert ngram_overlap([p.text for p in fincausal], sentences, 13) == set()


def test_corpus_follows_selfspec_data_and_falls_back_to_the_shipped_reports(monkeypatch, tmp_path):
    monkeypatch.delenv("SELFSPEC_DATA", raising=False)
    shipped = corpus.passages(None)
    assert shipped and all(p.id.startswith("tatqa:") for p in shipped)
    assert corpus.passages(tmp_path) == shipped  # a data dir without the corpus: the shipped reports
    folder = tmp_path / corpus.CORPUS_FOLDER / corpus.FINCAUSAL_FOLDER
    folder.mkdir(parents=True)
    (folder / "news.csv").write_text(
        "Index; Text; Gold\n0001.00001; Costs rose; margins fell.; 1\n0001.00002; Costs rose; margins fell.; 1\n"
    )
    monkeypatch.setenv("SELFSPEC_DATA", str(tmp_path))
    assert corpus.passages(None) == [Passage("news:0001.00001", "Costs rose; margins fell.")] + shipped
    (folder / "bad.csv").write_text("id,text\n1,x\n")
    with pytest.raises(SelfspecError, match=r"bad.csv:1: expected FinCausal's header"):
        corpus.passages(tmp_path)
    monkeypatch.setattr(corpus, "TATQA_CORPUS", replace(corpus.TATQA_CORPUS, shipped=None, hub=None))
    monkeypatch.delenv("SELFSPEC_DATA")
    assert corpus.passages(None) is None  # nothing anywhere: retrieval off


# ------------------------------------------------------------------------- shipped data, the Hub


def test_shipped_tatqa_is_found_with_no_data_dir_and_the_corpus_leaves_it_out(monkeypatch):
    monkeypatch.delenv("SELFSPEC_DATA", raising=False)
    task = tasks_by_name()["tatqa"]
    assert find_data(task.source, None).where == "shipped"
    items = task_items(task, None)
    assert len(items) == 718 and items[0].id == "eb787966-fa02-401f-bfaf-ccabf3828b23" and items[0].answer == "-12.6"
    passages = corpus.passages(None)
    everything = corpus.tatqa_passages(tasks.read_tatqa(corpus.TATQA_CORPUS.shipped), exclude=[])
    assert len(everything) - 100 < len(passages) < len(everything)  # reports shared with the dev set are left out
    assert ngram_overlap([p.text for p in passages], item_texts(items), 13) == set()


def test_only_data_whose_licence_allows_it_ships():
    shipped = sorted(str(p.relative_to(tasks.SHIPPED)) for p in tasks.SHIPPED.rglob("*") if p.is_file())
    assert shipped == [
        "tatqa_corpus/SOURCE.md",
        "tatqa_corpus/tatqa_dataset_test_gold.json.gz",
        "tatqa_dev/SOURCE.md",
        "tatqa_dev/tatqa_dataset_dev.json.gz",
    ]  # no FPB, no FinCausal
    for folder in ("tatqa_corpus", "tatqa_dev"):
        assert (
            "Creative Commons Attribution 4.0 International (CC BY 4.0)"
            in (tasks.SHIPPED / folder / "SOURCE.md").read_text()
        )
    fpb = tasks_by_name()["fpb"]
    assert fpb.shipped is None and fpb.hub.repo == "takala/financial_phrasebank" and "CC BY-NC-SA" in fpb.licence
    assert corpus.FINCAUSAL.shipped is None and corpus.FINCAUSAL.hub is None
    assert gzip.decompress(corpus.TATQA_CORPUS.shipped.read_bytes()) == data_path(corpus.TATQA_CORPUS.path).read_bytes()
    assert gzip.decompress(tasks.TATQA_DEV.shipped.read_bytes()) == data_path(tasks.TATQA_FILE).read_bytes()


def test_tatqa_from_its_hub_files_gives_the_shipped_items_and_passages(tmp_path, monkeypatch):
    """``next-tat/TAT-QA`` publishes the raw JSON files; ``datasets`` reads them into the same contexts."""
    for source in (tasks.TATQA_DEV, corpus.TATQA_CORPUS):
        repo = tmp_path / "hub" / source.hub.repo
        repo.mkdir(parents=True, exist_ok=True)
        (repo / source.hub.data_files).write_bytes(gzip.decompress(source.shipped.read_bytes()))
    use_hub_mirror(monkeypatch, tmp_path / "hub")
    monkeypatch.delenv("SELFSPEC_DATA", raising=False)
    task = tasks_by_name()["tatqa"]
    shipped_items, shipped_passages = task_items(task, None), corpus.passages(None)
    monkeypatch.setattr(tasks, "TATQA_DEV", replace(tasks.TATQA_DEV, shipped=None))
    monkeypatch.setattr(corpus, "TATQA_DEV", tasks.TATQA_DEV)
    monkeypatch.setattr(corpus, "TATQA_CORPUS", replace(corpus.TATQA_CORPUS, shipped=None))
    assert task_items(replace(task, shipped=None), None) == shipped_items
    assert corpus.passages(None) == shipped_passages


def _fpb_hub_repo(folder: Path, rows: list[tuple[str, str]], level: str = "50Agree") -> None:
    """``takala/financial_phrasebank``'s layout: config ``sentences_<level>``, split train, label a ClassLabel."""
    import datasets

    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "neutral", "positive"])}
    )
    dataset = datasets.Dataset.from_dict(
        {"sentence": [s for s, _ in rows], "label": [label for _, label in rows]}, features=features
    )
    write_hub_dataset(folder / "takala" / "financial_phrasebank", {f"sentences_{level.lower()}": {"train": dataset}})


def test_fpb_from_its_hub_layout_is_split_and_labelled_like_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(tasks.FPB_LEVEL_ENV, raising=False)
    monkeypatch.delenv("SELFSPEC_DATA", raising=False)
    rows = [
        (f"Operating profit changed by {n} percent .", ("positive", "negative", "neutral")[n % 3]) for n in range(60)
    ]
    _fpb_hub_repo(tmp_path / "hub", rows)
    use_hub_mirror(monkeypatch, tmp_path / "hub")
    local = tmp_path / "data" / FPB_50
    local.parent.mkdir(parents=True)
    local.write_text("".join(f"{s}@{label}\n" for s, label in rows), encoding="latin-1")
    found = tasks_by_name()
    for name in ("fpb", "fpb_dev"):
        from_hub = task_items(found[name], tmp_path / "empty")
        assert from_hub == task_items(found[name], tmp_path / "data") and from_hub, name
    assert find_data(found["fpb"].source, tmp_path / "empty").where == "hub"


def test_the_real_fpb_from_its_hub_layout_matches_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(tasks.FPB_LEVEL_ENV, raising=False)
    rows = [(sentence, label) for _, sentence, label in tasks.read_fpb(data_path(FPB_50))]
    _fpb_hub_repo(tmp_path / "hub", rows)  # under tmp_path only: FPB is never copied into the project
    use_hub_mirror(monkeypatch, tmp_path / "hub")
    found = tasks_by_name()
    assert task_items(found["fpb"], tmp_path) == task_items(found["fpb"], DATA)
