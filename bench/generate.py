"""Batched against one-at-a-time generation of instructions with the embedded model.

16 prompts exactly as stage 1 builds them (finance seeds, the instruction template, balanced task
types, k examples), generated with the stage's sampling settings and dtype, first one prompt per call, then
all of them batched (left-padded, one ``generate`` call). By default every completion runs to the
fixed ``--max-new-tokens``, so both ways do the same work; with ``--stop`` they end at the stage's
stop strings, as in the stage, and a batch waits for its longest row (throughput then counts only
the tokens each completion really has).

It also times the batch's prompt pass alone, both ways, alternating (five times each, medians):
the padded forward pass, and :func:`~selfspec_core.models.generator.prefill`, which runs all but
attention on the real tokens only.

Last line: ``speedup=<x> batched_tok_s=<y> sequential_tok_s=<z> prefill_speedup=<p>``.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from pathlib import Path

from selfspec_core.config import load_settings
from selfspec_core.data.seeds import load_seeds
from selfspec_core.models.generator import HFGenerator, left_padded, prefill
from selfspec_core.models.loading import load_model, load_tokenizer, resolve_model
from selfspec_core.plugins import manager as plugins
from selfspec_core.records import Domain
from selfspec_core.runtime.openmp import choose_wait_policy
from selfspec_core.stages.generate import ExamplePool, TaskFormat, choose_task_types
from selfspec_core.templates import PromptTemplate, template_context

REPO = Path(__file__).resolve().parents[1]


def stage_prompts(count: int, settings) -> tuple[list[str], TaskFormat]:
    domain = plugins.domains().get("finance", Domain("finance", "finance"))
    seeds = load_seeds(REPO / "seeds" / "finance" / "seeds.jsonl")
    template = plugins.first_answer("prompt_template", PromptTemplate, domain=domain.name, stage="instruction")
    task_format = TaskFormat(template, template_context(domain.name, domain.description))
    task_types = list(dict.fromkeys(seed.task_type for seed in seeds))
    examples, rng = ExamplePool(seeds, []), random.Random(settings.seed)
    prompts = [
        task_format.prompt(
            examples.draw(rng, name, settings.generate.num_examples, settings.generate.human_example_share), name
        )
        for name in choose_task_types(task_types, Counter(), {}, count)
    ]
    return prompts, task_format


def timed(generator: HFGenerator, batches: list[list[str]], options: dict) -> tuple[float, int]:
    started, tokens = time.perf_counter(), 0
    for batch in batches:
        tokens += sum(c.num_tokens for c in generator.generate(batch, **options))
    return time.perf_counter() - started, tokens


def prompt_pass_seconds(model, tokenizer, prompts: list[str], repeats: int = 5) -> tuple[float, float]:
    """Median seconds of the batch's prompt pass: padded, then packed by ``prefill``, alternating."""
    import statistics

    import torch

    rows = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    ids, mask, positions = left_padded(rows, tokenizer.pad_token_id)

    def padded():
        model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)

    def packed():
        prefill(model, ids, mask, positions)

    times: dict = {padded: [], packed: []}
    with torch.inference_mode():
        for _ in range(repeats):
            for run in times:
                started = time.perf_counter()
                run()
                times[run].append(time.perf_counter() - started)
    return statistics.median(times[padded]), statistics.median(times[packed])


def main() -> None:
    choose_wait_policy()  # as the selfspec command does, before torch loads
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument(
        "--max-new-tokens", type=int, default=0, help="tokens per completion (0: the stage's generate.max_new_tokens)"
    )
    parser.add_argument("--stop", action="store_true", help="end completions at the stage's stop strings")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); "
        "on a CPU shared with other jobs, 1 avoids threads waiting on each other",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = load_settings("quick")
    prompts, task_format = stage_prompts(args.prompts, settings)
    max_new_tokens = args.max_new_tokens or settings.generate.max_new_tokens
    model_ref = resolve_model(settings.model)
    model, tokenizer = load_model(model_ref, dtype=settings.dtype), load_tokenizer(model_ref)
    options = dict(
        max_new_tokens=max_new_tokens,
        temperature=settings.generate.temperature,
        top_p=settings.generate.top_p,
        stop=task_format.stops if args.stop else (),
        seed=settings.seed,
    )
    sequential = HFGenerator(model, tokenizer, batch_size=1)
    batched = HFGenerator(model, tokenizer, batch_size=len(prompts))
    sequential.generate(prompts[:1], **{**options, "max_new_tokens": 4})  # warm-up, not timed

    sequential_s, sequential_tokens = timed(sequential, [[p] for p in prompts], options)
    batched_s, batched_tokens = timed(batched, [prompts], options)
    sequential_rate, batched_rate = sequential_tokens / sequential_s, batched_tokens / batched_s
    padded_s, packed_s = prompt_pass_seconds(model, tokenizer, prompts)
    mean_prompt = sum(len(tokenizer(p).input_ids) for p in prompts) / len(prompts)
    print(
        f"model {model_ref.name}, {len(prompts)} prompts of {mean_prompt:.0f} tokens on average, "
        f"max_new_tokens {max_new_tokens}"
        f"{' (stop strings on)' if args.stop else ''}, "
        f"{model.dtype}, {torch.get_num_threads()} torch threads"
    )
    print(
        f"one at a time: {sequential_tokens} tokens in {sequential_s:.1f}s; "
        f"batched: {batched_tokens} tokens in {batched_s:.1f}s; "
        f"the batch's prompt pass: {padded_s:.2f}s padded, {packed_s:.2f}s packed"
    )
    print(
        f"speedup={batched_rate / sequential_rate:.2f} batched_tok_s={batched_rate:.1f} "
        f"sequential_tok_s={sequential_rate:.1f} prefill_speedup={padded_s / packed_s:.2f}"
    )


if __name__ == "__main__":
    main()
