"""Self-MoE composition: one base model, several domains' LoRA experts, and a router that sends each
request to one expert or to the plain base.

As in Self-MoE (Kang et al., 2024, arXiv 2406.12034) the router learns only from what the runs
already hold, with no hand labels: each domain's training records and, for an installed domain, the
human seeds they were made from are examples of that domain, and a set of general requests shipped
with selfspec (``general_prompts.jsonl``, written for this project) are examples of text no expert
should take. The router is a softmax-linear head over the base
model's hidden states, mean-pooled over the prompt at the embeddings (a bag of words), at half depth
and at the top: one forward pass of the base with the adapters off, no second model.

Routing is per request and hard (one expert), so the composed model's answer to a request is the
chosen expert's answer; :mod:`selfspec_core.compose.evaluate` assembles the composed model's scores
from the specialists' own.

Each example is shown to the router twice, as plain text (instruction and input) and posed in the
expert's training template, so routing holds for a raw chat message and for a templated prompt alike.

A composed folder holds ``composed.json`` (base model, experts, router labels and its accuracy on
held-back records) and ``router.safetensors`` (the head and its feature standardization).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from selfspec_core import __version__
from selfspec_core.errors import SelfspecError
from selfspec_core.jsonl import numbered_rows
from selfspec_core.models.generator import padded, token_batches
from selfspec_core.models.loading import (
    ModelRef,
    check_adapter,
    load_model,
    load_tokenizer,
    resolve_model,
    unfreeze_for_inference,
)
from selfspec_core.models.prompting import PromptFormat
from selfspec_core.run.adapter import TRAINING_INFO, adapter_prompt_format, adapter_prompts, read_training_info
from selfspec_core.run.rundir import atomic_write_json, iter_jsonl
from selfspec_core.templates import PromptTemplate, template_context

BASE = "base"  # the router's label for requests no expert should take
COMPOSED_FILE = "composed.json"
ROUTER_FILE = "router.safetensors"
GENERAL_PROMPTS = "general_prompts.jsonl"
MIN_ROUTER_RECORDS = 20  # fewer records of a domain than this teach the router nothing reliable
ROUTER_TOKENS = 128  # the start of a prompt says its domain; longer ones are cut for speed


@dataclass(frozen=True)
class Expert:
    """One domain's adapter and the run that made it."""

    name: str  # the domain
    adapter: str
    run: str
    data: str  # the records the adapter was tuned on: the router's examples of this domain
    model: str | None  # the run's ``--model`` (None: the embedded default)
    template: dict  # the prompt template the adapter was tuned in
    prompt_format: str = "alpaca"  # ... and the form (models.prompting); composed before it was recorded: Alpaca

    def prompt_template(self) -> PromptTemplate:
        return PromptTemplate(**self.template)

    def prompts(self, tokenizer) -> PromptFormat:
        """The renderer of the form this expert's adapter learnt (format, template and the context
        training filled it with), for its own domain's records: as serve and evaluate pose it."""
        return adapter_prompts(Path(self.adapter), tokenizer, installed_template_context(self.name))


def find_expert(source: str | Path) -> Expert:
    """The expert of a run folder, or of an adapter folder that is a run's ``train/adapter``."""
    source = Path(source).expanduser()
    run = source if (source / "run.json").is_file() else source.parent.parent
    if not (run / "run.json").is_file():
        what = "not found" if not source.exists() else "neither a run folder nor a run's train/adapter"
        raise SelfspecError(
            f"{source}: {what}; pass run folders (runs/<domain>-<profile>) or their train/adapter "
            "folders: the router learns each domain from the run's training data"
        )
    adapter = source if run != source else run / "train" / "adapter"
    if not adapter.is_dir():
        raise SelfspecError(
            f"{run}: the run has no adapter ({adapter} missing); run `selfspec --out {run} train` first"
        )
    check_adapter(adapter)
    try:
        domain = json.loads((run / "run.json").read_text(encoding="utf-8"))["domain"]
        config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SelfspecError(
            f"{run}: run.json or config.json unreadable ({type(exc).__name__}); rerun that run's stages"
        ) from None
    info = read_training_info(adapter) or {}
    template = info.get("prompt_template")
    if not isinstance(template, dict):
        raise SelfspecError(
            f"{run}: {adapter / TRAINING_INFO} is missing or has no prompt_template; "
            f"rerun `selfspec --out {run} train --force`"
        )
    data = run / str(info.get("data_file", "respond/data.jsonl"))
    if not data.is_file():
        raise SelfspecError(
            f"{run}: the adapter's training data {data} is missing; rerun `selfspec --out {run} respond`"
        )
    return Expert(
        domain,
        str(adapter.resolve()),
        str(run.resolve()),
        str(data.resolve()),
        config.get("model"),
        template,
        adapter_prompt_format(adapter),
    )


