"""Stage 5: what a run did and whether it helped, as ``report.html`` and ``report.md``.

The HTML is one self-contained file (plots inline as base64 PNG) to mail or attach to a ticket; the
Markdown references the same plots saved beside it, for a repository or a wiki. Both come from one
list of sections, so they never disagree.

Every input is read defensively: a run without a judge, without retrieval, or with a stage not run
yet still gets a report, with "not available" where a piece is missing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfspec_core.run.rounds import SUMMARY_FILE
from selfspec_core.run.rundir import atomic_write_text, read_json, read_jsonl
from selfspec_core.stages.estimate import read_estimate
from selfspec_core.stages.evaluate import SUITE_FILE

NOT_AVAILABLE = "not available"
# A model giving one label to more than this share of a task's items is not reading the items.
LABEL_PRIOR_SHARE = 0.8
_BOOKKEEPING = {"stage", "finished_at", "config_hash", "input_hash"}


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Any]]


@dataclass
class Figure:
    name: str  # file name of the PNG beside report.md
    caption: str
    png: bytes


@dataclass
class Section:
    title: str
    blocks: list[str | Table | Figure] = field(default_factory=list)


# ------------------------------------------------------------------------------ defensive reading


def _read_records(path: Path) -> list[dict]:
    try:
        return [r for r in read_jsonl(path) if isinstance(r, dict)]
    except (OSError, ValueError):
        return []


def _mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fmt(value: Any, signed: bool = False) -> str:
    """Counts with thousands separators, scores with three decimals, other text as is."""
    number = _number(value)
    if number is None:
        return "" if value is None else str(value)
    if isinstance(value, int) and not signed:
        return f"{value:,}"
    if signed:
        return f"{number:+.3f}"
    return f"{number:.3f}" if abs(number) < 10 else f"{number:,.1f}"


def _clip(text: Any, limit: int = 400) -> str:
    text = str(text or "")
    return text if len(text) <= limit else text[:limit].rstrip() + " ..."


# ------------------------------------------------------------------------------------------ plots


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure as MplFigure  # the Agg canvas; no pyplot, no display needed

    return MplFigure(figsize=(width, height))


def funnel_plot(steps: list[tuple[str, int, bool]]) -> bytes:
    """Horizontal bars from seeds to training records; drops in red."""
    figure = _new_figure(7, 0.45 * len(steps) + 0.8)
    axes = figure.subplots()
    labels = [label for label, _, _ in steps][::-1]
    values = [value for _, value, _ in steps][::-1]
    colors = ["#c0392b" if dropped else "#2c7fb8" for _, _, dropped in steps][::-1]
    bars = axes.barh(labels, values, color=colors)
    axes.bar_label(bars, padding=3, fontsize=8)
    axes.set_xlabel("records")
    axes.spines[["top", "right"]].set_visible(False)
    return _png(figure)


def loss_plot(rows: list[dict]) -> bytes:
    figure = _new_figure(7, 3.2)
    axes = figure.subplots()
    axes.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="#2c7fb8", label="training loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    rates = [
        (r["step"], r["learning_rate"])
        for r in rows
        if _number(r.get("step")) is not None and _number(r.get("learning_rate")) is not None
    ]
    if rates:
        twin = axes.twinx()
        twin.plot(
            [s for s, _ in rates], [lr for _, lr in rates], color="#999999", linestyle="--", label="learning rate"
        )
        twin.set_ylabel("learning rate")
    axes.spines[["top"]].set_visible(False)
    return _png(figure)


def comparison_plot(entries: list[tuple[str, dict]]) -> bytes:
    """Left: base vs specialized per task (dashed: the majority-answer baseline, where the task has
    one). Right: the difference with its 95% interval."""
    import numpy as np

    figure = _new_figure(9, 0.5 * len(entries) + 1.4)
    left, right = figure.subplots(1, 2, sharey=True)
    names = [name for name, _ in entries]
    positions = np.arange(len(entries))
    left.barh(positions + 0.2, [e["base"] for _, e in entries], height=0.4, color="#bbbbbb", label="base")
    left.barh(positions - 0.2, [e["specialized"] for _, e in entries], height=0.4, color="#2c7fb8", label="specialized")
    majority = [
        (position, _number(_mapping(e.get("majority")).get("share"))) for position, (_, e) in zip(positions, entries)
    ]
    majority = [(position, share) for position, share in majority if share is not None]
    if majority:  # what always giving the most common answer scores: the bar a real gain must clear
        left.vlines(
            [share for _, share in majority],
            [p - 0.45 for p, _ in majority],
            [p + 0.45 for p, _ in majority],
            colors="#d95f02",
            linestyles="dashed",
            linewidth=1.5,
            label="always the majority answer",
        )
    left.set_yticks(positions, names)
    left.invert_yaxis()
    left.set_xlim(left=0)
    left.set_xlabel("score")
    left.legend(
        loc="upper center", bbox_to_anchor=(0.5, -0.9 / (0.5 * len(entries) + 1.4)), ncol=3, fontsize=8, frameon=False
    )
    deltas = np.array([e["delta"] for _, e in entries])
    intervals = np.array([e["ci"] if isinstance(e.get("ci"), list) else [e["delta"]] * 2 for _, e in entries])
    errors = np.vstack([deltas - intervals[:, 0], intervals[:, 1] - deltas])
    for position, delta, error, (low, high) in zip(positions, deltas, errors.T, intervals):
        color = "#1a9850" if low > 0 else "#d73027" if high < 0 else "#555555"  # clear gain / clear loss / unclear
        right.errorbar([delta], [position], xerr=error.reshape(2, 1), fmt="o", color=color, capsize=4)
    right.axvline(0, color="#999999", linewidth=1)
    right.set_xlabel("specialized - base (95% CI)")
    for axes in (left, right):
        axes.spines[["top", "right"]].set_visible(False)
    return _png(figure)


def histogram_plot(values: list[float], xlabel: str) -> bytes:
    figure = _new_figure(6, 3)
    axes = figure.subplots()
    axes.hist(values, bins=min(20, max(1, len(set(values)))), color="#2c7fb8", edgecolor="white")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("records")
    axes.spines[["top", "right"]].set_visible(False)
    return _png(figure)


# --------------------------------------------------------------------------------------- sections


def run_section(run, model: str) -> Section:
    section = Section("Run", [f"Domain {run.domain}, model {model}, run directory {run.path}."])
    rows = []
    for stage in ("generate", "respond", "train", "evaluate"):
        manifest = _mapping(run.manifest(stage))
        speed = _mapping(manifest.get("throughput"))
        tokens = sum(_number(speed.get(k)) or 0 for k in ("prompt_tokens", "generated_tokens"))
        if manifest:
            rows.append(
                [
                    stage,
                    manifest.get("finished_at", ""),
                    _fmt(manifest.get("seconds")),
                    _fmt(manifest.get("peak_rss_mb")),
                    _fmt(manifest.get("peak_gpu_mb")),
                    _fmt(int(tokens) if tokens else None),
                    _fmt(speed.get("tokens_per_second")),
                    _fmt(speed.get("ceiling_tokens_per_second")),
                ]
            )
        else:
            rows.append([stage, NOT_AVAILABLE, "", "", "", "", "", ""])
    section.blocks.append(
        Table(
            [
                "stage",
                "finished",
                "seconds",
                "peak RAM MB",
                "peak GPU MB",
                "model tokens",
                "tokens/s",
                "ceiling tokens/s",
            ],
            rows,
        )
    )
    section.blocks.append(
        "Model tokens: prompt and generated tokens the model ran (training: tokens trained on). "
        "The ceiling is this machine's measured matrix-product rate over the model's operations "
        "per token (two per parameter; training: the least a LoRA token needs, a forward pass and the "
        "backward pass's input gradients through the frozen weights, the output layer only where a "
        "response token is predicted)."
    )
    return section


def estimate_section(run) -> Section | None:
    """The minutes estimated before each stage ran beside the minutes it took, when the run kept an
    estimate (``selfspec run`` does; folders from before it did not: no section)."""
    made = read_estimate(run.path)
    estimated = _mapping(made.get("stages"))
    compared = []  # (stage, estimated minutes, actual minutes)
    for stage in ("generate", "respond", "train", "evaluate"):  # the report's own time is not known yet
        minutes = _number(_mapping(estimated.get(stage)).get("minutes"))
        seconds = _number(_mapping(run.manifest(stage)).get("seconds"))
        if minutes is not None and seconds is not None:
            compared.append((stage, minutes, seconds / 60))
    if not compared:
        return None
    compared.append(("total", sum(row[1] for row in compared), sum(row[2] for row in compared)))
    rows = [[stage, f"{guess:,.1f}", f"{took:,.1f}", _times(took, guess)] for stage, guess, took in compared]
    return Section(
        "Time: estimate vs actual",
        [
            f"Estimated before the stages ran, from this machine's measured {made.get('dtype')} matrix-product "
            f"rate ({_fmt(made.get('matmul_gflops'))} GFLOP/s, {made.get('threads')} threads), the model's "
            f"{_fmt(made.get('parameters'))} parameters and the settings; actual: each stage's wall-clock minutes.",
            Table(["stage", "estimated minutes", "actual minutes", "actual / estimated"], rows),
        ],
    )


def _times(actual: float, estimated: float) -> str:
    return f"{actual / estimated:.2f}" if estimated > 0 else ""


def funnel_section(run, seeds: int | None) -> Section:
    section = Section("Pipeline funnel")
    steps: list[tuple[str, int, bool]] = []
    if seeds:
        steps.append(("seeds", seeds, False))
    for stage, made, kept in (
        ("generate", "instructions generated", "instructions kept"),
        ("respond", "responses generated", "training records kept"),
    ):
        funnel = _mapping(_mapping(run.manifest(stage)).get("funnel"))
        if not funnel:
            section.blocks.append(f"{stage}: funnel {NOT_AVAILABLE}.")
            continue
        steps.append((made, int(_number(funnel.get("generated")) or 0), False))
        for reason, count in sorted(_mapping(funnel.get("dropped")).items(), key=lambda kv: -(_number(kv[1]) or 0)):
            steps.append((f"  dropped: {reason}", int(_number(count) or 0), True))
        steps.append((kept, int(_number(funnel.get("kept")) or 0), False))
        steps += _source_steps(stage, _mapping(run.manifest(stage)))
    if steps:
        section.blocks.append(Table(["step", "records"], [[label.strip(), _fmt(value)] for label, value, _ in steps]))
        section.blocks.append(Figure("funnel.png", "From seeds to training records (drops in red)", funnel_plot(steps)))
    return section


def _source_steps(stage: str, manifest: dict) -> list[tuple[str, int, bool]]:
    """Where the records came from: tasks mined per miner (generate), generated vs mined (respond)."""
    if stage == "generate":
        mined = _mapping(manifest.get("mined"))
        total = sum(int(_number(_mapping(counts).get("kept")) or 0) for counts in mined.values())
        return (
            (
                [("tasks mined from the corpus", total, False)]
                + [
                    (f"  mined: {name}", int(_number(_mapping(counts).get("kept")) or 0), False)
                    for name, counts in sorted(mined.items())
                ]
            )
            if mined
            else []
        )
    sources = _mapping(manifest.get("sources"))
    return [(f"  of them {source}", int(_number(count) or 0), False) for source, count in sorted(sources.items())]


def retrieval_section(run) -> Section:
    retrieval = _mapping(_mapping(run.manifest("respond")).get("retrieval"))
    if not retrieval:
        return Section("Retrieval", [f"Retrieval statistics {NOT_AVAILABLE} (retrieval off, or respond not run)."])
    warnings = retrieval.get("document_warnings") if isinstance(retrieval.get("document_warnings"), list) else []
    rows = [
        [key, _fmt(value) if not isinstance(value, (dict, list)) else _clip(json.dumps(value), 200)]
        for key, value in sorted(retrieval.items())
        if key != "document_warnings"
    ]
    section = Section("Retrieval", [Table(["statistic", "value"], rows)])
    if warnings:
        section.blocks.append(Table(["documents skipped or partly used"], [[str(w)] for w in warnings]))
    return section


def training_section(run) -> Section:
    section = Section("Training")
    manifest = _mapping(run.manifest("train"))
    figures = [
        [key, _fmt(value)]
        for key, value in sorted(manifest.items())
        if key not in _BOOKKEEPING and isinstance(value, (int, float, str)) and not isinstance(value, bool)
    ]
    if figures:
        section.blocks.append(Table(["figure", "value"], figures))
    rows = [
        r
        for r in _read_records(run.stage_dir("train") / "train_log.jsonl")
        if _number(r.get("step")) is not None and _number(r.get("loss")) is not None
    ]
    if rows:
        section.blocks.append(
            f"{len(rows)} logged steps; loss {rows[0]['loss']:.3f} at step {rows[0]['step']} -> "
            f"{rows[-1]['loss']:.3f} at step {rows[-1]['step']}."
        )
        section.blocks.append(Figure("loss.png", "Training loss (learning rate dashed)", loss_plot(rows)))
    else:
        section.blocks.append(f"Training loss curve {NOT_AVAILABLE} (train/train_log.jsonl missing or empty).")
    return section


def suite_section(suite: dict, domain: str) -> Section | None:
    """The domain's suite first: one macro-average of its benchmarks, base vs specialized, then each member."""
    if _number(suite.get("delta")) is None:
        return None
    members = _mapping(suite.get("tasks"))
    missing = _mapping(suite.get("missing"))
    rows = [
        [
            "macro-average",
            str(len(members)),
            _fmt(suite.get("base")),
            _fmt(suite.get("specialized")),
            _fmt(suite.get("delta"), signed=True),
            _interval(suite.get("ci")),
        ],
    ]
    for name, member in members.items():
        member = _mapping(member)
        delta = (_number(member.get("specialized")) or 0.0) - (_number(member.get("base")) or 0.0)
        rows.append(
            [
                name,
                _fmt(member.get("n")),
                _fmt(member.get("base")),
                _fmt(member.get("specialized")),
                _fmt(delta, signed=True),
                "",
            ]
        )
    blocks: list = [
        f"The {domain} suite: each benchmark's headline score, averaged over the benchmarks (each weighs "
        "the same whatever its size); the interval resamples every benchmark's items, paired.",
        Table(["suite", "n", "base", "specialized", "delta", "95% CI"], rows),
    ]
    if missing:
        blocks.append(
            f"Not scored, so not in the average: {', '.join(missing)} (their lines in Base vs specialized say "
            "where to put the data; `selfspec data fetch` gets those with a Hub source)."
        )
    return Section("Domain suite", blocks)


