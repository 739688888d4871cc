"""selfspec: self-specialization of language models from a handful of domain seeds.

Importing it runs nothing: a command chooses its OpenMP wait policy as it starts
(:func:`selfspec_core.cli.main.main`, before torch loads)."""

__version__ = "0.1.0"
