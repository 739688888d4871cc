"""Cost of generating through an OpenAI-compatible server instead of in-process.

The same instruction prompts (greedy) go through the ``hf`` backend in this process and through the
``openai`` backend against ``selfspec serve`` (a subprocess on 127.0.0.1, embedded SmolLM2). Rounds
alternate so both see the same machine load; each backend's best round counts.
Last line: ``hf_tok_s=<a> openai_tok_s=<b> overhead=<hf/openai>`` (target <= 1.3 on CPU).

``--gpu`` compares offline ``vllm`` with ``hf`` batched on CUDA instead (and exits 0 without a GPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfspec_core.models.generator import HFGenerator
from selfspec_core.models.loading import load_model, load_tokenizer, resolve_model
from selfspec_core.runtime.openmp import choose_wait_policy

INSTRUCTIONS = [
    "Explain what a company's operating margin tells an investor.",
    "Summarize the main risk factors of holding long-term government bonds.",
    "Classify the sentiment of this headline: 'Quarterly revenue beat analyst estimates.'",
    "Describe how a central bank rate increase affects mortgage payments.",
    "List three ratios used to judge a firm's liquidity and say what each measures.",
    "What is the difference between a stock split and a stock dividend?",
    "Explain why diversification reduces portfolio risk.",
    "Compute the percentage change from 80 to 92 and explain the steps.",
    "What are the common symptoms of type 2 diabetes?",
    "Explain how vaccines train the immune system.",
    "Summarize the purpose of a randomized controlled trial.",
    "Does regular exercise lower blood pressure? Answer yes, no or maybe, then explain.",
    "Describe the role of insulin in glucose metabolism.",
    "What is the difference between a virus and a bacterium?",
    "Explain what a p-value measures in a clinical study.",
    "List two side effects of long-term corticosteroid use.",
]
TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{}\n\n### Response:\n"
)
# Runs `selfspec serve` whether or not the CLI already registers it.
LAUNCH = (
    "import sys; from selfspec_core.cli import main as cli; from selfspec_core.serve import app as serve; "
    "cli.cli.commands.setdefault('serve', serve.command); cli.main(sys.argv[1:])"
)


def prompts(count: int) -> list[str]:
    return [TEMPLATE.format(INSTRUCTIONS[i % len(INSTRUCTIONS)]) for i in range(count)]


def timed(generator, texts: list[str], tokens: int) -> tuple[float, list]:
    start = time.perf_counter()
    completions = generator.generate(texts, max_new_tokens=tokens, temperature=0.0)
    elapsed = time.perf_counter() - start
    return sum(c.num_tokens for c in completions) / elapsed, completions


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(port: int, batch_size: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "serve", "--port", str(port), "--batch-size", str(batch_size)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"selfspec serve exited: {server.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1):
                return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("selfspec serve did not start in 300 s")


def cpu_bench(args) -> None:
    from selfspec_core.models.backends import OpenAIGenerator

    texts = prompts(args.prompts)
    ref = resolve_model(None)
    hf = HFGenerator(load_model(ref), load_tokenizer(ref), args.batch_size)
    port = free_port()
    server = start_server(port, args.batch_size)
    try:
        remote = OpenAIGenerator(f"http://127.0.0.1:{port}/v1", concurrency=args.concurrency)
        for generator in (hf, remote):  # warm-up: first calls pay one-time costs
            generator.generate(texts[:2], max_new_tokens=4)
        hf_rates, remote_rates = [], []
        for round_number in range(args.rounds):
            hf_rate, local = timed(hf, texts, args.tokens)
            remote_rate, served = timed(remote, texts, args.tokens)
            hf_rates.append(hf_rate)
            remote_rates.append(remote_rate)
            same = sum(a.text == b.text for a, b in zip(local, served))
            print(
                f"round {round_number + 1}: hf {hf_rate:.1f} tok/s, openai {remote_rate:.1f} tok/s, "
                f"same text {same}/{len(texts)}",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
    hf_best, remote_best = max(hf_rates), max(remote_rates)
    print(f"prompts={len(texts)} new_tokens={args.tokens} concurrency={args.concurrency} batch_size={args.batch_size}")
    print(f"hf_tok_s={hf_best:.2f} openai_tok_s={remote_best:.2f} overhead={hf_best / remote_best:.3f}")


def gpu_bench(args) -> None:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU here: the vllm comparison needs one (run with --gpu on a GPU machine)")
        print("gpu=unavailable")
        return
    if importlib.util.find_spec("vllm") is None:
        print("vllm is not installed: `pip install vllm` on this GPU machine")
        print("gpu=available vllm=missing")
        return
    from selfspec_core.models.backends import VLLMGenerator

    texts = prompts(args.prompts)
    ref = resolve_model(None)
    hf = HFGenerator(load_model(ref).to("cuda"), load_tokenizer(ref), len(texts))
    hf.generate(texts[:2], max_new_tokens=4)
    hf_rate, _ = timed(hf, texts, args.tokens)
    engine = VLLMGenerator(ref)
    engine.generate(texts[:2], max_new_tokens=4)
    vllm_rate, _ = timed(engine, texts, args.tokens)
    print(f"prompts={len(texts)} new_tokens={args.tokens} device={torch.cuda.get_device_name()}")
    print(f"hf_tok_s={hf_rate:.2f} vllm_tok_s={vllm_rate:.2f} speedup={vllm_rate / hf_rate:.3f}")


def main() -> None:
    choose_wait_policy()  # as the selfspec command does, before torch loads
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=None, help="prompts per round (16 on CPU, 256 with --gpu)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--batch-size", type=int, default=8, help="hf batch size, and the server's")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight from the openai backend")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each counts")
    parser.add_argument("--gpu", action="store_true", help="compare vllm with hf batched on CUDA")
    args = parser.parse_args()
    args.prompts = args.prompts or (256 if args.gpu else 16)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    (gpu_bench if args.gpu else cpu_bench)(args)


if __name__ == "__main__":
    main()
