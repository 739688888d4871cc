"""No text in the project repeats a benchmark sentence: seeds, templates, docs and test fixtures
written from memory can reproduce one word for word (one such Financial PhraseBank sentence, which
is non-commercial data, sat in a test fixture until this check found it)."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SELFSPEC_DATA") or ROOT / ".." / "shared" / "data")
WORDS = 8  # shared word 8-grams: long enough to be a copied sentence, not a common phrase


def word_grams(text: str) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i : i + WORDS]) for i in range(len(words) - WORDS + 1)}


def benchmark_grams() -> set[str]:
    grams: set[str] = set()
    for path in sorted((DATA / "financial_phrasebank").glob("Sentences_*.txt")):
        grams |= word_grams(path.read_text(encoding="latin-1"))
    pubmedqa = DATA / "pubmedqa" / "ori_pqal.json"
    if pubmedqa.is_file():
        for item in json.loads(pubmedqa.read_text()).values():
            grams |= word_grams(" ".join([item["QUESTION"], *item["CONTEXTS"], item.get("LONG_ANSWER", "")]))
    return grams


def project_texts() -> list[Path]:
    """Tracked text the project writes itself: not the benchmark data a plugin ships by licence."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / name for name in listed if "/data/" not in name and not name.endswith((".gz", ".png", ".parquet"))]


@pytest.mark.skipif(not (DATA / "financial_phrasebank").is_dir(), reason="benchmark data not present")
def test_no_project_text_shares_eight_words_with_a_benchmark():
    try:
        files = project_texts()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    grams = benchmark_grams()
    found = {}
    for path in files:
        try:
            shared = word_grams(path.read_text(encoding="utf-8")) & grams
        except (UnicodeDecodeError, OSError):
            continue
        if shared:
            found[str(path.relative_to(ROOT))] = sorted(shared)[:3]
    assert not found, found
