"""The options every ``selfspec`` command shares and the session they resolve to."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager, nullcontext
from pathlib import Path

import click

from selfspec_core.config import PROFILES, Settings, load_settings
from selfspec_core.errors import SelfspecError
from selfspec_core.plugins import manager as plugins
from selfspec_core.run.rundir import RunDir, atomic_write_json, safe_name
from selfspec_core.runtime import distributed, logs

# Options of the whole command line, declared once: each is accepted before the subcommand's name
# (``selfspec --domain finance run``) and after it (``selfspec run --domain finance``); given in both
# places, the later one wins. Those named like a top-level setting override it.
SESSION_OPTIONS: tuple[tuple[tuple[str, ...], dict], ...] = (
    (("--domain", "-d"), dict(help="Domain to specialize in (see `selfspec domains`).")),
    (
        ("--profile",),
        dict(
            type=click.Choice(list(PROFILES)),
            help="quick (default): CPU demo, a few hundred examples. "
            "paper: the paper's settings (~5K examples). tiny: smoke test, a few records, 8 items scored per task.",
        ),
    ),
    (
        ("--config", "config_file"),
        dict(type=click.Path(dir_okay=False), help="YAML or TOML file with any setting; flags override it."),
    ),
    (
        ("--model",),
        dict(help="Base model: local HF folder, .gguf file, hub id, or embedded smollm2-135m (default) / gemma3-270m."),
    ),
    (
        ("--seeds",),
        dict(type=click.Path(dir_okay=False), help="Your seed file (JSONL or YAML) instead of the domain's own."),
    ),
    (("--out",), dict(type=click.Path(file_okay=False), help="Run directory (default runs/<domain>-<profile>).")),
    (("--seed",), dict(type=int, help="Random seed: the same seed gives the same data.")),
    (("--data-dir",), dict(type=click.Path(file_okay=False), help="Benchmark data and corpora (or SELFSPEC_DATA).")),
    (
        ("--corpus",),
        dict(
            type=click.Path(), help="Retrieval corpus: a .jsonl/.txt/.parquet/.csv/.pdf/.docx/.html/.md file or folder."
        ),
    ),
    (("--backend",), dict(type=click.Choice(["hf", "vllm", "openai"]), help="Generation backend (default hf).")),
    (
        ("--executor",),
        dict(type=click.Choice(["local", "ray"]), help="Run generation locally or as Ray Data jobs (RAY_ADDRESS)."),
    ),
    (
        ("--dtype",),
        dict(
            type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
            help="Model precision (default auto: bfloat16 where the CPU or GPU computes it natively, else float32).",
        ),
    ),
    (
        ("--no-cache",),
        dict(
            is_flag=True,
            help="Score the base model again instead of reusing its scores from earlier runs ($SELFSPEC_CACHE/scores).",
        ),
    ),
    (
        ("--plugins",),
        dict(help="Load only these plugins (comma-separated entry-point names; or SELFSPEC_PLUGINS). Default: all."),
    ),
    (
        ("--tasks", "task_dir"),
        dict(
            type=click.Path(file_okay=False),
            help="A folder of evaluation task YAML files to score beside the domain's own (docs/plugins.md).",
        ),
    ),
    (("--debug",), dict(is_flag=True, help="Show full tracebacks.")),
)
_SETTING_NAMES = {f.name for f in dataclasses.fields(Settings)}


def session_options() -> list[click.Option]:
    return [click.Option(list(decls), **attrs) for decls, attrs in SESSION_OPTIONS]


SESSION_NAMES = tuple(option.name for option in session_options())


class Session:
    """What the session options resolve to, shared by every command."""

    def __init__(self, **given):
        self.options: dict = {}
        self.update(given)

    def update(self, given: dict) -> None:
        """Take the options the user gave (a flag left off or an option not given changes nothing;
        ``--seed 0`` is given: ``0 in (None, False)`` would be true)."""
        self.options.update({name: value for name, value in given.items() if value is not None and value is not False})

    def select_plugins(self) -> None:
        """Load only the plugins ``--plugins`` names: called as a command starts, before it asks for any."""
        if self.options.get("plugins") is not None:
            plugins.load_only(self.options["plugins"])

    domain_name = property(lambda self: self.options.get("domain"))
    profile = property(lambda self: self.options.get("profile", "quick"))
    seeds_path = property(lambda self: self.options.get("seeds"))
    out = property(lambda self: self.options.get("out"))

    def settings(self, **extra):
        overrides = {k: v for k, v in self.options.items() if k in _SETTING_NAMES}
        evaluate = {"cache_base_scores": False} if self.options.get("no_cache") else {}
        if self.options.get("task_dir"):
            evaluate["task_dir"] = self.options["task_dir"]
        if evaluate:
            overrides["evaluate"] = evaluate
        given = (self.profile, self.options.get("config_file"), _merge(overrides, extra))
        settings = load_settings(*given)  # the user's own settings are checked before the domain is looked up
        domain = self.domain() if self.domain_name else None
        if domain is None or self.profile not in domain.profile_settings:
            return settings
        return load_settings(*given, domain)

    def domain(self):
        if not self.domain_name:
            raise SelfspecError("no domain given: pass --domain NAME (see `selfspec domains`)")
        return plugins.get_domain(safe_name(self.domain_name, "domain name"))

    def run_dir(self, domain):
        if self.out:
            return RunDir(Path(self.out), domain.name)
        return RunDir(Path("runs") / safe_name(f"{domain.name}-{self.profile}", "run name"), domain.name)

    @contextmanager
    def pipeline(self, **extra):
        """The pipeline on this command's run directory, held locked against other commands while in use."""
        from selfspec_core.run.pipeline import Pipeline, domain_seeds

        settings = self.settings(**extra)
        domain = self.domain()
        main = distributed.is_main_process()
        run = self.run_dir(domain)
        with distributed.main_process_first():  # rank 0 creates the run folder, the others open it
            run.open()
        with run.locked() if main else nullcontext():  # rank 0 holds it for a launcher's processes
            use_log_file(run.path / logs.LOG_NAME)
            if main:
                atomic_write_json(run.path / "config.json", {"profile": self.profile, **settings.to_dict()})
            yield Pipeline(
                settings, domain, run, domain_seeds(domain.name, self.seeds_path), log=click.echo if main else _quiet
            )


def use_log_file(path: Path | None = None) -> None:
    """Third-party warnings of the model libraries go to ``path`` (default: the cache's log), not the console."""
    if path is not None:
        logs.write_to(path)
    logs.adopt_library_loggers()


def _quiet(message: str) -> None:
    """The log of training processes other than rank 0, which would repeat its lines."""


def _merge(base: dict, extra: dict) -> dict:
    merged = {key: (dict(value) if isinstance(value, dict) else value) for key, value in base.items()}
    for key, value in extra.items():
        if isinstance(value, dict):
            merged.setdefault(key, {}).update(value)
        else:
            merged[key] = value
    return merged
