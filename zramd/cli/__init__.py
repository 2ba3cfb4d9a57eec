"""The ``zramd`` command line: a click group and its commands.

Theory of operation
-------------------
:func:`main` is the group (``--version``, ``-v/--verbose``, which ``serve`` also takes); each
command lives in the module that says what it is: ``serve`` (flags and daemon start),
``commands`` (the control-socket commands), ``attach`` (kernel NBD devices), with ``table`` (the
``list`` output) and ``options`` (shared options, one-line errors, logging). Commands collect
flags and hand them over: configuration is built, merged and validated by ``zramd.config``,
operations are done by ``zramd.control`` and ``zramd.server``. Usage errors are one line
(``zramd: error: ...``) and exit 2; a bare ``zramd`` prints the help. Nothing in zramd imports
this package: it is the top of the layers.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from zramd import __version__
from zramd.cli import attach, commands, tiers
from zramd.cli.options import EXIT_CONFIG, fail, setup_logging, verbose_option
from zramd.cli.serve import serve


class _Group(click.Group):
    """A click group whose usage errors are one line (``zramd: error: ...``, exit 2)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare ``zramd``: show the help
                click.echo(e.format_message())
                sys.exit(0)
            fail(e.format_message(), EXIT_CONFIG)
        except click.ClickException as e:
            click.echo(f"zramd: error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("zramd: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="zramd")
@verbose_option
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """zramd: compressed RAM block devices served over NBD."""
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    setup_logging(verbose)


for command in (serve, *commands.COMMANDS, *tiers.COMMANDS, *attach.COMMANDS):
    main.add_command(command)
