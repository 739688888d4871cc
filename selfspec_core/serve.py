"""``selfspec serve``: the base model plus a run's adapter behind an OpenAI-compatible HTTP API.

So the specialized model is usable at once from any OpenAI client, chat UI, lm-eval's
``local-completions``, or selfspec's own ``openai`` backend. FastAPI + uvicorn serve ``/v1/models``,
``/v1/completions`` (``echo`` + ``logprobs`` for scoring, ``seed``, ``stop``) and
``/v1/chat/completions`` (the tokenizer's chat template). One worker thread owns the model; requests
wait in its queue, and greedy requests with the same length and stop strings that arrive together
run as one batch, so concurrent clients share each forward pass. A sampled request runs alone, so
its seed always gives the same text (``--batch-sampling`` trades that for speed).
"""

import collections
import contextlib
import json
import queue
import secrets
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import click

from .errors import SelfspecError
from .generation import Completion, HFGenerator


# --------------------------------------------------------------------------------------------------
# The model worker: one thread, a queue, batches of compatible requests


@dataclass
class _Job:
    kind: Literal["generate", "score"]
    key: tuple | None  # jobs with equal keys may share a batch; None runs alone
    payload: tuple
    future: Future = field(default_factory=Future)


@dataclass(frozen=True)
class TokenScores:
    """Per-token log-probabilities of ``text`` (the first token has none) with character offsets."""

    tokens: list[str]
    logprobs: list[float | None]
    top: list[dict[str, float] | None]
    offsets: list[int]
    prompt_tokens: int


