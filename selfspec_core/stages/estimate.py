"""Minutes each stage of a run will take on this machine, said before the stages run.

A stage's time is the model tokens its work takes, by kind of work, each at this machine's rate for
that kind, plus the seconds around the model (loading it, mining, retrieval, writing files). The
tokens follow from the settings (records asked for, demonstrations and passages per prompt, epochs,
lengths) and, for evaluation, from the benchmark items themselves. The rate is this machine's measured
matrix-product rate (:func:`selfspec_core.runtime.throughput.matmul_gflops`) over the model's two
floating-point operations per parameter per token (three passes' worth for a training token: the
estimate's unit, not the report's training ceiling), times the share of that ceiling each kind of work
reaches. What the settings cannot say (tokens per record, the share of
prompts kept, those shares of the ceiling) is measured on real runs: :data:`CALIBRATION`.

``selfspec run`` prints the estimate of the stages it will run and keeps it in the run folder's
``estimate.json``; the report sets it beside the minutes each stage took.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from selfspec_core.data import datasources
from selfspec_core.data.tasks import EvalItem
from selfspec_core.errors import SelfspecError, one_line
from selfspec_core.models.loading import ModelRef, resolve_dtype
from selfspec_core.models.prompting import PromptFormat
from selfspec_core.run.rundir import STAGES, atomic_write_json, read_json
from selfspec_core.runtime import throughput
from selfspec_core.stages.evaluate import (
    base_scores_cached,
    item_cap,
    load_task,
    planned_prompts,
    planned_tasks,
    resolve_data_dir,
)

if TYPE_CHECKING:
    from selfspec_core.config import Settings
    from selfspec_core.run.pipeline import Pipeline

ESTIMATE_FILE = "estimate.json"

# Kinds of model work, each with its own share of the ceiling.
PROMPT = "prompt"  # prompts read in one pass: generation prompts, benchmark items with their choices
DECODE = "decode"  # tokens generated one at a time
OPTIONS = "options"  # respond's prompts, each option of several tokens scored on the prompt's cached keys
TRAIN = "train"  # tokens trained on
# Forward-pass equivalents per token, the unit each kind's efficiency is calibrated in. Training's is
# a forward and a whole backward pass (three): a unit of time, not the least work a token needs, which
# the train stage's ceiling counts (``throughput.training_passes``: about 1.7 on these runs).
PASSES = {TRAIN: 3.0}


@dataclass(frozen=True)
class Calibration:
    """The figures the settings cannot give, each measured on a real run.

    Every figure comes from the biomed quick run of 2026-12-04 (seed 42, the embedded SmolLM2-135M in
    bfloat16, 300 written and 300 mined records, 2 epochs, 300 PubMedQA and 150 FPB items) on a 2-core
    AMD EPYC with AVX512-BF16 and no AMX, with nothing else running. The efficiencies are shares of the
    ceiling at 431 GFLOP/s, the bfloat16 matrix-product rate that machine measures idle (the best of
    three ``throughput.measure_matmul_gflops`` calls: 424, 431, 407), which ``throughput.matmul_gflops``
    keeps as its best; the run itself recorded 206, timed inside the run.
    ``python bench/estimate.py --gflops 431 RUN`` prints each figure for another finished run folder:
    to recalibrate, copy its figures here.
    """

    # generate: prompts are written until num_instructions are kept
    generate_kept_per_prompt: float = 0.9375  # 300 instructions kept of 320 prompts
    generate_prompt_tokens: float = 245.0  # per prompt: the examples it shows and the template
    generate_new_tokens: float = 34.6  # per prompt, unless generate.max_new_tokens cuts it shorter
    # respond: one prompt per written instruction (mined tasks come with their answers)
    respond_demo_tokens: float = 114.0  # per demonstration: a seed, 455 characters on average
    respond_query_tokens: float = 99.0  # per prompt besides demonstrations and passages: the task, its options
    respond_option_share: float = 0.943  # instructions answered by scoring their options (283 of 300)
    respond_answer_tokens: float = 31.8  # per generated answer, unless respond.max_new_tokens cuts it shorter
    # train: the records respond keeps, each epoch
    train_written_kept: float = 0.897  # written instructions kept as training records (269 of 300)
    train_mined_kept: float = 0.99  # mined tasks kept (297 of the 300 asked for)
    # per record, unless train.max_length cuts it shorter: 185 in the biomed quick run of the 100-word
    # mined inputs (abdf9c5; 227.8 with the 200-word ones); finance's records are shorter (124.6)
    train_example_tokens: float = 185.0
    # evaluate: base and specialized model score every item
    chars_per_token: float = 4.0  # of benchmark text (the usual figure for English)
    evaluate_item_tokens: float = 53.6  # per item and model besides its text: template, choices, calibration
    default_items: int = 1000  # items of a task still to fetch from the Hub when evaluate.max_items is 0
    default_item_chars: float = 1000.0  # characters of such an item's text
    # tokens per second over the ceiling (matrix-product rate / 2 FLOPs per parameter / PASSES)
    efficiency: dict[str, float] = field(
        default_factory=lambda: {PROMPT: 0.617, DECODE: 0.0341, OPTIONS: 0.366, TRAIN: 0.513}
    )
    # seconds of each stage outside the model: loading it, mining, retrieval, checks, writing files
    other_seconds: dict[str, float] = field(
        default_factory=lambda: {"generate": 6.9, "respond": 5.9, "train": 1.7, "evaluate": 4.9, "report": 1.0}
    )


CALIBRATION = Calibration()


@dataclass(frozen=True)
class Machine:
    """Where the estimate holds: the run's dtype and device, its measured matrix-product rate, threads."""

    dtype: str
    device: str
    gflops: float
    threads: int

    @classmethod
    def here(cls, dtype: str, gflops: float | None = None) -> Machine:
        """This machine, its rate measured now unless ``gflops`` gives it."""
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        measured = gflops if gflops is not None else throughput.matmul_gflops(dtype, device)
        return cls(dtype, device, measured, torch.get_num_threads())

    def tokens_per_second(self, kind: str, parameters: int, calibration: Calibration) -> float:
        ceiling = self.gflops * 1e9 / (2 * parameters * PASSES.get(kind, 1.0))
        return ceiling * calibration.efficiency[kind]

    def describe(self) -> str:
        where = f"{self.threads} threads" if self.device == "cpu" else self.device
        return f"{self.dtype} matmul {self.gflops:,.0f} GFLOP/s, {where}"


