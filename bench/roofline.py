"""How much of the train stage's ceiling a step could reach at most: its own matrix products, timed alone.

The train stage's manifest puts its tokens per second beside a ceiling: this machine's best
matrix-product rate over the least work a LoRA token needs (``throughput.training_passes``). This
bench retrains the first batches of a finished run with the stage itself (its records, settings,
model, dtype and batches): two steps warm up, ``--steps`` are timed, then every matrix product that
the ``--recorded`` steps after them run is recorded (``mm``, ``addmm``, ``bmm``, ``baddbmm``: shapes,
strides and dtype, attention's included) and each is timed alone, as often as those steps ran it, on
reused memory. The ceiling's seconds for those steps' tokens over these seconds is ``matmul_bound``:
the share of the ceiling the steps would reach if everything but their matrix products (norms,
activations, rotary, softmax, the optimizer) took no time.

    python bench/roofline.py --run runs/bench-biomed-quick [--steps 8] [--recorded 3]

Last line: ``share`` (steady steps' tokens/s over the ceiling), ``matmul_bound``, the step's
matrix products' rate at their own shapes against the square-product rate behind the ceiling
(``matmul_gflops``, ``peak_gflops``), the products' work over the least work (``matmul_work``), and the
run's own manifest figures (``run_share``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MATMULS = ("mm", "addmm", "bmm", "baddbmm")


def matmul_flops(name: str, shapes: tuple) -> int:
    """Floating-point operations of one product: 2 x m x k x n (per batch for bmm/baddbmm)."""
    if name in ("addmm", "baddbmm"):
        shapes = shapes[1:]  # the added term comes first
    a, b = shapes[0], shapes[1]
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def recording_mode():
    """A dispatch mode that counts each matrix product (op, shapes, strides, dtype) while entered."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Products(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            if name in MATMULS:
                tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
                shapes = tuple(tuple(t.shape) for t in tensors)
                self.seen[name, shapes, tuple(t.stride() for t in tensors), tensors[0].dtype] += 1
            return func(*args, **(kwargs or {}))

    return Products()


def replay_seconds(seen: Counter, trials: int = 5) -> float:
    """Seconds the recorded products take alone: per kind, the best of ``trials`` timings of as many
    calls as the recorded steps made, on inputs allocated once (warm in cache: the most favourable case)."""
    import torch

    total = 0.0
    for (name, shapes, strides, dtype), count in seen.items():
        inputs = [torch.empty_strided(s, st, dtype=dtype).normal_() for s, st in zip(shapes, strides)]
        op = getattr(torch, name)
        op(*inputs)
        best = float("inf")
        for _ in range(trials):
            started = time.perf_counter()
            for _ in range(count):
                op(*inputs)
            best = min(best, time.perf_counter() - started)
        total += best
    return total


def settings_of(run: Path, max_steps: int):
    """The run's settings (its config.json: profile, domain's choices, its own values), stopping at ``max_steps``."""
    from selfspec_core.config import load_settings
    from selfspec_core.plugins import manager as plugins

    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    domain = plugins.get_domain(json.loads((run / "run.json").read_text(encoding="utf-8"))["domain"])
    settings = load_settings(
        config["profile"],
        domain=domain,
        overrides={
            "dtype": config["dtype"],
            "seed": config["seed"],
            "train": {**config["train"], "max_steps": max_steps, "save_steps": max_steps + 1},
        },
    )
    return settings, domain, config["model"]


