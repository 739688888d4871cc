"""Runs stages on a run directory: decides what is fresh, what to (re)run, and seals each stage.

A stage module exposes ``run_stage(ctx: StageContext) -> dict``. It writes only into ``ctx.work``
(the stage's partial folder, kept across a kill so it can resume) and returns the counts for its
manifest; a stage that also reads data from outside the run directory exposes
``outside_inputs_hash(settings, domain) -> str`` over it. The pipeline records the config hash and
the hash of the stage's inputs; a rerun skips a stage whose hashes match and reruns it, and
everything after it, when they do not.

Under a launcher with several processes (only ``train`` runs that way) every process runs the stage;
rank 0 alone prepares the partial folder and seals the stage, the others wait for it at barriers.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from selfspec_core.config import Settings
from selfspec_core.data import catalog
from selfspec_core.data.seeds import load_seeds
from selfspec_core.errors import SelfspecError
from selfspec_core.models.loading import ModelRef, resolve_dtype, resolve_model
from selfspec_core.plugins import manager as plugins
from selfspec_core.records import Domain, Seed
from selfspec_core.run import rounds
from selfspec_core.run.adapter import adapter_training_data, stage_adapter
from selfspec_core.run.context import StageContext
from selfspec_core.run.rundir import RunDir, file_hash, stage_command
from selfspec_core.runtime import distributed, throughput

# stage -> (module, settings sections its output depends on, files of earlier stages it reads)
STAGE_SPECS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "generate": ("stages.generate", ("generate",), ()),
    "respond": ("stages.respond", ("respond", "generate"), ("generate/instructions.jsonl", "generate/mined.jsonl")),
    "train": ("stages.train", ("train",), ("respond/data.jsonl",)),
    "evaluate": ("stages.evaluate", ("evaluate",), ("train/adapter/adapter_model.safetensors", "respond/data.jsonl")),
    "report": (
        "stages.report",
        ("evaluate",),
        ("generate/manifest.json", "respond/manifest.json", "train/manifest.json", "evaluate/eval.json"),
    ),
}


def domain_seeds(domain: str, seeds_path: str | Path | None = None) -> list[Seed]:
    """The user's ``--seeds`` file if given, else what the domain's seed provider returns, else the
    seed file its plugin ships (:func:`selfspec_core.data.catalog.declared_seeds`)."""
    if seeds_path:
        return load_seeds(seeds_path)
    provided = plugins.first_answer("seed_provider", (str, Path, list), Seed, domain=domain)
    if provided is None:
        provided = catalog.declared_seeds(domain)
    if provided is None:
        raise SelfspecError(f"domain {domain!r} provides no seeds; pass --seeds FILE.jsonl")
    if isinstance(provided, list):
        return provided
    return load_seeds(provided)


def seeds_hash(seeds: list[Seed]) -> str:
    payload = json.dumps([s.to_dict() for s in seeds], sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


class Pipeline:
    """Runs named stages in order on one run directory."""

    def __init__(self, settings: Settings, domain: Domain, run: RunDir, seeds: list[Seed], log=print):
        self.settings = settings
        self.domain = domain
        self.run = run
        self.seeds = seeds
        self.log = log
        self._model: ModelRef | None = None

    @property
    def model(self) -> ModelRef:
        if self._model is None:
            self._model = resolve_model(self.settings.model)
        return self._model

    def input_files(self, stage: str) -> list[Path]:
        if stage == "evaluate" and self.settings.evaluate.adapter:  # an adapter from elsewhere, and its data if known
            adapter = stage_adapter(self.settings, self.run)
            data = adapter_training_data(adapter)
            return [adapter / "adapter_config.json", adapter / "adapter_model.safetensors", *([data] if data else [])]
        return [self.run.path / relative for relative in STAGE_SPECS[stage][2]] + self.round_inputs(stage)

    def round_inputs(self, stage: str) -> list[Path]:
        """What a round after the first reads from the round before (:mod:`selfspec_core.run.rounds`):
        its adapter, for the stages that write and answer with it, and its records, for training and
        the contamination check."""
        adapter, data = rounds.previous_adapter(self.run), rounds.previous_data(self.run)
        if stage in ("generate", "respond") and adapter is not None:
            return [adapter / "adapter_config.json", adapter / "adapter_model.safetensors"]
        if stage in ("train", "evaluate") and data is not None:
            return [data]
        return []

    def input_hash(self, stage: str) -> str:
        files = self.input_files(stage)
        missing = [f for f in files if not f.exists()]
        if missing:
            earlier = missing[0].relative_to(self.run.path).parts[0]
            raise SelfspecError(
                f"{missing[0]} is missing: run `{stage_command(self.domain.name, earlier, self.run.path)}` first"
            )
        parts = [file_hash(*files) if files else "", seeds_hash(self.seeds), self.settings.model or "default"]
        # What a stage reads from outside the run directory (a corpus, benchmark files), if it says.
        outside = getattr(
            importlib.import_module(f"selfspec_core.{STAGE_SPECS[stage][0]}"), "outside_inputs_hash", None
        )
        if outside is not None:
            parts.append(outside(self.settings, self.domain.name))
        return "-".join(p for p in parts if p)

    def run_stages(
        self,
        stages: list[str],
        force: bool = False,
        before_running: Callable[[list[str]], None] | None = None,
    ) -> None:
        """Run ``stages`` in order from the first that is not fresh; ``before_running`` gets the stages
        that will run before the first of them starts (``selfspec run`` prints its estimate there)."""
        if distributed.world_size() > 1 and stages != ["train"]:
            raise SelfspecError(
                f"only `selfspec train` runs on several processes, not {' '.join(stages)}: "
                "run the other stages without accelerate launch or torchrun"
            )
        to_run = self.stages_to_run(stages, force)
        if to_run and before_running is not None:
            before_running(to_run)
        for stage in to_run:
            # Hashed now, not before: a stage's inputs are what the stages before it have just written.
            config_hash, input_hash = self._hashes(stage)
            if self.run.manifest(stage) is not None:
                self.log(f"[{stage}] settings or inputs changed since the last run: running again")
            self.run_one(stage, config_hash, input_hash)

    def stages_to_run(self, stages: list[str], force: bool = False) -> list[str]:
        """``stages`` from the first one that is not fresh (all of them with ``force``): a stage that
        runs again makes every later one stale. Each fresh stage before it is logged as skipped."""
        for number, stage in enumerate(stages):
            if force or not self.run.is_fresh(stage, *self._hashes(stage)):
                return stages[number:]
            self.log(f"[{stage}] up to date, skipped")
        return []

    def _hashes(self, stage: str) -> tuple[str, str]:
        """The stage's config hash and input hash, as its manifest records them."""
        return self.settings.section_hash(*STAGE_SPECS[stage][1]), self.input_hash(stage)

    def run_one(self, stage: str, config_hash: str, input_hash: str) -> None:
        module = importlib.import_module(f"selfspec_core.{STAGE_SPECS[stage][0]}")
        main = distributed.is_main_process()
        if main:
            self._stamp_partial(stage, f"{config_hash} {input_hash}")
        distributed.wait_for_everyone()  # the others start on the folder rank 0 has prepared
        work = self.run.partial_dir(stage)
        with distributed.main_process_first():  # rank 0 converts a GGUF base into the cache, the others read it
            model = self.model
        ctx = StageContext(self.settings, self.domain, self.run, self.seeds, model, work, self.log)
        started = time.time()
        self.log(f"[{stage}] running")
        with _peak_memory() as memory, throughput.metered() as meter:
            counts = module.run_stage(ctx)
        if main:
            (work / ".hashes").unlink(missing_ok=True)
            speed = meter.figures(resolve_dtype(self.settings.dtype))
            self.run.finish(
                stage,
                {
                    "config_hash": config_hash,
                    "input_hash": input_hash,
                    "seconds": round(time.time() - started, 2),
                    "model": self.model.name,
                    **memory,
                    "throughput": speed,
                    **counts,
                },
            )
            self.log(f"[{stage}] done in {time.time() - started:.0f}s -> {self.run.stage_dir(stage)}")
        distributed.wait_for_everyone()  # every process leaves with the stage sealed

    def _stamp_partial(self, stage: str, hashes: str) -> None:
        """Mark the partial folder with the hashes it is made for; partial work of other ones cannot be resumed."""
        stamp = self.run.partial_dir(stage) / ".hashes"
        if stamp.exists() and stamp.read_text() != hashes:
            self.run.discard_partial(stage)
            stamp = self.run.partial_dir(stage) / ".hashes"
        stamp.write_text(hashes)


