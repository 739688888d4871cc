"""``selfspec serve``: the base model plus a run's adapter behind an OpenAI-compatible HTTP API.

So the specialized model is usable at once from any OpenAI client, chat UI, lm-eval's
``local-completions``, or selfspec's own ``openai`` backend. FastAPI + uvicorn serve ``/v1/models``
(and ``/v1/models/{id}``), ``/v1/completions`` (``echo`` + ``logprobs`` for scoring) and
``/v1/chat/completions`` (messages rendered in the form the adapter learnt: the tokenizer's chat
template, or the Alpaca form for an adapter tuned in that; see :mod:`selfspec_core.models.prompting`;
``/v1/completions`` takes its prompt as raw text), both streaming token by token as
server-sent events; ``/health`` answers without a key. The decoding itself is
:class:`~selfspec_core.serve.engine.DecodingEngine`: continuous batching, so concurrent requests,
greedy or sampled, share each forward pass, and a request whose client went away or whose time ran
out leaves the batch at the next step. A sampled request draws from its own stream seeded by its
``seed``, so the seed fixes its text whatever it is batched with.
"""

import asyncio
import collections
import contextlib
import json
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import click

from selfspec_core.errors import SelfspecError
from selfspec_core.models.generator import HFGenerator
from selfspec_core.models.prompting import ConversationError, PromptFormat, has_chat_template
from selfspec_core.plugins.defaults import TRAIN_TEMPLATE
from selfspec_core.serve.engine import (
    Admitted,
    DeadlinePassed,
    DecodeJob,
    DecodeOptions,
    DecodingEngine,
    Delta,
    Finished,
    PromptRejected,
    RequestCancelled,
    ScoreJob,
    ServerClosing,
    TokenLogprob,
    TokenScores,
)

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
    request_timeout: float = (
        300.0  # seconds a request may take; then 503 (or an error event) and its rows leave the batch
    )


def error_body(
    message: str, kind: str = "invalid_request_error", code: str | None = None, param: str | None = None
) -> dict:
    """An error in OpenAI's shape, so clients show its message."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class RequestGuard:
    """ASGI middleware in front of the API: the API key, the body size and the bound on waiting requests.

    It answers before a request reaches the model, so a flood of requests or a huge body costs
    the server nothing but the refusal.
    """

    def __init__(self, app, limits: ServeLimits, engine: DecodingEngine):
        self.app, self.limits, self.engine = app, limits, engine
        self.in_flight = 0
        self.expected = f"Bearer {limits.api_key}".encode() if limits.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if scope["path"] == "/health":  # for load balancers and probes, which carry no key
            return await self.app(scope, receive, send)
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
        if self.engine.closing:
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


class ApiError(Exception):
    """A request the server answers with an error in OpenAI's shape."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None, param=None
    ):
        super().__init__(message)
        self.status, self.body = status, error_body(message, kind, code, param)


