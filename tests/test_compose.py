"""`selfspec compose`: experts from runs, a router learnt from their data, bad input, evaluation."""

import json
import random
import urllib.request
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from selfspec_core.cli.main import main
from selfspec_core.compose import experts as compose_module
from selfspec_core.compose.experts import (
    BASE,
    ComposedModel,
    compose,
    find_expert,
    general_prompts,
    read_composed,
    route_texts,
)
from selfspec_core.config import load_settings
from selfspec_core.errors import SelfspecError
from selfspec_core.models.loading import ModelRef, load_model, load_tokenizer
from selfspec_core.plugins.defaults import TRAIN_TEMPLATE
from selfspec_core.run.adapter import adapter_prompts
from selfspec_core.run.rundir import write_jsonl

_FINANCE = (
    [
        "revenue",
        "dividend",
        "bond yields",
        "operating margin",
        "share buyback",
        "net income",
        "quarterly earnings",
        "credit rating",
        "cash flow",
        "stock price",
    ],
    [
        "Classify the sentiment of this sentence about {x}.",
        "Did {x} rise or fall in the quarter?",
        "Explain what {x} tells an investor.",
        "Summarize the change in {x} for shareholders.",
    ],
)
_BIOMED = (
    [
        "mortality",
        "the placebo group",
        "tumour growth",
        "blood pressure",
        "the randomized trial",
        "insulin resistance",
        "viral load",
        "the cohort study",
        "gene expression",
        "adverse events",
    ],
    [
        "Does the abstract show that treatment lowered {x}?",
        "What did the study find about {x} in patients?",
        "Is {x} reported as significant in the trial?",
        "Summarize the finding on {x} for clinicians.",
    ],
)


def domain_records(words, forms, n, seed):
    rng = random.Random(seed)
    return [
        {
            "instruction": rng.choice(forms).format(x=rng.choice(words)),
            "input": f"The report on {rng.choice(words)} and {rng.choice(words)} was published.",
            "output": "yes",
        }
        for _ in range(n)
    ]


def make_run(
    folder: Path,
    domain: str,
    model_dir: Path,
    records: list[dict],
    seed: int = 0,
    adapter: bool = True,
    model: str | None = None,
) -> Path:
    """A finished run folder as the pipeline leaves it: run.json, config.json, respond/data.jsonl, train/adapter."""
    from peft import LoraConfig, get_peft_model

    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"domain": domain, "version": "0"}))
    (folder / "config.json").write_text(json.dumps({"model": model or str(model_dir)}))
    (folder / "respond").mkdir()
    write_jsonl(folder / "respond" / "data.jsonl", records)
    if adapter:
        import torch

        torch.manual_seed(seed)
        lora = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        target = folder / "train" / "adapter"
        get_peft_model(load_model(ModelRef("tiny", str(model_dir))), lora).save_pretrained(target)
        (target / "selfspec_training.json").write_text(
            json.dumps({"model": "tiny", "data_file": "respond/data.jsonl", "prompt_template": asdict(TRAIN_TEMPLATE)})
        )
    return folder


@pytest.fixture(scope="module")
def two_runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return (
        make_run(root / "finance-quick", "finance", tiny_model_dir, domain_records(*_FINANCE, 60, 1), seed=1),
        make_run(root / "biomed-quick", "biomed", tiny_model_dir, domain_records(*_BIOMED, 60, 2), seed=2),
    )


