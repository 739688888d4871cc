"""selfspec: self-specialization of language models from a handful of domain seeds."""

from selfspec_core.runtime.openmp import choose_wait_policy

choose_wait_policy()  # must precede torch

__version__ = "0.1.0"
