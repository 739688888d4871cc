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
import functools
import json
import queue
import secrets
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import click

from selfspec_core.errors import SelfspecError
from selfspec_core.models.generator import Completion, HFGenerator, padded

# --------------------------------------------------------------------------------------------------
# The model worker: one thread, a queue, batches of compatible requests


class ServerClosing(SelfspecError):
    """The server is shutting down: the job was not run (HTTP 503)."""


class PromptRejected(SelfspecError):
    """The prompt cannot be run: empty, or longer than the model's context allows (HTTP 400)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass
class _Job:
    kind: Literal["generate", "score"]
    key: tuple | None  # jobs with equal keys may share a batch; None runs alone
    payload: tuple
    expert: str | None = None  # with composed experts: the one asked for; None: the router picks
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
    """Runs every model call on one thread; jobs with the same key that arrive together form a batch.

    With ``experts`` (a :class:`selfspec_core.compose.experts.ComposedModel`), a job names its expert or leaves
    it to the router; a batch is routed at once and runs expert by expert."""

    def __init__(
        self,
        generator: HFGenerator,
        max_batch: int = 8,
        window: float = 0.05,
        batch_sampling: bool = False,
        experts=None,
    ):
        self.generator = generator
        self.experts = experts
        self.context = model_context(generator)
        self.closing = False
        self.max_batch = max(1, max_batch)
        self.window = window
        self.batch_sampling = batch_sampling
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # batch size -> model calls
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._held: collections.deque[_Job | None] = collections.deque()
        self._thread = threading.Thread(target=self._loop, name="selfspec-model", daemon=True)
        self._thread.start()

    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop: tuple[str, ...],
        seed: int,
        expert: str | None = None,
    ) -> Future:
        """Future of ``(Completion, prompt token count, expert that answered)`` (expert ``None`` without experts)."""
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed)
        if temperature == 0:
            key = ("generate", max_new_tokens, stop, expert)
        else:  # batched, a sampled text would depend on its batch mates, not only on its seed
            key = ("generate", max_new_tokens, stop, temperature, top_p, expert) if self.batch_sampling else None
        return self._submit(_Job("generate", key, (prompt, options), expert))

    def score(self, prompt: str, completion: str, top_k: int, expert: str | None = None) -> Future:
        """Future of the :class:`TokenScores` of ``prompt + completion`` (as ``expert``, else as routed)."""
        return self._submit(_Job("score", ("score", expert), (prompt, completion, top_k), expert))

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the running batch; waiting jobs fail with :class:`ServerClosing`."""
        self.closing = True
        self._jobs.put(None)
        self._thread.join(timeout)

    def _submit(self, job: _Job) -> Future:
        if self.closing or not self._thread.is_alive():
            raise ServerClosing("the server is shutting down; retry on another instance or after its restart")
        self._jobs.put(job)
        return job.future

    def _loop(self) -> None:
        while not self.closing:
            first = self._held.popleft() if self._held else self._jobs.get()
            if first is None:
                break
            batch = self._admit(self._gather(first))
            if not batch:
                continue
            try:  # whatever a batch raises, its requests fail and the worker goes on
                results = self._run(first.kind, batch)
            except Exception as exc:  # the requests fail, the server stays up
                for job in batch:
                    job.future.set_exception(exc)
            else:
                for job, result in zip(batch, results):
                    job.future.set_result(result)
        for job in [*self._held, *_drain(self._jobs)]:
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(ServerClosing("the server shut down before this request ran; retry"))

    def _admit(self, batch: list[_Job]) -> list[_Job]:
        """The jobs of ``batch`` to run: not cancelled (their request timed out), with a prompt that fits."""
        admitted = []
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                continue
            problem = self._prompt_problem(job)
            if problem is None:
                admitted.append(job)
            else:
                job.future.set_exception(problem)
        return admitted

    def _prompt_problem(self, job: _Job) -> PromptRejected | None:
        try:
            return self._context_problem(job)
        except Exception as exc:  # e.g. a lone surrogate the tokenizer cannot encode
            return PromptRejected(
                f"prompt: cannot be tokenized ({type(exc).__name__}); send valid Unicode text", "invalid_prompt"
            )

    def _context_problem(self, job: _Job) -> PromptRejected | None:
        tokenizer = self.generator.tokenizer
        if job.kind == "generate":
            prompt, options = job.payload
            count, wanted = len(tokenizer(prompt, add_special_tokens=False).input_ids), options["max_new_tokens"]
            if count == 0:
                return PromptRejected("prompt: empty (no tokens); give some text", "empty_prompt")
        else:
            prompt, completion, _ = job.payload
            count, wanted = len(tokenizer(prompt + completion, add_special_tokens=False).input_ids), 0
        if count + wanted > self.context:
            return PromptRejected(
                f"this model's maximum context length is {self.context} tokens; the prompt has "
                f"{count} tokens and {wanted} were asked for: shorten the prompt or lower max_tokens",
                "context_length_exceeded",
            )
        return None

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
        if self.experts is None:
            return [(*result, None) if kind == "generate" else result for result in self._run_model(kind, batch)]
        routed = iter(self.experts.route([job.payload[0] for job in batch if job.expert is None]))
        chosen = [job.expert or next(routed) for job in batch]
        results: list = [None] * len(batch)
        for name in dict.fromkeys(chosen):
            indices = [i for i, expert in enumerate(chosen) if expert == name]
            with self.experts.use(name):
                for i, result in zip(indices, self._run_model(kind, [batch[i] for i in indices])):
                    results[i] = (*result, name) if kind == "generate" else result
        return results

    def _run_model(self, kind: str, batch: list[_Job]) -> list:
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