def rounds_section(rows: list) -> Section | None:
    """Each round of ``selfspec run --rounds N`` side by side: what it trained on and how it scored."""
    rows = [_mapping(row) for row in rows if isinstance(row, dict)]
    if len(rows) < 2:
        return None
    names = list(dict.fromkeys(name for row in rows for name in _mapping(row.get("tasks"))))
    table = []
    for row in rows:
        suite, tasks = _mapping(row.get("suite")), _mapping(row.get("tasks"))
        cells = [str(row.get("round")), _fmt(row.get("records"))]
        cells.append(
            f"{_fmt(suite.get('specialized'))} ({_fmt(suite.get('delta'), signed=True)} {_interval(suite.get('ci'))})"
            if suite
            else ""
        )
        for name in names:
            task = _mapping(tasks.get(name))
            f1 = _mapping(task.get("macro_f1"))
            cells.append(
                f"{_fmt(task.get('specialized'))}" + (f" / {_fmt(f1.get('specialized'))}" if f1 else "") if task else ""
            )
        table.append(cells)
    return Section(
        "Rounds",
        [
            "Each round after the first wrote and answered its data with the round before's adapter and tuned "
            "a fresh adapter on every round's records (`selfspec run --rounds N`; round k's run is "
            "`round-<k>/`). Specialized scores; a task with fixed answers also shows its macro-F1.",
            Table(["round", "records trained on", "suite (vs base, 95% CI)", *names], table),
        ],
    )