def api_error_of(exc: BaseException, limits: ServeLimits) -> ApiError:
    """The HTTP answer to what the engine delivered instead of tokens."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, DeadlinePassed | TimeoutError):
        return ApiError(
            503,
            f"timed out after {limits.request_timeout:g}s (the server is busy, or max_tokens is large); retry later",
            "server_error",
            "timeout",
        )
    if isinstance(exc, PromptRejected):
        return ApiError(400, str(exc), code=exc.code, param="prompt")
    if isinstance(exc, ServerClosing):
        return ApiError(503, str(exc), "server_error", "shutting_down")
    if isinstance(exc, RequestCancelled):  # nobody reads this answer: nginx's "client closed request"
        return ApiError(499, str(exc), code="client_closed_request")
    return ApiError(500, f"{type(exc).__name__}: {exc}", "server_error")


@dataclass
class ChoiceResult:
    """What one row (a prompt, a choice) got so far."""

    prompt_tokens: int = 0
    expert: str | None = None
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


class Submission:
    """The rows of one request on the engine, their events merged into one asyncio queue in arrival order.

    The request's deadline, a client that disconnects and an abandoned response all cancel its rows
    (and its scoring), which leave the batch at the engine's next step."""

    def __init__(
        self, engine: DecodingEngine, rows: list[tuple[str, DecodeOptions]], expert, limits: ServeLimits, stream: bool
    ):
        loop = asyncio.get_running_loop()
        self.engine, self.limits = engine, limits
        self.deadline = time.monotonic() + limits.request_timeout
        self.events: asyncio.Queue = asyncio.Queue()
        self.results = [ChoiceResult() for _ in rows]
        # events taken while waiting for every row's admission (rows admitted early may already decode)
        self._backlog: collections.deque[tuple[int, Admitted | Delta | Finished]] = collections.deque()
        self._scoring: list[ScoreJob] = []
        self.jobs = [
            DecodeJob(prompt, options, self._sink(loop, index), self.deadline, expert, stream)
            for index, (prompt, options) in enumerate(rows)
        ]
        self._open = len(rows)
        for job in self.jobs:
            try:
                engine.submit(job)
            except ServerClosing as exc:
                self.cancel()
                raise api_error_of(exc, limits) from None

    def _sink(self, loop, index: int):
        return lambda event: loop.call_soon_threadsafe(self.events.put_nowait, (index, event))

    def cancel(self) -> None:
        jobs: list[DecodeJob | ScoreJob] = [*self.jobs, *self._scoring]
        for job in jobs:
            job.cancelled = True

    async def next(self) -> tuple[int, Admitted | Delta | Finished] | None:
        """The next event of any row, recorded in :attr:`results`; None when every row has finished.
        An error of any row cancels the others and is raised as an :class:`ApiError`."""
        if self._backlog:
            return self._backlog.popleft()
        return await self._take()

    async def _take(self) -> tuple[int, Admitted | Delta | Finished] | None:
        """The next event off the engine, recorded in :attr:`results` (see :meth:`next`)."""
        if self._open == 0:
            return None
        try:
            index, event = await asyncio.wait_for(self.events.get(), max(0.0, self.deadline - time.monotonic()))
        except TimeoutError as exc:
            self.cancel()
            raise api_error_of(exc, self.limits) from None
        if isinstance(event, BaseException):
            self.cancel()
            raise api_error_of(event, self.limits) from event
        result = self.results[index]
        if isinstance(event, Admitted):
            result.prompt_tokens, result.expert = event.prompt_tokens, event.expert
        elif isinstance(event, Delta):
            result.text += event.text
            result.logprobs += event.logprobs
        else:
            result.finish_reason, result.completion_tokens = event.reason, event.completion_tokens
            self._open -= 1
        return index, event

    async def admitted(self) -> None:
        """Wait until every row passed its checks (a refused prompt raises here, before any byte is sent).
        The engine admits only as many rows as the batch has room for, so rows admitted first may
        already have text, or have finished: :meth:`next` hands those events out first."""
        waiting = set(range(len(self.jobs)))
        while waiting:
            step = await self._take()
            if step is None:
                return
            if isinstance(step[1], Admitted):
                waiting.discard(step[0])
            else:
                self._backlog.append(step)

    async def finished(self) -> list[ChoiceResult]:
        while await self.next() is not None:
            pass
        return self.results

    async def score(self, items: list[tuple[str, str, int]], expert: str | None) -> list[TokenScores]:
        """The :class:`TokenScores` of ``items``, run on the model thread between two steps, within the
        request's deadline; a failure is raised as an :class:`ApiError`, as the rows' are."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def settle(result) -> None:
            if not future.done():
                (future.set_exception if isinstance(result, BaseException) else future.set_result)(result)

        job = ScoreJob(items, lambda result: loop.call_soon_threadsafe(settle, result), self.deadline, expert)
        self._scoring.append(job)
        try:
            self.engine.submit(job)
            return await asyncio.wait_for(future, max(0.0, self.deadline - time.monotonic()))
        except Exception as exc:  # ServerClosing, the deadline, or what the engine delivered
            self.cancel()
            raise api_error_of(exc, self.limits) from None


@contextlib.asynccontextmanager
async def cancelled_on_disconnect(request, submission: Submission):
    """While the body runs, a client that goes away cancels the submission's rows."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        submission.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        yield
    finally:
        watcher.cancel()


def create_app(
    generator: HFGenerator,
    model_name: str,
    max_batch: int = 8,
    max_new_tokens: int = 512,
    limits: ServeLimits = ServeLimits(),
    experts=None,
    chat_prompts: PromptFormat | None = None,
):
    """The FastAPI app serving ``generator`` as model ``model_name`` (``max_new_tokens``: chat default).

    ``chat_prompts`` renders chat messages in the form the adapter learnt (``adapter_prompts``); by
    default the tokenizer's chat template renders them, and a model without one has no chat endpoint.

    With ``experts`` (a :class:`selfspec_core.compose.experts.ComposedModel` whose model ``generator`` runs),
    ``model_name`` is routed per request and ``<model_name>:<expert>`` (``:base`` too) asks for one;
    every choice says which ``expert`` answered."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from selfspec_core.serve.params import ChatRequest, CompletionRequest, Sampling, supported

    engine = DecodingEngine(generator, max_batch=max_batch, experts=experts)
    if chat_prompts is None and has_chat_template(generator.tokenizer):
        chat_prompts = PromptFormat("chat", TRAIN_TEMPLATE, generator.tokenizer)
    served = {model_name: None, **{f"{model_name}:{name}": name for name in (experts.names if experts else ())}}
    max_new_tokens = min(max_new_tokens, limits.max_tokens)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        engine.close(timeout=limits.request_timeout)

    app = FastAPI(title="selfspec", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.add_middleware(RequestGuard, limits=limits, engine=engine)

    @app.exception_handler(ApiError)
    def api_error(_: Request, exc: ApiError):
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    def http_error(_: Request, exc: StarletteHTTPException):  # unknown paths, unparsable bodies
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{exc.detail}", kind), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    def invalid_request(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        unknown = [str(e["loc"][-1]) for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 2]
        if unknown:
            accepted = supported(ChatRequest if request.url.path.endswith("/chat/completions") else CompletionRequest)
            message = (
                f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
                f"selfspec serve does not implement {'them' if len(unknown) > 1 else 'it'}; remove "
                f"{'them' if len(unknown) > 1 else 'it'} (accepted: {', '.join(accepted)})"
            )
            return JSONResponse(error_body(message, param=unknown[0], code="unknown_parameter"), status_code=400)
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in errors)
        return JSONResponse(error_body(problems[:2000]), status_code=400)

    def check_served(name: str) -> None:
        """404 in OpenAI's shape for a model name this server does not serve."""
        if name not in served:
            raise ApiError(
                404,
                f"model {name!r} is not served here; this server serves {', '.join(map(repr, served))}",
                "not_found_error",
                "model_not_found",
                "model",
            )

    def check_model(request: Sampling) -> str | None:
        """The expert the request asks for by its model name (None: the router's choice, or no experts)."""
        if request.model is None:
            return None
        check_served(request.model)
        return served[request.model]

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

    def decode_options(request: Sampling, max_tokens: int, logprobs: int | None, schema: str | None = None):
        """Options for each of the ``n`` choices; choice ``i`` is seeded ``seed + i`` (a missing seed is drawn)."""
        seed = request.seed if request.seed is not None else secrets.randbits(31)
        bias = tuple((int(token), value) for token, value in (request.logit_bias or {}).items())
        vocabulary = generator.model.config.vocab_size
        if any(token >= vocabulary for token, _ in bias):
            raise ApiError(400, f"logit_bias: token ids run from 0 to {vocabulary - 1}", param="logit_bias")
        return [
            DecodeOptions(
                max_new_tokens=max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                stop=request.stops(),
                seed=seed + choice,
                logprobs=logprobs,
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                logit_bias=bias,
                json_schema=schema,
            )
            for choice in range(request.n)
        ]

    def model_card(name: str) -> dict:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "selfspec",
            "max_model_len": engine.context,
        }

    def usage(results: list[ChoiceResult], choices: int) -> dict:
        """Token counts; a prompt asked for ``n`` choices counts once."""
        prompt = sum(result.prompt_tokens for result in results[::choices])
        completion = sum(result.completion_tokens for result in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def envelope(kind: str, request: Sampling) -> dict:
        prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": request.model or model_name,
        }

    def expert_of(result: ChoiceResult) -> dict:
        return {"expert": result.expert} if result.expert else {}

    def event_stream(request: Request, submission: Submission, body: Sampling, head: dict, chunks):
        """Server-sent events: ``chunks(index, event)`` gives the chunks of each engine event; then the
        usage chunk if asked for, and ``[DONE]``. An error after the first byte is an ``error`` event."""
        extra = {"usage": None} if body.include_usage() else {}

        async def events():
            try:
                async with cancelled_on_disconnect(request, submission):
                    for chunk in chunks(None, None):
                        yield f"data: {_json({**head, **chunk, **extra})}\n\n"
                    while (step := await submission.next()) is not None:
                        for chunk in chunks(*step):
                            yield f"data: {_json({**head, **chunk, **extra})}\n\n"
                    if body.include_usage():
                        usage_chunk = {**head, "choices": [], "usage": usage(submission.results, body.n)}
                        yield f"data: {_json(usage_chunk)}\n\n"
            except ApiError as exc:
                yield f"data: {_json(exc.body)}\n\n"
            finally:
                submission.cancel()  # no-op for finished rows
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    @app.get("/health")
    def health():
        if engine.closing:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [model_card(name) for name in served]}

    @app.get("/v1/models/{model_id:path}")
    def model(model_id: str):
        check_served(model_id)
        return model_card(model_id)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        expert = check_model(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt: give a text or a non-empty list of texts", param="prompt")
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        check_size(len(prompts), body.n, max_tokens)
        options = decode_options(body, max_tokens, body.logprobs)
        rows = [(prompt, choice) for prompt in prompts for choice in options]
        submission = Submission(engine, rows, expert, limits, body.stream)
        async with cancelled_on_disconnect(request, submission):
            await submission.admitted()
            echoed = await echo_scores(submission, rows, body) if body.echo and body.logprobs is not None else {}
        head = envelope("text_completion", body)

        shift = {index: len(prompt) if body.echo else 0 for index, (prompt, _) in enumerate(rows)}

        def choice(index: int, text: str, scored: dict | None, finish_reason: str | None) -> dict:
            result = submission.results[index]
            return {
                "index": index,
                "text": text,
                "logprobs": scored,
                "finish_reason": finish_reason,
                **expert_of(result),
            }

        if body.stream:

            def chunks(index, event):
                if index is None:  # the echoed prompts first
                    echo = [(i, logprobs_field(echoed.get(i), [], 0, body.logprobs)) for i in range(len(rows))]
                    return [{"choices": [choice(i, rows[i][0], scored, None)]} for i, scored in echo if body.echo]
                if isinstance(event, Delta):
                    scored = logprobs_field(None, list(event.logprobs), shift[index], body.logprobs)
                    return [{"choices": [choice(index, event.text, scored, None)]}]
                if isinstance(event, Finished):
                    return [{"choices": [choice(index, "", None, event.reason)]}]
                return []

            return event_stream(request, submission, body, head, chunks)
        async with cancelled_on_disconnect(request, submission):
            results = await submission.finished()
        choices = [
            choice(
                i,
                (rows[i][0] if body.echo else "") + r.text,
                logprobs_field(echoed.get(i), r.logprobs, shift[i], body.logprobs),
                r.finish_reason,
            )
            for i, r in enumerate(results)
        ]
        return {**head, "choices": choices, "usage": usage(results, body.n)}

    async def echo_scores(submission: Submission, rows, body: CompletionRequest) -> dict[int, TokenScores]:
        """The echoed prompts' own log-probabilities (scored as the model reads them), by row."""
        by_expert: dict[str | None, list[int]] = {}
        for index, result in enumerate(submission.results):
            by_expert.setdefault(result.expert, []).append(index)
        scores = {}
        for expert, indices in by_expert.items():
            items = [(rows[i][0], "", body.logprobs or 0) for i in indices]
            for index, scored in zip(indices, await submission.score(items, expert)):
                scores[index] = scored
        return scores

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        expert = check_model(body)
        if body.unsupported():
            raise ApiError(
                400,
                f"{', '.join(body.unsupported())}: tools and function calling are not supported by selfspec serve; "
                "send the request without them",
                param=body.unsupported()[0],
                code="unsupported_parameter",
            )
        if chat_prompts is None:
            raise ApiError(400, f"model {model_name!r} has no chat template; use /v1/completions")
        messages = [
            {**message.model_dump(exclude_none=True), "content": _text(message.content)} for message in body.messages
        ]
        max_tokens = body.max_completion_tokens or body.max_tokens or max_new_tokens
        check_size(1, body.n, max_tokens)
        try:
            prompt = chat_prompts.conversation(messages)
        except ConversationError as exc:
            raise ApiError(400, str(exc), param="messages") from exc
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        schema = body.response_format.schema_text() if body.response_format else None
        rows = [(prompt, options) for options in decode_options(body, max_tokens, logprobs, schema)]
        submission = Submission(engine, rows, expert, limits, body.stream)
        async with cancelled_on_disconnect(request, submission):
            await submission.admitted()
        head = envelope("chat.completion", body)

        def chat_logprobs(entries) -> dict | None:
            return {"content": [chat_logprob(entry) for entry in entries], "refusal": None} if body.logprobs else None

        if body.stream:
            head = {**head, "object": "chat.completion.chunk"}

            def chunks(index, event):
                if index is None:  # every choice opens with its role
                    return [
                        {
                            "choices": [
                                {
                                    "index": i,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ]
                        }
                        for i in range(len(rows))
                    ]
                result = submission.results[index]
                if isinstance(event, Delta):
                    delta = {
                        "index": index,
                        "delta": {"content": event.text},
                        "logprobs": chat_logprobs(event.logprobs),
                    }
                    return [{"choices": [{**delta, "finish_reason": None, **expert_of(result)}]}]
                if isinstance(event, Finished):
                    end = {"index": index, "delta": {}, "logprobs": None, "finish_reason": event.reason}
                    return [{"choices": [{**end, **expert_of(result)}]}]
                return []

            return event_stream(request, submission, body, head, chunks)
        async with cancelled_on_disconnect(request, submission):
            results = await submission.finished()
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": chat_logprobs(result.logprobs),
                "finish_reason": result.finish_reason,
                **expert_of(result),
            }
            for index, result in enumerate(results)
        ]
        return {**head, "choices": choices, "usage": usage(results, body.n)}

    return app