def measure(run: Path, steps: int, recorded: int, warm: int = 2) -> dict:
    """Retrain the run's first ``warm + steps + recorded`` batches with the train stage; time the
    ``steps`` after ``warm``, record the products of the ``recorded`` after them; the figures."""
    from transformers import TrainerCallback

    from selfspec_core.models.loading import resolve_dtype, resolve_model
    from selfspec_core.run.context import StageContext
    from selfspec_core.run.rundir import RunDir, read_jsonl, write_jsonl
    from selfspec_core.runtime import throughput
    from selfspec_core.stages import train as training

    timed = warm + steps  # the step after which recording starts
    last = timed + recorded
    settings, domain, model = settings_of(run, last)
    dtype = resolve_dtype(settings.dtype)
    products = recording_mode()

    class Steps(TrainerCallback):
        def __init__(self):
            self.seconds = 0.0
            self.tokens = 0
            self.recorded_tokens = 0

        def on_step_begin(self, args, state, control, **kwargs):
            self.tokens_before = state.num_input_tokens_seen
            if state.global_step == timed:
                products.__enter__()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.started
            tokens = state.num_input_tokens_seen - self.tokens_before
            if state.global_step > timed:
                self.recorded_tokens += tokens
                if state.global_step == last:
                    products.__exit__(None, None, None)
            elif state.global_step > warm:
                self.seconds += seconds
                self.tokens += tokens

    counted = Steps()
    with tempfile.TemporaryDirectory(prefix="bench-roofline-") as folder:
        scratch = RunDir(Path(folder) / "run", domain.name).open()
        write_jsonl(scratch.partial_dir("respond") / "data.jsonl", read_jsonl(run / "respond" / "data.jsonl"))
        scratch.finish("respond", {})
        ctx = StageContext(
            settings, domain, scratch, [], resolve_model(model), scratch.partial_dir("train"), log=lambda _: None
        )
        with throughput.metered() as meter:
            training.run_stage(ctx, callbacks=[counted])
    ceiling = meter.figures(dtype)["ceiling_tokens_per_second"]
    matmul_seconds = replay_seconds(products.seen)
    flops = sum(matmul_flops(name, shapes) * count for (name, shapes, _, _), count in products.seen.items())
    least_seconds = counted.recorded_tokens / ceiling
    peak = throughput.matmul_gflops(dtype)
    return {
        "share": counted.tokens / counted.seconds / ceiling,
        "matmul_bound": least_seconds / matmul_seconds,
        "tokens_per_second": counted.tokens / counted.seconds,
        "ceiling": ceiling,
        "matmul_gflops": flops / matmul_seconds / 1e9,
        "peak_gflops": peak,
        "matmul_work": flops / (least_seconds * peak * 1e9),
        "products": sum(products.seen.values()),
        "kinds": len(products.seen),
        "recorded_tokens": counted.recorded_tokens,
        "matmul_seconds": matmul_seconds,
        "least_seconds": least_seconds,
        "dtype": dtype,
    }


def main() -> None:
    from selfspec_core.runtime.openmp import choose_wait_policy

    choose_wait_policy()  # as the selfspec command does, before torch loads
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run (its respond and train stages)")
    parser.add_argument("--steps", type=int, default=8, help="steady steps to time (after two that warm up)")
    parser.add_argument("--recorded", type=int, default=3, help="steps after those whose products are recorded")
    options = parser.parse_args()
    found = measure(options.run, options.steps, options.recorded)
    manifest = json.loads((options.run / "train" / "manifest.json").read_text(encoding="utf-8"))["throughput"]
    print(
        f"recorded steps: {found['recorded_tokens']} tokens, {found['products']} products of {found['kinds']} kinds, "
        f"{found['matmul_seconds']:.2f} s alone (the ceiling's least work: {found['least_seconds']:.2f} s)"
    )
    print(
        f"share={found['share']:.3f} matmul_bound={found['matmul_bound']:.3f} "
        f"tokens_per_second={found['tokens_per_second']:.1f} ceiling={found['ceiling']:.1f} "
        f"matmul_gflops={found['matmul_gflops']:.0f} peak_gflops={found['peak_gflops']:.0f} "
        f"matmul_work={found['matmul_work']:.3f} "
        f"run_share={manifest['tokens_per_second'] / manifest['ceiling_tokens_per_second']:.3f} "
        f"dtype={found['dtype']} steps={options.steps} recorded={options.recorded}"
    )


if __name__ == "__main__":
    main()