def comparison_section(title: str, entries: dict, figure_name: str, empty: str) -> Section:
    section = Section(title)
    scored = [
        (name, e)
        for name, e in entries.items()
        if isinstance(e, dict) and all(_number(e.get(k)) is not None for k in ("base", "specialized", "delta"))
    ]
    skipped = [(name, e) for name, e in entries.items() if isinstance(e, dict) and e.get("skipped")]
    if not scored and not skipped:
        section.blocks.append(empty)
        return section
    if scored:
        gains = [name for name, e in scored if isinstance(e.get("ci"), list) and e["ci"][0] > 0]
        losses = [name for name, e in scored if isinstance(e.get("ci"), list) and e["ci"][1] < 0]
        better = sum(e["delta"] > 0 for _, e in scored)
        section.blocks.append(
            f"The specialized model scores higher on {better} of {len(scored)} tasks. The 95% interval of the "
            f"difference lies above zero on {_names(gains)} and below zero on {_names(losses)}."
        )
    if scored:
        rows = []
        for name, e in scored:
            majority = _mapping(e.get("majority"))
            rows.append(
                [
                    name,
                    e.get("domain", ""),
                    e.get("metric", ""),
                    e.get("mode", ""),
                    _fmt(e.get("n")),
                    _fmt(e["base"]),
                    _fmt(e["specialized"]),
                    _fmt(e["delta"], signed=True),
                    _interval(e.get("ci")),
                    f"{_fmt(majority.get('share'))} ({majority.get('answer')})" if majority else "",
                ]
            )
        section.blocks.append(
            Table(
                ["task", "domain", "metric", "mode", "n", "base", "specialized", "delta", "95% CI", "majority answer"],
                rows,
            )
        )
        with_f1 = [(name, _mapping(e.get("macro_f1"))) for name, e in scored if _mapping(e.get("macro_f1"))]
        if with_f1:  # accuracy rewards a move to the most common label; macro-F1 does not
            section.blocks.append(
                Table(
                    ["task", "macro-F1: base", "specialized", "delta", "95% CI", "majority answer"],
                    [
                        [
                            name,
                            _fmt(f.get("base")),
                            _fmt(f.get("specialized")),
                            _fmt(f.get("delta"), signed=True),
                            _interval(f.get("ci")),
                            _fmt(f.get("majority")),
                        ]
                        for name, f in with_f1
                    ],
                )
            )
        section.blocks += _variant_blocks(scored)
        cleaned = [(name, e) for name, e in scored if _mapping(e.get("full"))]
        if cleaned:  # evaluate.drop_contaminated: the scores above leave out items the training data overlaps
            section.blocks.append(_clean_table(cleaned))
        still = [f"{name} ({_fmt(e['contaminated_scored'])})" for name, e in scored if e.get("contaminated_scored")]
        if still:  # drop_contaminated, but every scored item overlaps: the full score is all there is
            section.blocks.append(
                f"Contaminated items still scored: every scored item of {', '.join(still)} overlaps the training "
                "data, so nothing could be dropped; read these scores as measured on training material."
            )
        answered = [(name, _mapping(e.get("answers"))) for name, e in scored if _mapping(e.get("answers"))]
        if answered:
            section.blocks.append(
                Table(
                    ["task", "answers: gold", "base", "specialized"],
                    [
                        [name, _counts(a.get("gold")), _counts(a.get("base")), _counts(a.get("specialized"))]
                        for name, a in answered
                    ],
                )
            )
        section.blocks.append(
            Figure(
                figure_name,
                f"{title}: scores and difference with 95% paired bootstrap interval",
                comparison_plot(scored),
            )
        )
    if skipped:
        section.blocks.append(
            Table(["skipped task", "domain", "why"], [[name, e.get("domain", ""), e["skipped"]] for name, e in skipped])
        )
    return section


