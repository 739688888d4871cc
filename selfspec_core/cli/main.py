"""The ``selfspec`` command: parses options and calls stages; no logic of its own."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path

import click

from selfspec_core import __version__
from selfspec_core.config import PROFILES, Settings, load_settings
from selfspec_core.errors import SelfspecError
from selfspec_core.plugins import manager as plugins
from selfspec_core.run.rundir import STAGES, RunDir, atomic_write_json, safe_name
from selfspec_core.runtime import distributed, logs
from selfspec_core.serve.app import command as serve_command

# Options of the whole command line, declared once: each is accepted before the subcommand's name
# (``selfspec --domain finance run``) and after it (``selfspec run --domain finance``); given in both
# places, the later one wins. Those named like a top-level setting override it.
SESSION_OPTIONS: tuple[tuple[tuple[str, ...], dict], ...] = (
    (("--domain", "-d"), dict(help="Domain to specialize in (see `selfspec domains`).")),
    (
        ("--profile",),
        dict(
            type=click.Choice(list(PROFILES)),
            help="quick (default): CPU demo, a few hundred examples. paper: the paper's settings (~5K examples). tiny: smoke test.",
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
    (("--debug",), dict(is_flag=True, help="Show full tracebacks.")),
)
_SETTING_NAMES = {f.name for f in dataclasses.fields(Settings)}


def _session_options() -> list[click.Option]:
    return [click.Option(list(decls), **attrs) for decls, attrs in SESSION_OPTIONS]


_SESSION_NAMES = tuple(option.name for option in _session_options())


class Session:
    """What the session options resolve to, shared by every command."""

    def __init__(self, **given):
        self.options: dict = {}
        self.update(given)

    def update(self, given: dict) -> None:
        """Take the options the user gave (a flag left off or an option not given changes nothing)."""
        self.options.update({name: value for name, value in given.items() if value not in (None, False)})

    domain_name = property(lambda self: self.options.get("domain"))
    profile = property(lambda self: self.options.get("profile", "quick"))
    seeds_path = property(lambda self: self.options.get("seeds"))
    out = property(lambda self: self.options.get("out"))

    def settings(self, **extra):
        overrides = {k: v for k, v in self.options.items() if k in _SETTING_NAMES}
        if self.options.get("no_cache"):
            overrides["evaluate"] = {"cache_base_scores": False}
        return load_settings(self.profile, self.options.get("config_file"), _merge(overrides, extra))

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


class SessionGroup(click.Group):
    """A group whose session options every subcommand accepts after its own name too."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.extend(_session_options())
        callback = cmd.callback

        @functools.wraps(callback)
        def taking_session_options(*args, **kwargs):
            given = {name: kwargs.pop(name) for name in _SESSION_NAMES}
            session = click.get_current_context().find_object(Session)
            if session is not None:
                session.update(given)
            return callback(*args, **kwargs)

        cmd.callback = taking_session_options
        super().add_command(cmd, name)


def _with_session_options(group: click.Group) -> click.Group:
    group.params[:0] = _session_options()
    return group


@_with_session_options
@click.group(cls=SessionGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="selfspec")
@click.pass_context
def cli(ctx, **options):
    """Self-specialize a language model on a domain from a handful of seeds.

    \b
    selfspec domains                          list installed domains
    selfspec run --domain finance             every stage into runs/finance-quick/
    selfspec generate --domain finance        one stage on the same run directory
    """
    ctx.obj = Session(**options)


@cli.command()
def domains():
    """List installed domains with their plugin, seeds, tasks and corpus."""
    from selfspec_core.run.pipeline import domain_seeds

    installed = plugins.domains()
    if not installed:
        click.echo("no domains installed: `pip install -e plugins/finance` or `selfspec new-domain NAME`")
        return
    for name, domain in installed.items():
        try:
            seeds = domain_seeds(name)
            families = sorted({s.task_type for s in seeds})
            seed_text = f"{len(seeds)} seeds"
        except SelfspecError as exc:
            families, seed_text = list(domain.task_families), f"seeds unavailable ({exc})"
        tasks = [task.name for _, found in plugins.results("evaluation_tasks", domain=name) for task in found]
        _, corpus = plugins.first_result("retrieval_corpus", (list, tuple), domain=name, data_dir=None)
        corpus_text = f"{len(corpus)} sources" if corpus else "none found (set SELFSPEC_DATA or pass --corpus)"
        click.echo(f"{name}  (plugin {domain.plugin}): {seed_text}")
        click.echo(f"  {domain.description}")
        click.echo(f"  task families: {', '.join(families) or '-'}")
        click.echo(f"  evaluation tasks: {', '.join(tasks) or '-'}")
        click.echo(f"  retrieval corpus: {corpus_text}")