@dataclass(frozen=True)
class StageEstimate:
    minutes: float
    tokens: dict[str, float]  # by kind of work


@dataclass(frozen=True)
class Estimate:
    """Each stage's minutes, and what they were worked out from."""

    machine: Machine
    model: str
    parameters: int
    stages: dict[str, StageEstimate]
    # minutes the evaluate stage adds if the benchmarks still to fetch from the Hub can be fetched when
    # it runs (with no network it skips them): not in ``stages``, said beside them
    to_fetch: float = 0.0

    @property
    def minutes(self) -> dict[str, float]:
        return {stage: estimate.minutes for stage, estimate in self.stages.items()}

    def line(self) -> str:
        """``[estimate] generate 3.1 min, respond 3.6, ...: about 14.6 minutes on this machine (...)``"""
        parts = [
            f"{stage} {minutes:,.1f}{' min' if number == 0 else ''}"
            for number, (stage, minutes) in enumerate(self.minutes.items())
        ]
        total = sum(self.minutes.values())
        fetched = (
            f"; evaluate {self.to_fetch:+,.1f} min if the benchmarks still to fetch from the Hub are fetched"
            if self.to_fetch
            else ""
        )
        return (
            f"[estimate] {', '.join(parts)}: about {total:,.1f} minutes on this machine ({self.machine.describe()})"
            f"{fetched}"
        )

    def to_dict(self) -> dict:
        return {
            "made_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "model": self.model,
            "parameters": self.parameters,
            "dtype": self.machine.dtype,
            "device": self.machine.device,
            "matmul_gflops": round(self.machine.gflops, 1),
            "threads": self.machine.threads,
            "to_fetch_minutes": round(self.to_fetch, 2),
            "stages": {
                stage: {
                    "minutes": round(estimate.minutes, 2),
                    "tokens": {kind: round(count) for kind, count in estimate.tokens.items()},
                }
                for stage, estimate in self.stages.items()
            },
        }