def _variant_blocks(scored: list[tuple[str, dict]]) -> list[str | Table]:
    """Each log-likelihood task scored every way of picking its answers, side by side (the headline
    marked), and a warning for each task whose headline answers are mostly one label."""
    rows, warnings = [], []
    for name, entry in scored:
        variants = {how: _mapping(v) for how, v in _mapping(entry.get("variants")).items()}
        if not variants:
            continue
        majority = _mapping(entry.get("majority")).get("share")
        for how, variant in variants.items():
            f1 = _mapping(variant.get("macro_f1"))
            answers = _mapping(variant.get("answers"))
            rows.append(
                [
                    name,
                    f"{how} (headline)" if how == entry.get("headline") else how,
                    _fmt(variant.get("base")),
                    _fmt(variant.get("specialized")),
                    _fmt(variant.get("delta"), signed=True),
                    _interval(variant.get("ci")),
                    _fmt(f1.get("base")),
                    _fmt(f1.get("specialized")),
                    f"{_fmt(f1.get('delta'), signed=True)} {_interval(f1.get('ci'))}",
                    f"{_fmt(majority)} / {_fmt(f1.get('majority'))}",
                    " / ".join(_top_answer(answers.get(model)) for model in ("base", "specialized")),
                ]
            )
        warning = _label_prior_warning(name, entry, variants)
        if warning:
            warnings.append(warning)
    if not rows:
        return []
    table = Table(
        [
            "task",
            "answer picked by",
            "base",
            "specialized",
            "delta",
            "95% CI",
            "macro-F1: base",
            "specialized",
            "delta [95% CI]",
            "majority: accuracy / macro-F1",
            "most frequent answer: base / specialized",
        ],
        rows,
    )
    return [
        "Every log-likelihood task scored each way of picking its answer from the same log-probabilities: "
        "acc by the summed log-probability (favours choices of few tokens), acc_per_token and acc_norm per "
        "token and per byte of the choice (lm-evaluation-harness's acc_norm), acc_calibrated minus each "
        "choice's log-probability after the item's content-free prompt (a model's favourite label taken out).",
        table,
        *warnings,
    ]