@cli.group(invoke_without_command=True)
@click.pass_context
def data(ctx):
    """List each domain's benchmarks and corpora: in the data dir, shipped, cached from the Hub, to fetch, or missing."""
    if ctx.invoked_subcommand is not None:
        return
    from selfspec_core.data.datasources import installed_sources, status

    session, current = ctx.obj, None
    data_dir = session.settings().data_dir
    for entry in installed_sources(session.domain_name and session.domain().name):
        if entry.domain != current:
            current = entry.domain
            click.echo(current)
        state, detail = status(entry.source, data_dir)
        click.echo(f"  {entry.kind} {entry.label}: {state}: {detail}")


@data.command(name="fetch")
@click.pass_obj
def data_fetch(session: Session):
    """Fetch from the Hub every benchmark and corpus found neither in the data dir nor shipped."""
    from selfspec_core.data.datasources import fetch_missing, installed_sources

    failed = fetch_missing(
        installed_sources(session.domain_name and session.domain().name), session.settings().data_dir, click.echo
    )
    for line in failed:
        click.echo(line, err=True)
    if failed:
        raise SelfspecError(f"{len(failed)} could not be fetched; put the files where the lines above say")
    click.echo("every benchmark and corpus with a Hub source is available")


def _stage_command(stage: str, help_text: str):
    @cli.command(name=stage, help=help_text)
    @click.option("--force", is_flag=True, help="Run again even if up to date.")
    @click.pass_obj
    def command(session: Session, force: bool, **options):
        with session.pipeline(**_stage_overrides(options)) as pipeline:
            pipeline.run_stages([stage], force=force)

    return command


def _stage_overrides(options: dict) -> dict:
    overrides = {}
    if options.get("retrieval") is not None:
        overrides["respond"] = {"retrieval": options["retrieval"] == "on"}
    if options.get("quant") is not None:
        overrides["train"] = {"quant": options["quant"]}
    if options.get("adapter") is not None:
        overrides["evaluate"] = {"adapter": options["adapter"]}
    return overrides


_retrieval = click.option(
    "--retrieval", type=click.Choice(["on", "off"]), help="Ground responses in retrieved passages (default on)."
)
_quant = click.option(
    "--quant",
    type=click.Choice(["auto", "none", "nf4"]),
    help="Base weights for tuning: nf4 = QLoRA (default on CUDA).",
)

generate = _stage_command("generate", "Stage 1: write new domain instructions from the seeds.")
respond = _retrieval(_stage_command("respond", "Stage 2: answer the instructions (grounded by retrieval)."))
report = _stage_command("report", "Write report.html and report.md for the run.")


@cli.command()
@_quant
@click.option(
    "--num-processes",
    type=click.IntRange(min=1),
    help="Train on N processes of this machine, one per GPU "
    "(gloo on CPU); each step then trains on batch_size x grad_accum x N examples.",
)
@click.option("--force", is_flag=True, help="Run again even if up to date.")
@click.pass_context
def train(ctx: click.Context, num_processes, force: bool, **options):
    """Stage 3: tune the model on its own data with (Q)LoRA."""
    session, overrides = ctx.obj, _stage_overrides(options)
    launched = distributed.world_size()
    if num_processes and num_processes > 1 and launched == 1:
        session.settings(**overrides)  # a bad setting or domain fails here once, not once per process
        session.domain()
        distributed.launch(_command_line(ctx), num_processes)
        return
    if num_processes and num_processes != launched and distributed.is_main_process():
        click.echo(
            f"note: already running as {launched} process(es) started by a launcher; "
            f"--num-processes {num_processes} is ignored",
            err=True,
        )
    with session.pipeline(**overrides) as pipeline:
        pipeline.run_stages(["train"], force=force)


