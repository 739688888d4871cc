"""``selfspec data``: each domain's benchmarks and corpora, and fetching the missing ones."""

from __future__ import annotations

import click

from selfspec_core.cli.session import Session
from selfspec_core.errors import SelfspecError


@click.group(invoke_without_command=True)
@click.pass_context
def data(ctx):
    """List each domain's benchmarks and corpora: in the data dir, shipped, cached from the Hub, to fetch,
    or missing."""
    if ctx.invoked_subcommand is not None:
        return
    from selfspec_core.data.catalog import installed_sources
    from selfspec_core.data.datasources import status

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
    from selfspec_core.data.catalog import installed_sources
    from selfspec_core.data.datasources import fetch_missing

    failed = fetch_missing(
        installed_sources(session.domain_name and session.domain().name), session.settings().data_dir, click.echo
    )
    for line in failed:
        click.echo(line, err=True)
    if failed:
        raise SelfspecError(f"{len(failed)} could not be fetched; put the files where the lines above say")
    click.echo("every benchmark and corpus with a Hub source is available")


COMMANDS = (data,)
