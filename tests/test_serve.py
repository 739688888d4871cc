"""`selfspec serve`: the OpenAI-compatible API over the base model plus a run's adapter."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from selfspec_core.models.backends import OpenAIGenerator
from selfspec_core.models.generator import HFGenerator
from selfspec_core.models.loading import ModelRef, load_model, load_tokenizer
from selfspec_core.serve.app import ServeLimits, ServerThread, create_app

# Runs `selfspec serve` whether or not the CLI already registers the command.
LAUNCH = (
    "import sys; from selfspec_core.cli import main as cli; from selfspec_core.serve import app as serve; "
    "cli.cli.commands.setdefault('serve', serve.command); cli.main(sys.argv[1:])"
)
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
    tokenizer.chat_template = (
        "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}### assistant:{% endif %}"
    )
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
        # float32 as the local generator compared with below (auto is bfloat16 on a CPU with AVX512-BF16)
        server = subprocess.Popen(
            [
                sys.executable,
                "-c",
                LAUNCH,
                "--model",
                str(tiny_model_dir),
                "--dtype",
                "float32",
                "serve",
                "--adapter",
                str(adapter),
                "--port",
                str(port),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
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
    status, text = post(
        server.url + "/completions",
        {"model": "tiny-chat", "prompt": "Answer: positive", "max_tokens": 0, "echo": True, "logprobs": 2},
    )
    assert status == 200, text
    choice = json.loads(text)["choices"][0]
    scores = choice["logprobs"]
    assert choice["text"] == "Answer: positive" and "".join(scores["tokens"]) == "Answer: positive"
    assert scores["token_logprobs"][0] is None and scores["top_logprobs"][0] is None
    assert all(len(top) == 2 for top in scores["top_logprobs"][1:])
    assert scores["text_offset"] == sorted(scores["text_offset"]) and scores["text_offset"][0] == 0
    local_sum, count = generator_for(chat_model_dir).loglikelihood([("Answer:", " positive")])[0]
    continuation = [
        v for t, o, v in zip(scores["tokens"], scores["text_offset"], scores["token_logprobs"]) if o + len(t) > 7
    ]
    assert len(continuation) == count and sum(continuation) == pytest.approx(local_sum, abs=1e-4)


def test_stop_seed_and_errors(served, chat_model_dir):
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
    # the seed fixes the text as a local seeded call does, batched or not
    local = generator_for(chat_model_dir).generate([PROMPTS[0]], max_new_tokens=12, temperature=1.0, seed=5)
    assert first[0]["text"] == local[0].text

    status, text = post(server.url + "/completions", {**request, "model": "gpt-4"})
    assert status == 404 and "serves 'tiny-chat'" in json.loads(text)["error"]["message"]
    status, text = post(server.url + "/completions", {"model": "tiny-chat", "prompt": "x", "max_tokens": -1})
    assert status == 400 and "max_tokens" in json.loads(text)["error"]["message"]


def test_concurrent_greedy_requests_share_a_batch(slow_served, chat_model_dir):
    server, app, _ = slow_served  # 20 ms a forward pass: the requests overlap however loaded the machine
    app.state.engine.step_sizes.clear()
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = list(
            pool.map(
                lambda p: post(server.url + "/completions", {"prompt": p, "max_tokens": 8, "temperature": 0}), PROMPTS
            )
        )
    assert max(app.state.engine.step_sizes) > 1  # requests shared decoding steps
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
    chunks = list(
        client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=6, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content

    with ServerThread(create_app(generator_for(tiny_model_dir), "plain")) as plain:
        status, text = post(plain.url + "/chat/completions", {"model": "plain", "messages": messages})
    assert status == 400 and "no chat template; use /v1/completions" in json.loads(text)["error"]["message"]


def test_chat_speaks_the_form_the_adapter_learnt(tiny_model_dir, tmp_path):
    """An adapter tuned in the Alpaca form is asked in it by chat clients too, even on a base with no chat template."""
    from dataclasses import asdict

    from openai import BadRequestError, OpenAI
    from peft import LoraConfig, get_peft_model

    from selfspec_core.plugins.defaults import TRAIN_TEMPLATE
    from selfspec_core.run.adapter import TRAINING_INFO, adapter_prompts

    adapter = tmp_path / "adapter"
    lora = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(load_model(ModelRef("tiny", str(tiny_model_dir))), lora).save_pretrained(adapter)
    info = {"prompt_format": "alpaca", "prompt_template": asdict(TRAIN_TEMPLATE)}
    (adapter / TRAINING_INFO).write_text(json.dumps(info))
    local = generator_for(tiny_model_dir, adapter)
    app = create_app(local, "alpaca-tuned", chat_prompts=adapter_prompts(adapter, local.tokenizer))
    with ServerThread(app) as server:
        client = OpenAI(base_url=server.url, api_key="none", max_retries=0)
        messages = [{"role": "user", "content": "Classify: revenue rose."}]
        reply = client.chat.completions.create(model="alpaca-tuned", messages=messages, max_tokens=6, temperature=0)
        with pytest.raises(BadRequestError, match="end the messages with a user message"):
            client.chat.completions.create(
                model="alpaca-tuned", messages=[*messages, {"role": "assistant", "content": "yes"}], max_tokens=2
            )
    prompt = TRAIN_TEMPLATE.render([], {"instruction": "Classify: revenue rose.", "input": ""})
    assert prompt.endswith("### Instruction:\nClassify: revenue rose.\n\n### Response:\n")
    assert reply.choices[0].message.content == local.generate([prompt], max_new_tokens=6)[0].text


def sse_events(text: str) -> list:
    """The JSON payloads of a server-sent event stream; ``[DONE]`` must end it."""
    payloads = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]", payloads[-3:]
    return [json.loads(payload) for payload in payloads[:-1]]


@pytest.fixture(scope="module")
def slow_served(chat_model_dir):
    """A live server whose model takes 20 ms per forward pass, so decoding visibly takes time."""
    generator = generator_for(chat_model_dir)
    gate = Gate(generator.model, delay=0.02, opened=True)
    app = create_app(generator, "tiny-chat", limits=ServeLimits(max_tokens=2000))
    with ServerThread(app) as server:
        yield server, app, gate


def test_chat_streams_token_by_token_with_the_openai_sdk(slow_served):
    from openai import OpenAI

    server, _, gate = slow_served
    client = OpenAI(base_url=server.url, api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "Classify: revenue rose."}]
    options = dict(model="tiny-chat", messages=messages, max_tokens=24, temperature=0)
    reply = client.chat.completions.create(**options)
    arrivals, chunks = [], []
    for chunk in client.chat.completions.create(**options, stream=True):
        arrivals.append(time.monotonic())
        chunks.append(chunk)
    last_pass = gate.times[-1]  # the forward pass that gave the last token's logits
    content = [(at, c) for at, c in zip(arrivals, chunks) if c.choices and c.choices[0].delta.content]
    assert len(content) >= 3 and content[0][0] < last_pass  # text arrives while the model still decodes
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1]) and all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content

    with_usage = list(
        client.chat.completions.create(**options, stream=True, stream_options={"include_usage": True}, n=2)
    )
    assert with_usage[-1].choices == [] and with_usage[-1].usage.model_dump() == {
        **reply.usage.model_dump(),
        "completion_tokens": 2 * reply.usage.completion_tokens,
        "total_tokens": reply.usage.prompt_tokens + 2 * reply.usage.completion_tokens,
    }
    assert all(c.usage is None for c in with_usage[:-1])
    assert sorted(c.choices[0].index for c in with_usage if c.choices and c.choices[0].delta.role) == [0, 1]


def test_completions_stream_each_row_as_it_decodes(served, chat_model_dir):
    server, _ = served
    request = {"model": "tiny-chat", "prompt": PROMPTS[:3], "max_tokens": 10, "temperature": 0}
    whole = json.loads(post(server.url + "/completions", {**request, "logprobs": 1})[1])
    status, text = post(server.url + "/completions", {**request, "stream": True, "logprobs": 1})
    events = sse_events(text)
    assert status == 200 and all("usage" not in event for event in events)
    for choice in whole["choices"]:
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [c["finish_reason"] for c in mine][-1] == choice["finish_reason"]
        tokens = [t for c in mine if c["logprobs"] for t in c["logprobs"]["tokens"]]
        assert tokens == choice["logprobs"]["tokens"]  # every generated token streamed, once
    order = [e["choices"][0]["index"] for e in events if e["choices"][0]["text"]]
    assert order != sorted(order)  # the rows' chunks interleave: one batch, streamed per row
    status, text = post(
        server.url + "/completions", {**request, "stream": True, "stream_options": {"include_usage": True}}
    )
    events = sse_events(text)
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]
    assert all(event["usage"] is None for event in events[:-1])


def test_a_stream_with_more_choices_than_the_batch_has_rows_sends_every_choice(served):
    """n=12 on a batch of 8 rows: the first rows decode (and finish) while the rest wait for admission;
    their text and finish_reason still reach the stream."""
    server, _ = served
    chat = {"messages": [{"role": "user", "content": "Classify: revenue rose."}], "max_tokens": 6}
    for path, request in (
        ("/completions", {"prompt": "The company reported", "max_tokens": 6}),
        ("/chat/completions", chat),
    ):
        request = {**request, "model": "tiny-chat", "n": 12, "temperature": 0.9, "seed": 3}
        status, text = post(server.url + path, request)
        assert status == 200, text
        whole = json.loads(text)["choices"]
        status, text = post(server.url + path, {**request, "stream": True})
        events = [e["choices"][0] for e in sse_events(text) if e["choices"]]
        streamed = []
        for index in range(12):
            mine = [c for c in events if c["index"] == index]
            text_of = "".join(c["text"] if "text" in c else c["delta"].get("content") or "" for c in mine)
            streamed.append((text_of, mine[-1]["finish_reason"]))
        expected = [(c.get("text", c.get("message", {}).get("content")), c["finish_reason"]) for c in whole]
        assert streamed == expected and len(set(streamed)) > 1, path


def completion(url, body) -> dict:
    status, text = post(url + "/completions", body)
    assert status == 200, text
    return json.loads(text)["choices"][0]


def test_penalties_and_logit_bias_change_the_output(served, chat_model_dir):
    server, _ = served
    tokenizer = load_tokenizer(ModelRef("tiny", str(chat_model_dir)))
    base = {"model": "tiny-chat", "prompt": "The company reported", "max_tokens": 12, "temperature": 0}
    greedy = completion(server.url, base)["text"]
    assert len(set(tokenizer(greedy, add_special_tokens=False).input_ids)) < 12  # greedy repeats itself here
    for penalty in ("presence_penalty", "frequency_penalty"):
        assert completion(server.url, {**base, penalty: 2.0})["text"] != greedy, penalty
    positive = tokenizer(" positive", add_special_tokens=False).input_ids[-1]
    favoured = completion(server.url, {**base, "logit_bias": {str(positive): 100}})["text"]
    assert favoured == tokenizer.decode([positive] * 12)
    first = tokenizer(greedy, add_special_tokens=False).input_ids[0]
    banned = completion(server.url, {**base, "logit_bias": {str(first): -100}})["text"]
    assert tokenizer(banned, add_special_tokens=False).input_ids[0] != first


def test_logprobs_of_generated_tokens(served):
    from openai import OpenAI

    server, _ = served
    scored = completion(server.url, {"prompt": "The company", "max_tokens": 6, "temperature": 0, "logprobs": 2})
    logprobs = scored["logprobs"]
    assert len(logprobs["tokens"]) == 6 and all(len(top) == 2 for top in logprobs["top_logprobs"])
    assert all(lp == max(top.values()) for lp, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"]))
    client = OpenAI(base_url=server.url, api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "Classify: revenue rose."}]
    options = dict(model="tiny-chat", messages=messages, max_tokens=6, temperature=0)
    assert client.chat.completions.create(**options).choices[0].logprobs is None
    reply = client.chat.completions.create(**options, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob == t.top_logprobs[0].logprob and t.logprob < 0 for t in content)  # greedy: the likeliest
    assert all(bytes(t.bytes).decode() == t.token for t in content)


def test_response_format_constrains_the_answer_to_json(served):
    from openai import OpenAI

    server, _ = served
    client = OpenAI(base_url=server.url, api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "Is revenue up? Answer in JSON."}]
    options = dict(model="tiny-chat", messages=messages, max_tokens=40, temperature=0)
    free = client.chat.completions.create(**options).choices[0].message.content
    with pytest.raises(ValueError):
        json.loads(free)
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no", "maybe"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    reply = client.chat.completions.create(**options, response_format=response_format).choices[0]
    assert reply.finish_reason == "stop" and json.loads(reply.message.content)["answer"] in ("yes", "no", "maybe")
    anything = client.chat.completions.create(**options, response_format={"type": "json_object"}).choices[0]
    assert anything.message.content.lstrip().startswith("{") and anything.message.content != free


def test_parameters_not_implemented_are_refused_by_name(served):
    server, _ = served
    chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        ("/chat/completions", {**chat, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("/chat/completions", {**chat, "tool_choice": "auto"}, "tool_choice"),
        ("/chat/completions", {**chat, "reasoning_effort": "low"}, "reasoning_effort"),
        ("/chat/completions", {**chat, "top_logprobs": 2}, "top_logprobs"),
        ("/chat/completions", {**chat, "response_format": {"type": "json_schema"}}, "json_schema"),
        (
            "/chat/completions",
            {**chat, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "x"}}}},
            "cannot be enforced",
        ),
        ("/chat/completions", {**chat, "stream_options": {"include_usage": True}}, "stream_options"),
        ("/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
        ("/completions", {"prompt": "x", "best_of": 2}, "best_of"),
        ("/completions", {"prompt": "x", "logit_bias": {"the": 5}}, "logit_bias"),
        ("/completions", {"prompt": "x", "logit_bias": {"99999": 5}}, "logit_bias"),
    ]
    for path, body, name in cases:
        status, error = error_of(call(server.url + path, body, key=None))
        assert status == 400 and name in error["message"], (name, error)
    # what the OpenAI SDK and llm send by default is accepted
    llm_default = {**chat, "stream": True, "stream_options": {"include_usage": True}, "user": "someone"}
    assert post(server.url + "/chat/completions", llm_default)[0] == 200


def test_model_retrieval_context_length_and_health(chat_model_dir):
    from openai import NotFoundError, OpenAI

    _, server = gated_server(chat_model_dir, opened=True)
    with server:
        client = OpenAI(base_url=server.url, api_key=KEY, max_retries=0)
        assert client.models.retrieve("tiny").id == "tiny"
        assert client.models.list().data[0].model_extra["max_model_len"] == 2048
        with pytest.raises(NotFoundError):
            client.models.retrieve("gpt-4")
        health = server.url.removesuffix("/v1") + "/health"
        with urllib.request.urlopen(health, timeout=10) as response:  # no key: probes carry none
            assert response.status == 200 and json.load(response)["status"] == "ok"


def test_held_back_text_waits_for_whole_characters_and_stop_strings():
    from selfspec_core.serve.engine import held_back

    assert held_back("caf\ufffd", ()) == 1  # the first byte of a two-byte character
    assert held_back("the end of wor", ("world",)) == 3 and held_back("the end", ("world",)) == 0
    assert held_back("ab##", ("###", "x##!")) == 2 and held_back("abc", ()) == 0


def test_a_disconnected_stream_frees_its_row_at_the_next_step(slow_served):
    import http.client
    from urllib.parse import urlsplit

    server, app, gate = slow_served
    engine = app.state.engine
    address = urlsplit(server.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    body = {"prompt": "The company", "max_tokens": 1000, "temperature": 0, "stream": True}
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    calls = gate.calls
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    deadline = time.monotonic() + 2
    while engine.live_rows() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.live_rows() == 0 and gate.calls - calls < 100  # gone long before its 1000 tokens
    started = time.monotonic()
    status, text = post(server.url + "/completions", {"prompt": "Patients", "max_tokens": 3, "temperature": 0})
    assert status == 200 and time.monotonic() - started < 2, text

    # a client that gives up on a request without streaming frees its row as well
    request = urllib.request.Request(
        server.url + "/completions",
        json.dumps({**body, "stream": False}).encode(),
        {"Content-Type": "application/json"},
    )
    with pytest.raises(OSError):  # the client's timeout
        urllib.request.urlopen(request, timeout=0.5)
    deadline = time.monotonic() + 2
    while engine.live_rows() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.live_rows() == 0


def test_a_request_past_its_timeout_leaves_the_batch(chat_model_dir):
    # Greedy: the tiny model's greedy text never ends, while a sampled one reaches EOS within the
    # second now and then (about one run in ten in CI) and answers 200 before its timeout.
    gate, server = gated_server(chat_model_dir, delay=0.02, opened=True, request_timeout=1, max_tokens=2000)
    with server:
        started = time.monotonic()
        body = {"prompt": "The company", "max_tokens": 1000, "temperature": 0}
        status, error = error_of(call(server.url + "/completions", body))
        assert status == 503 and error["code"] == "timeout" and time.monotonic() - started < 5
        calls = gate.calls
        time.sleep(0.3)
        assert gate.calls - calls <= 1  # the row left at its next step


def test_sampled_requests_batch_and_keep_their_seeds(slow_served):
    server, app, _ = slow_served
    bodies = [{"prompt": p, "max_tokens": 10, "temperature": 0.9, "seed": 7} for p in PROMPTS]
    alone = [json.loads(post(server.url + "/completions", body)[1])["choices"][0]["text"] for body in bodies]
    app.state.engine.step_sizes.clear()
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda body: post(server.url + "/completions", body), bodies))
    assert max(app.state.engine.step_sizes) > 1  # sampled requests shared decoding steps
    assert [json.loads(text)["choices"][0]["text"] for _, text in together] == alone


# --------------------------------------------------------------------------------------------------
# Guards: the API key, limits, the bound on waiting requests, timeouts, shutdown, load

KEY = "secret-key"


def call(url, body=None, key=KEY, raw=None, headers=None):
    """(status, parsed JSON body) of a request; ``raw`` bytes are sent as they are."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(
        url,
        data,
        {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class Gate:
    """Holds every forward pass of a model until the test opens it: a model that is busy. It also
    counts the passes and can slow each one down (``delay`` seconds), so decoding takes a while."""

    def __init__(self, model, delay: float = 0.0, opened: bool = False):
        import threading

        self.event, self.entered, self.delay = threading.Event(), threading.Event(), delay
        self.calls, self.times = 0, []
        if opened:
            self.event.set()
        model.register_forward_pre_hook(self._hold)

    def _hold(self, *_):
        self.calls += 1
        self.entered.set()
        assert self.event.wait(60)
        time.sleep(self.delay)
        self.times.append(time.monotonic())

    def open(self) -> None:
        self.event.set()


def gated_server(model_dir, delay: float = 0.0, opened: bool = False, **limits):
    generator = generator_for(model_dir)
    gate = Gate(generator.model, delay, opened)
    return gate, ServerThread(create_app(generator, "tiny", limits=ServeLimits(api_key=KEY, **limits)))


def error_of(reply):
    status, body = reply
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return status, body["error"]


def test_api_key_is_checked_on_every_request(chat_model_dir):
    from openai import AuthenticationError, OpenAI

    gate, server = gated_server(chat_model_dir, opened=True)
    with server:
        for path, body in (
            ("/models", None),
            ("/completions", {"prompt": "x"}),
            ("/chat/completions", {"messages": []}),
        ):
            for key in (None, "wrong", KEY[:-1]):
                status, error = error_of(call(server.url + path, body, key=key))
                assert status == 401 and error["code"] == "invalid_api_key"
        assert call(server.url + "/models")[0] == 200
        assert (
            OpenAI(base_url=server.url, api_key=KEY, max_retries=0)
            .completions.create(model="tiny", prompt="The company", max_tokens=3)
            .choices[0]
            .text
            is not None
        )
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=server.url, api_key="nope", max_retries=0).models.list()


