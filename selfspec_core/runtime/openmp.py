"""How torch's OpenMP threads wait between parallel regions, chosen before torch loads.

libgomp reads ``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT`` once, when torch loads it. Measured by
``bench/wait_policy.py`` on 2 cores with the embedded model: alone on the machine, threads that spin
(``ACTIVE``) train LoRA 1.5x and generate 1.2x faster than threads that sleep at once (``PASSIVE``);
beside another CPU-bound job they are 3x slower, spinning on the cores the other job needs. ``ACTIVE``
also spins on while the process idles (a full core for as long as a server waits for requests), so
an idle machine gets a bounded spin instead (``GOMP_SPINCOUNT``, about 0.1 s, then sleep): 1.28x
``PASSIVE``'s training and 1.33x its generation there (``ACTIVE``: 1.48x, 1.34x). A policy the user
set is kept. The ``selfspec`` command chooses as it starts (sampling the load takes 0.1 s), so
importing selfspec_core never does.
"""

from __future__ import annotations

import os
import sys
import time

BUSY_SHARE = 0.25  # of all CPU time, used by other processes while selfspec starts
SAMPLE_SECONDS = 0.1
SPIN_COUNT = "3000000"  # libgomp's spin iterations before a waiting thread sleeps (its default: 300000)
USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def cpu_times(stat: str = "/proc/stat") -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, or None where the OS has no /proc/stat."""
    try:
        with open(stat, encoding="ascii") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = sum(fields[3:5])  # idle and iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def busy_share(stat: str = "/proc/stat", seconds: float = SAMPLE_SECONDS) -> float | None:
    """Share of all CPU time other processes used over ``seconds`` (this one sleeps meanwhile)."""
    before = cpu_times(stat)
    time.sleep(seconds)
    after = cpu_times(stat)
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def wait_policy(busy: float | None) -> dict[str, str]:
    """The environment for ``busy``: a bounded spin on an idle machine, ``PASSIVE`` on a shared one
    or where the load is unknown."""
    return {"GOMP_SPINCOUNT": SPIN_COUNT} if busy is not None and busy <= BUSY_SHARE else {"OMP_WAIT_POLICY": "PASSIVE"}


def choose_wait_policy() -> None:
    """Set the wait policy for this process unless the user did, or torch (and with it libgomp) is
    already loaded, when it would change nothing here and mislead the processes this one starts."""
    if not any(name in os.environ for name in USER_SETTINGS) and "torch" not in sys.modules:
        os.environ.update(wait_policy(busy_share()))
