"""Training on several processes: which process this is, waiting for rank 0, and starting the processes.

A launcher (``selfspec train --num-processes N``, ``accelerate launch``, ``torchrun``) starts the same
command once per device and tells each process its place through ``RANK`` and ``WORLD_SIZE``. Every
process trains on its own shard of each batch; rank 0 alone writes the run directory, so the other
ranks only wait for it at the points below. The process group comes from accelerate's
``PartialState``, the object the Trainer itself uses: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from selfspec_core.errors import SelfspecError


def world_size() -> int:
    """How many processes train together (1 when no launcher started this one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's place among them, from the launcher's ``RANK`` (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def _state():
    """accelerate's view of the job; the first call joins the process group."""
    import torch
    from accelerate import PartialState

    # Without ``cpu=True`` accelerate sets up no process group on a machine without GPUs.
    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    """True on the one process that writes logs, checkpoints, the adapter and manifests."""
    return world_size() == 1 or _state().is_main_process


def wait_for_everyone() -> None:
    """A barrier across the training processes; nothing to wait for on one process."""
    if world_size() > 1:
        _state().wait_for_everyone()


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (creating or cleaning files), then the others run it on the result."""
    with _state().main_process_first() if world_size() > 1 else nullcontext():
        yield


def launch(argv: list[str], processes: int) -> None:
    """Run ``python -m selfspec_core *argv`` as ``processes`` ranks of one job on this machine.

    torchrun's engine starts them with a free rendezvous port; when one fails it stops the others,
    and this raises naming the first failure (whose own error the process has already printed).
    """
    check_can_launch(processes)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun would give each process one thread; on CPU, share the cores out instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cpu_count() // processes)))
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={processes}", "--module", "selfspec_core", *argv]))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        raise SelfspecError(
            f"training process {rank} of {processes} failed (exit code {failure.exitcode}); its error is above"
        ) from None
    except SignalException as exc:  # Ctrl-C or a kill reached the launcher; the workers are stopped
        raise KeyboardInterrupt(str(exc)) from None


def _cpu_count() -> int:
    """Cores this process may use (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_can_launch(processes: int) -> None:
    """Refuse, before starting anything, a process count this machine cannot run."""
    import torch

    if not torch.distributed.is_available():
        raise SelfspecError(
            "this PyTorch build has no torch.distributed: install one that has it, or drop --num-processes"
        )
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if processes > gpus:
            raise SelfspecError(
                f"--num-processes {processes}: one process per GPU and {gpus} GPU(s) visible; pass "
                f"--num-processes {gpus} or fewer (or set CUDA_VISIBLE_DEVICES= to train on CPU processes)"
            )
        if not torch.distributed.is_nccl_available():
            raise SelfspecError(
                "this PyTorch build has no NCCL backend for several GPUs: install a CUDA build with NCCL, "
                "or train on one process"
            )
    elif not torch.distributed.is_gloo_available():
        raise SelfspecError(
            "this PyTorch build has no gloo backend for several CPU processes: install one that has it, "
            "or train on one process"
        )