def test_limits_answer_4xx_in_openai_shape(chat_model_dir):
    gate, server = gated_server(chat_model_dir, opened=True, max_tokens=32, max_prompts=4, max_body_bytes=4096)
    with server:
        url = server.url + "/completions"
        status, error = error_of(call(url, {"prompt": "x", "max_tokens": 33}))
        assert status == 400 and error["param"] == "max_tokens" and "32" in error["message"]
        status, error = error_of(call(url, {"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 2}))
        assert status == 400 and "split the request" in error["message"]
        status, error = error_of(call(url, {"prompt": "word " * 1000, "max_tokens": 4}))  # over 4096 bytes
        assert status == 413 and error["code"] == "body_too_large"
        status, error = error_of(call(url, raw=b"x" * 5000, headers={"Content-Length": "5000"}))
        assert status == 413
        status, error = error_of(call(url, {"prompt": "", "max_tokens": 4}))
        assert status == 400 and error["code"] == "empty_prompt"
        status, error = error_of(call(url, {"prompt": "x", "max_tokens": 4, "seed": -1}))
        assert status == 400
        status, error = error_of(
            call(server.url + "/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 5})
        )
        assert status == 400
        assert call(url, {"prompt": ["a", "b"], "n": 2, "max_tokens": 2})[0] == 200  # at the limits is fine


def test_prompt_longer_than_the_context_is_refused(tiny_model_dir):
    ref = ModelRef("tiny", str(tiny_model_dir))
    model = load_model(ref)
    model.config.max_position_embeddings = 64
    app = create_app(HFGenerator(model, load_tokenizer(ref), 8), "tiny", limits=ServeLimits(max_tokens=64))
    with ServerThread(app) as server:
        status, error = error_of(
            call(server.url + "/completions", {"prompt": "0 1 2 3 4 5 6 7 8 9 " * 8, "max_tokens": 4}, key=None)
        )
        assert status == 400 and error["code"] == "context_length_exceeded" and "64 tokens" in error["message"]
        status, error = error_of(call(server.url + "/completions", {"prompt": "0 1", "max_tokens": 63}, key=None))
        assert status == 400 and error["code"] == "context_length_exceeded"
        assert call(server.url + "/completions", {"prompt": "0 1", "max_tokens": 8}, key=None)[0] == 200


def test_full_queue_answers_429_and_a_slow_model_503_then_recovers(chat_model_dir):
    gate, server = gated_server(chat_model_dir, max_queue=2, request_timeout=2)
    with server, ThreadPoolExecutor(4) as pool:
        body = {"prompt": "The company", "max_tokens": 4, "temperature": 0}
        waiting = [pool.submit(call, server.url + "/completions", body)]
        assert gate.entered.wait(30)  # the first request holds the model
        waiting.append(pool.submit(call, server.url + "/completions", body))
        time.sleep(0.5)
        status, error = error_of(call(server.url + "/completions", body))
        assert status == 429 and error["code"] == "server_busy"
        timed_out = [error_of(future.result(timeout=30)) for future in waiting]
        assert [status for status, _ in timed_out] == [503, 503]
        assert all(error["code"] == "timeout" for _, error in timed_out)
        calls = gate.calls
        gate.open()
        status, reply = call(server.url + "/completions", body)
        assert status == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length")
        # the timed-out rows left (the running one at its next step), the queued one never ran:
        # the new request's prefill and at most 3 steps, nothing more
        assert gate.calls <= calls + 4


def test_shutdown_finishes_requests_in_flight(chat_model_dir):
    gate, server = gated_server(chat_model_dir)
    body = {"prompt": "The company", "max_tokens": 4, "temperature": 0}
    with ThreadPoolExecutor(2) as pool:
        server.__enter__()
        running = pool.submit(call, server.url + "/completions", body)
        assert gate.entered.wait(30)
        queued = pool.submit(call, server.url + "/completions", {**body, "temperature": 0.5})
        time.sleep(0.3)
        stopping = pool.submit(server.__exit__)
        time.sleep(0.3)
        gate.open()
        stopping.result(timeout=60)
        assert running.result()[0] == 200 and queued.result()[0] == 200
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url + "/models", timeout=5)


def test_queued_jobs_fail_cleanly_when_the_engine_closes(tiny_model_dir):
    from queue import SimpleQueue

    from selfspec_core.serve.engine import DecodeJob, DecodeOptions, DecodingEngine, Finished, ServerClosing

    generator = generator_for(tiny_model_dir)
    gate = Gate(generator.model)
    engine = DecodingEngine(generator)
    options = DecodeOptions(max_new_tokens=2, temperature=0.5, seed=1)
    running, queued = SimpleQueue(), SimpleQueue()
    engine.submit(DecodeJob("The company", options, running.put, time.monotonic() + 60))
    assert gate.entered.wait(30)
    engine.submit(DecodeJob("Patients", options, queued.put, time.monotonic() + 60))
    closing = ThreadPoolExecutor(1).submit(engine.close, 30)
    time.sleep(0.2)
    with pytest.raises(ServerClosing):
        engine.submit(DecodeJob("late", options, queued.put, time.monotonic() + 60))
    gate.open()
    closing.result(timeout=60)

    def last(events):
        while not events.empty():
            event = events.get()
        return event

    assert isinstance(last(running), Finished | ServerClosing)  # cut at the next step, or done by then
    assert isinstance(last(queued), ServerClosing)


def test_load_32_clients_no_5xx_no_lost_request():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from serve_load import run_load, serve_tiny

    limits = ServeLimits(api_key="load-test-key", max_tokens=64)
    with tempfile.TemporaryDirectory() as folder, serve_tiny(Path(folder), limits) as server:
        figures = run_load(server.url, limits, requests=96, clients=32)
    assert figures["errors_5xx"] == 0 and figures["lost"] == 0 and figures["wrong_status"] == 0, figures
    assert figures["ok"] + figures["errors_4xx"] == 96 and figures["answers_after"] == 1
    assert figures["ttft_ms"] > 0 and 0 < figures["time_to_first_chunk_ms"] < figures["stream_total_ms"] / 2


def engine_events(engine, prompt: str, options, deadline: float = 60.0):
    """Submit ``prompt`` to ``engine``; the queue its events arrive in."""
    from queue import SimpleQueue

    from selfspec_core.serve.engine import DecodeJob

    events = SimpleQueue()
    engine.submit(DecodeJob(prompt, options, events.put, time.monotonic() + deadline))
    return events


def outcome(events, timeout: float = 60.0):
    """The event that ended a job: its Finished, or the exception it got."""
    from selfspec_core.serve.engine import Finished

    while True:
        event = events.get(timeout=timeout)
        if isinstance(event, Finished | BaseException):
            return event


def test_a_row_failing_at_admission_fails_only_its_own_request(tiny_model_dir):
    from selfspec_core.serve.engine import DecodeOptions, DecodingEngine, Finished

    generator = generator_for(tiny_model_dir)
    gate = Gate(generator.model)
    engine = DecodingEngine(generator)
    pass  #  # built, so the JSON row is admitted at once
    try:
        plain = DecodeOptions(max_new_tokens=2)
        first = engine_events(engine, "The company", plain)
        assert gate.entered.wait(30)  # the model is busy: the next two jobs are admitted in one round
        broken = engine_events(engine, "Patients", DecodeOptions(max_new_tokens=2, json_schema="{not json"))
        fine = engine_events(engine, "Patients", plain)
        gate.open()
        assert isinstance(outcome(broken), ValueError)
        assert isinstance(outcome(fine), Finished) and isinstance(outcome(first), Finished)
    finally:
        engine.close()


def test_the_json_vocabulary_is_built_off_the_model_thread(tiny_model_dir, monkeypatch):
    """A first response_format request waits for the vocabulary's prefix tree; other rows decode meanwhile."""
    import threading

    from selfspec_core.serve import engine as engine_module
    from selfspec_core.serve.engine import DecodeOptions, DecodingEngine, Finished

    release = threading.Event()
    built = engine_module.json_tokenizer_data

    def slow_build(tokenizer, ends):
        assert release.wait(60)
        return built(tokenizer, ends)

    monkeypatch.setattr(engine_module, "json_tokenizer_data", slow_build)
    engine = DecodingEngine(generator_for(tiny_model_dir))
    try:
        constrained = engine_events(
            engine, "Answer:", DecodeOptions(max_new_tokens=8, json_schema='{"type": "object"}')
        )
        free = engine_events(engine, "The company", DecodeOptions(max_new_tokens=4))
        assert isinstance(outcome(free, timeout=30), Finished)  # not held behind the build
        assert constrained.empty()  # still waiting for the vocabulary
        release.set()
        assert isinstance(outcome(constrained), Finished)
    finally:
        release.set()
        engine.close()


def test_scoring_skips_gone_requests_and_answers_503_at_shutdown(tiny_model_dir):
    import asyncio
    from queue import SimpleQueue

    from selfspec_core.serve.app import ApiError, Submission
    from selfspec_core.serve.engine import DeadlinePassed, DecodingEngine, RequestCancelled, ScoreJob

    engine = DecodingEngine(generator_for(tiny_model_dir))
    expired, cancelled = SimpleQueue(), SimpleQueue()
    items = [("The company reported", "", 0)]
    engine.submit(ScoreJob(items, expired.put, time.monotonic() - 1))
    engine.submit(ScoreJob(items, cancelled.put, time.monotonic() + 60, cancelled=True))
    assert isinstance(expired.get(timeout=30), DeadlinePassed)
    assert isinstance(cancelled.get(timeout=30), RequestCancelled)
    engine.close()

    async def score_on_the_closed_engine():
        submission = Submission(engine, [], None, ServeLimits(), stream=False)
        await submission.score(items, None)

    with pytest.raises(ApiError) as refused:
        asyncio.run(score_on_the_closed_engine())
    assert refused.value.status == 503 and refused.value.body["error"]["code"] == "shutting_down"


def test_a_job_submitted_while_the_engine_closes_is_answered(tiny_model_dir):
    """The close lands between submit's check and its put: the job is still answered, not lost."""
    import threading

    from selfspec_core.serve.engine import DecodeOptions, DecodingEngine, Finished, ServerClosing

    engine = DecodingEngine(generator_for(tiny_model_dir))
    put = engine._jobs.put

    def put_after_a_close(job):
        engine._jobs.put = put  # once: the close's own put is the plain one
        threading.Thread(target=engine.close, daemon=True).start()
        engine._thread.join(1)  # the model thread ends here unless the close waits for this put
        put(job)

    engine._jobs.put = put_after_a_close
    events = engine_events(engine, "The company", DecodeOptions(max_new_tokens=2))
    assert isinstance(outcome(events, timeout=30), Finished | ServerClosing)


def test_composed_chat_speaks_the_form_the_experts_learnt(chat_model_dir, tmp_path):
    """Chat requests to composed experts are rendered in the form their adapters recorded; experts
    that learnt different forms are refused at start."""
    from dataclasses import asdict
    from types import SimpleNamespace

    from selfspec_core.compose.experts import Expert
    from selfspec_core.errors import SelfspecError
    from selfspec_core.plugins.defaults import TRAIN_TEMPLATE
    from selfspec_core.run.adapter import TRAINING_INFO
    from selfspec_core.serve.app import composed_chat_prompts

    tokenizer = load_tokenizer(ModelRef("tiny", str(chat_model_dir)))

    def composed(*forms: tuple[str, str]):
        """Composed experts as serve sees them: each adapter records the form it learnt."""
        experts = []
        for name, prompt_format in forms:
            adapter = tmp_path / prompt_format / name / "train" / "adapter"
            adapter.mkdir(parents=True, exist_ok=True)
            info = {"prompt_format": prompt_format, "prompt_template": asdict(TRAIN_TEMPLATE)}
            (adapter / TRAINING_INFO).write_text(json.dumps(info))
            template = asdict(TRAIN_TEMPLATE)
            experts.append(
                Expert(name, str(adapter), str(adapter.parent.parent), "data", None, template, prompt_format)
            )
        return SimpleNamespace(experts=experts, tokenizer=tokenizer)

    messages = [{"role": "user", "content": "Classify: revenue rose."}]
    alpaca = composed_chat_prompts(composed(("finance", "alpaca"), ("biomed", "alpaca")))
    asked = TRAIN_TEMPLATE.render([], {"instruction": "Classify: revenue rose.", "input": ""})
    assert alpaca.name == "alpaca" and alpaca.conversation(messages) == asked
    chat = composed_chat_prompts(composed(("finance", "chat"), ("biomed", "chat")))
    assert chat.conversation(messages).startswith("### user: Classify")
    with pytest.raises(SelfspecError, match=r"different prompt forms \(finance: alpaca, biomed: chat\)"):
        composed_chat_prompts(composed(("finance", "alpaca"), ("biomed", "chat")))
