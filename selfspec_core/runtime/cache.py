"""Where selfspec caches what it derives (converted models, BM25 indexes, base-model scores)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$SELFSPEC_CACHE``, else ``$XDG_CACHE_HOME/selfspec``, else ``~/.cache/selfspec``."""
    root = (
        os.environ.get("SELFSPEC_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "selfspec"
    )
    return Path(root)
