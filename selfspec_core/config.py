"""Settings: defaults, the ``quick`` and ``paper`` profiles, YAML/TOML files, validation.

Every knob of every stage lives here, grouped by stage. A config file uses the same sections::

    seed = 7
    [generate]
    num_instructions = 500
    [train]
    epochs = 3

Precedence: defaults < profile < config file < command-line flags.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args, get_type_hints

import yaml

from selfspec_core.data.tasks import CHOICE_SCORES
from selfspec_core.errors import LIBRARY_MESSAGE_LIMIT, SelfspecError, one_line

if TYPE_CHECKING:
    from selfspec_core.records import Domain


@dataclass
class GenerateSettings:
    """Instruction generation (stage 1)."""

    num_instructions: int = 300
    num_examples: int = 3
    human_example_share: float = 0.67
    # Share of prompts that keep a seed's instruction and write only a new input, for the domain's
    # ``input_task_types`` (0 = whole new tasks only, as Self-Instruct). A 135M model writes usable
    # inputs; most of its whole new tasks are noise.
    input_share: float = 0.75
    input_examples: int = 6  # inputs shown per such prompt (they are short)
    temperature: float = 1.0
    top_p: float = 0.98
    max_new_tokens: int = 160
    batch_size: int = 16
    max_rounds: int = 40
    rouge_threshold: float = 0.7
    min_words: int = 3
    max_words: int = 150
    # Records mined from the domain corpus (answers decided by the text: selfspec_core.stages.mine) beside the
    # ``num_instructions`` the model writes, shared over the miners by their weights. Mined labels are
    # right 95-100% of the time (bench/miners.py) against ~48% for calibrated self-labels on FPB dev, and
    # their number decides what the model learns: FPB dev macro-F1 0.27 with 75 mined sentiment records,
    # 0.50 with 120, 0.65 with 240 (quick runs, README). Mining costs seconds; training time grows.
    num_mined: int = 300
    miners: str = ""  # comma-separated miner names; empty = every miner measured precise enough


@dataclass
class RespondSettings:
    """Response generation (stage 2) and its data-quality checks; every check can be switched off."""

    retrieval: bool = True  # ground answers in BM25 passages of the domain corpus (--retrieval off)
    top_k: int = 3  # passages per instruction
    passage_tokens: int = 128  # each passage cut to this many model tokens
    num_demos: int = 5  # seed demonstrations per prompt, same task type first
    max_new_tokens: int = 160
    batch_size: int = 8
    temperature: float = 0.0  # 0 = greedy
    min_relevance: float = 0.0  # drop instructions whose best BM25 score is lower (needs a corpus; 0 = off)
    response_checks: str = "degenerate,echo,refusal,truncated,copy,language,code"  # "" = none
    option_answers: bool = True  # tasks with stated options: pick the option by log-likelihood
    calibrate: bool = True  # ... with the label prior of the task's items taken out
    # "contextual": minus each option's mean log-likelihood; "batch": probabilities over the options
    # divided by each option's mean probability (Zhou et al. 2023). bench/label_signal.py on FPB dev
    # (120 items): contextual macro-F1 0.448, batch 0.432 (AUC 0.637 both).
    calibration: str = "contextual"
    rationale: bool = False  # follow the chosen option with a short generated reason
    # Most one label may have of an option group: 1 = no cap; 1/n or less = every label at the
    # rarest one's count. Balanced self-labelled data is what lifts a small model off its favourite label.
    max_label_share: float = 0.34
    consistency_samples: int = 1  # answers per instruction for self-consistency (1 = off)
    consistency_temperature: float = 0.7
    consistency_min_agreement: float = 0.5  # option tasks: least share of votes for the majority
    consistency_min_rouge: float = 0.3  # free text: least mean ROUGE-L of the kept answer to the others
    judge: bool = False  # the model rates each pair (log P(yes) - log P(no)); keep the best
    judge_keep_fraction: float = 0.8


@dataclass
class TrainSettings:
    """(Q)LoRA tuning (stage 3)."""

    lora_r: int = 8
    lora_alpha: int = 16
    # 0: PEFT then skips the dropout module, which on a CPU cost 30% of each training step (a copy of
    # every adapted layer's input); a one- or two-epoch run on a few hundred records does not overfit.
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"
    # The share of the transformer blocks, counted from the top, that get adapters (1.0: all). The
    # backward pass stops at the lowest adapted block: 0.67 trained 1.4x as many tokens a second in
    # biomed's quick run and 1.2x in finance's (shorter records) on a 2-core CPU. What it costs in
    # quality depends on the domain (biomed's profile uses it; finance lost macro-F1 with it).
    lora_top_share: float = 1.0
    learning_rate: float = 3e-4
    epochs: float = 2.0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 384
    scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    quant: str = "auto"
    gradient_checkpointing: bool = False
    # Padding-free batches: each batch's examples are concatenated into one row whose position ids
    # restart per example, so examples never attend to each other. Off: right-padded batches, grouped
    # by length when ``group_by_length`` is on.
    packing: bool = True
    group_by_length: bool = True
    save_steps: int = 50
    max_steps: int = 0  # stop after this many optimizer steps; 0 means train for ``epochs``
    # The form records are put to the model in (selfspec_core.models.prompting): "chat" = the base
    # model's chat template, what chat clients, llama.cpp and Ollama send; "alpaca" = the domain's train
    # template (### Instruction: ... ### Response:); "auto" = chat when the tokenizer has a chat template.
    # The adapter records its format; evaluation and serving prompt it the same way.
    prompt_format: str = "auto"


@dataclass
class EvaluateSettings:
    """Evaluation (stage 4) and the report."""

    max_items: int = 0
    shots: int = 0
    # How every log-likelihood task's table leads (one of CHOICE_SCORES: acc, acc_per_token, acc_norm,
    # acc_calibrated); "task": each task's own ``headline``. Every way is reported either way.
    headline: str = "task"
    batch_size: int = 8
    max_new_tokens: int = 32
    bootstrap_samples: int = 1000
    ngram: int = 13
    cross_domain: bool = True
    # Items per other domain's task (what specializing costs there); None = as ``max_items``. The
    # quick profile scores fewer there: its own benchmark is the point, the cost needs only its sign.
    cross_domain_max_items: int | None = None
    # Comma-separated scoring modes for other domains' tasks; empty means as ``modes``.
    cross_domain_modes: str = ""
    # Items per generation task, under the caps above; 0 = no cap of its own. An item decoded costs
    # many times one scored by log-likelihood: the quick profile scores fewer of them.
    generate_max_items: int = 0
    # Comma-separated task names to score; empty means every task except development splits.
    tasks: str = ""
    # A folder of task YAML files (selfspec_core.data.catalog) scored beside the plugins' tasks: --tasks DIR.
    task_dir: str | None = None
    # Comma-separated scoring modes to run ("loglikelihood", "generate"); empty means both. On a CPU
    # a generation task costs many times a log-likelihood one (every item decodes tokens).
    modes: str = ""
    # The adapter to evaluate; None means the run's own ``train/adapter``.
    adapter: str | None = None
    # Reuse the base model's scores from any earlier run that posed the same items the same way
    # (kept under $SELFSPEC_CACHE/scores, keyed by model, dtype, prompts, items and scoring settings).
    cache_base_scores: bool = True
    # Score each task without the items a generated training record shares an ``ngram``-gram with
    # (the contamination check's finding); that clean score leads, the one on every item is kept beside.
    drop_contaminated: bool = False
    # Generated records shown in the report.
    report_samples: int = 5
    # The form items are posed in, to base and specialized alike: "adapter" = the form the adapter was
    # trained in (its selfspec_training.json; Alpaca for adapters from before it was recorded); "chat" or
    # "alpaca" to score a task in another form (what a chat client gets, say).
    prompt_format: str = "adapter"


@dataclass
class OpenAISettings:
    """An OpenAI-compatible server for ``backend = "openai"`` (unset values come from OPENAI_BASE_URL,
    SELFSPEC_OPENAI_MODEL, or the one model the server lists; the key from the variable ``api_key_env``)."""

    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    max_retries: int = 5
    timeout: float = 300.0


@dataclass
class RaySettings:
    """``executor = "ray"``: generation as Ray Data jobs, one model per actor (cluster from RAY_ADDRESS)."""

    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0


@dataclass
class Settings:
    """Everything a run needs; ``model=None`` means the embedded SmolLM2-135M-Instruct."""

    model: str | None = None
    seed: int = 42
    # Weights and activations: "auto" is bfloat16 where the hardware computes it natively (CUDA with
    # bf16, CPUs with AVX512-BF16 or AMX) and float32 elsewhere, where bfloat16 is emulated and slow.
    dtype: str = "auto"
    backend: str = "hf"
    executor: str = "local"
    data_dir: str | None = None
    corpus: str | None = None
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    respond: RespondSettings = field(default_factory=RespondSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    openai: OpenAISettings = field(default_factory=OpenAISettings)
    ray: RaySettings = field(default_factory=RaySettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """Hash of the settings a stage depends on (the top-level keys plus ``sections``)."""
        data = self.to_dict()
        selected = {k: v for k, v in data.items() if not isinstance(v, dict)}
        selected.update({name: data[name] for name in sections})
        if self.backend == "openai":  # another served model makes earlier results stale
            selected["openai"] = data["openai"]
        return hashlib.sha256(json.dumps(selected, sort_keys=True).encode()).hexdigest()[:16]


PROFILES: dict[str, dict[str, Any]] = {
    # The CPU demo: about 15 minutes on 2 cores with the embedded model, also without AMX. Mostly new
    # inputs under seed instructions (what a 135M model writes well), 150 of them beside the mined tasks
    # (whose labels are right 95-100% of the time and which teach most), one epoch, and the log-likelihood
    # benchmarks on 300 items each (150 for other domains' tasks), generation benchmarks on 50.
    "quick": {
        "generate": {"input_share": 0.9, "num_instructions": 150},
        # Shorter answer prompts: option scoring of ~800-token prompts was the slowest stage.
        "respond": {"top_k": 2, "num_demos": 3},
        # One pass in batches of 4: as many optimizer steps as two passes in batches of 8, on half the
        # tokens. On PubMedQA dev (seed 42, same data) batches of 8 for one pass lost the macro-F1 gain
        # (0.289 -> 0.282); batches of 4 kept it (0.365 [+0.026, +0.129]).
        "train": {"epochs": 1.0, "batch_size": 4},
        # The domain's generation benchmarks (numeric QA over reports, say) on 50 items, each decoding its
        # answer; other domains' only by log-likelihood (the cost there needs only its sign).
        "evaluate": {
            "max_items": 300,
            "cross_domain_max_items": 150,
            "generate_max_items": 50,
            "cross_domain_modes": "loglikelihood",
        },
    },
    "paper": {
        "generate": {"num_instructions": 5000, "num_mined": 5000, "max_rounds": 1000, "batch_size": 32},
        "respond": {"batch_size": 16},
        "train": {"epochs": 3.0, "batch_size": 8, "grad_accum": 4, "max_length": 1024},
    },
    # A few records end to end in well under a minute of model time; for smoke tests.
    "tiny": {
        "generate": {"num_instructions": 6, "num_mined": 4, "max_rounds": 3, "batch_size": 4, "max_new_tokens": 48},
        "respond": {"batch_size": 4, "max_new_tokens": 32, "num_demos": 2},
        "train": {"epochs": 1.0, "batch_size": 2, "max_length": 128, "save_steps": 2},
        "evaluate": {"max_items": 8, "bootstrap_samples": 200, "max_new_tokens": 8},
    },
}


def load_settings(
    profile: str = "quick",
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    domain: Domain | None = None,
) -> Settings:
    """Build settings from a profile, the domain's choices for it (``Domain.profile_settings``), an
    optional YAML/TOML file, then flag overrides."""
    if profile not in PROFILES:
        raise SelfspecError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    settings = Settings()
    apply(settings, PROFILES[profile], source=f"profile {profile}")
    if domain is not None and profile in domain.profile_settings:
        apply(settings, domain.profile_settings[profile], source=f"domain {domain.name}'s {profile} profile")
    if config_file is not None:
        apply(settings, read_config_file(Path(config_file)), source=str(config_file))
    if overrides:
        apply(settings, overrides, source="command line")
    return settings


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SelfspecError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise SelfspecError(f"{path}: config must be .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise SelfspecError(
            f"{path}: not valid {path.suffix[1:].upper()}: {one_line(exc, LIBRARY_MESSAGE_LIMIT)}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise SelfspecError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not isinstance(data, dict):
        raise SelfspecError(f"{path}: expected a mapping of settings at the top level")
    return data


_RANGES = {
    "batch_size": (1, 1e6),
    "max_new_tokens": (1, 1e6),
    "temperature": (0.0, 5.0),
    "top_p": (0.0, 1.0),
    "rouge_threshold": (0.0, 1.0),
    "human_example_share": (0.0, 1.0),
    "input_share": (0.0, 1.0),
    "max_label_share": (0.0, 1.0),
    "lora_dropout": (0.0, 1.0),
    "lora_top_share": (0.01, 1.0),
    "judge_keep_fraction": (0.0, 1.0),
    "consistency_min_agreement": (0.0, 1.0),
    "warmup_ratio": (0.0, 1.0),
    "learning_rate": (0.0, 1.0),
    "min_relevance": (0.0, 1e9),
    "lora_r": (1, 1024),
    "lora_alpha": (1, 1e6),
    "grad_accum": (1, 1e6),
    "max_length": (16, 1e6),
    "save_steps": (1, 1e9),
    "num_instructions": (0, 10_000_000),
    "num_mined": (0, 10_000_000),
    "max_rounds": (1, 1_000_000),
    "num_examples": (0, 64),
    "input_examples": (1, 64),
    "concurrency": (1, 1024),
    "timeout": (0.001, 86400.0),
    "actors": (1, 100_000),
    "ngram": (1, 100),
    "bootstrap_samples": (1, 1_000_000),
    "shots": (0, 64),
    "consistency_samples": (1, 64),
    "consistency_temperature": (0.0, 5.0),
    "consistency_min_rouge": (0.0, 1.0),
}
_CHOICES = {
    "quant": ("auto", "none", "nf4"),
    "scheduler": ("cosine", "linear", "constant"),
    "backend": ("hf", "vllm", "openai"),
    "executor": ("local", "ray"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "calibration": ("contextual", "batch"),
    "headline": ("task", *CHOICE_SCORES),
    "train.prompt_format": ("auto", "chat", "alpaca"),
    "evaluate.prompt_format": ("adapter", "chat", "alpaca"),
}
_LIST_CHOICES = {"modes": ("loglikelihood", "generate")}  # comma-separated
# Settings a release renamed, with what to write instead (a closest-spelling hint would mislead).
_REPLACED = {
    "generate.mined_share": "generate.num_mined (a count of mined records added beside "
    "num_instructions, no longer a share of them)",
    "generate.min_relevance": "respond.min_relevance (the respond stage drops instructions its retrieval "
    "finds no relevant passage for; the generate setting never did anything)",
    "evaluate.length_normalize": 'evaluate.headline = "acc_per_token" (every log-likelihood task now '
    "reports the summed, per-token, per-byte and calibrated scores; the headline picks the one that leads)",
}


def apply(target: Any, values: dict[str, Any], source: str, prefix: str = "") -> None:
    """Validate ``values`` against the dataclass ``target`` and set them, naming any bad key."""
    hints = get_type_hints(type(target))
    names = [f.name for f in dataclasses.fields(target)]
    for key, value in values.items():
        where = f"{source}: {prefix}{key}"
        if f"{prefix}{key}" in _REPLACED:
            raise SelfspecError(f"{source}: {prefix}{key} was replaced by {_REPLACED[f'{prefix}{key}']}")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise SelfspecError(f"{source}: unknown setting {prefix}{key}{hint}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise SelfspecError(f"{where}: expected a section of settings, got {type(value).__name__}")
            apply(current, value, source, prefix=f"{prefix}{key}.")
            continue
        setattr(target, key, _coerce(value, hints[key], where, key, f"{prefix}{key}"))


def _coerce(value: Any, hint: Any, where: str, key: str, path: str) -> Any:
    """``value`` as the setting ``key`` (``path``: with its section, e.g. ``train.prompt_format``) takes it."""
    optional = type(None) in get_args(hint)
    kind = next((arg for arg in get_args(hint) if arg is not type(None)), hint)
    if value is None and optional:
        return None
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "on", "off", "yes", "no", "1", "0"):
            value = value.lower() in ("true", "on", "yes", "1")
        elif not isinstance(value, bool):
            raise SelfspecError(f"{where}: expected true or false, got {value!r}")
    elif kind in (int, float):
        if isinstance(value, bool):
            raise SelfspecError(f"{where}: expected a number, got {value!r}")
        try:
            number = kind(value) if kind is float else _as_int(value)
        except (TypeError, ValueError):
            raise SelfspecError(
                f"{where}: expected {'an integer' if kind is int else 'a number'}, got {value!r}"
            ) from None
        if number < 0:
            raise SelfspecError(f"{where}: must not be negative, got {number}")
        low, high = _RANGES.get(key, (0, float("inf")))
        if not low <= number <= high:
            raise SelfspecError(f"{where}: must be between {low} and {high}, got {number}")
        value = number
    elif not isinstance(value, str):
        raise SelfspecError(f"{where}: expected text, got {value!r}")
    choices = _CHOICES.get(path) or _CHOICES.get(key)
    if choices and value not in choices:
        raise SelfspecError(f"{where}: expected one of {', '.join(choices)}, got {value!r}")
    for item in value.split(",") if key in _LIST_CHOICES else ():
        if item.strip() and item.strip() not in _LIST_CHOICES[key]:
            raise SelfspecError(
                f"{where}: {item.strip()!r} is not one of {', '.join(_LIST_CHOICES[key])} (comma-separated)"
            )
    return value


def _as_int(value: Any) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return int(value)
