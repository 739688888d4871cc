"""Load test of ``selfspec serve``: many concurrent clients against 127.0.0.1, on the tiny test model.

``--clients`` threads send ``--requests`` requests in all to a server started in this process with an
API key and its default limits: greedy and sampled completions, completions with logprobs, chat
(half of it streamed), and one request in eight deliberately wrong (a wrong key, max_tokens over the
limit, a prompt longer than the context, a malformed body), which must get a 4xx. Every request must
get an answer (none lost), none a 5xx, and the server must still answer afterwards. ``ttft_ms`` is
the median time to the first content chunk of the streamed requests under load; then one streamed
request of 64 tokens on the idle server gives ``time_to_first_chunk_ms`` against its ``stream_total_ms``
(streaming works when the first is well under half the second).
Last line: ``errors_5xx=<n> lost=<n> ttft_ms=<ms> p50_ms=<ms> p99_ms=<ms> time_to_first_chunk_ms=<ms>
stream_total_ms=<ms> requests=<n> ok=<n> errors_4xx=<n> wrong_status=<n> answers_after=<0|1>``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfspec_core.models.generator import HFGenerator
from selfspec_core.models.loading import ModelRef, load_model, load_tokenizer
from selfspec_core.runtime.openmp import choose_wait_policy
from selfspec_core.serve.app import ServeLimits, ServerThread, create_app
from selfspec_core.testing import build_tiny_model

API_KEY = "load-test-key"
PROMPTS = ["The company reported", "Patients receiving", "Instruction: Classify", "0 1 2", "### Input:"]
CHAT_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:{% endif %}"
)


def request_for(number: int, limits: ServeLimits) -> tuple[str, bytes, str, bool]:
    """(path, body, key, expected to fail) of request ``number``: a fixed mix, one in eight wrong."""
    prompt = PROMPTS[number % len(PROMPTS)]
    kind = number % 16
    if kind == 3:
        return "/completions", json.dumps({"prompt": prompt, "max_tokens": 4}).encode(), "wrong-key", True
    if kind == 7:
        return (
            "/completions",
            json.dumps({"prompt": prompt, "max_tokens": limits.max_tokens + 1}).encode(),
            API_KEY,
            True,
        )
    if kind == 11:
        return "/completions", json.dumps({"prompt": "word " * 3000, "max_tokens": 4}).encode(), API_KEY, True
    if kind == 15:
        return "/chat/completions", b'{"messages": [{"role": "user", "content": ', API_KEY, True
    if kind % 4 == 1:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0}
        return "/chat/completions", json.dumps({**body, "stream": kind % 8 == 5}).encode(), API_KEY, False
    if kind % 4 == 2:
        body = {"prompt": [prompt, PROMPTS[0]], "max_tokens": 8, "temperature": 0.8, "seed": number}
        return "/completions", json.dumps(body).encode(), API_KEY, False
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 2 if kind == 0 else None}
    return "/completions", json.dumps(body).encode(), API_KEY, False


def send(url: str, path: str, body: bytes | None, key: str, timeout: float) -> tuple[int, float, float | None]:
    """HTTP status (0: no answer), latency in ms and, for a stream, ms to its first content chunk."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    request = urllib.request.Request(url + path, body, headers)
    started = time.perf_counter()
    first = None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            for line in response:  # a stream's events as they come; a JSON body in one go
                if first is None and line.startswith(b"data: {") and _has_content(line[6:]):
                    first = (time.perf_counter() - started) * 1000
            status = response.status
    except urllib.error.HTTPError as error:
        error.read()
        status = error.code
    except OSError:
        status = 0
    return status, (time.perf_counter() - started) * 1000, first


def _has_content(event: bytes) -> bool:
    choices = json.loads(event).get("choices") or [{}]
    return bool(choices[0].get("text") or choices[0].get("delta", {}).get("content"))


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def run_load(url: str, limits: ServeLimits, requests: int, clients: int, timeout: float = 120.0) -> dict:
    """Send the mix with ``clients`` concurrent threads; counts and latencies of the answers."""

    def one(number: int):
        path, body, key, wrong = request_for(number, limits)
        return *send(url, path, body, key, timeout), wrong

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    statuses = Counter(status for status, _, _, _ in results)
    latencies = [ms for status, ms, _, _ in results if status]
    firsts = [first for _, _, first, _ in results if first is not None]
    unexpected = [(status, wrong) for status, _, _, wrong in results if (status == 200) == wrong]
    after, _, _ = send(url, "/models", None, API_KEY, timeout)
    probe = json.dumps({"prompt": PROMPTS[0], "max_tokens": 64, "temperature": 0, "stream": True}).encode()
    _, stream_total, first_chunk = send(url, "/completions", probe, API_KEY, timeout)
    return {
        "errors_5xx": sum(n for s, n in statuses.items() if s >= 500),
        "lost": statuses[0],
        "ttft_ms": round(percentile(firsts, 0.50), 1),
        "p50_ms": round(percentile(latencies, 0.50), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "time_to_first_chunk_ms": round(first_chunk or 0.0, 1),
        "stream_total_ms": round(stream_total, 1),
        "requests": requests,
        "ok": statuses[200],
        "errors_4xx": sum(n for s, n in statuses.items() if 400 <= s < 500),
        "wrong_status": len(unexpected),
        "answers_after": int(after == 200),
    }


def serve_tiny(folder: Path, limits: ServeLimits, batch_size: int = 8) -> ServerThread:
    build_tiny_model(folder)
    ref = ModelRef("tiny", str(folder))
    tokenizer = load_tokenizer(ref)
    tokenizer.chat_template = CHAT_TEMPLATE
    generator = HFGenerator(load_model(ref), tokenizer, batch_size)
    return ServerThread(create_app(generator, "tiny", max_batch=batch_size, limits=limits))


def main() -> None:
    choose_wait_policy()  # as the selfspec command does, before torch loads
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=512, help="requests in all")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    limits = ServeLimits(api_key=API_KEY, max_tokens=64)
    with tempfile.TemporaryDirectory() as folder, serve_tiny(Path(folder), limits) as server:
        started = time.perf_counter()
        figures = run_load(server.url, limits, args.requests, args.clients)
        seconds = time.perf_counter() - started
    print(
        f"clients={args.clients} seconds={seconds:.1f} "
        "(wrong_status: answers whose success or failure was not the expected one)"
    )
    print(" ".join(f"{key}={value}" for key, value in figures.items()))


if __name__ == "__main__":
    main()