class ModelWorker:
    """Runs every model call on one thread; jobs with the same key that arrive together form a batch."""

    def __init__(self, generator: HFGenerator, max_batch: int = 8, window: float = 0.05, batch_sampling: bool = False):
        self.generator = generator
        self.max_batch = max(1, max_batch)
        self.window = window
        self.batch_sampling = batch_sampling
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # batch size -> model calls
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._held: collections.deque[_Job | None] = collections.deque()
        self._thread = threading.Thread(target=self._loop, name="selfspec-model", daemon=True)
        self._thread.start()

    def generate(self, prompt: str, *, max_new_tokens: int, temperature: float, top_p: float,
                 stop: tuple[str, ...], seed: int) -> Future:
        """Future of ``(Completion, prompt token count)``."""
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed)
        if temperature == 0:
            key = ("generate", max_new_tokens, stop)
        else:  # batched, a sampled text would depend on its batch mates, not only on its seed
            key = ("generate", max_new_tokens, stop, temperature, top_p) if self.batch_sampling else None
        return self._submit(_Job("generate", key, (prompt, options)))

    def score(self, prompt: str, completion: str, top_k: int) -> Future:
        """Future of the :class:`TokenScores` of ``prompt + completion``."""
        return self._submit(_Job("score", ("score",), (prompt, completion, top_k)))

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the running batch; waiting jobs fail with a clear message."""
        self._jobs.put(None)
        self._thread.join(timeout)

    def _submit(self, job: _Job) -> Future:
        if not self._thread.is_alive():
            raise SelfspecError("the model worker has stopped")
        self._jobs.put(job)
        return job.future

    def _loop(self) -> None:
        while True:
            first = self._held.popleft() if self._held else self._jobs.get()
            if first is None:
                break
            batch = self._gather(first)
            try:
                results = self._run(first.kind, batch)
            except Exception as exc:  # the requests fail, the server stays up
                for job in batch:
                    job.future.set_exception(exc)
            else:
                for job, result in zip(batch, results):
                    job.future.set_result(result)
        for job in [*self._held, *_drain(self._jobs)]:
            if job is not None:
                job.future.set_exception(SelfspecError("the server is shutting down"))

    def _gather(self, first: _Job) -> list[_Job]:
        """``first`` plus held jobs with its key and those arriving < ``window`` s apart (up to ``max_batch``)."""
        batch = [first]
        if first.key is None:
            return batch
        for job in list(self._held):
            if job is not None and job.key == first.key and len(batch) < self.max_batch:
                self._held.remove(job)
                batch.append(job)
        while len(batch) < self.max_batch:
            try:
                job = self._jobs.get(timeout=self.window)
            except queue.Empty:
                break
            if job is not None and job.key == first.key:
                batch.append(job)
            else:
                self._held.append(job)
                if job is None:
                    break
        return batch

    def _run(self, kind: str, batch: list[_Job]) -> list:
        self.batch_sizes[len(batch)] += 1
        tokenizer = self.generator.tokenizer
        if kind == "score":
            return score_tokens(self.generator, [job.payload for job in batch])
        prompts = [job.payload[0] for job in batch]
        options = batch[0].payload[1]
        if options["max_new_tokens"] == 0:  # echo-only requests: nothing to generate
            completions = [Completion("", False, 0) for _ in prompts]
        else:
            completions = self.generator.generate(prompts, **options)
        counts = [len(tokenizer(prompt, add_special_tokens=False).input_ids) for prompt in prompts]
        return list(zip(completions, counts))


def _drain(jobs: queue.Queue):
    """Everything left in ``jobs``, without waiting."""
    while True:
        try:
            yield jobs.get_nowait()
        except queue.Empty:
            return


def score_tokens(generator: HFGenerator, items: list[tuple[str, str, int]]) -> list[TokenScores]:
    """Score each ``(prompt, completion, top_k)``: prompt and completion are tokenized apart, as in
    :meth:`HFGenerator.loglikelihood`, so an echoed ``context + continuation`` scores the same."""
    import torch

    tokenizer = generator.tokenizer
    encoded = []
    for prompt, completion, _ in items:
        ids, offsets, ends = [], [], []
        for start, text in ((0, prompt), (len(prompt), completion)):
            part = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True) if text else None
            if part is not None:
                ids += part.input_ids
                offsets += [start + begin for begin, _ in part.offset_mapping]
                ends += [start + end for _, end in part.offset_mapping]
            if start == 0:
                prompt_count = len(ids)
        encoded.append((ids, offsets, ends, prompt_count))
    width = max((len(ids) for ids, *_ in encoded), default=0)
    if width == 0:
        return [TokenScores([], [], [], [], 0) for _ in items]
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (ids, *_) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    with torch.inference_mode():
        logits = generator.model(input_ids=input_ids.to(generator.device), attention_mask=mask.to(generator.device)).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
    results = []
    for row, ((prompt, completion, top_k), (ids, offsets, ends, prompt_count)) in enumerate(zip(items, encoded)):
        text = prompt + completion
        values: list[float | None] = [None]
        top: list[dict[str, float] | None] = [None]
        for position in range(1, len(ids)):
            previous = logprobs[row, position - 1]
            values.append(previous[ids[position]].item())
            if top_k:
                best = torch.topk(previous, top_k)
                top.append({tokenizer.decode([i]): v for v, i in zip(best.values.tolist(), best.indices.tolist())})
            else:
                top.append(None)
        tokens = [text[begin:end] for begin, end in zip(offsets, ends)]
        results.append(TokenScores(tokens, values[: len(ids)], top[: len(ids)], offsets, prompt_count))
    return results


# --------------------------------------------------------------------------------------------------
# The HTTP API


def create_app(generator: HFGenerator, model_name: str, max_batch: int = 8, max_new_tokens: int = 512,
               batch_sampling: bool = False):
    """The FastAPI app serving ``generator`` as model ``model_name`` (``max_new_tokens``: chat default)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field

    worker = ModelWorker(generator, max_batch=max_batch, batch_sampling=batch_sampling)

    class ApiError(Exception):
        def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
            super().__init__(message)
            self.status, self.message, self.kind = status, message, kind

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str | None = None
        temperature: float = Field(1.0, ge=0, le=5)
        top_p: float = Field(1.0, gt=0, le=1)
        n: int = Field(1, ge=1, le=16)
        stop: str | list[str] | None = None
        seed: int | None = None
        stream: bool = False

    class CompletionRequest(Sampling):
        prompt: str | list[str]
        max_tokens: int | None = Field(16, ge=0)
        echo: bool = False
        logprobs: int | None = Field(None, ge=0, le=20)

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: str
        content: str | list[dict[str, Any]] | None = None

    class ChatRequest(Sampling):
        messages: list[Message] = Field(min_length=1)
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        worker.close()

    app = FastAPI(title="selfspec", version="1", lifespan=lifespan)
    app.state.worker = worker

    def error_response(status: int, message: str, kind: str = "invalid_request_error"):
        """An error in OpenAI's shape, so clients show its message."""
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)

    @app.exception_handler(ApiError)
    def api_error(_: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.kind)

    @app.exception_handler(RequestValidationError)
    def invalid_request(_: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in exc.errors())
        return error_response(400, problems)

    def check_model(request: Sampling) -> None:
        if request.model not in (None, model_name):
            raise ApiError(404, f"model {request.model!r} is not served here; this server serves {model_name!r}",
                           "not_found_error")

    def wait(future: Future):
        try:
            return future.result()
        except Exception as exc:
            raise ApiError(500, f"{type(exc).__name__}: {exc}", "server_error") from exc

    def sampling(request: Sampling, max_tokens: int) -> list[dict]:
        """Generation options for each of the ``n`` choices; a missing seed is drawn at random."""
        stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
        seed = request.seed if request.seed is not None else secrets.randbits(31)
        return [dict(max_new_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                     stop=tuple(s for s in stop if s), seed=seed + choice) for choice in range(request.n)]

    def envelope(kind: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
        return {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
                "created": int(time.time()), "model": model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def stream(chunks: list[dict]):
        def events():
            for chunk in chunks:
                yield f"data: {_json(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "selfspec"}]}

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        check_model(request)
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not prompts:
            raise ApiError(400, "prompt: give a text or a non-empty list of texts")
        max_tokens = 16 if request.max_tokens is None else request.max_tokens
        # Submit every job before waiting on any, so the worker can batch them.
        jobs = [(prompt, worker.generate(prompt, **options)) for prompt in prompts for options in sampling(request, max_tokens)]
        generated = [(prompt, *wait(future)) for prompt, future in jobs]
        scoring = ([worker.score(prompt, completion.text, request.logprobs) for prompt, completion, _ in generated]
                   if request.logprobs is not None else [])
        choices = []
        for index, (prompt, completion, _) in enumerate(generated):
            choices.append({"index": index, "text": prompt + completion.text if request.echo else completion.text,
                            "logprobs": logprobs_field(wait(scoring[index]), request.echo, len(prompt)) if scoring else None,
                            "finish_reason": "stop" if completion.finished else "length"})
        prompt_tokens = sum(count for index, (_, _, count) in enumerate(generated) if index % request.n == 0)
        body = envelope("text_completion", choices, prompt_tokens, sum(c.num_tokens for _, c, _ in generated))
        if request.stream:
            return stream([{**body, "choices": [choice]} for choice in choices])
        return body

    @app.post("/v1/chat/completions")
    def chat(request: ChatRequest):
        check_model(request)
        messages = [{**message.model_dump(exclude_none=True), "content": _text(message.content)}
                    for message in request.messages]
        if not generator.tokenizer.chat_template:
            raise ApiError(400, f"model {model_name!r} has no chat template; use /v1/completions")
        try:
            prompt = generator.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:
            raise ApiError(400, f"messages do not fit the model's chat template: {type(exc).__name__}: {exc}") from exc
        max_tokens = request.max_completion_tokens or request.max_tokens or max_new_tokens
        futures = [worker.generate(prompt, **opts) for opts in sampling(request, max_tokens)]
        results = [wait(future) for future in futures]
        choices = [{"index": index, "message": {"role": "assistant", "content": completion.text},
                    "finish_reason": "stop" if completion.finished else "length"}
                   for index, (completion, _) in enumerate(results)]
        body = envelope("chat.completion", choices, results[0][1], sum(c.num_tokens for c, _ in results))
        if request.stream:
            return stream([{**body, "object": "chat.completion.chunk",
                            "choices": [{"index": c["index"], "delta": c["message"], "finish_reason": c["finish_reason"]}]}
                           for c in choices])
        return body

    return app


def logprobs_field(scores: TokenScores, echo: bool, prompt_length: int) -> dict:
    """The ``logprobs`` object of a completion choice; offsets count from the start of its ``text``."""
    first, shift = (0, 0) if echo else (scores.prompt_tokens, prompt_length)
    return {"tokens": scores.tokens[first:], "token_logprobs": scores.logprobs[first:],
            "top_logprobs": scores.top[first:], "text_offset": [offset - shift for offset in scores.offsets[first:]]}


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _text(content: str | list[dict] | None) -> str:
    """A message's content as text: multi-part content keeps its text parts."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if part.get("type", "text") == "text")
    return content or ""


# --------------------------------------------------------------------------------------------------
# Running it


class ServerThread:
    """A uvicorn server on a free loopback port in a background thread (tests, benchmarks, notebooks)."""

    def __init__(self, app, host: str = "127.0.0.1"):
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, 0))
        self.url = f"http://{host}:{self.socket.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise SelfspecError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *_) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


def default_model_name(model_name: str, adapter: Path | None) -> str:
    """``<model>`` or ``<model>+<run>`` for a run's ``train/adapter`` (else ``+<adapter folder>``)."""
    if adapter is None:
        return model_name
    adapter = adapter.resolve()
    label = adapter.parent.parent.name if adapter.parent.name == "train" else adapter.name
    return f"{model_name}+{label}"


@click.command(name="serve")
@click.option("--adapter", type=click.Path(file_okay=False, exists=True),
              help="LoRA adapter on top of the base (default with --domain: the run's; else the base alone).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--name", "served_name", help="Model name clients pass (default: <model>+<run>).")
@click.option("--batch-size", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Most concurrent requests run as one batch.")
@click.option("--batch-sampling", is_flag=True,
              help="Batch sampled requests too: faster, but a seed no longer fixes the text (it depends on the batch).")
@click.pass_obj
def command(session, adapter, host, port, served_name, batch_size, batch_sampling):
    """Serve the (specialized) model over an OpenAI-compatible API (/v1/completions, /v1/chat/completions)."""
    import uvicorn

    from .config import load_settings
    from .models import load_model, load_tokenizer, resolve_model

    settings = session.settings() if session is not None else load_settings()
    if adapter is None and session is not None and session.domain_name:
        adapter = session.run_dir(session.domain()).require("train", "adapter")
    adapter = Path(adapter) if adapter is not None else None
    ref = resolve_model(settings.model)
    generator = HFGenerator(load_model(ref, adapter=adapter, dtype=settings.dtype), load_tokenizer(ref), batch_size)
    name = served_name or default_model_name(ref.name, adapter)
    app = create_app(generator, name, max_batch=batch_size, batch_sampling=batch_sampling)
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: listening on {host} without authentication: anyone who can reach port {port} "
                   f"can use the model", err=True)
    click.echo(f"serving {name} at http://{host}:{port}/v1 (adapter: {adapter or 'none'})")
    uvicorn.run(app, host=host, port=port, log_level="info")
