"""Data quality of the respond stage on the embedded model, with every check off and then on.

Runs the quick profile's data stages for one domain: ``generate`` once (the real stage 1, with
``--instructions`` instructions), then ``respond`` twice on the same instructions:

- off: free generation for every task, no response checks, no option scoring or calibration,
  no label cap, no self-consistency, no judge, no relevance filter;
- on: calibrated log-likelihood answers for option tasks, every response check, a label cap of
  ``--cap``, 3-way self-consistency, the judge keeping 80%, and BM25 relevance >= 4.0 (below the
  lowest best-passage score of any finance or biomed seed against its own corpus, 5.0).

``valid`` is the share of option tasks in the kept data whose answer is one of the task's stated
options; ``max_label_share`` the largest share one label has in any option group of at least
``quality.MIN_GROUP_ITEMS`` (4) kept records. Needs the shared data (``--data-dir`` or
``$SELFSPEC_DATA``) for the retrieval corpus.

    python bench/data_quality.py --domain finance [--instructions 100] [--threads 1]

Last line: ``valid_off=.. valid_on=.. max_label_share_off=.. max_label_share_on=.. kept_off=.. kept_on=..``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selfspec_core.config import load_settings  # noqa: E402
from selfspec_core.plugins.manager import get_domain  # noqa: E402
from selfspec_core.run.pipeline import Pipeline, domain_seeds  # noqa: E402
from selfspec_core.run.rundir import RunDir, read_jsonl  # noqa: E402
from selfspec_core.runtime.openmp import choose_wait_policy  # noqa: E402
from selfspec_core.stages import checks as quality  # noqa: E402

OFF = {
    "option_answers": "off",
    "calibrate": "off",
    "max_label_share": 1.0,
    "consistency_samples": 1,
    "judge": "off",
    "response_checks": "",
    "min_relevance": 0.0,
}


def checks_on(cap: float) -> dict:
    return {
        "option_answers": "on",
        "calibrate": "on",
        "max_label_share": cap,
        "consistency_samples": 3,
        "judge": "on",
        "judge_keep_fraction": 0.8,
        "response_checks": ",".join(quality.RESPONSE_CHECKS),
        "min_relevance": 4.0,
    }


def main() -> None:
    choose_wait_policy()  # as the selfspec command does, before torch loads
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="finance")
    parser.add_argument("--instructions", type=int, default=100)
    parser.add_argument("--cap", type=float, default=0.5, help="respond.max_label_share with the checks on")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); 1 is far faster on a CPU shared with other jobs",
    )
    parser.add_argument("--data-dir", default=os.environ.get("SELFSPEC_DATA") or str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.data_dir).is_dir():
        sys.exit(f"data dir {args.data_dir} not found: pass --data-dir or set SELFSPEC_DATA")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="selfspec-quality-"))
    domain = get_domain(args.domain)
    seeds = domain_seeds(args.domain)
    base = {"data_dir": args.data_dir, "generate": {"num_instructions": args.instructions}}

    off_run = RunDir(out / "off", domain.name).open()  # generate is reused when --out holds a fresh one
    Pipeline(load_settings("quick", overrides=base), domain, off_run, seeds).run_stages(["generate"])
    generate_s = off_run.manifest("generate")["seconds"]
    instructions = read_jsonl(off_run.stage_dir("generate") / "instructions.jsonl")
    on_path = out / "on"
    shutil.rmtree(on_path, ignore_errors=True)
    shutil.copytree(off_run.path, on_path, ignore=shutil.ignore_patterns("respond*"))
    on_run = RunDir(on_path, domain.name).open()

    results = {}
    for name, run, respond in (("off", off_run, OFF), ("on", on_run, checks_on(args.cap))):
        began = time.time()
        settings = load_settings("quick", overrides={**base, "respond": respond})
        Pipeline(settings, domain, run, seeds).run_stages(["respond"], force=True)
        results[name] = summarize(run, time.time() - began)

    print(
        f"{len(instructions)} instructions generated in {generate_s:.0f}s (selfspec_core.stages.generate.run_stage, "
        f"quick profile, embedded model, {torch.get_num_threads()} CPU threads); runs in {out}"
    )
    for name, result in results.items():
        print(
            f"{name}: kept {result['kept']} in {result['seconds']:.0f}s; dropped {result['dropped']}; "
            f"{result['option_records']} option-task records, {result['valid']:.3f} valid; labels {result['labels']}"
        )
    off, on = results["off"], results["on"]
    print(
        f"valid_off={off['valid']:.3f} valid_on={on['valid']:.3f} max_label_share_off={off['max_share']:.3f} "
        f"max_label_share_on={on['max_share']:.3f} kept_off={off['kept']} kept_on={on['kept']}"
    )


def summarize(run: RunDir, seconds: float) -> dict:
    """Validity and label shares recomputed from the kept records themselves, plus the funnel."""
    data = read_jsonl(run.stage_dir("respond") / "data.jsonl")
    option_records = [r for r in data if r["options"] is not None]
    valid = [
        r
        for r in option_records
        if r["label"] is not None and r["output"].strip() and quality.match_option(r["output"], _options(r)) is not None
    ]
    labels = quality.label_shares([("/".join(r["options"]), r["label"]) for r in valid])
    funnel = run.manifest("respond")["funnel"]
    return {
        "kept": len(data),
        "seconds": seconds,
        "dropped": funnel["dropped"],
        "option_records": len(option_records),
        "valid": len(valid) / len(option_records) if option_records else 0.0,
        "max_share": quality.max_label_share(labels),
        "labels": labels,
    }


def _options(record: dict) -> quality.Options:
    """The record's options as the stage found them (choice texts are re-read from the input)."""
    found = quality.extract_options(record["instruction"], record["input"])
    if found is not None and list(found.keys) == record["options"]:
        return found
    return quality.Options("labels", tuple(record["options"]), tuple(record["options"]))


if __name__ == "__main__":
    main()