def _command_line(ctx: click.Context) -> list[str]:
    """The arguments that run ``ctx``'s command again, as the launched processes must."""
    return [*_options(ctx.find_root()), ctx.info_name, *_options(ctx)]


def _options(ctx: click.Context) -> list[str]:
    args = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Option) and value not in (None, False):
            args += [param.opts[0]] if value is True else [param.opts[0], str(value)]
    return args


@cli.command()
@_retrieval
@_quant
@click.option("--force", is_flag=True, help="Run every stage again.")
@click.pass_obj
def run(session: Session, force: bool, **options):
    """Run every stage: generate, respond, train, evaluate, report."""
    with session.pipeline(**_stage_overrides(options)) as pipeline:
        pipeline.run_stages(list(STAGES), force=force)
    click.echo(f"report: {pipeline.run.stage_dir('report') / 'report.html'}")


@cli.command()
@click.option(
    "--adapter", type=click.Path(file_okay=False), help="Adapter to compare with the base (default: the run's)."
)
@click.option(
    "--eval-file", type=click.Path(dir_okay=False), help="Your task: JSONL rows {instruction, input, output, choices?}."
)
@click.option(
    "--metric",
    type=click.Choice(["accuracy", "exact_match", "f1", "rouge_l", "numeric"]),
    help="Metric for --eval-file rows without choices.",
)
@click.option("--output", type=click.Path(dir_okay=False), help="Where --eval-file results go (JSON).")
@click.option("--force", is_flag=True, help="Run again even if up to date.")
@click.pass_obj
def evaluate(session: Session, adapter, eval_file, metric, output, force):
    """Stage 4: score base vs specialized on the domain's benchmarks (or on --eval-file)."""
    if eval_file:
        from selfspec_core.stages.evaluate import evaluate_file

        use_log_file()
        results = evaluate_file(
            session.settings(),
            eval_file,
            metric=metric,
            adapter=adapter,
            output=output or "results.json",
            domain=session.domain_name,
            log=click.echo,
        )
        click.echo(f"results: {output or 'results.json'}")
        for task, row in results.items():
            click.echo(f"  {task}: {row}")
        return
    with session.pipeline(**_stage_overrides({"adapter": adapter})) as pipeline:
        pipeline.run_stages(["evaluate"], force=force)


@cli.command()
@click.option(
    "--merge", is_flag=True, help="Write the base model with the adapter merged in (a folder for from_pretrained)."
)
@click.option("--gguf", is_flag=True, help="Write the merged model as one .gguf file for llama.cpp, Ollama and llm.")
@click.option(
    "--gguf-type",
    type=click.Choice(["f16", "f32"]),
    default="f16",
    show_default=True,
    help="Precision of the GGUF's weight matrices.",
)
@click.option("--output", type=click.Path(), required=True, help="Folder for --merge, .gguf file for --gguf.")
@click.option("--adapter", type=click.Path(file_okay=False), help="Adapter folder (default: the run's).")
@click.pass_obj
def export(session: Session, merge, gguf, gguf_type, output, adapter):
    """Export the specialized model: safetensors + tokenizer (--merge) or one GGUF file (--gguf)."""
    from selfspec_core.models.loading import resolve_model

    if merge == gguf:
        raise SelfspecError("export: pass exactly one of --merge (a model folder) and --gguf (a .gguf file)")
    settings = session.settings()
    if adapter is None:
        run = session.run_dir(session.domain())
        adapter = run.require("train", "adapter")
    use_log_file()
    if gguf:
        from selfspec_core.export.gguf import export_gguf

        export_gguf(resolve_model(settings.model), Path(adapter), Path(output), gguf_type)
        click.echo(f"GGUF model written to {output}")
        return
    from selfspec_core.stages.train import export_merged

    export_merged(resolve_model(settings.model), Path(adapter), Path(output))
    click.echo(f"merged model written to {output}")


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option(
    "--output",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for the composed model (router and manifest).",
)
@click.option(
    "--evaluate/--no-evaluate",
    default=True,
    show_default=True,
    help="Score base, each specialist and the composed model on every installed domain's tasks.",
)
@click.option(
    "--baselines/--no-baselines",
    default=True,
    show_default=True,
    help="With --evaluate, also score the adapters merged by weights (linear, TIES) and one adapter tuned on all domains' data.",
)
@click.option(
    "--max-records",
    type=click.IntRange(min=20),
    default=400,
    show_default=True,
    help="Most training records per domain (and general requests) the router learns from.",
)
@click.pass_obj
def compose(session: Session, runs, output, evaluate, baselines, max_records):
    """Compose several domains' runs into one model: the base, every run's adapter, and a router (Self-MoE).

    \b
    selfspec compose runs/finance-quick runs/biomed-quick --output composed/
    selfspec serve --composed composed/
    """
    from selfspec_core.compose.experts import compose as build

    settings = session.settings()
    use_log_file()
    build(
        runs,
        Path(output),
        dtype=settings.dtype,
        model=settings.model,
        max_records=max_records,
        seed=settings.seed,
        log=click.echo,
    )
    click.echo(f"composed model written to {output}")
    if evaluate:
        from selfspec_core.compose.evaluate import evaluate_composed

        result = evaluate_composed(Path(output), settings, log=click.echo, baselines=baselines)
        for key, task in result["tasks"].items():
            scores = ", ".join(f"{label} {row['score']:.3f}" for label, row in task["models"].items())
            click.echo(f"  {key}: {scores}")
        click.echo("  routing accuracy: " + ", ".join(f"{d} {a:.3f}" for d, a in result["routing_accuracy"].items()))


