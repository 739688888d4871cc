"""selfspec: self-specialization of language models from a handful of domain seeds."""

import os

# OpenMP threads that spin while waiting made generation 4-5x slower whenever another process
# shared the CPU; passive waiting costs nothing when the machine is idle. Must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
