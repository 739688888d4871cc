"""Stage 3: tune the model on the responded data with LoRA (QLoRA when the base is loaded in NF4).

Runs on transformers' ``Trainer`` rather than a hand loop: it already resumes optimizer, scheduler
and RNG state from a checkpoint (every ``torch.load`` there passes ``weights_only=True``), scales
gradient accumulation by the number of target tokens, and runs on CPU, one GPU or accelerate alike.

What selfspec adds on top:

* records are rendered in ``train.prompt_format`` (:mod:`selfspec_core.models.prompting`: the base
  model's chat template, or the domain's ``train`` template, Alpaca's form); the loss covers only the
  response (and the end of its turn); an example longer than ``max_length`` loses the end of its
  *input* text, and its answer only when the answer alone nearly fills ``max_length``;
* padding-free batches (``packing``): a batch's examples are concatenated into one row whose
  position ids restart at every example, so no compute goes to padding; with sdpa, attention runs on
  each example's span of the row separately (:mod:`selfspec_core.models.packed_attention`), so no
  example attends to another and attention costs the sum of the squared example lengths, not the
  square of the row length;
* only the positions that predict a response token are projected onto the vocabulary
  (``logits_to_keep``): on instruction data most tokens are prompt, and the LM head is the largest
  single matrix of a small model;
* checkpoints every ``save_steps`` steps, resumed after a kill; a per-step ``train_log.jsonl``;
* several processes (``selfspec train --num-processes N``, ``accelerate launch``, ``torchrun``): the
  Trainer's accelerate dataloader gives each rank a disjoint ``batch_size`` slice of every global batch
  and DDP all-reduces the gradients, so a step trains on ``batch_size * grad_accum * processes``
  examples (the per-process batch, and so the memory per device, stays as set). The loss is normalized
  by the target tokens of all ranks together. Rank 0 alone writes the log, checkpoints (each rank adds
  its own RNG state to them), the adapter and, in the pipeline, the manifest.

Outputs in the stage folder: ``adapter/`` (PEFT format plus ``selfspec_training.json``: settings,
prompt template and format, data hash, stats) and ``train_log.jsonl``. Checkpoints are deleted once the adapter
is saved.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from transformers import TrainerCallback

from selfspec_core import __version__
from selfspec_core.config import TrainSettings
from selfspec_core.errors import SelfspecError
from selfspec_core.models.loading import ModelRef, default_quant, load_model, load_tokenizer, resolve_dtype
from selfspec_core.models.packed_attention import use_packed_attention
from selfspec_core.models.prompting import PromptFormat
from selfspec_core.run import rounds
from selfspec_core.run.adapter import TRAINING_INFO, read_training_info
from selfspec_core.run.context import StageContext
from selfspec_core.run.rundir import RecordLog, atomic_write_json, file_hash, iter_jsonl, stage_command, write_jsonl
from selfspec_core.runtime import distributed, throughput

IGNORE = -100  # label of a token that is not trained on
TRAINING_ARGS_FILE = "training_args.bin"  # what Trainer.save_model adds next to the weights
PROCESSES_FILE = "processes.json"  # in the checkpoints folder: how many processes made its checkpoints
_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized training example: prompt then response, labels ``IGNORE`` on the prompt."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False  # the input text (or, if it alone overflows, the response) was cut
    response_cut: bool = False


def encode_example(record: dict, prompts: PromptFormat, max_length: int) -> Example:
    """Tokenize ``record`` as its prompt followed by its output and the end of the turn, both in ``prompts``' form.

    Prompts are tokenized without special tokens, exactly as the generators tokenize them at
    inference. Too long an example loses the end of its input text first; if the instruction alone
    still does not fit, the prompt keeps its end (where the response cue is). The response is cut
    (keeping its beginning) only when it would leave the prompt less than a quarter of
    ``max_length``.
    """
    tokenizer = prompts.tokenizer

    def tokens(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    def prompt_tokens(input_text: str) -> list[int]:
        return tokens(prompts.prompt({**record, "input": input_text}))

    input_text = str(record.get("input") or "")
    prompt = prompt_tokens(input_text)
    response = prompts.response_ids(record)
    if len(prompt) + len(response) <= max_length:
        return Example(prompt + response, [IGNORE] * len(prompt) + response)

    longest_response = max_length - min(len(prompt), max_length // 4)
    response_cut = len(response) > longest_response
    response = response[:longest_response]
    budget = max_length - len(response)
    input_ids = tokens(input_text)
    keep = len(input_ids)
    while len(prompt) > budget and keep > 0:
        keep = max(0, keep - (len(prompt) - budget))
        # A cut inside a multi-byte character decodes to U+FFFD; drop it rather than train on it.
        prompt = prompt_tokens(tokenizer.decode(input_ids[:keep]).rstrip("\ufffd"))
    prompt = prompt[len(prompt) - budget :] if len(prompt) > budget else prompt
    return Example(prompt + response, [IGNORE] * len(prompt) + response, truncated=True, response_cut=response_cut)


def load_records(path: Path, rerun: str) -> list[dict]:
    """Alpaca records of ``data.jsonl``; a record without instruction or output is an error.

    ``rerun`` is the command that writes the file again, for the error messages."""
    records = []
    try:
        numbered = list(enumerate(iter_jsonl(path), start=1))
    except ValueError as exc:
        raise SelfspecError(f"{path}: not valid JSON lines ({exc}); rerun `{rerun} --force`") from exc
    for number, record in numbered:
        for name in ("instruction", "output"):
            if not isinstance(record.get(name), str) or not record[name].strip():
                raise SelfspecError(
                    f"{path}: record {number} has no {name!r} text; rerun `{rerun} --force` or fix the file"
                )
        records.append(record)
    if not records:
        raise SelfspecError(f"{path}: no records to train on; rerun `{rerun} --force` with more instructions")
    return records


class ResponseBatches:
    """Collates examples into a batch, plus ``logits_to_keep``: where the next token is a response token.

    ``packing`` concatenates the examples into one row with restarting ``position_ids`` (and a
    separator label at each example's start, so no example predicts the next one's first token);
    otherwise the batch is right-padded with an attention mask.
    """

    def __init__(self, tokenizer, packing: bool):
        from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

        tokenizer.padding_side = "right"
        self.collate = (
            DataCollatorWithFlattening(separator_id=IGNORE, return_flash_attn_kwargs=True)
            if packing
            else DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)
        )

    def __call__(self, features: Sequence[dict]) -> dict:
        import torch

        batch = self.collate([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
        keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
        keep[:, :-1] = batch["labels"][:, 1:] != IGNORE
        batch["logits_to_keep"] = keep
        return batch


def response_loss(outputs, labels, num_items_in_batch=None):
    """Cross-entropy of the kept logits against the response tokens they predict.

    Summed and divided by the number of target tokens in the whole accumulated batch when the
    Trainer gives it, so gradient accumulation weighs every token the same.
    """
    import torch.nn.functional as F

    shifted = labels[:, 1:]
    targets = shifted[shifted != IGNORE]
    logits = outputs.logits
    if logits.dim() == 3:  # full logits (no ``logits_to_keep``): select the predicting positions here
        logits = logits[:, :-1][shifted != IGNORE]
    loss = F.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else max(len(targets), 1))


def lora_model(ref: ModelRef, settings: TrainSettings, quant: str, dtype: str = "float32"):
    """The base model (frozen, NF4 when ``quant == "nf4"``, computing in ``dtype``) wrapped with fresh LoRA adapters."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = load_model(ref, quant=quant, for_training=True, dtype=dtype)
    model.config.use_cache = False  # a cache would also switch off the packed-sequence mask
    if settings.packing:
        use_packed_attention(model, settings.max_length)
    if quant == "nf4":  # norms to fp32, base frozen; the Trainer switches on activation checkpointing
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = settings.target_modules
    names = "all-linear" if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    layers = top_layers(model, settings.lora_top_share)
    if layers is not None and names == "all-linear":  # PEFT takes layer indices with module names only
        names = block_linear_names(model)
    config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        task_type="CAUSAL_LM",
        target_modules=names,
        layers_to_transform=layers,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise SelfspecError(
            f"train.target_modules={targets!r}: {exc}. Use all-linear or module names such as q_proj,v_proj"
        ) from exc


