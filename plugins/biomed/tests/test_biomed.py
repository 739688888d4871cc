"""The biomed plugin through the plugin manager, as the pipeline and evaluation use it.

Tests that read the real benchmark files and corpus find them through ``SELFSPEC_DATA`` or
``../shared/data`` beside the checkout, and skip when they are absent.
"""

import csv
import gzip
import io
import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
from selfspec_biomed import corpus, tasks

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

DOMAIN = "biomed"
REPO = Path(__file__).resolve().parents[3]
DATA = Path(os.environ.get("SELFSPEC_DATA") or REPO / ".." / "shared" / "data")
# Task families whose answer is one of the options the instruction states.
CLOSED_FAMILIES = ("yesno_qa", "relation_extraction", "document_classification", "nli")


def data_path(relative: str) -> Path:
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"{path} not found (set SELFSPEC_DATA to the benchmark data folder)")
    return path


def template(stage: str) -> PromptTemplate:
    return domain_template(DOMAIN, stage)


def tasks_by_name() -> dict:
    return domain_tasks(DOMAIN)


# ------------------------------------------------------------------------------------ domain, seeds


def test_domain_is_installed_through_its_entry_point():
    domain = installed_domains()[DOMAIN]
    assert domain.plugin == DOMAIN
    assert domain.description == "biomedicine and clinical research"
    assert len(domain.task_families) == 10


def test_seeds_are_one_file_shipped_as_package_data():
    import selfspec_biomed as plugin

    path = plugin.seed_provider(domain=DOMAIN)
    assert path.parts[-3:] == ("selfspec_biomed", "seeds", "seeds.jsonl")
    assert path.samefile(REPO / "seeds" / DOMAIN / "seeds.jsonl")


def test_seeds_cover_every_task_family():
    seeds = domain_seeds(DOMAIN)  # validates the schema: ids unique, fields present and non-empty
    families = installed_domains()[DOMAIN].task_families
    assert len(seeds) >= 80
    assert {seed.task_type for seed in seeds} == set(families)
    counts = {family: sum(seed.task_type == family for seed in seeds) for family in families}
    assert min(counts.values()) >= 5, counts


def test_seed_labels_are_stated_options():
    for seed in domain_seeds(DOMAIN):
        if seed.task_type == "yesno_qa":
            assert seed.output in tasks.LABELS and "yes, no, or maybe" in seed.instruction, seed.id
        if seed.task_type in CLOSED_FAMILIES:
            assert re.search(rf"(?<!\w){re.escape(seed.output)}(?!\w)", seed.instruction, re.I), seed.id
        elif seed.task_type == "sentence_similarity":
            assert re.match(r"[0-5](?:\D|$)", seed.output), seed.id
        elif seed.task_type == "multiple_choice":
            assert seed.output in seed.input.splitlines(), seed.id


# -------------------------------------------------------------------------------------- templates


def test_instruction_template_frames_the_domain():
    instruction = template("instruction")
    assert instruction != default_template("instruction")
    seeds = [s.to_dict() for s in domain_seeds(DOMAIN)[:3]] + [domain_seeds(DOMAIN)[21].to_dict()]
    prompt = instruction.render(
        seeds, {"task_type": "nli"}, domain=DOMAIN, description="biomedicine and clinical research"
    )
    assert prompt.startswith("Tasks for an assistant in biomedicine and clinical research.")
    assert "not advice about one person's health" in prompt
    assert prompt.count("\nInput: ") == 3  # the factoid seed has no input, and no empty Input line
    assert prompt.endswith("Type: nli\nInstruction:")


def test_response_template_frames_background_passages():
    response = template("response")
    query = {"instruction": "Which enzyme do statins inhibit?", "input": ""}
    grounded = response.render([], {**query, "passages": "[1] Statins inhibit HMG-CoA reductase."}, description="x")
    assert "Background from medical abstracts (use it only where it is relevant):\n[1] Statins" in grounded
    assert grounded.endswith("Instruction: Which enzyme do statins inhibit?\nAnswer:")
    plain = response.render([], {**query, "input": "Statins lower LDL.", "passages": ""}, description="x")
    assert "Background" not in plain and plain.endswith("Input: Statins lower LDL.\nAnswer:")


def test_train_and_judge_templates_stay_the_core_ones():
    assert template("train") == default_template("train")
    assert template("judge") == default_template("judge")


# ---------------------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    "instruction",
    [
        "Should I take ibuprofen or paracetamol for my headache?",
        "My doctor prescribed metformin; is that the right drug?",
        "Given my symptoms of chest pain and fatigue, what do I have?",
        "I was diagnosed with type 2 diabetes last year. What diet is best?",
        "Can I take aspirin while breastfeeding?",
        "What should my daughter do about her asthma?",
    ],
)
def test_personal_medical_advice_is_dropped(instruction):
    record = {"instruction": instruction, "input": ""}
    assert filter_reason(DOMAIN, "instruction", record) == "plugin:biomed:personal_medical_advice"


