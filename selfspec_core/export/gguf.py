"""GGUF export: the merged specialized model as one file that llama.cpp, Ollama and ``llm`` run.

The file is laid out as llama.cpp's own ``convert_hf_to_gguf.py`` lays it out, for the architectures
of the embedded models (Llama: SmolLM2; Gemma 3): tensors renamed through the ``gguf`` package's
tensor-name maps, matrices in f16 (or f32) and norms in f32; Llama's q/k projections permuted into
llama.cpp's rotary layout (transformers' GGUF loader permutes them back); Gemma 3's RMSNorm weights
stored as ``1 + w``, the scale its kernels multiply by.

The tokenizer travels in the file. When the base model was converted from a GGUF (the embedded
models, a ``.gguf`` ``--model``), its ``tokenizer.*`` metadata is copied unchanged, so llama.cpp splits
text exactly as it did for the base; otherwise it is built from the Hugging Face tokenizer (GPT-2
style byte-level BPE, or SentencePiece-style BPE with byte fallback).

``tokenizer.chat_template`` renders the prompt form the adapter learnt
(:mod:`selfspec_core.models.prompting`): the base model's chat template for an adapter tuned in chat
form, a template of the Alpaca form for one tuned in that, so llama.cpp and Ollama prompt it right.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from selfspec_core.errors import SelfspecError, print_warning
from selfspec_core.models.loading import ModelRef, load_model, load_tokenizer
from selfspec_core.run.adapter import adapter_prompts

TENSOR_TYPES = ("f16", "f32")
# Hugging Face model_type -> the gguf package's architecture name for it.
ARCHITECTURES = {"llama": "llama", "gemma3_text": "gemma3"}


def export_gguf(
    base_ref: ModelRef,
    adapter_dir: str | Path,
    out_file: str | Path,
    tensor_type: str = "f16",
    warn: Callable[[str], None] = print_warning,
) -> Path:
    """Merge the adapter into the base and write the result to ``out_file`` (renamed into place when complete)."""
    out_file = Path(out_file)
    if out_file.suffix.lower() != ".gguf":
        raise SelfspecError(f"{out_file}: a GGUF export needs a file name ending in .gguf")
    if out_file.exists():
        raise SelfspecError(f"{out_file} exists; pass another --output or remove it")
    model = load_model(base_ref, quant="none", adapter=adapter_dir)  # float32, the adapter merged in
    tokenizer = load_tokenizer(base_ref)
    chat_template = adapter_prompts(Path(adapter_dir), tokenizer).chat_template()
    write_gguf(model, tokenizer, out_file, tensor_type, base_ref.gguf, warn, chat_template)
    return out_file


def write_gguf(
    model,
    tokenizer,
    out_file: Path,
    tensor_type: str = "f16",
    tokenizer_gguf: str | None = None,
    warn: Callable[[str], None] = print_warning,
    chat_template: str | None = None,
) -> None:
    """Write ``model`` (a transformers causal LM) with ``tokenizer`` as a GGUF file, atomically;
    ``chat_template`` replaces the base's ``tokenizer.chat_template`` when given."""
    import gguf

    config = model.config
    arch_name = ARCHITECTURES.get(config.model_type)
    if arch_name is None:
        raise SelfspecError(
            f"GGUF export supports {', '.join(ARCHITECTURES)} models, not {config.model_type!r}; "
            "export with --merge instead and convert that folder with llama.cpp's convert_hf_to_gguf.py"
        )
    if tensor_type not in TENSOR_TYPES:
        raise SelfspecError(f"GGUF tensor type {tensor_type!r} is not one of {', '.join(TENSOR_TYPES)}")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(f".{out_file.name}.partial")
    writer = gguf.GGUFWriter(str(partial), arch_name)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(out_file.stem)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if tensor_type == "f16" else gguf.LlamaFileType.ALL_F32)
        _add_hyperparameters(writer, config, arch_name)
        if tokenizer_gguf:
            _copy_tokenizer(writer, Path(tokenizer_gguf), keep_chat_template=chat_template is None)
        else:
            _add_tokenizer(writer, tokenizer, config.vocab_size, warn, keep_chat_template=chat_template is None)
        if chat_template is not None:
            writer.add_chat_template(chat_template)
        for name, array in _tensors(model, arch_name, tensor_type):
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out_file)
    except OSError as exc:
        raise SelfspecError(
            f"{out_file}: could not write the GGUF file ({exc.strerror or exc}); free space and retry"
        ) from exc
    finally:
        writer.close()
        partial.unlink(missing_ok=True)