def top_layers(model, share: float) -> list[int] | None:
    """Indices of the top ``share`` of ``model``'s transformer blocks (at least one); None for all."""
    blocks = model.config.get_text_config().num_hidden_layers
    count = max(1, round(blocks * share))
    return None if count >= blocks else list(range(blocks - count, blocks))


def adapted_share(model, top_share: float) -> float:
    """The share of ``model``'s blocks :func:`lora_model` adapts for ``lora_top_share = top_share``
    (whole blocks, so not quite ``top_share``)."""
    layers = top_layers(model, top_share)
    return 1.0 if layers is None else len(layers) / model.config.get_text_config().num_hidden_layers


def kept_share(examples: Sequence[Example]) -> float:
    """The share of the examples' positions whose logit :class:`ResponseBatches` keeps: those that
    predict a response token."""
    tokens = sum(len(e.input_ids) for e in examples)
    return sum(label != IGNORE for e in examples for label in e.labels[1:]) / tokens if tokens else 1.0


def block_linear_names(model) -> list[str]:
    """The names (last part) of the linear layers inside the transformer blocks: what ``all-linear``
    adapts, given as names so that PEFT can pick blocks by index. The output layer is left out, as
    PEFT leaves it out of ``all-linear``."""
    import torch

    output = model.get_output_embeddings()
    in_blocks = (
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output and any(p.isdigit() for p in name.split("."))
    )
    return sorted({name.rsplit(".", 1)[-1] for name in in_blocks})