@pytest.mark.parametrize(
    "instruction",
    [
        "Which enzyme do statins inhibit to lower cholesterol synthesis?",
        "Classify the patient question below as urgent or not urgent.",  # the input may quote a patient
        "Should clinicians screen adults over 50 for colorectal cancer? Answer yes, no, or maybe.",
        "Summarize the case report of a 67-year-old man with chest pain.",
    ],
)
def test_research_and_clinical_questions_are_kept(instruction):
    record = {"instruction": instruction, "input": "Should I take my pills with food? My doctor did not say."}
    assert filter_reason(DOMAIN, "instruction", record) is None


def test_filters_and_blacklist_leave_the_seeds_and_other_domains_alone():
    advice = {"instruction": "Should I take ibuprofen for my back pain?", "input": ""}
    assert filter_reason("finance", "instruction", advice) is None
    assert filter_reason(DOMAIN, "response", {**advice, "output": "No."}) is None
    blacklist = blacklist_pattern(DOMAIN)
    assert blacklist.search("Describe the abnormality visible on the radiograph.")
    assert blacklist.search("Interpret this ECG tracing.")
    assert not blacklist_pattern("finance").search("Interpret this ECG tracing.")
    for seed in domain_seeds(DOMAIN):
        assert filter_reason(DOMAIN, "instruction", seed.to_dict()) is None, seed.id
        assert not blacklist.search(seed.instruction), seed.id


def test_hooks_answer_only_for_biomed():
    import selfspec_biomed as plugin

    assert plugin.seed_provider(domain="finance") is None
    assert plugin.prompt_template(domain="finance", stage="instruction") is None
    assert plugin.blacklist_words(domain="finance") is None
    assert plugin.evaluation_tasks(domain="finance") is None
    assert plugin.retrieval_corpus(domain="finance", data_dir=str(DATA)) is None


# ------------------------------------------------------------------------------ evaluation tasks


def pubmedqa_tasks() -> dict:
    return {name: task for name, task in tasks_by_name().items() if name.startswith("pubmedqa")}


def test_tasks_declare_licence_mode_and_split():
    assert set(tasks_by_name()) == {"pubmedqa", "pubmedqa_dev", "pubmedqa_gen", "mmlu_medical", "medmcqa"}
    found = pubmedqa_tasks()
    assert all(task.licence.startswith("MIT") and task.data_file == "pubmedqa/ori_pqal.json" for task in found.values())
    assert (found["pubmedqa"].mode, found["pubmedqa_gen"].mode) == ("loglikelihood", "generate")
    assert {task.name: task.extra["split"] for task in found.values()} == {
        "pubmedqa": "test",
        "pubmedqa_dev": "dev",
        "pubmedqa_gen": "test",
    }
    # the quick profile scores by log-likelihood only, which leaves no member of the suite out
    quick = installed_domains()[DOMAIN].profile_settings["quick"]
    assert quick["evaluate"] == {"modes": "loglikelihood"}
    # more reading tasks, adapters on the top blocks only: chosen on PubMedQA dev over three seeds
    assert quick["generate"] == {"num_mined": 700} and quick["train"] == {"lora_top_share": 0.67}
    suite = [task for task in tasks_by_name().values() if task.extra.get("suite", True)]
    assert {task.mode for task in suite} == {"loglikelihood"}
    # the suite counts PubMedQA once
    assert {name for name, task in tasks_by_name().items() if task.extra.get("suite", True)} == {
        "pubmedqa",
        "pubmedqa_dev",
        "mmlu_medical",
        "medmcqa",
    }


def test_pubmedqa_splits_are_the_official_500_and_the_other_500():
    path = data_path(tasks.PUBMEDQA_FILE)
    found = tasks_by_name()
    test, dev, generated = (task_items(found[name], DATA) for name in ("pubmedqa", "pubmedqa_dev", "pubmedqa_gen"))
    truth = json.loads((path.parent / tasks.TEST_IDS_FILE).read_text())
    assert len(test) == len(dev) == 500
    assert {item.id: item.answer for item in test} == truth
    assert not {item.id for item in test} & {item.id for item in dev}
    assert generated == test
    item = test[0]
    assert item.choices == ("yes", "no", "maybe") and item.instruction.startswith("Question: ")
    assert item.instruction.endswith("? Based on the abstract, answer yes, no, or maybe.")
    record = json.loads(path.read_text())[item.id]
    assert item.input == " ".join(record["CONTEXTS"]) and record["LONG_ANSWER"] not in item.input