@pytest.fixture(scope="module")
def composed(two_runs, tmp_path_factory):
    """The two synthetic runs composed. Their domains share names with the installed plugins (so the
    evaluation finds an expert for PubMedQA), whose real seeds a random tiny model cannot tell apart:
    the router learns from the runs' records alone here (seeds: test_installed_domains_add_their_seeds)."""
    out = tmp_path_factory.mktemp("composed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compose_module, "domain_seed_records", lambda domain: [])
        manifest = compose(two_runs, out, dtype="float32", log=lambda line: None)
    return out, manifest


def test_general_prompts_are_many_and_varied():
    prompts = general_prompts()
    assert len(prompts) >= 200
    assert len({p["instruction"] for p in prompts}) == len(prompts)


def test_installed_domains_add_their_seeds(two_runs, tmp_path):
    """An installed domain's human seeds train the router beside the run's records (never held back);
    a domain no plugin provides has none."""
    from selfspec_core.compose.experts import domain_seed_records
    from selfspec_core.run.pipeline import domain_seeds

    assert [s["id"] for s in domain_seed_records("biomed")] == [s.id for s in domain_seeds("biomed")]
    assert domain_seed_records("legal") == []
    manifest = compose(two_runs, tmp_path / "out", dtype="float32", log=lambda line: None)
    examples = manifest["router"]["examples"]
    assert examples["biomed"] == {"records": 60, "seeds": len(domain_seeds("biomed"))}
    assert examples["finance"]["seeds"] == len(domain_seeds("finance")) and examples[BASE]["seeds"] == 0


def test_router_sends_known_inputs_to_their_expert(composed, tiny_model_dir):
    out, manifest = composed
    assert manifest["labels"] == [BASE, "finance", "biomed"]
    held_back = manifest["router"]["held_back_accuracy"]
    assert held_back["finance"] >= 0.95 and held_back["biomed"] >= 0.95
    assert held_back[BASE] >= 0.7  # a random tiny model's features tell general text apart less well
    _, experts, router = read_composed(out)
    ref = ModelRef("tiny", str(tiny_model_dir))
    model, tokenizer = load_model(ref), load_tokenizer(ref)
    finance = [r["instruction"] + "\n\n" + r["input"] for r in domain_records(*_FINANCE, 20, 99)]
    biomed = [r["instruction"] + "\n\n" + r["input"] for r in domain_records(*_BIOMED, 20, 98)]
    routed = route_texts(model, tokenizer, router, finance + biomed)
    assert sum(r == "finance" for r in routed[:20]) >= 18
    assert sum(r == "biomed" for r in routed[20:]) >= 18


def test_composed_model_answers_as_the_chosen_expert(composed, tiny_model_dir):
    out, _ = composed
    model = ComposedModel(out, dtype="float32")
    assert model.names == [BASE, "finance", "biomed"]
    prompt = load_tokenizer(model.ref)("Did revenue rise or fall in the quarter?", return_tensors="pt").input_ids
    import torch

    outputs = {}
    with torch.inference_mode():
        for name in model.names:
            with model.use(name):
                outputs[name] = model.model(input_ids=prompt).logits
    base = load_model(ModelRef("tiny", str(tiny_model_dir)))(input_ids=prompt).logits
    assert torch.allclose(outputs[BASE], base, atol=1e-5)  # adapters off: the plain base
    assert not torch.allclose(outputs["finance"], outputs["biomed"])
    finance_alone = load_model(ModelRef("tiny", str(tiny_model_dir)), adapter=Path(two_runs_adapter(out, "finance")))
    assert torch.allclose(outputs["finance"], finance_alone(input_ids=prompt).logits, atol=1e-4)


def two_runs_adapter(out: Path, name: str) -> str:
    _, experts, _ = read_composed(out)
    return next(e.adapter for e in experts if e.name == name)


@pytest.mark.parametrize("problem", ["same_domain", "other_base", "no_adapter", "too_little", "not_a_run"])
def test_bad_runs_fail_in_one_line_with_exit_2(problem, two_runs, tiny_model_dir, tmp_path, capsys):
    finance, biomed = two_runs
    if problem == "same_domain":
        other = make_run(tmp_path / "finance-2", "finance", tiny_model_dir, domain_records(*_FINANCE, 30, 3))
        runs, expected = [finance, other], "both runs of domain 'finance'"
    elif problem == "other_base":
        other = make_run(
            tmp_path / "legal", "legal", tiny_model_dir, domain_records(*_FINANCE, 30, 3), model="gemma3-270m"
        )
        runs, expected = [finance, other], "different base models"
    elif problem == "no_adapter":
        other = make_run(tmp_path / "legal", "legal", tiny_model_dir, domain_records(*_FINANCE, 30, 3), adapter=False)
        runs, expected = [finance, other], "the run has no adapter"
    elif problem == "too_little":
        other = make_run(tmp_path / "legal", "legal", tiny_model_dir, domain_records(*_FINANCE, 5, 3))
        runs, expected = [biomed, other], "only 5 training records of domain 'legal'"
    else:
        (tmp_path / "stray").mkdir()
        runs, expected = [finance, tmp_path / "stray"], "neither a run folder nor a run's train/adapter"
    capsys.readouterr()  # the progress bars of making the runs
    with pytest.raises(SystemExit) as exit_info:
        main(["compose", *map(str, runs), "--output", str(tmp_path / "out"), "--no-evaluate"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err


def test_evaluation_scores_every_model_and_routes_benchmark_items(composed, tmp_path, monkeypatch):
    """On the biomed plugin's shipped PubMedQA: base, both specialists, both merges, the multi-task
    adapter and the composed model, each with its interval; the report has the table and the plot."""
    from selfspec_core.compose.evaluate import evaluate_composed

    out, _ = composed
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path / "cache"))
    settings = load_settings(
        "tiny",
        overrides={
            "evaluate": {"max_items": 12, "tasks": "pubmedqa", "cache_base_scores": False},
            "train": {"max_steps": 2, "epochs": 0},
            "dtype": "float32",
        },
    )
    result = evaluate_composed(out, settings, log=lambda line: None)
    task = result["tasks"]["biomed/pubmedqa"]
    assert set(task["models"]) == {BASE, "finance", "biomed", "merged-linear", "merged-ties", "multitask", "composed"}
    assert task["n"] == 12 and sum(task["routes"].values()) == 12
    multitask = adapter_prompts(out / "baselines" / "multitask" / "adapter", None)  # one form, as its experts'
    assert multitask.name == "alpaca" and multitask.template == TRAIN_TEMPLATE
    assert "composed_vs_specialist" in task
    assert 0 <= result["routing_accuracy"]["biomed"] <= 1
    report = (out / "eval" / "report.md").read_text()
    assert "Composed experts" in report and (out / "eval" / "composition.png").stat().st_size > 0
    predictions = [json.loads(line) for line in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    for row in predictions:  # the composed answer is the routed model's answer
        assert row["composed"] == row[row["route"]]
    with pytest.raises(SelfspecError, match="not a composed model"):
        read_composed(tmp_path)


def test_the_evaluation_reads_the_users_tasks_folder(composed, tmp_path):
    from selfspec_core.compose.evaluate import evaluate_composed

    settings = load_settings("tiny", overrides={"evaluate": {"task_dir": str(tmp_path / "missing")}})
    with pytest.raises(SelfspecError, match=r"missing: --tasks folder not found"):
        evaluate_composed(composed[0], settings, log=lambda line: None)


def test_a_multitask_adapter_records_the_one_form_its_experts_share_and_refuses_mixed_ones(two_runs, tmp_path):
    from selfspec_core.compose.evaluate import train_multitask

    experts = [find_expert(run) for run in two_runs]
    assert {expert.prompt_format for expert in experts} == {"alpaca"}
    mixed = [experts[0], replace(experts[1], prompt_format="chat")]
    settings = load_settings("tiny")
    with pytest.raises(SelfspecError, match=r"the experts learnt different prompt formats \(alpaca, chat\)"):
        train_multitask(ModelRef("tiny", experts[0].model), mixed, settings, tmp_path / "multitask", print)
    assert not (tmp_path / "multitask").exists()


def test_serve_routes_each_request_and_serves_each_expert_by_name(composed, tiny_model_dir):
    """The composed model behind the API: a request to the composed name is routed and says which expert
    answered; `<name>:<expert>` asks for one, and gets what that adapter alone would write."""
    from selfspec_core.models.generator import HFGenerator
    from selfspec_core.serve.app import ServerThread, composed_chat_prompts, create_app
    from tests.test_serve import post

    out, _ = composed
    experts = ComposedModel(out, dtype="float32")
    chat_prompts = composed_chat_prompts(experts)  # as `serve --composed`: the form the experts learnt
    generator = HFGenerator(experts.model, experts.tokenizer, 8)
    app = create_app(generator, "tiny+composed", experts=experts, chat_prompts=chat_prompts)
    finance = (
        "Did quarterly earnings rise or fall in the quarter?\n\nThe report on revenue and cash flow was published."
    )
    biomed = (
        "Does the abstract show that treatment lowered mortality?\n\n"
        "The report on viral load and adverse events was published."
    )
    with ServerThread(app) as server:
        with urllib.request.urlopen(f"{server.url}/models", timeout=30) as reply:
            names = [m["id"] for m in json.loads(reply.read())["data"]]
        assert names == ["tiny+composed", "tiny+composed:base", "tiny+composed:finance", "tiny+composed:biomed"]
        status, body = post(
            f"{server.url}/completions",
            {"model": "tiny+composed", "prompt": [finance, biomed], "max_tokens": 6, "temperature": 0},
        )
        assert status == 200
        assert [c["expert"] for c in json.loads(body)["choices"]] == ["finance", "biomed"]
        status, body = post(
            f"{server.url}/completions",
            {"model": "tiny+composed:biomed", "prompt": finance, "max_tokens": 6, "temperature": 0},
        )
        reply = json.loads(body)
        assert status == 200 and reply["choices"][0]["expert"] == "biomed" and reply["model"] == "tiny+composed:biomed"
        alone = (
            HFGenerator(
                load_model(ModelRef("tiny", str(tiny_model_dir)), adapter=two_runs_adapter(out, "biomed")),
                experts.tokenizer,
                8,
            )
            .generate([finance], max_new_tokens=6)[0]
            .text
        )
        assert reply["choices"][0]["text"] == alone
        status, body = post(f"{server.url}/completions", {"model": "tiny+composed:legal", "prompt": finance})
        assert status == 404 and "tiny+composed:finance" in body
        messages = [{"role": "user", "content": finance}]
        chat = {"model": "tiny+composed:finance", "messages": messages, "max_tokens": 6, "temperature": 0}
        status, body = post(f"{server.url}/chat/completions", chat)
        asked = experts.experts[0].prompts(experts.tokenizer).prompt({"instruction": finance})
        with experts.use("finance"):
            expected = generator.generate([asked], max_new_tokens=6)[0].text
        assert status == 200 and chat_prompts.name == "alpaca"
        assert json.loads(body)["choices"][0]["message"]["content"] == expected  # asked in the Alpaca form
