"""Base-model benchmark scores kept across runs, under ``$SELFSPEC_CACHE/scores``.

Every run scores the base model on the same benchmark items, and the answers change only with the
model, the prompts, the items and the scoring settings: those make the key, so a second run (or
another domain's run posing the same items the same way) reads the scores instead of recomputing
them, and anything that could change an answer misses the cache. One JSON file per task and key,
written atomically; an unreadable entry is a miss.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from selfspec_core.eval.scoring import ItemScore
from selfspec_core.models.loading import ModelRef, resolve_dtype
from selfspec_core.run.rundir import atomic_write_json
from selfspec_core.runtime.cache import cache_dir

# Bump when scoring itself changes in a way that changes scores, or what a stored ItemScore holds
# (2: each choice's token count and content-free log-probability).
SCORING_VERSION = 2


def model_fingerprint(ref: ModelRef) -> dict:
    """What identifies the weights: the path, and for a local folder each weight and config file's size and time."""
    folder = Path(ref.path)
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("config.json")) if folder.is_dir() else []
    return {
        "name": ref.name,
        "path": str(folder.resolve()) if folder.is_dir() else ref.path,
        "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files],
    }


def score_key(settings, ref: ModelRef, task_key: str, prompts: Sequence[str], items: Sequence, options: dict) -> str:
    """Hash of everything a base-model score depends on."""
    payload = {
        "version": SCORING_VERSION,
        "model": model_fingerprint(ref),
        "dtype": resolve_dtype(settings.dtype),
        "backend": settings.backend,
        "task": task_key,
        "options": options,
        "prompts": list(prompts),
        "items": [[item.id, item.answer, list(item.choices)] for item in items],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class ScoreCache:
    """Scores by key, one file each under ``root`` (default ``$SELFSPEC_CACHE/scores``)."""

    def __init__(self, root: Path | None = None):
        self.root = root or cache_dir() / "scores"

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str, ids: Sequence[str]) -> list[ItemScore] | None:
        """The stored scores for ``key`` if they cover exactly ``ids``; None otherwise."""
        try:
            rows = json.loads(self._path(key).read_text(encoding="utf-8"))
            scores = [ItemScore.from_dict(r) for r in rows]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return scores if [s.id for s in scores] == list(ids) else None

    def put(self, key: str, scores: Sequence[ItemScore]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self._path(key), [asdict(s) for s in scores])
