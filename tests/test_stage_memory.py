"""A stage's manifest reports the stage's own peak memory, not the process's lifetime peak."""

import sys
from pathlib import Path

import pytest

from selfspec_core.run import pipeline


def touched(mb: int) -> bytearray:
    """``mb`` megabytes the process really holds (every page written)."""
    block = bytearray(mb * 2**20)
    block[::4096] = b"x" * len(range(0, len(block), 4096))
    return block


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux resets the peak; others cannot")
def test_a_light_stage_after_a_heavy_one_reports_its_own_peak():
    with pipeline._peak_memory() as heavy:
        block = touched(300)
        del block  # freed before the next stage, as a stage's models are
    with pipeline._peak_memory() as light:
        touched(10)
    assert heavy["peak_rss_mb"] - light["peak_rss_mb"] > 250, (heavy, light)


def test_where_the_peak_cannot_be_reset_only_a_peak_reached_in_the_stage_is_reported(monkeypatch):
    pipeline._reset_peak_rss()  # on Linux, so that earlier tests' peaks are not above this one's
    monkeypatch.setattr(pipeline, "_reset_peak_rss", lambda: False)
    with pipeline._peak_memory() as heavy:
        block = touched(300)
        del block
    with pipeline._peak_memory() as light:
        touched(10)
    assert heavy["peak_rss_mb"] >= 300 and light["peak_rss_mb"] is None  # under the earlier peak: unknown
    if sys.platform.startswith("linux"):
        assert heavy["peak_rss_mb"] == round(pipeline._lifetime_peak_rss() / 2**20, 1)