def _clean_table(cleaned: list[tuple[str, dict]]) -> Table:
    """Scores without the contaminated items beside those on every item."""
    rows = []
    for name, entry in cleaned:
        full = _mapping(entry["full"])
        rows.append(
            [
                name,
                _fmt(entry.get("contaminated_dropped")),
                _fmt(entry.get("n")),
                _fmt(entry["delta"], signed=True),
                _fmt(full.get("n")),
                _fmt(full.get("base")),
                _fmt(full.get("specialized")),
                _fmt(full.get("delta"), signed=True),
            ]
        )
    headers = ["task", "contaminated items dropped", "clean n", "clean delta", "all items: n", "base", "specialized"]
    return Table([*headers, "delta"], rows)


def _top_answer(counts) -> str:
    """The most frequent answer with its share: ``yes 92%``."""
    counts = {label: _number(count) or 0 for label, count in _mapping(counts).items()}
    total = sum(counts.values())
    if not total:
        return "-"
    label = max(counts, key=lambda key: (counts[key], key))
    return f"{label} {counts[label] / total:.0%}"


def _label_prior_warning(name: str, entry: dict, variants: dict[str, dict]) -> str:
    """The warning for a task whose headline answers are more than LABEL_PRIOR_SHARE one label, naming
    any way of picking under which neither model's answers are."""

    def skewed(answers) -> list[str]:
        found = []
        for model in ("base", "specialized"):
            counts = [_number(count) or 0 for count in _mapping(_mapping(answers).get(model)).values()]
            if sum(counts) and max(counts) / sum(counts) > LABEL_PRIOR_SHARE:
                found.append(f"the {model} model answers {_top_answer(_mapping(answers)[model])} of the items")
        return found

    found = skewed(entry.get("answers"))
    if not found:
        return ""
    alternatives = [how for how, variant in variants.items() if not skewed(variant.get("answers"))]
    better = f" Picked by {' or '.join(alternatives)}, neither model does." if alternatives else ""
    return (
        f"Warning: {name}: {' and '.join(found)}: this score measures a label prior, not reading "
        f"(headline {entry.get('headline', 'acc')}).{better}"
    )


