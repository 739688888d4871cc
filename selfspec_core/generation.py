"""Batched text generation and log-likelihood scoring behind one backend interface.

Every stage that needs the model (instructions, responses, data-quality checks, evaluation) talks to
a :class:`Generator`. ``HFGenerator`` runs transformers in-process: prompts are sorted by length and
left-padded into batches so one ``generate`` call with a KV cache serves many prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from .errors import SelfspecError
from .throughput import timed_call


@dataclass(frozen=True)
class Completion:
    text: str
    finished: bool  # False when cut off at max_new_tokens
    num_tokens: int


class Generator(Protocol):
    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, stop: Sequence[str] = (), seed: int = 0) -> list[Completion]:
        """Complete each prompt; sampling is seeded so the same call gives the same texts."""

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, int]]:
        """For each ``(context, continuation)``: summed log-probability of the continuation and its token count."""


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def token_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices, longest first, grouped so that each group padded to its longest holds at most
    ``batch_tokens`` tokens (a single longer sequence is a group of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def padded(rows: Sequence[Sequence[int]], pad: int, left: bool = False):
    """``rows`` of token ids as one ``(ids, attention mask)`` pair of tensors, padded to the longest
    row on the right (or on the ``left``, where generation and last-token scoring need the ends aligned)."""
    import torch

    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for number, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[number, span] = torch.tensor(row, dtype=torch.long)
        mask[number, span] = 1
    return ids, mask


def length_batches(tokenizer, texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar token length: less padding, same results."""
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class HFGenerator:
    """In-process transformers backend (CPU or one GPU)."""

    def __init__(self, model, tokenizer, batch_size: int = 8, batch_tokens: int = 4096):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, batch_size)  # prompts decoded together
        self.batch_tokens = max(1, batch_tokens)  # padded tokens per scoring forward pass
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    @property
    def device(self):
        return next(self.model.parameters()).device

    def generate(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, stop=(), seed=0):
        import torch

        results: list[Completion | None] = [None] * len(prompts)
        self.tokenizer.padding_side = "left"
        for number, batch in enumerate(length_batches(self.tokenizer, prompts, self.batch_size)):
            encoded = self.tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                                     add_special_tokens=False).to(self.device)
            sampling = temperature > 0
            options = dict(max_new_tokens=max_new_tokens, do_sample=sampling,
                           pad_token_id=self.tokenizer.pad_token_id)
            if sampling:
                options.update(temperature=temperature, top_p=top_p)
            else:
                options.update(temperature=None, top_p=None, top_k=None)
            if stop:
                options["stopping_criteria"] = [_StopStrings(self.tokenizer, stop, encoded.input_ids.shape[1])]
            torch.manual_seed(seed * 100_003 + number)
            with torch.inference_mode(), timed_call(self.model, int(encoded.attention_mask.sum())) as generated:
                output = self.model.generate(**encoded, **options)
                new_tokens = output[:, encoded.input_ids.shape[1]:]
                for row, index in enumerate(batch):
                    ids = new_tokens[row].tolist()
                    ended = self.tokenizer.eos_token_id in ids
                    if ended:
                        ids = ids[: ids.index(self.tokenizer.eos_token_id)]
                    while ids and ids[-1] == self.tokenizer.pad_token_id:
                        ids.pop()
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    text, stopped = cut_at_stop(text, stop)
                    results[index] = Completion(text, ended or stopped or len(ids) < max_new_tokens, len(ids))
                    generated.append(len(ids))
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests):
        """Scores requests, running each context once: when every continuation of a context is one
        token (labels such as yes/no/maybe), one forward pass of the context scores them all; longer
        continuations of a shared context (label names, answer options) are run on its cached keys
        and values, so a long prompt with eight options costs one pass, not eight."""
        pairs = []
        for context, continuation in requests:
            continuation_ids = self.tokenizer(continuation, add_special_tokens=False).input_ids
            if not continuation_ids:
                raise SelfspecError(f"empty continuation to score after {context[-40:]!r}")
            pairs.append((context, continuation_ids))
        groups: dict[str, list[int]] = {}
        for index, (context, _) in enumerate(pairs):
            groups.setdefault(context, []).append(index)
        sequences: list[list[int]] = []
        by_sequence: dict[int, list[int]] = {}  # sequence number -> requests scored on its next token
        scores: list[tuple[float, int] | None] = [None] * len(pairs)
        for context, members in groups.items():
            context_ids = self.tokenizer(context, add_special_tokens=False).input_ids
            if all(len(pairs[i][1]) == 1 for i in members):
                sequences.append(context_ids)
                by_sequence[len(sequences) - 1] = members
            else:
                for i, score in zip(members, self._score_on_cached_context(context_ids, [pairs[i][1] for i in members])):
                    scores[i] = score
        for sequence, logprobs in self._next_token_logprobs(sequences):
            for index in by_sequence[sequence]:
                scores[index] = (logprobs[pairs[index][1][0]].item(), 1)
        return scores  # type: ignore[return-value]

    def _score_on_cached_context(self, context_ids: list[int], continuations: list[list[int]]) -> list[tuple[float, int]]:
        """``(log-probability, tokens)`` of each continuation after one context, the context run once."""
        import torch

        pad, count = self.tokenizer.pad_token_id, len(continuations)
        width = max(len(c) for c in continuations)
        ids = torch.full((count, width), pad, dtype=torch.long)
        mask = torch.zeros((count, len(context_ids) + width), dtype=torch.long)
        mask[:, :len(context_ids)] = 1
        for row, continuation in enumerate(continuations):
            ids[row, :len(continuation)] = torch.tensor(continuation)
            mask[row, len(context_ids):len(context_ids) + len(continuation)] = 1
        with torch.inference_mode(), timed_call(self.model, len(context_ids) + int(mask[:, len(context_ids):].sum())):
            prefix = self.model(input_ids=torch.tensor([context_ids], device=self.device), use_cache=True)
            cache = prefix.cache
            cache.batch_repeat_interleave(count)
            rest = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), cache=cache).logits
        # the context's last position predicts each continuation's first token, the continuation the rest
        logits = torch.cat([prefix.logits[0, -1:].expand(count, 1, -1), rest], dim=1).float().cpu()
        logprobs = torch.log_softmax(logits, dim=-1)
        return [(logprobs[row, torch.arange(len(c)), torch.tensor(c)].sum().item(), len(c))
                for row, c in enumerate(continuations)]

    def _next_token_logprobs(self, sequences: list[list[int]]):
        """Yield ``(sequence number, log-probabilities of the token that follows it)``.

        Sequences of similar length share a batch of about ``batch_tokens`` padded tokens (many short
        prompts or a few long ones), left-padded with matching position ids, so only the last position
        of each row reaches the output layer: for a small model with a large vocabulary that layer is
        a fifth of the compute, and the full logits tensor would be the largest allocation.
        """
        import torch

        for batch in token_batches([len(s) for s in sequences], self.batch_tokens):
            ids, mask = padded([sequences[i] for i in batch], self.tokenizer.pad_token_id, left=True)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode(), timed_call(self.model, int(mask.sum())):
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                    position_ids=positions.to(self.device), logits_to_keep=1).logits[:, -1]
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, index in enumerate(batch):
                yield index, logprobs[row]