def training_arguments(settings: TrainSettings, output_dir: Path, seed: int, dtype: str = "float32", **overrides):
    """``TrainingArguments`` for ``settings``: per-step logging, checkpoints, no external reporting, and
    autocast to ``dtype`` (the LoRA weights stay float32) when it is bfloat16 or float16."""
    import torch
    from transformers import TrainingArguments

    if settings.max_steps == 0 and settings.epochs == 0:
        raise SelfspecError("train.epochs and train.max_steps are both 0: set one of them")
    options = dict(
        output_dir=str(output_dir),
        seed=seed,
        data_seed=seed,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps or -1,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=_SCHEDULERS[settings.scheduler],
        warmup_steps=min(settings.warmup_ratio, 0.999),  # a float below 1 is a ratio; 1.0 would mean one step
        activation_checkpointing=settings.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        train_sampling_strategy="group_by_length" if settings.group_by_length and not settings.packing else "random",
        # Packed rows hold no padding at all; padded batches carry an attention mask to count with.
        include_num_input_tokens_seen="all" if settings.packing else "non_padding",
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # accelerate makes no process group for several processes on a machine without GPUs unless told
        # "CPU", and autocasts to bfloat16 on a CPU only when told so.
        use_cpu=(distributed.world_size() > 1 or dtype != "float32") and not torch.cuda.is_available(),
        # Every LoRA weight gets a gradient every step: DDP need not walk the graph looking for unused ones.
        ddp_find_unused_parameters=False,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
    )
    options.update(overrides)
    return TrainingArguments(**options)