def installed_template_context(domain: str) -> dict[str, str]:
    """What a domain's templates are filled with, as its runs filled them (its installed description)."""
    from selfspec_core.plugins import manager as plugins

    found = plugins.domains().get(domain)
    return template_context(domain, found.description if found else "")


def domain_seed_records(domain: str) -> list[dict]:
    """The human-written seeds of ``domain`` when it is installed (none otherwise). They span every task
    family of the domain, where a run's records lean to the few families the model wrote well: without
    them, PubMedQA-style questions went to the finance expert 14 times in 150 (PubMedQA dev), with
    them twice."""
    from selfspec_core.plugins import manager as plugins
    from selfspec_core.run.pipeline import domain_seeds

    if domain not in plugins.domains():
        return []
    try:
        return [seed.to_dict() for seed in domain_seeds(domain)]
    except SelfspecError:
        return []


def with_experts(base, experts: Sequence[Expert]):
    """``base`` as a PEFT model holding every expert's adapter under the expert's name."""
    from peft import PeftModel

    first, *rest = experts
    model = PeftModel.from_pretrained(base, first.adapter, adapter_name=first.name)
    for expert in rest:
        model.load_adapter(expert.adapter, adapter_name=expert.name)
    unfreeze_for_inference(model)
    return model


def check_experts(experts: Sequence[Expert]) -> None:
    """One expert per domain, all tuned on the same base model."""
    if not experts:
        raise SelfspecError("compose: name at least one run folder")
    seen: dict[str, Expert] = {}
    for expert in experts:
        if expert.name == BASE:
            raise SelfspecError(
                f"{expert.run}: a domain may not be named {BASE!r}, the router's name for the plain base"
            )
        if expert.name in seen:
            raise SelfspecError(
                f"{expert.run} and {seen[expert.name].run} are both runs of domain {expert.name!r}; "
                "compose one run per domain"
            )
        seen[expert.name] = expert
    models = {expert.model for expert in experts}
    if len(models) > 1:
        named = ", ".join(f"{e.run} ({e.model or 'the embedded default'})" for e in experts)
        raise SelfspecError(
            f"the adapters were tuned on different base models: {named}; compose runs of one base model"
        )


# ---------------------------------------------------------------------------------------- router


def general_prompts() -> list[dict]:
    """Requests of no particular domain (cooking, code, history...), written for selfspec: the
    router's examples of what goes to the plain base model."""
    text = resources.files("selfspec_core").joinpath(GENERAL_PROMPTS).read_text(encoding="utf-8")
    return [row for _, row in numbered_rows(text.splitlines())]


def router_views(record: dict, template: PromptTemplate, context: dict) -> list[str]:
    """The two forms a request reaches the router in: plain text, and posed in ``template``."""
    instruction, given = str(record.get("instruction") or ""), str(record.get("input") or "")
    plain = f"{instruction}\n\n{given}".strip()
    return [plain, template.render([], {"instruction": instruction, "input": given}, **context)]


