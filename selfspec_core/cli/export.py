"""``selfspec export`` (a merged model or a GGUF file) and ``selfspec compose`` (several runs, one model)."""

from __future__ import annotations

from pathlib import Path

import click

from selfspec_core.cli.session import Session, use_log_file
from selfspec_core.errors import SelfspecError


@click.command()
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


@click.command()
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
    help="With --evaluate, also score the adapters merged by weights (linear, TIES) "
    "and one adapter tuned on all domains' data.",
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


COMMANDS = (export, compose)
