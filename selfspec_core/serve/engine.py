"""The decoding loop behind ``selfspec serve``: continuous batching, one token per step, per-row streams.

One thread owns the model. Every request row (one prompt, one choice) joins the running batch between
two decoding steps: its prompt is run once (prefill) and its keys and values are merged into the
batch's cache, left-padded to the same length. Each step samples one token for every live row, hands
the new text to that row's request at once (streaming), and lets rows that ended, were cancelled
(their client went away) or ran past their deadline leave the batch. A row samples from its own
random stream seeded by its request's seed, so batch mates never change its draws, and decodes its
text incrementally, holding back an unfinished UTF-8 character and any tail that could still become
a stop string.

Log-probabilities are the model's own (log-softmax of the raw logits); presence and frequency
penalties, ``logit_bias`` and a JSON grammar (lm-format-enforcer) act on the logits before sampling.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.util
import json
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from selfspec_core.errors import SelfspecError
from selfspec_core.models.generator import HFGenerator, _as_list, cut_at_stop, left_padded, padded

# --------------------------------------------------------------------------------------------------
# What a request asks for and what it gets back


class ServerClosing(SelfspecError):
    """The server is shutting down: the job was not run (HTTP 503)."""


class PromptRejected(SelfspecError):
    """The prompt cannot be run: empty, or longer than the model's context allows (HTTP 400)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


class RequestCancelled(SelfspecError):
    """The request's client went away; its row left the batch (or never joined it)."""


class DeadlinePassed(SelfspecError):
    """The request ran past its timeout; its row left the batch (HTTP 503, or an error event in a stream)."""


@dataclass(frozen=True)
class DecodeOptions:
    """How one row is decoded (OpenAI's parameters, already validated)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the k most likely
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    json_schema: str | None = None  # the JSON schema the text must follow, as JSON text; None: free text


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]
    offset: int  # characters of the row's text before this token


@dataclass(frozen=True)
class Admitted:
    """The row passed its checks and waits for (or has) a place in the batch."""

    prompt_tokens: int
    expert: str | None


@dataclass(frozen=True)
class Delta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" or "length", as OpenAI's finish_reason
    completion_tokens: int


@dataclass(frozen=True)
class TokenScores:
    """Per-token log-probabilities of ``text`` (the first token has none) with character offsets."""

    tokens: list[str]
    logprobs: list[float | None]
    top: list[dict[str, float] | None]
    offsets: list[int]
    prompt_tokens: int


Event = Admitted | Delta | Finished | BaseException


@dataclass(eq=False)
class DecodeJob:
    """One row: ``deliver`` is called on the model thread with each :data:`Event`, ending with a
    :class:`Finished` or an exception. Setting ``cancelled`` (any thread) frees the row at the next step.
    Unless ``stream``, the text comes as one :class:`Delta` at the end: a wake-up of the request's
    thread per token would cost the model thread the interpreter lock at every step, for nothing."""

    prompt: str
    options: DecodeOptions
    deliver: Callable[[Event], object]
    deadline: float
    expert: str | None = None  # with composed experts: the one asked for; None: the router picks
    stream: bool = True
    cancelled: bool = False


@dataclass(eq=False)
class ScoreJob:
    items: list[tuple[str, str, int]]  # (prompt, completion, top_k)
    deliver: Callable[[Event], object]
    deadline: float
    expert: str | None = None
    cancelled: bool = False


# --------------------------------------------------------------------------------------------------
# One row of the batch


@dataclass(eq=False)
class _Row:
    job: DecodeJob
    prompt_tokens: int
    random: Any = None  # torch.Generator of a sampled row
    enforcer: Any = None  # lm-format-enforcer TokenEnforcer of a JSON row
    ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far, stop strings not cut
    sent: int = 0  # characters of ``text`` delivered
    pending: list[TokenLogprob] = field(default_factory=list)  # logprobs of tokens whose text is held back


@dataclass(eq=False)
class _Batch:
    """The live rows of one expert and their KV cache (rows in cache order)."""

    rows: list[_Row]
    cache: Any
    mask: Any  # [rows, cached length] attention mask
    position: Any  # [rows, 1] position of each row's next token
    logits: Any  # [rows, vocab] logits of each row's next token


def held_back(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters of ``text`` must wait: an unfinished UTF-8 character decodes as
    U+FFFD, and a tail that is the start of a stop string may still become it."""
    end = len(text.rstrip("\ufffd"))
    hold = max((k for s in stop for k in range(1, min(len(s), end + 1)) if text[end - k : end] == s[:k]), default=0)
    return len(text) - end + hold


