import base64
import re

from selfspec_core.config import load_settings
from selfspec_core.models.loading import ModelRef
from selfspec_core.records import Domain, Seed
from selfspec_core.run.context import StageContext
from selfspec_core.run.rundir import RunDir, atomic_write_json, write_jsonl
from selfspec_core.stages import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _context(run: RunDir, seeds=()):
    settings = load_settings("tiny")
    return StageContext(
        settings,
        Domain("finance", "financial analysis"),
        run,
        list(seeds),
        ModelRef("smollm2-135m", "/nowhere"),
        run.partial_dir("report"),
        log=lambda _: None,
    )


def _synthetic_run(path) -> RunDir:
    """A finished run written by hand: manifests, training log, evaluation and contamination files."""
    run = RunDir(path, "finance").open()
    atomic_write_json(
        run.stage_dir("generate") / "manifest.json",
        {
            "stage": "generate",
            "seconds": 12.5,
            "peak_rss_mb": 900.0,
            "funnel": {"generated": 120, "kept": 80, "dropped": {"rouge_duplicate": 30, "blacklist": 10}},
        },
    )
    atomic_write_json(
        run.stage_dir("respond") / "manifest.json",
        {
            "stage": "respond",
            "seconds": 30.0,
            "funnel": {"generated": 80, "kept": 70, "dropped": {"empty_output": 4, "judge": 6}},
            "retrieval": {"corpus_passages": 4740, "mean_top_score": 7.25, "records_with_passages": 66},
            "judge_scores": [0.1, 0.4, 0.8, 0.9, 0.95, 0.7],
        },
    )
    write_jsonl(
        run.stage_dir("respond") / "data.jsonl",
        [
            {"id": f"r{i}", "instruction": f"Explain the ratio number {i}.", "input": "a | b", "output": f"Answer {i}."}
            for i in range(12)
        ],
    )
    atomic_write_json(
        run.stage_dir("train") / "manifest.json",
        {"stage": "train", "seconds": 60.0, "train_records": 70, "final_loss": 1.234},
    )
    write_jsonl(
        run.stage_dir("train") / "train_log.jsonl",
        [{"step": s, "loss": 3.0 - 0.1 * s, "learning_rate": 3e-4 * (1 - s / 20)} for s in range(1, 20)],
    )
    atomic_write_json(
        run.stage_dir("evaluate") / "manifest.json",
        {
            "stage": "evaluate",
            "seconds": 40.0,
            "throughput": {
                "prompt_tokens": 41000,
                "generated_tokens": 0,
                "tokens_per_second": 1025.0,
                "ceiling_tokens_per_second": 4100.0,
            },
        },
    )
    atomic_write_json(
        run.stage_dir("evaluate") / "eval.json",
        {
            "phrasebank": {
                "metric": "accuracy",
                "mode": "loglikelihood",
                "base": 0.55,
                "specialized": 0.68,
                "delta": 0.13,
                "ci": [0.08, 0.18],
                "n": 500,
                "domain": "finance",
                "majority": {"answer": "neutral", "share": 0.6},
                "macro_f1": {"base": 0.15, "specialized": 0.31, "majority": 0.25, "delta": 0.16, "ci": [0.09, 0.22]},
                "answers": {
                    "gold": {"neutral": 300, "positive": 120, "negative": 80},
                    "base": {"positive": 499, "negative": 1},
                    "specialized": {"neutral": 480, "positive": 20},
                },
            },
            "tatqa": {
                "metric": "numeric",
                "mode": "generate",
                "base": 0.10,
                "specialized": 0.09,
                "delta": -0.01,
                "ci": [-0.04, 0.02],
                "n": 300,
                "domain": "finance",
            },
            "finqa": {
                "metric": "numeric",
                "mode": "generate",
                "domain": "finance",
                "n": 0,
                "skipped": "task finqa (finance) skipped: /data/finqa/test.json not found; "
                "put finqa/test.json under /data",
            },
            "cross_domain": {
                "pubmedqa": {
                    "metric": "accuracy",
                    "mode": "loglikelihood",
                    "base": 0.5,
                    "specialized": 0.44,
                    "delta": -0.06,
                    "ci": [-0.1, -0.02],
                    "n": 200,
                    "domain": "biomed",
                }
            },
        },
    )
    atomic_write_json(
        run.stage_dir("evaluate") / "contamination.json",
        {
            "ngram": 13,
            "training_records": 70,
            "overlapping_records": [
                {
                    "id": "r3",
                    "items": ["finance/phrasebank:17"],
                    "example": "quarterly operating income at the lisbon packaging unit climbed",
                }
            ],
            "tasks": {
                "finance/phrasebank": {
                    "domain": "finance",
                    "items": 500,
                    "items_touched": 1,
                    "share": 0.002,
                    "scored_items_touched": 1,
                    "too_short": 3,
                    "training_records": ["r3"],
                }
            },
        },
    )
    return run


