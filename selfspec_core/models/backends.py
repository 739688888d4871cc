"""Generation on existing engines: an OpenAI-compatible server, offline vLLM, and Ray Data actors.

Each class implements the :class:`~selfspec_core.models.generator.Generator` protocol, so the stages do not
know which one runs: ``make_generator`` picks it from ``settings.backend`` and ``settings.executor``.

* ``OpenAIGenerator`` talks to any ``/v1/completions`` server (``selfspec serve``, a vLLM or llama.cpp
  server, Ollama, a hosted API) with the official ``openai`` client, which retries 408/409/429/5xx and
  connection errors with exponential backoff and jitter (and honours ``Retry-After``); a thread pool
  bounds the requests in flight.
* ``VLLMGenerator`` runs ``vllm.LLM`` in-process on a GPU (continuous batching, paged KV cache).
* ``RayGenerator`` runs each call as a Ray Data job whose actors each hold one local generator.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from selfspec_core.errors import SelfspecError
from selfspec_core.models.generator import Completion, Generator, HFGenerator, cut_at_stop, length_batches
from selfspec_core.models.loading import ModelRef, check_adapter, load_model, load_tokenizer


def request_seed(seed: int, index: int) -> int:
    """The seed of prompt ``index`` in a call seeded ``seed``: distinct draws per prompt, fit for any server."""
    return (seed * 100_003 + index) % 2**31


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible servers


class OpenAIGenerator:
    """Completions from an OpenAI-compatible ``/v1/completions`` endpoint, one request per prompt."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        max_retries: int = 5,
        timeout: float = 300.0,
    ):
        from openai import OpenAI

        self.base_url = _api_root(base_url)
        self.max_retries = max_retries
        self.concurrency = max(1, concurrency)
        # Local servers need no key, but the client insists on one.
        self.client = OpenAI(
            base_url=self.base_url, api_key=api_key or "no-key", max_retries=max_retries, timeout=timeout
        )
        self.model = model or self._only_served_model()

    @classmethod
    def from_settings(cls, settings) -> OpenAIGenerator:
        """Build from ``settings.openai``, filling unset values from the environment."""
        options = settings.openai
        base_url = options.base_url or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise SelfspecError(
                "backend openai needs a server: set openai.base_url in the config or OPENAI_BASE_URL "
                "(e.g. http://127.0.0.1:8000/v1 after `selfspec serve`)"
            )
        return cls(
            base_url,
            model=options.model or os.environ.get("SELFSPEC_OPENAI_MODEL"),
            api_key=os.environ.get(options.api_key_env),
            concurrency=options.concurrency,
            max_retries=options.max_retries,
            timeout=options.timeout,
        )

    def generate(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, stop=(), seed=0):
        stop = [s for s in stop if s]

        def one(index: int) -> Completion:
            response = self._call(
                self.client.completions.create,
                model=self.model,
                prompt=prompts[index],
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                stop=stop[:4] or None,
                seed=request_seed(seed, index),
            )
            choice = response.choices[0]
            # Hosted APIs take at most 4 stop strings; the rest are applied here.
            text, stopped = cut_at_stop(choice.text, stop)
            tokens = response.usage.completion_tokens if response.usage else 0
            return Completion(text, stopped or choice.finish_reason == "stop", tokens)

        return self._map(one, len(prompts))

    def loglikelihood(self, requests):
        """Score ``context + continuation`` with ``echo`` and ``logprobs`` and no new tokens (as lm-eval)."""

        def one(index: int) -> tuple[float, int]:
            context, continuation = _space_to_continuation(*requests[index])
            if not continuation:
                raise SelfspecError(f"empty continuation to score after {context[-40:]!r}")
            response = self._call(
                self.client.completions.create,
                model=self.model,
                prompt=context + continuation,
                max_tokens=0,
                echo=True,
                logprobs=1,
                temperature=0.0,
            )
            return _continuation_logprob(response.choices[0].logprobs, len(context), self.base_url)

        return self._map(one, len(requests))

    def _map(self, call: Callable[[int], object], count: int) -> list:
        """``call`` over ``range(count)`` with at most ``concurrency`` requests in flight, in order."""
        pool = ThreadPoolExecutor(
            max_workers=min(self.concurrency, max(1, count)), thread_name_prefix="selfspec-openai"
        )
        try:
            futures = [pool.submit(call, index) for index in range(count)]
            return [future.result() for future in futures]
        finally:  # on a failure, requests not yet sent are dropped
            pool.shutdown(wait=False, cancel_futures=True)

    def _only_served_model(self) -> str:
        names = [model.id for model in self._call(self.client.models.list).data]
        if len(names) != 1:
            listed = ", ".join(names) or "none"
            raise SelfspecError(
                f"{self.base_url} serves {len(names)} models ({listed}): choose one with "
                f"openai.model in the config or SELFSPEC_OPENAI_MODEL"
            )
        return names[0]

    def _call(self, method, **request):
        """One API call (retried by the client); failures become a one-line message naming the server."""
        import openai

        where = self.base_url
        try:
            return method(**request)
        except openai.APITimeoutError as exc:
            raise SelfspecError(
                f"{where} did not answer in {self.max_retries + 1} tries within openai.timeout; "
                f"raise it or lower openai.concurrency"
            ) from exc
        except openai.APIConnectionError as exc:
            raise SelfspecError(
                f"cannot reach {where} after {self.max_retries} retries ({exc}); start the server "
                f"(e.g. `selfspec serve`) or fix openai.base_url / OPENAI_BASE_URL"
            ) from exc
        except openai.AuthenticationError as exc:
            raise SelfspecError(
                f"{where} refused the API key: set the variable named by openai.api_key_env (default OPENAI_API_KEY)"
            ) from exc
        except openai.NotFoundError as exc:
            raise SelfspecError(
                f"{where}: {_server_message(exc)}; check openai.model / SELFSPEC_OPENAI_MODEL "
                f"and that base_url ends in /v1"
            ) from exc
        except openai.BadRequestError as exc:
            scoring = f"; {_CANNOT_SCORE}" if request.get("echo") else ""
            raise SelfspecError(f"{where} rejected the request: {_server_message(exc)}{scoring}") from exc
        except openai.APIStatusError as exc:
            retried = f" after {self.max_retries} retries" if exc.status_code == 429 or exc.status_code >= 500 else ""
            raise SelfspecError(f"{where} answered HTTP {exc.status_code}{retried}: {_server_message(exc)}") from exc