@cli.command(name="new-domain")
@click.argument("name")
@click.option(
    "--dest",
    type=click.Path(file_okay=False),
    default=".",
    show_default=True,
    help="Where to create the plugin folder.",
)
def new_domain(name, dest):
    """Scaffold an installable domain plugin package (then `pip install -e <folder>`)."""
    from selfspec_core.authoring.scaffold import scaffold_domain

    folder = scaffold_domain(safe_name(name, "domain name"), Path(dest))
    click.echo(
        f"created {folder}\nnext: pip install -e {folder} && selfspec check-plugin {name} && "
        f"selfspec --domain {name} --profile tiny run  (guide: docs/plugins.md)"
    )


@cli.command(name="plugins")
@click.option("--all", "include_core", is_flag=True, help="Also list the core's own default hooks.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def plugins_command(include_core, as_json):
    """List installed plugins: package, version, the domains they register and the hooks they implement."""
    found = plugins.installed_plugins(include_core)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(plugin) for plugin in found], indent=2))
        return
    if not found:
        click.echo("no plugins installed: `pip install -e plugins/finance` or `selfspec new-domain NAME`")
    for plugin in found:
        click.echo(f"{plugin.name}  ({plugin.package or 'not from a package'} {plugin.version})".rstrip())
        click.echo(f"  domains: {', '.join(plugin.domains) or '-'}")
        click.echo(f"  hooks: {', '.join(plugin.hooks) or '-'}")


@cli.command(name="check-plugin")
@click.argument("name")
@click.pass_obj
def check_plugin_command(session: Session, name):
    """Call each hook of plugin NAME (or of the plugin of domain NAME) and check its answers."""
    from selfspec_core.authoring.check import check_plugin

    result = check_plugin(name, data_dir=session.settings().data_dir)
    for note in result.notes:
        click.echo(note)
    for problem in result.problems:
        click.echo(problem, err=True)
    if result.problems:
        click.echo(f"plugin {result.plugin!r}: {len(result.problems)} problem(s)", err=True)
        sys.exit(2)
    click.echo(f"plugin {result.plugin!r}: no problems")


cli.add_command(serve_command)


def one_line(message: str) -> str:
    """A message as one line: what a library said inside it may span several."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip()) or "unknown error"


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2 (``--debug`` for the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logs.capture()
    try:
        cli.main(args=argv, prog_name="selfspec", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # one line too, with where to read the command's options
        where = exc.ctx.command_path if exc.ctx is not None else "selfspec"
        click.echo(f"error: {exc.format_message()} (see `{where} --help`)", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except SelfspecError as exc:
        if distributed.rank() == 0:  # under a launcher every process meets the same error: say it once
            if debug:
                traceback.print_exc()
            click.echo(f"error: {one_line(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(130)