def test_report_has_every_section_with_plots(tmp_path):
    run = _synthetic_run(tmp_path / "run")
    seeds = [Seed(str(i), "qa", "q", "", "a") for i in range(10)]
    counts = report.run_stage(_context(run, seeds))
    folder = run.partial_dir("report")
    page = (folder / "report.html").read_text()
    markdown = (folder / "report.md").read_text()
    for title in (
        "Run",
        "Pipeline funnel",
        "Retrieval",
        "Training",
        "Base vs specialized",
        "Cross-domain cost",
        "Contamination",
        "Judge scores",
        "Sample generated records",
    ):
        assert f"<h2>{title}</h2>" in page and f"## {title}\n" in markdown
    assert counts == {"sections": 9, "figures": 5}

    # funnel: seeds, drops by reason, kept
    assert "| 41,000 | 1,025.0 | 4,100.0 |" in markdown
    assert "| seeds | 10 |" in markdown and "| dropped: rouge_duplicate | 30 |" in markdown
    assert "| training records kept | 70 |" in markdown
    # evaluation with intervals, skipped task with its message, cross-domain separately
    assert (
        "| phrasebank | finance | accuracy | loglikelihood | 500 | 0.550 | 0.680 | +0.130 | [+0.080, +0.180] "
        "| 0.600 (neutral) |" in markdown
    )
    assert (
        "| phrasebank | neutral 300, positive 120, negative 80 | positive 499, negative 1 | neutral 480, positive 20 |"
        in markdown
    )
    assert "| phrasebank | 0.150 | 0.310 | +0.160 | [+0.090, +0.220] | 0.250 |" in markdown
    assert "| tatqa | finance | numeric | generate | 300 | 0.100 | 0.090 | -0.010 | [-0.040, +0.020] |  |" in markdown
    assert "| finqa | finance | task finqa (finance) skipped: /data/finqa/test.json not found" in markdown
    assert "above zero on 1 (phrasebank) and below zero on none" in markdown
    assert "above zero on none and below zero on 1 (pubmedqa)" in markdown
    assert "| pubmedqa | biomed |" in markdown
    assert "| finance/phrasebank | 500 | 1 | 0.2% |" in markdown
    assert "| corpus_passages | 4,740 |" in markdown
    assert "19 logged steps" in markdown
    # pipe characters in records are escaped, not table breaks
    assert "a \\| b" in markdown

    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 5 and all(base64.b64decode(i).startswith(PNG_MAGIC) for i in images)
    for name in ("funnel.png", "loss.png", "evaluation.png", "cross_domain.png", "judge_scores.png"):
        assert f"]({name})" in markdown and (folder / name).read_bytes().startswith(PNG_MAGIC)


def test_report_of_an_empty_run_says_not_available(tmp_path):
    run = RunDir(tmp_path / "run", "finance").open()
    (run.stage_dir("evaluate")).mkdir()
    (run.stage_dir("evaluate") / "eval.json").write_text("{ torn")  # corrupt: read as missing
    report.run_stage(_context(run))
    markdown = (run.partial_dir("report") / "report.md").read_text()
    assert markdown.count(report.NOT_AVAILABLE) >= 8
    assert "![" not in markdown  # no plots without data
    assert "<h2>Base vs specialized</h2>" in (run.partial_dir("report") / "report.html").read_text()


