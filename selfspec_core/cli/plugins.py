"""The plugin commands: domains, plugins, check-plugin and new-domain."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click

from selfspec_core.cli.session import Session
from selfspec_core.errors import SelfspecError
from selfspec_core.plugins import manager as plugins
from selfspec_core.run.rundir import safe_name


@click.command()
def domains():
    """List installed domains with their plugin, seeds, tasks and corpus."""
    from selfspec_core.data.catalog import domain_tasks
    from selfspec_core.data.retrieval import Passage
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
        tasks = [task.name for _, task in domain_tasks(name)]
        corpus = plugins.first_answer("retrieval_corpus", (list, tuple), domain=name, data_dir=None) or []
        found = [part for part in corpus if isinstance(part, Passage) or Path(part).exists()]
        missing = [str(part) for part in corpus if part not in found]
        corpus_text = f"{len(found)} sources" if found else "none found (set SELFSPEC_DATA or pass --corpus)"
        if missing:
            corpus_text += f"; {len(missing)} not found: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
        if domain.plugin in plugins.broken_plugins():  # its hooks were left out: what is above is not its own
            click.echo(f"{name}  (plugin {domain.plugin}): left out, its plugin is broken (see the warning)")
            continue
        click.echo(f"{name}  (plugin {domain.plugin}): {seed_text}")
        click.echo(f"  {domain.description}")
        click.echo(f"  task families: {', '.join(families) or '-'}")
        click.echo(f"  evaluation tasks: {', '.join(tasks) or '-'}")
        click.echo(f"  retrieval corpus: {corpus_text}")


@click.command(name="new-domain")
@click.argument("name")
@click.option(
    "--dest",
    type=click.Path(file_okay=False),
    default=".",
    show_default=True,
    help="Where to create the plugin folder.",
)
def new_domain(name, dest):
    """Scaffold an installable domain plugin package (then `pip install -e '<folder>[test]'`).

    It creates DEST/selfspec-NAME, a plugin that completes a run as it is:

    \b
    pyproject.toml        the entry point (selfspec: NAME) and the [test] extra
    README.md             what to replace, and the commands to install, check and test it
    selfspec_NAME/
      __init__.py         every hook, each with an example
      seeds.yaml          placeholder seed tasks (seed_provider)
      eval/example.jsonl  an evaluation task in Python (evaluation_tasks)
      tasks/example.yaml  an evaluation task in YAML, no Python (+ example.jsonl)
      corpus/             documents that ground the answers (retrieval_corpus)
    tests/test_NAME.py    the plugin's tests, through selfspec_core.api only
    """
    from selfspec_core.authoring.scaffold import scaffold_domain

    folder = scaffold_domain(safe_name(name, "domain name"), Path(dest))
    click.echo(
        f"created {folder}\nnext: pip install -e '{folder}[test]' && selfspec check-plugin {name} && "
        f"selfspec --domain {name} --profile tiny run  (guide: docs/plugins.md)"
    )


@click.command(name="plugins")
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
        if plugin.broken:
            click.echo(f"  left out: {plugin.broken}")


@click.command(name="check-plugin")
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


COMMANDS = (domains, plugins_command, check_plugin_command)
# Commands that take none of the session options: their --help shows only their own.
OWN_OPTIONS_ONLY = (new_domain,)
