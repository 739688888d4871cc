"""The openai and vllm backends: parity with HFGenerator through `selfspec serve`, retries, limits."""

import json
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from selfspec_core.config import load_settings
from selfspec_core.errors import SelfspecError
from selfspec_core.models.backends import OpenAIGenerator, make_generator
from selfspec_core.models.generator import HFGenerator
from selfspec_core.models.loading import ModelRef, load_model, load_tokenizer
from selfspec_core.serve.app import ServerThread, create_app

PROMPTS = [
    "The company reported",
    "Patients receiving the treatment",
    "Instruction: Classify the sentiment",
    "0 1 2 3",
    "### Instruction:",
    "Below is an instruction that describes a task.",
]
PAIRS = [
    ("The company reported", " higher quarterly revenue"),
    ("Answer:", " neutral"),
    ("Instruction: Classify the sentiment as positive, negative, or neutral. Answer:", " positive"),
    ("Patients receiving the treatment showed", " lower mortality than controls."),
]


def tiny_generator(tiny_model_dir, batch_size=8):
    ref = ModelRef("tiny", str(tiny_model_dir))
    return HFGenerator(load_model(ref), load_tokenizer(ref), batch_size)


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    """`selfspec serve`'s app for the tiny model on a free loopback port."""
    with ServerThread(create_app(tiny_generator(tiny_model_dir), "tiny")) as server:
        yield server


def openai_settings(url, **options):
    settings = load_settings("tiny", overrides={"backend": "openai"})
    return replace(settings, openai=replace(settings.openai, base_url=url, **options))


def test_openai_backend_through_selfspec_serve_equals_hf(served, tiny_model_dir):
    local = tiny_generator(tiny_model_dir)
    remote = make_generator(openai_settings(served.url, concurrency=3), ModelRef("tiny", str(tiny_model_dir)))
    assert isinstance(remote, OpenAIGenerator) and remote.model == "tiny"  # the one model the server lists
    for stop in ((), ("e",)):
        assert remote.generate(PROMPTS, max_new_tokens=10, stop=stop) == local.generate(
            PROMPTS, max_new_tokens=10, stop=stop
        )
    for (remote_sum, remote_count), (local_sum, local_count) in zip(
        remote.loglikelihood(PAIRS), local.loglikelihood(PAIRS)
    ):
        assert remote_count == local_count
        assert remote_sum == pytest.approx(local_sum, abs=1e-4)


class FakeEndpoint:
    """A tiny local stand-in for a remote server: ``reply(request_number, body)`` gives status and JSON."""

    def __init__(self, reply, hold=0.0):
        self.reply, self.hold = reply, hold
        self.requests, self.times, self.headers = [], [], []
        self.in_flight = self.max_in_flight = 0
        lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    number = len(endpoint.requests)
                    endpoint.requests.append(body)
                    endpoint.times.append(time.monotonic())
                    endpoint.headers.append({k.lower(): v for k, v in self.headers.items()})
                    endpoint.in_flight += 1
                    endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint.in_flight)
                time.sleep(endpoint.hold)
                status, payload = endpoint.reply(number, body)
                with lock:
                    endpoint.in_flight -= 1
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def completion(text, logprobs=None):
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": logprobs}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }


def failure(status):
    return status, {"error": {"message": f"busy ({status})", "type": "server_error"}}


def test_retries_with_exponential_backoff_on_429_and_503():
    endpoint = FakeEndpoint(lambda n, body: [failure(429), failure(503)][n] if n < 2 else (200, completion("ok")))
    try:
        result = OpenAIGenerator(endpoint.url, model="m", max_retries=3).generate(["hi"], max_new_tokens=5)
    finally:
        endpoint.close()
    assert [c.text for c in result] == ["ok"] and len(endpoint.requests) == 3
    first_wait, second_wait = (b - a for a, b in zip(endpoint.times, endpoint.times[1:]))
    assert first_wait >= 0.3 and second_wait > 1.2 * first_wait  # 0.5 s then 1 s, less up to 25% jitter


