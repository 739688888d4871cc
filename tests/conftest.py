import pytest
from safetensors.torch import load_file, save_file

from selfspec_core.plugins.manager import get_plugin_manager
from selfspec_core.testing import CHAT_TEMPLATE, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Llama with its own tokenizer, built once per test session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    """The tiny model with a ChatML-style chat template (``selfspec_core.testing.CHAT_TEMPLATE``)."""
    return build_tiny_model(tmp_path_factory.mktemp("chat-model"), chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def sharp_model_dir(tmp_path_factory):
    """The tiny model with a 25x output layer: the random one's near-zero logits barely move under LoRA,
    so a few steps on these weights visibly lower the loss."""
    folder = build_tiny_model(tmp_path_factory.mktemp("sharp-model"))
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"] *= 25
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Keep tests from writing to the user's cache, except the embedded model (slow to convert), and
    off the network: a benchmark not in the data dir or shipped is missing, not downloaded."""
    monkeypatch.setenv("SELFSPEC_INDEX_CACHE", str(tmp_path / "index-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def plugin():
    """Register a plugin object for one test, then unregister it."""
    manager = get_plugin_manager()
    registered = []

    def register(obj, name):
        manager.register(obj, name=name)
        registered.append(obj)

    yield register
    for obj in registered:
        manager.unregister(obj)