class _StopStrings:
    """Ends each sequence once its new text contains a stop string.

    transformers' own ``stop_strings`` precomputes tables over the whole vocabulary on every call,
    which doubled generation time on SmolLM2; decoding the last few tokens of each row is cheaper.
    """

    def __init__(self, tokenizer, stop: Sequence[str], prompt_length: int):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.prompt_length = prompt_length
        self.window = max(map(len, self.stop)) + 2  # every token is at least one character

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        tails = self.tokenizer.batch_decode(input_ids[:, max(self.prompt_length, input_ids.shape[1] - self.window):])
        return torch.tensor([any(s in tail for s in self.stop) for tail in tails], device=input_ids.device)


def make_generator(settings, model_ref, adapter=None, batch_size: int | None = None) -> Generator:
    """The backend named by ``settings.backend`` for ``model_ref`` (plus an optional adapter), run by
    ``settings.executor`` (``local``: in this process; ``ray``: as Ray Data jobs)."""
    from .models import load_model, load_tokenizer

    if settings.backend == "hf" and settings.executor == "local":
        model = load_model(model_ref, adapter=adapter, dtype=settings.dtype)
        return HFGenerator(model, load_tokenizer(model_ref), batch_size or 8)
    from .backends import make_backend

    return make_backend(settings, model_ref, adapter=adapter, batch_size=batch_size)
