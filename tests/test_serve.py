"""`selfspec serve`: the OpenAI-compatible API over the base model plus a run's adapter."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from selfspec_core.backends import OpenAIGenerator
from selfspec_core.generation import HFGenerator
from selfspec_core.models import ModelRef, load_model, load_tokenizer
from selfspec_core.serve import ServerThread, create_app

# Runs `selfspec serve` whether or not the CLI already registers the command.
LAUNCH = ("import sys; from selfspec_core import cli, serve; "
          "cli.cli.commands.setdefault('serve', serve.command); cli.main(sys.argv[1:])")
PROMPTS = ["The company reported", "Patients receiving", "Instruction: Classify", "0 1 2", "### Input:"]


def post(url, body):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def generator_for(folder, adapter=None):
    ref = ModelRef("tiny", str(folder))
    return HFGenerator(load_model(ref, adapter=adapter), load_tokenizer(ref), 8)


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a chat template, as instruct models ship."""
    folder = tmp_path_factory.mktemp("tiny-chat")
    for item in Path(tiny_model_dir).iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    tokenizer = load_tokenizer(ModelRef("tiny", str(folder)))
    tokenizer.chat_template = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}### assistant:{% endif %}")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served(chat_model_dir):
    app = create_app(generator_for(chat_model_dir), "tiny-chat")
    with ServerThread(app) as server:
        yield server, app


def test_serve_command_serves_the_adapter(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    adapter = tmp_path / "adapter"
    lora = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(load_model(ModelRef("tiny", str(tiny_model_dir))), lora).save_pretrained(adapter)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "serve.log"
    with log.open("w") as output:
        server = subprocess.Popen([sys.executable, "-c", LAUNCH, "--model", str(tiny_model_dir), "serve",
                                   "--adapter", str(adapter), "--port", str(port)],
                                  stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                with urllib.request.urlopen(url + "/models", timeout=1) as response:
                    served_names = [m["id"] for m in json.load(response)["data"]]
                break
            except OSError:
                time.sleep(0.3)
        assert served_names == [f"{Path(tiny_model_dir).name}+adapter"]
        specialized = generator_for(tiny_model_dir, adapter).generate(PROMPTS, max_new_tokens=8)
        remote = OpenAIGenerator(url, concurrency=2).generate(PROMPTS, max_new_tokens=8)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert remote == specialized
    assert specialized != generator_for(tiny_model_dir).generate(PROMPTS, max_new_tokens=8)  # the adapter matters
    assert f"serving {served_names[0]} at http://127.0.0.1:{port}/v1" in log.read_text()


def test_echo_logprobs_score_the_prompt_like_loglikelihood(served, chat_model_dir):
    server, _ = served
    status, text = post(server.url + "/completions", {"model": "tiny-chat", "prompt": "Answer: positive",
                                                      "max_tokens": 0, "echo": True, "logprobs": 2})
    assert status == 200, text
    choice = json.loads(text)["choices"][0]
    scores = choice["logprobs"]
    assert choice["text"] == "Answer: positive" and "".join(scores["tokens"]) == "Answer: positive"
    assert scores["token_logprobs"][0] is None and scores["top_logprobs"][0] is None
    assert all(len(top) == 2 for top in scores["top_logprobs"][1:])
    assert scores["text_offset"] == sorted(scores["text_offset"]) and scores["text_offset"][0] == 0
    local_sum, count = generator_for(chat_model_dir).loglikelihood([("Answer:", " positive")])[0]
    continuation = [v for t, o, v in zip(scores["tokens"], scores["text_offset"], scores["token_logprobs"]) if o + len(t) > 7]
    assert len(continuation) == count and sum(continuation) == pytest.approx(local_sum, abs=1e-4)


def test_stop_seed_and_errors(served):
    server, _ = served
    request = {"model": "tiny-chat", "prompt": PROMPTS[:3], "max_tokens": 12, "temperature": 0}
    status, text = post(server.url + "/completions", request)
    greedy = [c["text"] for c in json.loads(text)["choices"]]
    stop = greedy[0][3:5]
    status, text = post(server.url + "/completions", {**request, "stop": stop})
    cut = json.loads(text)["choices"][0]
    assert cut["text"] == greedy[0][: greedy[0].index(stop)] and cut["finish_reason"] == "stop"

    sampled = {**request, "temperature": 1.0, "seed": 5}
    first, again = (json.loads(post(server.url + "/completions", sampled)[1])["choices"] for _ in range(2))
    other = json.loads(post(server.url + "/completions", {**sampled, "seed": 6})[1])["choices"]
    assert first == again and first != other

    status, text = post(server.url + "/completions", {**request, "model": "gpt-4"})
    assert status == 404 and "serves 'tiny-chat'" in json.loads(text)["error"]["message"]
    status, text = post(server.url + "/completions", {"model": "tiny-chat", "prompt": "x", "max_tokens": -1})
    assert status == 400 and "max_tokens" in json.loads(text)["error"]["message"]


def test_concurrent_greedy_requests_share_a_batch(served, chat_model_dir):
    server, app = served
    app.state.worker.batch_sizes.clear()
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = list(pool.map(lambda p: post(server.url + "/completions", {"prompt": p, "max_tokens": 8, "temperature": 0}),
                                PROMPTS))
    assert sum(app.state.worker.batch_sizes.values()) < len(PROMPTS)  # some requests shared a batch
    texts = [json.loads(text)["choices"][0]["text"] for _, text in replies]
    assert texts == [c.text for c in generator_for(chat_model_dir).generate(PROMPTS, max_new_tokens=8)]


def test_chat_completions_use_the_chat_template(served, chat_model_dir, tiny_model_dir):
    from openai import OpenAI

    server, _ = served
    client = OpenAI(base_url=server.url, api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "Classify: revenue rose."}]
    reply = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=6, temperature=0)
    local = generator_for(chat_model_dir)
    prompt = local.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("### user: Classify")
    assert reply.choices[0].message.content == local.generate([prompt], max_new_tokens=6)[0].text
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content

    with ServerThread(create_app(generator_for(tiny_model_dir), "plain")) as plain:
        status, text = post(plain.url + "/chat/completions", {"model": "plain", "messages": messages})
    assert status == 400 and "no chat template; use /v1/completions" in json.loads(text)["error"]["message"]
