"""Batched text generation and log-likelihood scoring behind one backend interface.

Every stage that needs the model (instructions, responses, data-quality checks, evaluation) talks to
a :class:`Generator`. ``HFGenerator`` runs transformers in-process: prompts are sorted by length and
left-padded into batches so one ``generate`` call with a KV cache serves many prompts.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from selfspec_core.errors import SelfspecError
from selfspec_core.models.packed_linear import pack_linears
from selfspec_core.runtime.throughput import timed_call


@dataclass(frozen=True)
class Completion:
    text: str
    finished: bool  # False when cut off at max_new_tokens
    num_tokens: int


class Generator(Protocol):
    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int = 0,
    ) -> list[Completion]:
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


def alike_lengths(lengths: Sequence[int], waste: float = 1.25) -> list[list[int]]:
    """Indices grouped shortest first so that each group, padded to its longest, holds at most
    ``waste`` times its real tokens (a group grows while the next length keeps it so)."""
    groups: list[list[int]] = []
    real = 0
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups and lengths[index] * (len(groups[-1]) + 1) <= waste * (real + lengths[index]):
            groups[-1].append(index)
            real += lengths[index]
        else:
            groups.append([index])
            real = lengths[index]
    return groups


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


def left_padded(rows: Sequence[Sequence[int]], pad: int):
    """``rows`` left-padded as ``(ids, attention mask, position ids)``: positions count from each
    row's first real token, so a padded row sees the same positions as it would alone."""
    ids, mask = padded(rows, pad, left=True)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def length_batches(tokenizer, texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar token length: less padding, same results."""
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


GENERATE_TOP_K = 50  # what transformers' ``generate`` samples from when the model's config sets no top_k


class HFGenerator:
    """In-process transformers backend (CPU or one GPU)."""

    def __init__(self, model, tokenizer, batch_size: int = 8, batch_tokens: int = 4096):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, batch_size)  # prompts decoded together
        self.batch_tokens = max(1, batch_tokens)  # padded tokens per scoring forward pass
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if not hasattr(model, "peft_config"):  # a PEFT model's adapters could still be merged into its weights
            pack_linears(model)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def generate(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, stop=(), seed=0):
        import torch

        results: list[Completion | None] = [None] * len(prompts)
        sample = self._sampler(temperature, top_p)
        for number, batch in enumerate(length_batches(self.tokenizer, prompts, self.batch_size)):
            rows = [self.tokenizer(prompts[i], add_special_tokens=False).input_ids for i in batch]
            torch.manual_seed(seed * 100_003 + number)
            with torch.inference_mode(), timed_call(self.model, sum(map(len, rows))) as generated:
                for index, (ids, ended) in zip(batch, self._decode(rows, max_new_tokens, sample, stop)):
                    text, stopped = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), stop)
                    results[index] = Completion(text, ended or stopped or len(ids) < max_new_tokens, len(ids))
                    generated.append(len(ids))
        return results  # type: ignore[return-value]

    def _sampler(self, temperature: float, top_p: float):
        """Next tokens from last-position logits: greedy, or drawn from :meth:`_distribution`."""
        import torch

        if temperature <= 0:
            return lambda logits: logits.argmax(dim=-1)
        distribution = self._distribution(temperature, top_p)

        def sample(logits):
            candidates, probabilities = distribution(logits)
            return candidates.gather(-1, torch.multinomial(probabilities, num_samples=1))[:, 0]

        return sample

    def _distribution(self, temperature: float, top_p: float):
        """``logits -> (candidate token ids, their probabilities)``, as transformers' ``generate``
        samples: temperature, top-k (the model's generation config, default 50), then top-p, with its
        warpers. Top-p runs on the top-k candidates only, the same distribution as over the whole
        vocabulary at a fraction of the cost: sorting and sampling 49k-token rows at every step took a
        fifth of a decoding step on a CPU."""
        import torch
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

        top_k = self.model.generation_config.top_k or GENERATE_TOP_K
        scale = TemperatureLogitsWarper(temperature)
        nucleus = TopPLogitsWarper(top_p) if top_p < 1.0 else None

        def distribution(logits):
            values, candidates = scale(None, logits).topk(min(top_k, logits.shape[-1]), dim=-1)
            if nucleus is not None:
                values = nucleus(None, values)
            return candidates, torch.softmax(values, dim=-1)

        return distribution

    def _decode(
        self, rows: list[list[int]], max_new_tokens: int, sample, stop: Sequence[str]
    ) -> list[tuple[list[int], bool]]:
        """New token ids of each prompt row and whether it ended (end of sequence or a stop string).

        One left-padded batch with a KV cache, as ``model.generate``, but a row that has ended leaves
        the batch (and the cache) at once instead of decoding padding until the longest row ends.
        Measured on SmolLM2 on 2 CPU cores, the gain is within noise: a decoding step there costs
        mostly small matrix products, not the finished rows. Writing the cache into preallocated
        buffers instead of growing it by ``torch.cat`` measured no gain either (bench/generate.py,
        28.9 s against 27.9 s). The prompts' pass without the padding's work (:func:`prefill`) is
        faster by itself: 6.70 s against 8.17 s on bench/generate.py's 16 prompts (medians of five
        alternating runs, all packed ones faster, 2-core EPYC), though over the whole batch (~28 s) the
        gain is within this machine's run-to-run noise.
        """
        import torch

        ends = {self.tokenizer.eos_token_id, *_as_list(self.model.generation_config.eos_token_id)}
        window = max((len(s) for s in stop if s), default=0) + 2  # characters; every token has one at least
        ids, mask, positions = (t.to(self.device) for t in left_padded(rows, self.tokenizer.pad_token_id))
        logits, cache = prefill(self.model, ids, mask, positions)
        position = positions[:, -1:] + 1
        new: list[list[int]] = [[] for _ in rows]
        ended = [False] * len(rows)
        live = list(range(len(rows)))  # the rows still in the batch, in batch order
        for _ in range(max_new_tokens):
            tokens = sample(logits.float())
            keep = []
            for slot, (row, token) in enumerate(zip(live, tokens.tolist())):
                if token in ends:
                    ended[row] = True
                    continue
                new[row].append(token)
                if stop and any(s in self.tokenizer.decode(new[row][-window:]) for s in stop if s):
                    ended[row] = True
                elif len(new[row]) < max_new_tokens:
                    keep.append(slot)
            if not keep:
                break
            if len(keep) < len(live):
                chosen = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(chosen)
                mask, position, tokens = mask[chosen], position[chosen], tokens[chosen]
                live = [live[slot] for slot in keep]
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            logits = self.model(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=position,
                cache=cache,
                use_cache=True,
            ).logits[:, -1]
            position = position + 1
        return list(zip(new, ended))

    def loglikelihood(self, requests):
        """Scores requests, running each context once: when every continuation of a context is one
        token (labels such as yes/no/maybe), one forward pass of the context scores them all; longer
        continuations of a shared context (label names, answer options) are run on its cached keys
        and values, so a long prompt with eight options costs one pass, not eight. Either way,
        contexts of similar length share a batch."""
        pairs = []
        for context, continuation in requests:
            continuation_ids = self.tokenizer(continuation, add_special_tokens=False).input_ids
            if not continuation_ids:
                raise SelfspecError(f"empty continuation to score after {context[-40:]!r}")
            pairs.append((context, continuation_ids))
        groups: dict[str, list[int]] = {}
        for index, (context, _) in enumerate(pairs):
            groups.setdefault(context, []).append(index)
        single: list[tuple[list[int], list[int]]] = []  # (context ids, requests scored on its next token)
        longer: list[tuple[list[int], list[int]]] = []
        for context, members in groups.items():
            context_ids = self.tokenizer(context, add_special_tokens=False).input_ids
            (single if all(len(pairs[i][1]) == 1 for i in members) else longer).append((context_ids, members))
        scores: list[tuple[float, int] | None] = [None] * len(pairs)
        for number, logprobs in self._next_token_logprobs([ids for ids, _ in single]):
            for index in single[number][1]:
                scores[index] = (logprobs[pairs[index][1][0]].item(), 1)
        for number, results in self._score_on_cached_contexts(
            [(ids, [pairs[i][1] for i in members]) for ids, members in longer]
        ):
            for index, score in zip(longer[number][1], results):
                scores[index] = score
        return scores  # type: ignore[return-value]

    def _score_on_cached_contexts(self, groups: list[tuple[list[int], list[list[int]]]]):
        """Yield ``(group number, [(log-probability, tokens) of each continuation])`` for groups of
        ``(context ids, continuations)``: contexts of similar length run together once (left-padded),
        then their keys and values are repeated for each of their continuations, which run in
        right-padded batches of alike length on them (:func:`alike_lengths`): padded to the longest
        of all, a benchmark's answer options of 1 to 20 tokens held 2.5 padding positions for each
        real one, each through the whole model and the float32 output layer."""
        import torch

        pad = self.tokenizer.pad_token_id
        for batch in token_batches([len(ids) for ids, _ in groups], self.batch_tokens):
            ids, mask, positions = left_padded([groups[i][0] for i in batch], pad)
            continuations = [c for i in batch for c in groups[i][1]]
            owner = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor([len(groups[i][1]) for i in batch]))
            results: list[tuple[float, int]] = [(0.0, 0)] * len(continuations)
            with torch.inference_mode(), timed_call(self.model, int(mask.sum()) + sum(map(len, continuations))):
                prefix = self.model(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    position_ids=positions.to(self.device),
                    use_cache=True,
                    logits_to_keep=1,
                )
                chunks = alike_lengths([len(c) for c in continuations])
                for number, chunk in enumerate(chunks):
                    rows = owner[chunk]
                    # the last chunk may take the prefix's cache itself: the selection replaces its tensors
                    cache = prefix.cache if number == len(chunks) - 1 else copy.deepcopy(prefix.cache)
                    cache.batch_select_indices(rows.to(self.device))
                    following, following_mask = padded([continuations[i] for i in chunk], pad)
                    width = following.shape[1]
                    rest = self.model(
                        input_ids=following.to(self.device),
                        attention_mask=torch.cat([mask[rows], following_mask], dim=1).to(self.device),
                        position_ids=(positions[rows, -1:] + 1 + torch.arange(width)).to(self.device),
                        cache=cache,
                    ).logits
                    # each context's last position predicts its continuations' first tokens, they the rest
                    logits = torch.cat([prefix.logits[rows.to(self.device), -1:], rest[:, :-1]], dim=1).float().cpu()
                    logprobs = torch.log_softmax(logits, dim=-1)
                    for row, index in enumerate(chunk):
                        tokens = continuations[index]
                        total = logprobs[row, torch.arange(len(tokens)), torch.tensor(tokens)].sum().item()
                        results[index] = (total, len(tokens))
            start = 0
            for number in batch:
                count = len(groups[number][1])
                yield number, results[start : start + count]
                start += count

    def _next_token_logprobs(self, sequences: list[list[int]]):
        """Yield ``(sequence number, log-probabilities of the token that follows it)``.

        Sequences of similar length share a batch of about ``batch_tokens`` padded tokens (many short
        prompts or a few long ones), left-padded with matching position ids, so only the last position
        of each row reaches the output layer: for a small model with a large vocabulary that layer is
        a fifth of the compute, and the full logits tensor would be the largest allocation.
        """
        import torch

        for batch in token_batches([len(s) for s in sequences], self.batch_tokens):
            ids, mask, positions = left_padded([sequences[i] for i in batch], self.tokenizer.pad_token_id)
            with torch.inference_mode(), timed_call(self.model, int(mask.sum())):
                logits = self.model(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    position_ids=positions.to(self.device),
                    logits_to_keep=1,
                ).logits[:, -1]
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, index in enumerate(batch):
                yield index, logprobs[row]


PACKED_PREFILL_MODEL_TYPES = ("llama",)
"""Architectures whose layers mix tokens only in attention (everything else is per token), so a
prompt pass may run their other layers on the real tokens alone: :func:`prefill`."""
# transformers' attention (and mask) registry name of the prompts' pass; not train.py's, which
# registers its own function for training under its own name in the same process
PACKED_PREFILL_ATTENTION = "selfspec_packed_prefill"


def prefill(model, ids, mask, positions):
    """The prompts' pass of a left-padded batch: each row's last-position logits and the KV cache.

    Where the batch has padding and the architecture allows it (:data:`PACKED_PREFILL_MODEL_TYPES`,
    SDPA attention), only the real tokens go through the embeddings, projections, norms and MLPs,
    packed into one row, and attention alone runs on the padded layout, with the mask the padded
    pass would use: the same numbers for every real token (each of those operations computes a
    token's row by itself; attention sees the same shapes and mask) without the padding's share of
    the work (a quarter of the tokens of 16 stage prompts). Padding positions in the cache hold
    zeros instead of the padding token's keys and values; the mask hides them either way. The
    model's attention implementation is switched for this one call; the registered function is
    plain SDPA for any call without the packing argument.
    """
    import torch
    from transformers.cache_utils import DynamicCache
    from transformers.masking_utils import create_causal_mask

    config = getattr(model, "config", None)
    batch, width = ids.shape
    real = int(mask.sum())
    if (
        real == batch * width
        or getattr(config, "model_type", None) not in PACKED_PREFILL_MODEL_TYPES
        or getattr(config, "_attn_implementation", None) != "sdpa"
    ):
        output = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        return output.logits[:, -1], output.cache
    cache = DynamicCache(config=config)
    # the 4-D mask the padded pass builds for itself (an empty cache, the padded shape)
    shape = torch.empty((batch, width, 1), dtype=model.dtype, device=ids.device)
    padded_mask = create_causal_mask(
        config=config, inputs_embeds=shape, attention_mask=mask, cache=cache, position_ids=positions
    )
    packing = _Packing(mask.reshape(-1).nonzero()[:, 0], batch, width)
    _register_packed_attention()
    previous, config._attn_implementation = config._attn_implementation, PACKED_PREFILL_ATTENTION
    try:
        output = model(
            input_ids=ids.reshape(-1)[packing.index][None],
            attention_mask=padded_mask,
            position_ids=positions.reshape(-1)[packing.index][None],
            use_cache=False,
            logits_to_keep=mask.sum(-1).cumsum(0) - 1,  # each row's last token among the packed ones
            selfspec_packing=packing,
        )
    finally:
        config._attn_implementation = previous
    for number, (keys, values) in sorted(packing.keys_values.items()):
        cache.update(keys, values, number)
    return output.logits[0], cache


class _Packing:
    """The real tokens of a ``batch x width`` left-padded batch as one packed row (``index``: their
    places in the flattened batch), and the padded keys and values each attention layer saw."""

    def __init__(self, index, batch: int, width: int):
        self.index, self.batch, self.width = index, batch, width
        self.keys_values: dict[int, tuple] = {}

    def spread(self, states):
        """``(1, heads, tokens, dim)`` packed -> ``(batch, heads, width, dim)`` padded (zeros), laid
        out in memory as the padded pass's projections are."""
        heads, dim = states.shape[1], states.shape[-1]
        flat = states.new_zeros((self.batch * self.width, heads, dim))
        flat[self.index] = states[0].transpose(0, 1)
        return flat.view(self.batch, self.width, heads, dim).transpose(1, 2)

    def gather(self, output):
        """``(batch, width, heads, dim)`` padded attention output -> ``(1, tokens, heads, dim)``."""
        return output.reshape(self.batch * self.width, *output.shape[2:])[self.index][None]


def _packed_attention(module, query, key, value, attention_mask, selfspec_packing=None, **kwargs):
    """SDPA on the padded layout for a packed pass (:func:`prefill`); plain SDPA for any other call."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packing = selfspec_packing
    if packing is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    keys, values = packing.spread(key), packing.spread(value)
    packing.keys_values[module.layer_idx] = (keys, values)
    output, weights = sdpa_attention_forward(module, packing.spread(query), keys, values, attention_mask, **kwargs)
    return packing.gather(output), weights


@functools.cache
def _register_packed_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(PACKED_PREFILL_ATTENTION, _packed_attention)
    AttentionMaskInterface.register(PACKED_PREFILL_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