def test_gives_up_with_a_clear_message():
    endpoint = FakeEndpoint(lambda n, body: failure(503))
    try:
        with pytest.raises(SelfspecError, match="HTTP 503 after 1 retries: busy"):
            OpenAIGenerator(endpoint.url, model="m", max_retries=1).generate(["hi"], max_new_tokens=5)
    finally:
        endpoint.close()
    assert len(endpoint.requests) == 2
    with pytest.raises(SelfspecError, match="cannot reach .* after 0 retries"):
        OpenAIGenerator(endpoint.url, model="m", max_retries=0).generate(["hi"], max_new_tokens=5)


def test_concurrency_limit_is_respected_and_order_kept():
    endpoint = FakeEndpoint(lambda n, body: (200, completion(body["prompt"].upper())), hold=0.1)
    try:
        prompts = [f"prompt {i}" for i in range(10)]
        result = OpenAIGenerator(endpoint.url, model="m", concurrency=3).generate(prompts, max_new_tokens=5, seed=1)
    finally:
        endpoint.close()
    assert [c.text for c in result] == [p.upper() for p in prompts]
    assert endpoint.max_in_flight == 3
    assert len({body["seed"] for body in endpoint.requests}) == 10  # one seed per prompt


def test_loglikelihood_needs_a_server_that_echoes_logprobs():
    endpoint = FakeEndpoint(lambda n, body: (200, completion("")))
    try:
        with pytest.raises(SelfspecError, match="cannot score"):
            OpenAIGenerator(endpoint.url, model="m").loglikelihood([("Answer:", " yes")])
    finally:
        endpoint.close()
    assert endpoint.requests[0] | {"prompt": None} == {
        "model": "m",
        "prompt": None,
        "max_tokens": 0,
        "echo": True,
        "logprobs": 1,
        "temperature": 0.0,
    }
    endpoint = FakeEndpoint(lambda n, body: (400, {"error": {"message": "echo is not supported", "type": "invalid"}}))
    try:
        with pytest.raises(
            SelfspecError, match="rejected the request: echo is not supported; this server cannot score"
        ):
            OpenAIGenerator(endpoint.url, model="m").loglikelihood([("Answer:", " yes")])
    finally:
        endpoint.close()


def test_settings_come_from_config_or_environment(monkeypatch, tmp_path):
    endpoint = FakeEndpoint(lambda n, body: (200, completion("fine")))
    try:
        monkeypatch.setenv("OPENAI_BASE_URL", endpoint.url)  # no /v1: added
        monkeypatch.setenv("SELFSPEC_OPENAI_MODEL", "served-model")
        monkeypatch.setenv("MY_KEY", "secret")
        config = tmp_path / "config.toml"
        config.write_text('backend = "openai"\n[openai]\napi_key_env = "MY_KEY"\nconcurrency = 2\n')
        generator = make_generator(load_settings("tiny", config), ModelRef("unused", "unused"))
        assert [c.text for c in generator.generate(["q"], max_new_tokens=3)] == ["fine"]
    finally:
        endpoint.close()
    assert generator.base_url == endpoint.url + "/v1" and generator.concurrency == 2
    assert endpoint.requests[0]["model"] == "served-model"
    assert endpoint.headers[0]["authorization"] == "Bearer secret"
    monkeypatch.delenv("OPENAI_BASE_URL")
    with pytest.raises(SelfspecError, match="OPENAI_BASE_URL"):
        make_generator(load_settings("tiny", overrides={"backend": "openai"}), ModelRef("unused", "unused"))
    with pytest.raises(SelfspecError, match="executor: expected one of local, ray"):
        load_settings("tiny", overrides={"executor": "dask"})
    with pytest.raises(SelfspecError, match="concurrency: must be between 1"):
        load_settings("tiny", overrides={"openai": {"concurrency": 0}})


def test_openai_backend_refuses_an_adapter_it_cannot_apply():
    settings = openai_settings("http://127.0.0.1:9/v1", model="m")
    with pytest.raises(SelfspecError, match="selfspec serve --adapter"):
        make_generator(settings, ModelRef("m", "m"), adapter="runs/x/train/adapter")


def test_vllm_missing_says_how_to_install(monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as on a machine without vllm, whatever this one has
    settings = load_settings("tiny", overrides={"backend": "vllm"})
    with pytest.raises(SelfspecError, match="install vllm on a GPU machine"):
        make_generator(settings, ModelRef("tiny", str(tiny_model_dir)))
