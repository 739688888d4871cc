"""A tiny random-weight model for tests and examples: seconds to build, no download.

Plugins' own test suites use it too (``from selfspec_core.testing import build_tiny_model``).
"""

from __future__ import annotations

from pathlib import Path

_CORPUS = [
    "The company reported higher quarterly revenue and raised its outlook.",
    "Patients receiving the treatment showed lower mortality than controls.",
    "Instruction: Classify the sentiment as positive, negative, or neutral. Answer: neutral",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Response: yes no maybe positive negative neutral",
    "0 1 2 3 4 5 6 7 8 9 % . , ; : ( ) - + = / ?",
]


def build_tiny_model(folder: str | Path, vocab_size: int = 512, hidden_size: int = 32, layers: int = 2) -> Path:
    """Write a random Llama-architecture causal LM and a byte-level BPE tokenizer to ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<pad>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder
