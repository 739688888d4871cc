"""Training throughput: selfspec's training path vs a naive padded-batch baseline, on SmolLM2-135M.

Every arm trains LoRA for the same number of optimizer steps on the same pool of Alpaca records
(built from the shipped seeds, spread over the whole length range: 40 to 270 tokens) with the
default settings and seed, each in its own process so its peak memory is its own:

* ``baseline``: every batch padded to ``max_length``, random order, logits for every position;
* ``selfspec``: the stage as configured by default (``packing``: padding-free rows, attention per
  example, logits only where a response token is predicted). Same batches as the baseline;
* ``grouped``: the stage with ``packing`` off: right-padded batches from the Trainer's length
  grouping (sorted mega-batches of ``pool / (4 * batch)`` batches, so the pool must be large);
* ``flash32``: the stage with each example's attention in torch's float32 flash kernel, as before
  a bfloat16 model on a CPU without AMX got matrix-product attention for its short spans
  (:mod:`selfspec_core.models.packed_attention`; elsewhere the two arms run the same code).

tok/s counts real (non-pad) tokens per second of training. Torch runs on ``--threads`` threads
(default 1: on a busy shared CPU, thread hand-offs otherwise swamp the figures).

    python bench/train.py [--records 96] [--steps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_records(count: int, tokenizer, template) -> list[dict]:
    """``count`` seeds of both domains as Alpaca records, evenly spread over their token lengths."""
    from selfspec_core.run.rundir import read_jsonl

    seeds = [r for domain in ("finance", "biomed") for r in read_jsonl(ROOT / "seeds" / domain / "seeds.jsonl")]
    length = {
        id(r): len(tokenizer(template.render([], r) + r["output"], add_special_tokens=False).input_ids) for r in seeds
    }
    ordered = sorted(seeds, key=lambda r: length[id(r)])
    picked = [ordered[round(i * (len(ordered) - 1) / (count - 1))] for i in range(count)]
    return [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in picked]


def run_arm(arm: str, data: Path, steps: int, threads: int) -> dict:
    import torch

    from selfspec_core.config import load_settings
    from selfspec_core.models.loading import load_tokenizer, resolve_model
    from selfspec_core.models.prompting import PromptFormat
    from selfspec_core.plugins import manager as plugins
    from selfspec_core.run.context import StageContext
    from selfspec_core.run.rundir import RunDir, read_jsonl, write_jsonl
    from selfspec_core.stages import train as training

    torch.set_num_threads(threads)
    settings = load_settings("quick", overrides={"train": {"max_steps": steps, "quant": "none"}})
    settings.train.packing = arm != "grouped"
    if arm == "flash32":
        from selfspec_core.models import packed_attention

        packed_attention.packed_attention_bf16_cpu = packed_attention.packed_sdpa_float32
    ref = resolve_model(None)
    work = data.parent / arm
    run = RunDir(work / "run", "finance").open()
    write_jsonl(run.partial_dir("respond") / "data.jsonl", read_jsonl(data))
    run.finish("respond", {})
    ctx = StageContext(
        settings, plugins.get_domain("finance"), run, [], ref, run.partial_dir("train"), log=lambda _: None
    )
    if arm != "baseline":
        stats = training.run_stage(ctx)
    else:
        from transformers import DataCollatorForSeq2Seq, Trainer

        tokenizer = load_tokenizer(ref)
        tokenizer.padding_side = "right"
        prompts = PromptFormat.chosen(
            settings.train.prompt_format, ctx.template("train"), tokenizer, ctx.template_context
        )
        examples = [training.encode_example(r, prompts, settings.train.max_length) for r in read_jsonl(data)]
        args = training.training_arguments(
            settings.train,
            work / "checkpoints",
            settings.seed,
            include_num_input_tokens_seen="non_padding",
            train_sampling_strategy="random",
        )
        trainer = Trainer(
            model=training.lora_model(ref, settings.train, "none"),
            args=args,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding="max_length", max_length=settings.train.max_length),
            train_dataset=[{"input_ids": e.input_ids, "labels": e.labels} for e in examples],
        )
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        stats = {
            "steps": trainer.state.global_step,
            "tokens": trainer.state.num_input_tokens_seen,
            "tokens_per_s": trainer.state.num_input_tokens_seen / seconds,
        }
    stats["peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return stats


def main() -> None:
    from selfspec_core.runtime.openmp import choose_wait_policy

    choose_wait_policy()  # as the selfspec command does, before torch loads
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=96)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arm", choices=("baseline", "selfspec", "grouped", "flash32"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.arm:
        print(json.dumps(run_arm(options.arm, options.data, options.steps, options.threads)))
        return

    from selfspec_core.models.loading import load_tokenizer, resolve_model
    from selfspec_core.plugins.defaults import TRAIN_TEMPLATE
    from selfspec_core.run.rundir import write_jsonl

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        data = Path(folder) / "data.jsonl"
        write_jsonl(data, build_records(options.records, load_tokenizer(resolve_model(None)), TRAIN_TEMPLATE))
        for arm in ("selfspec", "flash32", "grouped", "baseline"):
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--arm",
                    arm,
                    "--data",
                    str(data),
                    "--steps",
                    str(options.steps),
                    "--threads",
                    str(options.threads),
                ],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            if done.returncode:
                sys.exit(f"{arm} failed:\n{done.stderr[-3000:]}")
            results[arm] = json.loads(done.stdout.strip().splitlines()[-1])
            stats = results[arm]
            print(
                f"{arm:9s} steps={stats['steps']} tokens={stats['tokens']} tok/s={stats['tokens_per_s']:.1f} "
                f"peak_mb={stats['peak_mb']}",
                flush=True,
            )
    assert (
        len({r["steps"] for r in results.values()}) == 1
        and results["selfspec"]["tokens"] == results["baseline"]["tokens"]
    )
    ours, flash, grouped, baseline = (
        results[a]["tokens_per_s"] for a in ("selfspec", "flash32", "grouped", "baseline")
    )
    print(
        f"speedup={ours / baseline:.2f} tok_s={ours:.1f} baseline_tok_s={baseline:.1f} grouped_tok_s={grouped:.1f} "
        f"flash32_tok_s={flash:.1f} attention_speedup={ours / flash:.2f} peak_mb={results['selfspec']['peak_mb']} "
        f"flash32_peak_mb={results['flash32']['peak_mb']}"
    )


if __name__ == "__main__":
    main()