def estimate(
    settings: Settings,
    domain: str,
    model_ref: ModelRef,
    stages: Iterable[str] = STAGES,
    gflops: float | None = None,
    calibration: Calibration = CALIBRATION,
) -> Estimate:
    """The minutes of each of ``stages`` on this machine (or one that multiplies matrices at ``gflops``),
    with nothing run: the model's size is read from its safetensors headers, not its weights."""
    if settings.backend != "hf" or settings.executor != "local":
        raise SelfspecError(
            f"the model runs on backend {settings.backend!r} with executor {settings.executor!r}, "
            "whose speed this machine's matrix-product rate does not tell"
        )
    parameters = model_parameters(model_ref)
    machine = Machine.here(resolve_dtype(settings.dtype), gflops)

    def seconds(tokens: dict[str, float]) -> float:
        return sum(count / machine.tokens_per_second(kind, parameters, calibration) for kind, count in tokens.items())

    # the evaluation's tasks, read once: those on this machine make the stage's minutes, those still to
    # fetch from the Hub the minutes said beside them
    stages = list(stages)
    loads = evaluation_load(settings, domain, calibration, model_ref) if "evaluate" in stages else []
    costs = {}
    for stage in stages:
        tokens = (
            _evaluate_tokens([load for load in loads if not load.to_fetch], calibration)
            if stage == "evaluate"
            else _WORK[stage](settings, domain, calibration)
        )
        costs[stage] = StageEstimate((calibration.other_seconds[stage] + seconds(tokens)) / 60, tokens)
    to_fetch = seconds(_evaluate_tokens([load for load in loads if load.to_fetch], calibration)) / 60
    return Estimate(machine, model_ref.name, parameters, costs, to_fetch)


def estimate_minutes(
    settings: Settings,
    domain: str,
    model_ref: ModelRef,
    stages: Iterable[str] = STAGES,
    gflops: float | None = None,
) -> dict[str, float]:
    """Minutes per stage, as :func:`estimate` works them out (for scripts: nothing is run or written)."""
    return estimate(settings, domain, model_ref, stages, gflops).minutes


def announce(pipeline: Pipeline, stages: list[str]) -> None:
    """Print the estimate of ``stages`` and keep it in the run folder's estimate.json, beside the
    estimates of stages an earlier command ran (a resume does not estimate those again).

    An estimate that cannot be made is one line, not an error: the run goes on without it.
    """
    model = pipeline.model  # a bad --model stops the run here as it would in its first stage
    try:
        made = estimate(pipeline.settings, pipeline.domain.name, model, stages)
    except SelfspecError as exc:
        pipeline.log(f"[estimate] none: {one_line(exc)}")
        return
    pipeline.log(made.line())
    earlier = read_estimate(pipeline.run.path).get("stages")
    earlier = earlier if isinstance(earlier, dict) else {}
    kept = made.to_dict()
    kept["stages"] = {**{stage: e for stage, e in earlier.items() if stage not in stages}, **kept["stages"]}
    atomic_write_json(pipeline.run.path / ESTIMATE_FILE, kept)


def read_estimate(run_path: Path) -> dict:
    """The run folder's estimate.json, or ``{}`` when there is none (a run from before estimates)."""
    made = read_json(Path(run_path) / ESTIMATE_FILE)
    return made if isinstance(made, dict) else {}


