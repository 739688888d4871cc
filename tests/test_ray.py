"""executor = "ray": generation as Ray Data jobs on a local Ray, identical to the local executor."""

import pytest

from selfspec_core.config import load_settings
from selfspec_core.errors import SelfspecError
from selfspec_core.models.backends import RayGenerator, make_generator
from selfspec_core.models.generator import HFGenerator
from selfspec_core.models.loading import ModelRef, load_model, load_tokenizer

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own settings

PROMPTS = [
    "The company reported higher",
    "0 1",
    "Patients receiving the treatment showed lower",
    "Instruction: Classify the sentiment as positive",
    "### Response:",
]
PAIRS = [("The company reported", " higher quarterly revenue"), ("Answer:", " neutral"), ("0 1 2", " 3 4")]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_executor_matches_local(local_ray, tiny_model_dir):
    ref = ModelRef("tiny", str(tiny_model_dir))
    # float32 like the local generator below (auto is bfloat16 on a CPU with AVX512-BF16)
    settings = load_settings("tiny", overrides={"executor": "ray", "dtype": "float32", "ray": {"actors": 1}})
    distributed = make_generator(settings, ref, batch_size=2)
    assert isinstance(distributed, RayGenerator)
    local = HFGenerator(load_model(ref), load_tokenizer(ref), batch_size=2)
    # Three batches of the longest-first order, so a mix-up of batches or rows would show.
    assert distributed.generate(PROMPTS, max_new_tokens=8, stop=["e"]) == local.generate(
        PROMPTS, max_new_tokens=8, stop=["e"]
    )
    for (ray_sum, ray_count), (local_sum, local_count) in zip(
        distributed.loglikelihood(PAIRS), local.loglikelihood(PAIRS)
    ):
        assert ray_count == local_count and ray_sum == pytest.approx(local_sum, abs=1e-5)


def test_ray_executor_refuses_the_openai_backend(local_ray):
    settings = load_settings("tiny", overrides={"executor": "ray", "backend": "openai"})
    with pytest.raises(SelfspecError, match='use executor = "local"'):
        make_generator(settings, ModelRef("m", "m"))
