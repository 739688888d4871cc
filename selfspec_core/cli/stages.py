"""The stage commands: generate, respond, train, evaluate, report, and run for all of them."""

from __future__ import annotations

import click

from selfspec_core.cli.session import Session, use_log_file
from selfspec_core.run import rounds
from selfspec_core.run.pipeline import Pipeline
from selfspec_core.run.rundir import STAGES
from selfspec_core.runtime import distributed
from selfspec_core.stages import estimate


def _stage_command(stage: str, help_text: str):
    @click.command(name=stage, help=help_text)
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


@click.command()
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
    assert ctx.info_name is not None  # click names every subcommand's context
    return [*_options(ctx.find_root()), ctx.info_name, *_options(ctx)]


def _options(ctx: click.Context) -> list[str]:
    args = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Option) and value is not None and value is not False:  # --seed 0 counts
            args += [param.opts[0]] if value is True else [param.opts[0], str(value)]
    return args


@click.command()
@_retrieval
@_quant
@click.option(
    "--rounds",
    "round_count",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Rounds of self-specialization: each after the first writes, answers and judges with the "
    "round before's adapter, then tunes a fresh one on every round's records (in <out>/round-<k>/).",
)
@click.option("--force", is_flag=True, help="Run every stage again.")
@click.pass_obj
def run(session: Session, force: bool, round_count: int, **options):
    """Run every stage: generate, respond, train, evaluate, report, first saying how long they will take."""

    def announce(stages: list[str]) -> None:
        estimate.announce(pipeline, stages)
        if round_count > 1:
            click.echo(
                f"[estimate] then {round_count - 1} more round(s), each about as long again "
                "(training longer: it tunes on every round's records)"
            )

    with session.pipeline(**_stage_overrides(options)) as pipeline:
        pipeline.run_stages(list(STAGES), force=force, before_running=announce)
        for number in range(2, round_count + 1):
            current = rounds.round_run(pipeline.run, number).open()
            rounds.hand_on(rounds.round_run(pipeline.run, number - 1), current)
            click.echo(f"[round {number}] writing and answering with round {number - 1}'s adapter in {current.path}")
            Pipeline(pipeline.settings, pipeline.domain, current, pipeline.seeds, pipeline.log).run_stages(
                list(STAGES), force=force
            )
        if round_count > 1:
            for row in rounds.summarize(pipeline.run, round_count):
                suite = row["suite"] or {}
                click.echo(
                    f"[round {row['round']}] {row['records']} records; suite "
                    f"{suite.get('base', float('nan')):.3f} -> {suite.get('specialized', float('nan')):.3f}"
                )
            pipeline.run_stages(["report"], force=True)  # the first round's report adds the rounds' table
    click.echo(f"report: {pipeline.run.stage_dir('report') / 'report.html'}")


@click.command()
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


COMMANDS = (generate, respond, train, evaluate, report, run)