@contextmanager
def _peak_memory() -> Iterator[dict]:
    """The stage's own peak resident memory (MB) and, on CUDA, peak GPU memory, for the stage manifest.

    ``ru_maxrss`` is the process's lifetime peak: a stage after a heavier one would report the other's.
    Linux lets a process reset that peak to its current size, so there the figure is exact; elsewhere
    a lifetime peak that rose during the stage is the stage's, and one that did not leaves it unknown.
    """
    figures: dict = {}
    try:
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
    except ImportError:
        cuda = False
    reset = _reset_peak_rss()
    lifetime_before = 0 if reset else _lifetime_peak_rss()
    yield figures
    if reset:
        figures["peak_rss_mb"] = round(_linux_peak_rss() / 2**20, 1)
    else:
        lifetime = _lifetime_peak_rss()
        figures["peak_rss_mb"] = round(lifetime / 2**20, 1) if lifetime > lifetime_before else None
    if cuda:
        figures["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident set (Linux's VmHWM) to its current size; False where the OS
    cannot (no /proc, or a kernel before 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return _linux_peak_rss() > 0
    except (OSError, ValueError):
        return False


def _linux_peak_rss() -> int:
    """Peak resident bytes since the process started or its last reset (``VmHWM``); 0 when not listed."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _lifetime_peak_rss() -> int:
    """The process's peak resident bytes since it started (kB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