def _add_hyperparameters(writer, config, arch_name: str) -> None:
    """The architecture keys llama.cpp reads (and transformers' GGUF loader maps back to a config)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = _rope(config)
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type", "default") == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope.get("rope_type", "default") != "default":
        raise SelfspecError(
            f"GGUF export: rope scaling {rope['rope_type']!r} is not supported; "
            "export with --merge instead and convert that folder with llama.cpp's convert_hf_to_gguf.py"
        )
    if arch_name == "llama":
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(config.sliding_window)


def _rope(config) -> dict:
    """The rotary settings of full-attention layers (Gemma 3 keeps another set for its sliding layers)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope = dict(rope.get("full_attention", rope))
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope


def _tensors(model, arch_name: str, tensor_type: str) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, array) for every weight, in llama.cpp's layout and precision."""
    import gguf
    import torch

    config = model.config
    arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp uses the token embeddings when the file has no output.weight
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SelfspecError(
                f"GGUF export: no {arch_name} tensor name for {hf_name!r}; this model variant is "
                "not supported; export with --merge instead"
            )
        data = tensor.detach().to("cpu", torch.float32)
        if arch_name == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
            data = _rotary_permute(data, heads)
        if arch_name == "gemma3" and hf_name.endswith("norm.weight"):
            data = data + 1
        array = data.numpy()
        yield name, array.astype(np.float16) if tensor_type == "f16" and array.ndim > 1 else array


def _rotary_permute(weights, heads: int):
    """llama.cpp's layout of a q/k projection: each head's rotary halves interleaved in pairs."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


# --------------------------------------------------------------------------------------- tokenizer


def _copy_tokenizer(writer, source: Path, keep_chat_template: bool) -> None:
    import gguf

    try:
        reader = gguf.GGUFReader(source)
    except (OSError, ValueError) as exc:
        raise SelfspecError(f"{source}: could not read the base model's GGUF for its tokenizer ({exc})") from exc
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.") and (keep_chat_template or key != gguf.Keys.Tokenizer.CHAT_TEMPLATE):
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)


def _add_tokenizer(writer, tokenizer, vocab_size: int, warn: Callable[[str], None], keep_chat_template: bool) -> None:
    """llama.cpp's tokenizer metadata built from a Hugging Face tokenizer, as convert_hf_to_gguf.py does."""
    import gguf

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        try:
            spec = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SelfspecError("GGUF export needs a fast tokenizer (tokenizer.json); this model has none") from None
        model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
        if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel":
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(_pre_tokenizer_name(spec, warn))
            tokens, types = _byte_level_vocab(tokenizer, vocab_size)
        elif model.get("type") == "BPE" and model.get("byte_fallback"):
            vocab = gguf.LlamaHfVocab(Path(folder))
            entries = list(vocab.all_tokens())
            entries += [(f"[PAD{n}]".encode(), -1000.0, gguf.TokenType.UNUSED) for n in range(len(entries), vocab_size)]
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            tokens, types = [text for text, _, _ in entries], [kind for _, _, kind in entries]
            writer.add_token_scores([score for _, score, _ in entries])
        else:
            raise SelfspecError(
                f"GGUF export: a {model.get('type')} tokenizer cannot be written for llama.cpp; "
                "export with --merge instead and convert that folder with llama.cpp's convert_hf_to_gguf.py"
            )
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
        if not keep_chat_template:
            special.chat_template = None
        special.add_to_gguf(writer, quiet=True)


def _byte_level_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id with llama.cpp's token types; ids the tokenizer lacks become unused ``[PADn]``."""
    import gguf

    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    added = {token.content: token.special for token in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for token_id in range(vocab_size):
        token = by_id.get(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        if token in added:
            types.append(gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _pre_tokenizer_name(spec: dict, warn: Callable[[str], None]) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE: GPT-2's rules, or them after single digits."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(step.get("type"), step.get("individual_digits"), step.get("use_regex", True)) for step in steps]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, True), ("ByteLevel", None, True)]:
        return "smollm"  # llama.cpp: single digits, then GPT-2's rules (as starcoder)
    warn(
        "GGUF export: llama.cpp has no name for this tokenizer's pre-tokenizer; it will split text "
        "with its default rules, which may tokenize some text differently"
    )
    return "default"