def _api_root(base_url: str) -> str:
    """``http://host:port`` means ``http://host:port/v1``; any other path is kept as given."""
    base_url = base_url.rstrip("/")
    return base_url + "/v1" if urlsplit(base_url).path in ("", "/") else base_url


def _server_message(exc) -> str:
    body = exc.body
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict):
            body = body.get("message", body)
    return str(body or exc.message).strip().splitlines()[0][:300]


def _space_to_continuation(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace to the continuation, so the split falls on a token edge."""
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + continuation


_CANNOT_SCORE = (
    "this server cannot score (it needs echo=true with logprobs=1 and max_tokens=0): use backend hf or "
    "vllm, or a server that supports it (selfspec serve, vLLM)"
)


def _continuation_logprob(logprobs, boundary: int, where: str) -> tuple[float, int]:
    """Sum the log-probabilities of the echoed tokens that reach past character ``boundary``."""
    if logprobs is None or not logprobs.token_logprobs or not logprobs.text_offset:
        raise SelfspecError(f"{where} returned no prompt log-probabilities; {_CANNOT_SCORE}")
    picked = [
        value
        for token, offset, value in zip(logprobs.tokens, logprobs.text_offset, logprobs.token_logprobs)
        if offset + len(token) > boundary
    ]
    if not picked or any(value is None for value in picked):
        raise SelfspecError(f"{where} gave no log-probability for the continuation (is the context empty?)")
    return float(sum(picked)), len(picked)


# --------------------------------------------------------------------------------------------------
# vLLM (offline engine, GPU)

_VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise SelfspecError(
            "backend vllm needs the vllm package, which runs on NVIDIA GPUs: install vllm on a GPU machine "
            '(`pip install vllm`), or use backend = "hf" (any machine) or "openai" (a vLLM server '
            "elsewhere)"
        ) from exc
    return vllm


class VLLMGenerator:
    """Offline ``vllm.LLM``: continuous batching on one GPU; an adapter is applied per request as LoRA."""

    def __init__(self, model_ref: ModelRef, adapter: str | Path | None = None, seed: int = 0):
        vllm = _import_vllm()
        from vllm.lora.request import LoRARequest

        self.tokenizer = load_tokenizer(model_ref)
        engine: dict = {}
        self.lora_request = None
        if adapter is not None:
            config_file = check_adapter(adapter) / "adapter_config.json"
            rank = int(json.loads(config_file.read_text(encoding="utf-8")).get("r", 8))
            engine.update(enable_lora=True, max_lora_rank=next((r for r in _VLLM_LORA_RANKS if r >= rank), rank))
            self.lora_request = LoRARequest("selfspec-adapter", 1, str(adapter))
        try:
            self.llm = vllm.LLM(
                model=model_ref.path, tokenizer=model_ref.path, seed=seed, trust_remote_code=False, **engine
            )
        except Exception as exc:
            raise SelfspecError(f"vLLM could not load {model_ref.path}: {type(exc).__name__}: {exc}") from exc
        self._sampling = vllm.SamplingParams

    def generate(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, stop=(), seed=0):
        sampled = temperature > 0
        params = [
            self._sampling(
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p if sampled else 1.0,
                stop=[s for s in stop if s] or None,
                seed=request_seed(seed, index),
            )
            for index in range(len(prompts))
        ]
        outputs = self.llm.generate(list(prompts), params, use_tqdm=False, lora_request=self.lora_request)
        return [
            Completion(out.outputs[0].text, out.outputs[0].finish_reason == "stop", len(out.outputs[0].token_ids))
            for out in outputs
        ]

    def loglikelihood(self, requests):
        from vllm.inputs import TokensPrompt

        pairs = []
        for context, continuation in requests:
            context_ids = self.tokenizer(context, add_special_tokens=False).input_ids
            continuation_ids = self.tokenizer(continuation, add_special_tokens=False).input_ids
            if not continuation_ids:
                raise SelfspecError(f"empty continuation to score after {context[-40:]!r}")
            pairs.append((context_ids, continuation_ids))
        # prompt_logprobs=1 returns, at every prompt position, the prompt token's own log-probability.
        params = self._sampling(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=c + k) for c, k in pairs],
            params,
            use_tqdm=False,
            lora_request=self.lora_request,
        )
        scores = []
        for (context_ids, continuation_ids), out in zip(pairs, outputs):
            ids = context_ids + continuation_ids
            positions = range(len(context_ids), len(ids))
            scores.append((sum(out.prompt_logprobs[i][ids[i]].logprob for i in positions), len(continuation_ids)))
        return scores


# --------------------------------------------------------------------------------------------------
# Ray Data executor


class RayGenerator:
    """Each call is a Ray Data job: one row per batch of prompts, actors that each load the model once.

    The driver forms the batches exactly as the local generator would (by token length), so greedy
    results equal the local executor's. Sampling is reproducible for the same seed and batch size,
    but the draws differ from the local executor's. Actors load the model per call: use it for the
    large calls (responses, evaluation), where the load is small next to the work.
    """

    def __init__(self, settings, model_ref: ModelRef, adapter: str | Path | None = None, batch_size: int = 8):
        try:
            import ray
        except ImportError as exc:
            raise SelfspecError('executor ray needs Ray: `pip install "ray[data]"`, or use executor = "local"') from exc
        if settings.backend == "openai":
            raise SelfspecError(
                "executor ray runs models in Ray actors; backend openai already runs on its server: "
                'use executor = "local" with it'
            )
        self.settings = dataclasses.replace(settings, executor="local")
        self.model_ref = model_ref
        self.adapter = str(adapter) if adapter is not None else None
        self.batch_size = max(1, batch_size)
        self.tokenizer = load_tokenizer(model_ref)
        if not ray.is_initialized():
            # RAY_ADDRESS names a cluster to join; without it Ray starts on this machine. Actor
            # output stays in Ray's logs; their errors still reach this process.
            ray.init(log_to_driver=False, **({} if os.environ.get("RAY_ADDRESS") else {"include_dashboard": False}))
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False

    def generate(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, stop=(), seed=0):
        batches = length_batches(self.tokenizer, prompts, self.batch_size)
        rows = [
            {"batch": number, "indices": indices, "prompts": [prompts[i] for i in indices]}
            for number, indices in enumerate(batches)
        ]
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=list(stop), seed=seed)
        results: list[Completion | None] = [None] * len(prompts)
        for row in self._run("generate", rows, options):
            for index, text, finished, tokens in zip(row["indices"], row["texts"], row["finished"], row["num_tokens"]):
                results[int(index)] = Completion(str(text), bool(finished), int(tokens))
        return results

    def loglikelihood(self, requests):
        rows = [
            {
                "batch": number,
                "indices": list(range(start, min(start + self.batch_size, len(requests)))),
                "contexts": [c for c, _ in requests[start : start + self.batch_size]],
                "continuations": [k for _, k in requests[start : start + self.batch_size]],
            }
            for number, start in enumerate(range(0, len(requests), self.batch_size))
        ]
        scores: list[tuple[float, int] | None] = [None] * len(requests)
        for row in self._run("loglikelihood", rows, {}):
            for index, logprob, count in zip(row["indices"], row["logprobs"], row["counts"]):
                scores[int(index)] = (float(logprob), int(count))
        return scores

    def _gpus_per_actor(self) -> float:
        """As configured; a vLLM actor gets one GPU unless told otherwise."""
        return self.settings.ray.gpus_per_actor or (1.0 if self.settings.backend == "vllm" else 0.0)

    def _run(self, task: str, rows: list[dict], options: dict) -> list[dict]:
        import ray

        if not rows:
            return []
        actors = min(self.settings.ray.actors, len(rows))
        dataset = ray.data.from_items(rows).map_batches(
            GenerationActor,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=self.settings.ray.cpus_per_actor,
            num_gpus=self._gpus_per_actor(),
            fn_constructor_kwargs=dict(
                settings=self.settings, model_ref=self.model_ref, adapter=self.adapter, batch_size=self.batch_size
            ),
            fn_kwargs=dict(task=task, options=options),
        )
        try:
            return dataset.take_all()
        except Exception as exc:
            raise SelfspecError(
                f"Ray job failed ({type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}); "
                f"the model path must be readable on every Ray node"
            ) from exc


class GenerationActor:
    """A Ray Data actor holding one local generator; each call handles one row = one batch of prompts."""

    def __init__(self, settings, model_ref: ModelRef, adapter: str | None, batch_size: int):
        self.generator = make_generator(settings, model_ref, adapter=adapter, batch_size=batch_size)

    def __call__(self, rows: dict, task: str, options: dict) -> dict:
        out: dict[str, list] = {"indices": list(rows["indices"])}
        if task == "generate":
            completions = [
                self.generator.generate(
                    [str(p) for p in prompts], **{**options, "seed": request_seed(options["seed"], int(number))}
                )
                for number, prompts in zip(rows["batch"], rows["prompts"])
            ]
            out["texts"] = [[c.text for c in batch] for batch in completions]
            out["finished"] = [[c.finished for c in batch] for batch in completions]
            out["num_tokens"] = [[c.num_tokens for c in batch] for batch in completions]
        else:
            scores = [
                self.generator.loglikelihood(list(zip(map(str, contexts), map(str, continuations))))
                for contexts, continuations in zip(rows["contexts"], rows["continuations"])
            ]
            out["logprobs"] = [[s for s, _ in batch] for batch in scores]
            out["counts"] = [[n for _, n in batch] for batch in scores]
        return out


def make_generator(settings, model_ref: ModelRef, adapter=None, batch_size: int | None = None) -> Generator:
    """The backend named by ``settings.backend`` for ``model_ref`` (plus an optional adapter), run by
    ``settings.executor`` (``local``: in this process; ``ray``: as Ray Data jobs)."""
    if settings.executor == "ray":
        return RayGenerator(settings, model_ref, adapter, batch_size or 8)
    if settings.backend == "hf":
        model = load_model(model_ref, adapter=adapter, dtype=settings.dtype)
        return HFGenerator(model, load_tokenizer(model_ref), batch_size or 8)
    if settings.backend == "vllm":
        return VLLMGenerator(model_ref, adapter, seed=settings.seed)
    if settings.backend == "openai":
        if adapter is not None:
            raise SelfspecError(
                f"backend openai cannot apply adapter {adapter} itself: serve it with "
                f"`selfspec serve --adapter {shlex.quote(str(adapter))}` and point openai.base_url at that server"
            )
        return OpenAIGenerator.from_settings(settings)
    raise SelfspecError(f"unknown backend {settings.backend!r}: choose hf, vllm or openai")
