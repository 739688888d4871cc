"""selfspec: self-specialization of language models from a handful of domain seeds."""

__version__ = "0.1.0"