def model_parameters(model_ref: ModelRef) -> int:
    """The model's parameter count, summed over the tensor shapes in its safetensors headers."""
    from safetensors import safe_open

    folder = Path(model_ref.path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise SelfspecError(f"cannot count the parameters of {model_ref.path}: not a local folder of safetensors")
    total = 0
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as weights:
                names = weights.keys()  # a safe_open handle is not iterable itself
                total += sum(math.prod(weights.get_slice(name).get_shape()) for name in names)
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise SelfspecError(f"{path}: unreadable safetensors header ({type(exc).__name__})") from None
    return total


# ------------------------------------------------------------------------------- work per stage


def _generate_tokens(settings: Settings, domain: str, calibration: Calibration) -> dict[str, float]:
    generate = settings.generate
    prompts = generate.num_instructions / calibration.generate_kept_per_prompt
    return {
        PROMPT: prompts * calibration.generate_prompt_tokens,
        DECODE: prompts * min(calibration.generate_new_tokens, generate.max_new_tokens),
    }


def _respond_tokens(settings: Settings, domain: str, calibration: Calibration) -> dict[str, float]:
    respond = settings.respond
    prompt = (
        calibration.respond_query_tokens
        + respond.num_demos * calibration.respond_demo_tokens
        + (respond.top_k * respond.passage_tokens if respond.retrieval else 0)
    )
    prompts = settings.generate.num_instructions * respond.consistency_samples
    scored = prompts * (calibration.respond_option_share if respond.option_answers else 0.0)
    written = prompts - scored
    return {
        OPTIONS: scored * prompt,
        PROMPT: written * prompt,
        DECODE: written * min(calibration.respond_answer_tokens, respond.max_new_tokens),
    }


def _train_tokens(settings: Settings, domain: str, calibration: Calibration) -> dict[str, float]:
    train, generate = settings.train, settings.generate
    records = (
        generate.num_instructions * calibration.train_written_kept + generate.num_mined * calibration.train_mined_kept
    )
    seen = records * train.epochs
    if train.max_steps:
        seen = min(seen, train.max_steps * train.batch_size * train.grad_accum)
    # The backward pass stops at the lowest adapted block (train.lora_top_share): its share of the
    # backward's two passes goes. Timed, the top 20 of 30 blocks took 0.79 of every block's time, this
    # 0.78 (attention and the element-wise work below go too, which FLOPs alone would not say).
    work = (1 + 2 * train.lora_top_share) / PASSES[TRAIN]
    return {TRAIN: seen * min(calibration.train_example_tokens, train.max_length) * work}


def _evaluate_tokens(loads: Iterable[TaskLoad], calibration: Calibration) -> dict[str, float]:
    """Base and specialized model on every item of ``loads``; the specialized model alone where an
    earlier run cached the base model's scores."""
    tokens = {PROMPT: 0.0, DECODE: 0.0}
    for task in loads:
        models = 1 if task.base_cached else 2
        tokens[PROMPT] += (
            models * task.items * (calibration.evaluate_item_tokens + task.chars / calibration.chars_per_token)
        )
        tokens[DECODE] += models * task.items * task.new_tokens
    return tokens


def _report_tokens(settings: Settings, domain: str, calibration: Calibration) -> dict[str, float]:
    return {}


# The work of each stage but evaluate, whose tasks :func:`estimate` reads once for two figures.
_WORK: dict[str, Callable[[Settings, str, Calibration], dict[str, float]]] = {
    "generate": _generate_tokens,
    "respond": _respond_tokens,
    "train": _train_tokens,
    "report": _report_tokens,
}


@dataclass(frozen=True)
class TaskLoad:
    """What one evaluation task asks of each model: its items, their mean characters (with any
    demonstrations), and the tokens it lets each answer generate (0: scored by log-likelihood)."""

    items: int
    chars: float
    new_tokens: int
    to_fetch: bool = False  # its items come from the Hub when the stage runs, if the Hub answers then
    base_cached: bool = False  # an earlier run cached the base model's scores: only the specialized model runs


def evaluation_load(
    settings: Settings, domain: str, calibration: Calibration = CALIBRATION, model_ref: ModelRef | None = None
) -> list[TaskLoad]:
    """The tasks the evaluate stage will score, from their real items where they are on this machine
    (data directory, shipped, Hub cache); a task still to fetch counts ``calibration``'s default items,
    one that is missing nothing (the stage skips it). Given the model, a task whose base-model scores
    an earlier run cached is marked so (the items are then posed as the stage will pose them)."""
    caching = model_ref is not None and settings.evaluate.cache_base_scores
    prompts: PromptFormat | None = None  # made on the first task whose items are here (it reads the tokenizer)
    root = resolve_data_dir(settings)
    loads = []
    for task, cap in planned_tasks(settings, domain):
        new_tokens = 0 if task.mode == "loglikelihood" else task.max_new_tokens or settings.evaluate.max_new_tokens
        where, _ = datasources.status(task.source, root)
        if where == "missing":  # the stage skips it
            continue
        if where == "to fetch":  # its items come from the Hub only when the stage runs
            items = item_cap(task, cap, settings.evaluate) or calibration.default_items
            loads.append(TaskLoad(items, calibration.default_item_chars, new_tokens, to_fetch=True))
            continue
        split = load_task(task, cap, settings, log=lambda line: None)
        if isinstance(split, str):  # unreadable after all, or nothing left to score: the stage skips it too
            continue
        shown = sum(_chars(demo) + len(demo.answer) for demo in split.demos)
        mean = sum(map(_chars, split.scored)) / len(split.scored)
        if caching and prompts is None:
            prompts = planned_prompts(settings, model_ref, domain)
        cached = prompts is not None and base_scores_cached(settings, model_ref, split, prompts)
        loads.append(TaskLoad(len(split.scored), shown + mean, new_tokens, base_cached=cached))
    return loads


def _chars(item: EvalItem) -> int:
    return len(item.instruction) + len(item.input)