def _interval(ci) -> str:
    """``[low, high]`` with signs, or empty when there is none."""
    return f"[{_fmt(ci[0], True)}, {_fmt(ci[1], True)}]" if isinstance(ci, list) and len(ci) == 2 else ""


def _counts(counts) -> str:
    """``{"positive": 75, "neutral": 182}`` as ``neutral 182, positive 75`` (most frequent first)."""
    ranked = sorted(_mapping(counts).items(), key=lambda item: (-(_number(item[1]) or 0), item[0]))
    return ", ".join(f"{label} {count}" for label, count in ranked)


def _names(tasks: list[str]) -> str:
    return f"{len(tasks)} ({', '.join(tasks)})" if tasks else "none"


def contamination_section(run) -> Section:
    data = _mapping(read_json(run.stage_dir("evaluate") / "contamination.json"))
    if not data:
        return Section("Contamination", [f"Contamination check {NOT_AVAILABLE} (evaluate not run)."])
    if data.get("status") == "unknown":
        return Section("Contamination", [f"Contamination unknown: {data.get('reason')}."])
    overlapping = data.get("overlapping_records") if isinstance(data.get("overlapping_records"), list) else []
    section = Section(
        "Contamination",
        [
            f"{len(overlapping)} of {_fmt(data.get('training_records'))} generated training records share a "
            f"{data.get('ngram')}-word sequence with an evaluation item (lowercased words)."
        ],
    )
    rows = []
    for key, entry in sorted(_mapping(data.get("tasks")).items()):
        entry = _mapping(entry)
        records = entry.get("training_records") if isinstance(entry.get("training_records"), list) else []
        rows.append(
            [
                key,
                _fmt(entry.get("items")),
                _fmt(entry.get("items_touched")),
                f"{(_number(entry.get('share')) or 0) * 100:.1f}%",
                _fmt(entry.get("scored_items_touched")),
                _fmt(entry.get("too_short")),
                ", ".join(map(str, records[:5])) + (" ..." if len(records) > 5 else ""),
            ]
        )
    if rows:
        section.blocks.append(
            Table(
                ["task", "items", "touched", "share", "touched among scored", "too short to check", "training records"],
                rows,
            )
        )
    examples = [
        [r.get("id", ""), ", ".join(map(str, r.get("items", [])[:3])), _clip(r.get("example"), 200)]
        for r in overlapping[:5]
        if isinstance(r, dict)
    ]
    if examples:
        section.blocks.append(Table(["training record", "evaluation items", "shared words"], examples))
    return section