class DecodingEngine:
    """The model thread: admits jobs between decoding steps, up to ``max_batch`` live rows.

    With ``experts`` (a :class:`selfspec_core.compose.experts.ComposedModel`), rows are grouped by the
    expert that answers them (asked for, or chosen by the router on admission); each group is its own
    batch, and the groups take decoding steps in turn."""

    def __init__(self, generator: HFGenerator, max_batch: int = 8, experts=None):
        import torch

        self.generator = generator
        self.tokenizer = generator.tokenizer
        self.experts = experts
        self.context = model_context(generator)
        self.max_batch = max(1, max_batch)
        self.closing = False
        self._closing_lock = threading.Lock()  # a job is queued before the close's sentinel, or refused
        self.step_sizes: collections.Counter[int] = collections.Counter()  # live rows -> decoding steps
        self.ends = {self.tokenizer.eos_token_id, *_as_list(generator.model.generation_config.eos_token_id)}
        self._torch = torch
        self._jobs: queue.Queue[DecodeJob | ScoreJob | None] = queue.Queue()
        self._waiting: collections.deque[DecodeJob] = collections.deque()
        self._batches: dict[str | None, _Batch] = {}
        # (temperature, top_p) come from clients: a few recent samplers are kept, not one per value ever sent
        self._distribution = functools.lru_cache(maxsize=16)(generator._distribution)
        self._json_tokenizer_data = self._start_json_tokenizer_data()
        self._joinable: bool | None = None  # whether a running batch's cache can take new rows (known after a prefill)
        self._thread = threading.Thread(target=self._loop, name="selfspec-model", daemon=True)
        self._thread.start()

    # ---- the other threads' side

    def submit(self, job: DecodeJob | ScoreJob) -> None:
        with self._closing_lock:
            if self.closing or not self._thread.is_alive():
                raise ServerClosing("the server is shutting down; retry on another instance or after its restart")
            self._jobs.put(job)

    def live_rows(self) -> int:
        return sum(len(batch.rows) for batch in self._batches.values())

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the current step; rows still running or waiting end with :class:`ServerClosing`."""
        with self._closing_lock:
            self.closing = True
            self._jobs.put(None)
        self._thread.join(timeout)

    # ---- the model thread

    def _loop(self) -> None:
        while not self.closing:
            if not self._take_jobs():
                break
            self._admit()
            for expert in list(self._batches):
                try:
                    with self._as_expert(expert):
                        self._step(expert)
                except Exception as exc:  # the rows fail, the server stays up
                    for row in self._batches.pop(expert).rows:
                        _deliver(row.job, exc)
        gone = ServerClosing("the server shut down before this request finished; retry")
        for batch in self._batches.values():
            for row in batch.rows:
                _deliver(row.job, gone)
        for job in [*self._waiting, *_drain(self._jobs)]:
            if job is not None:
                _deliver(job, gone)

    def _take_jobs(self) -> bool:
        """Move arrived jobs into the waiting line (blocking while there is nothing to do); score jobs
        run at once. False when the server closes."""
        idle = not self._batches and not any(map(self._admissible, self._waiting))
        # jobs that wait only for the JSON vocabulary: look again shortly instead of spinning
        wait = 0.05 if self._waiting else None
        while True:
            try:
                job = self._jobs.get(timeout=wait) if idle else self._jobs.get_nowait()
            except queue.Empty:
                return True
            if job is None:
                return False
            idle = False
            if isinstance(job, ScoreJob):
                self._score(job)
            else:
                self._waiting.append(job)

    def _admit(self) -> None:
        """Waiting jobs join the batch, as many as there are free rows: checked, routed, prefilled."""
        if self._batches and not self._joinable:
            return  # a cache that cannot be merged (e.g. sliding windows): new rows wait for the batch to end
        free = self.max_batch - self.live_rows()
        checked: list[tuple[DecodeJob, list[int]]] = []
        later: list[DecodeJob] = []  # waiting for the JSON vocabulary, built off this thread
        now = time.monotonic()
        while self._waiting and len(checked) < free:
            job = self._waiting.popleft()
            if job.cancelled:
                _deliver(job, RequestCancelled("the client went away before the request ran"))
                continue
            if now > job.deadline:
                _deliver(job, DeadlinePassed("the request timed out waiting for the model"))
                continue
            if not self._admissible(job):
                later.append(job)
                continue
            try:
                ids = self.tokenizer(job.prompt, add_special_tokens=False).input_ids
            except Exception as exc:  # e.g. a lone surrogate the tokenizer cannot encode
                problem: Exception | None = PromptRejected(
                    f"prompt: cannot be tokenized ({type(exc).__name__}); send valid Unicode text", "invalid_prompt"
                )
            else:
                problem = self._context_problem(len(ids), job.options.max_new_tokens)
            if problem is None:
                checked.append((job, ids))
            else:
                _deliver(job, problem)
        self._waiting.extendleft(reversed(later))
        joining = []
        for job, ids in self._routed(checked):
            try:
                joining.append(self._new_row(job, ids))
            except Exception as exc:  # e.g. a schema the grammar cannot take: this job fails, not its round
                _deliver(job, exc)
        for row in joining:
            _deliver(row.job, Admitted(row.prompt_tokens, row.job.expert))
            if row.job.options.max_new_tokens == 0:  # echo-only requests: nothing to generate
                _deliver(row.job, Finished("length", 0))
        joining = [row for row in joining if row.job.options.max_new_tokens > 0]
        for expert in dict.fromkeys(row.job.expert for row in joining):
            group = [row for row in joining if row.job.expert == expert]
            try:
                with self._as_expert(expert):
                    self._prefill(expert, group)
            except Exception as exc:
                for row in group:
                    _deliver(row.job, exc)

    def _admissible(self, job: DecodeJob) -> bool:
        """False while a JSON-constrained job waits for the vocabulary's prefix tree (being built)."""
        return job.options.json_schema is None or self._json_tokenizer_data.done()

    def _routed(self, checked: list[tuple[DecodeJob, list[int]]]) -> list[tuple[DecodeJob, list[int]]]:
        """The jobs the router placed: all of them in one call, or, if that fails, each alone, so a
        prompt the router cannot take fails its own job only."""
        try:
            self._route([job for job, _ in checked])
            return checked
        except Exception:
            placed = []
            for job, ids in checked:
                try:
                    self._route([job])
                    placed.append((job, ids))
                except Exception as exc:
                    _deliver(job, exc)
            return placed

    def _route(self, jobs: Sequence[DecodeJob | ScoreJob]) -> None:
        """Jobs that leave the expert to the router get the one it chooses for their prompt."""
        unrouted = [job for job in jobs if job.expert is None]
        if self.experts is not None and unrouted:
            prompts = [job.prompt if isinstance(job, DecodeJob) else job.items[0][0] for job in unrouted]
            for job, expert in zip(unrouted, self.experts.route(prompts)):
                job.expert = expert

    def _context_problem(self, count: int, wanted: int) -> PromptRejected | None:
        if count == 0:
            return PromptRejected("prompt: empty (no tokens); give some text", "empty_prompt")
        if count + wanted > self.context:
            return PromptRejected(
                f"this model's maximum context length is {self.context} tokens; the prompt has "
                f"{count} tokens and {wanted} were asked for: shorten the prompt or lower max_tokens",
                "context_length_exceeded",
            )
        return None

    def _new_row(self, job: DecodeJob, ids: list[int]) -> _Row:
        torch = self._torch
        row = _Row(job, len(ids))
        row.ids = ids  # the prompt, until the prefill has run it
        if job.options.temperature > 0:
            # as HFGenerator.generate seeds a one-prompt call, so a served request equals a local one
            row.random = torch.Generator().manual_seed(job.options.seed * 100_003)
        if job.options.json_schema is not None:
            row.enforcer = self._json_enforcer(job.options.json_schema)
        return row

    def _prefill(self, expert: str | None, rows: list[_Row]) -> None:
        torch = self._torch
        model, device = self.generator.model, self.generator.device
        ids, mask, positions = (
            t.to(device) for t in left_padded([row.ids for row in rows], self.tokenizer.pad_token_id)
        )
        with torch.inference_mode():
            output = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        for row in rows:
            row.ids = []
        joining = _Batch(rows, output.cache, mask, positions[:, -1:] + 1, output.logits[:, -1].float())
        if self._joinable is None:
            from transformers.cache_utils import DynamicLayer

            self._joinable = all(type(layer) is DynamicLayer for layer in output.cache.layers)
        running = self._batches.get(expert)
        self._batches[expert] = joining if running is None else _merged(running, joining)

    def _step(self, expert: str | None) -> None:
        """One token for every live row of ``expert``'s batch, then one forward pass for those that go on."""
        torch = self._torch
        batch = self._batches[expert]
        now = time.monotonic()
        keep: list[int] = []
        tokens: list[int] = []
        for slot, row in enumerate(batch.rows):
            if row.job.cancelled:
                _deliver(row.job, RequestCancelled("the client went away while the request ran"))
                continue
            if now > row.job.deadline:
                _deliver(row.job, DeadlinePassed("the request timed out while decoding"))
                continue
            try:
                token = self._next_token(row, batch.logits[slot])
                goes_on = self._advance(row, token)
            except Exception as exc:  # e.g. a grammar that fails on this text: this row fails, not the batch
                _deliver(row.job, exc)
                continue
            if goes_on:
                keep.append(slot)
                tokens.append(token)
        self.step_sizes[len(batch.rows)] += 1
        if not keep:
            del self._batches[expert]
            return
        if len(keep) < len(batch.rows):
            _select(batch, keep, trim=bool(self._joinable))
        device = self.generator.device
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(keep), 1))], dim=1)
        with torch.inference_mode():
            output = self.generator.model(
                input_ids=torch.tensor(tokens, device=device)[:, None],
                attention_mask=batch.mask,
                position_ids=batch.position,
                cache=batch.cache,
                use_cache=True,
            )
        batch.cache, batch.position, batch.logits = output.cache, batch.position + 1, output.logits[:, -1].float()

    def _next_token(self, row: _Row, logits) -> int:
        """The row's next token: its options applied to the raw logits, then greedy or its own draw."""
        torch = self._torch
        options = row.job.options
        scores = logits
        if (options.presence_penalty or options.frequency_penalty) and row.ids:
            seen, counts = torch.tensor(row.ids).unique(return_counts=True)
            scores = scores.clone()
            scores[seen.to(scores.device)] -= options.presence_penalty + options.frequency_penalty * counts.to(scores)
        if options.logit_bias:
            scores = scores.clone() if scores is logits else scores
            for token, bias in options.logit_bias:
                if token < scores.shape[-1]:
                    scores[token] += bias
        if row.enforcer is not None:
            allowed = row.enforcer.get_allowed_tokens(row.ids).allowed_tokens or sorted(self.ends)
            mask = torch.full_like(scores, float("-inf"))
            mask[torch.tensor(allowed, device=scores.device)] = 0
            scores = scores + mask
        if options.temperature <= 0:
            token = int(scores.argmax())
        else:
            candidates, probabilities = self._distribution(options.temperature, options.top_p)(scores[None])
            choice = torch.multinomial(probabilities.cpu(), num_samples=1, generator=row.random)
            token = int(candidates[0, choice[0, 0].item()])
        if options.logprobs is not None:
            row.pending.append(self._logprob(row, logits, token, options.logprobs))
        return token

    def _logprob(self, row: _Row, logits, token: int, top: int) -> TokenLogprob:
        torch = self._torch
        logprobs = torch.log_softmax(logits, dim=-1)
        best = torch.topk(logprobs, top) if top else None
        pairs = () if best is None else tuple(zip(map(self._token_text, best.indices.tolist()), best.values.tolist()))
        return TokenLogprob(self._token_text(token), float(logprobs[token]), pairs, len(row.text.rstrip("\ufffd")))

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _advance(self, row: _Row, token: int) -> bool:
        """Add ``token`` to the row and stream what text is safe to send; False when the row ended."""
        options = row.job.options
        if token in self.ends:
            self._finish(row, "stop")
            return False
        row.ids.append(token)
        row.text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        if (options.stop and cut_at_stop(row.text, options.stop)[1]) or (row.enforcer and _whole_json(row.text)):
            self._finish(row, "stop")
            return False
        if len(row.ids) >= options.max_new_tokens or row.prompt_tokens + len(row.ids) >= self.context:
            self._finish(row, "length")
            return False
        if not row.job.stream:
            return True
        ready = len(row.text) - held_back(row.text, options.stop)
        if ready > row.sent or row.pending:
            _deliver(row.job, Delta(row.text[row.sent : ready], tuple(row.pending)))
            row.sent, row.pending = max(ready, row.sent), []
        return True

    def _finish(self, row: _Row, reason: str) -> None:
        text, _ = cut_at_stop(row.text, row.job.options.stop)
        if len(text) > row.sent or row.pending:
            _deliver(row.job, Delta(text[row.sent :], tuple(row.pending)))
        _deliver(row.job, Finished(reason, len(row.ids)))

    def _start_json_tokenizer_data(self) -> Future:
        """The vocabulary as lm-format-enforcer's prefix tree, built once per server on a thread of its
        own from the start (it takes seconds on a real vocabulary; on the model thread it would stall
        every live stream). Without lm-format-enforcer, JSON requests get the error saying so."""
        built: Future = Future()
        if importlib.util.find_spec("lmformatenforcer") is None:
            built.set_exception(
                SelfspecError("response_format needs lm-format-enforcer: pip install 'lm-format-enforcer>=0.11'")
            )
            return built

        def build() -> None:
            try:
                built.set_result(json_tokenizer_data(self.tokenizer, sorted(self.ends)))
            except Exception as exc:  # delivered to the JSON requests that need it
                built.set_exception(exc)

        threading.Thread(target=build, name="selfspec-json-vocabulary", daemon=True).start()
        return built

    def _json_enforcer(self, schema: str):
        """A grammar that lets through only the tokens that keep the text valid JSON (of ``schema``)."""
        vocabulary = self._json_tokenizer_data.result()  # built by now: see _admissible
        from lmformatenforcer import JsonSchemaParser, TokenEnforcer

        return TokenEnforcer(vocabulary, JsonSchemaParser(json.loads(schema)))

    def _score(self, job: ScoreJob) -> None:
        if job.cancelled:
            _deliver(job, RequestCancelled("the client went away before the request ran"))
            return
        if time.monotonic() > job.deadline:
            _deliver(job, DeadlinePassed("the request timed out waiting for the model"))
            return
        try:
            self._route([job])
            with self._as_expert(job.expert):
                _deliver(job, score_tokens(self.generator, job.items))
        except Exception as exc:
            _deliver(job, exc)

    def _as_expert(self, expert: str | None):
        return self.experts.use(expert) if self.experts is not None and expert else contextlib.nullcontext()


