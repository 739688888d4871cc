"""OpenMP wait policies on this CPU: LoRA training and batched generation with the embedded model.

Torch's CPU kernels run on OpenMP threads, and what those threads do between parallel regions is the
wait policy, read once when torch loads: ``PASSIVE`` sleeps at once, ``ACTIVE`` spins for a long
time, and ``default`` (OMP_WAIT_POLICY unset) is libgomp's own: spin briefly, then sleep. Each arm
runs every workload in a fresh process with only the policy changed:

* ``train``: LoRA steps of the train stage (default settings, packed batches) on seed records of
  both domains spread over their token lengths (``bench/train.py``'s pool);
* ``generate``: one batched ``generate`` call on stage-1 prompts (``bench/generate.py``'s), every
  completion running to ``--max-new-tokens``.

``--busy`` runs a second process beside every arm that keeps torch busy on all cores (matrix
products on OpenMP threads of its own), as on a machine shared with another job.

selfspec spins a bounded while (``GOMP_SPINCOUNT``) when the machine is idle as it starts and sleeps
(``PASSIVE``) when it is shared (selfspec_core/openmp.py); these figures are why.

    python bench/wait_policy.py [--steps 12] [--prompts 8] [--max-new-tokens 64] [--busy]

Last line: ``train_speedup=<active/passive> generate_speedup=<active/passive>`` then each arm's
tokens per second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("passive", "default", "active")


def train_rate(steps: int, folder: Path) -> float:
    from train import build_records

    from selfspec_core import plugins, training
    from selfspec_core.config import load_settings
    from selfspec_core.defaults import TRAIN_TEMPLATE
    from selfspec_core.models import load_tokenizer, resolve_model
    from selfspec_core.pipeline import StageContext
    from selfspec_core.rundir import RunDir, write_jsonl

    settings = load_settings("quick", overrides={"train": {"max_steps": steps}})
    ref = resolve_model(None)
    run = RunDir(folder / "run", "finance").open()
    write_jsonl(run.partial_dir("respond") / "data.jsonl", build_records(96, load_tokenizer(ref), TRAIN_TEMPLATE))
    run.finish("respond", {})
    ctx = StageContext(settings, plugins.get_domain("finance"), run, [], ref, run.partial_dir("train"), log=lambda _: None)
    return training.run_stage(ctx)["tokens_per_s"]


def generate_rate(prompts: int, max_new_tokens: int) -> float:
    from generate import stage_prompts, timed

    from selfspec_core.config import load_settings
    from selfspec_core.generation import HFGenerator
    from selfspec_core.models import load_model, load_tokenizer, resolve_model

    settings = load_settings("quick")
    texts, _ = stage_prompts(prompts, settings)
    ref = resolve_model(None)
    generator = HFGenerator(load_model(ref, dtype=settings.dtype), load_tokenizer(ref), batch_size=prompts)
    options = dict(max_new_tokens=max_new_tokens, temperature=settings.generate.temperature,
                   top_p=settings.generate.top_p, stop=(), seed=settings.seed)
    generator.generate(texts[:1], **{**options, "max_new_tokens": 4})  # warm-up, not timed
    seconds, tokens = timed(generator, [texts], options)
    return tokens / seconds


def keep_busy() -> None:
    """Matrix products on every core until killed: the other job on a shared machine."""
    import torch

    a = torch.randn(1024, 1024)
    while True:
        a = torch.tanh(a @ a)


def arm_env(policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return env if policy == "default" else {**env, "OMP_WAIT_POLICY": policy.upper()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--busy", action="store_true", help="run a CPU-bound torch process beside every arm")
    parser.add_argument("--workload", choices=("train", "generate", "busy"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.workload:
        # libgomp reads the policy when torch loads it: before selfspec_core can set a default of its own.
        import torch  # noqa: F401
    if options.workload == "busy":
        keep_busy()
    if options.workload:
        with tempfile.TemporaryDirectory(prefix="bench-wait-") as folder:
            rate = (train_rate(options.steps, Path(folder)) if options.workload == "train"
                    else generate_rate(options.prompts, options.max_new_tokens))
        print(json.dumps({"tok_s": rate}))
        return

    rates: dict[tuple[str, str], float] = {}
    for workload in ("train", "generate"):
        for policy in POLICIES:
            busy = (subprocess.Popen([sys.executable, __file__, "--workload", "busy"], env=arm_env("default"))
                    if options.busy else None)
            started = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, "--workload", workload, "--steps", str(options.steps),
                                   "--prompts", str(options.prompts), "--max-new-tokens", str(options.max_new_tokens)],
                                  capture_output=True, text=True, cwd=ROOT, env=arm_env(policy))
            if busy:
                busy.kill()
                busy.wait()
            if done.returncode:
                sys.exit(f"{workload} under {policy} failed:\n{done.stderr[-3000:]}")
            rates[workload, policy] = json.loads(done.stdout.strip().splitlines()[-1])["tok_s"]
            print(f"{workload:8s} {policy:7s} tok/s={rates[workload, policy]:.1f} ({time.perf_counter() - started:.0f}s)", flush=True)
    figures = " ".join(f"{w}_{p}_tok_s={rates[w, p]:.1f}" for w, p in rates)
    print(f"train_speedup={rates['train', 'active'] / rates['train', 'passive']:.2f} "
          f"generate_speedup={rates['generate', 'active'] / rates['generate', 'passive']:.2f} {figures} "
          f"busy={str(options.busy).lower()}")


if __name__ == "__main__":
    main()