def test_pubmedqa_loader_names_the_broken_file(tmp_path):
    (tmp_path / "ori_pqal.json").write_text(
        json.dumps({"1": {"QUESTION": "Q?", "CONTEXTS": ["c"], "final_decision": "perhaps"}})
    )
    (tmp_path / "test_ground_truth.json").write_text(json.dumps({"1": "yes"}))
    with pytest.raises(SelfspecError, match=r"ori_pqal.json: question 1: final_decision 'perhaps'"):
        tasks.load_pubmedqa(tmp_path / "ori_pqal.json", "test")
    (tmp_path / "test_ground_truth.json").write_text(json.dumps({"2": "yes"}))
    with pytest.raises(SelfspecError, match="test id 2"):
        tasks.load_pubmedqa(tmp_path / "ori_pqal.json", "test")
    (tmp_path / "test_ground_truth.json").unlink()
    with pytest.raises(SelfspecError, match="test_ground_truth.json: not found"):
        tasks.load_pubmedqa(tmp_path / "ori_pqal.json", "dev")


def test_seeds_share_no_13_gram_with_the_evaluation_data():
    data_path(tasks.PUBMEDQA_FILE)
    items = task_items(tasks_by_name()["pubmedqa"], DATA) + task_items(tasks_by_name()["pubmedqa_dev"], DATA)
    seeds = [record_text(seed.to_dict()) for seed in domain_seeds(DOMAIN)]
    assert ngram_overlap(seeds, item_texts(items), 13) == set()


# ---------------------------------------------------------------------------------------- corpus


def test_corpus_reads_both_collections_from_the_data_dir():
    data_path(corpus.CORPUS_FOLDER)
    import selfspec_biomed as plugin

    passages = plugin.retrieval_corpus(domain=DOMAIN, data_dir=str(DATA))
    assert all(isinstance(p, Passage) and p.text for p in passages)
    assert len({p.id for p in passages}) == len(passages) == 2888 + 1852
    abstracts = {p.id: p for p in passages}
    assert abstracts["medical_abstracts_tc:2"].title == "nervous system diseases"
    assert abstracts["medical_abstracts_tc:2"].text.startswith("Obstructive sleep apnea following topical")
    hallmark = next(p for p in passages if p.id.startswith("pmid:"))
    assert " ( " not in hallmark.text and " ." not in hallmark.text


def test_corpus_follows_selfspec_data_and_falls_back_to_the_shipped_abstracts(monkeypatch, tmp_path):
    monkeypatch.delenv("SELFSPEC_DATA", raising=False)
    shipped = corpus.passages(None)
    assert corpus.passages(tmp_path) == shipped  # a data dir without the corpus: the shipped abstracts
    hallmarks = tmp_path / corpus.CORPUS_FOLDER / corpus.HALLMARKS_TEXT
    hallmarks.mkdir(parents=True)
    (hallmarks / "123.txt").write_text("Ghrelin binds GHS-R ( the receptor ) .\nIt is found in hepatoma cells .\n")
    monkeypatch.setenv("SELFSPEC_DATA", str(tmp_path))
    assert corpus.passages(None) == shipped + [
        Passage("pmid:123", "Ghrelin binds GHS-R (the receptor). It is found in hepatoma cells.")
    ]
    monkeypatch.setattr(corpus, "MEDICAL_ABSTRACTS", replace(corpus.MEDICAL_ABSTRACTS, shipped=None, hub=None))
    monkeypatch.delenv("SELFSPEC_DATA")
    assert corpus.passages(None) is None  # nothing anywhere: retrieval off


def test_corpus_never_overlaps_pubmedqa():
    data_path(tasks.PUBMEDQA_FILE)
    data_path(corpus.CORPUS_FOLDER)
    records = json.loads((DATA / tasks.PUBMEDQA_FILE).read_text()).values()
    evaluation = [" ".join(r["CONTEXTS"]) + " " + r["LONG_ANSWER"] for r in records]
    assert ngram_overlap([p.text for p in corpus.passages(DATA)], evaluation, 13) == set()


# ------------------------------------------------------------------------- shipped data, the Hub