class TrainLog(TrainerCallback):
    """Appends each optimizer step's loss and learning rate to ``train_log.jsonl``.

    Steps logged after ``resume_step`` by an interrupted run are dropped first: the resumed run
    trains them again, so every step appears once.
    """

    def __init__(self, path: Path, resume_step: int, log=print):
        kept = [r for r in RecordLog(path).records if r["step"] <= resume_step]
        write_jsonl(path, kept)
        self.records = RecordLog(path)
        self.log = log

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        record = {
            "step": state.global_step,
            "epoch": round(state.epoch or 0.0, 4),
            "loss": logs["loss"],
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens": state.num_input_tokens_seen,
        }
        self.records.append([record])
        every = max(1, state.max_steps // 10)
        if state.global_step % every == 0 or state.global_step == state.max_steps:
            self.log(f"[train] step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}")


def last_complete_checkpoint(folder: Path) -> Path | None:
    """Newest ``checkpoint-N`` whose ``trainer_state.json`` (written last) reads back; torn ones are removed."""
    if not folder.is_dir():
        return None
    checkpoints = sorted(
        (p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for checkpoint in checkpoints:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
            return checkpoint
        except (OSError, ValueError):
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def resume_checkpoint(folder: Path, processes: int) -> Path | None:
    """The checkpoint to resume from, if any.

    Rank 0 looks first: it removes torn checkpoints and, on a fresh start, records the number of
    processes. Checkpoints of another number are refused, on every rank alike: the global batch, the
    steps per epoch and each rank's share of the data would all change halfway through the run.
    """
    marker = folder / PROCESSES_FILE
    with distributed.main_process_first():
        resume = last_complete_checkpoint(folder)
        if resume is None and distributed.is_main_process():
            atomic_write_json(marker, {"processes": processes})
    if resume is None:
        return None
    made_by = json.loads(marker.read_text(encoding="utf-8"))["processes"] if marker.exists() else 1
    if made_by != processes:
        raise SelfspecError(
            f"{resume} was made by {made_by} training process(es) and this run has {processes}: "
            f"rerun with --num-processes {made_by} to resume, or delete {folder} to start over"
        )
    return resume


def make_trainer(model, examples: list[Example], settings: TrainSettings, tokenizer, args, callbacks=()):
    """A Trainer on ``examples`` with selfspec's batches and response-only loss."""
    from transformers import PrinterCallback, Trainer

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=[{"input_ids": e.input_ids, "labels": e.labels} for e in examples],
        data_collator=ResponseBatches(tokenizer, settings.packing),
        compute_loss_func=response_loss,
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def run_stage(ctx: StageContext, callbacks: Sequence = ()) -> dict:
    """Train a LoRA adapter on ``respond/data.jsonl`` (in a round after the first, with the records of
    the rounds before: :mod:`selfspec_core.run.rounds`); ``callbacks`` are extra TrainerCallbacks."""
    data_path = ctx.run.require("respond", "data.jsonl")
    records = load_records(data_path, stage_command(ctx.domain.name, "respond", ctx.run.path))
    earlier = rounds.previous_data(ctx.run)
    data_file = "respond/data.jsonl"
    if earlier is not None:  # a round after the first: every round's records, each once
        records = rounds.union_records(load_records(earlier, rounds.rounds_command(ctx.run)), records)
        data_path = ctx.work / rounds.UNION_FILE
        write_jsonl(data_path, records)
        data_file = f"train/{rounds.UNION_FILE}"
        ctx.log(f"[train] {len(records)} records of this round and the rounds before it")
    data_hash = file_hash(data_path)
    saved = saved_stats(ctx.work / "adapter", data_hash)
    if saved is not None:  # killed after saving the adapter, before the stage was sealed
        return saved
    template = ctx.template("train")
    tokenizer = load_tokenizer(ctx.model)
    prompts = PromptFormat.chosen(ctx.settings.train.prompt_format, template, tokenizer, ctx.template_context)
    ctx.log(f"[train] prompt format: {prompts.name}")
    examples = [encode_example(r, prompts, ctx.settings.train.max_length) for r in records]
    info = {
        "data_file": data_file,
        "data_hash": data_hash,
        "prompt_template": dataclasses.asdict(template),
        "prompt_format": prompts.name,
        "prompt_context": ctx.template_context,
    }
    return train_adapter(
        ctx.model,
        tokenizer,
        examples,
        ctx.settings.train,
        ctx.work,
        ctx.settings.seed,
        resolve_dtype(ctx.settings.dtype),
        info,
        ctx.log,
        callbacks,
    )


def train_adapter(
    ref: ModelRef,
    tokenizer,
    examples: list[Example],
    settings: TrainSettings,
    work: Path,
    seed: int,
    dtype: str,
    info: dict,
    log=print,
    callbacks: Sequence = (),
) -> dict:
    """Tune a LoRA adapter of ``ref`` on ``examples`` into ``work/adapter`` (checkpoints in
    ``work/checkpoints``, resumed after a kill; the log in ``work/train_log.jsonl``). ``info`` (the data
    and template it was made from) goes into the adapter's ``selfspec_training.json``; returns the stats."""
    from peft.helpers import disable_input_dtype_casting
    from transformers import set_seed

    quant = default_quant(settings.quant)
    checkpoints = work / "checkpoints"
    # Before the model: the arguments join the process group (so each GPU process loads onto its own
    # device) and, under an accelerate DeepSpeed config with zero3_init_flag, make loading sharded.
    args = training_arguments(settings, checkpoints, seed, dtype)
    resume = resume_checkpoint(checkpoints, args.world_size)
    set_seed(seed)
    model = lora_model(ref, settings, quant, dtype)
    resumed = json.loads((resume / "trainer_state.json").read_text(encoding="utf-8")) if resume else {}
    if resume:
        log(f"[train] resuming from {resume.name}")
    train_log = (
        [TrainLog(work / "train_log.jsonl", resumed.get("global_step", 0), log)]
        if distributed.is_main_process()
        else []
    )
    trainer = make_trainer(model, examples, settings, tokenizer, args, [*train_log, *callbacks])
    started = time.perf_counter()
    # Under autocast PEFT's own cast of each adapted layer's input to the LoRA weights' float32 is
    # undone at once by autocast (bfloat16 -> float32 -> bfloat16, lossless): two copies of every input
    # for nothing, so it is switched off there.
    with disable_input_dtype_casting(model, active=dtype != "float32"):
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - started
    state = trainer.state
    trained = state.num_input_tokens_seen - resumed.get("num_input_tokens_seen", 0)  # by this process's run
    throughput.record_model(
        model,
        trained,
        0,
        seconds,
        # the ceiling counts the work a token needs, so no run passes it and none is flattered
        passes=throughput.training_passes(model, adapted_share(model, settings.lora_top_share), kept_share(examples)),
    )

    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    stats = {
        "examples": len(examples),
        "truncated": sum(e.truncated for e in examples),
        "response_truncated": sum(e.response_cut for e in examples),
        "steps": state.global_step,
        "epochs": round(state.epoch or 0.0, 4),
        "final_loss": round(losses[-1], 4) if losses else None,
        "tokens": state.num_input_tokens_seen,
        "tokens_per_s": round(trained / seconds, 1),
        "quant": quant,
        "packing": settings.packing,
        "processes": args.world_size,
    }
    info = {
        "selfspec_version": __version__,
        "model": ref.name,
        "model_path": ref.path,
        "seed": seed,
        "settings": dataclasses.asdict(settings),
        **info,
        "stats": stats,
    }
    save_adapter(trainer, work / "adapter", info)
    if distributed.is_main_process():
        shutil.rmtree(checkpoints, ignore_errors=True)
    log(
        f"[train] {stats['steps']} steps on {len(examples)} examples ({stats['truncated']} truncated), "
        f"final loss {stats['final_loss']}, {stats['tokens_per_s']} tokens/s"
    )
    return stats


def save_adapter(trainer, adapter_dir: Path, info: dict) -> None:
    """Write the PEFT adapter and its training record so the folder appears complete or not at all.

    Every rank calls this: under FSDP or DeepSpeed ZeRO-3 the Trainer gathers the sharded weights from
    all of them; rank 0 alone writes.
    """
    staging = adapter_dir.with_name(adapter_dir.name + ".tmp")
    main = distributed.is_main_process()
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    if trainer.is_fsdp_enabled:  # FSDP saves nothing from_pretrained can load unless asked for the full state
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(staging))
    if not main:
        return
    (staging / TRAINING_ARGS_FILE).unlink(missing_ok=True)  # a pickle of the arguments; ``info`` holds the settings
    atomic_write_json(staging / TRAINING_INFO, info)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    os.replace(staging, adapter_dir)


def saved_stats(adapter_dir: Path, data_hash: str) -> dict | None:
    """The stats of the adapter in ``adapter_dir`` if it was tuned on data of ``data_hash``, else None."""
    info = read_training_info(adapter_dir)
    return info.get("stats") if info and info.get("data_hash") == data_hash else None


def export_merged(base_ref: ModelRef, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``base_ref`` with the adapter folded into its weights: a plain model folder (safetensors and
    tokenizer) that ``AutoModelForCausalLM.from_pretrained`` opens without peft.

    The adapter is merged into the full-precision base, also when it was trained on an NF4 base.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SelfspecError(f"{out_dir} exists and is not empty; pass another output folder or remove it")
    merged = load_model(base_ref, quant="none", adapter=adapter_dir)
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        merged.save_pretrained(str(staging), safe_serialization=True)
        load_tokenizer(base_ref).save_pretrained(str(staging))
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise SelfspecError(
            f"{out_dir}: could not write the merged model ({exc.strerror}); free space and retry"
        ) from exc
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(staging, out_dir)
    return out_dir
