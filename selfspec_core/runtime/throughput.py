"""How fast a stage ran its model, beside what this machine could do at most.

Every in-process model call (generation and scoring) adds the tokens it ran and the seconds it took
to the meters open around it; the pipeline opens one per stage and writes the figures into the
stage's manifest, and the report shows them. The ceiling is this machine's measured matrix-product
rate divided by the model's floating-point operations per token (two per parameter, attention
aside): no implementation can pass it, so the ratio says how much is left to win.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

from selfspec_core.runtime.cache import cache_dir


@dataclass
class TokenMeter:
    """Tokens the model read (prompts, scored contexts) and wrote, and the seconds spent on them."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    parameters: int = 0  # of the largest model that ran
    device: str = "cpu"
    passes: float = 0.0  # forward-pass equivalents per token (the most recorded): training's is training_passes()

    def figures(self, dtype: str) -> dict:
        """Manifest figures, the ceiling divided by the work each token took (``passes``)."""
        tokens = self.prompt_tokens + self.generated_tokens
        figures = {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "model_seconds": round(self.seconds, 2),
        }
        if tokens and self.seconds > 0:
            figures["tokens_per_second"] = round(tokens / self.seconds, 1)
        if self.parameters:
            ceiling = ceiling_tokens_per_second(self.parameters, dtype, self.device)
            figures["ceiling_tokens_per_second"] = round(ceiling / (self.passes or 1.0), 1)
        return figures


_open_meters: list[TokenMeter] = []


@contextmanager
def metered() -> Iterator[TokenMeter]:
    """Count every model call made inside the block."""
    meter = TokenMeter()
    _open_meters.append(meter)
    try:
        yield meter
    finally:
        _open_meters.remove(meter)


def record(
    prompt_tokens: int, generated_tokens: int, seconds: float, parameters: int, device: str = "cpu", passes: float = 1.0
) -> None:
    """Add one model call (``passes`` forward-pass equivalents per token) to every open meter."""
    for meter in _open_meters:
        meter.prompt_tokens += prompt_tokens
        meter.generated_tokens += generated_tokens
        meter.seconds += seconds
        meter.parameters = max(meter.parameters, parameters)
        meter.device = device
        meter.passes = max(meter.passes, passes)


@contextmanager
def timed_call(model, prompt_tokens: int) -> Iterator[list[int]]:
    """Time a model call; the caller appends the tokens it generated to the yielded list."""
    generated: list[int] = []
    started = time.perf_counter()
    yield generated
    record_model(model, prompt_tokens, sum(generated), time.perf_counter() - started)


def training_passes(model, adapted_share: float = 1.0, kept_share: float = 1.0) -> float:
    """Forward-pass equivalents (two FLOPs per parameter) of the least work a LoRA training token needs.

    Forward: the blocks, the adapters, and the output layer at the share of positions whose logit is
    kept (``kept_share``: those that predict a response token). Backward, down to the lowest adapted
    block (``adapted_share`` of them): input gradients through the frozen weights (they get no weight
    gradient), input and weight gradients for the adapters, and the output layer again at the kept
    positions. Attention aside, as in the ceiling; recomputed activations (checkpointing) are work
    an implementation chooses, so not counted. ``torch.utils.flop_counter`` counts the same within 1%
    on SmolLM2-135M.
    """
    output = model.get_output_embeddings().weight
    embedding = model.get_input_embeddings().weight
    parameters = list(model.parameters())
    total = sum(map(parameter_elements, parameters))
    adapters = sum(parameter_elements(p) for p in parameters if p.requires_grad)
    head = parameter_elements(output)
    blocks = total - adapters - head - (0 if embedding is output else parameter_elements(embedding))
    flops = 2 * blocks * (1 + adapted_share) + 6 * adapters + 4 * head * kept_share
    return flops / (2 * total)


def parameter_elements(parameter) -> int:
    """The values a parameter holds: a 4-bit quantized one (bitsandbytes) packs two in a byte, so its
    own ``numel`` counts half of them."""
    shape = getattr(getattr(parameter, "quant_state", None), "shape", None)
    return math.prod(shape) if shape is not None else parameter.numel()


def record_model(model, prompt_tokens: int, generated_tokens: int, seconds: float, passes: float = 1.0) -> None:
    """:func:`record` with the parameter count and device read off ``model``."""
    parameters = list(model.parameters())
    record(
        prompt_tokens,
        generated_tokens,
        seconds,
        sum(map(parameter_elements, parameters)),
        parameters[0].device.type if parameters else "cpu",
        passes,
    )


RATES_FILE = "matmul_rates.json"  # in the cache folder: the best rate measured per machine, threads and dtype


@cache
def matmul_gflops(dtype: str = "float32", device: str = "cpu") -> float:
    """This machine's dense matrix-product rate in ``dtype`` on ``device`` (GFLOP/s): the best ever
    measured here with as many threads, kept in the cache folder, or now if that is faster.

    Another job on the machine can only slow a timing down, so the fastest is the closest to what the
    hardware does. A timing taken inside a run on a busy machine read 85-206 GFLOP/s in bfloat16 where
    the idle machine does ~410 (2-core AVX512-BF16 EPYC), which put the training ceiling below what
    training then reached.
    """
    key = _machine_key(dtype, device)
    path = cache_dir() / RATES_FILE
    try:
        rates = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        rates = {}
    rates = rates if isinstance(rates, dict) else {}
    measured = measure_matmul_gflops(dtype, device)
    recorded = rates.get(key)
    if isinstance(recorded, (int, float)) and recorded >= measured:
        return float(recorded)
    rates[key] = round(measured, 1)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(rates, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(staging, path)
    except OSError:  # a read-only cache costs the memory of the best rate, nothing else
        pass
    return measured


def measure_matmul_gflops(dtype: str = "float32", device: str = "cpu", size: int = 1024, trials: int = 5) -> float:
    """The best of ``trials`` timings of 0.1 s of ``size``-square products in ``dtype`` (GFLOP/s)."""
    import torch

    a, b = (torch.randn(size, size, device=device).to(getattr(torch, dtype)) for _ in range(2))
    a @ b  # warm-up
    best = 0.0
    for _ in range(trials):
        runs, started = 0, time.perf_counter()
        while runs < 2 or time.perf_counter() - started < 0.1:
            a @ b
            runs += 1
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 * runs / (time.perf_counter() - started) / 1e9)
    return best


def _machine_key(dtype: str, device: str) -> str:
    """What a rate holds for: the processor (or GPU), torch's thread count, torch's version and dtype."""
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
        except OSError:
            name = ""
        name = name or platform.processor() or platform.machine()
    return f"{device} {name}, {torch.get_num_threads()} threads, torch {torch.__version__}, {dtype}"


def ceiling_tokens_per_second(parameters: int, dtype: str = "float32", device: str = "cpu") -> float:
    """Tokens per second a model of ``parameters`` could run here at the measured matrix-product rate."""
    return matmul_gflops(dtype, device) * 1e9 / (2 * parameters)
