"""Test helpers: a tiny random-weight model (seconds to build, no download) and Hub-shaped dataset
folders, so the Hub loading path runs on local files.

Plugins' own test suites use them too (``from selfspec_core.testing import build_tiny_model``).
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


# A ChatML-style chat template whose turns end in the tokenizer's EOS text, as SmolLM2's end in its
# EOS ``<|im_end|>``; for tests of the chat prompt form (the tiny tokenizer has no template of its own).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_model(
    folder: str | Path, vocab_size: int = 512, hidden_size: int = 32, layers: int = 2, chat_template: str | None = None
) -> Path:
    """Write a random Llama-architecture causal LM and a byte-level BPE tokenizer (with ``chat_template``
    if given) to ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<pad>")
    fast.chat_template = chat_template
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def write_hub_dataset(repo: str | Path, configs: dict) -> Path:
    """Lay out ``repo`` as ``push_to_hub`` does: ``<config>/<split>-00000-of-00001.parquet`` per split
    (``data/`` for the default config, key ``None``), declared in README.md's YAML ``configs``.
    ``configs`` maps a config name to ``{split name: datasets.Dataset}``."""
    repo = Path(repo)
    card = ["---", "configs:"]
    for config, splits in configs.items():
        folder = config or "data"
        (repo / folder).mkdir(parents=True, exist_ok=True)
        card += [f"- config_name: {config or 'default'}", "  data_files:"]
        for split, dataset in splits.items():
            relative = f"{folder}/{split}-00000-of-00001.parquet"
            dataset.to_parquet(str(repo / relative))
            card += [f"  - split: {split}", f"    path: {relative}"]
    (repo / "README.md").write_text("\n".join(card + ["---", ""]))
    return repo


def use_hub_mirror(monkeypatch, mirror: str | Path) -> None:
    """Load Hub datasets from the repositories under ``mirror`` (``<owner>/<name>/``), with a fresh
    ``datasets`` cache inside it and nothing remembered from earlier loads."""
    import datasets.config

    from selfspec_core.data import datasources

    monkeypatch.setenv(datasources.HUB_MIRROR_ENV, str(mirror))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(mirror) / ".datasets-cache")
    monkeypatch.setattr(datasources, "_rows", {})


def install_into(package: str | Path, target: str | Path) -> dict[str, str]:
    """Install the package folder ``package`` for real (entry points and all) into the folder ``target``,
    leaving the test environment as it was; returns the environment (``PYTHONPATH``) under which a
    new process finds it."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    done = subprocess.run(
        [*command, "--target", str(target), str(package)], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip could not install {package}: {done.stderr.strip()}")
    return {"PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