def chat_logprob(entry: TokenLogprob) -> dict:
    """One token of a chat choice's ``logprobs.content``."""

    def token(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {**token(entry.token, entry.logprob), "top_logprobs": [token(text, value) for text, value in entry.top]}


def logprobs_field(
    echoed: TokenScores | None, generated: list[TokenLogprob], shift: int, top_k: int | None
) -> dict | None:
    """The ``logprobs`` object of a completion choice: the echoed prompt's scores (if any), then the
    generated tokens'; offsets count from the start of the choice's ``text`` (``shift``: echoed characters)."""
    if top_k is None:
        return None
    field_: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    if echoed is not None:
        field_ = {
            "tokens": echoed.tokens,
            "token_logprobs": echoed.logprobs,
            "top_logprobs": echoed.top,
            "text_offset": echoed.offsets,
        }
        field_ = {key: list(value) for key, value in field_.items()}
    for entry in generated:
        field_["tokens"].append(entry.token)
        field_["token_logprobs"].append(entry.logprob)
        field_["top_logprobs"].append(dict(entry.top) if top_k else None)
        field_["text_offset"].append(shift + entry.offset)
    return field_


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


def composed_chat_prompts(experts) -> PromptFormat:
    """How chat messages are rendered for composed ``experts``: in the form they all learnt. The prompt
    is rendered before the router picks an expert, so experts that would render a conversation
    differently cannot share one server's chat endpoint."""
    probe = [
        {"role": "user", "content": "Classify: revenue rose."},
        {"role": "assistant", "content": "positive"},
        {"role": "user", "content": "Classify: costs fell."},
    ]
    forms = {expert.name: expert.prompts(experts.tokenizer) for expert in experts.experts}
    renderings = {name: form.conversation(probe) for name, form in forms.items()}
    if len(set(renderings.values())) > 1:
        learnt = ", ".join(f"{name}: {form.name}" for name, form in forms.items())
        raise SelfspecError(
            f"serve --composed: the experts learnt different prompt forms ({learnt}), and a chat request is "
            "rendered before the router picks its expert; compose experts tuned in one form "
            "(train.prompt_format), or serve each with --adapter"
        )
    return next(iter(forms.values()))


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
    help="Most rows (a prompt times its n choices) decoding together; more wait for a free row.",
)
@click.option(
    "--batch-sampling",
    is_flag=True,
    hidden=True,
    help="No longer needed: sampled requests always share batches, each drawing from its own seeded stream.",
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
    help="Seconds a request may take (then 503, and it leaves the model); also the grace period at shutdown.",
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
    from selfspec_core.run.adapter import adapter_prompts
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
        chat_prompts = composed_chat_prompts(experts)
    else:
        ref = resolve_model(settings.model)
        generator = HFGenerator(load_model(ref, adapter=adapter, dtype=settings.dtype), load_tokenizer(ref), batch_size)
        name = served_name or default_model_name(ref.name, adapter)
        chat_prompts = adapter_prompts(adapter, generator.tokenizer) if adapter is not None else None
    limits = ServeLimits(
        api_key=api_key or None,
        max_tokens=max_tokens,
        max_prompts=max_prompts,
        max_body_bytes=max_body,
        max_queue=max_queue,
        request_timeout=request_timeout,
    )
    if batch_sampling:
        click.echo(
            "note: --batch-sampling is no longer needed: sampled requests always share batches now, "
            "each drawing from its own stream seeded by its request's seed",
            err=True,
        )
    app = create_app(generator, name, max_batch=batch_size, limits=limits, experts=experts, chat_prompts=chat_prompts)
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
    ) + (f", chat in the {chat_prompts.name} form {'they' if experts else 'it'} learnt" if chat_prompts else "")
    click.echo(f"serving {name} at http://{host}:{port}/v1 ({served}{', API key required' if limits.api_key else ''})")
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=int(request_timeout))