def _variant(base, specialized, answers_base, answers_specialized):
    return {
        "base": base,
        "specialized": specialized,
        "delta": round(specialized - base, 6),
        "ci": [round(specialized - base - 0.05, 6), round(specialized - base + 0.05, 6)],
        "n": 10,
        "macro_f1": {"base": 0.2, "specialized": 0.3, "majority": 0.25, "delta": 0.1, "ci": [0.0, 0.2]},
        "answers": {"base": answers_base, "specialized": answers_specialized},
    }


def _clause_task(headline: str) -> dict:
    """A law author's 3-way clause task: by summed log-probability both models answer "payment" to all."""
    variants = {
        "acc": _variant(0.4, 0.4, {"payment": 10}, {"payment": 10}),
        "acc_per_token": _variant(0.3, 0.3, {"confidentiality": 9, "payment": 1}, {"confidentiality": 10}),
        "acc_norm": _variant(0.5, 0.6, {"payment": 6, "termination": 4}, {"payment": 5, "termination": 5}),
        "acc_calibrated": _variant(
            0.6, 0.7, {"termination": 4, "payment": 3, "confidentiality": 3}, {"payment": 8, "termination": 2}
        ),
    }
    chosen = variants[headline]
    return {
        "metric": "accuracy",
        "mode": "loglikelihood",
        "domain": "law",
        **{key: chosen[key] for key in ("base", "specialized", "delta", "ci", "n", "macro_f1")},
        "majority": {"answer": "payment", "share": 0.4},
        "answers": {"gold": {"payment": 4, "termination": 3, "confidentiality": 3}, **chosen["answers"]},
        "headline": headline,
        "variants": variants,
    }


def test_choice_tasks_show_every_way_of_picking_and_flag_a_label_prior():
    section = report.comparison_section("Base vs specialized", {"clauses": _clause_task("acc")}, "e.png", "none")
    markdown = report.render_markdown("r", [section])
    assert (
        "| clauses | acc (headline) | 0.400 | 0.400 | +0.000 | [-0.050, +0.050] | 0.200 | 0.300 "
        "| +0.100 [+0.000, +0.200] | 0.400 / 0.250 | payment 100% / payment 100% |" in markdown
    )
    assert (
        "| clauses | acc_per_token | 0.300 | 0.300 |" in markdown
        and "confidentiality 90% / confidentiality 100%" in markdown
    )
    assert "| clauses | acc_calibrated | 0.600 | 0.700 |" in markdown
    assert (
        "Warning: clauses: the base model answers payment 100% of the items and the specialized model answers "
        "payment 100% of the items: this score measures a label prior, not reading (headline acc). "
        "Picked by acc_norm or acc_calibrated, neither model does." in markdown
    )  # acc_calibrated's specialized answers are 80% payment: not more than 80%

    calibrated = report.comparison_section("x", {"clauses": _clause_task("acc_norm")}, "e.png", "none")
    assert "| clauses | acc_norm (headline) |" in report.render_markdown("r", [calibrated])
    assert not any("label prior" in str(block) for block in calibrated.blocks)
    generated = {"clauses_gen": {**_clause_task("acc"), "mode": "generate"}}
    generated["clauses_gen"].pop("variants")
    plain = report.render_markdown("r", [report.comparison_section("x", generated, "e.png", "none")])
    assert "answer picked by" not in plain


def test_a_score_without_contaminated_items_is_shown_beside_the_full_one():
    entry = {
        **_clause_task("acc_norm"),
        "contaminated_dropped": 2,
        "full": {"base": 0.55, "specialized": 0.75, "delta": 0.2, "ci": [0.1, 0.3], "n": 12},
    }
    markdown = report.render_markdown("r", [report.comparison_section("x", {"clauses": entry}, "e.png", "none")])
    assert "| clauses | 2 | 10 | +0.100 | 12 | 0.550 | 0.750 | +0.200 |" in markdown
