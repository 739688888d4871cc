"""bfloat16 against float32: speed of the same benchmark scoring, and whether the choices agree.

    python bench/dtype.py [--max-items 100] [--model gemma3-270m] [--domains finance,biomed]

Scores each domain's development split (FPB's non-test sentences, PubMedQA's non-test abstracts) by
log-likelihood, as the evaluate stage does, once with the model in float32 and once in bfloat16, and
times both on the same prompts. ``agreement`` is the share of items whose chosen answer is the same.
``auto`` is what ``--dtype auto`` picks on this machine (bfloat16 only where the CPU or GPU computes
it natively: on a CPU without AVX512-BF16 or AMX, torch emulates it and it runs many times slower).
Last line: ``speedup=<f32 seconds / bf16 seconds> agreement=<share> n=<items> auto=<dtype>
f32_tok_s=<x> bf16_tok_s=<y>``.
"""

from __future__ import annotations

import argparse
import sys
import time

from devsplit import DATA, dev_split

from selfspec_core.config import load_settings
from selfspec_core.eval.scoring import score_loglikelihood
from selfspec_core.models.generator import HFGenerator
from selfspec_core.models.loading import load_model, load_tokenizer, resolve_dtype, resolve_model
from selfspec_core.runtime.openmp import choose_wait_policy
from selfspec_core.stages.evaluate import render_prompt


def dev_prompts(domain: str, settings) -> tuple[list[str], list]:
    """The development items of ``domain`` rendered as the evaluate stage renders them."""
    task, prompts = dev_split(domain, settings, resolve_model(settings.model))
    return [render_prompt(prompts, item, []) for item in task.scored], task.scored


def main() -> None:
    choose_wait_policy()  # as the selfspec command does, before torch loads
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-items", type=int, default=100, help="items per domain")
    parser.add_argument("--domains", default="finance,biomed")
    parser.add_argument("--model", help="as selfspec --model (default: the embedded model)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"benchmark data not found at {DATA}: set SELFSPEC_DATA")
    settings = load_settings(
        "quick",
        overrides={"model": args.model, "data_dir": str(DATA.resolve()), "evaluate": {"max_items": args.max_items}},
    )
    ref = resolve_model(settings.model)
    tokenizer = load_tokenizer(ref)
    prompts, items = [], []
    for domain in args.domains.split(","):
        more_prompts, more_items = dev_prompts(domain.strip(), settings)
        prompts += more_prompts
        items += more_items
    tokens = sum(len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts)

    choices, seconds = {}, {}
    for dtype in ("float32", "bfloat16"):
        generator = HFGenerator(load_model(ref, dtype=dtype), tokenizer, args.batch_size)
        started = time.perf_counter()
        scores = score_loglikelihood(generator, prompts, items, metric="accuracy")
        seconds[dtype] = time.perf_counter() - started
        choices[dtype] = [s.prediction for s in scores]
        accuracy = sum(s.score for s in scores) / len(scores)
        print(
            f"{dtype}: {seconds[dtype]:.1f} s for {len(prompts)} items ({tokens} prompt tokens, "
            f"{tokens / seconds[dtype]:.0f} tok/s), accuracy {accuracy:.3f}",
            flush=True,
        )
    agreement = sum(a == b for a, b in zip(choices["float32"], choices["bfloat16"])) / len(prompts)
    print(
        f"speedup={seconds['float32'] / seconds['bfloat16']:.2f} agreement={agreement:.3f} n={len(prompts)} "
        f"auto={resolve_dtype('auto')} f32_tok_s={tokens / seconds['float32']:.0f} "
        f"bf16_tok_s={tokens / seconds['bfloat16']:.0f}"
    )


if __name__ == "__main__":
    main()