def test_shipped_pubmedqa_and_abstracts_are_found_with_no_data_dir(monkeypatch):
    """What the README's first command evaluates and grounds on, offline, on a fresh machine."""
    monkeypatch.delenv("SELFSPEC_DATA", raising=False)
    found = pubmedqa_tasks()
    assert {name: find_data(task.source, None).where for name, task in found.items()} == dict.fromkeys(found, "shipped")
    test, dev = task_items(found["pubmedqa"], None), task_items(found["pubmedqa_dev"], None)
    truth = json.loads((tasks.SHIPPED / tasks.TEST_IDS_FILE).read_text())
    assert len(test) == len(dev) == 500 and {item.id: item.answer for item in test} == truth
    passages = corpus.passages(None)
    assert len({p.id for p in passages}) == len(passages) == 2888
    assert passages[0].id == "medical_abstracts_tc:2" and passages[0].title == "nervous system diseases"
    assert {p.title for p in passages} == {
        "neoplasms",
        "digestive system diseases",
        "nervous system diseases",
        "cardiovascular diseases",
        "general pathological conditions",
    }
    evaluation = [item.input for item in test + dev]
    assert ngram_overlap([p.text for p in passages], evaluation, 13) == set()  # never retrieve an evaluation item


def test_shipped_files_are_the_originals_with_their_licences():
    assert sorted(p.name for p in tasks.SHIPPED.iterdir()) == [
        "LICENSE",
        "SOURCE.md",
        "ori_pqal.json.gz",
        "test_ground_truth.json",
    ]
    assert sorted(p.name for p in corpus.SHIPPED.iterdir()) == [
        "LICENSE",
        "SOURCE.md",
        "medical_tc_labels.csv",
        "medical_tc_test.csv.gz",
    ]
    assert (tasks.SHIPPED / "LICENSE").read_text().startswith("MIT License")
    assert "Attribution-ShareAlike 3.0 Unported" in (corpus.SHIPPED / "LICENSE").read_text()
    assert "CC BY-SA 3.0" in (corpus.SHIPPED / "SOURCE.md").read_text()
    original = data_path(tasks.PUBMEDQA_FILE)
    assert gzip.decompress((tasks.SHIPPED / "ori_pqal.json.gz").read_bytes()) == original.read_bytes()
    abstracts = data_path(corpus.MEDICAL_ABSTRACTS.path)
    assert gzip.decompress((corpus.SHIPPED / "medical_tc_test.csv.gz").read_bytes()) == abstracts.read_bytes()


def test_pubmedqa_from_its_hub_layout_gives_the_shipped_items(tmp_path, monkeypatch):
    """``qiaojin/PubMedQA`` config ``pqa_labeled`` (pubid, question, context.contexts, final_decision),
    built from the shipped file, read through ``datasets`` as the Hub path reads it."""
    import datasets

    records = json.loads(gzip.decompress((tasks.SHIPPED / "ori_pqal.json.gz").read_bytes()))
    strings = datasets.List(datasets.Value("string"))
    features = datasets.Features(
        {
            "pubid": datasets.Value("int32"),
            "question": datasets.Value("string"),
            "context": {"contexts": strings, "labels": strings, "meshes": strings},
            "long_answer": datasets.Value("string"),
            "final_decision": datasets.Value("string"),
        }
    )
    rows = [
        {
            "pubid": int(pmid),
            "question": r["QUESTION"],
            "context": {"contexts": r["CONTEXTS"], "labels": r["LABELS"], "meshes": r["MESHES"]},
            "long_answer": r["LONG_ANSWER"],
            "final_decision": r["final_decision"],
        }
        for pmid, r in records.items()
    ]
    write_hub_dataset(
        tmp_path / "hub" / tasks.HUB.repo,
        {"pqa_labeled": {"train": datasets.Dataset.from_list(rows, features=features)}},
    )
    use_hub_mirror(monkeypatch, tmp_path / "hub")
    for name, task in pubmedqa_tasks().items():
        from_hub = replace(task, shipped=None)
        assert find_data(from_hub.source, tmp_path).where == "hub"
        assert task_items(from_hub, tmp_path) == task_items(task, tmp_path), name


def test_abstracts_from_their_hub_layout_give_the_shipped_passages(tmp_path, monkeypatch):
    """``TimSchopf/medical_abstracts`` split ``test`` (condition_label, medical_abstract)."""
    import datasets

    text = gzip.decompress((corpus.SHIPPED / "medical_tc_test.csv.gz").read_bytes()).decode()
    rows = [
        {"condition_label": int(row["condition_label"]), "medical_abstract": row["medical_abstract"]}
        for row in csv.DictReader(io.StringIO(text, newline=""))
    ]
    write_hub_dataset(
        tmp_path / "hub" / corpus.MEDICAL_ABSTRACTS.hub.repo, {None: {"test": datasets.Dataset.from_list(rows)}}
    )
    use_hub_mirror(monkeypatch, tmp_path / "hub")
    monkeypatch.delenv("SELFSPEC_DATA", raising=False)
    shipped = corpus.passages(None)
    monkeypatch.setattr(corpus, "MEDICAL_ABSTRACTS", replace(corpus.MEDICAL_ABSTRACTS, shipped=None))
    assert corpus.passages(None) == shipped
