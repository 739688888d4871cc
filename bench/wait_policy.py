"""OpenMP wait policies on this CPU: LoRA training and batched generation with the embedded model.

Torch's CPU kernels run on OpenMP threads, and what those threads do between parallel regions is the
wait policy, read once when torch loads: ``PASSIVE`` sleeps at once, ``ACTIVE`` spins for a long
time, ``default`` (nothing set) is libgomp's own (spin 300,000 rounds, then sleep) and ``spin`` is
what selfspec sets on an idle machine (``GOMP_SPINCOUNT``, ten times that). Each arm runs every
workload in a fresh process with only that setting changed:

* ``train``: LoRA steps of the train stage (default settings, packed batches) on seed records of
  both domains spread over their token lengths (``bench/train.py``'s pool);
* ``generate``: one batched ``generate`` call on stage-1 prompts (``bench/generate.py``'s), every
  completion running to ``--max-new-tokens``.

``--busy`` runs a second process beside every arm that keeps torch busy on all cores (matrix
products on OpenMP threads of its own), as on a machine shared with another job.

selfspec spins a bounded while (``GOMP_SPINCOUNT``) when the machine is idle as it starts and sleeps
(``PASSIVE``) when it is shared (selfspec_core/runtime/openmp.py); these figures are why.

    python bench/wait_policy.py [--steps 12] [--prompts 8] [--max-new-tokens 64] [--busy]

Last line: ``train_speedup=<spin/passive> generate_speedup=<spin/passive>`` (selfspec's choice
alone against its choice when shared) then each arm's tokens per second.
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
sys.path.insert(0, str(ROOT))

# torch first: libgomp reads this process's own settings (the arm's), and selfspec_core, seeing torch
# loaded, sets none of its own.
import torch  # noqa: E402

from selfspec_core.runtime.openmp import SPIN_COUNT, USER_SETTINGS  # noqa: E402

POLICIES = ("passive", "default", "spin", "active")


def train_rate(steps: int, folder: Path) -> float:
    from train import build_records, run_arm

    from selfspec_core.models.loading import load_tokenizer, resolve_model
    from selfspec_core.plugins.defaults import TRAIN_TEMPLATE
    from selfspec_core.run.rundir import write_jsonl

    data = folder / "data.jsonl"
    write_jsonl(data, build_records(96, load_tokenizer(resolve_model(None)), TRAIN_TEMPLATE))
    return run_arm("selfspec", data, steps, torch.get_num_threads())["tokens_per_s"]


def generate_rate(prompts: int, max_new_tokens: int) -> float:
    from generate import stage_prompts, timed

    from selfspec_core.config import load_settings
    from selfspec_core.models.generator import HFGenerator
    from selfspec_core.models.loading import load_model, load_tokenizer, resolve_model

    settings = load_settings("quick")
    texts, _ = stage_prompts(prompts, settings)
    ref = resolve_model(None)
    generator = HFGenerator(load_model(ref, dtype=settings.dtype), load_tokenizer(ref), batch_size=prompts)
    options = dict(
        max_new_tokens=max_new_tokens,
        temperature=settings.generate.temperature,
        top_p=settings.generate.top_p,
        stop=(),
        seed=settings.seed,
    )
    generator.generate(texts[:1], **{**options, "max_new_tokens": 4})  # warm-up, not timed
    seconds, tokens = timed(generator, [texts], options)
    return tokens / seconds


def keep_busy() -> None:
    """Matrix products on every core until killed: the other job on a shared machine."""

    a = torch.randn(1024, 1024)
    while True:
        a = torch.tanh(a @ a)


def arm_env(policy: str) -> dict:
    """This environment without any wait setting, plus ``policy``'s."""
    env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    if policy == "spin":
        return {**env, "GOMP_SPINCOUNT": SPIN_COUNT}
    return env if policy == "default" else {**env, "OMP_WAIT_POLICY": policy.upper()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--busy", action="store_true", help="run a CPU-bound torch process beside every arm")
    parser.add_argument("--workload", choices=("train", "generate", "busy"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.workload == "busy":
        keep_busy()
    if options.workload:
        with tempfile.TemporaryDirectory(prefix="bench-wait-") as folder:
            rate = (
                train_rate(options.steps, Path(folder))
                if options.workload == "train"
                else generate_rate(options.prompts, options.max_new_tokens)
            )
        print(json.dumps({"tok_s": rate}))
        return

    rates: dict[tuple[str, str], float] = {}
    for workload in ("train", "generate"):
        for policy in POLICIES:
            busy = (
                subprocess.Popen([sys.executable, __file__, "--workload", "busy"], env=arm_env("default"))
                if options.busy
                else None
            )
            started = time.perf_counter()
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--workload",
                    workload,
                    "--steps",
                    str(options.steps),
                    "--prompts",
                    str(options.prompts),
                    "--max-new-tokens",
                    str(options.max_new_tokens),
                ],
                capture_output=True,
                text=True,
                cwd=ROOT,
                env=arm_env(policy),
            )
            if busy:
                busy.kill()
                busy.wait()
            if done.returncode:
                sys.exit(f"{workload} under {policy} failed:\n{done.stderr[-3000:]}")
            rates[workload, policy] = json.loads(done.stdout.strip().splitlines()[-1])["tok_s"]
            print(
                f"{workload:8s} {policy:7s} tok/s={rates[workload, policy]:.1f} ({time.perf_counter() - started:.0f}s)",
                flush=True,
            )
    figures = " ".join(f"{w}_{p}_tok_s={rates[w, p]:.1f}" for w, p in rates)
    print(
        f"train_speedup={rates['train', 'spin'] / rates['train', 'passive']:.2f} "
        f"generate_speedup={rates['generate', 'spin'] / rates['generate', 'passive']:.2f} {figures} "
        f"busy={str(options.busy).lower()}"
    )


if __name__ == "__main__":
    main()