def _merged(running: _Batch, joining: _Batch) -> _Batch:
    """One batch of both: caches and masks left-padded to the longer of the two, rows stacked."""
    import torch

    width = max(running.mask.shape[1], joining.mask.shape[1])
    for layer, other in zip(running.cache.layers, joining.cache.layers):
        layer.keys = torch.cat([_pad_left(layer.keys, width), _pad_left(other.keys, width)])
        layer.values = torch.cat([_pad_left(layer.values, width), _pad_left(other.values, width)])
    return _Batch(
        running.rows + joining.rows,
        running.cache,
        torch.cat([_pad_left(running.mask, width, dim=1), _pad_left(joining.mask, width, dim=1)]),
        torch.cat([running.position, joining.position]),
        torch.cat([running.logits, joining.logits]),
    )


def _pad_left(tensor, width: int, dim: int = -2):
    """``tensor`` with zeros in front along ``dim`` up to ``width`` (keys and values: the sequence axis)."""
    import torch.nn.functional as functional

    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pads = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [missing, 0]
    return functional.pad(tensor, pads)


def _select(batch: _Batch, keep: list[int], trim: bool) -> None:
    """Only the ``keep`` rows stay; with ``trim`` (a plain full-attention cache), cache columns no
    remaining row attends to are cut off too."""
    import torch

    chosen = torch.tensor(keep, device=batch.mask.device)
    batch.rows = [batch.rows[slot] for slot in keep]
    batch.mask, batch.position, batch.logits = batch.mask[chosen], batch.position[chosen], batch.logits[chosen]
    batch.cache.batch_select_indices(chosen)
    if trim:
        start = int(batch.mask.any(dim=0).nonzero()[0])
        for layer in batch.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
        batch.mask = batch.mask[:, start:]