def model_context(generator: HFGenerator) -> int:
    """How many tokens (prompt and completion together) the model takes."""
    limit = getattr(generator.model.config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        limit = generator.tokenizer.model_max_length
    return int(limit) if 0 < limit < 10_000_000 else 2048


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
    if not any(ids for ids, *_ in encoded):
        return [TokenScores([], [], [], [], 0) for _ in items]
    input_ids, mask = padded([ids for ids, *_ in encoded], tokenizer.pad_token_id)
    with torch.inference_mode():
        logits = generator.model(
            input_ids=input_ids.to(generator.device), attention_mask=mask.to(generator.device)
        ).logits
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


@dataclass(frozen=True)
class ServeLimits:
    """What one client may ask of the server, so no request holds the model for as long as it likes."""

    api_key: str | None = None  # every request must carry ``Authorization: Bearer <key>``; None: no check
    max_tokens: int = 1024  # most completion tokens one choice may ask for
    max_prompts: int = 32  # most prompts x n choices in one request
    max_body_bytes: int = 4 << 20
    max_queue: int = 64  # requests waiting or running at once; one more is answered 429
    request_timeout: float = 300.0  # seconds a request may wait for the model; then 503 and its jobs are dropped


def error_body(
    message: str, kind: str = "invalid_request_error", code: str | None = None, param: str | None = None
) -> dict:
    """An error in OpenAI's shape, so clients show its message."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class RequestGuard:
    """ASGI middleware in front of the API: the API key, the body size and the bound on waiting requests.

    It answers before a request reaches a worker thread, so a flood of requests or a huge body costs
    the server nothing but the refusal.
    """

    def __init__(self, app, limits: ServeLimits, worker: ModelWorker):
        self.app, self.limits, self.worker = app, limits, worker
        self.in_flight = 0
        self.expected = f"Bearer {limits.api_key}".encode() if limits.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and not secrets.compare_digest(headers.get(b"authorization", b""), self.expected):
            return await _reply(
                send,
                401,
                error_body(
                    "missing or incorrect API key: send the header "
                    "'Authorization: Bearer <key>' with the key the server was started with",
                    code="invalid_api_key",
                ),
                {"www-authenticate": "Bearer"},
            )
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if self.worker.closing:
            return await _reply(
                send,
                503,
                error_body("the server is shutting down; retry after its restart", "server_error", "shutting_down"),
                {"retry-after": "5"},
            )
        if self.in_flight >= self.limits.max_queue:
            return await _reply(
                send,
                429,
                error_body(
                    f"the server is busy ({self.in_flight} requests waiting or running, "
                    f"at most {self.limits.max_queue}); retry shortly",
                    "rate_limit_error",
                    "server_busy",
                ),
                {"retry-after": "1"},
            )
        body = await _read_body(receive, self.limits.max_body_bytes, headers.get(b"content-length"))
        if body is None:
            return await _reply(
                send,
                413,
                error_body(f"request body larger than {self.limits.max_body_bytes} bytes", code="body_too_large"),
            )
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        self.in_flight += 1
        try:
            await self.app(scope, replay, send)
        finally:
            self.in_flight -= 1


async def _read_body(receive, limit: int, declared: bytes | None) -> bytes | None:
    """The whole request body, or None when it is (or says it will be) over ``limit`` bytes."""
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _reply(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = _json(body).encode()
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *extra],
        }
    )
    await send({"type": "http.response.body", "body": data})


def create_app(
    generator: HFGenerator,
    model_name: str,
    max_batch: int = 8,
    max_new_tokens: int = 512,
    batch_sampling: bool = False,
    limits: ServeLimits = ServeLimits(),
    experts=None,
):
    """The FastAPI app serving ``generator`` as model ``model_name`` (``max_new_tokens``: chat default).

    With ``experts`` (a :class:`selfspec_core.compose.experts.ComposedModel` whose model ``generator`` runs),
    ``model_name`` is routed per request and ``<model_name>:<expert>`` (``:base`` too) asks for one;
    every choice says which ``expert`` answered."""
    import anyio.to_thread
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException

    worker = ModelWorker(generator, max_batch=max_batch, batch_sampling=batch_sampling, experts=experts)
    served = {model_name: None, **{f"{model_name}:{name}": name for name in (experts.names if experts else ())}}
    max_new_tokens = min(max_new_tokens, limits.max_tokens)

    class ApiError(Exception):
        def __init__(
            self,
            status: int,
            message: str,
            kind: str = "invalid_request_error",
            code: str | None = None,
            param: str | None = None,
        ):
            super().__init__(message)
            self.status, self.body = status, error_body(message, kind, code, param)

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str | None = None
        temperature: float = Field(1.0, ge=0, le=5)
        top_p: float = Field(1.0, gt=0, le=1)
        n: int = Field(1, ge=1, le=16)
        stop: str | list[str] | None = None
        seed: int | None = Field(None, ge=0, le=2**31)
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
        # every admitted request gets a thread to wait in, so the bound on requests is the only queue
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, limits.max_queue + 8)
        yield
        worker.close(timeout=limits.request_timeout)

    app = FastAPI(title="selfspec", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.add_middleware(RequestGuard, limits=limits, worker=worker)

    @app.exception_handler(ApiError)
    def api_error(_: Request, exc: ApiError):
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    def http_error(_: Request, exc: StarletteHTTPException):  # unknown paths, unparsable bodies
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{exc.detail}", kind), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    def invalid_request(_: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in exc.errors())
        return JSONResponse(error_body(problems[:2000]), status_code=400)

    def check_model(request: Sampling) -> str | None:
        """The expert the request asks for by its model name (None: the router's choice, or no experts)."""
        if request.model is not None and request.model not in served:
            raise ApiError(
                404,
                f"model {request.model!r} is not served here; this server serves {', '.join(map(repr, served))}",
                "not_found_error",
                "model_not_found",
                "model",
            )
        return served.get(request.model) if request.model else None

    def check_size(prompts: int, choices: int, max_tokens: int) -> None:
        if prompts * choices > limits.max_prompts:
            raise ApiError(
                400,
                f"{prompts} prompts x n={choices} is more than the {limits.max_prompts} completions "
                "one request may ask for here; split the request",
                param="prompt",
            )
        if max_tokens > limits.max_tokens:
            raise ApiError(
                400,
                f"max_tokens: {max_tokens} is more than the {limits.max_tokens} this server allows",
                param="max_tokens",
            )

    def wait(futures: list[Future], deadline: float) -> list:
        """The futures' results; on any failure the request's other jobs are dropped and one error answers."""
        try:
            return [future.result(timeout=max(0.0, deadline - time.monotonic())) for future in futures]
        except FutureTimeout:
            raise ApiError(
                503,
                f"timed out after {limits.request_timeout:g}s waiting for the model (the server is busy); retry later",
                "server_error",
                "timeout",
            ) from None
        except PromptRejected as exc:
            raise ApiError(400, str(exc), code=exc.code, param="prompt") from None
        except ServerClosing as exc:
            raise ApiError(503, str(exc), "server_error", "shutting_down") from None
        except Exception as exc:
            raise ApiError(500, f"{type(exc).__name__}: {exc}", "server_error") from exc
        finally:
            for future in futures:
                future.cancel()  # no-op for finished or running jobs

    def submit(calls) -> list[Future]:
        try:
            return [call() for call in calls]
        except ServerClosing as exc:
            raise ApiError(503, str(exc), "server_error", "shutting_down") from None

    def sampling(request: Sampling, max_tokens: int) -> list[dict]:
        """Generation options for each of the ``n`` choices; a missing seed is drawn at random."""
        stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
        seed = request.seed if request.seed is not None else secrets.randbits(31)
        return [
            dict(
                max_new_tokens=max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                stop=tuple(s for s in stop if s),
                seed=seed + choice,
            )
            for choice in range(request.n)
        ]

    def envelope(kind: str, choices: list[dict], prompt_tokens: int, completion_tokens: int, model: str | None) -> dict:
        return {
            "id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": model or model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def stream(chunks: list[dict]):
        def events():
            for chunk in chunks:
                yield f"data: {_json(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models")
    def models():
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": int(time.time()), "owned_by": "selfspec"} for name in served
            ],
        }

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        deadline = time.monotonic() + limits.request_timeout
        expert = check_model(request)
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not prompts:
            raise ApiError(400, "prompt: give a text or a non-empty list of texts", param="prompt")
        max_tokens = 16 if request.max_tokens is None else request.max_tokens
        check_size(len(prompts), request.n, max_tokens)
        # Submit every job before waiting on any, so the worker can batch them.
        asked = [(prompt, options) for prompt in prompts for options in sampling(request, max_tokens)]
        results = wait(
            submit([functools.partial(worker.generate, prompt, expert=expert, **options) for prompt, options in asked]),
            deadline,
        )
        generated = [(prompt, *result) for (prompt, _), result in zip(asked, results)]
        scores = (
            wait(
                submit(
                    [
                        functools.partial(worker.score, prompt, completion.text, request.logprobs, answered)
                        for prompt, completion, _, answered in generated
                    ]
                ),
                deadline,
            )
            if request.logprobs is not None
            else []
        )
        choices = []
        for index, (prompt, completion, _, answered) in enumerate(generated):
            choices.append(
                {
                    "index": index,
                    "text": prompt + completion.text if request.echo else completion.text,
                    "logprobs": logprobs_field(scores[index], request.echo, len(prompt)) if scores else None,
                    "finish_reason": "stop" if completion.finished else "length",
                    **({"expert": answered} if answered else {}),
                }
            )
        prompt_tokens = sum(count for index, (_, _, count, _) in enumerate(generated) if index % request.n == 0)
        body = envelope(
            "text_completion", choices, prompt_tokens, sum(c.num_tokens for _, c, _, _ in generated), request.model
        )
        if request.stream:
            return stream([{**body, "choices": [choice]} for choice in choices])
        return body

    @app.post("/v1/chat/completions")
    def chat(request: ChatRequest):
        deadline = time.monotonic() + limits.request_timeout
        expert = check_model(request)
        messages = [
            {**message.model_dump(exclude_none=True), "content": _text(message.content)} for message in request.messages
        ]
        if not generator.tokenizer.chat_template:
            raise ApiError(400, f"model {model_name!r} has no chat template; use /v1/completions")
        max_tokens = request.max_completion_tokens or request.max_tokens or max_new_tokens
        check_size(1, request.n, max_tokens)
        try:
            prompt = generator.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:
            raise ApiError(400, f"messages do not fit the model's chat template: {type(exc).__name__}: {exc}") from exc
        results = wait(
            submit(
                [
                    functools.partial(worker.generate, prompt, expert=expert, **opts)
                    for opts in sampling(request, max_tokens)
                ]
            ),
            deadline,
        )
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": completion.text},
                "finish_reason": "stop" if completion.finished else "length",
                **({"expert": answered} if answered else {}),
            }
            for index, (completion, _, answered) in enumerate(results)
        ]
        body = envelope(
            "chat.completion", choices, results[0][1], sum(c.num_tokens for c, _, _ in results), request.model
        )
        if request.stream:
            return stream(
                [
                    {
                        **body,
                        "object": "chat.completion.chunk",
                        "choices": [
                            {
                                "index": c["index"],
                                "delta": c["message"],
                                "finish_reason": c["finish_reason"],
                                **({"expert": c["expert"]} if "expert" in c else {}),
                            }
                        ],
                    }
                    for c in choices
                ]
            )
        return body

    return app