def judge_section(run) -> Section:
    scores = _mapping(run.manifest("respond")).get("judge_scores")
    values = [float(v) for v in scores if _number(v) is not None] if isinstance(scores, list) else []
    if not values:
        return Section("Judge scores", [f"Judge scores {NOT_AVAILABLE} (respond.judge off)."])
    mean = sum(values) / len(values)
    return Section(
        "Judge scores",
        [
            f"{len(values)} responses judged; mean score {mean:.3f}.",
            Figure("judge_scores.png", "Judge scores of generated responses", histogram_plot(values, "judge score")),
        ],
    )


def samples_section(run, count: int, seed: int) -> Section:
    records = _read_records(run.stage_dir("respond") / "data.jsonl")
    if not records:
        return Section(
            "Sample generated records", [f"Generated records {NOT_AVAILABLE} (respond/data.jsonl missing or empty)."]
        )
    chosen = sorted(random.Random(seed).sample(range(len(records)), min(count, len(records))))
    rows = [
        [
            records[i].get("id", i),
            _clip(records[i].get("instruction")),
            _clip(records[i].get("input")),
            _clip(records[i].get("output")),
            _grounding(records[i].get("retrieved")),
        ]
        for i in chosen
    ]
    return Section(
        "Sample generated records",
        [
            f"{len(rows)} of {len(records)} records, chosen at random (seed {seed}).",
            Table(["id", "instruction", "input", "output", "grounded in"], rows),
        ],
    )