def _whole_json(text: str) -> bool:
    """Whether ``text`` is one complete JSON value: a constrained row is done then (the grammar would
    only let whitespace follow, which a small model may pick over the end of sequence for a while)."""
    try:
        json.loads(text)
    except ValueError:
        return False
    return text.rstrip()[-1:] in ("}", "]")


def _deliver(job: DecodeJob | ScoreJob, event: Any) -> None:
    """Hand ``event`` to the job's request; a request that can no longer take it is cancelled."""
    try:
        job.deliver(event)
    except Exception:
        job.cancelled = True


def json_tokenizer_data(tokenizer, ends: list[int]):
    """lm-format-enforcer's view of the vocabulary: each regular token's text and whether it starts a
    word. Built here, as its transformers integration does, because that module imports names
    transformers 5 no longer has (lm-format-enforcer 0.11)."""
    from lmformatenforcer import TokenEnforcerTokenizerData

    anchor = tokenizer.encode("0", add_special_tokens=False)[-1]
    special = set(tokenizer.all_special_ids)
    regular = []
    for token in range(len(tokenizer)):
        if token in special:
            continue
        after_anchor = tokenizer.decode([anchor, token])[1:]  # keeps a leading space a lone decode may drop
        regular.append((token, after_anchor, len(after_anchor) > len(tokenizer.decode([token]))))

    def decode(tokens: list[int]) -> str:
        return tokenizer.decode(tokens).rstrip("\ufffd")

    return TokenEnforcerTokenizerData(regular, decode, ends, False, len(tokenizer))


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
