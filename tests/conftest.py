import pytest

from selfspec_core.testing import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Llama with its own tokenizer, built once per test session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Keep tests from writing to the user's cache, except the embedded model (slow to convert)."""
    monkeypatch.setenv("SELFSPEC_INDEX_CACHE", str(tmp_path / "index-cache"))
