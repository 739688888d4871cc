"""BM25 index build and query throughput on >= 100,000 passages.

Passages: every corpus under the shared data folder (FinCausal news, medical abstracts, Hallmarks of
Cancer abstracts, ~29K passages of 100-200 words after windowing), repeated with copy-suffixed ids
until there are at least 100,000, so the index has realistic passage lengths at the target size.
Queries: 5,000 of the shape the respond stage sends, a seed instruction plus a 20-word window of a
corpus passage as its input. The index is built without the disk cache (that is what is timed).

    python bench/retrieve.py [--passages 100000] [--queries 5000]

Last line: ``index_s=<build seconds> queries_per_s=<q/s> docs=<passages indexed>``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selfspec_core.data.retrieval import BM25Index, Passage, load_corpus  # noqa: E402
from selfspec_core.data.seeds import load_seeds  # noqa: E402

DATA = Path(os.environ.get("SELFSPEC_DATA") or ROOT.parent / "shared" / "data")
CORPORA = (
    "fin_corpus/fincausal2020",
    "biomed_corpus/medical_abstracts_tc/medical_tc_test.csv",
    "biomed_corpus/hallmarks_of_cancer/text",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=5_000)
    args = parser.parse_args()
    missing = [c for c in CORPORA if not (DATA / c).exists()]
    if missing:
        sys.exit(f"shared data not found: {DATA / missing[0]} (set SELFSPEC_DATA)")

    started = time.perf_counter()
    real = load_corpus([DATA / c for c in CORPORA])
    load_s = time.perf_counter() - started
    passages = list(real)
    copies = 0
    while len(passages) < args.passages:
        copies += 1
        passages += [Passage(f"{p.id}~copy{copies}", p.text, p.title) for p in real]
    words = sum(len(p.text.split()) for p in passages)
    print(
        f"corpus: {len(real)} real passages from {len(CORPORA)} corpora (read in {load_s:.1f}s), "
        f"plus {copies} copies with suffixed ids -> {len(passages)} passages, "
        f"{words / len(passages):.0f} words each on average"
    )

    started = time.perf_counter()
    index = BM25Index.build(passages)
    index_s = time.perf_counter() - started

    rng = random.Random(0)
    seeds = load_seeds(ROOT / "seeds" / "finance" / "seeds.jsonl") + load_seeds(
        ROOT / "seeds" / "biomed" / "seeds.jsonl"
    )
    queries = []
    for _ in range(args.queries):
        seed, passage = rng.choice(seeds), rng.choice(real)
        window = passage.text.split()
        start = rng.randrange(max(1, len(window) - 20))
        queries.append(f"{seed.instruction} {' '.join(window[start : start + 20])}")
    started, cpu_started = time.perf_counter(), time.process_time()
    hits = index.search(queries, top_k=3)
    query_s, query_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    answered = sum(1 for row in hits if row) / len(hits)
    print(
        f"built in {index_s:.1f}s; {len(queries)} queries in {query_s:.1f}s wall, {query_cpu_s:.1f}s CPU "
        f"({len(queries) / query_cpu_s:.0f} queries per CPU second; load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores), {answered:.1%} with a hit"
    )
    print(f"index_s={index_s:.2f} queries_per_s={len(queries) / query_s:.0f} docs={len(passages)}")


if __name__ == "__main__":
    main()