def _grounding(retrieved) -> str:
    """Where a record's passages came from: the page or section of a document, else the passage id."""
    hits = [hit for hit in retrieved if isinstance(hit, dict)] if isinstance(retrieved, list) else []
    return "\n".join(str(hit.get("source") or hit.get("doc_id", "")) for hit in hits) or "-"


def build_sections(run, seeds: int | None, model: str, samples: int = 5, seed: int = 0) -> list[Section]:
    results = _mapping(read_json(run.stage_dir("evaluate") / "eval.json"))
    own = {k: v for k, v in results.items() if k != "cross_domain"}
    timing = estimate_section(run)
    suite = suite_section(_mapping(read_json(run.stage_dir("evaluate") / SUITE_FILE)), run.domain)
    rounds = rounds_section(read_json(run.path / SUMMARY_FILE) or [])
    return [
        run_section(run, model),
        *([suite] if suite else []),
        *([rounds] if rounds else []),
        *([timing] if timing else []),
        funnel_section(run, seeds),
        retrieval_section(run),
        training_section(run),
        comparison_section(
            "Base vs specialized",
            own,
            "evaluation.png",
            f"Evaluation {NOT_AVAILABLE} (evaluate not run, or the domain has no evaluation tasks).",
        ),
        comparison_section(
            "Cross-domain cost",
            _mapping(results.get("cross_domain")),
            "cross_domain.png",
            f"Cross-domain results {NOT_AVAILABLE} (no other domain installed, or evaluate.cross_domain off).",
        ),
        contamination_section(run),
        judge_section(run),
        samples_section(run, samples, seed),
    ]


# -------------------------------------------------------------------------------------- rendering

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #2c7fb8; padding-bottom: .3em; }
h2 { margin-top: 2em; color: #2c7fb8; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; white-space: pre-wrap; }
td:last-child { overflow-wrap: anywhere; }
th { background: #f3f6fa; }
figure { margin: 1em 0; } figcaption { color: #666; font-size: 13px; }
img { max-width: 100%; }
"""


def render_html(title: str, sections: list[Section]) -> str:
    parts = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Table):
                head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
                body = "".join(
                    "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in block.rows
                )
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif isinstance(block, Figure):
                data = base64.b64encode(block.png).decode("ascii")
                parts.append(
                    f'<figure><img alt="{html.escape(block.caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(block.caption)}</figcaption></figure>"
                )
            else:
                parts.append(f"<p>{html.escape(block)}</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _md_cell(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def render_markdown(title: str, sections: list[Section]) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines.append("| " + " | ".join(map(_md_cell, block.headers)) + " |")
                lines.append("|" + "---|" * len(block.headers))
                lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows]
            elif isinstance(block, Figure):
                lines.append(f"![{block.caption}]({block.name})")
            else:
                lines.append(block)
            lines.append("")
    return "\n".join(lines)


def write_report(folder: Path, title: str, sections: list[Section]) -> int:
    """Write report.html, report.md and the PNGs beside it; the number of figures."""
    figures = [block for section in sections for block in section.blocks if isinstance(block, Figure)]
    for figure in figures:
        (folder / figure.name).write_bytes(figure.png)
    atomic_write_text(folder / "report.md", render_markdown(title, sections))
    atomic_write_text(folder / "report.html", render_html(title, sections))
    return len(figures)


def run_stage(ctx) -> dict:
    sections = build_sections(
        ctx.run, len(ctx.seeds) or None, ctx.model.name, ctx.settings.evaluate.report_samples, ctx.settings.seed
    )
    figures = write_report(ctx.work, f"selfspec report: {ctx.domain.name}", sections)
    ctx.log(f"[report] {ctx.run.stage_dir('report') / 'report.html'}")
    return {"sections": len(sections), "figures": figures}