def logprobs_field(scores: TokenScores, echo: bool, prompt_length: int) -> dict:
    """The ``logprobs`` object of a completion choice; offsets count from the start of its ``text``."""
    first, shift = (0, 0) if echo else (scores.prompt_tokens, prompt_length)
    return {
        "tokens": scores.tokens[first:],
        "token_logprobs": scores.logprobs[first:],
        "top_logprobs": scores.top[first:],
        "text_offset": [offset - shift for offset in scores.offsets[first:]],
    }


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


_DEFAULT_LIMITS = ServeLimits()


@click.command(name="serve")
@click.option(
    "--adapter",
    type=click.Path(file_okay=False, exists=True),
    help="LoRA adapter on top of the base (default with --domain: the run's; else the base alone).",
)
@click.option(
    "--composed",
    type=click.Path(file_okay=False, exists=True),
    help="A folder made by `selfspec compose`: every expert behind its router (instead of --adapter).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--name", "served_name", help="Model name clients pass (default: <model>+<run>).")
@click.option(
    "--batch-size",
    type=click.IntRange(1, 256),
    default=8,
    show_default=True,
    help="Most concurrent requests run as one batch.",
)
@click.option(
    "--batch-sampling",
    is_flag=True,
    help="Batch sampled requests too: faster, but a seed no longer fixes the text (it depends on the batch).",
)
@click.option(
    "--api-key",
    envvar="SELFSPEC_API_KEY",
    show_envvar=True,
    help="Require 'Authorization: Bearer KEY' on every request.",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(1),
    default=_DEFAULT_LIMITS.max_tokens,
    show_default=True,
    help="Most completion tokens one choice may ask for.",
)
@click.option(
    "--max-prompts",
    type=click.IntRange(1),
    default=_DEFAULT_LIMITS.max_prompts,
    show_default=True,
    help="Most prompts x n in one request.",
)
@click.option(
    "--max-body",
    type=click.IntRange(1024),
    default=_DEFAULT_LIMITS.max_body_bytes,
    show_default=True,
    help="Largest request body in bytes (larger: 413).",
)
@click.option(
    "--max-queue",
    type=click.IntRange(1),
    default=_DEFAULT_LIMITS.max_queue,
    show_default=True,
    help="Requests waiting or running at once (more: 429).",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(min=1),
    default=_DEFAULT_LIMITS.request_timeout,
    show_default=True,
    help="Seconds a request may wait for the model (then 503); also the grace period at shutdown.",
)
@click.pass_obj
def command(
    session,
    adapter,
    composed,
    host,
    port,
    served_name,
    batch_size,
    batch_sampling,
    api_key,
    max_tokens,
    max_prompts,
    max_body,
    max_queue,
    request_timeout,
):
    """Serve the (specialized) model over an OpenAI-compatible API (/v1/completions, /v1/chat/completions)."""
    import uvicorn

    from selfspec_core.config import load_settings
    from selfspec_core.models.loading import load_model, load_tokenizer, resolve_model
    from selfspec_core.runtime import logs

    settings = session.settings() if session is not None else load_settings()
    if composed is not None and adapter is not None:
        raise SelfspecError("serve: pass --adapter (one expert) or --composed (all of them behind a router), not both")
    if adapter is None and composed is None and session is not None and session.domain_name:
        adapter = session.run_dir(session.domain()).require("train", "adapter")
    adapter = Path(adapter) if adapter is not None else None
    logs.adopt_library_loggers()
    experts = None
    if composed is not None:
        from selfspec_core.compose.experts import ComposedModel

        experts = ComposedModel(composed, dtype=settings.dtype)
        generator = HFGenerator(experts.model, experts.tokenizer, batch_size)
        name = served_name or f"{experts.ref.name}+{Path(composed).resolve().name}"
    else:
        ref = resolve_model(settings.model)
        generator = HFGenerator(load_model(ref, adapter=adapter, dtype=settings.dtype), load_tokenizer(ref), batch_size)
        name = served_name or default_model_name(ref.name, adapter)
    limits = ServeLimits(
        api_key=api_key or None,
        max_tokens=max_tokens,
        max_prompts=max_prompts,
        max_body_bytes=max_body,
        max_queue=max_queue,
        request_timeout=request_timeout,
    )
    app = create_app(
        generator, name, max_batch=batch_size, batch_sampling=batch_sampling, limits=limits, experts=experts
    )
    if host not in ("127.0.0.1", "localhost", "::1") and not limits.api_key:
        click.echo(
            f"warning: listening on {host} without authentication: anyone who can reach port {port} "
            f"can use the model (pass --api-key or set SELFSPEC_API_KEY)",
            err=True,
        )
    served = (
        f"experts: {', '.join(experts.names)}, routed; ask for one as {name}:<expert>"
        if experts
        else f"adapter: {adapter or 'none'}"
    )
    click.echo(f"serving {name} at http://{host}:{port}/v1 ({served}{', API key required' if limits.api_key else ''})")
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=int(request_timeout))
