"""CPU inference with every linear layer's weight laid out once for oneDNN.

A decoding step multiplies a few rows by every weight of the model, so reading the weights is most
of the step. Multiplied from a copy laid out once in oneDNN's blocked format
(``mkldnn._reorder_linear_weight``, then ``mkldnn._linear_pointwise``) instead of by ``F.linear``
from the weight as it lies, 16 rows times 120 weights of 576 x 1,536 read 24 GB/s instead of 18, and
SmolLM2-135M generated bench/generate.py's 16 stage prompts 1.3-1.6x faster batched and 1.5-1.8x one
prompt at a time, on a 2-core AMD EPYC of CPU family 26 (AVX512-BF16, no AMX): the bfloat16 blocks
and the float32 output layer (:func:`~selfspec_core.models.loading.float32_logits`), whose 49,152 x
576 weight every step reads. The texts were the same; the packed product sums in another order, so a
logit can differ in its last bits and, rarely, a sampled token with it. Calls that track gradients
keep the plain product, which has a backward pass.
"""

from __future__ import annotations

import os

PACKED = "selfspec_packed"  # attribute a packed layer carries
MEMORY_SHARE = 0.25  # the packed copies may take at most this share of the memory available


def pack_linears(model) -> bool:
    """Give each linear layer of ``model`` still unpacked a forward pass on its weight packed for oneDNN.

    The weight multiplied is the layer's own or, for the output layer, its float32 copy
    (``float32_weight``, set by :func:`~selfspec_core.models.loading.float32_logits`). The packed
    copies sit beside the weights, so nothing that reads the weights changes; it is left undone (False)
    without oneDNN, off the CPU, or when the copies would take more than :data:`MEMORY_SHARE` of the
    memory available. The weights must not change afterwards (merging an adapter into them would
    leave the packed copies behind): give it a model that is done.
    """
    import torch

    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and not hasattr(m, PACKED)]
    weights = [multiplied(layer)[0] for layer in layers]
    if (
        not layers
        or not torch.backends.mkldnn.is_available()
        or any(w.device.type != "cpu" or w.dtype not in (torch.bfloat16, torch.float32) for w in weights)
        or sum(w.numel() * w.element_size() for w in weights) > MEMORY_SHARE * available_memory()
    ):
        return False
    for layer in layers:
        _pack(layer)
    return True


def multiplied(layer) -> tuple:
    """The weight and bias ``layer``'s forward pass multiplies: its float32 copies where
    :func:`~selfspec_core.models.loading.float32_logits` set them, else its own."""
    return getattr(layer, "float32_weight", layer.weight), getattr(layer, "float32_bias", layer.bias)


def _pack(layer) -> None:
    import torch

    weight, bias = multiplied(layer)
    weight = weight.detach().contiguous()
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
    bias = None if bias is None else bias.detach().to(weight.dtype)
    plain = layer.forward

    def forward(inputs):
        if inputs.numel() == 0 or (torch.is_grad_enabled() and (inputs.requires_grad or layer.weight.requires_grad)):
            return plain(inputs)
        rows = inputs.to(weight.dtype).contiguous()
        return torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [None], "")

    layer.forward = forward
    setattr(layer, PACKED, True)


def available_memory() -> int:
    """Bytes of memory available now: Linux's MemAvailable (free memory and the caches it can drop),
    else the free pages; 0 where the system says neither."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0
