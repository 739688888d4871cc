"""Attention for padding-free training rows: each example's span of a packed row attends to itself only.

Training concatenates a batch's examples into one row whose position ids restart at each example
(``cu_seq_lens_q`` marks the spans' boundaries). Given the whole row, sdpa would compute every query
against every key and mask most of them out (the CPU kernel skips no masked block); per span, each
runs as a plain causal attention and costs its own length squared.

How a span is computed depends on where the model runs (:func:`use_packed_attention`):

* :func:`packed_sdpa`: sdpa (the flash kernel) per span, in the model's dtype;
* :func:`packed_attention_bf16_cpu`, a bfloat16 model on a CPU without AMX: short spans as two
  batched bfloat16 matrix products around a float32 softmax (:func:`span_products_attention`), longer
  ones in float32 flash, which there beats torch's bfloat16 flash kernel.
"""

from __future__ import annotations

import math

from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from selfspec_core.models.loading import cpu_flags

PACKED_ATTENTION = "selfspec_packed_sdpa"
# The longest span attended by matrix products: their backward pass keeps each span's float32
# probabilities (heads x n x n), which past this costs more memory and time than flash's blocks.
SHORT_SPAN = 512

# Attention arguments the products do not apply (besides dropout): logit soft-capping, attention
# sinks, a position bias.
SDPA_ONLY = ("softcap", "s_aux", "position_bias")

_causal_masks: dict = {}  # device -> SHORT_SPAN x SHORT_SPAN additive causal mask; a span takes its corner


def example_spans(query, key, value, cu_seq_lens_q):
    """Each example's ``(query, key, value)`` of a packed row, split off in one call per tensor, not
    sliced one by one: each slice's backward would write its gradient into a zeroed copy of the whole
    row (attention took 1.1-1.25x as long on a 2-core EPYC)."""
    lengths = cu_seq_lens_q.diff().tolist()
    return zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))


def packed_sdpa(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    """sdpa on each example's span of a packed row (``cu_seq_lens_q``: the spans' boundaries).

    Without boundaries (a padded batch, generation) this is sdpa as usual.
    """
    import torch

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    spans = [
        sdpa_attention_forward(module, q, k, v, None, **kwargs)[0]
        for q, k, v in example_spans(query, key, value, cu_seq_lens_q)
    ]
    return torch.cat(spans, dim=1), None


def packed_sdpa_float32(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    """:func:`packed_sdpa` computed in float32 and returned in the query's dtype.

    On a CPU without AMX, torch's flash-attention kernel runs forward and backward faster in float32
    than in bfloat16 (it widens bfloat16 blocks itself): 45 against 55 ms per layer on a packed row
    of 1,900 tokens on a 2-core AVX512-BF16 EPYC (``bench/train.py``).
    """
    output, weights = packed_sdpa(
        module, query.float(), key.float(), value.float(), attention_mask, cu_seq_lens_q=cu_seq_lens_q, **kwargs
    )
    return output.to(query.dtype), weights


def span_products_attention(query, key, value, scaling: float):
    """Causal attention of one span (``(batch, heads, n, head_dim)``; key and value may have fewer
    heads, each shared by a group of query heads) as ``query @ key^T`` and ``probabilities @ value``
    in the inputs' dtype, the softmax in float32. Returns ``(batch, n, heads, head_dim)``, as sdpa's
    attention functions do.

    The query heads of a group are stacked along the rows so that each product runs once per key
    head, with no copies of the keys and values.
    """
    import torch

    batch, heads, length, dim = query.shape
    groups = key.shape[1]
    if query.device not in _causal_masks:
        _causal_masks[query.device] = torch.full((SHORT_SPAN, SHORT_SPAN), float("-inf"), device=query.device).triu(1)
    mask = _causal_masks[query.device][:length, :length]
    scores = torch.matmul(query.reshape(batch, groups, -1, dim), key.transpose(-1, -2))
    scores = scores.view(batch, groups, heads // groups, length, length).float() * scaling + mask
    probabilities = torch.softmax(scores, dim=-1).to(query.dtype).view(batch, groups, -1, length)
    return torch.matmul(probabilities, value).view(batch, heads, length, dim).transpose(1, 2)


def packed_attention_bf16_cpu(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    """Packed attention for a bfloat16 model on a CPU without AMX: spans of up to :data:`SHORT_SPAN`
    tokens by :func:`span_products_attention`, longer ones (and a padded batch) by
    :func:`packed_sdpa_float32`.

    Over the short spans of instruction data the products beat the float32 flash kernel inside a
    training step: a biomed quick-profile step took 0.82 s instead of 1.02 on a 2-core AMD EPYC with
    AVX512-BF16 (``bench/train.py`` compares them). Attention with dropout or any of :data:`SDPA_ONLY`
    goes through sdpa, which applies (or refuses) it.
    """
    import torch

    if cu_seq_lens_q is None or kwargs.get("dropout") or any(kwargs.get(name) is not None for name in SDPA_ONLY):
        return packed_sdpa_float32(module, query, key, value, attention_mask, cu_seq_lens_q=cu_seq_lens_q, **kwargs)
    scaling = kwargs.get("scaling") or 1 / math.sqrt(query.shape[-1])
    spans = []
    for q, k, v in example_spans(query, key, value, cu_seq_lens_q):
        if q.shape[2] <= SHORT_SPAN:
            spans.append(span_products_attention(q, k, v, scaling))
        else:
            spans.append(packed_sdpa_float32(module, q, k, v, None, **kwargs)[0])
    return torch.cat(spans, dim=1), None


def use_packed_attention(model, max_length: int) -> None:
    """Switch an sdpa model to packed attention (:func:`packed_attention_bf16_cpu` for a bfloat16
    model on a CPU without AMX, :func:`packed_sdpa` elsewhere).

    Flash-attention models already attend per example from the same boundaries. A model with a
    sliding window shorter than ``max_length`` keeps sdpa with the packed mask, which holds the window.
    """
    import torch

    window = getattr(model.config, "sliding_window", None)
    if model.config._attn_implementation == "sdpa" and not (window and window < max_length):
        no_amx = model.dtype == torch.bfloat16 and model.device.type == "cpu" and "amx_bf16" not in cpu_flags()
        AttentionInterface.register(PACKED_ATTENTION, packed_attention_bf16_cpu if no_amx else packed_sdpa)
        AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
        model.set_attn_implementation(PACKED_ATTENTION)
