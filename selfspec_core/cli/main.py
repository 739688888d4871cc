"""The ``selfspec`` command: the root group, its session options and the entry point.

Each command group lives in its own module (stages, data, plugins, export; serve in serve/app.py) and is
added here, so a command module never imports this one."""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from selfspec_core import __version__
from selfspec_core.cli import data, export, plugins, stages
from selfspec_core.cli.session import SESSION_NAMES, Session, session_options
from selfspec_core.errors import SelfspecError, one_line
from selfspec_core.runtime import distributed, logs, openmp
from selfspec_core.serve.app import command as serve_command


class SessionGroup(click.Group):
    """A group whose session options every subcommand accepts after its own name too."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.extend(session_options())
        if cmd.callback is not None:  # a bare group has no callback to take them from
            cmd.callback = _taking_session_options(cmd.callback)
        super().add_command(cmd, name)


def _taking_session_options(callback: Callable[..., Any]) -> Callable[..., Any]:
    """``callback`` with the session options taken out of its arguments and into the session."""

    @functools.wraps(callback)
    def taking_session_options(*args: Any, **kwargs: Any) -> Any:
        given = {name: kwargs.pop(name) for name in SESSION_NAMES}
        session = click.get_current_context().find_object(Session)
        if session is not None:
            session.update(given)
            session.select_plugins()
        return callback(*args, **kwargs)

    return taking_session_options


def _with_session_options(group: click.Group) -> click.Group:
    group.params[:0] = session_options()
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


for command in (
    *stages.COMMANDS,
    *data.COMMANDS,
    *plugins.COMMANDS,
    *export.COMMANDS,
    serve_command,
):
    cli.add_command(command)
for command in plugins.OWN_OPTIONS_ONLY:
    click.Group.add_command(cli, command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2 (``--debug`` for the traceback)."""
    openmp.choose_wait_policy()  # this module loads no torch: libgomp reads the policy when it loads
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
            click.echo(f"error: {one_line(exc)}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(130)
