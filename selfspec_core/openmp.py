"""How torch's OpenMP threads wait between parallel regions, chosen before torch loads.

libgomp reads ``OMP_WAIT_POLICY`` once, when torch loads it. Measured by ``bench/wait_policy.py`` on
2 cores with the embedded model: alone on the machine, threads that spin (``ACTIVE``) train LoRA
1.5x and generate 1.2x faster than threads that sleep at once (``PASSIVE``); beside another
CPU-bound job they are 3x slower, spinning on the cores the other job needs. So selfspec looks at
the machine as it starts: other work on at most a quarter of the CPU time means spin, more means
sleep. A policy the user set is kept.
"""

from __future__ import annotations

import os
import sys
import time

BUSY_SHARE = 0.25  # of all CPU time, used by other processes while selfspec starts
SAMPLE_SECONDS = 0.1


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


def wait_policy(busy: float | None) -> str:
    """``ACTIVE`` on an idle machine, ``PASSIVE`` on a shared one or where the load is unknown."""
    return "ACTIVE" if busy is not None and busy <= BUSY_SHARE else "PASSIVE"


def choose_wait_policy() -> None:
    """Set ``OMP_WAIT_POLICY`` for this process unless the user did, or torch (and with it libgomp)
    is already loaded, when it would change nothing here and mislead the processes this one starts."""
    if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = wait_policy(busy_share())