def prompt_features(model, tokenizer, texts: Sequence[str], max_tokens: int = ROUTER_TOKENS, batch_tokens: int = 4096):
    """Each text's hidden states mean-pooled at the embeddings, at half depth and at the top, side by side
    ([n, 3 x hidden]).

    ``model`` is the base (a PEFT model computes with its adapters off)."""
    import torch

    encoded = [
        tokenizer(text, add_special_tokens=False).input_ids[:max_tokens] or [tokenizer.eos_token_id] for text in texts
    ]
    rows: list = [None] * len(texts)
    device = next(model.parameters()).device
    disabled = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    with torch.inference_mode(), disabled:
        for batch in token_batches([len(ids) for ids in encoded], batch_tokens):
            ids, mask = padded([encoded[i] for i in batch], tokenizer.pad_token_id)
            # only the hidden states are wanted: one position through the output layer, not every one
            hidden = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True, logits_to_keep=1
            ).hidden_states
            weights = mask.to(device).unsqueeze(-1).float()
            pooled = [(hidden[depth].float() * weights).sum(1) / weights.sum(1) for depth in (0, len(hidden) // 2, -1)]
            for row, index in enumerate(batch):
                rows[index] = torch.cat([p[row] for p in pooled]).cpu()
    return torch.stack(rows)


@dataclass
class Router:
    """A softmax-linear head over standardized prompt features; ``labels[0]`` is :data:`BASE`."""

    labels: list[str]
    mean: object  # torch tensors
    scale: object
    weight: object
    bias: object

    def probabilities(self, features):
        import torch

        return torch.softmax(((features - self.mean) / self.scale) @ self.weight.T + self.bias, dim=-1)

    def choose(self, features) -> list[str]:
        return [self.labels[i] for i in self.probabilities(features).argmax(-1).tolist()]

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        staging = path.with_name(path.name + ".tmp")
        save_file(
            {"mean": self.mean, "scale": self.scale, "weight": self.weight, "bias": self.bias},
            str(staging),
            metadata={"labels": json.dumps(self.labels)},
        )
        staging.replace(path)

    @classmethod
    def load(cls, path: Path) -> Router:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                labels = json.loads(handle.metadata()["labels"])
                tensors = {name: handle.get_tensor(name) for name in ("mean", "scale", "weight", "bias")}
        except Exception as exc:
            raise SelfspecError(
                f"{path}: corrupt router ({type(exc).__name__}); run `selfspec compose` again"
            ) from None
        return cls(labels, **tensors)


def fit_router(
    features, targets: Sequence[int], labels: list[str], seed: int = 0, steps: int = 300, weight_decay: float = 1e-3
) -> Router:
    """Multinomial logistic regression, each class weighted by its inverse frequency (a domain with
    few records is not drowned by one with many)."""
    import torch

    torch.manual_seed(seed)
    y = torch.tensor(list(targets))
    mean, scale = features.mean(0), features.std(0).clamp_min(1e-4)
    x = (features - mean) / scale
    counts = torch.bincount(y, minlength=len(labels)).float()
    class_weight = counts.sum() / (len(labels) * counts.clamp_min(1))
    head = torch.nn.Linear(x.shape[1], len(labels))
    optimizer = torch.optim.Adam(head.parameters(), lr=0.01, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y, weight=class_weight)
        loss.backward()
        optimizer.step()
    return Router(labels, mean, scale, head.weight.detach().clone(), head.bias.detach().clone())


def route_texts(model, tokenizer, router: Router, texts: Sequence[str]) -> list[str]:
    """The expert (or :data:`BASE`) the router picks for each text."""
    if not texts:
        return []
    return router.choose(prompt_features(model, tokenizer, texts))


# ----------------------------------------------------------------------------------------- build


def compose(
    sources: Sequence[str | Path],
    out: Path,
    *,
    dtype: str = "auto",
    model: str | None = None,
    max_records: int = 400,
    held_back: float = 0.2,
    seed: int = 42,
    log: Callable[[str], None] = print,
) -> dict:
    """Build the composed folder ``out`` from runs: check them, learn the router, write it.

    ``max_records`` caps each domain's (and the general set's) records the router sees, ``held_back``
    is the share kept aside to measure routing accuracy. ``model`` (``--model``), when given, must
    be the runs' base.
    """
    experts = [find_expert(source) for source in sources]
    check_experts(experts)
    spec = experts[0].model
    if model is not None and model != spec:
        raise SelfspecError(
            f"--model {model} is not the base the runs were tuned on ({spec or 'the embedded default'}); "
            "leave --model out"
        )
    ref = resolve_model(spec)
    rng = random.Random(seed)
    # label -> (records, of which a share is held back; seeds, only ever trained on; template; its context)
    examples: dict[str, tuple[list[dict], list[dict], PromptTemplate, dict]] = {}
    for expert in experts:
        try:
            records = list(iter_jsonl(Path(expert.data)))
        except ValueError as exc:
            raise SelfspecError(
                f"{expert.data}: corrupt training data ({exc}); rerun `selfspec --out {expert.run} respond`"
            ) from None
        if len(records) < MIN_ROUTER_RECORDS:
            raise SelfspecError(
                f"{expert.run}: only {len(records)} training records of domain {expert.name!r}, the router "
                f"needs {MIN_ROUTER_RECORDS}; run that domain with a larger profile"
            )
        rng.shuffle(records)
        examples[expert.name] = (
            records[:max_records],
            domain_seed_records(expert.name),
            expert.prompt_template(),
            installed_template_context(expert.name),
        )
    general = general_prompts()
    rng.shuffle(general)
    examples[BASE] = (
        general[:max_records],
        [],
        experts[0].prompt_template(),
        {"domain": "general", "description": "general"},
    )
    labels = [BASE, *[expert.name for expert in experts]]

    train_texts, train_targets, test_texts, test_targets = [], [], [], []
    for index, label in enumerate(labels):
        records, seeds, template, context = examples[label]
        cut = max(1, int(len(records) * held_back))
        for number, record in enumerate(records + seeds):
            texts, targets = (test_texts, test_targets) if number < cut else (train_texts, train_targets)
            views = router_views(record, template, context)
            texts += views
            targets += [index] * len(views)
    counts = {label: {"records": len(examples[label][0]), "seeds": len(examples[label][1])} for label in labels}
    log(
        f"[compose] router: {len(train_texts)} training views of "
        + ", ".join(f"{label} {n['records']} records + {n['seeds']} seeds" for label, n in counts.items())
        + f"; {len(test_texts)} views of held-back records"
    )
    base = load_model(ref, dtype=dtype)
    tokenizer = load_tokenizer(ref)
    router = fit_router(prompt_features(base, tokenizer, train_texts), train_targets, labels, seed)
    chosen = router.choose(prompt_features(base, tokenizer, test_texts))
    truth = [labels[t] for t in test_targets]
    accuracy = {label: _share([c == t for c, t in zip(chosen, truth) if t == label]) for label in labels}
    accuracy["all"] = _share([c == t for c, t in zip(chosen, truth)])
    log(
        "[compose] routing accuracy on held-back records: "
        + ", ".join(f"{label} {value:.3f}" for label, value in accuracy.items())
    )

    out.mkdir(parents=True, exist_ok=True)
    router.save(out / ROUTER_FILE)
    manifest = {
        "selfspec_version": __version__,
        "model": spec,
        "model_name": ref.name,
        "labels": labels,
        "experts": [asdict(expert) for expert in experts],
        "router": {
            "features": "mean-pooled hidden states at the embeddings, half depth and the top",
            "max_tokens": ROUTER_TOKENS,
            "examples": counts,
            "held_back_accuracy": accuracy,
        },
    }
    atomic_write_json(out / COMPOSED_FILE, manifest)  # written last: its presence marks a finished folder
    return manifest


def _share(flags: Sequence[bool]) -> float:
    return round(sum(flags) / len(flags), 4) if flags else 0.0


# ------------------------------------------------------------------------------------------- use


def read_composed(folder: str | Path) -> tuple[dict, list[Expert], Router]:
    """The manifest, experts and router of a composed folder (one line naming it if unusable)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / COMPOSED_FILE).read_text(encoding="utf-8"))
        experts = [Expert(**e) for e in manifest["experts"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SelfspecError(
            f"{folder}: not a composed model ({COMPOSED_FILE} {type(exc).__name__}); "
            "make one with `selfspec compose RUN... --out FOLDER`"
        ) from None
    for expert in experts:
        if not Path(expert.adapter).is_dir():
            raise SelfspecError(
                f"{folder}: expert {expert.name!r}'s adapter {expert.adapter} is missing; "
                "compose again from the runs as they are now"
            )
    return manifest, experts, Router.load(folder / ROUTER_FILE)


class ComposedModel:
    """The base with every expert's adapter loaded by name, and the router: what ``selfspec serve`` runs.

    :meth:`route` picks an expert per prompt; :meth:`use` switches the active one (``base``: adapters off)."""

    def __init__(self, folder: str | Path, dtype: str = "auto"):
        self.manifest, self.experts, self.router = read_composed(folder)
        self.ref: ModelRef = resolve_model(self.manifest.get("model"))
        self.model = with_experts(load_model(self.ref, dtype=dtype), self.experts)
        self.model.eval()
        self.tokenizer = load_tokenizer(self.ref)
        self.names = [BASE, *[expert.name for expert in self.experts]]

    def route(self, texts: Sequence[str]) -> list[str]:
        return route_texts(self.model, self.tokenizer, self.router, texts)

    def use(self, name: str):
        """A context in which the model computes as expert ``name`` (or the plain base)."""
        if name == BASE:
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return nullcontext()
